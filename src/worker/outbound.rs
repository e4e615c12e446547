//! Outbound: a local workload's connection, captured on 15001 (or asked for through SOCKS5).
//! The source workload and `routing::plan` decide; this file only dials what the plan says.

use std::net::SocketAddr;

use monoio::net::TcpStream;

use super::authz;
use super::conns::AuthzInfo;
use super::error::ProxyError;
use super::lifecycle::{Connection, Established, Upstream};
use super::pods::{self, PodNet};
use super::{WorkerCtx, original_dst};
use crate::config::ProxyMode;
use crate::hbone::client::Origin;
use crate::hbone::{client as hbone_client, target};
use crate::net::dial;
use crate::rbac;
use crate::routing::{self, Action, PlanContext};
use crate::snapshot::Snapshot;
use crate::telemetry::metrics::SetupPath;

/// A connection captured on the outbound listener: find where it was going and connect there.
pub async fn captured(
    ctx: &WorkerCtx,
    conn: &mut Connection,
    stream: TcpStream,
    peer: SocketAddr,
    pod: Option<&PodNet>,
) -> Result<Established, ProxyError> {
    let listener = match pod {
        Some(_) => SocketAddr::new(ctx.addrs.outbound.ip(), pods::OUTBOUND_PORT),
        None => ctx.addrs.outbound,
    };
    let dst = original_dst(&stream, peer, listener)?;
    let snap = match pod {
        Some(p) => ctx.pod_snapshot(p).await?,
        None => ctx.snapshot(),
    };
    let upstream = connect(ctx, conn, &snap, peer, dst, pod).await?;
    Ok(Established { downstream: stream, upstream, early_bytes: 0 })
}

/// Resolves the source workload and the plan, and connects upstream. Fills in the log record.
pub async fn connect(
    ctx: &WorkerCtx,
    conn: &mut Connection,
    snap: &Snapshot,
    peer: SocketAddr,
    dst: SocketAddr,
    pod: Option<&PodNet>,
) -> Result<Upstream, ProxyError> {
    // A pod's traffic is the pod's, whatever its address; otherwise the source is the dedicated
    // proxy's workload, or the local workload with the client's address.
    let source = match (pod, ctx.cfg.proxy_mode) {
        (Some(p), _) => p.workload(snap),
        (None, ProxyMode::Dedicated) => snap.dedicated_workload(),
        (None, ProxyMode::Shared) => snap.local_workload_by_ip(&ctx.cfg.network, peer.ip()),
    }
    .ok_or(ProxyError::UnknownSource(peer.ip()))?;
    conn.log.src_workload = Some(source.clone());
    let at = PlanContext {
        network: &ctx.cfg.network,
        own: &ctx.own,
        // In-pod, a destination pod on this node is reached in its own namespace, through its
        // HBONE listener: the fast path's direct connect would leave from the wrong namespace.
        fast_path: ctx.cfg.node_local_fast_path && !ctx.cfg.inpod,
        hbone_port: ctx.hbone_port(),
        preferred_namespace: ctx.cfg.preferred_service_namespace.as_deref(),
    };
    let plan = routing::plan(snap, &at, source, dst, &mut |n| fastrand::u64(..n))?;
    if pod.is_some() {
        let (actual, protocol) = match &plan.action {
            Action::Waypoint { waypoint, .. } => (waypoint.hbone_addr, "HBONE"),
            Action::Hbone { hbone_addr, .. } => (*hbone_addr, "HBONE"),
            Action::FastPath { target, .. } => (*target, "TCP"),
            Action::Tcp { upstream } => (*upstream, "TCP"),
        };
        conn.guard().set_destination(Some(dst), actual, protocol);
    }
    let log = &mut conn.log;
    log.dst_workload = plan.route.workload.clone();
    log.dst_service = plan.route.service.clone();
    log.dst_addr = Some(plan.route.upstream);
    let host = plan.route.service.as_ref().map(|s| s.service.hostname.as_str());
    match plan.action {
        Action::Waypoint { waypoint, authority } => {
            log.dst_hbone_addr = Some(waypoint.hbone_addr);
            log.path = Some(SetupPath::Hbone);
            tracing::info!(src = %peer, "proxy to {dst} using HBONE via {} type ToServerWaypoint", waypoint.hbone_addr);
            let stream = Box::pin(hbone_client::connect(
                ctx,
                source,
                &waypoint.identities,
                waypoint.hbone_addr,
                authority,
                Origin { client: peer, pod },
                host,
            ))
            .await?;
            Ok(Upstream::Hbone(stream))
        }
        Action::FastPath { target, workload } => {
            log.path = Some(SetupPath::FastPath);
            fast_path(ctx, conn, snap, source.identity(), &workload, peer, target).await
        }
        Action::Hbone { hbone_addr, target, identities } => {
            log.dst_hbone_addr = Some(hbone_addr);
            log.path = Some(SetupPath::Hbone);
            tracing::info!(src = %peer, "proxy to {target} using HBONE via {hbone_addr} type Direct");
            // Boxed, here and above: the HBONE dial (TLS and HTTP/2 handshakes) is by far the
            // largest state of a connection's setup, and an unboxed one would size every
            // setup task, and every move of it at spawn, after it.
            let stream = Box::pin(hbone_client::connect(
                ctx,
                source,
                &identities,
                hbone_addr,
                target,
                Origin { client: peer, pod },
                host,
            ))
            .await?;
            Ok(Upstream::Hbone(stream))
        }
        Action::Tcp { upstream } => {
            log.path = Some(SetupPath::Tcp);
            tracing::debug!(src = %peer, %dst, %upstream, transport = ?plan.route.transport, "proxying outbound");
            let opts = ctx.dial_opts(pod, None);
            Ok(Upstream::Tcp(dial(upstream, opts).await?))
        }
    }
}

/// A destination served by this proxy: no TLS, no HTTP/2. The inbound checks and authorization
/// run here against the current config, and the connection is registered for re-checks.
async fn fast_path(
    ctx: &WorkerCtx,
    conn: &Connection,
    snap: &Snapshot,
    src_identity: crate::model::Identity,
    workload: &crate::model::Workload,
    peer: SocketAddr,
    dst: SocketAddr,
) -> Result<Upstream, ProxyError> {
    target::check_target(snap, &ctx.cfg.network, (&ctx.own, None), (dst.ip(), &workload.uid), dst)
        .map_err(ProxyError::Refused)?;
    let current = ctx.snapshot();
    let rbac_conn = rbac::Conn { src_ip: peer.ip(), identity: Some(src_identity), dst };
    authz::check(&current, workload, &rbac_conn, "node local fast path")
        .map_err(|d| ProxyError::Refused(target::Refusal::Denied(d)))?;
    conn.guard().set_authz(AuthzInfo { conn: rbac_conn, workload_uid: workload.uid.clone() });
    tracing::info!(src = %peer, "proxy to {dst} using node local fast path");
    let spoof_source = (ctx.spoof_source && peer.ip() != dst.ip()).then_some(peer.ip());
    let opts = ctx.dial_opts(None, spoof_source);
    Ok(Upstream::Tcp(dial(dst, opts).await?))
}
