//! Outbound: a local workload's connection, captured on 15001 (or asked for through SOCKS5),
//! routed by the snapshot and carried upstream.

use std::net::SocketAddr;

use monoio::net::TcpStream;

use super::authz;
use super::conns::{AuthzInfo, ConnGuard};
use super::error::ProxyError;
use super::hbone_client;
use super::{Established, Upstream, WorkerCtx, original_dst};
use crate::config::ProxyMode;
use crate::net::{DialOpts, dial};
use crate::rbac;
use crate::routing::{self, Transport};
use crate::snapshot::Snapshot;
use crate::telemetry::access::ConnLog;
use crate::telemetry::metrics::SetupPath;

/// A connection captured on the outbound listener: find where it was going and connect there.
pub async fn captured(
    ctx: &WorkerCtx,
    guard: &ConnGuard,
    stream: TcpStream,
    peer: SocketAddr,
    log: &mut ConnLog,
) -> Result<Established, ProxyError> {
    let dst = original_dst(&stream, peer, ctx.addrs.outbound)?;
    let snap = ctx.snapshot();
    let upstream = connect(ctx, guard, &snap, log, peer, dst).await?;
    Ok(Established { downstream: stream, upstream, early_bytes: 0 })
}

/// Resolves the source workload and the route, and connects upstream. Fills in `log`.
pub async fn connect(
    ctx: &WorkerCtx,
    guard: &ConnGuard,
    snap: &Snapshot,
    log: &mut ConnLog,
    peer: SocketAddr,
    dst: SocketAddr,
) -> Result<Upstream, ProxyError> {
    let source = match ctx.cfg.proxy_mode {
        ProxyMode::Dedicated => snap.dedicated_workload(),
        ProxyMode::Shared => snap.local_workload_by_ip(&ctx.cfg.network, peer.ip()),
    }
    .ok_or(ProxyError::UnknownSource(peer.ip()))?;
    log.src_workload = Some(source.clone());
    if ctx.is_own_port(dst) {
        return Err(routing::RouteError::Loop(dst).into());
    }
    let route = routing::outbound(snap, source, dst, &mut |n| fastrand::u64(..n))?;
    log.dst_workload = route.workload.clone();
    log.dst_service = route.service.clone();
    log.path = Some(SetupPath::Tcp);
    log.dst_addr = Some(route.upstream);
    if ctx.is_own_port(route.upstream) {
        return Err(routing::RouteError::Loop(route.upstream).into());
    }
    if let Some(wp) = routing::waypoint(snap, source, &route, &mut |n| fastrand::u64(..n))? {
        // Through the waypoint: its identity on the wire, the original destination (VIP:port,
        // untranslated) as the CONNECT authority.
        if ctx.is_own_port(wp.hbone_addr) && wp.hbone_addr.ip().is_loopback() {
            return Err(routing::RouteError::Loop(wp.hbone_addr).into());
        }
        log.dst_hbone_addr = Some(wp.hbone_addr);
        log.path = Some(SetupPath::Hbone);
        tracing::info!(src = %peer, "proxy to {dst} using HBONE via {} type ToServerWaypoint", wp.hbone_addr);
        let host = route.service.as_ref().map(|s| s.service.hostname.as_str());
        let stream = hbone_client::connect(ctx, source, &wp.identities, wp.hbone_addr, dst, peer, host).await?;
        return Ok(Upstream::Hbone(stream));
    }
    if route.transport == Transport::Hbone {
        let Some(dst_wl) = route.workload.as_ref() else {
            return Err(ProxyError::HboneUnavailable(dst.to_string()));
        };
        let network = ctx.cfg.network.as_str();
        if ctx.cfg.node_local_fast_path && snap.local_workload_by_ip(network, route.upstream.ip()).is_some() {
            // Served by this proxy: no TLS, no HTTP/2; the inbound checks run here, against the
            // current config, and the connection is registered for re-checks.
            log.path = Some(SetupPath::FastPath);
            super::inbound_hbone::check_target(ctx, snap, route.upstream.ip(), route.upstream)
                .map_err(|(_, why)| ProxyError::Refused(why))?;
            let current = ctx.snapshot();
            let conn = rbac::Conn { src_ip: peer.ip(), identity: Some(source.identity()), dst: route.upstream };
            authz::check(&current, dst_wl, &conn, "node local fast path")
                .map_err(|d| ProxyError::Refused(format!("RBAC: {d}")))?;
            guard.set_authz(AuthzInfo { conn, workload_uid: dst_wl.uid.clone() });
            tracing::info!(src = %peer, "proxy to {} using node local fast path", route.upstream);
            let spoof_source = (ctx.spoof_source && peer.ip() != route.upstream.ip()).then_some(peer.ip());
            let opts = DialOpts { mark: ctx.cfg.packet_mark, spoof_source, timeout: ctx.cfg.connect_timeout };
            return Ok(Upstream::Tcp(dial(route.upstream, opts).await?));
        }
        let hbone_addr = SocketAddr::new(route.upstream.ip(), ctx.hbone_port());
        // The destination workload's identity, or any the service names.
        let mut expected = vec![dst_wl.identity()];
        if let Some(svc) = &route.service {
            expected.extend(svc.service.subject_alt_names.iter().filter_map(|s| s.parse().ok()));
        }
        log.dst_hbone_addr = Some(hbone_addr);
        log.path = Some(SetupPath::Hbone);
        tracing::info!(src = %peer, "proxy to {} using HBONE via {hbone_addr} type Direct", route.upstream);
        let host = route.service.as_ref().map(|s| s.service.hostname.as_str());
        let stream = hbone_client::connect(ctx, source, &expected, hbone_addr, route.upstream, peer, host).await?;
        return Ok(Upstream::Hbone(stream));
    }
    tracing::debug!(src = %peer, %dst, upstream = %route.upstream, transport = ?route.transport, "proxying outbound");
    let opts = DialOpts { mark: ctx.cfg.packet_mark, spoof_source: None, timeout: ctx.cfg.connect_timeout };
    Ok(Upstream::Tcp(dial(route.upstream, opts).await?))
}
