//! One proxied connection's life, from its registration to its access-log line.
//!
//! [`Connection`] owns everything that must end exactly once: the connection table's guard (so
//! drain and re-authorization can reach it), the access-log record, the byte counters and the
//! metric handles. Every path ends it through [`Connection::finish`]: a refusal, a failed setup,
//! a relay that ran to the end or was closed. Owned by one worker task; nothing here is `Send`.
//!
//! The second half of the file is the task that runs a plain-TCP-side connection: setup (raced
//! against the close signal), then a separate, small relay task, so an idle connection keeps
//! only the relay's state.

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use monoio::net::TcpStream;

use super::accept::Listener;
use super::conns::{ConnGuard, Direction};
use super::error::ProxyError;
use super::pods::PodNet;
use super::{WorkerCtx, contained, inbound_plain, outbound, socks5};
use crate::hbone::client::HboneStream;
use crate::net::relay::{Halves, RelayEnd, RelayStats, relay};
use crate::telemetry::access::ConnLog;
use crate::telemetry::metrics::{LabelKey, OpenConn, Series, SetupPath};

/// A connection registered with the worker, with what is known of it so far.
pub struct Connection {
    guard: ConnGuard,
    /// Boxed: the relay task holds the connection for its whole life, and most of the record is
    /// only read at the end.
    pub log: Box<ConnLog>,
    /// The live byte counters (the metric handles point at them once established).
    stats: Rc<RelayStats>,
    /// Open-connection handles, one per reporter; dropping them counts the connection closed.
    counted: [Option<OpenConn>; 2],
}

impl Connection {
    /// Registers a new connection from `peer` in the worker's table, accepted by pod `pod`'s
    /// listener (0: the node's).
    pub fn new(ctx: &WorkerCtx, direction: Direction, peer: SocketAddr, pod: u64) -> Connection {
        let name = match direction {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        };
        Connection {
            guard: ctx.conns.register(direction, peer, pod),
            log: Box::new(ConnLog::new(name, peer)),
            stats: Rc::default(),
            counted: [None, None],
        }
    }

    pub fn guard(&self) -> &ConnGuard {
        &self.guard
    }

    /// Both ends are connected: count the connection as open (its bytes followed live) and
    /// record how long its setup took. `early_bytes` went upstream during setup.
    pub fn established(&mut self, ctx: &WorkerCtx, early_bytes: u64) {
        self.stats.sent.set(early_bytes);
        if let Some(path) = self.log.path {
            ctx.metrics.record_setup(path, self.log.start.elapsed());
        }
        for (slot, reporter) in self.counted.iter_mut().zip(reporters(&self.log)) {
            *slot = Some(ctx.metrics.open(series(ctx, &self.log, reporter, "-"), self.stats.clone()));
        }
    }

    fn is_established(&self) -> bool {
        self.counted[0].is_some()
    }

    /// The connection's byte counters, updated as bytes move.
    pub fn stats(&self) -> &RelayStats {
        &self.stats
    }

    /// What a relay's end means for this connection: closed by the proxy says why.
    pub fn relay_result(&self, end: io::Result<RelayEnd>) -> Result<(), ProxyError> {
        match end {
            Ok(RelayEnd::Done) => Ok(()),
            Ok(RelayEnd::Closed) => Err(ProxyError::Closed(self.guard.close_reason())),
            Err(e) => Err(ProxyError::Relay(e)),
        }
    }

    /// The end: one access-log line, a failure counted when the connection never got
    /// established (and the proxy knew whose it was), and the table entry and open-connection
    /// handles released.
    pub fn finish(self, ctx: &WorkerCtx, result: Result<(), ProxyError>) {
        let error = result.as_ref().err();
        if let Some(e) = error.filter(|_| !self.is_established()) {
            count_failed(ctx, &self.log, e);
        }
        self.log.finish(&self.stats, error.map(|e| e as &dyn std::fmt::Display));
        // `counted` and `guard` drop here: closed is counted, the table forgets the connection.
    }
}

/// The reporters that see a connection: the source side for outbound, the destination side for
/// inbound, both for the node-local fast path (one proxy is both ends).
fn reporters(log: &ConnLog) -> &'static [&'static str] {
    match log.path {
        Some(SetupPath::FastPath) => &["source", "destination"],
        _ if log.direction == "inbound" => &["destination"],
        _ => &["source"],
    }
}

fn mutual_tls(log: &ConnLog) -> bool {
    matches!(log.path, Some(SetupPath::Hbone | SetupPath::FastPath | SetupPath::InboundHbone))
}

/// The metric series of a connection as `reporter` sees it, from the worker's cache when the
/// labels come from config alone (workloads and service), built afresh when a peer's identity
/// or baggage had a say.
fn series(ctx: &WorkerCtx, log: &ConnLog, reporter: &'static str, flags: &'static str) -> Rc<Series> {
    let make = || log.labels(reporter, flags, mutual_tls(log), &ctx.cfg.cluster_id);
    let from_config = log.src_baggage.is_none() && (log.src_identity.is_none() || log.src_workload.is_some());
    if !from_config {
        return ctx.metrics.intern(make());
    }
    let key = LabelKey {
        reporter,
        src: log.src_workload.clone(),
        dst: log.dst_workload.clone(),
        service: log.dst_service.clone(),
        response_flags: flags,
        mutual_tls: mutual_tls(log),
    };
    ctx.metrics.labels(key, make)
}

/// Counts a connection that failed during setup, once the proxy knew whose it was.
fn count_failed(ctx: &WorkerCtx, log: &ConnLog, e: &ProxyError) {
    if log.src_workload.is_none() && log.src_identity.is_none() && log.dst_workload.is_none() {
        return;
    }
    for reporter in reporters(log) {
        ctx.metrics.failed(series(ctx, log, reporter, e.response_flags()));
    }
}

/// Where a connection's bytes go once set up.
pub enum Upstream {
    Tcp(TcpStream),
    Hbone(HboneStream),
}

/// A connection whose setup is done: both ends connected, ready to relay.
pub struct Established {
    pub downstream: TcpStream,
    pub upstream: Upstream,
    /// Bytes already sent upstream during setup (SOCKS5 clients may send data early).
    pub early_bytes: u64,
}

/// The longest a client may take over its part of the setup (the SOCKS5 handshake).
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Sets a connection accepted on `listener` up, then hands it to a task of its own for the
/// relay. The setup future is as large as its largest state (handshake buffers, routing);
/// ending it frees that memory, so a long-lived idle connection only keeps the small relay task.
pub async fn run(ctx: Rc<WorkerCtx>, listener: Listener, stream: TcpStream, peer: SocketAddr, pod: Option<Rc<PodNet>>) {
    let direction = match listener {
        Listener::InboundPlain | Listener::InboundHbone => Direction::Inbound,
        Listener::Outbound | Listener::Socks5 => Direction::Outbound,
    };
    let mut conn = Connection::new(&ctx, direction, peer, pod.as_ref().map_or(0, |p| p.id()));
    let close = conn.guard().close_signal().clone();
    let setup = setup(&ctx, listener, &mut conn, stream, peer, pod.as_deref());
    let res = monoio::select! {
        r = setup => r,
        _ = close.wait() => Err(ProxyError::Closed(conn.guard().close_reason())),
    };
    match res {
        Ok(est) => {
            conn.established(&ctx, est.early_bytes);
            match est.upstream {
                Upstream::Tcp(up) => {
                    let (id, splice) = (ctx.id, ctx.splice);
                    monoio::spawn(contained(
                        id,
                        "relay",
                        relay_tcp(ctx, conn, est.downstream.into(), up.into(), splice),
                    ));
                }
                Upstream::Hbone(h) => {
                    let id = ctx.id;
                    monoio::spawn(contained(id, "hbone relay", relay_hbone(ctx, conn, est.downstream, h)));
                }
            }
        }
        Err(e) => conn.finish(&ctx, Err(e)),
    }
}

async fn setup(
    ctx: &WorkerCtx,
    listener: Listener,
    conn: &mut Connection,
    stream: TcpStream,
    peer: SocketAddr,
    pod: Option<&PodNet>,
) -> Result<Established, ProxyError> {
    match listener {
        Listener::Outbound => outbound::captured(ctx, conn, stream, peer, pod).await,
        Listener::Socks5 => {
            // The client's handshake plus our dial (which has its own timeout too).
            let limit = ctx.cfg.connect_timeout + SETUP_TIMEOUT;
            monoio::time::timeout(limit, socks5::handle(ctx, conn, stream, peer, pod))
                .await
                .unwrap_or(Err(ProxyError::SetupTimeout(limit)))
        }
        Listener::InboundPlain => inbound_plain::handle(ctx, conn, stream, peer, pod).await,
        // Served by `hbone::server`, never routed here.
        Listener::InboundHbone => Err(ProxyError::Hbone("HBONE connections are not set up as TCP".into())),
    }
}

async fn relay_tcp(ctx: Rc<WorkerCtx>, conn: Connection, down: Halves, up: Halves, splice: bool) {
    let end = relay(down, up, conn.stats(), conn.guard().close_signal().wait(), splice).await;
    let res = conn.relay_result(end);
    conn.finish(&ctx, res);
}

async fn relay_hbone(ctx: Rc<WorkerCtx>, conn: Connection, down: TcpStream, up: HboneStream) {
    // Downstream is the TCP side: what it sends goes into the HTTP/2 stream.
    let stats = conn.stats();
    let close = conn.guard().close_signal().wait();
    let end = crate::hbone::relay::relay(down, up.send, up.recv, &stats.received, &stats.sent, close).await;
    let res = conn.relay_result(end);
    conn.finish(&ctx, res);
}
