//! The worker's HBONE connection pool: CONNECT streams share mTLS + HTTP/2 connections per key
//! (source identity, acceptable destination identities, destination address, source IP).
//!
//! Owned by one worker (`Rc`, `Cell`, `RefCell`; no locks, no borrow across an await). What it
//! guarantees, and what its tests check without sockets:
//! - a connection carries at most `max_streams` streams, and never more than the peer allows;
//! - only one dial per key runs at a time; other requests for the key wait for it, and try
//!   themselves when it fails;
//! - a connection whose driver ended, or that a stream retired (GOAWAY), takes no new stream;
//! - a connection unused for `idle_timeout` is released at the next sweep.
//!
//! Generic over the connection (`PoolConn`): the worker pools `h2` clients, the tests pool fakes.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::model::Identity;
use crate::worker::conns::Signal;

/// The key of the HBONE pool.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src_id: Identity,
    /// Sorted and without duplicates, so the same set is the same key.
    pub dst_ids: Vec<Identity>,
    pub dst: SocketAddr,
    pub src_ip: IpAddr,
    /// The pod (in-pod mode) whose namespace the connection leaves from; 0 for the node.
    pub pod: u64,
}

/// What the pool needs to know of a connection.
pub trait PoolConn {
    /// How many concurrent streams the peer allows now (its `SETTINGS_MAX_CONCURRENT_STREAMS`).
    fn peer_max_streams(&self) -> usize;
}

impl PoolConn for h2::client::SendRequest<Bytes> {
    fn peer_max_streams(&self) -> usize {
        self.current_max_send_streams()
    }
}

/// One pooled connection and its bookkeeping.
struct Pooled<C> {
    conn: C,
    active: Cell<usize>,
    /// Set when the connection's driver ends (GOAWAY, error, peer close) or a stream retires it.
    dead: Rc<Cell<bool>>,
    last_used: Cell<Instant>,
}

impl<C: PoolConn> Pooled<C> {
    /// A peer that allows no stream (`MAX_CONCURRENT_STREAMS` 0) has no room at all.
    fn has_room(&self, max_streams: usize) -> bool {
        let peer_limit = self.conn.peer_max_streams();
        !self.dead.get() && self.active.get() < max_streams.min(peer_limit)
    }
}

/// Holds a stream's place on its connection; gives it back when dropped.
pub struct StreamSlot<C> {
    pooled: Rc<Pooled<C>>,
}

impl<C> StreamSlot<C> {
    /// The connection this stream runs on.
    pub fn conn(&self) -> &C {
        &self.pooled.conn
    }

    /// The peer is going away (GOAWAY) or the connection failed: no new stream goes to it.
    pub fn retire_connection(&self) {
        self.pooled.dead.set(true);
    }
}

impl<C> Drop for StreamSlot<C> {
    fn drop(&mut self) {
        self.pooled.active.set(self.pooled.active.get().saturating_sub(1));
        self.pooled.last_used.set(Instant::now());
    }
}

/// What a caller should do for a key.
pub enum Checkout<C> {
    /// Open the stream on this connection.
    Ready(StreamSlot<C>),
    /// Another request is dialing this key: wait for the signal, then ask again.
    Wait(Signal),
    /// Dial a new connection, then hand it to `dialed` (or call `dial_failed`).
    Dial,
    /// The key has [`MAX_CONNECTIONS_PER_KEY`] live connections and none has room.
    Full,
}

/// Live connections one key may have when the peer grants fewer streams than we would put on
/// a connection (down to none): such a peer must not make the pool dial without bound. A peer
/// granting full connections is not capped: thousands of concurrent streams to one destination
/// are legitimate, at `max_streams` each.
pub const MAX_CONNECTIONS_PER_KEY: usize = 8;

pub struct Pool<K, C> {
    max_streams: usize,
    idle_timeout: Duration,
    conns: RefCell<HashMap<K, Vec<Rc<Pooled<C>>>>>,
    dialing: RefCell<HashMap<K, Signal>>,
}

/// The worker's pool of HBONE client connections.
pub type HbonePool = Pool<PoolKey, h2::client::SendRequest<Bytes>>;

impl<K: Clone + Eq + Hash, C: PoolConn> Pool<K, C> {
    pub fn new(max_streams: usize, idle_timeout: Duration) -> Self {
        Pool { max_streams: max_streams.max(1), idle_timeout, conns: RefCell::default(), dialing: RefCell::default() }
    }

    /// A stream's place on a connection to `key` with room, or what to do instead.
    pub fn checkout(&self, key: &K, now: Instant) -> Checkout<C> {
        let mut conns = self.conns.borrow_mut();
        if let Some(list) = conns.get_mut(key) {
            list.retain(|c| !c.dead.get());
            if let Some(c) = list.iter().find(|c| c.has_room(self.max_streams)) {
                c.active.set(c.active.get() + 1);
                c.last_used.set(now);
                return Checkout::Ready(StreamSlot { pooled: c.clone() });
            }
            // Only a peer that holds its streams below ours is capped: with the streams it grants,
            // more connections would not carry more streams.
            let peer_starved = list.iter().all(|c| c.conn.peer_max_streams() < self.max_streams);
            if peer_starved && list.len() >= MAX_CONNECTIONS_PER_KEY {
                return Checkout::Full;
            }
        }
        drop(conns);
        let mut dialing = self.dialing.borrow_mut();
        if let Some(sig) = dialing.get(key) {
            return Checkout::Wait(sig.clone());
        }
        dialing.insert(key.clone(), Signal::default());
        Checkout::Dial
    }

    /// Adds a freshly dialed connection (its driver sets `dead` when it ends) and takes one
    /// stream on it for the dialer; wakes the requests that waited for this dial.
    pub fn dialed(&self, key: &K, conn: C, dead: Rc<Cell<bool>>, now: Instant) -> StreamSlot<C> {
        let pooled = Rc::new(Pooled { conn, active: Cell::new(1), dead, last_used: Cell::new(now) });
        self.conns.borrow_mut().entry(key.clone()).or_default().push(pooled.clone());
        self.finish_dial(key);
        StreamSlot { pooled }
    }

    /// The dial failed (or its request went away): the waiters try themselves.
    pub fn dial_failed(&self, key: &K) {
        self.finish_dial(key);
    }

    fn finish_dial(&self, key: &K) {
        if let Some(sig) = self.dialing.borrow_mut().remove(key) {
            sig.fire();
        }
    }

    /// Drops dead connections and releases the ones unused for the idle timeout.
    pub fn sweep(&self, now: Instant) {
        let mut conns = self.conns.borrow_mut();
        for list in conns.values_mut() {
            list.retain(|c| {
                !c.dead.get()
                    && (c.active.get() > 0 || now.saturating_duration_since(c.last_used.get()) < self.idle_timeout)
            });
        }
        conns.retain(|_, list| !list.is_empty());
    }

    /// Takes the connections of the keys `which` selects out of the pool (a pod that went
    /// away): no new stream goes to them, and each closes once its streams end.
    pub fn retire_where(&self, which: impl Fn(&K) -> bool) {
        self.conns.borrow_mut().retain(|k, list| {
            if which(k) {
                list.iter().for_each(|c| c.dead.set(true));
            }
            !which(k)
        });
    }

    /// Open pooled connections.
    pub fn len(&self) -> usize {
        self.conns.borrow().values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection whose peer allows `limit` streams.
    struct Fake {
        id: u32,
        limit: Cell<usize>,
    }

    impl PoolConn for Fake {
        fn peer_max_streams(&self) -> usize {
            self.limit.get()
        }
    }

    fn fake(id: u32, limit: usize) -> Fake {
        Fake { id, limit: Cell::new(limit) }
    }

    fn ready(c: Checkout<Fake>) -> StreamSlot<Fake> {
        match c {
            Checkout::Ready(s) => s,
            Checkout::Wait(_) => panic!("expected Ready, got Wait"),
            Checkout::Dial => panic!("expected Ready, got Dial"),
            Checkout::Full => panic!("expected Ready, got Full"),
        }
    }

    #[test]
    fn many_streams_to_one_key_are_not_capped_by_a_generous_peer() {
        let pool: Pool<&str, Fake> = Pool::new(2, Duration::from_secs(300));
        let now = Instant::now();
        let mut slots = Vec::new();
        for i in 0..(MAX_CONNECTIONS_PER_KEY * 3) {
            assert!(matches!(pool.checkout(&"a", now), Checkout::Dial), "connection {i}");
            slots.push(pool.dialed(&"a", fake(i as u32, 100), Rc::default(), now));
            slots.push(ready(pool.checkout(&"a", now)));
        }
        assert_eq!(pool.len(), MAX_CONNECTIONS_PER_KEY * 3);
    }

    #[test]
    fn a_peer_granting_no_stream_is_unusable_and_bounded() {
        let pool: Pool<&str, Fake> = Pool::new(100, Duration::from_secs(300));
        let now = Instant::now();
        let mut slots = Vec::new();
        for i in 0..MAX_CONNECTIONS_PER_KEY {
            assert!(matches!(pool.checkout(&"a", now), Checkout::Dial), "connection {i}: none has room");
            slots.push(pool.dialed(&"a", fake(i as u32, 0), Rc::default(), now));
        }
        assert!(matches!(pool.checkout(&"a", now), Checkout::Full), "the key stops dialing at the cap");
        assert_eq!(pool.len(), MAX_CONNECTIONS_PER_KEY);
        drop(slots);
        assert!(matches!(pool.checkout(&"a", now), Checkout::Full), "0 streams stays unusable when idle");
        pool.sweep(now + Duration::from_secs(301));
        assert!(matches!(pool.checkout(&"a", now), Checkout::Dial), "released when idle, the key may dial again");
    }

    #[test]
    fn one_dial_per_key_and_waiters_are_woken() {
        let pool: Pool<&str, Fake> = Pool::new(100, Duration::from_secs(300));
        let now = Instant::now();
        assert!(matches!(pool.checkout(&"a", now), Checkout::Dial));
        let Checkout::Wait(sig) = pool.checkout(&"a", now) else { panic!("a second request must wait") };
        // Another key dials on its own.
        assert!(matches!(pool.checkout(&"b", now), Checkout::Dial));
        let slot = pool.dialed(&"a", fake(1, 100), Rc::default(), now);
        assert!(sig.fired(), "the waiter is woken when the dial finished");
        assert_eq!(ready(pool.checkout(&"a", now)).conn().id, 1, "and then shares the new connection");
        drop(slot);
        assert_eq!(pool.len(), 1);
    }

    #[test]
    fn a_failed_dial_lets_the_waiters_dial() {
        let pool: Pool<&str, Fake> = Pool::new(100, Duration::from_secs(300));
        let now = Instant::now();
        assert!(matches!(pool.checkout(&"a", now), Checkout::Dial));
        let Checkout::Wait(sig) = pool.checkout(&"a", now) else { panic!("must wait") };
        pool.dial_failed(&"a");
        assert!(sig.fired());
        assert!(matches!(pool.checkout(&"a", now), Checkout::Dial), "the next request dials again");
    }

    #[test]
    fn stream_limit_is_ours_and_the_peers() {
        let pool: Pool<&str, Fake> = Pool::new(2, Duration::from_secs(300));
        let now = Instant::now();
        assert!(matches!(pool.checkout(&"a", now), Checkout::Dial));
        let s1 = pool.dialed(&"a", fake(1, 100), Rc::default(), now);
        let s2 = ready(pool.checkout(&"a", now));
        assert!(matches!(pool.checkout(&"a", now), Checkout::Dial), "our limit of 2 reached: a new connection");
        let s3 = pool.dialed(&"a", fake(2, 1), Rc::default(), now);
        assert_eq!(s3.conn().id, 2);
        assert!(matches!(pool.checkout(&"a", now), Checkout::Dial), "the peer of connection 2 allows one stream");
        pool.dial_failed(&"a");
        drop(s2);
        assert_eq!(ready(pool.checkout(&"a", now)).conn().id, 1, "a freed stream is reused");
        drop((s1, s3));
    }

    #[test]
    fn retired_and_dead_connections_take_no_stream() {
        let pool: Pool<&str, Fake> = Pool::new(100, Duration::from_secs(300));
        let now = Instant::now();
        assert!(matches!(pool.checkout(&"a", now), Checkout::Dial));
        let dead = Rc::new(Cell::new(false));
        let s1 = pool.dialed(&"a", fake(1, 100), dead.clone(), now);
        // A GOAWAY seen by a stream retires its connection for everyone.
        s1.retire_connection();
        assert!(matches!(pool.checkout(&"a", now), Checkout::Dial));
        let s2 = pool.dialed(&"a", fake(2, 100), Rc::default(), now);
        assert_eq!(pool.len(), 1, "the retired connection was dropped from the pool");
        // The driver ending marks it dead too.
        let driver = Rc::new(Cell::new(false));
        drop(s2);
        pool.sweep(now);
        assert!(matches!(pool.checkout(&"b", now), Checkout::Dial));
        let s3 = pool.dialed(&"b", fake(3, 100), driver.clone(), now);
        driver.set(true);
        pool.sweep(now);
        assert!(matches!(pool.checkout(&"b", now), Checkout::Dial), "a dead connection is not handed out");
        drop(s3);
        drop(s1);
    }

    #[test]
    fn idle_connections_are_released_busy_ones_kept() {
        let idle = Duration::from_secs(300);
        let pool: Pool<&str, Fake> = Pool::new(100, idle);
        let now = Instant::now();
        assert!(matches!(pool.checkout(&"idle", now), Checkout::Dial));
        drop(pool.dialed(&"idle", fake(1, 100), Rc::default(), now));
        assert!(matches!(pool.checkout(&"busy", now), Checkout::Dial));
        let busy = pool.dialed(&"busy", fake(2, 100), Rc::default(), now);
        let later = Instant::now() + idle;
        pool.sweep(Instant::now());
        assert_eq!(pool.len(), 2, "not idle long enough yet");
        pool.sweep(later + Duration::from_secs(1));
        assert_eq!(pool.len(), 1, "the idle one is released, the one with a stream kept");
        assert_eq!(ready(pool.checkout(&"busy", later)).conn().id, 2);
        drop(busy);
    }
}
