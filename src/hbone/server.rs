//! Inbound HBONE (15008): mutual TLS presenting the certificate of the workload the connection
//! is for (known from the address the client dialed, before the handshake), then HTTP/2 with
//! Istio's settings. Each CONNECT stream is a task on this worker: the checks of `target`, in
//! COMPAT.md's order, authorization, connect to the pod, `200`, then bytes both ways. Drain
//! sends GOAWAY and lets streams finish.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use monoio::net::TcpStream;
use rustls::server::UnbufferedServerConnection;

use super::target::{self, Refusal};
use crate::model::{Identity, Workload};
use crate::net::{canonical, dial};
use crate::rbac;
use crate::telemetry::metrics::{Peer, SetupPath};
use crate::tls::stream::TlsStream;
use crate::worker::conns::{AuthzInfo, Direction, Signal};
use crate::worker::error::ProxyError;
use crate::worker::lifecycle::Connection;
use crate::worker::pods::PodNet;
use crate::worker::{LocalSnapshot, WorkerCtx};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes one worker runs at once; a connection over the cap is closed when its first
/// bytes arrive. Each costs a rustls connection and a 64 KiB read buffer while it runs.
pub const MAX_HANDSHAKES: usize = 256;

/// A handshake's place under [`MAX_HANDSHAKES`].
struct HandshakeSlot<'a>(&'a std::cell::Cell<usize>);

impl Drop for HandshakeSlot<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

type H2Server = h2::server::Connection<TlsStream, Bytes>;

/// What every stream of one HBONE connection shares.
struct Accepted {
    /// The address the client dialed (a local workload's IP, port 15008).
    dst: SocketAddr,
    peer: SocketAddr,
    peer_id: Option<Identity>,
    /// The local workload the connection was accepted for.
    workload: Arc<Workload>,
    /// Fired by a stream that finds the workload gone: the connection sends GOAWAY.
    retire: Signal,
    /// The pod (in-pod mode) whose listener accepted the connection.
    pod: Option<Rc<PodNet>>,
}

/// Serves one HBONE connection until the peer closes it or drain ends it.
pub async fn serve(ctx: Rc<WorkerCtx>, stream: TcpStream, peer: SocketAddr, pod: Option<Rc<PodNet>>) {
    let guard = ctx.conns.register(Direction::Inbound, peer, pod.as_ref().map_or(0, |p| p.id()));
    // Nothing is allocated for the handshake until the client sends: a connection that stays
    // silent costs only its socket and this small task, and is closed at the timeout.
    match monoio::time::timeout(HANDSHAKE_TIMEOUT, stream.readable(true)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "HBONE connection failed before its handshake"),
        Err(_) => return tracing::debug!(%peer, "HBONE client sent nothing within {HANDSHAKE_TIMEOUT:?}; closing"),
    }
    // Boxed: the handshake's state (TLS, HTTP/2) is large, and a task is allocated at the size
    // of its largest state; only connections that send get it.
    Box::pin(serve_accepted(ctx, stream, peer, guard, pod)).await;
}

async fn serve_accepted(
    ctx: Rc<WorkerCtx>,
    stream: TcpStream,
    peer: SocketAddr,
    guard: crate::worker::conns::ConnGuard,
    pod: Option<Rc<PodNet>>,
) {
    let Some((h2, accepted)) = accept(&ctx, stream, peer, pod).await else { return };
    serve_streams(&ctx, h2, Rc::new(accepted), guard.close_signal()).await;
    drop(guard);
}

/// The local workload the connection is for, its certificate, TLS, then the HTTP/2 handshake.
/// Logs why and returns `None` when the connection cannot be served.
async fn accept(
    ctx: &WorkerCtx,
    stream: TcpStream,
    peer: SocketAddr,
    pod: Option<Rc<PodNet>>,
) -> Option<(H2Server, Accepted)> {
    let dst = match stream.local_addr() {
        Ok(a) => canonical(a),
        Err(e) => {
            tracing::warn!(%peer, error = %e, "HBONE: no local address");
            return None;
        }
    };
    if ctx.handshakes.get() >= MAX_HANDSHAKES {
        tracing::debug!(%peer, "{MAX_HANDSHAKES} HBONE handshakes in progress on this worker; closing");
        return None;
    }
    ctx.handshakes.set(ctx.handshakes.get() + 1);
    let _slot = HandshakeSlot(&ctx.handshakes);
    let snap = match &pod {
        // A pod's workload may reach this node's config after the pod's first connection.
        Some(p) => match ctx.pod_snapshot(p).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%peer, %dst, "HBONE connection for pod {}: {e}; closing", p.spec.uid);
                return None;
            }
        },
        None => ctx.snapshot(),
    };
    let Some(workload) = snap.local_workload_by_ip(&ctx.cfg.network, dst.ip()).cloned() else {
        tracing::warn!(%peer, %dst, "HBONE connection for an address that is not a local workload; closing");
        return None;
    };
    if let Some(p) = &pod {
        if p.workload(&snap).is_none_or(|w| w.uid != workload.uid) {
            tracing::warn!(%peer, %dst, uid = %p.spec.uid, "HBONE connection for an address that is not this pod's; closing");
            return None;
        }
    }
    let identity = workload.identity();
    // Normally in the snapshot already; right after start (or a config push) it may still be on
    // its way from the control thread: wait for it rather than refuse the peer.
    let cert = match ctx.certificate(&identity, HANDSHAKE_TIMEOUT).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%peer, %identity, "HBONE connection for a workload without a certificate: {e}; closing");
            return None;
        }
    };
    let conn = match UnbufferedServerConnection::new(cert.server_config()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "HBONE: TLS server setup failed");
            return None;
        }
    };
    let tls = match monoio::time::timeout(HANDSHAKE_TIMEOUT, TlsStream::handshake(stream, conn)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "HBONE TLS handshake failed");
            return None;
        }
        Err(_) => {
            tracing::info!(%peer, "HBONE TLS handshake timed out");
            return None;
        }
    };
    let peer_id = crate::tls::peer_identity(tls.peer_certificates());
    let handshake = h2::server::Builder::new()
        .initial_window_size(ctx.cfg.http2.stream_window)
        .initial_connection_window_size(ctx.cfg.http2.connection_window)
        .max_frame_size(ctx.cfg.http2.frame_size)
        .max_header_list_size(64 * 1024)
        .max_concurrent_streams(200)
        .handshake::<_, Bytes>(tls);
    // A client that completes TLS and never sends the HTTP/2 preface is closed, not kept.
    match monoio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(h2)) => Some((h2, Accepted { dst, peer, peer_id, workload, retire: Signal::default(), pod })),
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "HBONE HTTP/2 handshake failed");
            None
        }
        Err(_) => {
            tracing::info!(%peer, "HBONE HTTP/2 preface not received within {HANDSHAKE_TIMEOUT:?}; closing");
            None
        }
    }
}

/// Accepts CONNECT streams, each a task of its own, until the peer ends the connection, stops
/// answering PINGs, or drain ends it (GOAWAY first, then the deadline's `close`).
async fn serve_streams(ctx: &Rc<WorkerCtx>, mut h2: H2Server, accepted: Rc<Accepted>, close: &Signal) {
    let peer = accepted.peer;
    let mut goaway_sent = false;
    let (interval, timeout) = (ctx.cfg.hbone_keepalive_interval, ctx.cfg.hbone_keepalive_timeout);
    let mut keepalive = std::pin::pin!(super::client::keepalive(h2.ping_pong(), interval, timeout));
    loop {
        let next = if goaway_sent {
            monoio::select! {
                r = h2.accept() => r,
                // The drain deadline: whatever is still open is closed.
                _ = close.wait() => break,
                _ = keepalive.as_mut() => {
                    tracing::info!(%peer, "HBONE peer did not answer PING within {timeout:?}; closing");
                    break;
                }
            }
        } else {
            monoio::select! {
                r = h2.accept() => r,
                _ = keepalive.as_mut() => {
                    tracing::info!(%peer, "HBONE peer did not answer PING within {timeout:?}; closing");
                    break;
                }
                _ = crate::worker::pods::draining(ctx, accepted.pod.as_deref()) => {
                    // Drain starts (the proxy's, or the pod's): GOAWAY, open streams may
                    // finish, new ones are refused.
                    h2.graceful_shutdown();
                    goaway_sent = true;
                    continue;
                }
                _ = accepted.retire.wait() => {
                    // Its workload is gone: no new stream, the open ones may finish.
                    tracing::info!(%peer, uid = %accepted.workload.uid, "HBONE connection's workload is gone; sending GOAWAY");
                    h2.graceful_shutdown();
                    goaway_sent = true;
                    continue;
                }
            }
        };
        match next {
            Some(Ok((request, respond))) => {
                // The current config for each stream: pooled connections outlive generations.
                let snap = ctx.snapshot();
                let task = stream(ctx.clone(), snap, accepted.clone(), request, respond);
                monoio::spawn(crate::worker::contained(ctx.id, "hbone stream", task));
            }
            Some(Err(e)) => {
                tracing::debug!(%peer, error = %e, "HBONE connection ended");
                break;
            }
            None => break,
        }
    }
}

fn status_only(status: StatusCode) -> Response<()> {
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    resp
}

/// One CONNECT stream, from its headers to its access-log line.
async fn stream(
    ctx: Rc<WorkerCtx>,
    snap: LocalSnapshot,
    accepted: Rc<Accepted>,
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) {
    let pod_id = accepted.pod.as_ref().map_or(0, |p| p.id());
    let mut conn = Connection::new(&ctx, Direction::Inbound, accepted.peer, pod_id);
    describe_source(&mut conn, &ctx, &snap, &accepted, &request);
    let res = match admit(&ctx, &snap, &mut conn, &accepted, &request) {
        // Only the body goes on: the request's head would otherwise be kept twice in this
        // task's state for the stream's whole life.
        Ok(target) => connect(&ctx, &mut conn, &accepted, target, request.into_body(), respond).await,
        Err(refusal) => {
            tracing::info!(peer = %accepted.peer, status = refusal.status().as_u16(), "HBONE CONNECT refused: {refusal}");
            let _ = respond.send_response(status_only(refusal.status()), true);
            Err(ProxyError::Refused(refusal))
        }
    };
    conn.finish(&ctx, res);
}

/// A connection on the proxy's own HBONE listener (in-pod mode, no pod): for the proxy itself.
fn serves_itself(ctx: &WorkerCtx, accepted: &Accepted) -> bool {
    ctx.cfg.inpod && accepted.pod.is_none()
}

/// What is known of the source before any check: the peer's proven identity, and its workload
/// (ours by address if it has that identity; else what the peer says of itself in `baggage`).
fn describe_source(
    conn: &mut Connection,
    ctx: &WorkerCtx,
    snap: &LocalSnapshot,
    accepted: &Accepted,
    request: &http::Request<h2::RecvStream>,
) {
    let log = &mut conn.log;
    log.dst_hbone_addr = Some(accepted.dst);
    log.path = Some(SetupPath::InboundHbone);
    log.src_identity = accepted.peer_id.clone().map(Box::new);
    log.src_workload = snap
        .workload_by_ip(&ctx.cfg.network, accepted.peer.ip())
        .filter(|w| accepted.peer_id.as_ref() == Some(&w.identity()))
        .cloned();
    if log.src_workload.is_none() {
        log.src_baggage =
            request.headers().get("baggage").and_then(|v| v.to_str().ok()).map(|b| Box::new(Peer::from_baggage(b)));
    }
}

/// The checks of COMPAT.md in order, then authorization against the current config in the same
/// synchronous step as registering it for re-checks. Returns the target to dial.
fn admit(
    ctx: &WorkerCtx,
    snap: &LocalSnapshot,
    conn: &mut Connection,
    accepted: &Accepted,
    request: &http::Request<h2::RecvStream>,
) -> Result<SocketAddr, Refusal> {
    let authority = request.uri().authority().map(|a| a.as_str());
    let target = target::parse_request(request.method(), authority)?;
    let conn_workload = (accepted.dst.ip(), accepted.workload.uid.as_str());
    // The proxy's own HBONE listener (in-pod mode) exists to reach its metrics port over mTLS:
    // that one of its ports is a target there, and only there.
    let allowed = serves_itself(ctx, accepted).then(|| ctx.cfg.listeners.metrics.port());
    if let Err(refusal) = target::check_target(snap, &ctx.cfg.network, (&ctx.own, allowed), conn_workload, target) {
        if matches!(refusal, Refusal::WorkloadGone { .. }) {
            accepted.retire.fire();
        }
        return Err(refusal);
    }
    tracing::info!(
        peer_ip = %accepted.peer.ip(),
        peer_id = %accepted.peer_id.as_ref().map(|i| i as &dyn std::fmt::Display).unwrap_or(&"unknown"),
        "got CONNECT request to {target}"
    );
    conn.log.dst_addr = Some(target);
    conn.log.dst_workload = Some(accepted.workload.clone());
    let current = ctx.snapshot();
    let workload = current.workload_by_uid(&accepted.workload.uid).unwrap_or(&accepted.workload);
    let rbac_conn = rbac::Conn { src_ip: accepted.peer.ip(), identity: accepted.peer_id.clone(), dst: target };
    crate::worker::authz::check(&current, workload, &rbac_conn, "HBONE").map_err(Refusal::Denied)?;
    conn.guard().set_authz(AuthzInfo { conn: rbac_conn, workload_uid: workload.uid.clone() });
    Ok(target)
}

/// Dials the pod, answers `200`, and relays until either side ends or the connection is closed.
async fn connect(
    ctx: &WorkerCtx,
    conn: &mut Connection,
    accepted: &Accepted,
    target: SocketAddr,
    body: h2::RecvStream,
    mut respond: h2::server::SendResponse<Bytes>,
) -> Result<(), ProxyError> {
    let peer_ip = accepted.peer.ip();
    // The proxy's own pod has no rules routing replies to a spoofed source back: not there.
    let spoof_source = (ctx.spoof_source && peer_ip != target.ip() && !serves_itself(ctx, accepted)).then_some(peer_ip);
    let opts = ctx.dial_opts(accepted.pod.as_deref(), spoof_source);
    let upstream = match dial(target, opts).await {
        Ok(u) => u,
        Err(e) => {
            let refusal = Refusal::Upstream(e);
            let _ = respond.send_response(status_only(refusal.status()), true);
            return Err(ProxyError::Refused(refusal));
        }
    };
    let send = respond
        .send_response(status_only(StatusCode::OK), false)
        .map_err(|e| ProxyError::Hbone(format!("answering CONNECT: {e}")))?;
    conn.established(ctx, 0);
    if accepted.pod.is_some() {
        conn.guard().set_destination(None, target, if accepted.peer_id.is_some() { "HBONE" } else { "TCP" });
    }
    // Downstream is the HTTP/2 side here: what the peer sends goes to the pod.
    let stats = conn.stats();
    let close = conn.guard().close_signal().wait();
    let end = super::relay::relay(upstream, send, body, &stats.sent, &stats.received, close).await;
    conn.relay_result(end)
}
