//! The control thread: one OS thread with a current-thread tokio runtime. It owns the config
//! sources, builds snapshots and publishes them to every worker, serves the admin (15000) and
//! readiness (15021) ports, and runs shutdown: SIGTERM/SIGINT or `/quitquitquit` -> drain.
//!
//! Nothing here is on the data path. State is `Rc`/`RefCell` on this one thread.

pub mod certs;
pub mod http;
pub mod istio_ca;
pub mod local;
pub mod pods;
pub mod xds;

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use crate::config::Config;
use crate::model::{ConfigState, Identity};
use crate::snapshot::publish::{WorkerMsg, WorkerTx};
use crate::snapshot::{CertMap, ConfigIndex, Snapshot, SourceInfo};
use crate::telemetry::metrics::Dump;
use crate::tls::ca::LocalCa;
use certs::CertManager;
use http::{Request, Response};
use istio_ca::IstioCa;
use local::FileStamp;
use xds::client::{XdsClient, XdsOptions};

/// Addresses the proxy listens on, once bound.
#[derive(Debug, Clone, Copy, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyAddrs {
    pub outbound: SocketAddr,
    pub inbound_plain: SocketAddr,
    pub inbound: SocketAddr,
    pub socks5: Option<SocketAddr>,
    /// The DNS proxy's first address in dedicated mode (in-pod mode: inside each pod).
    pub dns: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub readiness: SocketAddr,
    pub metrics: SocketAddr,
}

/// What the local file watcher starts from (the version the first snapshot was built from).
pub struct LocalFileWatch {
    pub path: PathBuf,
    pub stamp: Option<FileStamp>,
    pub text: String,
    /// What `text` parsed to.
    pub state: ConfigState,
    /// Given inline (`LOCAL_XDS`): there is no file to watch.
    pub inline: bool,
}

/// The certificate source, chosen at start (built on the control thread: the Istio CA client
/// is not `Send`).
pub enum CaChoice {
    Local(Box<LocalCa>),
    Istio(istio_ca::CaOptions),
}

/// Everything the control thread starts from; all of it `Send`.
pub struct ControlSpec {
    pub cfg: Arc<Config>,
    pub initial: Arc<Snapshot>,
    pub workers: Vec<WorkerTx>,
    pub worker_generations: Vec<Arc<AtomicU64>>,
    /// False once a worker thread ended (a panic, before drain): readiness fails.
    pub worker_alive: Vec<Arc<AtomicBool>>,
    /// Each resolves (with an error) when its worker thread has ended.
    pub worker_done: Vec<oneshot::Receiver<()>>,
    pub worker_addrs: crate::net::ListenAddrs,
    pub driver: &'static str,
    pub local_file: Option<LocalFileWatch>,
    pub shutdown_rx: mpsc::UnboundedReceiver<()>,
    pub shutdown_tx: mpsc::UnboundedSender<()>,
    pub handle_signals: bool,
    /// Identities workers need and nobody fetched ahead (sources that are not HBONE workloads).
    pub cert_requests: mpsc::UnboundedReceiver<Identity>,
    /// The istiod client's settings, when `XDS_ADDRESS` is set.
    pub xds: Option<XdsOptions>,
    /// The admin, readiness and metrics listeners (taken once, when the thread starts).
    pub ports: Option<ControlListeners>,
}

struct ControlState {
    cfg: Arc<Config>,
    current: RefCell<Arc<Snapshot>>,
    workers: Vec<WorkerTx>,
    worker_generations: Vec<Arc<AtomicU64>>,
    worker_alive: Vec<Arc<AtomicBool>>,
    draining: Cell<bool>,
    addrs: Cell<Option<ProxyAddrs>>,
    driver: &'static str,
    started: Instant,
    /// The last rejected config, shown in `config_dump` until a good one replaces it.
    last_error: RefCell<Option<String>>,
    shutdown_tx: mpsc::UnboundedSender<()>,
    certs: Rc<CertManager>,
    /// The config file's last accepted content (merged with what istiod sends).
    file_state: RefCell<Option<ConfigState>>,
    /// The istiod client, when `XDS_ADDRESS` is set.
    xds: RefCell<Option<Rc<XdsClient>>>,
    /// Identities asked for on demand; kept while a local workload has them.
    requested: RefCell<BTreeSet<Identity>>,
    /// Per format (Prometheus text, OpenMetrics): the requests waiting for the scrape being
    /// gathered now, if one is.
    scrapes_in_flight: RefCell<[Option<Vec<oneshot::Sender<bytes::Bytes>>>; 2]>,
    /// In-pod mode: the pods the node agent handed over.
    pods: Option<Rc<pods::PodManager>>,
}

impl ControlState {
    fn new(spec: &mut ControlSpec, ca: CaChoice) -> Rc<ControlState> {
        let pods = spec.cfg.inpod.then(|| Rc::new(pods::PodManager::new(spec.cfg.clone(), spec.workers.clone())));
        Rc::new(ControlState {
            cfg: spec.cfg.clone(),
            current: RefCell::new(spec.initial.clone()),
            workers: std::mem::take(&mut spec.workers),
            worker_generations: std::mem::take(&mut spec.worker_generations),
            worker_alive: std::mem::take(&mut spec.worker_alive),
            draining: Cell::new(false),
            addrs: Cell::new(None),
            driver: spec.driver,
            started: Instant::now(),
            last_error: RefCell::new(None),
            shutdown_tx: spec.shutdown_tx.clone(),
            certs: CertManager::new(match ca {
                CaChoice::Local(ca) => Rc::new(*ca),
                CaChoice::Istio(opts) => Rc::new(IstioCa::new(opts)),
            }),
            // The watcher keeps only the text; the parsed state lives here, once.
            file_state: RefCell::new(spec.local_file.as_mut().map(|w| std::mem::take(&mut w.state))),
            xds: RefCell::new(None),
            requested: RefCell::new(BTreeSet::new()),
            scrapes_in_flight: RefCell::default(),
            pods,
        })
    }

    /// Publishes one generation to every worker.
    fn publish(&self, snap: Arc<Snapshot>) {
        *self.current.borrow_mut() = snap.clone();
        for w in &self.workers {
            w.send(WorkerMsg::Snapshot(snap.clone()));
        }
    }

    /// Publishes the next generation with a new certificate map (same config).
    fn publish_certs(&self, certs: CertMap) {
        let next = Arc::new(self.current.borrow().with_certs(certs));
        tracing::debug!(generation = next.generation, certificates = next.certs.len(), "publishing certificates");
        self.publish(next);
    }

    /// Points the certificate manager at the identities of the current config: the local HBONE
    /// workloads', and those asked for on demand that a local workload still has.
    fn track_identities(&self) {
        let current = self.current.borrow().clone();
        let mut wanted = current.local_identities();
        // A pod's certificate is fetched as soon as the pod is handed over.
        if let Some(p) = &self.pods {
            wanted.extend(p.identities());
        }
        let mut requested = self.requested.borrow_mut();
        let local_ids: BTreeSet<Identity> =
            current.workloads().filter(|w| current.scope.contains(w)).map(|w| w.identity()).collect();
        requested.retain(|id| local_ids.contains(id));
        wanted.extend(requested.iter().cloned());
        drop(requested);
        if self.certs.want(wanted) {
            self.publish_certs(self.certs.certs());
        }
    }

    /// Builds the next config generation from every source (the file, istiod) and publishes it.
    fn publish_config(&self, why: &str) {
        let mut merged = self.file_state.borrow().clone().unwrap_or_default();
        let xds = self.xds.borrow().clone();
        if let Some(x) = &xds {
            let from_xds = x.store.borrow().config_state();
            merged.workloads.extend(from_xds.workloads);
            merged.services.extend(from_xds.services);
            merged.policies.extend(from_xds.policies);
        }
        let file = self.cfg.local_xds_path.as_ref().map(|p| p.display().to_string());
        let source = match (file, &xds) {
            (Some(f), Some(x)) => {
                SourceInfo { kind: "file+xds", location: format!("{f} + {}", x.status.borrow().address) }
            }
            (Some(f), None) => SourceInfo { kind: "file", location: f },
            (None, Some(x)) => SourceInfo { kind: "xds", location: x.status.borrow().address.clone() },
            (None, None) => SourceInfo { kind: "none", location: String::new() },
        };
        let current = self.current.borrow().clone();
        let started = Instant::now();
        let index = ConfigIndex::build(current.config_generation + 1, source, current.scope.clone(), merged);
        let snap = current.with_config(index);
        for w in &snap.warnings {
            tracing::warn!(generation = snap.generation, "config: {w}");
        }
        tracing::info!(
            generation = snap.generation,
            workloads = snap.workloads().count(),
            services = snap.services().count(),
            policies = snap.policies().count(),
            build = ?started.elapsed(),
            "{why}: publishing a new config generation"
        );
        self.publish(Arc::new(snap));
        self.track_identities();
        // Parsing and building a large config leaves freed heap the allocator keeps: hand it
        // back, or a node proxy's RSS stays at the high-water mark of its biggest push.
        crate::sys::release_free_memory();
    }

    /// Asks every worker for its metrics shard and merges them. A worker that does not answer
    /// within a second (it has exited) is left out.
    async fn scrape(&self) -> Dump {
        let mut replies = Vec::new();
        for w in &self.workers {
            let (tx, rx) = oneshot::channel();
            w.send(WorkerMsg::Scrape(tx));
            replies.push(rx);
        }
        let mut all = Dump::empty();
        for rx in replies {
            if let Ok(Ok(d)) = tokio::time::timeout(std::time::Duration::from_secs(1), rx).await {
                all.merge(d);
            }
        }
        all
    }

    fn readiness(&self) -> Result<(), String> {
        if self.draining.get() {
            return Err("draining".into());
        }
        if let Some(x) = self.xds.borrow().as_ref() {
            if !x.synced() {
                return Err("waiting for istiod's first answer for workloads and policies".into());
            }
        }
        if let Some(p) = &self.pods {
            p.readiness()?;
        }
        let dead = self.worker_alive.iter().enumerate().filter(|(_, a)| !a.load(Ordering::Acquire));
        let mut pending: Vec<String> =
            dead.map(|(i, _)| format!("worker {i} stopped (see its panic in the log)")).collect();
        pending.extend(
            self.worker_generations
                .iter()
                .enumerate()
                .filter(|(_, g)| g.load(Ordering::Acquire) == 0)
                .map(|(i, _)| format!("worker {i} has no config yet")),
        );
        if pending.is_empty() { Ok(()) } else { Err(pending.join(", ")) }
    }
}

/// Starts the control thread; the receiver yields the bound admin and readiness addresses.
pub fn spawn(
    spec: ControlSpec,
    ca: CaChoice,
) -> io::Result<(std::thread::JoinHandle<()>, std::sync::mpsc::Receiver<io::Result<ProxyAddrs>>)> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = std::thread::Builder::new().name("control".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, run(spec, ca, ready_tx));
    })?;
    Ok((handle, ready_rx))
}

/// How often the resident size is looked at, and how much it must have grown since the last
/// look (or trim) for freed heap to be handed back.
const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
const TRIM_GROWTH: u64 = 8 << 20;

/// Hands freed heap back after bursts. Bulk transfers fill the HTTP/2 windows with data in
/// flight; once it is delivered glibc keeps the freed memory, and the RSS would stay at the
/// burst's high-water mark. `malloc_trim` locks each arena in turn while it walks it, so it
/// runs at most every `TRIM_EVERY`, and only after the RSS grew by `TRIM_GROWTH`.
async fn release_after_bursts() {
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut policy = TrimPolicy::default();
    loop {
        tick.tick().await;
        let Some(rss) = crate::sys::resident_bytes() else { return };
        if policy.should_trim(rss) {
            crate::sys::release_free_memory();
            if let Some(after) = crate::sys::resident_bytes() {
                tracing::debug!(before = rss, after, "handed freed heap back");
                policy.trimmed(after);
            }
        }
    }
}

/// When to trim: the RSS grew by more than `TRIM_GROWTH` over the lowest seen since the last
/// trim.
#[derive(Default)]
struct TrimPolicy {
    floor: Option<u64>,
}

impl TrimPolicy {
    fn should_trim(&mut self, rss: u64) -> bool {
        let floor = *self.floor.get_or_insert(rss);
        if rss < floor {
            self.floor = Some(rss);
        }
        rss > floor + TRIM_GROWTH
    }

    /// After a trim, growth counts from what is resident now: memory in use is not trimmed
    /// again and again.
    fn trimmed(&mut self, rss: u64) {
        self.floor = Some(rss);
    }
}

async fn run(mut spec: ControlSpec, ca: CaChoice, ready: std::sync::mpsc::Sender<io::Result<ProxyAddrs>>) {
    let ports = match spec.ports.take().map(ControlPorts::adopt) {
        Some(Ok(p)) => p,
        Some(Err(e)) => {
            let _ = ready.send(Err(e));
            return;
        }
        None => {
            let _ = ready.send(Err(io::Error::other("the control ports were not bound")));
            return;
        }
    };
    let state = ControlState::new(&mut spec, ca);
    if let Some(opts) = spec.xds.take() {
        start_xds(&state, opts);
    }
    let addrs = ProxyAddrs {
        outbound: spec.worker_addrs.outbound,
        inbound_plain: spec.worker_addrs.inbound_plain,
        inbound: spec.worker_addrs.inbound,
        socks5: spec.worker_addrs.socks5,
        dns: spec
            .worker_addrs
            .dns_port
            .and_then(|port| spec.cfg.dns_proxy_addrs.first().map(|a| SocketAddr::new(a.ip(), port))),
        admin: ports.admin.local_addr().unwrap_or(spec.cfg.listeners.admin),
        readiness: ports.readiness.local_addr().unwrap_or(spec.cfg.listeners.readiness),
        metrics: ports.metrics.local_addr().unwrap_or(spec.cfg.listeners.metrics),
    };
    state.addrs.set(Some(addrs));
    tracing::info!(admin = %addrs.admin, readiness = %addrs.readiness, metrics = %addrs.metrics, "control plane listening");
    let readiness = serve_control_ports(&state, ports);
    state.track_identities();
    let s = state.clone();
    tokio::task::spawn_local(state.certs.clone().run(move |certs| s.publish_certs(certs)));
    if let Some(watch) = spec.local_file.take().filter(|w| !w.inline) {
        tokio::task::spawn_local(watch_local_file(state.clone(), watch));
    }
    let requests = std::mem::replace(&mut spec.cert_requests, mpsc::unbounded_channel().1);
    tokio::task::spawn_local(certificates_on_demand(state.clone(), requests));
    if let Some(p) = &state.pods {
        tokio::task::spawn_local(pods::run(state.clone(), p.clone()));
    }
    tokio::task::spawn_local(release_after_bursts());
    let _ = ready.send(Ok(addrs));

    wait_for_shutdown(&mut spec.shutdown_rx, spec.handle_signals).await;
    state.draining.set(true);
    // The node agent's next Adds go to the proxy that replaces this one.
    if let Some(p) = &state.pods {
        p.shutdown();
    }
    // Probes now reach only the proxy that replaces this one (a port shared by SO_REUSEPORT
    // hands what was queued here to it). Admin and metrics stay up until the exit.
    readiness.abort();
    drain_workers(&state, spec.worker_done).await;
}

/// The admin, readiness and metrics listeners, bound before the workers start (so the workers
/// know these ports as the proxy's own), served on this thread.
pub struct ControlListeners {
    pub admin: std::net::TcpListener,
    pub readiness: std::net::TcpListener,
    pub metrics: std::net::TcpListener,
}

impl ControlListeners {
    /// Binds the control ports with `SO_REUSEPORT`, as the data ports: a restarted proxy starts
    /// while this one drains.
    pub fn bind(cfg: &Config) -> io::Result<ControlListeners> {
        let bind = |addr: SocketAddr| {
            crate::net::bind_std(
                addr,
                crate::net::ListenOpts { transparent: false, backlog: 128, accepted: None, mark: None },
            )
            .map_err(|e| io::Error::new(e.kind(), format!("binding {addr}: {e}")))
        };
        Ok(ControlListeners {
            admin: bind(cfg.listeners.admin)?,
            readiness: bind(cfg.listeners.readiness)?,
            metrics: bind(cfg.listeners.metrics)?,
        })
    }

    /// The bound addresses.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        [&self.admin, &self.readiness, &self.metrics].iter().filter_map(|l| l.local_addr().ok()).collect()
    }
}

struct ControlPorts {
    admin: tokio::net::TcpListener,
    readiness: tokio::net::TcpListener,
    metrics: tokio::net::TcpListener,
}

impl ControlPorts {
    fn adopt(l: ControlListeners) -> io::Result<ControlPorts> {
        Ok(ControlPorts {
            admin: tokio::net::TcpListener::from_std(l.admin)?,
            readiness: tokio::net::TcpListener::from_std(l.readiness)?,
            metrics: tokio::net::TcpListener::from_std(l.metrics)?,
        })
    }
}

/// Starts the three HTTP servers; returns the readiness server's task, which drain stops first.
fn serve_control_ports(state: &Rc<ControlState>, ports: ControlPorts) -> tokio::task::JoinHandle<()> {
    let s = state.clone();
    tokio::task::spawn_local(http::serve(ports.admin, Rc::new(move |req| admin_handler(s.clone(), req))));
    let s = state.clone();
    tokio::task::spawn_local(http::serve(ports.metrics, Rc::new(move |req| metrics_handler(s.clone(), req))));
    let s = state.clone();
    tokio::task::spawn_local(http::serve(ports.readiness, Rc::new(move |req| readiness_handler(s.clone(), req))))
}

/// The istiod client: every push becomes a new generation.
fn start_xds(state: &Rc<ControlState>, opts: XdsOptions) {
    let weak = Rc::downgrade(state);
    let client = XdsClient::new(
        opts,
        Box::new(move |_store| {
            if let Some(s) = weak.upgrade() {
                s.publish_config("xDS push");
            }
        }),
    );
    *state.xds.borrow_mut() = Some(client.clone());
    tokio::task::spawn_local(client.run());
}

/// Identities workers asked for and nobody fetched: tracked (and so fetched and renewed) while a
/// local workload has them.
async fn certificates_on_demand(state: Rc<ControlState>, mut requests: mpsc::UnboundedReceiver<Identity>) {
    while let Some(id) = requests.recv().await {
        if state.requested.borrow().contains(&id) {
            continue;
        }
        tracing::info!(identity = %id, "certificate requested on demand");
        state.requested.borrow_mut().insert(id);
        state.track_identities();
    }
}

/// Tells every worker to drain by the deadline and waits until each thread has ended.
async fn drain_workers(state: &ControlState, done: Vec<oneshot::Receiver<()>>) {
    let deadline = Instant::now() + state.cfg.termination_deadline;
    tracing::info!(deadline = ?state.cfg.termination_deadline, "shutting down: draining workers");
    for w in &state.workers {
        w.send(WorkerMsg::Drain { deadline });
    }
    for d in done {
        let _ = d.await;
    }
    tracing::info!("all workers drained; exiting");
}

async fn wait_for_shutdown(rx: &mut mpsc::UnboundedReceiver<()>, signals: bool) {
    use tokio::signal::unix::{SignalKind, signal};
    if !signals {
        rx.recv().await;
        return;
    }
    let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            tracing::warn!("cannot install signal handlers; only /quitquitquit stops the proxy");
            rx.recv().await;
            return;
        }
    };
    tokio::select! {
        _ = rx.recv() => tracing::info!("shutdown requested"),
        _ = term.recv() => tracing::info!("received SIGTERM"),
        _ = int.recv() => tracing::info!("received SIGINT"),
    }
}

/// Polls the file's metadata; a changed, parseable file becomes the next generation.
async fn watch_local_file(state: Rc<ControlState>, mut watch: LocalFileWatch) {
    let mut tick = tokio::time::interval(state.cfg.local_config_poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let stamp = local::stamp(&watch.path);
        if stamp == watch.stamp {
            continue;
        }
        watch.stamp = stamp;
        let generation = state.current.borrow().generation;
        let text = match std::fs::read_to_string(&watch.path) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(path = %watch.path.display(), error = %e, generation, "cannot read config file; keeping the current config");
                continue;
            }
        };
        if text == watch.text {
            continue;
        }
        match local::parse(&text) {
            Ok(cfg_state) => {
                *state.file_state.borrow_mut() = Some(cfg_state);
                state.publish_config(&format!("config file {} changed", watch.path.display()));
                *state.last_error.borrow_mut() = None;
                watch.text = text;
            }
            Err(e) => {
                tracing::error!(path = %watch.path.display(), error = %e, generation, "rejected config file; keeping the current config");
                *state.last_error.borrow_mut() = Some(format!("{}: {e}", watch.path.display()));
            }
        }
    }
}

async fn readiness_handler(state: Rc<ControlState>, req: Request) -> Response {
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/healthz/ready") => match state.readiness() {
            Ok(()) => Response::text(200, "ready\n"),
            Err(why) => Response::text(500, format!("not ready: {why}\n")),
        },
        (_, "/healthz/ready") => Response::text(405, "use GET\n"),
        _ => Response::text(404, "not found\n"),
    }
}

async fn admin_handler(state: Rc<ControlState>, req: Request) -> Response {
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/config_dump") => {
            let pods = match &state.pods {
                Some(p) => Some(p.dump().await),
                None => None,
            };
            Response::json(config_dump(&state, pods))
        }
        ("POST", "/quitquitquit") => {
            let _ = state.shutdown_tx.send(());
            Response::text(200, "OK\n")
        }
        ("GET", "/healthz/ready") => readiness_handler(state, req).await,
        ("POST", "/logging") | ("GET", "/logging") => logging_handler(&req),
        ("GET", "/stats/latency") => Response::json(state.scrape().await.latency_json().to_string()),
        ("GET", "/stats/prometheus") | ("GET", "/metrics") => metrics_handler(state, req).await,
        ("GET", "/") => Response::text(
            200,
            "admin endpoints:\n  GET  /config_dump     workloads, services, policies, config, generation\n  \
             POST /quitquitquit    drain and exit\n  GET  /healthz/ready    readiness\n  \
             GET  /stats/latency    connection setup percentiles per path (JSON)\n  \
             GET  /logging          the log filter; POST /logging?level=debug (RUST_LOG syntax) sets it\n  \
             GET  /stats/prometheus metrics (as on the metrics port)\n",
        ),
        (_, "/config_dump") | (_, "/quitquitquit") => Response::text(405, "method not allowed\n"),
        _ => Response::text(404, "not found (see GET /)\n"),
    }
}

/// `GET /logging` shows the log filter; `POST /logging?level=<RUST_LOG directive>` replaces it.
fn logging_handler(req: &Request) -> Response {
    let level = req.query.split('&').find_map(|kv| kv.strip_prefix("level="));
    match (req.method.as_str(), level) {
        ("POST", Some(level)) => {
            let level = level.replace("%2C", ",").replace("%3D", "=").replace("%3A", ":");
            match crate::telemetry::set_log_level(&level) {
                Ok(now) => {
                    tracing::info!(filter = %now, "log level changed");
                    Response::text(200, format!("current log level is {now}\n"))
                }
                Err(e) => Response::text(400, format!("{e}\n")),
            }
        }
        ("POST", None) => Response::text(400, "missing ?level=<RUST_LOG directive>\n"),
        _ => match crate::telemetry::log_level() {
            Some(now) => Response::text(200, format!("current log level is {now}\n")),
            None => Response::text(200, "logging is not managed by this process\n"),
        },
    }
}

/// `/metrics` (and `/stats/prometheus`): every worker's shard merged; OpenMetrics when the
/// scraper asks for it.
async fn metrics_handler(state: Rc<ControlState>, req: Request) -> Response {
    if req.method != "GET" {
        return Response::text(405, "method not allowed\n");
    }
    if !matches!(req.path.as_str(), "/metrics" | "/stats/prometheus") {
        return Response::text(404, "not found (GET /metrics)\n");
    }
    let openmetrics = req.header("accept").is_some_and(|a| a.contains("application/openmetrics-text"));
    let content_type = if openmetrics { http::OPENMETRICS_TEXT } else { http::PROMETHEUS_TEXT };
    // Scrapes that arrive while one is being gathered share its page: a burst of clients costs
    // one render, and every page is as fresh as a request that started after it arrived.
    let format = usize::from(openmetrics);
    let waiting = state.scrapes_in_flight.borrow_mut()[format].as_mut().map(|waiters| {
        let (tx, rx) = oneshot::channel();
        waiters.push(tx);
        rx
    });
    if let Some(rx) = waiting {
        return match rx.await {
            Ok(body) => Response { status: 200, content_type, body },
            Err(_) => Response::text(500, "the scrape this request joined failed\n"),
        };
    }
    state.scrapes_in_flight.borrow_mut()[format] = Some(Vec::new());
    // However this request ends (its exchange may time out), the next scrape starts afresh.
    let _leader = ScrapeLeader { state: &state, format };
    let mut extra = String::new();
    if let Some(x) = state.xds.borrow().as_ref() {
        x.render_metrics(&mut extra, openmetrics);
    }
    render_panics(&mut extra, openmetrics);
    render_process(&mut extra);
    if let Some(p) = &state.pods {
        p.render_metrics(&mut extra, openmetrics);
    }
    // Istio's dashboards read the Istio version from `istio_build{tag}`.
    let tag = std::env::var("ISTIO_META_ISTIO_VERSION").unwrap_or_else(|_| env!("CARGO_PKG_VERSION").to_string());
    let body: bytes::Bytes = state.scrape().await.render(&tag, openmetrics, &extra).into();
    for waiter in state.scrapes_in_flight.borrow_mut()[format].take().unwrap_or_default() {
        let _ = waiter.send(body.clone());
    }
    Response { status: 200, content_type, body }
}

/// Clears its format's in-flight scrape when dropped; waiters not yet answered get an error.
struct ScrapeLeader<'a> {
    state: &'a ControlState,
    format: usize,
}

impl Drop for ScrapeLeader<'_> {
    fn drop(&mut self) {
        self.state.scrapes_in_flight.borrow_mut()[self.format] = None;
    }
}

/// `process_open_fds` and `process_max_fds`, as Istio's ztunnel exports them.
fn render_process(out: &mut String) {
    use std::fmt::Write;
    let (open, max) = crate::sys::fd_usage();
    let _ = writeln!(out, "# HELP process_open_fds Number of open file descriptors.\n# TYPE process_open_fds gauge");
    let _ = writeln!(out, "process_open_fds {open}");
    let _ =
        writeln!(out, "# HELP process_max_fds Maximum number of open file descriptors.\n# TYPE process_max_fds gauge");
    let _ = writeln!(out, "process_max_fds {max}");
}

/// `ztunnel_task_panics_total`: connection tasks a panic ended (the worker went on).
fn render_panics(out: &mut String, openmetrics: bool) {
    use std::fmt::Write;
    let family = if openmetrics { "ztunnel_task_panics" } else { "ztunnel_task_panics_total" };
    let _ = writeln!(out, "# HELP {family} Connection tasks ended by a panic (the worker went on).");
    let _ = writeln!(out, "# TYPE {family} counter");
    let _ = writeln!(out, "ztunnel_task_panics_total {}", crate::worker::TASK_PANICS.load(Ordering::Relaxed));
}

/// A workload as Istio's ztunnel dumps it: `services` as a list of `namespace/hostname` (Kiali
/// types it `[]string`), and `capacity`, `clusterId`, `trustDomain` and `serviceAccount` always
/// written (with the defaults they have when unset).
fn dump_workload(w: &crate::model::Workload, cfg: &Config) -> serde_json::Value {
    let mut v = serde_json::to_value(w).unwrap_or_default();
    if let Some(obj) = v.as_object_mut() {
        let services: Vec<String> = w.services.keys().map(|k| k.to_string()).collect();
        obj.insert("services".into(), json!(services));
        obj.insert("capacity".into(), json!(w.capacity));
        let cluster = if w.cluster_id.is_empty() { cfg.cluster_id.as_str() } else { w.cluster_id.as_str() };
        obj.insert("clusterId".into(), json!(cluster));
        let td = if w.trust_domain.is_empty() { cfg.trust_domain.as_str() } else { w.trust_domain.as_str() };
        obj.insert("trustDomain".into(), json!(td));
        let sa = if w.service_account.is_empty() { "default" } else { w.service_account.as_str() };
        obj.insert("serviceAccount".into(), json!(sa));
    }
    v
}

/// The `config_dump` document: Istio ztunnel's top-level keys, plus our generation details.
fn config_dump(state: &ControlState, workload_state: Option<serde_json::Value>) -> String {
    let snap = state.current.borrow().clone();
    let workloads: Vec<serde_json::Value> = snap.workloads().map(|w| dump_workload(w, &state.cfg)).collect();
    let services: Vec<_> = snap.services().map(|s| &s.service).collect();
    let policies: Vec<_> = snap.policies().map(|p| p.as_ref()).collect();
    let generations: Vec<u64> = state.worker_generations.iter().map(|g| g.load(Ordering::Acquire)).collect();
    let doc = json!({
        "workloads": workloads,
        "services": services,
        "policies": policies,
        "certificates": state.certs.dump(),
        "workloadState": workload_state.unwrap_or_else(|| json!({})),
        "config": &*state.cfg,
        "version": {
            "version": env!("CARGO_PKG_VERSION"),
            "gitRevision": env!("ZTUNNEL_GIT_REVISION"),
            "rustVersion": env!("ZTUNNEL_RUSTC_VERSION"),
            "buildProfile": env!("ZTUNNEL_BUILD_PROFILE"),
            "buildStatus": env!("ZTUNNEL_BUILD_STATUS"),
            "istioVersion": std::env::var("ISTIO_META_ISTIO_VERSION").unwrap_or_else(|_| "unknown".into()),
            "name": env!("CARGO_PKG_NAME"),
        },
        "stagedServices": {},
        "staticConfig": {},
        "generation": snap.generation,
        "configGeneration": snap.config_generation,
        "source": &snap.source,
        "warnings": &snap.warnings,
        "lastRejectedConfig": &*state.last_error.borrow(),
        "workers": {
            "count": state.workers.len(),
            "ioDriver": state.driver,
            "generations": generations,
        },
        "listeners": state.addrs.get(),
        "draining": state.draining.get(),
        "uptimeSeconds": state.started.elapsed().as_secs(),
        "xds": state.xds.borrow().as_ref().map(|x| {
            let store = x.store.borrow();
            json!({
                "status": &*x.status.borrow(),
                "addresses": store.addresses.len(),
                "policies": store.policies.len(),
            })
        }),
    });
    serde_json::to_string_pretty(&doc).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_after_growth_then_counts_from_what_remains() {
        const M: u64 = 1 << 20;
        let mut p = TrimPolicy::default();
        assert!(!p.should_trim(40 * M), "the first look sets the floor");
        assert!(!p.should_trim(48 * M), "8 MiB of growth is not enough");
        assert!(!p.should_trim(30 * M), "a lower RSS lowers the floor");
        assert!(p.should_trim(39 * M), "9 MiB over the floor");
        // Most of it was in use: the next trim waits for growth over what remained.
        p.trimmed(37 * M);
        assert!(!p.should_trim(45 * M));
        assert!(p.should_trim(46 * M));
    }

    #[test]
    fn resident_size_is_readable() {
        let rss = crate::sys::resident_bytes().expect("/proc/self/statm");
        assert!(rss > 1 << 20, "{rss}");
    }
}
