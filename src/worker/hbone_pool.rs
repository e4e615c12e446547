//! The worker's HBONE connection pool: CONNECT streams share mTLS + HTTP/2 connections per key
//! (source identity, acceptable destination identities, destination address, source IP).
//!
//! Owned by one worker (`Rc`, `Cell`, `RefCell`; no locks, no borrow across an await). A
//! connection takes at most `max_streams` streams (and never more than the peer allows); only one
//! dial per key runs at a time and other requests for the key wait for it; a connection whose
//! driver ended is dropped; one unused for `idle_timeout` is released.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::conns::Signal;
use crate::model::Identity;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src_id: Identity,
    /// Sorted, so the same set is the same key.
    pub dst_ids: Vec<Identity>,
    pub dst: SocketAddr,
    pub src_ip: IpAddr,
}

/// One pooled HTTP/2 connection.
pub struct PooledConn {
    send: h2::client::SendRequest<Bytes>,
    active: Cell<usize>,
    /// Set when the connection's driver task ends (GOAWAY, error, peer close).
    dead: Rc<Cell<bool>>,
    last_used: Cell<Instant>,
}

/// Holds a stream's place on its connection; gives it back when dropped.
pub struct StreamSlot {
    conn: Rc<PooledConn>,
}

impl StreamSlot {
    /// The peer is going away (GOAWAY) or the connection failed: no new stream goes to it.
    pub fn retire_connection(&self) {
        self.conn.dead.set(true);
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.conn.active.set(self.conn.active.get().saturating_sub(1));
        self.conn.last_used.set(Instant::now());
    }
}

impl PooledConn {
    pub fn new(send: h2::client::SendRequest<Bytes>, dead: Rc<Cell<bool>>) -> Rc<PooledConn> {
        Rc::new(PooledConn { send, active: Cell::new(0), dead, last_used: Cell::new(Instant::now()) })
    }

    fn has_room(&self, max_streams: usize) -> bool {
        let peer_limit = self.send.current_max_send_streams();
        !self.dead.get() && self.active.get() < max_streams.min(peer_limit.max(1))
    }
}

pub struct HbonePool {
    max_streams: usize,
    idle_timeout: Duration,
    conns: RefCell<HashMap<PoolKey, Vec<Rc<PooledConn>>>>,
    dialing: RefCell<HashMap<PoolKey, Signal>>,
    /// Connections dialed so far (for tests and logs).
    pub dials: Cell<u64>,
}

/// What a caller should do for a key.
pub enum Checkout {
    /// Use this connection for a stream.
    Ready(h2::client::SendRequest<Bytes>, StreamSlot),
    /// Another request is dialing this key: wait for the signal, then ask again.
    Wait(Signal),
    /// Dial a new connection; call `dialed` (or `dial_failed`) with the result.
    Dial(Signal),
}

impl HbonePool {
    pub fn new(max_streams: usize, idle_timeout: Duration) -> HbonePool {
        HbonePool {
            max_streams: max_streams.max(1),
            idle_timeout,
            conns: RefCell::default(),
            dialing: RefCell::default(),
            dials: Cell::new(0),
        }
    }

    pub fn checkout(&self, key: &PoolKey) -> Checkout {
        let mut conns = self.conns.borrow_mut();
        if let Some(list) = conns.get_mut(key) {
            list.retain(|c| !c.dead.get());
            if let Some(c) = list.iter().find(|c| c.has_room(self.max_streams)) {
                c.active.set(c.active.get() + 1);
                c.last_used.set(Instant::now());
                return Checkout::Ready(c.send.clone(), StreamSlot { conn: c.clone() });
            }
        }
        drop(conns);
        let mut dialing = self.dialing.borrow_mut();
        if let Some(sig) = dialing.get(key) {
            return Checkout::Wait(sig.clone());
        }
        let sig = Signal::default();
        dialing.insert(key.clone(), sig.clone());
        Checkout::Dial(sig)
    }

    /// Adds a freshly dialed connection and takes one stream on it for the dialer.
    pub fn dialed(&self, key: &PoolKey, conn: Rc<PooledConn>) -> (h2::client::SendRequest<Bytes>, StreamSlot) {
        self.dials.set(self.dials.get() + 1);
        conn.active.set(1);
        self.conns.borrow_mut().entry(key.clone()).or_default().push(conn.clone());
        self.finish_dial(key);
        (conn.send.clone(), StreamSlot { conn })
    }

    /// The dial failed: let the waiters try themselves.
    pub fn dial_failed(&self, key: &PoolKey) {
        self.finish_dial(key);
    }

    fn finish_dial(&self, key: &PoolKey) {
        if let Some(sig) = self.dialing.borrow_mut().remove(key) {
            sig.fire();
        }
    }

    /// Drops dead connections and releases the ones unused for the idle timeout.
    pub fn sweep(&self, now: Instant) {
        let mut conns = self.conns.borrow_mut();
        for list in conns.values_mut() {
            list.retain(|c| {
                !c.dead.get() && (c.active.get() > 0 || now.duration_since(c.last_used.get()) < self.idle_timeout)
            });
        }
        conns.retain(|_, list| !list.is_empty());
    }

    /// Open pooled connections (for tests and dumps).
    pub fn len(&self) -> usize {
        self.conns.borrow().values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
