//! Starting a worker: its thread, pinned to a core; its runtime (io_uring, or epoll); its
//! listeners, bound before it reports start-up; its control-message task; its drain.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use monoio::net::TcpListener;

use super::accept::{Listener, accept_loop};
use super::conns::{CloseReason, ConnTable, Signal};
use super::{WorkerCtx, own_addrs, pods};
use crate::config::{Config, IoDriver};
use crate::hbone::pool::HbonePool;
use crate::model::Identity;
use crate::net::{AcceptedOpts, ListenAddrs, ListenOpts, bind_listener};
use crate::snapshot::Snapshot;
use crate::snapshot::publish::{WorkerMsg, WorkerRx};
use crate::telemetry::metrics::Shard;

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
    /// The admin, readiness and metrics listeners' addresses (the proxy's own: never a
    /// destination).
    pub control_addrs: Vec<SocketAddr>,
    /// The generation this worker applied last, for readiness and `config_dump`.
    pub generation: Arc<AtomicU64>,
    /// True while the worker thread runs; false once it ended, whether by drain or by a panic.
    pub alive: Arc<AtomicBool>,
    /// Dropped when the worker thread ends, however it ends: the control thread awaits it.
    pub done: tokio::sync::oneshot::Sender<()>,
    /// Asks the control thread for a certificate nobody fetched ahead of time.
    pub cert_requests: tokio::sync::mpsc::UnboundedSender<Identity>,
    /// Where forwarded DNS queries go.
    pub dns: Arc<crate::dns::resolv::Resolvers>,
}

/// Marks the worker as ended when its thread unwinds or returns, so a panicking worker fails
/// readiness instead of going unnoticed.
struct ExitGuard {
    id: usize,
    alive: Arc<AtomicBool>,
    _done: tokio::sync::oneshot::Sender<()>,
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::Release);
        if std::thread::panicking() {
            tracing::error!(worker = self.id, "worker thread panicked; its listeners and connections are gone");
        }
    }
}

/// Starts a worker thread. The receiver yields once: the bound addresses, or why binding failed.
pub fn spawn(
    mut spec: WorkerSpec,
) -> io::Result<(std::thread::JoinHandle<()>, std::sync::mpsc::Receiver<io::Result<Bound>>)> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (done, _) = tokio::sync::oneshot::channel();
    let done = std::mem::replace(&mut spec.done, done);
    spec.alive.store(true, Ordering::Release);
    let guard = ExitGuard { id: spec.id, alive: spec.alive.clone(), _done: done };
    let handle = std::thread::Builder::new().name(format!("worker-{}", spec.id)).spawn(move || {
        let _guard = guard;
        if let Some(core) = spec.core {
            if !core_affinity::set_for_current(core) {
                tracing::warn!(worker = spec.id, core = core.id, "could not pin worker to its core");
                // Not pinned: its listeners must not claim the core's connections either.
                spec.core = None;
            }
        }
        // This thread's own random generator, seeded before the first handshake needs it.
        crate::tls::seed_random();
        let driver = match spec.cfg.io_driver {
            IoDriver::Auto if monoio::utils::detect_uring() => IoDriver::Uring,
            IoDriver::Auto => IoDriver::Epoll,
            forced => forced,
        };
        let res = match driver {
            IoDriver::Uring => uring_runtime().map(|(mut rt, _)| rt.block_on(run(spec, "io_uring", ready_tx.clone()))),
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
/// which lets the kernel skip per-submission locking (`SINGLE_ISSUER`) and hold completions
/// until the worker asks for them (`DEFER_TASKRUN`): a socket that becomes ready queues its
/// completion on the ring instead of interrupting the thread with task work, and the worker
/// reaps them in one batch when it next waits (monoio waits, with `GETEVENTS`, whenever it has
/// no task left to run). Older kernels get `COOP_TASKRUN` (no inter-processor interrupt, work
/// run at the next kernel entry) or, before 5.19, a plain ring.
fn uring_runtime() -> io::Result<(UringRuntime, UringSetup)> {
    let build = |setup: UringSetup| -> io::Result<(UringRuntime, UringSetup)> {
        let mut urb = io_uring::IoUring::builder();
        match setup {
            UringSetup::Deferred => {
                urb.setup_coop_taskrun().setup_single_issuer().setup_defer_taskrun();
            }
            UringSetup::Cooperative => {
                urb.setup_coop_taskrun().setup_single_issuer();
            }
            UringSetup::Plain => {}
        }
        monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .with_entries(1024)
            .uring_builder(urb)
            .enable_timer()
            .build()
            .map(|rt| (rt, setup))
    };
    let made = build(UringSetup::Deferred)
        .or_else(|e| {
            tracing::debug!(error = %e, "io_uring without DEFER_TASKRUN");
            build(UringSetup::Cooperative)
        })
        .or_else(|e| {
            tracing::debug!(error = %e, "io_uring without COOP_TASKRUN/SINGLE_ISSUER");
            build(UringSetup::Plain)
        });
    if let Ok((_, setup)) = &made {
        tracing::debug!(?setup, "io_uring ring set up");
    }
    made
}

type UringRuntime = monoio::Runtime<monoio::time::TimeDriver<monoio::IoUringDriver>>;

/// How a worker's ring is set up, from the most to the least the kernel must support.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum UringSetup {
    Deferred,
    Cooperative,
    Plain,
}

/// Binds this worker's listeners: captured ones may be TPROXY targets; SOCKS5 only when on. In
/// in-pod mode every pod gets its own, inside its namespace; here there is only the HBONE
/// listener for the proxy's own workload, when it knows who it is (`SERVICE_ACCOUNT`,
/// `POD_NAME`, `POD_NAMESPACE`).
fn bind_all(
    addrs: &ListenAddrs,
    inpod: bool,
    serves_itself: bool,
    accepted: AcceptedOpts,
) -> io::Result<Vec<(Listener, TcpListener)>> {
    let plain = ListenOpts { transparent: false, backlog: 1024, accepted: Some(accepted), mark: None };
    if inpod {
        if !serves_itself {
            return Ok(Vec::new());
        }
        let addr = addrs.inbound;
        let l = bind_listener(addr, steered(plain).1)
            .map_err(|e| io::Error::new(e.kind(), format!("binding the proxy's own HBONE listener on {addr}: {e}")))?;
        return Ok(vec![(Listener::InboundHbone, l)]);
    }
    let captured = ListenOpts { transparent: true, ..plain };
    // Only the listeners local pods connect to are steered by CPU (see `AcceptedOpts`).
    let (local, from_network) = steered(captured);
    let bind = |kind: Listener, addr: SocketAddr, opts: ListenOpts| {
        bind_listener(addr, opts)
            .map(|l| (kind, l))
            .map_err(|e| io::Error::new(e.kind(), format!("binding {kind:?} listener on {addr}: {e}")))
    };
    let mut out = vec![
        bind(Listener::Outbound, addrs.outbound, local)?,
        bind(Listener::InboundPlain, addrs.inbound_plain, from_network)?,
        bind(Listener::InboundHbone, addrs.inbound, from_network)?,
    ];
    if let Some(socks) = addrs.socks5 {
        out.push(bind(Listener::Socks5, socks, steered(plain).0)?);
    }
    Ok(out)
}

/// `opts` for listeners local pods connect to (steered to the worker on the CPU that processes
/// the pod's packets), and for listeners peers reach over the network (spread by hash: a NIC
/// with fewer receive queues than CPUs would otherwise crowd every connection onto the workers
/// of the few CPUs that take its interrupts).
pub(crate) fn steered(opts: ListenOpts) -> (ListenOpts, ListenOpts) {
    let from_network = opts.accepted.map(|a| AcceptedOpts { incoming_cpu: None, ..a });
    (opts, ListenOpts { accepted: from_network, ..opts })
}

/// The addresses the listeners got (port 0 resolved), falling back to what was asked.
fn bound_addrs(listeners: &[(Listener, TcpListener)], asked: &ListenAddrs) -> ListenAddrs {
    let addr_of = |k: Listener| listeners.iter().find(|(kind, _)| *kind == k).and_then(|(_, l)| l.local_addr().ok());
    ListenAddrs {
        outbound: addr_of(Listener::Outbound).unwrap_or(asked.outbound),
        inbound_plain: addr_of(Listener::InboundPlain).unwrap_or(asked.inbound_plain),
        inbound: addr_of(Listener::InboundHbone).unwrap_or(asked.inbound),
        socks5: addr_of(Listener::Socks5),
        dns_port: asked.dns_port,
    }
}

async fn run(spec: WorkerSpec, driver: &'static str, ready: std::sync::mpsc::Sender<io::Result<Bound>>) {
    let home_netns = if spec.cfg.inpod {
        match crate::sys::NetNs::current_thread() {
            Ok(ns) => Some(ns),
            Err(e) => {
                let _ =
                    ready.send(Err(io::Error::new(e.kind(), format!("opening this thread's network namespace: {e}"))));
                return;
            }
        }
    } else {
        None
    };
    let cfg = &spec.cfg;
    let serves_itself = cfg.service_account.is_some() && cfg.pod_name.is_some() && cfg.pod_namespace.is_some();
    let listeners = match bind_all(
        &spec.addrs,
        spec.cfg.inpod,
        serves_itself,
        AcceptedOpts { user_timeout: spec.cfg.tcp_user_timeout, incoming_cpu: spec.core.map(|c| c.id) },
    ) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let mut addrs = bound_addrs(&listeners, &spec.addrs);
    // Dedicated mode's DNS server: the first worker resolves port 0, the others bind its port.
    let dns_sockets = if let Some(port) = spec.addrs.dns_port {
        let wanted: Vec<SocketAddr> = spec.cfg.dns_proxy_addrs.iter().map(|a| SocketAddr::new(a.ip(), port)).collect();
        match crate::dns::server::bind(&wanted, spec.core.map(|c| c.id), None) {
            Ok(s) => {
                addrs.dns_port = s.first().and_then(|d| d.udp.local_addr().ok()).map(|a| a.port());
                s
            }
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        }
    } else {
        Vec::new()
    };
    if spec.cfg.inpod {
        tracing::info!(
            worker = spec.id,
            driver,
            "worker started (in-pod mode: each pod's listeners are bound as it arrives)"
        );
    } else {
        tracing::info!(worker = spec.id, driver, outbound = %addrs.outbound, inbound_plain = %addrs.inbound_plain, inbound = %addrs.inbound,
            socks5 = ?addrs.socks5, "worker listening");
    }
    // Acknowledge the initial generation before reporting start-up: once `start` returns,
    // readiness must not see a worker without config.
    spec.generation.store(spec.initial.generation, Ordering::Release);
    let _ = ready.send(Ok(Bound { addrs, driver }));

    let ctx = Rc::new(WorkerCtx {
        id: spec.id,
        core: spec.core.map(|c| c.id),
        cfg: spec.cfg.clone(),
        snapshot: RefCell::new(Rc::new(spec.initial)),
        conns: Rc::new(ConnTable::default()),
        draining: Signal::default(),
        accepting: Cell::new(0),
        listener_fds: RefCell::new(listeners.iter().map(|(_, l)| l.as_raw_fd()).collect()),
        own: own_addrs(&addrs, &spec.control_addrs),
        spoof_source: spec.spoof_source,
        addrs,
        // Raw splice calls rely on io_uring readiness polls; the epoll driver keeps copying.
        splice: spec.cfg.splice && driver == "io_uring",
        pool: HbonePool::new(spec.cfg.pool_max_streams, spec.cfg.pool_idle_timeout),
        cert_requests: spec.cert_requests,
        metrics: Rc::new(Shard::default()),
        accepted: Cell::new(0),
        handshakes: Cell::new(0),
        snapshot_waiters: RefCell::new(Signal::default()),
        pods: RefCell::default(),
        home_netns,
        dns: spec.dns,
        dns_in_flight: Cell::new(0),
        dns_tcp_clients: Cell::new(0),
        dns_buf: RefCell::new(vec![0; crate::dns::server::MAX_UDP_QUERY]),
        dns_cache: RefCell::default(),
    });
    match crate::dns::server::start(&ctx, dns_sockets, None) {
        Ok(fds) => ctx.listener_fds.borrow_mut().extend(fds),
        Err(e) => tracing::error!(worker = ctx.id, error = %e, "DNS proxy not started"),
    }
    for (kind, listener) in listeners {
        ctx.accepting.set(ctx.accepting.get() + 1);
        monoio::spawn(accept_loop(ctx.clone(), kind, listener, None));
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
                let mut dump = ctx.metrics.dump();
                dump.workers.push(crate::telemetry::metrics::WorkerFigures {
                    id: ctx.id,
                    cpu_seconds: crate::sys::thread_cpu_seconds(),
                    open_connections: ctx.conns.len() as u64,
                    accepted_total: ctx.accepted.get(),
                    pods: ctx.pods.borrow().len() as u64,
                });
                let _ = reply.send(dump);
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
            Some(WorkerMsg::AddPod { pod, reply }) => {
                let _ = reply.send(pods::add_pod(&ctx, pod));
            }
            Some(WorkerMsg::DrainPod { id, deadline }) => pods::drain_pod(&ctx, id, deadline),
            Some(WorkerMsg::PodConnections(reply)) => {
                let _ = reply.send(pods::connections(&ctx));
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

/// Stops accepting, waits for open connections until the deadline, then closes the rest.
async fn drain(ctx: &WorkerCtx, deadline: Instant) {
    ctx.draining.fire();
    // Stopped, not dropped under a pending accept: an accept the kernel already completed would
    // otherwise be lost with its connection, and the listeners leave the port to the proxy that
    // replaces this one at once.
    for fd in ctx.listener_fds.take() {
        if let Err(e) = crate::sys::stop_listening(fd) {
            tracing::debug!(worker = ctx.id, error = %e, "stopping a listener");
        }
    }
    pods::stop_all(ctx);
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
            ctx.conns.close_all(CloseReason::DrainDeadline);
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

#[cfg(test)]
mod tests {
    use super::*;
    use monoio::io::{AsyncReadRentExt, AsyncWriteRentExt};

    /// The kernel's release as (major, minor), from `/proc`.
    fn kernel_version() -> Option<(u32, u32)> {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
        let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
        Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
    }

    /// With deferred task work the kernel posts completions only when the worker asks for them:
    /// socket I/O, timers and a wake-up from another thread (how the control thread reaches a
    /// worker) must all still arrive while the worker waits.
    #[test]
    fn a_worker_ring_delivers_io_timers_and_wakeups_from_other_threads() {
        if !monoio::utils::detect_uring() {
            eprintln!("skipped: io_uring is not available here");
            return;
        }
        let (mut rt, setup) = uring_runtime().expect("an io_uring runtime");
        if kernel_version().is_some_and(|v| v >= (6, 1)) {
            assert_eq!(setup, UringSetup::Deferred, "kernel 6.1 or later takes DEFER_TASKRUN");
        }
        let (tx, rx) = crate::snapshot::publish::channel();
        let work = async move {
            let listener = monoio::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("address");
            let echo = monoio::spawn(async move {
                let (mut conn, _) = listener.accept().await.expect("accept");
                let (res, buf) = conn.read_exact(vec![0u8; 4]).await;
                res.expect("read");
                let (res, _) = conn.write_all(buf).await;
                res.expect("write");
            });
            let mut client = monoio::net::TcpStream::connect(addr).await.expect("connect");
            let (res, _) = client.write_all(b"ping".to_vec()).await;
            res.expect("write");
            let (res, back) = client.read_exact(vec![0u8; 4]).await;
            res.expect("read");
            assert_eq!(back, b"ping");
            echo.await;
            monoio::time::sleep(Duration::from_millis(5)).await;
            // Sent while this thread sleeps in the kernel waiting for its ring.
            let sender = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                tx.send(WorkerMsg::Drain { deadline: Instant::now() })
            });
            let msg = rx.recv().await;
            assert!(sender.join().expect("sender thread"), "the worker's end was open");
            assert!(matches!(msg, Some(WorkerMsg::Drain { .. })), "the message sent from another thread arrives");
        };
        // The deadline's timer is made inside the runtime, which owns the timers.
        let outcome = rt.block_on(async move { monoio::time::timeout(Duration::from_secs(20), work).await });
        assert!(outcome.is_ok(), "ring {setup:?}: everything arrives well within 20 s");
    }
}
