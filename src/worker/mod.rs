//! The per-core data plane: one OS thread per worker, pinned to a core, running its own monoio
//! runtime (io_uring, or epoll where io_uring is unavailable).
//!
//! A worker owns everything it touches: its `SO_REUSEPORT` listeners, its connection table, its
//! current snapshot (an `Rc` around the control thread's `Arc`, so taking it per connection is
//! not atomic). Nothing here is `Send` and nothing takes a lock; the only cross-thread input is
//! the worker's message channel from the control thread.

mod authz;
pub mod channel;
pub mod conns;
pub mod error;
mod hbone_client;
pub mod hbone_pool;
mod hbone_relay;
mod inbound_hbone;
mod inbound_plain;
mod outbound;
pub mod socks5;

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use monoio::net::{TcpListener, TcpStream};

use crate::config::{Config, IoDriver};
use crate::model::Identity;
use crate::net::relay::{Halves, RelayEnd, RelayStats, relay};
use crate::net::{ListenOpts, bind_listener, canonical, sockopt};
use crate::snapshot::Snapshot;
use crate::telemetry::access::ConnLog;
use crate::telemetry::metrics::{LabelKey, Labels, OpenConn, SetupPath, Shard};
use crate::tls::WorkloadCert;
use channel::{WorkerMsg, WorkerRx};
use conns::{ConnGuard, ConnTable, Direction, Signal};
use error::ProxyError;

/// Addresses a worker binds. The first worker resolves port 0; the others bind what it got.
#[derive(Debug, Clone, Copy)]
pub struct ListenAddrs {
    pub outbound: SocketAddr,
    pub inbound_plain: SocketAddr,
    pub inbound: SocketAddr,
    pub socks5: Option<SocketAddr>,
}

/// What a worker reports once it listens.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub addrs: ListenAddrs,
    pub driver: &'static str,
}

/// Everything a worker thread starts from; all of it `Send`.
pub struct WorkerSpec {
    pub id: usize,
    pub cfg: Arc<Config>,
    pub addrs: ListenAddrs,
    pub initial: Arc<Snapshot>,
    pub rx: WorkerRx,
    pub core: Option<core_affinity::CoreId>,
    pub spoof_source: bool,
    /// The generation this worker applied last, for readiness and `config_dump`.
    pub generation: Arc<AtomicU64>,
    /// Asks the control thread for a certificate nobody fetched ahead of time.
    pub cert_requests: tokio::sync::mpsc::UnboundedSender<Identity>,
}

/// The worker's handle on a snapshot. The extra `Rc` is the point: every worker shares the
/// control thread's `Arc`, so cloning it per connection would bounce one atomic counter between
/// cores; cloning the worker-local `Rc` is a plain increment.
#[allow(clippy::redundant_allocation)]
pub type LocalSnapshot = Rc<Arc<Snapshot>>;

/// State shared by the tasks of one worker.
pub struct WorkerCtx {
    pub id: usize,
    pub cfg: Arc<Config>,
    snapshot: RefCell<LocalSnapshot>,
    pub conns: Rc<ConnTable>,
    pub draining: Signal,
    /// Accept loops still running; drain waits for them to close their listeners.
    accepting: Cell<usize>,
    /// The proxy's own listening ports (configured and well-known): never dialed on loopback.
    pub own_ports: Vec<u16>,
    pub spoof_source: bool,
    /// This worker's bound listener addresses.
    pub addrs: ListenAddrs,
    /// Bulk relay directions switch to splice(2) (io_uring workers, unless disabled).
    pub splice: bool,
    /// Outbound HBONE connections shared by this worker's streams.
    pub pool: hbone_pool::HbonePool,
    cert_requests: tokio::sync::mpsc::UnboundedSender<Identity>,
    /// This worker's metrics shard.
    pub metrics: Rc<Shard>,
    /// Tasks waiting for the next snapshot (an on-demand certificate arriving).
    snapshot_waiters: RefCell<Vec<Waker>>,
}

impl WorkerCtx {
    /// Replaces the snapshot and wakes whoever waits for one.
    fn apply(&self, snap: Arc<Snapshot>) {
        *self.snapshot.borrow_mut() = Rc::new(snap);
        for w in self.snapshot_waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }

    /// The certificate for `id`: from the current snapshot, or asked of the control thread and
    /// waited for (a source that is not a prefetched HBONE workload), at most `timeout`.
    pub async fn certificate(&self, id: &Identity, timeout: Duration) -> Result<Arc<WorkloadCert>, ProxyError> {
        if let Some(c) = self.snapshot.borrow().certs.get(id) {
            return Ok(c.clone());
        }
        let _ = self.cert_requests.send(id.clone());
        tracing::debug!(worker = self.id, identity = %id, "asking for a certificate on demand");
        let wait = async {
            loop {
                let seen = self.snapshot.borrow().generation;
                poll_fn(|cx| {
                    if self.snapshot.borrow().generation != seen {
                        return Poll::Ready(());
                    }
                    self.snapshot_waiters.borrow_mut().push(cx.waker().clone());
                    Poll::Pending
                })
                .await;
                if let Some(c) = self.snapshot.borrow().certs.get(id) {
                    return c.clone();
                }
            }
        };
        monoio::time::timeout(timeout, wait).await.map_err(|_| ProxyError::NoCertificate(id.to_string()))
    }

    /// The current snapshot; a connection takes it once and keeps it.
    pub fn snapshot(&self) -> LocalSnapshot {
        self.snapshot.borrow().clone()
    }

    /// The port peers accept HBONE on; 0 in the config means this proxy's own inbound port
    /// (in-process tests where one proxy is both ends).
    pub fn hbone_port(&self) -> u16 {
        if self.cfg.hbone_port == 0 { self.addrs.inbound.port() } else { self.cfg.hbone_port }
    }

    pub fn is_own_port(&self, dst: SocketAddr) -> bool {
        dst.ip().is_loopback() && self.own_ports.contains(&dst.port())
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Outbound,
    InboundPlain,
    InboundHbone,
    Socks5,
}

/// Starts a worker thread. The receiver yields once: the bound addresses, or why binding failed.
pub fn spawn(
    spec: WorkerSpec,
) -> io::Result<(std::thread::JoinHandle<()>, std::sync::mpsc::Receiver<io::Result<Bound>>)> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = std::thread::Builder::new().name(format!("worker-{}", spec.id)).spawn(move || {
        if let Some(core) = spec.core {
            if !core_affinity::set_for_current(core) {
                tracing::warn!(worker = spec.id, core = core.id, "could not pin worker to its core");
            }
        }
        let driver = match spec.cfg.io_driver {
            IoDriver::Auto if monoio::utils::detect_uring() => IoDriver::Uring,
            IoDriver::Auto => IoDriver::Epoll,
            forced => forced,
        };
        let res = match driver {
            IoDriver::Uring => uring_runtime().map(|mut rt| rt.block_on(run(spec, "io_uring", ready_tx.clone()))),
            _ => monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                .enable_timer()
                .build()
                .map(|mut rt| rt.block_on(run(spec, "epoll", ready_tx.clone()))),
        };
        if let Err(e) = res {
            let _ = ready_tx.send(Err(io::Error::new(e.kind(), format!("starting the {driver:?} runtime: {e}"))));
        }
    })?;
    Ok((handle, ready_rx))
}

/// An io_uring runtime for this thread. The ring is only ever used by the thread that made it,
/// which lets the kernel skip inter-processor interrupts for completions (`COOP_TASKRUN`) and
/// per-submission locking (`SINGLE_ISSUER`); kernels without those flags get a plain ring.
fn uring_runtime() -> io::Result<monoio::Runtime<monoio::time::TimeDriver<monoio::IoUringDriver>>> {
    let build = |tuned: bool| {
        let mut urb = io_uring::IoUring::builder();
        if tuned {
            urb.setup_coop_taskrun().setup_single_issuer();
        }
        monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .with_entries(1024)
            .uring_builder(urb)
            .enable_timer()
            .build()
    };
    build(true).or_else(|e| {
        tracing::debug!(error = %e, "io_uring without COOP_TASKRUN/SINGLE_ISSUER");
        build(false)
    })
}

fn bind_all(addrs: &ListenAddrs) -> io::Result<Vec<(Kind, TcpListener)>> {
    let captured = ListenOpts { transparent: true, backlog: 1024 };
    let bind = |kind: Kind, addr: SocketAddr, opts: ListenOpts| {
        bind_listener(addr, opts)
            .map(|l| (kind, l))
            .map_err(|e| io::Error::new(e.kind(), format!("binding {kind:?} listener on {addr}: {e}")))
    };
    let mut out = vec![
        bind(Kind::Outbound, addrs.outbound, captured)?,
        bind(Kind::InboundPlain, addrs.inbound_plain, captured)?,
        bind(Kind::InboundHbone, addrs.inbound, captured)?,
    ];
    if let Some(socks) = addrs.socks5 {
        out.push(bind(Kind::Socks5, socks, ListenOpts { transparent: false, backlog: 1024 })?);
    }
    Ok(out)
}

async fn run(spec: WorkerSpec, driver: &'static str, ready: std::sync::mpsc::Sender<io::Result<Bound>>) {
    let listeners = match bind_all(&spec.addrs) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let local = |k: &Kind| listeners.iter().find(|(kind, _)| std::mem::discriminant(kind) == std::mem::discriminant(k));
    let addr_of = |k: Kind| local(&k).and_then(|(_, l)| l.local_addr().ok());
    let addrs = ListenAddrs {
        outbound: addr_of(Kind::Outbound).unwrap_or(spec.addrs.outbound),
        inbound_plain: addr_of(Kind::InboundPlain).unwrap_or(spec.addrs.inbound_plain),
        inbound: addr_of(Kind::InboundHbone).unwrap_or(spec.addrs.inbound),
        socks5: addr_of(Kind::Socks5),
    };
    let mut own_ports: Vec<u16> = crate::net::PROXY_PORTS.to_vec();
    own_ports.extend([addrs.outbound.port(), addrs.inbound_plain.port(), addrs.inbound.port()]);
    own_ports.extend(addrs.socks5.map(|a| a.port()));
    tracing::info!(worker = spec.id, driver, outbound = %addrs.outbound, inbound_plain = %addrs.inbound_plain, inbound = %addrs.inbound,
        socks5 = ?addrs.socks5, "worker listening");
    // Acknowledge the initial generation before reporting start-up: once `start` returns,
    // readiness must not see a worker without config.
    spec.generation.store(spec.initial.generation, Ordering::Release);
    let _ = ready.send(Ok(Bound { addrs, driver }));

    let ctx = Rc::new(WorkerCtx {
        id: spec.id,
        cfg: spec.cfg.clone(),
        snapshot: RefCell::new(Rc::new(spec.initial)),
        conns: Rc::new(ConnTable::default()),
        draining: Signal::default(),
        accepting: Cell::new(0),
        own_ports,
        spoof_source: spec.spoof_source,
        addrs,
        // Raw splice calls rely on io_uring readiness polls; the epoll driver keeps copying.
        splice: spec.cfg.splice && driver == "io_uring",
        pool: hbone_pool::HbonePool::new(spec.cfg.pool_max_streams, spec.cfg.pool_idle_timeout),
        cert_requests: spec.cert_requests.clone(),
        metrics: Rc::new(Shard::default()),
        snapshot_waiters: RefCell::new(Vec::new()),
    });
    for (kind, listener) in listeners {
        ctx.accepting.set(ctx.accepting.get() + 1);
        monoio::spawn(accept_loop(ctx.clone(), kind, listener));
    }
    monoio::spawn(sweep_pool(ctx.clone()));
    // Control messages are handled by their own task, so scrapes are answered during drain too.
    let drain_at: Rc<Cell<Option<Instant>>> = Rc::default();
    let drain_now = Signal::default();
    monoio::spawn(control_messages(ctx.clone(), spec.rx, spec.generation, drain_at.clone(), drain_now.clone()));
    drain_now.wait().await;
    let deadline = drain_at.get().unwrap_or_else(|| Instant::now() + ctx.cfg.termination_deadline);
    drain(&ctx, deadline).await;
}

/// Applies what the control thread sends: snapshots (re-checking authorization when the config
/// changed), scrapes, and the drain order (passed on through `drain_now`).
async fn control_messages(
    ctx: Rc<WorkerCtx>,
    rx: WorkerRx,
    generation: Arc<AtomicU64>,
    drain_at: Rc<Cell<Option<Instant>>>,
    drain_now: Signal,
) {
    loop {
        match rx.recv().await {
            Some(WorkerMsg::Scrape(reply)) => {
                let _ = reply.send(ctx.metrics.dump());
            }
            Some(WorkerMsg::Snapshot(s)) => {
                tracing::debug!(worker = ctx.id, generation = s.generation, "applied new config snapshot");
                generation.store(s.generation, Ordering::Release);
                let policies_may_differ = s.config_generation != ctx.snapshot.borrow().config_generation;
                ctx.apply(s);
                if policies_may_differ {
                    let snap = ctx.snapshot();
                    let closed = ctx.conns.reauthorize(&snap);
                    if closed > 0 {
                        tracing::info!(worker = ctx.id, closed, "closed connections the new config denies");
                    }
                }
            }
            Some(WorkerMsg::Drain { deadline }) => {
                drain_at.set(Some(deadline));
                drain_now.fire();
            }
            None => {
                drain_now.fire();
                return;
            }
        }
    }
}

/// Releases idle and dead pooled HBONE connections now and then, until drain.
async fn sweep_pool(ctx: Rc<WorkerCtx>) {
    let every = (ctx.cfg.pool_idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
    loop {
        monoio::select! {
            _ = monoio::time::sleep(every) => ctx.pool.sweep(Instant::now()),
            _ = ctx.draining.wait() => return,
        }
    }
}

async fn accept_loop(ctx: Rc<WorkerCtx>, kind: Kind, listener: TcpListener) {
    loop {
        let accepted = monoio::select! {
            r = listener.accept() => r,
            _ = ctx.draining.wait() => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                crate::net::prepare_accepted(&stream);
                let peer = canonical(peer);
                match kind {
                    // An HBONE connection carries many streams for its whole life: one task.
                    Kind::InboundHbone => monoio::spawn(inbound_hbone::serve(ctx.clone(), stream, peer)),
                    Kind::Outbound => monoio::spawn(connection(ctx.clone(), Setup::Outbound, stream, peer)),
                    Kind::InboundPlain => monoio::spawn(connection(ctx.clone(), Setup::InboundPlain, stream, peer)),
                    Kind::Socks5 => monoio::spawn(connection(ctx.clone(), Setup::Socks5, stream, peer)),
                };
            }
            Err(e) => {
                tracing::warn!(worker = ctx.id, listener = ?kind, error = %e, "accept failed");
                // Out of descriptors or memory: back off instead of spinning.
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    ctx.accepting.set(ctx.accepting.get() - 1);
    tracing::debug!(worker = ctx.id, listener = ?kind, "listener closed for drain");
}

/// A connection whose setup is done: both ends connected, ready to relay.
/// Where a connection's bytes go once set up.
pub enum Upstream {
    Tcp(TcpStream),
    Hbone(hbone_client::HboneStream),
}

pub struct Established {
    pub downstream: TcpStream,
    pub upstream: Upstream,
    /// Bytes already sent upstream during setup (SOCKS5 clients may send data early).
    pub early_bytes: u64,
}

/// The longest a client may take over its part of the setup (the SOCKS5 handshake).
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Sets a connection up, then hands it to a task of its own for the relay. The setup future is
/// as large as its largest state (handshake buffers, routing); ending it frees that memory, so
/// a long-lived idle connection only keeps the small relay task.
/// The connections whose setup ends in a plain TCP relay.
#[derive(Debug, Clone, Copy)]
enum Setup {
    Outbound,
    InboundPlain,
    Socks5,
}

async fn connection(ctx: Rc<WorkerCtx>, kind: Setup, stream: TcpStream, peer: SocketAddr) {
    let (direction, name) = match kind {
        Setup::InboundPlain => (Direction::Inbound, "inbound"),
        Setup::Outbound | Setup::Socks5 => (Direction::Outbound, "outbound"),
    };
    let guard = ctx.conns.register(direction, peer);
    let mut log = ConnLog::new(name, peer);
    let setup = async {
        match kind {
            Setup::Outbound => outbound::captured(&ctx, &guard, stream, peer, &mut log).await,
            Setup::Socks5 => {
                // The client's handshake plus our dial (which has its own timeout too).
                let limit = ctx.cfg.connect_timeout + SETUP_TIMEOUT;
                monoio::time::timeout(limit, socks5::handle(&ctx, &guard, stream, peer, &mut log))
                    .await
                    .unwrap_or(Err(ProxyError::SetupTimeout(limit)))
            }
            Setup::InboundPlain => inbound_plain::handle(&ctx, &guard, stream, peer, &mut log).await,
        }
    };
    let close = guard.close_signal().clone();
    let res = monoio::select! {
        r = setup => r,
        _ = close.wait() => Err(ProxyError::Drained),
    };
    match res {
        Ok(est) => {
            let early = est.early_bytes;
            let splice = ctx.splice;
            let stats = Rc::new(RelayStats::default());
            let counted = count_open(&ctx, &log, &stats);
            match est.upstream {
                Upstream::Tcp(up) => {
                    let (down, up) = (est.downstream.into(), up.into());
                    monoio::spawn(relay_task(guard, Box::new(log), stats, counted, down, up, early, splice));
                }
                Upstream::Hbone(h) => {
                    monoio::spawn(hbone_relay_task(guard, Box::new(log), stats, counted, est.downstream, h, early));
                }
            }
        }
        Err(e) => {
            count_failed(&ctx, &log, &e);
            log.finish(&RelayStats::default(), Some(&e));
        }
    }
}

/// The reporters that see a connection: the source side for outbound, the destination side for
/// inbound, both for the node-local fast path (one proxy is both ends).
fn reporters(log: &ConnLog) -> &'static [&'static str] {
    match log.path {
        Some(SetupPath::FastPath) => &["source", "destination"],
        _ if log.direction == "inbound" => &["destination"],
        _ => &["source"],
    }
}

fn mutual_tls(log: &ConnLog) -> bool {
    matches!(log.path, Some(SetupPath::Hbone | SetupPath::FastPath | SetupPath::InboundHbone))
}

/// Counts an established connection as opened (its bytes followed live through `stats`) and
/// records how long its setup took. Closed is counted when the returned guards drop.
pub(crate) fn count_open(ctx: &WorkerCtx, log: &ConnLog, stats: &Rc<RelayStats>) -> [Option<OpenConn>; 2] {
    if let Some(path) = log.path {
        ctx.metrics.record_setup(path, log.start.elapsed());
    }
    let mut out = [None, None];
    for (slot, reporter) in out.iter_mut().zip(reporters(log)) {
        *slot = Some(ctx.metrics.open(series(ctx, log, reporter, "-"), stats.clone()));
    }
    out
}

/// The metric series of a connection as `reporter` sees it, from the worker's cache when the
/// labels come from config alone (workloads and service), built afresh when a peer's identity
/// or baggage had a say.
fn series(ctx: &WorkerCtx, log: &ConnLog, reporter: &'static str, flags: &'static str) -> Rc<Labels> {
    let make = || log.labels(reporter, flags, mutual_tls(log), &ctx.cfg.cluster_id);
    let from_config = log.src_baggage.is_none() && (log.src_identity.is_none() || log.src_workload.is_some());
    if !from_config {
        return ctx.metrics.intern(make());
    }
    let key = LabelKey {
        reporter,
        src: log.src_workload.clone(),
        dst: log.dst_workload.clone(),
        service: log.dst_service.clone(),
        response_flags: flags,
        mutual_tls: mutual_tls(log),
    };
    ctx.metrics.labels(key, make)
}

/// Counts a connection that failed during setup, once the proxy knew whose it was.
pub(crate) fn count_failed(ctx: &WorkerCtx, log: &ConnLog, e: &ProxyError) {
    if log.src_workload.is_none() && log.src_identity.is_none() && log.dst_workload.is_none() {
        return;
    }
    for reporter in reporters(log) {
        ctx.metrics.failed(series(ctx, log, reporter, e.response_flags()));
    }
}

#[allow(clippy::too_many_arguments)]
async fn relay_task(
    guard: ConnGuard,
    // Boxed: a task's arguments can take room twice in its future, and this one is held for
    // the connection's whole life.
    log: Box<ConnLog>,
    stats: Rc<RelayStats>,
    counted: [Option<OpenConn>; 2],
    down: Halves,
    up: Halves,
    early_bytes: u64,
    splice: bool,
) {
    stats.sent.set(early_bytes);
    let res = match relay(down, up, &stats, guard.close_signal().wait(), splice).await {
        Ok(RelayEnd::Done) => Ok(()),
        Ok(RelayEnd::Closed) => Err(ProxyError::Drained),
        Err(e) => Err(ProxyError::Io(e)),
    };
    log.finish(&stats, res.as_ref().err().map(|e| e as &dyn std::fmt::Display));
    drop(counted);
    drop(guard);
}

async fn hbone_relay_task(
    guard: ConnGuard,
    log: Box<ConnLog>,
    stats: Rc<RelayStats>,
    counted: [Option<OpenConn>; 2],
    down: TcpStream,
    up: hbone_client::HboneStream,
    early_bytes: u64,
) {
    stats.sent.set(early_bytes);
    // Downstream is the TCP side: what it sends goes into the HTTP/2 stream.
    let res =
        match hbone_relay::relay(down, up.send, up.recv, &stats.received, &stats.sent, guard.close_signal().wait())
            .await
        {
            Ok(RelayEnd::Done) => Ok(()),
            Ok(RelayEnd::Closed) => Err(ProxyError::Drained),
            Err(e) => Err(ProxyError::Io(e)),
        };
    log.finish(&stats, res.as_ref().err().map(|e| e as &dyn std::fmt::Display));
    drop(counted);
    drop(guard);
}

/// Stops accepting, waits for open connections until the deadline, then closes the rest.
async fn drain(ctx: &WorkerCtx, deadline: Instant) {
    ctx.draining.fire();
    // The accept loops must run to drop their listeners, and under io_uring a dropped socket is
    // a queued close that only reaches the kernel when the runtime next parks: without this a
    // worker with no connections would exit with its listeners still open in the process, and
    // the kernel would keep queueing new connections on them.
    let stop_accepting = Instant::now() + Duration::from_secs(1);
    while ctx.accepting.get() > 0 && Instant::now() < stop_accepting {
        monoio::time::sleep(Duration::from_millis(1)).await;
    }
    monoio::time::sleep(Duration::from_millis(1)).await;
    tracing::info!(worker = ctx.id, open = ctx.conns.len(), "draining");
    while !ctx.conns.is_empty() {
        let now = Instant::now();
        if now >= deadline {
            tracing::warn!(
                worker = ctx.id,
                open = ctx.conns.len(),
                connections = %ctx.conns.describe(8),
                "drain deadline reached; closing open connections"
            );
            ctx.conns.close_all();
            // Let the closed connections' tasks run to write their access logs.
            let grace = Instant::now() + Duration::from_secs(1);
            while !ctx.conns.is_empty() && Instant::now() < grace {
                monoio::time::sleep(Duration::from_millis(5)).await;
            }
            break;
        }
        monoio::time::sleep((deadline - now).min(Duration::from_millis(20))).await;
    }
    // Flush the closes of the last connections' sockets before the runtime goes away.
    monoio::time::sleep(Duration::from_millis(1)).await;
    tracing::info!(worker = ctx.id, "drained");
}

/// The original destination of a connection accepted on the listener bound to `listener`.
fn original_dst(stream: &TcpStream, peer: SocketAddr, listener: SocketAddr) -> Result<SocketAddr, ProxyError> {
    let redirected = sockopt::original_dst(stream, peer.is_ipv4()).map_err(ProxyError::OriginalDst)?;
    let local = stream.local_addr().map_err(ProxyError::OriginalDst)?;
    choose_original_dst(redirected, local, listener.port())
}

/// `SO_ORIGINAL_DST` when netfilter REDIRECTed the connection; otherwise the socket's local
/// address, which under TPROXY is the original destination. A connection made straight to the
/// listener (local port = the listener's port) was not captured at all and has nowhere to go.
fn choose_original_dst(
    redirected: Option<SocketAddr>,
    local: SocketAddr,
    listener_port: u16,
) -> Result<SocketAddr, ProxyError> {
    match redirected {
        Some(dst) => Ok(canonical(dst)),
        None if local.port() == listener_port => Err(ProxyError::NotRedirected(canonical(local))),
        None => Ok(canonical(local)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_destination_redirect_tproxy_and_direct() {
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        // REDIRECT: the conntrack answer wins over the local address (our listener).
        let redirected = choose_original_dst(Some(sa("[::ffff:10.0.0.5]:80")), sa("127.0.0.1:15001"), 15001);
        assert_eq!(redirected.unwrap(), sa("10.0.0.5:80"));
        // TPROXY: no conntrack entry, the local address is the original destination.
        assert_eq!(choose_original_dst(None, sa("10.0.0.5:80"), 15001).unwrap(), sa("10.0.0.5:80"));
        // Straight to the listener: not captured.
        assert!(matches!(choose_original_dst(None, sa("10.0.0.1:15001"), 15001), Err(ProxyError::NotRedirected(_))));
    }
}
