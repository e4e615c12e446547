//! Outbound HBONE: mutual TLS to the destination's `:15008` with the source workload's
//! certificate, the server checked to be the destination's identity, HTTP/2 with Istio's
//! settings, then `CONNECT ip:targetPort`.
//!
//! One HBONE connection per proxied connection for now; the per-worker pool (streams sharing a
//! connection per source/destination key) is the next step.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use rustls::ClientConnection;
use rustls::pki_types::ServerName;

use super::WorkerCtx;
use super::error::ProxyError;
use crate::model::{Identity, Workload};
use crate::net::{DialOpts, dial};
use crate::snapshot::Snapshot;
use crate::tls::stream::TlsStream;

/// An established CONNECT stream.
pub struct HboneStream {
    pub send: h2::SendStream<Bytes>,
    pub recv: h2::RecvStream,
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
    let cert = snap.certs.get(&identity).cloned().ok_or_else(|| ProxyError::NoCertificate(identity.to_string()))?;
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
    // The connection task drives the socket for the stream; it ends with the stream.
    monoio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "HBONE client connection ended");
        }
    });
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
    Ok(HboneStream { send, recv: response.into_body() })
}
