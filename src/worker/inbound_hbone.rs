//! Inbound HBONE (15008): mutual TLS presenting the certificate of the workload the connection
//! is for (known from the address the client dialed, before the handshake), then HTTP/2 with
//! Istio's settings. Each CONNECT stream is a task on this worker: checks in COMPAT.md order,
//! connect to the pod, `200`, then bytes both ways. Drain sends GOAWAY and lets streams finish.

use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use monoio::net::TcpStream;
use rustls::ServerConnection;

use super::authz;
use super::conns::{AuthzInfo, Direction};
use super::error::ProxyError;
use super::{LocalSnapshot, WorkerCtx};
use crate::model::{Identity, Workload};
use crate::net::relay::{RelayEnd, RelayStats};
use crate::net::{DialOpts, canonical, dial};
use crate::rbac;
use crate::snapshot::Snapshot;
use crate::telemetry::access::ConnLog;
use crate::telemetry::metrics::{Peer, SetupPath};
use crate::tls::stream::TlsStream;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves one HBONE connection until the peer closes it or drain ends it.
pub async fn serve(ctx: Rc<WorkerCtx>, stream: TcpStream, peer: SocketAddr) {
    let guard = ctx.conns.register(Direction::Inbound, peer);
    // The worker-local handle: cloning it per stream is not atomic.
    let snap: LocalSnapshot = ctx.snapshot();
    let dst = match stream.local_addr() {
        Ok(a) => canonical(a),
        Err(e) => return tracing::warn!(%peer, error = %e, "HBONE: no local address"),
    };
    let network = ctx.cfg.network.as_str();
    let Some(workload) = snap.local_workload_by_ip(network, dst.ip()).cloned() else {
        return tracing::warn!(%peer, %dst, "HBONE connection for an address that is not a local workload; closing");
    };
    let identity = workload.identity();
    // Normally in the snapshot already; right after start (or a config push) it may still be on
    // its way from the control thread: wait for it rather than refuse the peer.
    let cert = match ctx.certificate(&identity, HANDSHAKE_TIMEOUT).await {
        Ok(c) => c,
        Err(e) => {
            return tracing::warn!(%peer, %identity, "HBONE connection for a workload without a certificate: {e}; closing");
        }
    };
    let conn = match ServerConnection::new(cert.server_config()) {
        Ok(c) => c,
        Err(e) => return tracing::error!(error = %e, "HBONE: TLS server setup failed"),
    };
    let tls = match monoio::time::timeout(HANDSHAKE_TIMEOUT, TlsStream::handshake(stream, conn)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return tracing::info!(%peer, error = %e, "HBONE TLS handshake failed"),
        Err(_) => return tracing::info!(%peer, "HBONE TLS handshake timed out"),
    };
    let peer_id = crate::tls::peer_identity(tls.conn().peer_certificates());
    let mut h2 = match h2::server::Builder::new()
        .initial_window_size(4 * 1024 * 1024)
        .initial_connection_window_size(16 * 1024 * 1024)
        .max_frame_size(1024 * 1024)
        .max_header_list_size(64 * 1024)
        .max_concurrent_streams(200)
        .handshake::<_, Bytes>(tls)
        .await
    {
        Ok(h) => h,
        Err(e) => return tracing::info!(%peer, error = %e, "HBONE HTTP/2 handshake failed"),
    };
    let close = guard.close_signal().clone();
    let mut goaway_sent = false;
    let (interval, timeout) = (ctx.cfg.hbone_keepalive_interval, ctx.cfg.hbone_keepalive_timeout);
    let mut keepalive = std::pin::pin!(super::hbone_client::keepalive(h2.ping_pong(), interval, timeout));
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
                _ = ctx.draining.wait() => {
                    // Drain starts: GOAWAY, open streams may finish, new ones are refused.
                    h2.graceful_shutdown();
                    goaway_sent = true;
                    continue;
                }
            }
        };
        match next {
            Some(Ok((request, respond))) => {
                let stream = Stream {
                    ctx: ctx.clone(),
                    // The current config for each stream: pooled connections outlive generations.
                    snap: ctx.snapshot(),
                    dst,
                    peer,
                    peer_id: peer_id.clone(),
                    workload: workload.clone(),
                };
                monoio::spawn(stream.run(request, respond));
            }
            Some(Err(e)) => {
                tracing::debug!(%peer, error = %e, "HBONE connection ended");
                break;
            }
            None => break,
        }
    }
    drop(guard);
}

/// One CONNECT stream.
struct Stream {
    ctx: Rc<WorkerCtx>,
    snap: LocalSnapshot,
    /// The address the client dialed (a local workload's IP, port 15008).
    dst: SocketAddr,
    peer: SocketAddr,
    peer_id: Option<Identity>,
    workload: Arc<Workload>,
}

/// Why a CONNECT is answered with an error status.
fn refuse(respond: &mut h2::server::SendResponse<Bytes>, status: StatusCode) {
    let _ = respond.send_response(status_only(status), true);
}

fn status_only(status: StatusCode) -> Response<()> {
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    resp
}

impl Stream {
    async fn run(self, request: http::Request<h2::RecvStream>, mut respond: h2::server::SendResponse<Bytes>) {
        let mut log = ConnLog::new("inbound", self.peer);
        log.dst_hbone_addr = Some(self.dst);
        log.path = Some(SetupPath::InboundHbone);
        log.src_identity = self.peer_id.clone().map(Box::new);
        // The source workload: ours by address if it has the identity the peer proved; else what
        // the peer says of itself in `baggage` (bounded and validated).
        log.src_workload = self
            .snap
            .workload_by_ip(&self.ctx.cfg.network, self.peer.ip())
            .filter(|w| self.peer_id.as_ref() == Some(&w.identity()))
            .cloned();
        if log.src_workload.is_none() {
            log.src_baggage =
                request.headers().get("baggage").and_then(|v| v.to_str().ok()).map(|b| Box::new(Peer::from_baggage(b)));
        }
        let target = match self.check(&request) {
            Ok(t) => t,
            Err((status, why)) => {
                tracing::info!(peer = %self.peer, status = status.as_u16(), "HBONE CONNECT refused: {why}");
                return refuse(&mut respond, status);
            }
        };
        tracing::info!(
            peer_ip = %self.peer.ip(),
            peer_id = %self.peer_id.as_ref().map(|i| i as &dyn std::fmt::Display).unwrap_or(&"unknown"),
            "got CONNECT request to {target}"
        );
        log.dst_addr = Some(target);
        log.dst_workload = Some(self.workload.clone());
        // Registered, then authorized against the current config in the same step: a policy
        // change after this re-checks it (and the drain deadline closes it).
        let guard = self.ctx.conns.register(Direction::Inbound, self.peer);
        let current = self.ctx.snapshot();
        let workload = current.workload_by_uid(&self.workload.uid).unwrap_or(&self.workload);
        let conn = rbac::Conn { src_ip: self.peer.ip(), identity: self.peer_id.clone(), dst: target };
        if let Err(denied) = authz::check(&current, workload, &conn, "HBONE") {
            refuse(&mut respond, StatusCode::UNAUTHORIZED);
            let e = ProxyError::Refused(format!("RBAC: {denied}"));
            super::count_failed(&self.ctx, &log, &e);
            return log.finish(&RelayStats::default(), Some(&e));
        }
        guard.set_authz(AuthzInfo { conn, workload_uid: workload.uid.clone() });
        let spoof_source = (self.ctx.spoof_source && self.peer.ip() != target.ip()).then_some(self.peer.ip());
        let opts = DialOpts { mark: self.ctx.cfg.packet_mark, spoof_source, timeout: self.ctx.cfg.connect_timeout };
        let upstream = match dial(target, opts).await {
            Ok(u) => u,
            Err(e) => {
                refuse(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
                let e = ProxyError::Dial(e);
                super::count_failed(&self.ctx, &log, &e);
                return log.finish(&RelayStats::default(), Some(&e));
            }
        };
        let send = match respond.send_response(status_only(StatusCode::OK), false) {
            Ok(s) => s,
            Err(e) => return log.finish(&RelayStats::default(), Some(&ProxyError::Io(std::io::Error::other(e)))),
        };
        let stats = Rc::new(RelayStats::default());
        let counted = super::count_open(&self.ctx, &log, &stats);
        // Downstream is the HTTP/2 side here: what the peer sends goes to the pod.
        let res = super::hbone_relay::relay(
            upstream,
            send,
            request.into_body(),
            &stats.sent,
            &stats.received,
            guard.close_signal().wait(),
        )
        .await;
        let res = match res {
            Ok(RelayEnd::Done) => Ok(()),
            Ok(RelayEnd::Closed) => Err(ProxyError::Drained),
            Err(e) => Err(ProxyError::Io(e)),
        };
        log.finish(&stats, res.as_ref().err().map(|e| e as &dyn std::fmt::Display));
        drop(counted);
    }

    /// The checks of COMPAT.md, in its order. Returns the target or the status to answer.
    fn check(&self, request: &http::Request<h2::RecvStream>) -> Result<SocketAddr, (StatusCode, String)> {
        if request.method() != Method::CONNECT {
            return Err((StatusCode::BAD_REQUEST, format!("method {} is not CONNECT", request.method())));
        }
        let authority = request.uri().authority().map(|a| a.as_str()).unwrap_or("");
        let target: SocketAddr = authority
            .parse()
            .map(canonical)
            .map_err(|_| (StatusCode::BAD_REQUEST, format!("authority {authority:?} is not ip:port")))?;
        check_target(&self.ctx, &self.snap, self.dst.ip(), target)?;
        Ok(target)
    }
}

/// The checks on a CONNECT target after its syntax, in COMPAT.md's order: a workload served
/// here, the one this connection is for (`conn_dst`), a port that is not the proxy's own. Shared
/// with the node-local fast path, where `conn_dst` is the target itself.
pub fn check_target(
    ctx: &WorkerCtx,
    snap: &Snapshot,
    conn_dst: IpAddr,
    target: SocketAddr,
) -> Result<(), (StatusCode, String)> {
    let network = ctx.cfg.network.as_str();
    if snap.local_workload_by_ip(network, target.ip()).is_none() {
        return Err((StatusCode::SERVICE_UNAVAILABLE, format!("{target} is not a workload served here")));
    }
    if target.ip() != conn_dst {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("target {target} is not the workload this connection is for ({conn_dst})"),
        ));
    }
    if ctx.own_ports.contains(&target.port()) || target.port() == 0 {
        return Err((StatusCode::SERVICE_UNAVAILABLE, format!("port {} is not allowed", target.port())));
    }
    Ok(())
}
