//! The per-core data plane: one OS thread per worker, pinned to a core, running its own monoio
//! runtime (io_uring, or epoll where io_uring is unavailable).
//!
//! A worker owns everything it touches: its `SO_REUSEPORT` listeners, its connection table, its
//! HBONE pool, its metrics shard, its current snapshot (an `Rc` around the control thread's
//! `Arc`, so taking it per connection is not atomic). Nothing here is `Send` and nothing takes a
//! lock; the only cross-thread input is the worker's message channel from the control thread.
//!
//! - `spawn`: the thread, its runtime, its listeners, control messages, drain;
//! - `accept`: the accept loop of each listener;
//! - `lifecycle`: one connection from registration to its access-log line, and the setup-then-
//!   relay task of connections that end in a TCP socket;
//! - `outbound`, `inbound_plain`, `socks5`: the setup of each kind of connection
//!   (inbound HBONE is `crate::hbone::server`);
//! - `conns`: the connection table (drain, live re-authorization); `authz`: the policy check.

mod accept;
pub mod authz;
pub mod conns;
pub mod error;
mod inbound_plain;
pub mod lifecycle;
mod outbound;
pub mod pods;
pub mod socks5;
mod spawn;

pub use spawn::{Bound, WorkerSpec, spawn};

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use monoio::net::TcpStream;

use crate::config::Config;
use crate::hbone::pool::HbonePool;
use crate::model::Identity;
use crate::net::{ListenAddrs, canonical};
use crate::snapshot::Snapshot;
use crate::telemetry::metrics::Shard;
use crate::tls::WorkloadCert;
use conns::{ConnTable, Signal};
use error::ProxyError;

/// The worker's handle on a snapshot. The extra `Rc` is the point: every worker shares the
/// control thread's `Arc`, so cloning it per connection would bounce one atomic counter between
/// cores; cloning the worker-local `Rc` is a plain increment.
#[allow(clippy::redundant_allocation)]
pub type LocalSnapshot = Rc<Arc<Snapshot>>;

/// State shared by the tasks of one worker.
pub struct WorkerCtx {
    pub id: usize,
    /// The CPU this worker is pinned to, if it is.
    pub core: Option<usize>,
    pub cfg: Arc<Config>,
    snapshot: RefCell<LocalSnapshot>,
    pub conns: Rc<ConnTable>,
    pub draining: Signal,
    /// Accept loops still running; drain waits for them to close their listeners.
    pub(crate) accepting: Cell<usize>,
    /// The listeners' descriptors, stopped when drain starts (`sys::stop_listening`).
    listener_fds: RefCell<Vec<std::os::fd::RawFd>>,
    /// The proxy's own listening addresses (bound and well-known): never a destination.
    pub own: crate::net::OwnAddrs,
    pub spoof_source: bool,
    /// This worker's bound listener addresses.
    pub addrs: ListenAddrs,
    /// Bulk relay directions switch to splice(2) (io_uring workers, unless disabled).
    pub splice: bool,
    /// Outbound HBONE connections shared by this worker's streams.
    pub pool: HbonePool,
    cert_requests: tokio::sync::mpsc::UnboundedSender<Identity>,
    /// This worker's metrics shard.
    pub metrics: Rc<Shard>,
    /// Connections this worker accepted (`ztunnel_worker_connections_accepted_total`).
    pub accepted: Cell<u64>,
    /// Inbound HBONE TLS handshakes in progress (bounded by `hbone::server::MAX_HANDSHAKES`).
    pub handshakes: Cell<usize>,
    /// Fires when the next snapshot is applied (an on-demand certificate arriving); replaced by
    /// a fresh one each time. Each waiter holds one slot, freed when it stops waiting.
    snapshot_waiters: RefCell<Signal>,
    /// In-pod mode: the pods this worker serves, by id.
    pods: RefCell<std::collections::HashMap<u64, Rc<pods::PodNet>>>,
    /// In-pod mode: the namespace this thread runs in, returned to after making a pod's socket.
    home_netns: Option<crate::sys::NetNs>,
    /// The upstream resolvers of the DNS proxy.
    pub dns: Arc<crate::dns::resolv::Resolvers>,
    /// Forwarded DNS queries in flight, and DNS TCP clients, on this worker (both bounded).
    pub(crate) dns_in_flight: Cell<usize>,
    pub(crate) dns_tcp_clients: Cell<usize>,
    /// The one buffer every DNS UDP server of this worker reads into.
    pub(crate) dns_buf: RefCell<Vec<u8>>,
    /// Forwarded DNS answers by (name, type), with when they were stored and when they expire.
    #[allow(clippy::type_complexity)]
    pub(crate) dns_cache: RefCell<
        std::collections::HashMap<(String, u16), (hickory_proto::op::Message, std::time::Instant, std::time::Instant)>,
    >,
}

impl WorkerCtx {
    /// Replaces the snapshot and wakes whoever waits for one.
    fn apply(&self, snap: Arc<Snapshot>) {
        *self.snapshot.borrow_mut() = Rc::new(snap);
        self.snapshot_waiters.replace(Signal::default()).fire();
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
                let next = self.snapshot_waiters.borrow().clone();
                next.wait().await;
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
}

/// Connection tasks that panicked, over all workers (`ztunnel_task_panics_total`).
pub static TASK_PANICS: AtomicU64 = AtomicU64::new(0);

/// Runs one connection's task so that a panic inside it (ours or a dependency's) ends that task
/// only. monoio does not catch panics: without this one would unwind through the worker's
/// runtime and take every listener and connection of the worker with it. What the task owned
/// is dropped while unwinding (its table entry, metric handles, sockets); the panic is logged
/// and counted, and the worker goes on.
pub fn contained<F: Future<Output = ()>>(worker: usize, task: &'static str, fut: F) -> Contained<F> {
    Contained { fut, worker, task }
}

pin_project_lite::pin_project! {
    /// The future of [`contained`]: the task's own future, in place (an `async fn` wrapper
    /// would keep it twice, as its argument and as its pinned local, in every idle connection).
    pub struct Contained<F> {
        #[pin]
        fut: F,
        worker: usize,
        task: &'static str,
    }
}

impl<F: Future<Output = ()>> Future for Contained<F> {
    type Output = ();

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<()> {
        let this = self.project();
        let fut = this.fut;
        match std::panic::catch_unwind(AssertUnwindSafe(|| fut.poll(cx))) {
            Ok(poll) => poll,
            Err(payload) => {
                TASK_PANICS.fetch_add(1, Ordering::Relaxed);
                let message = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "(no message)".into());
                tracing::error!(worker = *this.worker, task = *this.task, panic = %message, "a connection task panicked; it is closed, the worker goes on");
                Poll::Ready(())
            }
        }
    }
}

/// The control listeners' addresses and the ones this worker listens on (the well-known ports
/// come with [`crate::net::OwnAddrs`] itself).
fn own_addrs(addrs: &ListenAddrs, control: &[SocketAddr]) -> crate::net::OwnAddrs {
    let data = [addrs.outbound, addrs.inbound_plain, addrs.inbound].into_iter().chain(addrs.socks5);
    crate::net::OwnAddrs::new(data.chain(control.iter().copied()))
}

/// The original destination of a connection accepted on the listener bound to `listener`.
fn original_dst(stream: &TcpStream, peer: SocketAddr, listener: SocketAddr) -> Result<SocketAddr, ProxyError> {
    let redirected = crate::sys::original_dst(stream, peer.is_ipv4()).map_err(ProxyError::OriginalDst)?;
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
