//! The DNS servers of one worker and its forwarder, on the worker's runtime.
//!
//! Every worker binds its own `SO_REUSEPORT` UDP socket and TCP listener on each DNS address:
//! inside each pod's namespace (127.0.0.1:15053 and [::1]:15053) in in-pod mode, or on
//! `ISTIO_META_DNS_PROXY_ADDR` in dedicated mode. A query is answered on the worker that got it:
//! mesh names at once, from the worker's snapshot; other names forwarded to the upstream
//! resolvers from a socket made in the pod's namespace with the packet mark, on this worker
//! too. Forwarded queries in flight and TCP clients are bounded per worker.

use std::cell::Cell;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::RecordType;
use monoio::io::{AsyncReadRentExt, AsyncWriteRentExt};
use monoio::net::udp::UdpSocket;
use monoio::net::{TcpListener, TcpStream};

use super::message::{self, Outcome, Transport};
use super::names::{self, Asker};
use crate::net::{InNetns, ListenOpts, bind_std, bind_udp};
use crate::telemetry::metrics::DnsQueryKey;
use crate::worker::pods::{self, PodNet};
use crate::worker::{WorkerCtx, contained};

/// Forwarded queries a worker may have in flight; beyond, a query gets SERVFAIL at once.
pub const MAX_IN_FLIGHT: usize = 1024;
/// TCP clients a worker serves at once; beyond, new ones are closed.
pub const MAX_TCP_CLIENTS: usize = 256;
/// How long a TCP client may take over each request (Istio: 5 s).
pub const TCP_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A UDP datagram larger than this is not a DNS query we take (it arrives cut, and fails to
/// parse).
pub const MAX_UDP_QUERY: usize = 4096;

/// The sockets of one DNS server address.
pub struct DnsSockets {
    pub udp: std::net::UdpSocket,
    pub tcp: std::net::TcpListener,
}

/// Binds UDP and TCP on each of `addrs` (in the calling thread's namespace). An IPv6 address
/// the namespace lacks is skipped; anything else failing is an error. `cpu`: the worker's, if
/// pinned; the UDP sockets are marked with it, so a local pod's queries reach the worker on the
/// pod's CPU (see `net::AcceptedOpts::incoming_cpu`). `mark`: `SO_MARK` for every socket (a
/// pod's, in in-pod mode).
pub fn bind(addrs: &[SocketAddr], cpu: Option<usize>, mark: Option<u32>) -> io::Result<Vec<DnsSockets>> {
    let mut out = Vec::new();
    // Port 0 (tests): the first address's UDP port is picked by the kernel, then used for
    // every socket; a port whose TCP side is taken is given up for another, a few times.
    let mut port = addrs.first().map_or(0, |a| a.port());
    let pick = port == 0;
    let mut tries = 0;
    'again: loop {
        out.clear();
        for addr in addrs {
            let addr = SocketAddr::new(addr.ip(), port);
            let udp = match bind_udp(addr, cpu, mark) {
                Ok(s) => s,
                Err(e) if addr.is_ipv6() && ipv6_missing(&e) => continue,
                Err(e) if pick && tries < 16 && e.kind() == io::ErrorKind::AddrInUse => {
                    tries += 1;
                    port = 0;
                    continue 'again;
                }
                Err(e) => return Err(io::Error::new(e.kind(), format!("DNS (UDP) on {addr}: {e}"))),
            };
            port = udp.local_addr()?.port();
            let tcp_addr = SocketAddr::new(addr.ip(), port);
            let tcp = match bind_std(tcp_addr, ListenOpts { transparent: false, backlog: 128, accepted: None, mark }) {
                Ok(t) => t,
                Err(e) if pick && tries < 16 && e.kind() == io::ErrorKind::AddrInUse => {
                    tries += 1;
                    port = 0;
                    continue 'again;
                }
                Err(e) => return Err(io::Error::new(e.kind(), format!("DNS (TCP) on {tcp_addr}: {e}"))),
            };
            out.push(DnsSockets { udp, tcp });
        }
        return Ok(out);
    }
}

fn ipv6_missing(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EADDRNOTAVAIL | libc::EAFNOSUPPORT))
}

/// The addresses a pod's DNS server listens on, inside its namespace.
pub fn pod_addrs() -> [SocketAddr; 2] {
    [SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 15053), SocketAddr::new(Ipv6Addr::LOCALHOST.into(), 15053)]
}

/// Starts serving `sockets` on this worker (for `pod`, or the dedicated workload).
pub fn start(ctx: &Rc<WorkerCtx>, sockets: Vec<DnsSockets>, pod: Option<Rc<PodNet>>) -> io::Result<Vec<i32>> {
    use std::os::fd::AsRawFd;
    let mut fds = Vec::new();
    for s in sockets {
        let udp = UdpSocket::from_std(s.udp)?;
        let tcp = TcpListener::from_std(s.tcp)?;
        fds.push(udp.as_raw_fd());
        fds.push(tcp.as_raw_fd());
        ctx.accepting.set(ctx.accepting.get() + 2);
        monoio::spawn(serve_udp(ctx.clone(), Rc::new(udp), pod.clone()));
        monoio::spawn(serve_tcp(ctx.clone(), tcp, pod.clone()));
    }
    Ok(fds)
}

async fn serve_udp(ctx: Rc<WorkerCtx>, sock: Rc<UdpSocket>, pod: Option<Rc<PodNet>>) {
    // Waits for readiness and reads into the worker's one buffer: an idle pod's server holds no
    // buffer of its own.
    'serve: loop {
        let ready = monoio::select! {
            r = sock.readable(false) => r,
            _ = pods::draining(&ctx, pod.as_deref()) => break,
        };
        if ready.is_err() {
            if ctx.draining.fired() {
                break;
            }
            continue;
        }
        // A burst is read at once, then other tasks get their turn.
        for _ in 0..64 {
            let got = {
                let mut buf = ctx.dns_buf.borrow_mut();
                crate::sys::udp_recv_from(&*sock, &mut buf).map(|r| r.map(|(n, from)| (buf[..n].to_vec(), from)))
            };
            let (query, client) = match got {
                Ok(Some(q)) => q,
                Ok(None) => break,
                Err(_) if ctx.draining.fired() => break 'serve,
                Err(e) => {
                    tracing::debug!(worker = ctx.id, error = %e, "DNS: UDP receive failed");
                    break;
                }
            };
            match local(&ctx, pod.as_deref(), &query, Transport::Udp).await {
                Local::Done(Some(reply)) => {
                    if let Err(e) = crate::sys::udp_send_to(&*sock, &reply, client) {
                        tracing::debug!(worker = ctx.id, %client, error = %e, "DNS: UDP send failed");
                    }
                }
                Local::Done(None) => {}
                Local::Forward(request, key) => {
                    let (ctx2, sock, pod) = (ctx.clone(), sock.clone(), pod.clone());
                    monoio::spawn(contained(ctx.id, "dns forward", async move {
                        let reply = forward(&ctx2, pod.as_deref(), &request, key, Transport::Udp).await;
                        let _ = crate::sys::udp_send_to(&*sock, &reply, client);
                    }));
                }
            }
        }
    }
    ctx.accepting.set(ctx.accepting.get() - 1);
}

async fn serve_tcp(ctx: Rc<WorkerCtx>, listener: TcpListener, pod: Option<Rc<PodNet>>) {
    loop {
        let accepted = monoio::select! {
            r = listener.accept() => r,
            _ = pods::draining(&ctx, pod.as_deref()) => break,
        };
        match accepted {
            Ok((stream, _)) if ctx.dns_tcp_clients.get() < MAX_TCP_CLIENTS => {
                ctx.dns_tcp_clients.set(ctx.dns_tcp_clients.get() + 1);
                let (c, p) = (ctx.clone(), pod.clone());
                monoio::spawn(contained(ctx.id, "dns tcp", async move {
                    tcp_client(&c, p.as_deref(), stream).await;
                    c.dns_tcp_clients.set(c.dns_tcp_clients.get() - 1);
                }));
            }
            Ok(_) => tracing::debug!(worker = ctx.id, "DNS: {MAX_TCP_CLIENTS} TCP clients already; closing a new one"),
            Err(_) if ctx.draining.fired() => break,
            Err(e) => tracing::debug!(worker = ctx.id, error = %e, "DNS: TCP accept failed"),
        }
    }
    ctx.accepting.set(ctx.accepting.get() - 1);
}

/// Length-prefixed requests on one TCP connection, each within the request timeout.
async fn tcp_client(ctx: &Rc<WorkerCtx>, pod: Option<&PodNet>, mut stream: TcpStream) {
    loop {
        let read = async {
            let (res, len) = stream.read_exact(vec![0u8; 2]).await;
            res?;
            let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
            let (res, body) = stream.read_exact(vec![0u8; len]).await;
            res.map(|_| body)
        };
        let query = monoio::select! {
            r = monoio::time::timeout(TCP_REQUEST_TIMEOUT, read) => match r {
                Ok(Ok(q)) => q,
                _ => return,
            },
            _ = pods::draining(ctx, pod) => return,
        };
        let reply = match local(ctx, pod, &query, Transport::Tcp).await {
            Local::Done(Some(r)) => r,
            Local::Done(None) => return,
            Local::Forward(request, key) => forward(ctx, pod, &request, key, Transport::Tcp).await,
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&(reply.len().min(usize::from(u16::MAX)) as u16).to_be_bytes());
        framed.extend_from_slice(&reply);
        let (res, _) = stream.write_all(framed).await;
        if res.is_err() {
            return;
        }
    }
}

enum Local {
    /// Answered here (or nothing to answer).
    Done(Option<Vec<u8>>),
    /// For the upstream resolvers.
    Forward(Box<Message>, ForwardKey),
}

/// What a forwarded query is counted by (owned: it travels to the forwarding task).
pub struct ForwardKey {
    query_type: u16,
    protocol: &'static str,
    service: String,
    revision: String,
}

impl ForwardKey {
    fn borrow(&self) -> DnsQueryKey<'_> {
        DnsQueryKey {
            query_type: self.query_type,
            protocol: self.protocol,
            service: &self.service,
            revision: &self.revision,
        }
    }
}

fn type_number(t: Option<hickory_proto::rr::RecordType>) -> u16 {
    t.map_or(0, u16::from)
}

/// Answers what the mesh config answers; counts it. Nothing here clones a shared `Arc`: the
/// snapshot is the worker's `Rc`, the client workload is borrowed from it.
async fn local(ctx: &WorkerCtx, pod: Option<&PodNet>, query: &[u8], transport: Transport) -> Local {
    let snap = match pod {
        Some(p) => ctx.pod_snapshot(p).await.ok(),
        None => Some(ctx.snapshot()),
    };
    let client: Option<&crate::model::Workload> = snap.as_deref().and_then(|s| match pod {
        Some(p) => p.workload(s).map(|w| &**w),
        None => s.dedicated_workload().map(|w| &**w),
    });
    let search: &[String] = match pod {
        Some(p) => p.dns_search(&ctx.cfg.cluster_domain),
        None => &ctx.dns.search,
    };
    let asker = client.map(|c| Asker {
        namespace: &c.namespace,
        network: &c.network,
        cluster_domain: &ctx.cfg.cluster_domain,
        search,
        preferred_namespace: ctx.cfg.preferred_service_namespace.as_deref(),
        ipv6_enabled: ctx.cfg.ipv6_enabled,
    });
    let empty;
    let index: &crate::snapshot::ConfigIndex = match snap.as_deref() {
        Some(s) => s,
        None => {
            empty = crate::snapshot::ConfigIndex::build(
                0,
                crate::snapshot::SourceInfo { kind: "none", location: String::new() },
                crate::snapshot::LocalScope::Node(None),
                Default::default(),
            );
            &empty
        }
    };
    let (service, revision) = client.map_or(("", ""), |c| (c.canonical_name.as_str(), c.canonical_revision.as_str()));
    match message::handle(index, asker.as_ref(), query, transport) {
        Outcome::Drop => Local::Done(None),
        Outcome::Reply { bytes, query_type, result } => {
            let key =
                DnsQueryKey { query_type: type_number(query_type), protocol: transport.label(), service, revision };
            ctx.metrics.dns(&key, None);
            let src = client.map(|c| c.name.as_str()).unwrap_or("unknown");
            tracing::event!(
                target: "dns",
                tracing::Level::DEBUG,
                src.workload = src,
                query = %message::type_label(query_type),
                result,
                "dns request"
            );
            Local::Done(Some(bytes))
        }
        Outcome::Forward(request) => {
            let key = ForwardKey {
                query_type: type_number(request.queries.first().map(|q| q.query_type())),
                protocol: transport.label(),
                service: service.to_string(),
                revision: revision.to_string(),
            };
            Local::Forward(request, key)
        }
    }
}

/// Forwards `request` upstream (bounded per worker) and builds the client's reply; counts it.
async fn forward(
    ctx: &WorkerCtx,
    pod: Option<&PodNet>,
    request: &Message,
    key: ForwardKey,
    transport: Transport,
) -> Vec<u8> {
    let key = key.borrow();
    if ctx.dns_in_flight.get() >= MAX_IN_FLIGHT {
        ctx.metrics.dns(&key, Some((Duration::ZERO, true)));
        return message::servfail(request, transport);
    }
    ctx.dns_in_flight.set(ctx.dns_in_flight.get() + 1);
    let _slot = InFlight(&ctx.dns_in_flight);
    let started = Instant::now();
    let question =
        request.queries.first().map(|q| (q.name().to_ascii().to_ascii_lowercase(), u16::from(q.query_type())));
    if let Some(cached) = question.as_ref().and_then(|q| cache_get(ctx, q)) {
        ctx.metrics.dns(&key, Some((started.elapsed(), false)));
        return message::from_upstream_message(request, cached, transport);
    }
    let netns = ctx.netns_of(pod);
    let answer = upstream(ctx, netns, request).await;
    let parsed = answer
        .as_deref()
        .and_then(|a| Message::from_vec(a).ok())
        .filter(|m| m.metadata.message_type == MessageType::Response);
    // Istio counts an upstream NXDOMAIN or empty answer as a failure too.
    let failed = parsed.as_ref().is_none_or(|m| m.answers.is_empty());
    if let (Some(q), Some(m)) = (question, &parsed) {
        cache_put(ctx, q, m);
    }
    let reply = parsed.map(|m| message::from_upstream_message(request, m, transport));
    ctx.metrics.dns(&key, Some((started.elapsed(), failed)));
    let name = request.queries.first().map(|q| q.name().to_ascii()).unwrap_or_default();
    let result = if reply.is_some() { "forwarded" } else { "forwarding failed" };
    tracing::event!(target: "dns", tracing::Level::DEBUG, domain = %name, result, "dns request");
    reply.unwrap_or_else(|| message::servfail(request, transport))
}

/// Forwarded answers a worker keeps (per name and type), and for how long at most.
pub const CACHE_ENTRIES: usize = 4096;
const CACHE_MAX_TTL: u32 = 300;

/// A cached answer, its TTLs counted down by the time it has been kept.
fn cache_get(ctx: &WorkerCtx, question: &(String, u16)) -> Option<Message> {
    let mut cache = ctx.dns_cache.borrow_mut();
    let (stored, at, expires) = cache.get(question)?;
    let now = Instant::now();
    if now >= *expires {
        cache.remove(question);
        return None;
    }
    let age = u32::try_from(now.duration_since(*at).as_secs()).unwrap_or(u32::MAX);
    let mut m = stored.clone();
    for r in m.answers.iter_mut().chain(m.authorities.iter_mut()).chain(m.additionals.iter_mut()) {
        r.ttl = r.ttl.saturating_sub(age);
    }
    Some(m)
}

/// Keeps a positive answer for its smallest TTL (at most 5 minutes); the cache is bounded.
fn cache_put(ctx: &WorkerCtx, question: (String, u16), answer: &Message) {
    if answer.metadata.response_code != hickory_proto::op::ResponseCode::NoError || answer.answers.is_empty() {
        return;
    }
    let ttl = answer.answers.iter().map(|r| r.ttl).min().unwrap_or(0).min(CACHE_MAX_TTL);
    if ttl == 0 {
        return;
    }
    let mut cache = ctx.dns_cache.borrow_mut();
    let now = Instant::now();
    if cache.len() >= CACHE_ENTRIES {
        cache.retain(|_, (_, _, expires)| *expires > now);
        if cache.len() >= CACHE_ENTRIES {
            cache.clear();
        }
    }
    cache.insert(question, (answer.clone(), now, now + Duration::from_secs(u64::from(ttl))));
}

struct InFlight<'a>(&'a Cell<usize>);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

/// One question to the upstream resolvers: each server in turn, for `attempts` rounds, each
/// try within the timeout; a truncated UDP answer is asked again over TCP. The raw answer.
async fn upstream(ctx: &WorkerCtx, netns: Option<InNetns<'_>>, request: &Message) -> Option<Vec<u8>> {
    let query = request.queries.first()?.clone();
    let r = &ctx.dns;
    for _ in 0..r.attempts {
        for server in &r.servers {
            let id = fastrand::u16(..);
            let mut m = Message::new(id, MessageType::Query, OpCode::Query);
            m.metadata.recursion_desired = true;
            m.add_query(query.clone());
            let bytes = m.to_vec().ok()?;
            match monoio::time::timeout(r.timeout, udp_exchange(netns, ctx.cfg.packet_mark, *server, bytes.clone()))
                .await
            {
                Ok(Ok(answer)) if matches(&answer, id, &query) => {
                    if answer.get(2).is_some_and(|flags| flags & 0x02 != 0) {
                        // Truncated: the whole answer over TCP.
                        if let Ok(Ok(whole)) =
                            monoio::time::timeout(r.timeout, tcp_exchange(netns, ctx.cfg.packet_mark, *server, bytes))
                                .await
                        {
                            if matches(&whole, id, &query) {
                                return Some(whole);
                            }
                        }
                    }
                    return Some(answer);
                }
                Ok(Ok(_)) => tracing::debug!(%server, "DNS: upstream answer for another question; ignored"),
                Ok(Err(e)) => tracing::debug!(%server, error = %e, "DNS: upstream failed"),
                Err(_) => tracing::debug!(%server, "DNS: upstream timed out"),
            }
        }
    }
    None
}

/// The answer is to our question: same id, a response, the same single question.
fn matches(answer: &[u8], id: u16, query: &Query) -> bool {
    Message::from_vec(answer).is_ok_and(|m| {
        m.metadata.id == id && m.metadata.message_type == MessageType::Response && m.queries.first() == Some(query)
    })
}

fn upstream_socket(
    netns: Option<InNetns<'_>>,
    mark: Option<u32>,
    server: SocketAddr,
    kind: socket2::Type,
) -> io::Result<socket2::Socket> {
    // Non-blocking from the start (`SOCK_NONBLOCK`): two `fcntl`s fewer per forwarded query.
    let make = || socket2::Socket::new(socket2::Domain::for_address(server), kind.nonblocking(), None);
    let s = match netns {
        Some(ns) => crate::sys::in_netns(ns.pod, ns.home, make)??,
        None => make()?,
    };
    if let Some(m) = mark {
        s.set_mark(m)?;
    }
    Ok(s)
}

async fn udp_exchange(
    netns: Option<InNetns<'_>>,
    mark: Option<u32>,
    server: SocketAddr,
    query: Vec<u8>,
) -> io::Result<Vec<u8>> {
    let s = upstream_socket(netns, mark, server, socket2::Type::DGRAM)?;
    let any: SocketAddr = match server.ip() {
        IpAddr::V4(_) => SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0),
        IpAddr::V6(_) => SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0),
    };
    s.bind(&any.into())?;
    s.connect(&server.into())?;
    let sock = UdpSocket::from_std(s.into())?;
    let (res, _) = sock.send(query).await;
    res?;
    // The upstream query has no EDNS: its answer fits 512 bytes or comes truncated.
    let (res, mut buf) = sock.recv(vec![0u8; 4096]).await;
    let n = res?;
    buf.truncate(n);
    Ok(buf)
}

async fn tcp_exchange(
    netns: Option<InNetns<'_>>,
    mark: Option<u32>,
    server: SocketAddr,
    query: Vec<u8>,
) -> io::Result<Vec<u8>> {
    let opts =
        crate::net::DialOpts { netns, mark, spoof_source: None, timeout: Duration::from_secs(5), user_timeout: None };
    let mut stream = crate::net::dial(server, opts).await.map_err(io::Error::other)?;
    let mut framed = (query.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&query);
    let (res, _) = stream.write_all(framed).await;
    res?;
    let (res, len) = stream.read_exact(vec![0u8; 2]).await;
    res?;
    let (res, body) = stream.read_exact(vec![0u8; usize::from(u16::from_be_bytes([len[0], len[1]]))]).await;
    res?;
    Ok(body)
}

/// A name as SOCKS5 clients give it: a mesh name first (as the DNS proxy answers it for
/// `client`), then the upstream resolvers. The first address of the wanted family, else any.
pub async fn resolve_name(
    ctx: &WorkerCtx,
    pod: Option<&PodNet>,
    index: &crate::snapshot::ConfigIndex,
    client: Option<&crate::model::Workload>,
    name: &str,
    v4: bool,
) -> Option<IpAddr> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let families = if v4 { [names::Family::V4, names::Family::V6] } else { [names::Family::V6, names::Family::V4] };
    if let Some(c) = client {
        let search = names::pod_search(&c.namespace, &ctx.cfg.cluster_domain);
        let asker = Asker {
            namespace: &c.namespace,
            network: &c.network,
            cluster_domain: &ctx.cfg.cluster_domain,
            search: &search,
            preferred_namespace: ctx.cfg.preferred_service_namespace.as_deref(),
            ipv6_enabled: ctx.cfg.ipv6_enabled,
        };
        for f in families {
            if let names::Lookup::Mesh { addrs, .. } = names::lookup(index, &name, f, &asker) {
                if let Some(ip) = addrs.first() {
                    return Some(*ip);
                }
            }
        }
    }
    let fqdn = hickory_proto::rr::Name::from_ascii(format!("{name}.")).ok()?;
    for t in if v4 { [RecordType::A, RecordType::AAAA] } else { [RecordType::AAAA, RecordType::A] } {
        let mut m = Message::new(0, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(fqdn.clone(), t));
        let answer = upstream(ctx, ctx.netns_of(pod), &m).await?;
        let parsed = Message::from_vec(&answer).ok()?;
        let ip = parsed.answers.iter().find_map(|r| match &r.data {
            hickory_proto::rr::RData::A(a) => Some(IpAddr::V4(a.0)),
            hickory_proto::rr::RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        });
        if ip.is_some() {
            return ip;
        }
    }
    None
}
