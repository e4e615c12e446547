//! What a CONNECT may ask for, decided without I/O: the request's shape, then its target against
//! the snapshot, in COMPAT.md's order. Shared by the HBONE server and the node-local fast path
//! (where the connection's destination is the target itself).

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use http::{Method, StatusCode};

use crate::net::{DialError, OwnAddrs};
use crate::rbac::Denied;
use crate::snapshot::Snapshot;

/// Why a CONNECT is refused; each maps to the status the peer gets.
#[derive(Debug)]
pub enum Refusal {
    NotConnect(Method),
    BadAuthority(String),
    /// The workload the connection was accepted for is no longer the one at its address
    /// (deleted, or its IP given to another pod): the connection must not serve anyone else.
    WorkloadGone {
        conn_dst: IpAddr,
        uid: String,
    },
    /// The target is not the workload the connection was accepted for.
    NotThisWorkload {
        target: SocketAddr,
        conn_dst: IpAddr,
    },
    /// Port 0, or one of the proxy's own ports.
    ForbiddenPort(u16),
    Denied(Denied),
    Upstream(DialError),
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::NotConnect(_) | Refusal::BadAuthority(_) | Refusal::NotThisWorkload { .. } => {
                StatusCode::BAD_REQUEST
            }
            Refusal::WorkloadGone { .. } | Refusal::ForbiddenPort(_) | Refusal::Upstream(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Refusal::Denied(_) => StatusCode::UNAUTHORIZED,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NotConnect(m) => write!(f, "method {m} is not CONNECT"),
            Refusal::BadAuthority(a) => write!(f, "authority \"{a}\" is not ip:port"),
            Refusal::WorkloadGone { conn_dst, uid } => {
                write!(f, "workload {uid}, which this connection was accepted for, is no longer at {conn_dst}")
            }
            Refusal::NotThisWorkload { target, conn_dst } => {
                write!(f, "target {target} is not the workload this connection is for ({conn_dst})")
            }
            Refusal::ForbiddenPort(p) => write!(f, "port {p} is not allowed"),
            Refusal::Denied(d) => write!(f, "RBAC: {d}"),
            Refusal::Upstream(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for Refusal {}

/// The most characters of a peer's authority quoted in a refusal (escaped, then cut).
const MAX_QUOTED: usize = 128;

/// The request's shape: the CONNECT method and an `ip:port` authority.
pub fn parse_request(method: &Method, authority: Option<&str>) -> Result<SocketAddr, Refusal> {
    if method != Method::CONNECT {
        return Err(Refusal::NotConnect(method.clone()));
    }
    let authority = authority.unwrap_or("");
    authority.parse().map(crate::net::canonical).map_err(|_| {
        // Escaped first, then cut: escaping can make a short string of control characters
        // many times longer.
        Refusal::BadAuthority(authority.escape_debug().take(MAX_QUOTED).collect())
    })
}

/// The checks on a target after its syntax, in COMPAT.md's order: the connection's own workload
/// (`conn_uid`, accepted at `conn_dst`) still served here at that address (else 503); the target
/// that workload's address (else 400, whatever the target is: another local pod, a pod of
/// another node, no workload at all); a port that is not 0 nor the proxy's own (else 503).
/// Nothing about the target is looked up: the connection's destination decides.
pub fn check_target(
    snap: &Snapshot,
    network: &str,
    (own, allowed_port): (&OwnAddrs, Option<u16>),
    (conn_dst, conn_uid): (IpAddr, &str),
    target: SocketAddr,
) -> Result<(), Refusal> {
    if snap.local_workload_by_ip(network, conn_dst).is_none_or(|w| w.uid != conn_uid) {
        return Err(Refusal::WorkloadGone { conn_dst, uid: conn_uid.to_string() });
    }
    if target.ip() != conn_dst {
        return Err(Refusal::NotThisWorkload { target, conn_dst });
    }
    if target.port() == 0 || own.is_own_port(target, allowed_port) {
        return Err(Refusal::ForbiddenPort(target.port()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ConfigState, Workload};
    use crate::snapshot::{LocalScope, SourceInfo};

    fn snap() -> Snapshot {
        let wl = |uid: &str, ip: &str, node: &str| -> Workload {
            serde_yaml_ng::from_str(&format!(
                "uid: {uid}\nname: {uid}\nnamespace: ns\nworkloadIps: [{ip}]\nnode: {node}\nprotocol: HBONE\n"
            ))
            .unwrap()
        };
        let state = ConfigState {
            workloads: vec![
                wl("here", "10.0.0.1", "n1"),
                wl("here-too", "10.0.0.2", "n1"),
                wl("there", "10.0.1.1", "n2"),
            ],
            ..ConfigState::default()
        };
        let source = SourceInfo { kind: "test", location: String::new() };
        Snapshot::build(1, source, LocalScope::Node(Some("n1".into())), state)
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn request_shape() {
        assert_eq!(parse_request(&Method::CONNECT, Some("10.0.0.1:80")).unwrap(), sa("10.0.0.1:80"));
        assert_eq!(parse_request(&Method::CONNECT, Some("[::ffff:10.0.0.1]:80")).unwrap(), sa("10.0.0.1:80"));
        let get = parse_request(&Method::GET, Some("10.0.0.1:80")).unwrap_err();
        assert_eq!(get.status(), StatusCode::BAD_REQUEST);
        for bad in ["", "example.com:80", "10.0.0.1", "10.0.0.1:70000", "user@10.0.0.1:80"] {
            let e = parse_request(&Method::CONNECT, Some(bad)).unwrap_err();
            assert!(matches!(e, Refusal::BadAuthority(_)), "{bad}: {e}");
            assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        }
        let long = "x".repeat(10_000);
        let e = parse_request(&Method::CONNECT, Some(&long)).unwrap_err();
        assert!(e.to_string().len() < 200, "a peer's string is not quoted at full length");
        // Found by the fuzzer: control characters escape to several times their length.
        let controls = "\u{1c}".repeat(1000);
        let e = parse_request(&Method::CONNECT, Some(&controls)).unwrap_err();
        assert!(e.to_string().len() < 200, "escaped, then cut: {} bytes", e.to_string().len());
    }

    #[test]
    fn targets_in_compat_order() {
        let s = snap();
        let own = OwnAddrs::default();
        let dst: IpAddr = "10.0.0.1".parse().unwrap();
        let check = |t: &str| check_target(&s, "", (&own, None), (dst, "here"), sa(t));
        assert!(check("10.0.0.1:80").is_ok());
        // Any target but the connection's own workload is 400: another local pod, a pod of
        // another node, an address that is no workload.
        for other in ["10.0.0.2:80", "10.0.1.1:80", "192.0.2.1:80"] {
            let e = check(other).unwrap_err();
            assert!(matches!(e, Refusal::NotThisWorkload { .. }), "{other}: {e}");
            assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        }
        // The order: a gone workload (503) before a wrong target (400); a wrong target before
        // a forbidden port.
        let e = check_target(&s, "", (&own, None), (dst, "deleted-pod"), sa("10.0.1.1:15008")).unwrap_err();
        assert!(matches!(e, Refusal::WorkloadGone { .. }), "{e}");
        let e = check("10.0.0.2:15008").unwrap_err();
        assert!(matches!(e, Refusal::NotThisWorkload { .. }), "{e}");
        for port in [0, 15001, 15006, 15008] {
            let e = check(&format!("10.0.0.1:{port}")).unwrap_err();
            assert!(matches!(e, Refusal::ForbiddenPort(p) if p == port));
            assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        }
        assert_eq!(Refusal::Denied(Denied::NotAllowed).status(), StatusCode::UNAUTHORIZED);
        // The connection was accepted for another workload at that address (IP reuse).
        let e = check_target(&s, "", (&own, None), (dst, "deleted-pod"), sa("10.0.0.1:80")).unwrap_err();
        assert!(matches!(e, Refusal::WorkloadGone { .. }), "{e}");
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
