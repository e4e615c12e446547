//! In-pod mode on the control thread: the ZDS client (connect, hello, one request then one ack,
//! reconnect with backoff) and the pods it hands over. Each pod is started by asking every
//! worker to bind its listeners in the pod's namespace; the `Add` is acknowledged only once all
//! have, and NACKed with the reason otherwise (the pod is then retried every 5 s). Readiness
//! holds until the agent's snapshot is processed with no pod pending, and while disconnected.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::{Notify, oneshot};

use super::ControlState;
use crate::config::Config;
use crate::inpod::zds::{Request, ZdsConn, ZdsError};
use crate::inpod::{PodConnection, PodInfo, PodSpec};
use crate::model::Identity;
use crate::snapshot::publish::{WorkerMsg, WorkerTx};
use crate::sys::NetNs;

/// How long the workers get to bind a pod's listeners (the agent waits 5 s for the ack).
const START_TIMEOUT: Duration = Duration::from_secs(4);
/// How often pods whose proxy could not start are tried again (as Istio's ztunnel does).
const RETRY_EVERY: Duration = Duration::from_secs(5);
const BACKOFF_FIRST: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(15);

struct PodEntry {
    spec: Arc<PodSpec>,
    /// Every worker has its listeners bound.
    up: bool,
    /// Why the last start failed (a pending pod).
    error: Option<String>,
    /// Added or kept since the current ZDS connection began.
    seen: bool,
}

/// The pods this proxy serves, by Kubernetes uid.
pub struct PodManager {
    cfg: Arc<Config>,
    workers: Vec<WorkerTx>,
    pods: RefCell<BTreeMap<String, PodEntry>>,
    next_id: Cell<u64>,
    connected: Cell<bool>,
    snapshot_done: Cell<bool>,
    started_total: Cell<u64>,
    stopped_total: Cell<u64>,
    stop: Notify,
    stopping: Cell<bool>,
}

/// How a request went: the ack's error text, and whether the connection must end.
struct Outcome {
    error: Option<String>,
    fatal: bool,
}

impl Outcome {
    fn ok() -> Outcome {
        Outcome { error: None, fatal: false }
    }
    fn nack(e: String) -> Outcome {
        Outcome { error: Some(e), fatal: false }
    }
    fn protocol_error(e: String) -> Outcome {
        Outcome { error: Some(e), fatal: true }
    }
}

impl PodManager {
    pub fn new(cfg: Arc<Config>, workers: Vec<WorkerTx>) -> PodManager {
        PodManager {
            cfg,
            workers,
            pods: RefCell::default(),
            next_id: Cell::new(1),
            connected: Cell::new(false),
            snapshot_done: Cell::new(false),
            started_total: Cell::new(0),
            stopped_total: Cell::new(0),
            stop: Notify::new(),
            stopping: Cell::new(false),
        }
    }

    /// Why the proxy is not ready on account of its pods, if it is not.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.connected.get() {
            return Err(format!("not connected to the node agent at {}", self.cfg.inpod_uds.display()));
        }
        if !self.snapshot_done.get() {
            return Err("waiting for the node agent's snapshot".into());
        }
        let pending: Vec<String> =
            self.pods.borrow().iter().filter(|(_, e)| !e.up).map(|(uid, _)| uid.clone()).collect();
        if pending.is_empty() { Ok(()) } else { Err(format!("pods pending: {}", pending.join(", "))) }
    }

    /// The identities of every pod handed over: their certificates are fetched from the start.
    pub fn identities(&self) -> BTreeSet<Identity> {
        self.pods
            .borrow()
            .values()
            .map(|e| Identity {
                trust_domain: self.cfg.trust_domain.clone(),
                namespace: e.spec.info.namespace.clone(),
                service_account: e.spec.info.service_account.clone(),
            })
            .collect()
    }

    /// Stops the ZDS client (the proxy is draining; the workers drain every pod themselves).
    pub fn shutdown(&self) {
        self.stopping.set(true);
        self.stop.notify_waiters();
    }

    fn new_spec(&self, uid: String, info: PodInfo, netns: Arc<NetNs>) -> Arc<PodSpec> {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        Arc::new(PodSpec { id, uid, info, netns })
    }

    async fn add(&self, uid: String, info: PodInfo, netns: NetNs) -> Outcome {
        let existing = self.pods.borrow_mut().get_mut(&uid).map(|e| {
            e.seen = true;
            (e.spec.netns.id() == netns.id(), e.up)
        });
        match existing {
            // The same pod in the same namespace: nothing to do, or a pending one to try again.
            Some((true, true)) => return Outcome::ok(),
            Some((true, false)) => return self.retry(&uid).await,
            Some((false, _)) => {
                tracing::info!(%uid, "pod handed over again with a different network namespace; replacing its proxy");
                self.remove(&uid, Instant::now());
            }
            None => {}
        }
        tracing::info!(%uid, name = %info.name, namespace = %info.namespace, netns = netns.inode(), "pod added");
        let spec = self.new_spec(uid.clone(), info, Arc::new(netns));
        self.pods.borrow_mut().insert(uid.clone(), PodEntry { spec: spec.clone(), up: false, error: None, seen: true });
        self.start(&uid, spec).await
    }

    /// Starts a pending pod again, under a new id (the failed attempt's leftovers drain apart).
    async fn retry(&self, uid: &str) -> Outcome {
        let spec = {
            let pods = self.pods.borrow();
            let Some(e) = pods.get(uid).filter(|e| !e.up) else { return Outcome::ok() };
            self.new_spec(uid.to_string(), e.spec.info.clone(), e.spec.netns.clone())
        };
        if let Some(e) = self.pods.borrow_mut().get_mut(uid) {
            e.spec = spec.clone();
        }
        self.start(uid, spec).await
    }

    /// Has every worker bind the pod's listeners; on any failure, undoes the rest.
    async fn start(&self, uid: &str, spec: Arc<PodSpec>) -> Outcome {
        let started = Instant::now();
        let mut replies = Vec::with_capacity(self.workers.len());
        for w in &self.workers {
            let (tx, rx) = oneshot::channel();
            w.send(WorkerMsg::AddPod { pod: spec.clone(), reply: tx });
            replies.push(rx);
        }
        let mut errors = Vec::new();
        for (i, rx) in replies.into_iter().enumerate() {
            match tokio::time::timeout(START_TIMEOUT, rx).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => errors.push(format!("worker {i}: {e}")),
                Ok(Err(_)) => errors.push(format!("worker {i} has stopped")),
                Err(_) => errors.push(format!("worker {i} did not answer within {START_TIMEOUT:?}")),
            }
        }
        let mut pods = self.pods.borrow_mut();
        let Some(entry) = pods.get_mut(uid).filter(|e| e.spec.id == spec.id) else { return Outcome::ok() };
        if errors.is_empty() {
            entry.up = true;
            entry.error = None;
            self.started_total.set(self.started_total.get() + 1);
            tracing::info!(%uid, workers = self.workers.len(), took = ?started.elapsed(), "pod proxy started");
            return Outcome::ok();
        }
        let reason = format!("failure to start proxy: {}", errors.join("; "));
        tracing::warn!(%uid, "{reason}; retrying every {RETRY_EVERY:?}");
        entry.error = Some(reason.clone());
        drop(pods);
        for w in &self.workers {
            w.send(WorkerMsg::DrainPod { id: spec.id, deadline: Instant::now() });
        }
        Outcome::nack(reason)
    }

    /// Stops serving `uid`: its listeners now, its connections by `deadline`.
    fn remove(&self, uid: &str, deadline: Instant) -> bool {
        let Some(entry) = self.pods.borrow_mut().remove(uid) else { return false };
        for w in &self.workers {
            w.send(WorkerMsg::DrainPod { id: entry.spec.id, deadline });
        }
        if entry.up {
            self.stopped_total.set(self.stopped_total.get() + 1);
        }
        true
    }

    async fn handle(&self, req: Request) -> Outcome {
        match req {
            Request::Add { uid, info, netns } => self.add(uid, info, netns).await,
            Request::Keep { uid } => {
                if self.snapshot_done.get() {
                    return Outcome::protocol_error(format!("Keep for {uid:?} after SnapshotSent"));
                }
                match self.pods.borrow_mut().get_mut(&uid) {
                    Some(e) => e.seen = true,
                    None => tracing::warn!(%uid, "Keep for a pod this proxy does not serve; nothing to keep"),
                }
                Outcome::ok()
            }
            Request::Del { uid } => {
                if self.remove(&uid, Instant::now() + self.cfg.termination_deadline) {
                    tracing::info!(%uid, "pod deleted; draining its proxy");
                }
                Outcome::ok()
            }
            Request::SnapshotSent => {
                if self.snapshot_done.replace(true) {
                    return Outcome::protocol_error("a second SnapshotSent".into());
                }
                let stale: Vec<String> =
                    self.pods.borrow().iter().filter(|(_, e)| !e.seen).map(|(uid, _)| uid.clone()).collect();
                for uid in &stale {
                    tracing::info!(%uid, "pod missing from the node agent's snapshot; draining its proxy");
                    self.remove(uid, Instant::now() + self.cfg.termination_deadline);
                }
                tracing::info!(pods = self.pods.borrow().len(), drained = stale.len(), "node agent snapshot processed");
                if !stale.is_empty() {
                    // A pod's listeners, tasks and tables are freed by now or soon: hand the
                    // heap back rather than keep the high-water mark of a busier node.
                    crate::sys::release_free_memory();
                }
                Outcome::ok()
            }
        }
    }

    /// Pods whose start failed get another go.
    async fn retry_pending(&self) {
        let pending: Vec<String> =
            self.pods.borrow().iter().filter(|(_, e)| !e.up).map(|(uid, _)| uid.clone()).collect();
        for uid in pending {
            self.retry(&uid).await;
        }
    }

    fn connection_began(&self) {
        self.connected.set(true);
        self.snapshot_done.set(false);
        for e in self.pods.borrow_mut().values_mut() {
            e.seen = false;
        }
    }

    /// `config_dump`'s `workloadState`: each pod's state, who it is, and (once up) its open
    /// connections as the workers report them.
    pub async fn dump(&self) -> serde_json::Value {
        let mut replies = Vec::new();
        for w in &self.workers {
            let (tx, rx) = oneshot::channel();
            w.send(WorkerMsg::PodConnections(tx));
            replies.push(rx);
        }
        let mut conns: Vec<PodConnection> = Vec::new();
        for rx in replies {
            if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_secs(1), rx).await {
                conns.extend(c);
            }
        }
        let pods = self.pods.borrow();
        let mut out = serde_json::Map::new();
        for (uid, e) in pods.iter() {
            let mut pod = json!({
                "state": if e.up { "Up" } else { "Pending" },
                "info": &e.spec.info,
            });
            if e.up {
                let (inbound, outbound): (Vec<&PodConnection>, Vec<&PodConnection>) =
                    conns.iter().filter(|c| c.pod == e.spec.id).partition(|c| c.inbound);
                pod["connections"] = json!({ "inbound": inbound, "outbound": outbound });
            } else if let Some(err) = &e.error {
                pod["error"] = json!(err);
            }
            out.insert(uid.clone(), pod);
        }
        serde_json::Value::Object(out)
    }

    /// The `workload_manager_*` families, as Istio's ztunnel names them.
    pub fn render_metrics(&self, out: &mut String, openmetrics: bool) {
        use std::fmt::Write;
        let pods = self.pods.borrow();
        let active = pods.values().filter(|e| e.up).count();
        let pending = pods.len() - active;
        for (name, help, value) in [
            ("workload_manager_active_proxy_count", "The total number current workloads with active proxies", active),
            (
                "workload_manager_pending_proxy_count",
                "The total number current workloads with pending proxies",
                pending,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help} (unstable).\n# TYPE {name} gauge\n{name} {value}");
        }
        for (name, help, value) in [
            (
                "workload_manager_proxies_started",
                "The total number of proxies that were started",
                self.started_total.get(),
            ),
            (
                "workload_manager_proxies_stopped",
                "The total number of proxies that were stopped",
                self.stopped_total.get(),
            ),
        ] {
            let family = if openmetrics { name.to_string() } else { format!("{name}_total") };
            let _ = writeln!(out, "# HELP {family} {help} (unstable).\n# TYPE {family} counter\n{name}_total {value}");
        }
    }
}

/// The ZDS client: connects (retrying from 10 ms, doubling to 15 s), then serves the agent's
/// requests one at a time until the connection ends, and starts over; stops on shutdown.
pub(super) async fn run(state: Rc<ControlState>, mgr: Rc<PodManager>) {
    let path = state.cfg.inpod_uds.clone();
    let mut backoff = BACKOFF_FIRST;
    let mut failures = 0u32;
    while !mgr.stopping.get() {
        let conn = tokio::select! {
            c = ZdsConn::connect(&path) => c,
            _ = mgr.stop.notified() => break,
        };
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                failures += 1;
                // The first failure and then every tenth: the agent may simply not be up yet.
                if failures == 1 || failures % 10 == 0 {
                    tracing::warn!(path = %path.display(), error = %e, failures, "cannot reach the node agent (istio-cni); retrying");
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = mgr.stop.notified() => break,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        failures = 0;
        tracing::info!(path = %path.display(), "connected to the node agent");
        mgr.connection_began();
        let end = serve(&state, &mgr, &conn).await;
        mgr.connected.set(false);
        match end {
            None => break,
            Some(e) => tracing::warn!(error = %e, "node agent connection ended; reconnecting"),
        }
        // A connection that got through a snapshot was healthy: start the backoff over. One
        // that failed before keeps backing off (an agent that rejects us must not be hammered).
        if mgr.snapshot_done.get() {
            backoff = BACKOFF_FIRST;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = mgr.stop.notified() => break,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
    mgr.connected.set(false);
}

/// Serves one connection; returns why it ended (`None`: shutdown).
async fn serve(state: &ControlState, mgr: &PodManager, conn: &ZdsConn) -> Option<ZdsError> {
    let mut retry = tokio::time::interval(RETRY_EVERY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    retry.tick().await;
    loop {
        if mgr.stopping.get() {
            return None;
        }
        let received = tokio::select! {
            r = conn.recv() => r,
            _ = retry.tick() => {
                mgr.retry_pending().await;
                state.track_identities();
                continue;
            }
            _ = mgr.stop.notified() => return None,
        };
        let outcome = match received {
            Ok(req) => mgr.handle(req).await,
            // One Add's bad namespace fails that Add; the connection goes on.
            Err(e) if !e.is_fatal() => Outcome::nack(format!("failure to process message: {e}")),
            Err(e @ (ZdsError::Closed | ZdsError::Io(_))) => return Some(e),
            Err(e) => Outcome::protocol_error(format!("failure to process message: {e}")),
        };
        if let Some(err) = &outcome.error {
            tracing::warn!("node agent request failed: {err}");
        }
        let acked = conn.ack(outcome.error.as_deref()).await;
        // After the ack: the agent waits for nothing the certificate manager does.
        state.track_identities();
        if let Err(e) = acked {
            return Some(ZdsError::Io(e));
        }
        if outcome.fatal {
            return Some(ZdsError::Io(std::io::Error::other(outcome.error.unwrap_or_default())));
        }
    }
}
