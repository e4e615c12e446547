//! The worker's table of open connections, and a one-shot local signal.
//!
//! The table is where drain and live re-authorization reach a connection: each entry has a close
//! signal and the reason it fired, so the connection's log says why it ended.
//!
//! Owned by one worker (`Rc`, `Cell`, `RefCell`; never shared across threads, no borrow held
//! across an await). Every proxied connection registers here for its whole life, so drain can
//! wait for the table to empty and then close what is left (and, with authorization, policy
//! changes can re-check each one).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// A one-shot broadcast within one thread: `fire` once, every `wait`er wakes.
///
/// Each waiting future owns one slot for its waker: re-polling replaces the waker in place and
/// dropping the future frees the slot, so the list stays as long as the number of live waiters
/// (an accept loop re-creates its waiter for every connection).
#[derive(Clone, Default)]
pub struct Signal(Rc<SignalInner>);

#[derive(Default)]
struct SignalInner {
    fired: Cell<bool>,
    wakers: RefCell<Vec<Option<Waker>>>,
}

impl Signal {
    pub fn fire(&self) {
        if !self.0.fired.replace(true) {
            let wakers = self.0.wakers.take();
            for w in wakers.into_iter().flatten() {
                w.wake();
            }
        }
    }

    pub fn fired(&self) -> bool {
        self.0.fired.get()
    }

    pub fn wait(&self) -> Wait {
        Wait { signal: self.0.clone(), slot: None }
    }

    #[cfg(test)]
    fn waiters(&self) -> usize {
        self.0.wakers.borrow().iter().filter(|w| w.is_some()).count()
    }
}

/// The future of [`Signal::wait`].
pub struct Wait {
    signal: Rc<SignalInner>,
    slot: Option<usize>,
}

impl Future for Wait {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.signal.fired.get() {
            return Poll::Ready(());
        }
        let mut wakers = self.signal.wakers.borrow_mut();
        match self.slot {
            Some(i) => match &mut wakers[i] {
                Some(w) => w.clone_from(cx.waker()),
                empty => *empty = Some(cx.waker().clone()),
            },
            None => {
                let i = match wakers.iter().position(Option::is_none) {
                    Some(i) => i,
                    None => {
                        wakers.push(None);
                        wakers.len() - 1
                    }
                };
                wakers[i] = Some(cx.waker().clone());
                drop(wakers);
                self.slot = Some(i);
            }
        }
        Poll::Pending
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            if let Some(w) = self.signal.wakers.borrow_mut().get_mut(i) {
                *w = None;
            }
        }
    }
}

/// The direction of a connection, for the drain log and the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
}

/// Why the proxy closed a connection before its peers did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The drain deadline passed with the connection still open.
    DrainDeadline,
    /// A new config's policies deny it.
    PolicyDenied,
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CloseReason::DrainDeadline => "closed by the proxy at the drain deadline",
            CloseReason::PolicyDenied => "closed by the proxy: the current authorization policies deny it",
        })
    }
}

struct Entry {
    close: Signal,
    /// Set just before `close` fires.
    reason: Cell<CloseReason>,
    direction: Direction,
    peer: SocketAddr,
    /// The pod (in-pod mode) whose listener accepted it; 0 for the node's own listeners.
    pod: u64,
    /// For a pod's connection once set up: the original and the actual destination, and how
    /// it travels (`config_dump`'s `workloadState`).
    dsts: Option<(Option<SocketAddr>, SocketAddr, &'static str)>,
    /// Set when the connection was authorized: what to re-check when policies change.
    authz: Option<Box<AuthzInfo>>,
}

/// What an authorized inbound connection was allowed as.
#[derive(Debug, Clone)]
pub struct AuthzInfo {
    pub conn: crate::rbac::Conn,
    /// The destination workload (its policies are looked up again in each new config).
    pub workload_uid: String,
}

#[derive(Default)]
pub struct ConnTable {
    next: Cell<u64>,
    entries: RefCell<HashMap<u64, Entry>>,
}

/// Removes its connection from the table when dropped (whatever way the task ends).
pub struct ConnGuard {
    table: Rc<ConnTable>,
    id: u64,
    close: Signal,
}

impl ConnGuard {
    /// Fires when the connection must be closed (drain deadline, or a policy now denying it).
    pub fn close_signal(&self) -> &Signal {
        &self.close
    }

    /// Why the close signal fired (meaningful once it has).
    pub fn close_reason(&self) -> CloseReason {
        self.table.entries.borrow().get(&self.id).map(|e| e.reason.get()).unwrap_or(CloseReason::DrainDeadline)
    }

    /// Records what the connection was authorized as, for re-checks when policies change. Call
    /// it in the same synchronous step as the decision, so no config can slip in between.
    pub fn set_authz(&self, info: AuthzInfo) {
        if let Some(e) = self.table.entries.borrow_mut().get_mut(&self.id) {
            e.authz = Some(Box::new(info));
        }
    }

    /// Records where a pod's connection goes (nothing is kept for the node's own).
    pub fn set_destination(&self, original: Option<SocketAddr>, actual: SocketAddr, protocol: &'static str) {
        if let Some(e) = self.table.entries.borrow_mut().get_mut(&self.id).filter(|e| e.pod != 0) {
            e.dsts = Some((original, actual, protocol));
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.table.entries.borrow_mut().remove(&self.id);
    }
}

impl ConnTable {
    /// Registers a connection accepted from `peer`, by pod `pod`'s listener (0: the node's).
    pub fn register(self: &Rc<Self>, direction: Direction, peer: SocketAddr, pod: u64) -> ConnGuard {
        let id = self.next.get();
        self.next.set(id + 1);
        let close = Signal::default();
        let reason = Cell::new(CloseReason::DrainDeadline);
        let entry = Entry { close: close.clone(), reason, direction, peer, pod, dsts: None, authz: None };
        self.entries.borrow_mut().insert(id, entry);
        ConnGuard { table: self.clone(), id, close }
    }

    pub fn len(&self) -> usize {
        self.entries.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.borrow().is_empty()
    }

    /// Up to `n` open connections as `direction peer`, for the log line of a drain that had to
    /// close them.
    pub fn describe(&self, n: usize) -> String {
        let entries = self.entries.borrow();
        let mut out: Vec<String> =
            entries.values().take(n).map(|e| format!("{:?} {}", e.direction, e.peer).to_lowercase()).collect();
        if entries.len() > n {
            out.push(format!("and {} more", entries.len() - n));
        }
        out.join(", ")
    }

    /// Re-checks every authorized connection against `snap` and closes the ones it now denies.
    /// Returns how many were closed.
    pub fn reauthorize(&self, snap: &crate::snapshot::Snapshot) -> usize {
        let denied: Vec<Signal> = self
            .entries
            .borrow()
            .values()
            .filter(|e| !e.close.fired())
            .filter_map(|e| {
                let info = e.authz.as_ref()?;
                // A destination workload that is gone denies: its address may already be
                // another pod's.
                if let Some(wl) = snap.workload_by_uid(&info.workload_uid) {
                    super::authz::check(snap, wl, &info.conn, "re-check after a config change").err()?;
                }
                e.reason.set(CloseReason::PolicyDenied);
                Some(e.close.clone())
            })
            .collect();
        for s in &denied {
            s.fire();
        }
        denied.len()
    }

    /// Open connections of pod `pod`.
    pub fn count_pod(&self, pod: u64) -> usize {
        self.entries.borrow().values().filter(|e| e.pod == pod).count()
    }

    /// Every pod's open connections, for `config_dump`.
    pub fn pod_connections(&self) -> Vec<crate::inpod::PodConnection> {
        self.entries
            .borrow()
            .values()
            // Set up ones only (an HBONE connection's entry is not one: its streams are).
            .filter(|e| e.pod != 0 && e.dsts.is_some())
            .map(|e| crate::inpod::PodConnection {
                pod: e.pod,
                inbound: e.direction == Direction::Inbound,
                src: e.peer,
                original_dst: e.dsts.and_then(|d| d.0),
                actual_dst: e.dsts.map(|d| d.1),
                protocol: e.dsts.map(|d| d.2).unwrap_or("TCP"),
            })
            .collect()
    }

    /// Asks pod `pod`'s open connections to close now, for `reason`.
    pub fn close_pod(&self, pod: u64, reason: CloseReason) {
        self.close_where(reason, |e| e.pod == pod)
    }

    /// Asks every open connection to close now, for `reason`.
    pub fn close_all(&self, reason: CloseReason) {
        self.close_where(reason, |_| true)
    }

    fn close_where(&self, reason: CloseReason, which: impl Fn(&Entry) -> bool) {
        let signals: Vec<Signal> = self
            .entries
            .borrow()
            .values()
            .filter(|e| !e.close.fired() && which(e))
            .map(|e| {
                e.reason.set(reason);
                e.close.clone()
            })
            .collect();
        for s in signals {
            s.fire();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_waiters_reuse_slots_and_all_wake() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        struct Count(AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let sig = Signal::default();
        // A waiter polled many times holds one slot.
        let mut a = Box::pin(sig.wait());
        for _ in 0..100 {
            assert!(a.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(sig.waiters(), 1);
        // Waiters created and dropped in a loop (an accept loop) do not accumulate.
        for _ in 0..100 {
            let mut b = Box::pin(sig.wait());
            assert!(b.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(sig.waiters(), 1);
        let mut c = Box::pin(sig.wait());
        assert!(c.as_mut().poll(&mut cx).is_pending());
        sig.fire();
        assert_eq!(count.0.load(Ordering::SeqCst), 2, "both live waiters woken once");
        assert!(a.as_mut().poll(&mut cx).is_ready() && c.as_mut().poll(&mut cx).is_ready());
        assert!(Box::pin(sig.wait()).as_mut().poll(&mut cx).is_ready(), "waiting after fire is immediate");
    }

    #[test]
    fn table_tracks_and_closes() {
        let t = Rc::new(ConnTable::default());
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let a = t.register(Direction::Outbound, peer, 0);
        let b = t.register(Direction::Inbound, peer, 7);
        assert_eq!(t.len(), 2);
        assert_eq!(t.count_pod(7), 1);
        t.close_pod(7, CloseReason::DrainDeadline);
        assert!(!a.close_signal().fired() && b.close_signal().fired(), "only the pod's connection");
        t.close_all(CloseReason::DrainDeadline);
        assert!(a.close_signal().fired() && b.close_signal().fired());
        assert_eq!(a.close_reason(), CloseReason::DrainDeadline);
        drop(a);
        assert_eq!(t.len(), 1);
        drop(b);
        assert!(t.is_empty());
    }
}
