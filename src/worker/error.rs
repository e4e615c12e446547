//! Why a proxied connection failed, in words an operator can act on.

use std::net::{IpAddr, SocketAddr};

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
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("HBONE destination {0} has no workload identity to verify; refusing rather than sending in clear")]
    HboneUnavailable(String),
    #[error("refused by the destination's inbound checks: {0}")]
    Refused(String),
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error("no certificate for {0} yet (is the local CA reachable?)")]
    NoCertificate(String),
    #[error("HBONE: {0}")]
    Hbone(String),
    #[error("HBONE: {peer} answered CONNECT {target} with {status}")]
    HboneRefused { peer: SocketAddr, target: SocketAddr, status: u16 },
    #[error("SOCKS5: {0}")]
    Socks5(String),
    #[error("relay: {0}")]
    Io(std::io::Error),
    #[error("the client did not complete its handshake within {0:?}")]
    SetupTimeout(std::time::Duration),
    #[error("closed by the proxy at the drain deadline")]
    Drained,
}

impl ProxyError {
    /// Istio's `response_flags` for a connection that failed this way.
    pub fn response_flags(&self) -> &'static str {
        match self {
            ProxyError::Refused(_) | ProxyError::HboneRefused { status: 401 | 403, .. } => "DENY",
            ProxyError::Dial(_)
            | ProxyError::Hbone(_)
            | ProxyError::HboneRefused { .. }
            | ProxyError::NoCertificate(_)
            | ProxyError::Route(_) => "CONNECT",
            _ => "-",
        }
    }
}
