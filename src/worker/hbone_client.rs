//! Outbound HBONE: mutual TLS to the destination's `:15008` with the source workload's
//! certificate, the server checked to be the destination's identity, HTTP/2 with Istio's
//! settings, then `CONNECT ip:targetPort`.
//!
//! Streams share connections through the worker's pool (`hbone_pool`).

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use rustls::ClientConnection;
use rustls::pki_types::ServerName;

use super::WorkerCtx;
use super::error::ProxyError;
use super::hbone_pool::{Checkout, HbonePool, PoolKey, PooledConn, StreamSlot};
use crate::model::{Identity, Workload};
use crate::net::{DialOpts, dial};
use crate::snapshot::Snapshot;
use crate::tls::stream::TlsStream;

/// An established CONNECT stream.
pub struct HboneStream {
    pub send: h2::SendStream<Bytes>,
    pub recv: h2::RecvStream,
    /// The stream's place on its pooled connection, given back when the stream ends.
    pub _slot: StreamSlot,
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

/// A random W3C trace id for the `traceparent` header (also the log correlation id).
fn traceparent() -> String {
    format!("00-{:016x}{:016x}-{:016x}-01", fastrand::u64(..), fastrand::u64(..), fastrand::u64(1..))
}

/// Opens a CONNECT stream to `target` (the workload's `ip:targetPort`) through `hbone_addr`.
pub async fn connect(
    ctx: &WorkerCtx,
    snap: &Snapshot,
    source: &Workload,
    expected: &[Identity],
    hbone_addr: SocketAddr,
    target: SocketAddr,
    client: SocketAddr,
) -> Result<HboneStream, ProxyError> {
    let identity = source.identity();
    let mut dst_ids = expected.to_vec();
    dst_ids.sort();
    dst_ids.dedup();
    let key = PoolKey { src_id: identity.clone(), dst_ids, dst: hbone_addr, src_ip: client.ip() };
    let (send_request, slot) = loop {
        match ctx.pool.checkout(&key) {
            Checkout::Ready(send, slot) => break (send, slot),
            Checkout::Wait(dial) => {
                // One dial per key: wait for it, then take a stream on what it made.
                monoio::time::timeout(ctx.cfg.connect_timeout, dial.wait())
                    .await
                    .map_err(|_| hbone_err("waiting for a pooled connection", format!("to {hbone_addr} timed out")))?;
            }
            Checkout::Dial(_) => {
                let mut guard = DialGuard { pool: &ctx.pool, key: &key, done: false };
                let conn = dial_connection(ctx, snap, &identity, expected, hbone_addr).await?;
                guard.done = true;
                tracing::debug!(src = %identity, dst = %hbone_addr, "new pooled HBONE connection");
                break ctx.pool.dialed(&key, conn);
            }
        }
    };
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .header("forwarded", format!("for=\"{client}\""))
        .header("traceparent", traceparent())
        .body(())
        .map_err(|e| hbone_err("building CONNECT", e))?;
    let mut ready = send_request.ready().await.map_err(|e| hbone_err("HTTP/2 connection", e))?;
    let (response, send) = ready.send_request(request, false).map_err(|e| hbone_err("sending CONNECT", e))?;
    let response = response.await.map_err(|e| hbone_err("CONNECT response", e))?;
    if response.status() != StatusCode::OK {
        return Err(ProxyError::Hbone(format!("{hbone_addr} answered CONNECT {target} with {}", response.status())));
    }
    Ok(HboneStream { send, recv: response.into_body(), _slot: slot })
}

/// A new mTLS + HTTP/2 connection to `hbone_addr`, with its driver task running.
async fn dial_connection(
    ctx: &WorkerCtx,
    snap: &Snapshot,
    identity: &Identity,
    expected: &[Identity],
    hbone_addr: SocketAddr,
) -> Result<Rc<PooledConn>, ProxyError> {
    let cert = snap.certs.get(identity).cloned().ok_or_else(|| ProxyError::NoCertificate(identity.to_string()))?;
    let opts = DialOpts { mark: ctx.cfg.packet_mark, spoof_source: None, timeout: ctx.cfg.connect_timeout };
    let tcp = dial(hbone_addr, opts).await?;
    let conn = ClientConnection::new(cert.client_config(), ServerName::IpAddress(hbone_addr.ip().into()))
        .map_err(|e| hbone_err("TLS client setup", e))?;
    let tls = monoio::time::timeout(ctx.cfg.connect_timeout, TlsStream::handshake(tcp, conn))
        .await
        .map_err(|_| hbone_err("TLS handshake", format!("timed out with {hbone_addr}")))?
        .map_err(|e| hbone_err(&format!("TLS handshake with {hbone_addr}"), e))?;
    crate::tls::check_server_identity(tls.conn().peer_certificates(), expected)
        .map_err(|e| hbone_err(&format!("server {hbone_addr}"), e))?;
    let (send_request, connection) = h2::client::Builder::new()
        .initial_window_size(4 * 1024 * 1024)
        .initial_connection_window_size(16 * 1024 * 1024)
        .max_frame_size(1024 * 1024)
        .max_header_list_size(16 * 1024)
        .enable_push(false)
        .handshake::<_, Bytes>(tls)
        .await
        .map_err(|e| hbone_err("HTTP/2 handshake", e))?;
    let dead = Rc::new(Cell::new(false));
    let flag = dead.clone();
    // The driver moves the connection's bytes; when it ends the pool drops the connection.
    monoio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "HBONE client connection ended");
        }
        flag.set(true);
    });
    Ok(PooledConn::new(send_request, dead))
}
