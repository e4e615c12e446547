//! A worker's share of in-pod mode: for every pod the node agent handed over, this worker's own
//! `SO_REUSEPORT` listeners inside the pod's network namespace (15001, 15006, 15008, 15080 when
//! SOCKS5 is on, and the DNS proxy's UDP and TCP 15053 on both loopback addresses), so the kernel spreads the pod's connections over the workers like the
//! node's. Sockets are created in the pod's namespace by entering it on this thread and coming
//! straight back (`sys::in_netns`); once made, a socket stays in its namespace wherever it is
//! used, so the worker's io_uring serves every pod without further switching.
//!
//! A pod's connections carry its id in the connection table: the pod drains alone (its
//! listeners stop, its connections get until the deadline), and `config_dump` lists them.

use std::cell::RefCell;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use monoio::net::TcpListener;

use super::accept::{Listener, accept_loop};
use super::conns::{CloseReason, Signal};
use super::error::ProxyError;
use super::{LocalSnapshot, WorkerCtx};
use crate::inpod::{PodConnection, PodSpec};
use crate::model::Workload;
use crate::net::{AcceptedOpts, DialOpts, InNetns, ListenOpts, bind_std};
use crate::snapshot::Snapshot;
use crate::sys;

/// How long a pod's connection waits for the pod's workload to appear in the config (Istio's
/// ztunnel waits as long).
pub const WORKLOAD_WAIT: Duration = Duration::from_secs(5);

/// The fixed ports of a pod's listeners, inside its namespace.
pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PLAIN_PORT: u16 = 15006;
pub const INBOUND_PORT: u16 = 15008;
pub const SOCKS5_PORT: u16 = 15080;

/// One pod as this worker serves it.
pub struct PodNet {
    pub spec: Arc<PodSpec>,
    /// Fired when the pod drains (deleted, replaced, or the proxy stops).
    pub draining: Signal,
    listener_fds: RefCell<Vec<RawFd>>,
    /// The uid of the config's workload this pod turned out to be, once found.
    matched: RefCell<Option<String>>,
    /// The search domains whose stripping the DNS proxy tries for this pod (its namespace's).
    dns_search: std::cell::OnceCell<Vec<String>>,
}

impl PodNet {
    pub fn id(&self) -> u64 {
        self.spec.id
    }

    /// `<ns>.svc.<domain>`, `svc.<domain>`, `<domain>` for the pod's namespace, made once.
    pub fn dns_search(&self, cluster_domain: &str) -> &[String] {
        self.dns_search.get_or_init(|| crate::dns::names::pod_search(&self.spec.info.namespace, cluster_domain))
    }

    /// The config's workload for this pod: the workload with the pod's uid, else the one on
    /// this node with its name, namespace and service account (how Istio's ztunnel matches).
    pub fn workload<'s>(&self, snap: &'s Snapshot) -> Option<&'s Arc<Workload>> {
        if let Some(uid) = self.matched.borrow().as_deref() {
            if let Some(wl) = snap.workload_by_uid(uid).filter(|w| self.is(w) && snap.scope.contains(w)) {
                return Some(wl);
            }
        }
        let found = snap
            .workload_by_uid(&self.spec.uid)
            .filter(|w| snap.scope.contains(w))
            .or_else(|| snap.workloads().find(|w| self.is(w) && snap.scope.contains(w)))?;
        *self.matched.borrow_mut() = Some(found.uid.clone());
        Some(found)
    }

    fn is(&self, wl: &Workload) -> bool {
        let info = &self.spec.info;
        wl.uid == self.spec.uid
            || (wl.name == info.name && wl.namespace == info.namespace && wl.service_account == info.service_account)
    }

    fn stop_listening(&self, worker: usize) {
        self.draining.fire();
        for fd in self.listener_fds.take() {
            if let Err(e) = sys::stop_listening(fd) {
                tracing::debug!(worker, error = %e, "stopping a pod listener");
            }
        }
    }
}

impl WorkerCtx {
    /// Where a socket for `pod`'s traffic is made: inside the pod's namespace.
    pub fn netns_of<'a>(&'a self, pod: Option<&'a PodNet>) -> Option<InNetns<'a>> {
        let pod = pod?;
        Some(InNetns { pod: &pod.spec.netns, home: self.home_netns.as_ref()? })
    }

    /// The options of an upstream socket for `pod`'s traffic (or the node's, for `None`): made in
    /// its namespace, with the packet mark, the connect timeout and `TCP_USER_TIMEOUT`.
    pub fn dial_opts<'a>(&'a self, pod: Option<&'a PodNet>, spoof_source: Option<std::net::IpAddr>) -> DialOpts<'a> {
        DialOpts {
            netns: self.netns_of(pod),
            mark: self.cfg.packet_mark,
            spoof_source,
            timeout: self.cfg.connect_timeout,
            user_timeout: self.cfg.tcp_user_timeout,
        }
    }

    /// The snapshot that knows `pod`'s workload: the current one, or the first within
    /// [`WORKLOAD_WAIT`] that does.
    pub async fn pod_snapshot(&self, pod: &PodNet) -> Result<LocalSnapshot, ProxyError> {
        let snap = self.snapshot();
        if pod.workload(&snap).is_some() {
            return Ok(snap);
        }
        let wait = async {
            loop {
                let next = self.snapshot_waiters.borrow().clone();
                next.wait().await;
                let snap = self.snapshot();
                if pod.workload(&snap).is_some() {
                    return snap;
                }
            }
        };
        let name = || format!("{}/{}", pod.spec.info.namespace, pod.spec.info.name);
        match monoio::time::timeout(WORKLOAD_WAIT, wait).await {
            Ok(s) => Ok(s),
            Err(_) => {
                tracing::warn!(uid = %pod.spec.uid, "timed out waiting for workload {} from the config source", name());
                Err(ProxyError::PodWorkloadMissing(name()))
            }
        }
    }
}

/// Binds this worker's listeners for `spec` inside its namespace and starts accepting. Binding
/// twice is a no-op (the id is already served).
pub fn add_pod(ctx: &Rc<WorkerCtx>, spec: Arc<PodSpec>) -> Result<(), String> {
    if ctx.draining.fired() {
        return Err("the proxy is draining".into());
    }
    if ctx.pods.borrow().contains_key(&spec.id) {
        return Ok(());
    }
    let home = ctx.home_netns.as_ref().ok_or("in-pod mode is off on this worker")?;
    let (socks5, dns) = (ctx.cfg.socks5, ctx.cfg.dns_capture);
    let accepted = AcceptedOpts { user_timeout: ctx.cfg.tcp_user_timeout, incoming_cpu: ctx.core };
    // Every socket made for a pod carries the packet mark, its listening and DNS sockets too, as
    // Istio's ztunnel marks all of them. istio-cni's rules are written for it: a marked packet
    // entering the pod (the proxy's side of an app's connection, over loopback) gives that
    // connection the connmark 0x111, and the app's own packets on it then carry mark 0x111,
    // which the pod's policy routing sends to its loopback table. Measured (`perf inpod`, 3
    // repetitions): a round trip from a pod took 44 instead of 62 to 70 us of the proxy's CPU,
    // and 113 instead of 134 to 147 us median.
    let mark = ctx.cfg.packet_mark;
    let (listeners, dns_sockets) = sys::in_netns(&spec.netns, home, || -> io::Result<_> {
        let listeners = bind_pod_listeners(socks5, accepted, mark, ctx.id == 0)?;
        let dns_sockets =
            if dns { crate::dns::server::bind(&crate::dns::server::pod_addrs(), ctx.core, mark)? } else { Vec::new() };
        Ok((listeners, dns_sockets))
    })
    .and_then(|r| r)
    .map_err(|e| format!("binding the pod's listeners in its network namespace: {e}"))?;
    let listeners = listeners
        .into_iter()
        .map(|(kind, l)| TcpListener::from_std(l).map(|l| (kind, l)))
        .collect::<io::Result<Vec<_>>>()
        .map_err(|e| format!("registering the pod's listeners: {e}"))?;
    let pod = Rc::new(PodNet {
        listener_fds: RefCell::new(listeners.iter().map(|(_, l)| l.as_raw_fd()).collect()),
        spec,
        draining: Signal::default(),
        matched: RefCell::new(None),
        dns_search: std::cell::OnceCell::new(),
    });
    for (kind, listener) in listeners {
        ctx.accepting.set(ctx.accepting.get() + 1);
        monoio::spawn(accept_loop(ctx.clone(), kind, listener, Some(pod.clone())));
    }
    // The pod's DNS proxy (istio-cni sends its port 53 to 15053).
    let dns_fds = crate::dns::server::start(ctx, dns_sockets, Some(pod.clone())).map_err(|e| {
        pod.stop_listening(ctx.id);
        format!("starting the pod's DNS proxy: {e}")
    })?;
    pod.listener_fds.borrow_mut().extend(dns_fds);
    tracing::debug!(worker = ctx.id, uid = %pod.spec.uid, id = pod.id(), "pod listeners bound");
    ctx.pods.borrow_mut().insert(pod.id(), pod);
    Ok(())
}

/// The pod's listeners, made in the pod's namespace (the calling thread is in it).
fn bind_pod_listeners(
    socks5: bool,
    accepted: AcceptedOpts,
    mark: Option<u32>,
    set_sysctls: bool,
) -> io::Result<Vec<(Listener, std::net::TcpListener)>> {
    // Queued connections move to a replacement proxy's listener when this one stops, instead
    // of being reset (per namespace, so one worker sets it for all; best effort: a read-only
    // /proc/sys just loses that).
    if set_sysctls {
        if let Err(e) = sys::enable_migrate_req() {
            tracing::debug!(error = %e, "could not set net.ipv4.tcp_migrate_req in the pod");
        }
    }
    let opts = ListenOpts { transparent: false, backlog: 1024, accepted: Some(accepted), mark };
    let (local, from_network) = super::spawn::steered(opts);
    let any = |port, opts| -> io::Result<std::net::TcpListener> {
        // Dual-stack where the pod has IPv6, IPv4 only where it has not.
        bind_std(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port), opts)
            .or_else(|_| bind_std(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port), opts))
    };
    let mut out = vec![
        (Listener::Outbound, any(OUTBOUND_PORT, local)?),
        (Listener::InboundPlain, any(INBOUND_PLAIN_PORT, from_network)?),
        (Listener::InboundHbone, any(INBOUND_PORT, from_network)?),
    ];
    if socks5 {
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), SOCKS5_PORT);
        out.push((Listener::Socks5, bind_std(addr, local)?));
    }
    Ok(out)
}

/// Stops serving pod `id`: its listeners stop now; its open connections may finish until
/// `deadline`, then the rest are closed. Its pooled HBONE connections are closed once idle.
pub fn drain_pod(ctx: &Rc<WorkerCtx>, id: u64, deadline: Instant) {
    let Some(pod) = ctx.pods.borrow_mut().remove(&id) else { return };
    pod.stop_listening(ctx.id);
    ctx.pool.retire_where(|k| k.pod == id);
    let ctx = ctx.clone();
    monoio::spawn(async move {
        while ctx.conns.count_pod(id) > 0 {
            let now = Instant::now();
            if now >= deadline {
                tracing::info!(worker = ctx.id, uid = %pod.spec.uid, open = ctx.conns.count_pod(id), "pod drain deadline reached; closing its connections");
                ctx.conns.close_pod(id, CloseReason::DrainDeadline);
                break;
            }
            monoio::time::sleep((deadline - now).min(Duration::from_millis(20))).await;
        }
        tracing::debug!(worker = ctx.id, uid = %pod.spec.uid, id, "pod drained");
    });
}

/// Resolves when the worker drains, or pod `pod` does.
pub async fn draining(ctx: &WorkerCtx, pod: Option<&PodNet>) {
    match pod {
        Some(p) => monoio::select! {
            _ = ctx.draining.wait() => {},
            _ = p.draining.wait() => {},
        },
        None => ctx.draining.wait().await,
    }
}

/// Stops every pod's listeners (the whole worker drains).
pub fn stop_all(ctx: &WorkerCtx) {
    for pod in ctx.pods.borrow().values() {
        pod.stop_listening(ctx.id);
    }
}

/// This worker's open connections of every pod.
pub fn connections(ctx: &WorkerCtx) -> Vec<PodConnection> {
    ctx.conns.pod_connections()
}

/// The port a pod listener of `kind` has (for telling a redirected connection from a direct one).
pub fn listener_port(kind: Listener) -> u16 {
    match kind {
        Listener::Outbound => OUTBOUND_PORT,
        Listener::InboundPlain => INBOUND_PLAIN_PORT,
        Listener::InboundHbone => INBOUND_PORT,
        Listener::Socks5 => SOCKS5_PORT,
    }
}
