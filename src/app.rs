//! The one wiring function: load the first config, start the workers (each binds its own
//! listeners), start the control thread, and hand back the bound addresses and a shutdown
//! handle. `main` and the in-process tests both start the proxy through here.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};

use anyhow::{Context, bail};
use tokio::sync::{mpsc, oneshot};

use crate::config::Config;
use crate::control::CaChoice;
use crate::control::{self, ControlSpec, LocalFileWatch, ProxyAddrs};
use crate::model::ConfigState;
use crate::sys;
use crate::snapshot::{LocalScope, Snapshot, SourceInfo};
use crate::tls::ca::LocalCa;
use crate::control::istio_ca::CaOptions;
use crate::net::ListenAddrs;
use crate::snapshot::publish as channel;
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
    let cfg = Arc::new(cfg);
    let scope = LocalScope::from_config(&cfg);
    if cfg.local_xds_path.is_none() && cfg.xds_address.is_none() {
        bail!("no config source: set LOCAL_XDS_PATH or XDS_ADDRESS");
    }
    let xds = cfg.xds_address.as_ref().map(|addr| xds_options(&cfg, addr)).transpose()?;
    let (local_file, initial) = match cfg.local_xds_path.clone() {
        Some(path) => {
            // Stamp before reading: a change racing the read is then seen by the watcher.
            let stamp = control::local::stamp(&path);
            let text =
                std::fs::read_to_string(&path).with_context(|| format!("reading LOCAL_XDS_PATH {}", path.display()))?;
            let state =
                control::local::parse(&text).with_context(|| format!("invalid config file {}", path.display()))?;
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
            (Some(LocalFileWatch { path, stamp, text, state }), initial)
        }
        None => {
            // Everything comes from istiod; readiness waits for its first answers.
            let source = SourceInfo { kind: "xds", location: cfg.xds_address.clone().unwrap_or_default() };
            (None, Arc::new(Snapshot::build(1, source, scope, ConfigState::default())))
        }
    };
    for w in &initial.warnings {
        tracing::warn!(generation = 1, "config: {w}");
    }

    match sys::raise_nofile_limit() {
        Ok(n) => tracing::debug!(limit = n, "open file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open file limit"),
    }
    let ca = match &cfg.ca_address {
        None => {
            let (ca, root) =
                LocalCa::from_config(&cfg.ca, &cfg.trust_domain, cfg.secret_ttl).context("starting the local CA")?;
            tracing::info!(root = %root, ttl = ?cfg.secret_ttl, "local CA ready");
            CaChoice::Local(Box::new(ca))
        }
        Some(address) => {
            tracing::info!(%address, ttl = ?cfg.secret_ttl, "certificates from the Istio CA");
            CaChoice::Istio(CaOptions {
                address: address.clone(),
                root_ca: read_pem(&cfg.ca_root_ca, "CA_ROOT_CA")?,
                alt_hostname: cfg.alt_xds_hostname.clone(),
                token_path: cfg.auth_token.clone(),
                cluster_id: cfg.cluster_id.clone(),
                ttl: cfg.secret_ttl,
            })
        }
    };
    let spoof_source = match cfg.enable_orig_src {
        Some(false) => false,
        Some(true) => {
            if !sys::can_spoof_source() {
                bail!("ENABLE_ORIG_SRC=true but IP_TRANSPARENT is not permitted (needs CAP_NET_ADMIN)");
            }
            true
        }
        None => sys::can_spoof_source(),
    };

    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let mut addrs = ListenAddrs {
        outbound: cfg.listeners.outbound,
        inbound_plain: cfg.listeners.inbound_plain,
        inbound: cfg.listeners.inbound,
        socks5: cfg.socks5.then_some(cfg.listeners.socks5),
    };
    let mut txs = Vec::new();
    let mut generations = Vec::new();
    let mut alive = Vec::new();
    let mut done_rxs = Vec::new();
    let mut workers = Vec::new();
    let mut driver = "";
    let (cert_tx, cert_rx) = mpsc::unbounded_channel();
    for id in 0..cfg.worker_threads {
        let (tx, rx) = channel::channel();
        let generation = Arc::new(AtomicU64::new(0));
        let running = Arc::new(AtomicBool::new(false));
        let (done_tx, done_rx) = oneshot::channel::<()>();
        let spec = WorkerSpec {
            id,
            cfg: cfg.clone(),
            addrs,
            initial: initial.clone(),
            rx,
            core: (!cores.is_empty()).then(|| cores[id % cores.len()]),
            spoof_source,
            generation: generation.clone(),
            alive: running.clone(),
            done: done_tx,
            cert_requests: cert_tx.clone(),
        };
        let (handle, ready) = worker::spawn(spec).context("spawning a worker thread")?;
        let bound = ready.recv().map_err(|_| anyhow::anyhow!("worker {id} died during start-up"))?;
        let bound = bound.with_context(|| format!("worker {id}"))?;
        // The first worker resolved any port 0; the others must share its ports.
        addrs = bound.addrs;
        driver = bound.driver;
        txs.push(tx);
        generations.push(generation);
        alive.push(running);
        done_rxs.push(done_rx);
        workers.push(handle);
    }
    tracing::info!(workers = cfg.worker_threads, driver, spoof_source, "workers started");

    let (shutdown_tx, shutdown_rx) = mpsc::unbounded_channel();
    let spec = ControlSpec {
        cfg: cfg.clone(),
        initial,
        workers: txs,
        worker_generations: generations,
        worker_alive: alive,
        worker_done: done_rxs,
        worker_addrs: addrs,
        driver,
        local_file,
        shutdown_rx,
        shutdown_tx: shutdown_tx.clone(),
        handle_signals: opts.handle_signals,
        ca,
        cert_requests: cert_rx,
        xds,
    };
    let (control, ready) = control::spawn(spec).context("spawning the control thread")?;
    let addrs = ready.recv().map_err(|_| anyhow::anyhow!("control thread died during start-up"))??;
    Ok(Proxy { addrs, shutdown: shutdown_tx, control, workers })
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
    })
}

/// PEM text given inline, or the file holding it; errors name the variable.
fn read_pem(value: &str, var: &str) -> anyhow::Result<Vec<u8>> {
    if value.contains("-----BEGIN") {
        Ok(value.as_bytes().to_vec())
    } else {
        std::fs::read(value).with_context(|| format!("reading {var} {value}"))
    }
}
