//! SOCKS5 outbound (127.0.0.1:15080, opt-in): no authentication, CONNECT only, IPv4, IPv6 and
//! hostnames (resolved through the mesh's service hostnames). The client's address picks the
//! source workload, as capture would. The reply is sent after the upstream connect, so a client
//! sees a real error code.
//!
//! Parsing is pure (`parse_greeting`, `parse_request`) and tested apart from the I/O.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use super::WorkerCtx;
use super::error::ProxyError;
use super::lifecycle::{Connection, Established, Upstream};
use super::outbound::connect;
use super::pods::PodNet;
use crate::net::DialError;
use crate::routing::RouteError;
use crate::snapshot::Snapshot;

pub const REPLY_OK: u8 = 0x00;
pub const REPLY_GENERAL_FAILURE: u8 = 0x01;
pub const REPLY_NOT_ALLOWED: u8 = 0x02;
pub const REPLY_NETWORK_UNREACHABLE: u8 = 0x03;
pub const REPLY_HOST_UNREACHABLE: u8 = 0x04;
pub const REPLY_CONNECTION_REFUSED: u8 = 0x05;
pub const REPLY_COMMAND_NOT_SUPPORTED: u8 = 0x07;
pub const REPLY_ADDRESS_NOT_SUPPORTED: u8 = 0x08;

/// Longest possible greeting (2 + 255) or request (4 + 1 + 255 + 2).
const MAX_MESSAGE: usize = 262;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Addr(SocketAddr),
    Name(String, u16),
}

/// A protocol error, with the reply code to send (if the client is owed one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Socks5Error {
    pub reply: Option<u8>,
    pub message: String,
}

fn fail(reply: Option<u8>, message: impl Into<String>) -> Socks5Error {
    Socks5Error { reply, message: message.into() }
}

/// Parses the method negotiation. `Ok(None)`: more bytes needed. `Ok(Some((no_auth, used)))`.
pub fn parse_greeting(buf: &[u8]) -> Result<Option<(bool, usize)>, Socks5Error> {
    let Some(&ver) = buf.first() else { return Ok(None) };
    if ver != 5 {
        return Err(fail(None, format!("not SOCKS5 (version byte {ver})")));
    }
    let Some(&n) = buf.get(1) else { return Ok(None) };
    if n == 0 {
        return Err(fail(None, "greeting offers no authentication method"));
    }
    let end = 2 + n as usize;
    if buf.len() < end {
        return Ok(None);
    }
    Ok(Some((buf[2..end].contains(&0), end)))
}

/// Parses the request. `Ok(None)`: more bytes needed. `Ok(Some((target, used)))`.
pub fn parse_request(buf: &[u8]) -> Result<Option<(Target, usize)>, Socks5Error> {
    if buf.len() < 4 {
        return Ok(None);
    }
    if buf[0] != 5 {
        return Err(fail(Some(REPLY_GENERAL_FAILURE), format!("request version byte {}", buf[0])));
    }
    if buf[1] != 1 {
        return Err(fail(
            Some(REPLY_COMMAND_NOT_SUPPORTED),
            format!("command {} not supported (only CONNECT)", buf[1]),
        ));
    }
    let (addr_end, target) = match buf[3] {
        1 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let ip = Ipv4Addr::new(buf[4], buf[5], buf[6], buf[7]);
            (8, Target::Addr(SocketAddr::new(ip.into(), 0)))
        }
        4 => {
            if buf.len() < 22 {
                return Ok(None);
            }
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&buf[4..20]);
            (20, Target::Addr(SocketAddr::new(Ipv6Addr::from(octets).into(), 0)))
        }
        3 => {
            let Some(&len) = buf.get(4) else { return Ok(None) };
            let end = 5 + len as usize;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            let name = std::str::from_utf8(&buf[5..end])
                .map_err(|_| fail(Some(REPLY_GENERAL_FAILURE), "hostname is not UTF-8"))?;
            if name.is_empty() {
                return Err(fail(Some(REPLY_HOST_UNREACHABLE), "empty hostname"));
            }
            (end, Target::Name(name.to_string(), 0))
        }
        other => return Err(fail(Some(REPLY_ADDRESS_NOT_SUPPORTED), format!("address type {other} not supported"))),
    };
    let port = u16::from_be_bytes([buf[addr_end], buf[addr_end + 1]]);
    let target = match target {
        Target::Addr(a) => Target::Addr(SocketAddr::new(a.ip().to_canonical(), port)),
        Target::Name(n, _) => match n.parse::<IpAddr>() {
            Ok(ip) => Target::Addr(SocketAddr::new(ip.to_canonical(), port)),
            Err(_) => Target::Name(n, port),
        },
    };
    Ok(Some((target, addr_end + 2)))
}

/// A reply message with the given code and bound address.
pub fn reply(code: u8, bound: Option<SocketAddr>) -> Vec<u8> {
    let bound = bound.unwrap_or_else(|| SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0));
    let mut out = vec![5, code, 0];
    match bound.ip() {
        IpAddr::V4(ip) => {
            out.push(1);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&bound.port().to_be_bytes());
    out
}

/// Resolves a hostname through the mesh's services: the service's VIP in the source's network,
/// of the client's address family when it has one.
pub fn resolve(snap: &Snapshot, name: &str, port: u16, network: &str, namespace: &str, v4: bool) -> Option<SocketAddr> {
    let svc = snap.service_by_hostname(name, namespace)?;
    let vips = svc.service.vips.iter().filter(|v| v.network == network);
    let mut chosen = None;
    for vip in vips {
        if vip.address.is_ipv4() == v4 {
            chosen = Some(vip.address);
            break;
        }
        chosen.get_or_insert(vip.address);
    }
    chosen.map(|ip| SocketAddr::new(ip, port))
}

/// The reply code for a failed connect.
fn reply_code(e: &ProxyError) -> u8 {
    match e {
        ProxyError::UnknownSource(_)
        | ProxyError::NoCertificate(_)
        | ProxyError::Refused(_)
        | ProxyError::HboneRefused { status: 401 | 403, .. }
        | ProxyError::Route(RouteError::Loop(_) | RouteError::NoIdentity(_)) => REPLY_NOT_ALLOWED,
        ProxyError::Route(_) | ProxyError::Dial(DialError::Timeout(..)) => REPLY_HOST_UNREACHABLE,
        ProxyError::Dial(DialError::Connect(_, io)) => match io.raw_os_error() {
            Some(libc::ECONNREFUSED) => REPLY_CONNECTION_REFUSED,
            Some(libc::ENETUNREACH) => REPLY_NETWORK_UNREACHABLE,
            Some(libc::EHOSTUNREACH) => REPLY_HOST_UNREACHABLE,
            _ => REPLY_GENERAL_FAILURE,
        },
        _ => REPLY_GENERAL_FAILURE,
    }
}

/// Reads until `parse` has a whole message in `acc`.
async fn read_message<T>(
    stream: &mut TcpStream,
    acc: &mut Vec<u8>,
    parse: impl Fn(&[u8]) -> Result<Option<(T, usize)>, Socks5Error>,
) -> Result<(T, usize), Socks5Error> {
    loop {
        if let Some(done) = parse(acc)? {
            return Ok(done);
        }
        if acc.len() >= MAX_MESSAGE {
            return Err(fail(None, "message too long"));
        }
        let (res, buf) = stream.read(Vec::with_capacity(MAX_MESSAGE)).await;
        match res {
            Ok(0) => return Err(fail(None, "client closed during the handshake")),
            Ok(_) => acc.extend_from_slice(&buf),
            Err(e) => return Err(fail(None, format!("reading the handshake: {e}"))),
        }
    }
}

async fn write(stream: &mut TcpStream, bytes: Vec<u8>) -> Result<(), ProxyError> {
    let (res, _) = stream.write_all(bytes).await;
    res.map(|_| ()).map_err(ProxyError::Socks5Write)
}

/// The SOCKS5 handshake, then the upstream connect; the reply tells the client how it went.
pub async fn handle(
    ctx: &WorkerCtx,
    conn: &mut Connection,
    mut stream: TcpStream,
    peer: SocketAddr,
    pod: Option<&PodNet>,
) -> Result<Established, ProxyError> {
    let socks = |e: Socks5Error| ProxyError::Socks5(e.message);
    let mut acc = Vec::new();
    let (no_auth, used) = read_message(&mut stream, &mut acc, parse_greeting).await.map_err(socks)?;
    acc.drain(..used);
    if !no_auth {
        write(&mut stream, vec![5, 0xFF]).await?;
        return Err(ProxyError::Socks5("client offers no acceptable method (only no-auth is supported)".into()));
    }
    write(&mut stream, vec![5, 0]).await?;
    let (target, used) = match read_message(&mut stream, &mut acc, parse_request).await {
        Ok(t) => t,
        Err(e) => {
            if let Some(code) = e.reply {
                write(&mut stream, reply(code, None)).await?;
            }
            return Err(socks(e));
        }
    };
    acc.drain(..used);
    let snap = match pod {
        Some(p) => ctx.pod_snapshot(p).await?,
        None => ctx.snapshot(),
    };
    let dst = match target {
        Target::Addr(a) => a,
        Target::Name(name, port) => {
            // The integration tests' way to make a connection task panic (see tests/hostile.rs).
            #[cfg(feature = "testing")]
            if name == "panic.ztunnel.test" {
                panic!("a test asked this connection to panic");
            }
            let network = ctx.cfg.network.as_str();
            let client = match (pod, ctx.cfg.proxy_mode) {
                (Some(p), _) => p.workload(&snap),
                (None, crate::config::ProxyMode::Dedicated) => snap.dedicated_workload(),
                (None, crate::config::ProxyMode::Shared) => snap.local_workload_by_ip(network, peer.ip()),
            };
            let ns = client.map(|w| w.namespace.clone()).unwrap_or_default();
            let found = match resolve(&snap, &name, port, network, &ns, peer.is_ipv4()) {
                Some(a) => Some(a),
                // Any other mesh name (short names, wildcards), then the upstream resolvers.
                None => crate::dns::server::resolve_name(ctx, pod, &snap, client.map(|c| &**c), &name, peer.is_ipv4())
                    .await
                    .map(|ip| SocketAddr::new(ip, port)),
            };
            match found {
                Some(a) => a,
                None => {
                    write(&mut stream, reply(REPLY_HOST_UNREACHABLE, None)).await?;
                    return Err(ProxyError::Socks5(format!("hostname {name:?} is not a known service")));
                }
            }
        }
    };
    let mut upstream = match connect(ctx, conn, &snap, peer, dst, pod).await {
        Ok(u) => u,
        Err(e) => {
            let _ = write(&mut stream, reply(reply_code(&e), None)).await;
            return Err(e);
        }
    };
    let bound = match &upstream {
        Upstream::Tcp(t) => t.local_addr().ok(),
        Upstream::Hbone(_) => None,
    };
    write(&mut stream, reply(REPLY_OK, bound)).await?;
    let early_bytes = acc.len() as u64;
    if !acc.is_empty() {
        // Bytes the client sent right behind its request belong to the stream.
        match &mut upstream {
            Upstream::Tcp(t) => {
                let (res, _) = t.write_all(acc).await;
                res.map_err(ProxyError::Relay)?;
            }
            Upstream::Hbone(h) => h.send.send_data(acc.into(), false).map_err(|e| ProxyError::Hbone(e.to_string()))?,
        }
    }
    Ok(Established { downstream: stream, upstream, early_bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting() {
        assert_eq!(parse_greeting(&[]), Ok(None));
        assert_eq!(parse_greeting(&[5]), Ok(None));
        assert_eq!(parse_greeting(&[5, 2, 0]), Ok(None));
        assert_eq!(parse_greeting(&[5, 2, 2, 0, 9]), Ok(Some((true, 4))), "extra bytes are left for the request");
        assert_eq!(parse_greeting(&[5, 1, 2]), Ok(Some((false, 3))));
        assert!(parse_greeting(&[4, 1, 0]).is_err());
        assert!(parse_greeting(&[5, 0]).is_err());
    }

    #[test]
    fn request_address_types() {
        let v4 = [5, 1, 0, 1, 10, 0, 0, 1, 0x1f, 0x90];
        assert_eq!(parse_request(&v4), Ok(Some((Target::Addr("10.0.0.1:8080".parse().unwrap()), 10))));
        assert_eq!(parse_request(&v4[..9]), Ok(None));
        let mut v6 = vec![5, 1, 0, 4];
        v6.extend_from_slice(&"fd00::1".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend_from_slice(&[0, 80]);
        assert_eq!(parse_request(&v6), Ok(Some((Target::Addr("[fd00::1]:80".parse().unwrap()), 22))));
        let mut name = vec![5, 1, 0, 3, 11];
        name.extend_from_slice(b"example.com");
        name.extend_from_slice(&[0, 80, 0xAA]);
        assert_eq!(parse_request(&name), Ok(Some((Target::Name("example.com".into(), 80), 18))));
        let mut lit = vec![5, 1, 0, 3, 9];
        lit.extend_from_slice(b"127.0.0.2");
        lit.extend_from_slice(&[0x1f, 0x90]);
        assert_eq!(parse_request(&lit).unwrap().unwrap().0, Target::Addr("127.0.0.2:8080".parse().unwrap()));
    }

    #[test]
    fn request_errors_carry_reply_codes() {
        assert_eq!(
            parse_request(&[5, 2, 0, 1, 1, 2, 3, 4, 0, 1]).unwrap_err().reply,
            Some(REPLY_COMMAND_NOT_SUPPORTED)
        );
        assert_eq!(parse_request(&[5, 1, 0, 9, 0, 0]).unwrap_err().reply, Some(REPLY_ADDRESS_NOT_SUPPORTED));
        assert_eq!(parse_request(&[5, 1, 0, 3, 0, 0, 80]).unwrap_err().reply, Some(REPLY_HOST_UNREACHABLE));
        assert_eq!(parse_request(&[5, 1, 0, 3, 2, 0xff, 0xfe, 0, 80]).unwrap_err().reply, Some(REPLY_GENERAL_FAILURE));
    }

    #[test]
    fn replies() {
        assert_eq!(reply(0, Some("10.0.0.1:258".parse().unwrap())), vec![5, 0, 0, 1, 10, 0, 0, 1, 1, 2]);
        assert_eq!(reply(4, None), vec![5, 4, 0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(reply(0, Some("[::1]:1".parse().unwrap())).len(), 22);
    }
}
