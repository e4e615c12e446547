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
    #[error(
        "destination workload {0} speaks HBONE, which this build cannot send yet; refusing rather than sending in clear"
    )]
    HboneUnavailable(String),
    #[error("destination {0} is behind a waypoint, which needs HBONE; this build cannot send it yet")]
    WaypointUnavailable(String),
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error("no certificate for {0} yet (is the local CA reachable?)")]
    NoCertificate(String),
    #[error("HBONE: {0}")]
    Hbone(String),
    #[error("SOCKS5: {0}")]
    Socks5(String),
    #[error("relay: {0}")]
    Io(std::io::Error),
    #[error("the client did not complete its handshake within {0:?}")]
    SetupTimeout(std::time::Duration),
    #[error("closed by the proxy at the drain deadline")]
    Drained,
}
