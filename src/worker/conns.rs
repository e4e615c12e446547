//! The worker's table of open connections, and a one-shot local signal.
//!
//! Owned by one worker (`Rc`, `Cell`, `RefCell`; never shared across threads, no borrow held
//! across an await). Every proxied connection registers here for its whole life, so drain can
//! wait for the table to empty and then close what is left (and, with authorization, policy
//! changes can re-check each one).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::rc::Rc;
use std::task::{Poll, Waker};

/// A one-shot broadcast within one thread: `fire` once, every `wait`er wakes.
#[derive(Clone, Default)]
pub struct Signal(Rc<SignalInner>);

#[derive(Default)]
struct SignalInner {
    fired: Cell<bool>,
    wakers: RefCell<Vec<Waker>>,
}

impl Signal {
    pub fn fire(&self) {
        if !self.0.fired.replace(true) {
            for w in self.0.wakers.take() {
                w.wake();
            }
        }
    }

    pub fn fired(&self) -> bool {
        self.0.fired.get()
    }

    pub async fn wait(&self) {
        poll_fn(|cx| {
            if self.0.fired.get() {
                return Poll::Ready(());
            }
            let mut wakers = self.0.wakers.borrow_mut();
            if !wakers.iter().any(|w| w.will_wake(cx.waker())) {
                wakers.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }
}

/// What the table knows of a connection (for logs, dumps and later re-authorization).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
}

struct Entry {
    close: Signal,
    #[allow(dead_code)] // read by re-authorization and dumps
    direction: Direction,
    #[allow(dead_code)]
    peer: SocketAddr,
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
    /// Fires when the connection must be closed (drain deadline, later: policy).
    pub fn close_signal(&self) -> &Signal {
        &self.close
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.table.entries.borrow_mut().remove(&self.id);
    }
}

impl ConnTable {
    pub fn register(self: &Rc<Self>, direction: Direction, peer: SocketAddr) -> ConnGuard {
        let id = self.next.get();
        self.next.set(id + 1);
        let close = Signal::default();
        self.entries.borrow_mut().insert(id, Entry { close: close.clone(), direction, peer });
        ConnGuard { table: self.clone(), id, close }
    }

    pub fn len(&self) -> usize {
        self.entries.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.borrow().is_empty()
    }

    /// Asks every open connection to close now.
    pub fn close_all(&self) {
        let signals: Vec<Signal> = self.entries.borrow().values().map(|e| e.close.clone()).collect();
        for s in signals {
            s.fire();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_tracks_and_closes() {
        let t = Rc::new(ConnTable::default());
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let a = t.register(Direction::Outbound, peer);
        let b = t.register(Direction::Inbound, peer);
        assert_eq!(t.len(), 2);
        t.close_all();
        assert!(a.close_signal().fired() && b.close_signal().fired());
        drop(a);
        assert_eq!(t.len(), 1);
        drop(b);
        assert!(t.is_empty());
    }
}
