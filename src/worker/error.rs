//! Why a proxied connection failed, in words an operator can act on, and the one place that
//! classifies it for metrics (`response_flags`).

use std::net::{IpAddr, SocketAddr};

use super::conns::CloseReason;
use crate::hbone::target::Refusal;
use crate::net::DialError;
use crate::routing::RouteError;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("reading the original destination: {0}")]
    OriginalDst(std::io::Error),
    #[error(
        "connection to {0} reached the proxy without redirection (no original destination); use the capture rules or SOCKS5"
    )]
    NotRedirected(SocketAddr),
    #[error("no local workload has address {0} (is the client a pod on this node, and is NODE_NAME right?)")]
    UnknownSource(IpAddr),
    #[error("destination {0} is not a workload served by this proxy")]
    UnknownLocalDestination(SocketAddr),
    #[error(
        "timed out waiting for workload {0} from the config source (no workload with its name, namespace and service account on this node)"
    )]
    PodWorkloadMissing(String),
    #[error("destination {0} is not the address of pod {1}")]
    NotThisPod(SocketAddr, String),
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("HBONE destination {0} has no workload identity to verify; refusing rather than sending in clear")]
    HboneUnavailable(String),
    #[error("refused by the destination's inbound checks: {0}")]
    Refused(Refusal),
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error("no certificate for {0} yet (the certificate source has not delivered one; see the control thread's log)")]
    NoCertificate(String),
    #[error("HBONE: {0}")]
    Hbone(String),
    /// The HBONE peer's TLS handshake failed (or timed out).
    #[error("HBONE: {0}")]
    HboneTls(String),
    /// The HTTP/2 handshake over HBONE's TLS failed.
    #[error("HBONE: {0}")]
    HboneH2(String),
    /// The HBONE peer is not an identity the destination may have.
    #[error("HBONE: {0}")]
    HboneIdentity(String),
    #[error("HBONE: {peer} answered CONNECT {target} with {status}")]
    HboneRefused { peer: SocketAddr, target: SocketAddr, status: u16 },
    #[error("SOCKS5: {0}")]
    Socks5(String),
    #[error("SOCKS5: writing to the client: {0}")]
    Socks5Write(std::io::Error),
    #[error("relay: {0}")]
    Relay(std::io::Error),
    #[error("the client did not complete its handshake within {0:?}")]
    SetupTimeout(std::time::Duration),
    #[error("{0}")]
    Closed(CloseReason),
}

impl ProxyError {
    /// Istio's `response_flags` for a connection that failed this way.
    pub fn response_flags(&self) -> &'static str {
        match self {
            ProxyError::Refused(Refusal::Denied(_)) | ProxyError::HboneRefused { status: 401 | 403, .. } => "DENY",
            ProxyError::HboneTls(_) => "TLS_FAILURE",
            ProxyError::HboneH2(_) => "H2_HANDSHAKE_FAILURE",
            ProxyError::HboneIdentity(_) => "IDENTITY_ERROR",
            // A connect that times out is, as Istio reads it, a network policy dropping packets.
            ProxyError::Dial(DialError::Timeout(..))
            | ProxyError::Refused(Refusal::Upstream(DialError::Timeout(..))) => "NETWORK_POLICY",
            ProxyError::Refused(Refusal::Upstream(_)) => "CONNECT",
            ProxyError::Dial(_)
            | ProxyError::Hbone(_)
            | ProxyError::HboneRefused { .. }
            | ProxyError::NoCertificate(_)
            | ProxyError::Route(_) => "CONNECT",
            _ => "-",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_flags_as_istio_names_them() {
        let addr: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let flags = |e: ProxyError| e.response_flags();
        assert_eq!(flags(ProxyError::Refused(Refusal::Denied(crate::rbac::Denied::NotAllowed))), "DENY");
        assert_eq!(flags(ProxyError::HboneRefused { peer: addr, target: addr, status: 401 }), "DENY");
        assert_eq!(flags(ProxyError::HboneTls("x".into())), "TLS_FAILURE");
        assert_eq!(flags(ProxyError::HboneH2("x".into())), "H2_HANDSHAKE_FAILURE");
        assert_eq!(flags(ProxyError::HboneIdentity("x".into())), "IDENTITY_ERROR");
        let timeout = || DialError::Timeout(addr, std::time::Duration::from_secs(1));
        assert_eq!(flags(ProxyError::Dial(timeout())), "NETWORK_POLICY");
        assert_eq!(flags(ProxyError::Refused(Refusal::Upstream(timeout()))), "NETWORK_POLICY");
        let refused = DialError::Connect(addr, std::io::Error::from_raw_os_error(libc::ECONNREFUSED));
        assert_eq!(flags(ProxyError::Dial(refused)), "CONNECT");
        assert_eq!(flags(ProxyError::NotRedirected(addr)), "-");
    }
}
