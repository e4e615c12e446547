//! Outbound HBONE: mutual TLS to the destination's `:15008` with the source workload's
//! certificate, the server checked to be the destination's identity, HTTP/2 with Istio's
//! settings, then `CONNECT ip:targetPort`.
//!
//! Streams share connections through the worker's pool (`pool`).

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use rustls::client::UnbufferedClientConnection;
use rustls::pki_types::ServerName;

use super::headers;
use super::pool::{Checkout, HbonePool, PoolKey, StreamSlot};
use crate::model::{Identity, Workload};
use crate::net::dial;
use crate::tls::stream::TlsStream;
use crate::worker::WorkerCtx;
use crate::worker::error::ProxyError;
use crate::worker::pods::PodNet;

type SendRequest = h2::client::SendRequest<Bytes>;

/// An established CONNECT stream.
pub struct HboneStream {
    pub send: h2::SendStream<Bytes>,
    pub recv: h2::RecvStream,
    /// The stream's place on its pooled connection, given back when the stream ends.
    pub _slot: StreamSlot<SendRequest>,
}

/// Releases a key's dial if the dialing request goes away before it finishes.
struct DialGuard<'a> {
    pool: &'a HbonePool,
    key: &'a PoolKey,
    done: bool,
}

impl Drop for DialGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.pool.dial_failed(self.key);
        }
    }
}

fn hbone_err(what: &str, e: impl std::fmt::Display) -> ProxyError {
    ProxyError::Hbone(format!("{what}: {e}"))
}

/// Where an outbound stream comes from: the client's address, and the pod (in-pod mode) whose
/// namespace the connection leaves from.
#[derive(Clone, Copy)]
pub struct Origin<'a> {
    pub client: SocketAddr,
    pub pod: Option<&'a PodNet>,
}

/// Opens a CONNECT stream to `target` through `hbone_addr`: the workload's `ip:targetPort`, or
/// for a waypoint the original destination.
pub async fn connect(
    ctx: &WorkerCtx,
    source: &Workload,
    expected: &[Identity],
    hbone_addr: SocketAddr,
    target: SocketAddr,
    origin: Origin<'_>,
    service_host: Option<&str>,
) -> Result<HboneStream, ProxyError> {
    let Origin { client, pod } = origin;
    let identity = source.identity();
    let mut dst_ids = expected.to_vec();
    dst_ids.sort();
    dst_ids.dedup();
    let pod_id = pod.map_or(0, PodNet::id);
    let key = PoolKey { src_id: identity.clone(), dst_ids, dst: hbone_addr, src_ip: client.ip(), pod: pod_id };
    // A stream the peer never processed (it was going away: GOAWAY, REFUSED_STREAM, or the
    // connection was already closing) is tried again on another connection; nothing of the
    // client's has been sent yet. This is what keeps a restart of the peer invisible. A stream
    // refused on a connection dialed for it is not retried: that peer refuses, it is not leaving.
    let mut attempts = 0;
    loop {
        attempts += 1;
        let (slot, fresh) = checkout(ctx, &key, &identity, expected, hbone_addr, client, pod).await?;
        let send_request = slot.conn().clone();
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .header("forwarded", headers::forwarded(client, service_host))
            .header("baggage", headers::baggage(source, &ctx.cfg.cluster_id))
            .header("traceparent", headers::traceparent(fastrand::u128(..), fastrand::u64(..)))
            .body(())
            .map_err(|e| hbone_err("building CONNECT", e))?;
        // A peer that never grants a stream, or never answers the CONNECT, fails the setup at
        // the connect timeout instead of holding it.
        let deadline = ctx.cfg.connect_timeout;
        let ready = monoio::time::timeout(deadline, send_request.ready()).await.map_err(|_| {
            hbone_err("HTTP/2 connection", format!("{hbone_addr} granted no stream within {deadline:?}"))
        })?;
        let (stage, e) = match ready {
            Err(e) => ("HTTP/2 connection", e),
            Ok(mut ready) => match ready.send_request(request, false) {
                Err(e) => ("sending CONNECT", e),
                Ok((response, send)) => match monoio::time::timeout(deadline, response).await.map_err(|_| {
                    hbone_err("CONNECT response", format!("{hbone_addr} did not answer within {deadline:?}"))
                })? {
                    Ok(response) if response.status() == StatusCode::OK => {
                        return Ok(HboneStream { send, recv: response.into_body(), _slot: slot });
                    }
                    Ok(response) => {
                        let status = response.status().as_u16();
                        return Err(ProxyError::HboneRefused { peer: hbone_addr, target, status });
                    }
                    Err(e) if e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM) => {
                        ("CONNECT response", e)
                    }
                    Err(e) => return Err(hbone_err("CONNECT response", e)),
                },
            },
        };
        slot.retire_connection();
        if attempts >= 3 || fresh {
            return Err(hbone_err(stage, e));
        }
        tracing::debug!(peer = %hbone_addr, error = %e, "{stage} failed before the stream was processed; retrying on another connection");
    }
}

/// A stream's place on a pooled connection to `key`, dialing one when none has room; true when
/// the connection was dialed for this request.
async fn checkout(
    ctx: &WorkerCtx,
    key: &PoolKey,
    identity: &Identity,
    expected: &[Identity],
    hbone_addr: SocketAddr,
    client: SocketAddr,
    pod: Option<&PodNet>,
) -> Result<(StreamSlot<SendRequest>, bool), ProxyError> {
    loop {
        match ctx.pool.checkout(key, Instant::now()) {
            Checkout::Ready(slot) => return Ok((slot, false)),
            Checkout::Wait(dial) => {
                // One dial per key: wait for it, then take a stream on what it made.
                monoio::time::timeout(ctx.cfg.connect_timeout, dial.wait())
                    .await
                    .map_err(|_| hbone_err("waiting for a pooled connection", format!("to {hbone_addr} timed out")))?;
            }
            Checkout::Full => {
                return Err(hbone_err(
                    "pool",
                    format!(
                        "{hbone_addr} already has {} connections and grants no stream on any",
                        super::pool::MAX_CONNECTIONS_PER_KEY
                    ),
                ));
            }
            Checkout::Dial => {
                let mut guard = DialGuard { pool: &ctx.pool, key, done: false };
                let (conn, dead) = dial_connection(ctx, identity, expected, hbone_addr, client.ip(), pod).await?;
                guard.done = true;
                tracing::debug!(src = %identity, dst = %hbone_addr, "new pooled HBONE connection");
                return Ok((ctx.pool.dialed(key, conn, dead, Instant::now()), true));
            }
        }
    }
}

/// A new mTLS + HTTP/2 connection to `hbone_addr`, with its driver task running; the flag is set
/// when the driver ends.
async fn dial_connection(
    ctx: &WorkerCtx,
    identity: &Identity,
    expected: &[Identity],
    hbone_addr: SocketAddr,
    client_ip: std::net::IpAddr,
    pod: Option<&PodNet>,
) -> Result<(SendRequest, Rc<Cell<bool>>), ProxyError> {
    let cert = ctx.certificate(identity, ctx.cfg.connect_timeout).await?;
    // From the client's own address when allowed (as Istio's node proxy does): the destination
    // then sees, and authorizes, the real source IP. That is why the pool key has the source IP.
    // A pod's connection leaves from inside the pod, from its own address already.
    let spoof_source = (pod.is_none() && ctx.spoof_source && client_ip != hbone_addr.ip()).then_some(client_ip);
    let opts = ctx.dial_opts(pod, spoof_source);
    let tcp = dial(hbone_addr, opts).await?;
    let conn = UnbufferedClientConnection::new(cert.client_config(), ServerName::IpAddress(hbone_addr.ip().into()))
        .map_err(|e| hbone_err("TLS client setup", e))?;
    let tls = monoio::time::timeout(ctx.cfg.connect_timeout, TlsStream::handshake(tcp, conn))
        .await
        .map_err(|_| ProxyError::HboneTls(format!("TLS handshake: timed out with {hbone_addr}")))?
        .map_err(|e| ProxyError::HboneTls(format!("TLS handshake with {hbone_addr}: {e}")))?;
    crate::tls::check_server_identity(tls.peer_certificates(), expected)
        .map_err(|e| ProxyError::HboneIdentity(format!("server {hbone_addr}: {e}")))?;
    let (send_request, connection) = h2::client::Builder::new()
        .initial_window_size(ctx.cfg.http2.stream_window)
        .initial_connection_window_size(ctx.cfg.http2.connection_window)
        .max_frame_size(ctx.cfg.http2.frame_size)
        .max_header_list_size(16 * 1024)
        .enable_push(false)
        .handshake::<_, Bytes>(tls)
        .await
        .map_err(|e| ProxyError::HboneH2(format!("HTTP/2 handshake: {e}")))?;
    let mut connection = connection;
    let pings = connection.ping_pong();
    let dead = Rc::new(Cell::new(false));
    let flag = dead.clone();
    let (interval, timeout) = (ctx.cfg.hbone_keepalive_interval, ctx.cfg.hbone_keepalive_timeout);
    // The driver moves the connection's bytes; when it ends (or the peer stops answering PINGs)
    // the pool drops the connection.
    let driver = async move {
        monoio::select! {
            r = connection => if let Err(e) = r {
                tracing::debug!(error = %e, "HBONE client connection ended");
            },
            _ = keepalive(pings, interval, timeout) => {
                tracing::info!(peer = %hbone_addr, "HBONE peer did not answer PING within {timeout:?}; dropping the connection");
            }
        }
        flag.set(true);
    };
    monoio::spawn(crate::worker::contained(ctx.id, "hbone client connection", driver));
    Ok((send_request, dead))
}

/// Sends a PING every `interval` and returns when one goes unanswered for `timeout` (or the
/// connection is gone): the caller then drops the connection. Never returns on a healthy one.
pub async fn keepalive(pings: Option<h2::PingPong>, interval: Duration, timeout: Duration) {
    let Some(mut pings) = pings else {
        // Taken already: nothing to watch, so never end the connection from here.
        return std::future::pending().await;
    };
    loop {
        monoio::time::sleep(interval).await;
        match monoio::time::timeout(timeout, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        monoio::RuntimeBuilder::<monoio::FusionDriver>::new().enable_timer().build().unwrap().block_on(f)
    }

    #[test]
    fn keepalive_ends_only_when_pings_go_unanswered() {
        block_on(async {
            let (a, b) = tokio::io::duplex(64 * 1024);
            // A server that is polled answers PINGs; once `stop` is set it is held unpolled.
            let stop = Rc::new(Cell::new(false));
            let stopped = stop.clone();
            monoio::spawn(async move {
                let mut server = h2::server::handshake(b).await.unwrap();
                while !stopped.get() {
                    monoio::select! {
                        _ = server.accept() => {}
                        _ = monoio::time::sleep(Duration::from_millis(10)) => {}
                    }
                }
                monoio::time::sleep(Duration::from_secs(30)).await;
                drop(server);
            });
            let (_send, mut conn) = h2::client::handshake(a).await.unwrap();
            let pings = conn.ping_pong();
            monoio::spawn(async move {
                let _ = conn.await;
            });
            let mut watch = std::pin::pin!(keepalive(pings, Duration::from_millis(20), Duration::from_millis(200)));
            let early = monoio::time::timeout(Duration::from_millis(400), watch.as_mut()).await;
            assert!(early.is_err(), "a connection whose peer answers is kept");
            stop.set(true);
            let late = monoio::time::timeout(Duration::from_secs(20), watch.as_mut()).await;
            assert!(late.is_ok(), "an unanswered PING ends the connection");
        });
    }
}
