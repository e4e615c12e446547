//! Socket plumbing shared by every worker: listener and upstream socket creation with the
//! options the mesh needs, and the relay between two streams. The system calls themselves (and
//! every `unsafe` block) are in `crate::sys`.
//!
//! Nothing here keeps state: a worker calls these on its own sockets, on its own thread.

pub mod bufpool;
pub mod relay;

use crate::sys;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use monoio::net::{TcpListener, TcpStream};
use socket2::{Domain, Protocol, Socket, Type};

/// Ports the proxy itself listens on (admin, outbound, inbound plaintext, HBONE, metrics,
/// readiness, DNS, SOCKS5). Never a CONNECT or plaintext target, on any address; never dialed
/// on loopback (the connection would come straight back into the proxy).
pub const PROXY_PORTS: [u16; 8] = [15000, 15001, 15006, 15008, 15020, 15021, 15053, 15080];

/// Where the proxy itself listens: the well-known ports above and the listeners a worker binds
/// for the node (data plane and control; in-pod and DNS listeners use well-known ports). A
/// destination among them would come straight back into the proxy. A listener is matched by its
/// whole address: one on 127.0.0.1:P says nothing of 127.0.0.2:P, while one on all addresses
/// covers every address of that port.
#[derive(Debug, Clone, Default)]
pub struct OwnAddrs {
    bound: Vec<SocketAddr>,
}

impl OwnAddrs {
    pub fn new(bound: impl IntoIterator<Item = SocketAddr>) -> OwnAddrs {
        let mut bound: Vec<SocketAddr> = bound.into_iter().collect();
        bound.sort_unstable();
        bound.dedup();
        OwnAddrs { bound }
    }

    /// Whether dialing `addr` would reach the proxy: a well-known proxy port on loopback, or a
    /// bound listener's own address (loopback, for a listener on all addresses).
    pub fn is_loop(&self, addr: SocketAddr) -> bool {
        let ip = addr.ip();
        (ip.is_loopback() && PROXY_PORTS.contains(&addr.port()))
            || self
                .bound
                .iter()
                .any(|l| l.port() == addr.port() && (l.ip() == ip || (l.ip().is_unspecified() && ip.is_loopback())))
    }

    /// Whether `addr`, a local workload's address and port, is the proxy's rather than the
    /// workload's: a well-known proxy port on any address, or a listener bound to that address or
    /// to all of them. `except` is a port let through all the same.
    pub fn is_own_port(&self, addr: SocketAddr, except: Option<u16>) -> bool {
        let port = addr.port();
        Some(port) != except
            && (PROXY_PORTS.contains(&port)
                || self.bound.iter().any(|l| l.port() == port && (l.ip().is_unspecified() || l.ip() == addr.ip())))
    }
}

/// The data-plane listener addresses. The first worker resolves port 0; the others bind what it
/// got.
#[derive(Debug, Clone, Copy)]
pub struct ListenAddrs {
    pub outbound: SocketAddr,
    pub inbound_plain: SocketAddr,
    pub inbound: SocketAddr,
    pub socks5: Option<SocketAddr>,
    /// The dedicated-mode DNS server's port, if it runs (0: any, resolved by the first worker).
    pub dns_port: Option<u16>,
}

/// How a listener socket is set up before it is handed to a worker's runtime.
#[derive(Debug, Clone, Copy)]
pub struct ListenOpts {
    /// Try `IP_TRANSPARENT` (TPROXY capture); without `CAP_NET_ADMIN` this is skipped quietly.
    pub transparent: bool,
    pub backlog: i32,
    /// A proxy listener: its accepted (downstream) sockets get `TCP_NODELAY`, Istio's keepalive
    /// and this `TCP_USER_TIMEOUT` (when `Some`). Set on the listener once: Linux copies them to
    /// every socket it accepts, so a connection costs no setsockopt for them.
    pub accepted: Option<AcceptedOpts>,
    /// `SO_MARK`, set before the socket is bound (so the first connection has it too); accepted
    /// sockets inherit it. A pod's listeners in in-pod mode carry `PACKET_MARK`: see
    /// `worker::pods`. Failing to set it fails the bind.
    pub mark: Option<u32>,
}

/// Options of the sockets a proxy listener accepts; see [`ListenOpts::accepted`].
#[derive(Debug, Clone, Copy)]
pub struct AcceptedOpts {
    pub user_timeout: Option<Duration>,
    /// The CPU the accepting worker is pinned to. The listener is marked with it
    /// (`SO_INCOMING_CPU`), so the kernel hands it the connections whose packets it processes on
    /// that CPU: for a local pod's connection, the CPU its application runs on. The worker then
    /// runs where the connection's network work already runs, with no cross-CPU wake-up per
    /// message. Connections processed on a CPU without such a listener are spread by hash.
    pub incoming_cpu: Option<usize>,
}

/// Istio's keepalive, on both sides of a proxied connection: first probe after 180 s idle, then
/// every 180 s, 9 probes.
fn keepalive() -> socket2::TcpKeepalive {
    socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(180))
        .with_interval(Duration::from_secs(180))
        .with_retries(9)
}

/// Binds one `SO_REUSEPORT` listener. Every worker binds its own socket on the same address, so
/// the kernel spreads new connections over the workers and no worker hands one to another.
pub fn bind_listener(addr: SocketAddr, opts: ListenOpts) -> io::Result<TcpListener> {
    TcpListener::from_std(bind_std(addr, opts)?)
}

/// The socket of [`bind_listener`], for any runtime. `SO_REUSEPORT` is also what lets a new
/// proxy bind every port of the one it replaces while that one drains (a restart on a node).
pub fn bind_std(addr: SocketAddr, opts: ListenOpts) -> io::Result<std::net::TcpListener> {
    // Non-blocking from the start (`SOCK_NONBLOCK`): a pod gets a set of these per worker on
    // each Add, and every call saved there shortens the Add's answer.
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        // A wildcard IPv6 listener also takes IPv4 (v4-mapped); a specific address is v6 only.
        socket.set_only_v6(!addr.ip().is_unspecified())?;
    }
    if opts.transparent {
        if let Err(e) = sys::set_ip_transparent(&socket, addr.is_ipv6()) {
            tracing::debug!(%addr, error = %e, "IP_TRANSPARENT not permitted; TPROXY capture unavailable");
        }
    }
    if let Some(accepted) = opts.accepted {
        // Failures here only cost latency or dead-peer detection; connections still work.
        let set = || -> io::Result<()> {
            socket.set_tcp_nodelay(true)?;
            socket.set_tcp_keepalive(&keepalive())?;
            // None is the kernel's default (0) already.
            if accepted.user_timeout.is_some() {
                socket.set_tcp_user_timeout(accepted.user_timeout)?;
            }
            if let Some(cpu) = accepted.incoming_cpu {
                sys::set_incoming_cpu(&socket, cpu)?;
            }
            Ok(())
        };
        if let Err(e) = set() {
            tracing::debug!(%addr, error = %e, "could not set the accepted sockets' options on the listener");
        }
    }
    if let Some(mark) = opts.mark {
        socket.set_mark(mark)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(opts.backlog)?;
    Ok(socket.into())
}

/// The network namespace a socket is made in (a pod's, in in-pod mode), and the one the thread
/// returns to.
#[derive(Debug, Clone, Copy)]
pub struct InNetns<'a> {
    pub pod: &'a sys::NetNs,
    pub home: &'a sys::NetNs,
}

/// Options of an upstream (proxy -> destination) connection.
#[derive(Debug, Clone, Copy)]
pub struct DialOpts<'a> {
    /// Create the socket in this namespace (a pod's: its traffic leaves from the pod).
    pub netns: Option<InNetns<'a>>,
    /// `SO_MARK`, so traffic redirection rules skip the proxy's own connections.
    pub mark: Option<u32>,
    /// Bind this source address first (original source preservation, needs `IP_TRANSPARENT`).
    pub spoof_source: Option<IpAddr>,
    pub timeout: Duration,
    /// `TCP_USER_TIMEOUT` (`USER_TIMEOUT_ENABLED`): unacknowledged data fails the connection
    /// after this long.
    pub user_timeout: Option<Duration>,
}

/// Errors of [`dial`], kept apart so the caller can tell a refusal from a timeout.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("connect to {0} timed out after {1:?} (is the destination up, or is a NetworkPolicy dropping packets?)")]
    Timeout(SocketAddr, Duration),
    #[error("connect to {0} failed: {1}")]
    Connect(SocketAddr, io::Error),
    #[error("preparing the upstream socket for {0} failed: {1}")]
    Socket(SocketAddr, io::Error),
    #[error("binding original source {0} failed ({1}); original source needs CAP_NET_ADMIN")]
    Spoof(IpAddr, io::Error),
}

/// Connects to `dst` with the mesh's socket options, on the current worker's runtime.
///
/// The socket is made and configured by hand (monoio's own connect takes no options), then
/// connected non-blocking and awaited for writability, which both drivers support.
pub async fn dial(dst: SocketAddr, opts: DialOpts<'_>) -> Result<TcpStream, DialError> {
    // Non-blocking from the start (`SOCK_NONBLOCK`), which spares every connection two `fcntl`s.
    let new_socket = || Socket::new(Domain::for_address(dst), Type::STREAM.nonblocking(), Some(Protocol::TCP));
    let socket = match opts.netns {
        None => new_socket(),
        Some(ns) => sys::in_netns(ns.pod, ns.home, new_socket).and_then(|r| r),
    }
    .map_err(|e| DialError::Socket(dst, e))?;
    let prep = || -> io::Result<()> {
        socket.set_tcp_nodelay(true)?;
        socket.set_tcp_keepalive(&keepalive())?;
        if let Some(mark) = opts.mark {
            socket.set_mark(mark)?;
        }
        if let Some(t) = opts.user_timeout {
            socket.set_tcp_user_timeout(Some(t))?;
        }
        Ok(())
    };
    prep().map_err(|e| DialError::Socket(dst, e))?;
    if let Some(src) = opts.spoof_source {
        let bind = || -> io::Result<()> {
            sys::set_ip_transparent(&socket, dst.is_ipv6())?;
            sys::set_freebind(&socket, dst.is_ipv6())?;
            socket.bind(&SocketAddr::new(src, 0).into())
        };
        bind().map_err(|e| DialError::Spoof(src, e))?;
    }
    match socket.connect(&dst.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(DialError::Connect(dst, e)),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket)).map_err(|e| DialError::Socket(dst, e))?;
    match monoio::time::timeout(opts.timeout, stream.writable(false)).await {
        Err(_) => return Err(DialError::Timeout(dst, opts.timeout)),
        Ok(Err(e)) => return Err(DialError::Connect(dst, e)),
        Ok(Ok(())) => {}
    }
    match sys::take_error(&stream) {
        Ok(None) => Ok(stream),
        Ok(Some(e)) | Err(e) => Err(DialError::Connect(dst, e)),
    }
}

/// Turns an IPv4-mapped IPv6 address (from a dual-stack listener) into plain IPv4, so lookups by
/// address see one form only.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// A `SO_REUSEPORT` UDP socket bound to `addr` (each worker binds its own: the kernel spreads
/// datagrams over them by source, or with `incoming_cpu` gives this one those processed on that
/// CPU; see [`AcceptedOpts::incoming_cpu`]).
pub fn bind_udp(addr: SocketAddr, incoming_cpu: Option<usize>, mark: Option<u32>) -> io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM.nonblocking(), Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    if let Some(cpu) = incoming_cpu {
        if let Err(e) = sys::set_incoming_cpu(&socket, cpu) {
            tracing::debug!(%addr, error = %e, "could not mark the UDP socket with its worker's CPU");
        }
    }
    if let Some(mark) = mark {
        socket.set_mark(mark)?;
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn own_addresses_match_whole_addresses() {
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        let own = OwnAddrs::new([sa("127.0.0.1:40001"), sa("0.0.0.0:40002"), sa("10.0.0.9:40003")]);
        // A listener on one loopback address: another loopback address with that port is
        // someone else (the case a test's echo server on 127.0.0.2 ran into).
        assert!(own.is_loop(sa("127.0.0.1:40001")));
        assert!(!own.is_loop(sa("127.0.0.2:40001")));
        // A listener on all addresses is reached on loopback; its own address is a loop too.
        assert!(own.is_loop(sa("127.0.0.2:40002")));
        assert!(own.is_loop(sa("10.0.0.9:40003")));
        assert!(!own.is_loop(sa("10.0.0.8:40003")));
        // The well-known ports, bound or not, on loopback only.
        assert!(own.is_loop(sa("127.0.0.1:15001")));
        assert!(!own.is_loop(sa("10.0.0.1:15001")));
        assert!(!own.is_loop(sa("127.0.0.1:8080")));

        // As a local workload's port: the well-known ports on any address, a listener on its
        // address or on all of them; the allowed exception passes.
        assert!(own.is_own_port(sa("10.0.0.1:15008"), None));
        assert!(!own.is_own_port(sa("10.0.0.1:15020"), Some(15020)));
        assert!(own.is_own_port(sa("10.0.0.1:40002"), None));
        assert!(!own.is_own_port(sa("10.0.0.1:40001"), None));
        assert!(own.is_own_port(sa("10.0.0.9:40003"), None));
        assert!(!own.is_own_port(sa("10.0.0.1:80"), None));
    }

    #[test]
    fn marked_sockets_are_marked_before_they_take_connections() {
        let opts = ListenOpts { transparent: false, backlog: 16, accepted: None, mark: Some(1337) };
        let listener = match bind_std("127.0.0.1:0".parse().unwrap(), opts) {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                eprintln!("skipped: setting SO_MARK needs CAP_NET_ADMIN");
                return;
            }
            Err(e) => panic!("binding a marked listener: {e}"),
        };
        assert_eq!(socket2::SockRef::from(&listener).mark().unwrap(), 1337);
        // A connection accepted by a marked listener has the mark from its first packet on.
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        listener.set_nonblocking(false).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert_eq!(socket2::SockRef::from(&accepted).mark().unwrap(), 1337);
        let udp = bind_udp("127.0.0.1:0".parse().unwrap(), None, Some(1337)).unwrap();
        assert_eq!(socket2::SockRef::from(&udp).mark().unwrap(), 1337);
        // Unmarked by default.
        let plain = bind_std("127.0.0.1:0".parse().unwrap(), ListenOpts { mark: None, ..opts }).unwrap();
        assert_eq!(socket2::SockRef::from(&plain).mark().unwrap(), 0);
    }

    #[test]
    fn accepted_sockets_get_the_listener_options() {
        let opts = ListenOpts {
            transparent: false,
            backlog: 16,
            accepted: Some(AcceptedOpts { user_timeout: Some(Duration::from_secs(1800)), incoming_cpu: Some(0) }),
            mark: None,
        };
        let listener = bind_std("127.0.0.1:0".parse().unwrap(), opts).unwrap();
        // Made non-blocking: with nothing queued, accept says so instead of waiting.
        assert_eq!(listener.accept().unwrap_err().kind(), io::ErrorKind::WouldBlock);
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        listener.set_nonblocking(false).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let s = socket2::SockRef::from(&accepted);
        assert!(s.tcp_nodelay().unwrap());
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_keepalive_time().unwrap(), Duration::from_secs(180));
        assert_eq!(s.tcp_keepalive_interval().unwrap(), Duration::from_secs(180));
        assert_eq!(s.tcp_keepalive_retries().unwrap(), 9);
        assert_eq!(s.tcp_user_timeout().unwrap(), Some(Duration::from_secs(1800)));
        // Not a proxy listener: the kernel's defaults.
        let plain = ListenOpts { accepted: None, ..opts };
        let listener = bind_std("127.0.0.1:0".parse().unwrap(), plain).unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        listener.set_nonblocking(false).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        assert!(!socket2::SockRef::from(&accepted).keepalive().unwrap());
        // A proxy listener without a user timeout leaves the kernel's default (none).
        let no_timeout = ListenOpts { accepted: Some(AcceptedOpts { user_timeout: None, incoming_cpu: None }), ..opts };
        let listener = bind_std("127.0.0.1:0".parse().unwrap(), no_timeout).unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        listener.set_nonblocking(false).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let s = socket2::SockRef::from(&accepted);
        assert!(s.keepalive().unwrap());
        assert_eq!(s.tcp_user_timeout().unwrap(), None);
    }

    #[test]
    fn dialed_sockets_are_non_blocking_with_the_mesh_options() {
        use std::os::fd::AsRawFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dst = listener.local_addr().unwrap();
        let opts = DialOpts {
            netns: None,
            mark: None,
            spoof_source: None,
            timeout: Duration::from_secs(10),
            user_timeout: None,
        };
        let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new().enable_timer().build().unwrap();
        let stream = rt.block_on(dial(dst, opts)).expect("dial");
        // The descriptor's status flags, as the kernel reports them (octal; O_NONBLOCK is 04000).
        let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", stream.as_raw_fd())).unwrap();
        let flags = fdinfo.lines().find_map(|l| l.strip_prefix("flags:")).expect("a flags line");
        let flags = i64::from_str_radix(flags.trim(), 8).unwrap();
        assert_ne!(flags & i64::from(libc::O_NONBLOCK), 0, "a worker's socket never blocks");
        assert!(stream.nodelay().unwrap());
    }

    #[test]
    fn udp_sockets_are_non_blocking() {
        let socket = bind_udp("127.0.0.1:0".parse().unwrap(), None, None).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(socket.recv_from(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
    }

    /// Two listeners on one port, each marked with a CPU: a connection made from a thread on a
    /// CPU is accepted by that CPU's listener (loopback processes a packet on the sending CPU).
    #[test]
    fn connections_go_to_the_listener_of_their_cpu() {
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        if cores.len() < 2 {
            eprintln!("skipped: needs two CPUs");
            return;
        }
        let opts = |cpu| ListenOpts {
            transparent: false,
            backlog: 64,
            accepted: Some(AcceptedOpts { user_timeout: None, incoming_cpu: Some(cpu) }),
            mark: None,
        };
        let first = bind_std("127.0.0.1:0".parse().unwrap(), opts(cores[0].id)).unwrap();
        let addr = first.local_addr().unwrap();
        let second = bind_std(addr, opts(cores[1].id)).unwrap();
        for (core, listener) in [(cores[0], &first), (cores[1], &second)] {
            let clients = std::thread::spawn(move || {
                assert!(core_affinity::set_for_current(core));
                (0..8).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect::<Vec<_>>()
            })
            .join()
            .unwrap();
            for _ in &clients {
                // Non-blocking: a connection that went to the other listener is not waited for.
                let mut got = None;
                for _ in 0..500 {
                    match listener.accept() {
                        Ok(c) => {
                            got = Some(c);
                            break;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(2)),
                        Err(e) => panic!("accept: {e}"),
                    }
                }
                assert!(got.is_some(), "a connection from CPU {} did not reach its listener", core.id);
            }
        }
        // The same for datagrams (the DNS proxy's UDP sockets).
        let first = bind_udp("127.0.0.1:0".parse().unwrap(), Some(cores[0].id), None).unwrap();
        let addr = first.local_addr().unwrap();
        let second = bind_udp(addr, Some(cores[1].id), None).unwrap();
        for (core, socket) in [(cores[0], &first), (cores[1], &second)] {
            std::thread::spawn(move || {
                assert!(core_affinity::set_for_current(core));
                // Eight sources: the hash alone would send about half of them elsewhere.
                for _ in 0..8 {
                    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                    client.send_to(b"q", addr).unwrap();
                }
            })
            .join()
            .unwrap();
            socket.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            socket.set_nonblocking(false).unwrap();
            for _ in 0..8 {
                let mut buf = [0u8; 4];
                assert!(socket.recv_from(&mut buf).is_ok(), "a datagram from CPU {} did not reach its socket", core.id);
            }
        }
    }
}
