//! The one wiring function: load the first config, start the workers (each binds its own
//! listeners), start the control thread, and hand back the bound addresses and a shutdown
//! handle. `main` and the in-process tests both start the proxy through here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};

use anyhow::{Context, bail};
use tokio::sync::{mpsc, oneshot};

use crate::config::Config;
use crate::control::CaChoice;
use crate::control::istio_ca::CaOptions;
use crate::control::{self, ControlSpec, LocalFileWatch, ProxyAddrs};
use crate::model::ConfigState;
use crate::net::ListenAddrs;
use crate::snapshot::publish as channel;
use crate::snapshot::{LocalScope, Snapshot, SourceInfo};
use crate::sys;
use crate::tls::ca::LocalCa;
use crate::worker::{self, WorkerSpec};

pub struct RunOptions {
    /// Drain on SIGTERM/SIGINT (the binary); tests stop the proxy through the handle instead.
    pub handle_signals: bool,
}

/// A running proxy.
pub struct Proxy {
    pub addrs: ProxyAddrs,
    shutdown: mpsc::UnboundedSender<()>,
    control: std::thread::JoinHandle<()>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// Starts the drain (as SIGTERM would). Returns at once; `wait` for the end.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(());
    }

    /// Waits until the proxy has drained and every thread ended.
    pub fn wait(self) -> anyhow::Result<()> {
        let mut failed = Vec::new();
        for (i, w) in self.workers.into_iter().enumerate() {
            if w.join().is_err() {
                failed.push(format!("worker {i}"));
            }
        }
        if self.control.join().is_err() {
            failed.push("control".to_string());
        }
        if failed.is_empty() { Ok(()) } else { bail!("threads panicked: {}", failed.join(", ")) }
    }
}

/// Starts the proxy. Fails, naming the cause, when the config cannot be loaded or a port bound.
pub fn start(cfg: Config, opts: RunOptions) -> anyhow::Result<Proxy> {
    crate::tls::install_process_provider();
    crate::tls::seed_random();
    let cfg = Arc::new(cfg);
    let xds = cfg.xds_address.as_ref().map(|addr| xds_options(&cfg, addr)).transpose()?;
    let (local_file, initial) = first_config(&cfg)?;
    match sys::raise_nofile_limit() {
        Ok(n) => tracing::debug!(limit = n, "open file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open file limit"),
    }
    let ca = certificate_source(&cfg)?;
    if cfg.inpod {
        inpod_permitted(&cfg)?;
    }
    let spoof_source = original_source_allowed(&cfg)?;
    let control_ports = control::ControlListeners::bind(&cfg)?;
    let (cert_tx, cert_rx) = mpsc::unbounded_channel();
    let workers = start_workers(&cfg, &initial, spoof_source, control_ports.addrs(), cert_tx)?;
    let (shutdown_tx, shutdown_rx) = mpsc::unbounded_channel();
    let spec = ControlSpec {
        cfg: cfg.clone(),
        initial,
        workers: workers.txs,
        worker_generations: workers.generations,
        worker_alive: workers.alive,
        worker_done: workers.done,
        worker_addrs: workers.addrs,
        driver: workers.driver,
        local_file,
        shutdown_rx,
        shutdown_tx: shutdown_tx.clone(),
        handle_signals: opts.handle_signals,
        cert_requests: cert_rx,
        xds,
        ports: Some(control_ports),
    };
    let (control, ready) = control::spawn(spec, ca).context("spawning the control thread")?;
    let addrs = ready.recv().map_err(|_| anyhow::anyhow!("control thread died during start-up"))??;
    Ok(Proxy { addrs, shutdown: shutdown_tx, control, workers: workers.handles })
}

/// The first generation: the config file, read and validated now (a bad file stops start-up,
/// naming the field), or an empty config that istiod fills in (readiness waits for it).
fn first_config(cfg: &Config) -> anyhow::Result<(Option<LocalFileWatch>, Arc<Snapshot>)> {
    let scope = LocalScope::from_config(cfg);
    if let Some(text) = &cfg.local_xds_inline {
        let state = control::local::parse(text).context("invalid LOCAL_XDS (inline config)")?;
        let source = SourceInfo { kind: "inline", location: "LOCAL_XDS".into() };
        let initial = Arc::new(Snapshot::build(1, source, scope, state.clone()));
        let watch =
            LocalFileWatch { path: std::path::PathBuf::new(), stamp: None, text: text.clone(), state, inline: true };
        return Ok((Some(watch), initial));
    }
    let Some(path) = cfg.local_xds_path.clone() else {
        let source = SourceInfo { kind: "xds", location: cfg.xds_address.clone().unwrap_or_default() };
        return Ok((None, Arc::new(Snapshot::build(1, source, scope, ConfigState::default()))));
    };
    // Stamp before reading: a change racing the read is then seen by the watcher.
    let stamp = control::local::stamp(&path);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading LOCAL_XDS_PATH {}", path.display()))?;
    let state = control::local::parse(&text).with_context(|| format!("invalid config file {}", path.display()))?;
    let source = SourceInfo { kind: "file", location: path.display().to_string() };
    let initial = Arc::new(Snapshot::build(1, source, scope, state.clone()));
    sys::release_free_memory();
    tracing::info!(
        workloads = initial.workloads().count(),
        services = initial.services().count(),
        policies = initial.policies().count(),
        path = %path.display(),
        "loaded local config"
    );
    for w in &initial.warnings {
        tracing::warn!(generation = 1, "config: {w}");
    }
    Ok((Some(LocalFileWatch { path, stamp, text, state, inline: false }), initial))
}

/// The local CA (created or loaded now), or the Istio CA's settings (its root read now).
fn certificate_source(cfg: &Config) -> anyhow::Result<CaChoice> {
    let Some(address) = &cfg.ca_address else {
        let (ca, root) =
            LocalCa::from_config(&cfg.ca, &cfg.trust_domain, cfg.secret_ttl).context("starting the local CA")?;
        tracing::info!(root = %root, ttl = ?cfg.secret_ttl, "local CA ready");
        return Ok(CaChoice::Local(Box::new(ca)));
    };
    tracing::info!(%address, ttl = ?cfg.secret_ttl, "certificates from the Istio CA");
    Ok(CaChoice::Istio(CaOptions {
        address: address.clone(),
        root_ca: read_pem(&cfg.ca_root_ca, "CA_ROOT_CA")?,
        alt_hostname: cfg.alt_ca_hostname.clone().or_else(|| cfg.alt_xds_hostname.clone()),
        token_path: cfg.auth_token.clone(),
        cluster_id: cfg.cluster_id.clone(),
        headers: cfg.ca_headers.clone(),
        ttl: cfg.secret_ttl,
    }))
}

/// Whether upstream connections may keep the client's address: as asked (failing when asked for
/// and not permitted), or whenever the process may (`ENABLE_ORIG_SRC` unset).
fn original_source_allowed(cfg: &Config) -> anyhow::Result<bool> {
    match cfg.enable_orig_src {
        Some(false) => Ok(false),
        Some(true) if !sys::can_spoof_source() => {
            bail!("ENABLE_ORIG_SRC=true but IP_TRANSPARENT is not permitted (needs CAP_NET_ADMIN)")
        }
        Some(true) => Ok(true),
        None => Ok(sys::can_spoof_source()),
    }
}

/// In-pod mode makes sockets inside pods' network namespaces and marks them: check both are
/// permitted now rather than fail every pod later.
fn inpod_permitted(cfg: &Config) -> anyhow::Result<()> {
    sys::can_setns().context(
        "in-pod mode (PROXY_MODE=shared) enters pod network namespaces, which needs CAP_SYS_ADMIN \
         (INPOD_ENABLED=false selects node-level capture)",
    )?;
    if let Some(mark) = cfg.packet_mark {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.set_mark(mark)
            .context("in-pod mode marks the sockets it makes in pods (SO_MARK), which needs CAP_NET_ADMIN")?;
    }
    tracing::info!(uds = %cfg.inpod_uds.display(), "in-pod mode: pods come from the node agent");
    Ok(())
}

/// What the control thread needs of the running workers, and their threads.
struct StartedWorkers {
    txs: Vec<channel::WorkerTx>,
    generations: Vec<Arc<AtomicU64>>,
    alive: Vec<Arc<AtomicBool>>,
    done: Vec<oneshot::Receiver<()>>,
    addrs: ListenAddrs,
    driver: &'static str,
    handles: Vec<std::thread::JoinHandle<()>>,
}

/// Starts the workers one by one: the first resolves any port 0, the others bind the same ports.
fn start_workers(
    cfg: &Arc<Config>,
    initial: &Arc<Snapshot>,
    spoof_source: bool,
    control_addrs: Vec<SocketAddr>,
    cert_tx: mpsc::UnboundedSender<crate::model::Identity>,
) -> anyhow::Result<StartedWorkers> {
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let resolvers = Arc::new(match crate::dns::resolv::load(&cfg.resolv_conf) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(path = %cfg.resolv_conf.display(), error = %e, "no resolv.conf: forwarding DNS to 127.0.0.1:53");
            crate::dns::resolv::Resolvers::default()
        }
    });
    let mut started = StartedWorkers {
        txs: Vec::new(),
        generations: Vec::new(),
        alive: Vec::new(),
        done: Vec::new(),
        addrs: ListenAddrs {
            outbound: cfg.listeners.outbound,
            inbound_plain: cfg.listeners.inbound_plain,
            inbound: cfg.listeners.inbound,
            socks5: cfg.socks5.then_some(cfg.listeners.socks5),
            dns_port: match (cfg.proxy_mode, cfg.dns_capture) {
                (crate::config::ProxyMode::Dedicated, true) => cfg.dns_proxy_addrs.first().map(|a| a.port()),
                _ => None,
            },
        },
        driver: "",
        handles: Vec::new(),
    };
    for id in 0..cfg.worker_threads {
        let (tx, rx) = channel::channel();
        let generation = Arc::new(AtomicU64::new(0));
        let alive = Arc::new(AtomicBool::new(false));
        let (done_tx, done_rx) = oneshot::channel::<()>();
        let spec = WorkerSpec {
            id,
            cfg: cfg.clone(),
            addrs: started.addrs,
            initial: initial.clone(),
            rx,
            core: (cfg.pin_workers && !cores.is_empty()).then(|| cores[id % cores.len()]),
            spoof_source,
            control_addrs: control_addrs.clone(),
            generation: generation.clone(),
            alive: alive.clone(),
            done: done_tx,
            cert_requests: cert_tx.clone(),
            dns: resolvers.clone(),
        };
        let (handle, ready) = worker::spawn(spec).context("spawning a worker thread")?;
        let bound = ready.recv().map_err(|_| anyhow::anyhow!("worker {id} died during start-up"))?;
        let bound = bound.with_context(|| format!("worker {id}"))?;
        started.addrs = bound.addrs;
        started.driver = bound.driver;
        started.txs.push(tx);
        started.generations.push(generation);
        started.alive.push(alive);
        started.done.push(done_rx);
        started.handles.push(handle);
    }
    tracing::info!(workers = cfg.worker_threads, driver = started.driver, spoof_source, "workers started");
    Ok(started)
}

/// The istiod client's settings from the config: the root CA read now (a missing one fails
/// start-up naming `XDS_ROOT_CA`), Istio's node id and metadata.
fn xds_options(cfg: &Config, address: &str) -> anyhow::Result<crate::control::xds::client::XdsOptions> {
    let root_ca = read_pem(&cfg.xds_root_ca, "XDS_ROOT_CA")?;
    let ns = cfg.pod_namespace.clone().unwrap_or_else(|| "istio-system".into());
    let pod = cfg.pod_name.clone().unwrap_or_else(|| "ztunnel".into());
    let ip = cfg.instance_ip.map(|i| i.to_string()).unwrap_or_default();
    let node_id = format!("ztunnel~{ip}~{pod}.{ns}~{ns}.svc.{}", cfg.cluster_domain);
    let mut node_metadata = std::collections::BTreeMap::new();
    node_metadata.insert("NAME".to_string(), pod);
    node_metadata.insert("NAMESPACE".to_string(), ns);
    node_metadata.insert("INSTANCE_IPS".to_string(), ip);
    node_metadata.insert("CLUSTER_ID".to_string(), cfg.cluster_id.clone());
    if let Some(node) = &cfg.node_name {
        node_metadata.insert("NODE_NAME".to_string(), node.clone());
    }
    for (k, v) in std::env::vars().filter(|(k, _)| k.starts_with("ISTIO_META_")) {
        node_metadata.insert(k.trim_start_matches("ISTIO_META_").to_string(), v);
    }
    Ok(crate::control::xds::client::XdsOptions {
        address: address.to_string(),
        root_ca,
        alt_hostname: cfg.alt_xds_hostname.clone(),
        token_path: cfg.auth_token.clone(),
        cluster_id: cfg.cluster_id.clone(),
        node_id,
        node_metadata,
        headers: cfg.xds_headers.clone(),
    })
}

/// The system's trust roots, for `XDS_ROOT_CA=SYSTEM` / `CA_ROOT_CA=SYSTEM`.
const SYSTEM_ROOTS: [&str; 3] =
    ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"];

/// PEM text given inline, or the file holding it, or `SYSTEM` for the system's roots; errors
/// name the variable.
fn read_pem(value: &str, var: &str) -> anyhow::Result<Vec<u8>> {
    if value == "SYSTEM" {
        return SYSTEM_ROOTS
            .iter()
            .find_map(|p| std::fs::read(p).ok())
            .with_context(|| format!("{var}=SYSTEM: no system trust roots at {}", SYSTEM_ROOTS.join(", ")));
    }
    if value.contains("-----BEGIN") {
        Ok(value.as_bytes().to_vec())
    } else {
        std::fs::read(value).with_context(|| format!("reading {var} {value}"))
    }
}
