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
