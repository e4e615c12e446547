//! Inbound plaintext (15006): a non-HBONE connection addressed to a pod on this node, captured
//! on its way in. Only local workloads are served; the client's address is kept as the source
//! when original-source spoofing is enabled.

use std::net::SocketAddr;

use monoio::net::TcpStream;

use super::authz;
use super::conns::AuthzInfo;
use super::error::ProxyError;
use super::lifecycle::{Connection, Established, Upstream};
use super::pods::{self, PodNet};
use super::{WorkerCtx, original_dst};
use crate::hbone::target::Refusal;
use crate::net::dial;
use crate::rbac;
use crate::routing::RouteError;
use crate::telemetry::metrics::SetupPath;

pub async fn handle(
    ctx: &WorkerCtx,
    conn: &mut Connection,
    stream: TcpStream,
    peer: SocketAddr,
    pod: Option<&PodNet>,
) -> Result<Established, ProxyError> {
    let listener = match pod {
        Some(_) => SocketAddr::new(ctx.addrs.inbound_plain.ip(), pods::INBOUND_PLAIN_PORT),
        None => ctx.addrs.inbound_plain,
    };
    let dst = original_dst(&stream, peer, listener)?;
    // The proxy's own ports are never a plaintext target.
    if ctx.own.is_own_port(dst, None) {
        return Err(RouteError::Loop(dst).into());
    }
    let snap = match pod {
        Some(p) => ctx.pod_snapshot(p).await?,
        None => ctx.snapshot(),
    };
    let network = ctx.cfg.network.as_str();
    let target = snap.local_workload_by_ip(network, dst.ip()).ok_or(ProxyError::UnknownLocalDestination(dst))?;
    // Inside a pod, only that pod is served.
    if let Some(p) = pod {
        if p.workload(&snap).is_none_or(|w| w.uid != target.uid) {
            return Err(ProxyError::NotThisPod(dst, p.spec.uid.clone()));
        }
    }
    let log = &mut conn.log;
    log.dst_workload = Some(target.clone());
    log.src_workload = snap.workload_by_ip(network, peer.ip()).cloned();
    log.dst_addr = Some(dst);
    log.path = Some(SetupPath::InboundPlain);
    // No identity in plaintext: STRICT mode (a DENY for connections without a principal) refuses.
    let rbac_conn = rbac::Conn { src_ip: peer.ip(), identity: None, dst };
    authz::check(&snap, target, &rbac_conn, "plaintext inbound")
        .map_err(|d| ProxyError::Refused(Refusal::Denied(d)))?;
    conn.guard().set_authz(AuthzInfo { conn: rbac_conn, workload_uid: target.uid.clone() });
    let spoof_source = (ctx.spoof_source && peer.ip() != dst.ip()).then_some(peer.ip());
    let opts = ctx.dial_opts(pod, spoof_source);
    let upstream = dial(dst, opts).await?;
    conn.guard().set_destination(Some(dst), dst, "TCP");
    Ok(Established { downstream: stream, upstream: Upstream::Tcp(upstream), early_bytes: 0 })
}
