//! Outbound routing decisions, pure: original destination + source workload + snapshot ->
//! where to connect and how. No I/O; randomness comes in as a function so tests are exact.
//!
//! [`plan`] is the whole decision for one outbound connection (waypoint, node-local fast path,
//! HBONE, plain TCP, passthrough, or refused with the reason); the worker then only dials what
//! the plan says. Loop prevention lives here, in one place.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::model::{
    GatewayDestination, HealthPolicy, HealthStatus, Identity, IpFamilies, LoadBalancerMode, Protocol,
    RoutingPreference, Workload,
};
use crate::net::OwnAddrs;
use crate::snapshot::{ServiceEndpoint, ServiceEntry, Snapshot};

/// How the connection leaves the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Plain TCP to a workload not in the mesh.
    Tcp,
    /// HBONE to a mesh workload (needs mTLS).
    Hbone,
    /// Plain TCP to an address the mesh does not know.
    Passthrough,
}

#[derive(Debug, Clone)]
pub struct Route {
    /// The address to connect to (endpoint IP and mapped target port).
    pub upstream: SocketAddr,
    pub transport: Transport,
    pub workload: Option<Arc<Workload>>,
    pub service: Option<Arc<ServiceEntry>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("destination {0} is one of the proxy's own ports; refusing to loop")]
    Loop(SocketAddr),
    #[error("service {service} has no port {port}")]
    NoServicePort { service: String, port: u16 },
    #[error("service {0} has no healthy endpoint for this source")]
    NoHealthyEndpoint(String),
    #[error("workload {0} has no IP address to connect to")]
    NoWorkloadAddress(String),
    #[error("waypoint {0} is not a known workload or service with a usable endpoint")]
    WaypointUnresolved(String),
    #[error("HBONE destination {0} has no workload identity to verify; refusing rather than sending in clear")]
    NoIdentity(SocketAddr),
}

/// The waypoint a connection must go through: HBONE to `hbone_addr`, the server being one of
/// `identities`, with the original destination as the CONNECT authority.
#[derive(Debug, Clone)]
pub struct WaypointRoute {
    pub workload: Arc<Workload>,
    pub hbone_addr: SocketAddr,
    pub identities: Vec<Identity>,
}

/// A waypoint's workload and the identities it may present.
type WaypointPick = (Arc<Workload>, Vec<Identity>);

/// The waypoint for `route`, if one applies: the service's waypoint for traffic to a service,
/// the workload's for traffic addressed to a workload. None when the source is that waypoint
/// itself (its own outbound goes to the destination, never back to itself).
pub fn waypoint(
    snap: &Snapshot,
    source: &Workload,
    route: &Route,
    rand: &mut dyn FnMut(u64) -> u64,
) -> Result<Option<WaypointRoute>, RouteError> {
    let gateway = match (&route.service, &route.workload) {
        (Some(svc), _) => svc.service.waypoint.as_ref(),
        (None, Some(wl)) => wl.waypoint.as_ref(),
        (None, None) => None,
    };
    let Some(gateway) = gateway else { return Ok(None) };
    let port = if gateway.hbone_mtls_port == 0 { 15008 } else { gateway.hbone_mtls_port };
    let unresolved = || RouteError::WaypointUnresolved(gateway.destination.to_string());
    // A waypoint given as a service: one of its endpoints, never the source itself.
    let mut via_service = |svc: &crate::snapshot::ServiceEntry| -> Result<Option<WaypointPick>, RouteError> {
        if svc.endpoints.iter().any(|ep| ep.workload.uid == source.uid) {
            return Ok(None);
        }
        let ep = pick_endpoint(svc, source, port, port, rand).ok_or_else(unresolved)?;
        let sans = svc.service.subject_alt_names.iter().filter_map(|s| s.parse().ok()).collect();
        Ok(Some((ep.workload.clone(), sans)))
    };
    let found = match &gateway.destination {
        // An address is a service's VIP first (as Istio looks it up), then a workload's.
        GatewayDestination::Address(addr) => match snap.service_by_vip(&addr.network, addr.address) {
            Some(svc) => via_service(svc)?,
            None => {
                let wl = snap.workload_by_ip(&addr.network, addr.address).ok_or_else(unresolved)?;
                (wl.uid != source.uid).then(|| (wl.clone(), Vec::new()))
            }
        },
        GatewayDestination::Hostname(name) => via_service(snap.service(name).ok_or_else(unresolved)?)?,
    };
    let Some((workload, mut identities)) = found else { return Ok(None) };
    let ip = pick_ip(&workload, route.upstream.ip()).ok_or_else(unresolved)?;
    identities.insert(0, workload.identity());
    Ok(Some(WaypointRoute { workload, hbone_addr: SocketAddr::new(ip, port), identities }))
}

/// Resolves where a connection from `source` to the original destination `dst` goes.
///
/// `rand(n)` returns a uniform value in `0..n`.
pub fn outbound(
    snap: &Snapshot,
    source: &Workload,
    dst: SocketAddr,
    rand: &mut dyn FnMut(u64) -> u64,
) -> Result<Route, RouteError> {
    outbound_preferring(snap, source, dst, None, rand)
}

/// [`outbound`] with `PREFERED_SERVICE_NAMESPACE` for services sharing a VIP.
pub fn outbound_preferring(
    snap: &Snapshot,
    source: &Workload,
    dst: SocketAddr,
    preferred_namespace: Option<&str>,
    rand: &mut dyn FnMut(u64) -> u64,
) -> Result<Route, RouteError> {
    let network = source.network.as_str();
    if let Some(svc) = snap.service_by_vip_for(network, dst.ip(), &source.namespace, preferred_namespace) {
        return via_service(svc, source, dst, rand);
    }
    if let Some(wl) = snap.workload_by_ip(network, dst.ip()) {
        return Ok(Route { upstream: dst, transport: transport_of(wl), workload: Some(wl.clone()), service: None });
    }
    Ok(Route { upstream: dst, transport: Transport::Passthrough, workload: None, service: None })
}

fn transport_of(wl: &Workload) -> Transport {
    match wl.protocol {
        Protocol::HBONE => Transport::Hbone,
        Protocol::TCP => Transport::Tcp,
    }
}

fn via_service(
    svc: &Arc<ServiceEntry>,
    source: &Workload,
    dst: SocketAddr,
    rand: &mut dyn FnMut(u64) -> u64,
) -> Result<Route, RouteError> {
    let name = || svc.service.namespaced_hostname().to_string();
    let lb = svc.service.load_balancer.as_ref();
    if lb.is_some_and(|lb| lb.mode == LoadBalancerMode::Passthrough) {
        return Ok(Route {
            upstream: dst,
            transport: Transport::Passthrough,
            workload: None,
            service: Some(svc.clone()),
        });
    }
    let Some(&svc_target) = svc.service.ports.get(&dst.port()) else {
        return Err(RouteError::NoServicePort { service: name(), port: dst.port() });
    };
    let ep = pick_endpoint(svc, source, dst.port(), svc_target, rand)
        .ok_or_else(|| RouteError::NoHealthyEndpoint(name()))?;
    let port = ep.ports.get(&dst.port()).copied().filter(|p| *p != 0).unwrap_or(svc_target);
    let ip = pick_ip_for(&ep.workload, dst.ip(), svc.service.ip_families)
        .ok_or_else(|| RouteError::NoWorkloadAddress(ep.workload.uid.clone()))?;
    Ok(Route {
        upstream: SocketAddr::new(ip, port),
        transport: transport_of(&ep.workload),
        workload: Some(ep.workload.clone()),
        service: Some(svc.clone()),
    })
}

/// What the proxy knows of itself when it plans a connection.
#[derive(Debug, Clone, Copy)]
pub struct PlanContext<'a> {
    /// The network the proxy's own workloads are in (for "is this destination served here").
    pub network: &'a str,
    /// The proxy's own listening addresses: a destination among them would loop.
    pub own: &'a OwnAddrs,
    /// `ENABLE_NODE_LOCAL_FAST_PATH`.
    pub fast_path: bool,
    /// The port peers accept HBONE on.
    pub hbone_port: u16,
    /// `PREFERED_SERVICE_NAMESPACE`: among services sharing a VIP, after the client's namespace
    /// and a canonical one.
    pub preferred_namespace: Option<&'a str>,
}

/// How an outbound connection leaves the proxy.
#[derive(Debug)]
pub enum Action {
    /// HBONE to the destination's waypoint, with the original destination (untranslated) as the
    /// CONNECT authority.
    Waypoint { waypoint: WaypointRoute, authority: SocketAddr },
    /// The destination runs on this node and is served by this proxy: no TLS, no HTTP/2; the
    /// inbound checks run in-process before dialing the pod.
    FastPath { target: SocketAddr, workload: Arc<Workload> },
    /// HBONE to the destination workload's HBONE port, CONNECT to `target`, the server being one
    /// of `identities` (the workload's, or any the service names).
    Hbone { hbone_addr: SocketAddr, target: SocketAddr, identities: Vec<Identity> },
    /// Plain TCP: to a workload outside the mesh, or passthrough to an address nobody knows.
    Tcp { upstream: SocketAddr },
}

/// The decision for one outbound connection: the route (for logs and metrics) and the action.
#[derive(Debug)]
pub struct Plan {
    pub route: Route,
    pub action: Action,
}

/// Decides how a connection from `source` to the original destination `dst` leaves the proxy.
/// Refusals carry their reason; a loop is refused whether it is the destination, the chosen
/// endpoint or the waypoint that points back at the proxy.
pub fn plan(
    snap: &Snapshot,
    at: &PlanContext<'_>,
    source: &Workload,
    dst: SocketAddr,
    rand: &mut dyn FnMut(u64) -> u64,
) -> Result<Plan, RouteError> {
    if at.own.is_loop(dst) {
        return Err(RouteError::Loop(dst));
    }
    let route = outbound_preferring(snap, source, dst, at.preferred_namespace, rand)?;
    if at.own.is_loop(route.upstream) {
        return Err(RouteError::Loop(route.upstream));
    }
    if let Some(waypoint) = waypoint(snap, source, &route, rand)? {
        if at.own.is_loop(waypoint.hbone_addr) {
            return Err(RouteError::Loop(waypoint.hbone_addr));
        }
        return Ok(Plan { route, action: Action::Waypoint { waypoint, authority: dst } });
    }
    let action = match (route.transport, &route.workload) {
        (Transport::Hbone, None) => return Err(RouteError::NoIdentity(dst)),
        (Transport::Hbone, Some(wl))
            if at.fast_path && snap.local_workload_by_ip(at.network, route.upstream.ip()).is_some() =>
        {
            Action::FastPath { target: route.upstream, workload: wl.clone() }
        }
        (Transport::Hbone, Some(wl)) => {
            let mut identities = vec![wl.identity()];
            if let Some(svc) = &route.service {
                identities.extend(svc.service.subject_alt_names.iter().filter_map(|s| s.parse().ok()));
            }
            let hbone_addr = SocketAddr::new(route.upstream.ip(), at.hbone_port);
            Action::Hbone { hbone_addr, target: route.upstream, identities }
        }
        (Transport::Tcp | Transport::Passthrough, _) => Action::Tcp { upstream: route.upstream },
    };
    Ok(Plan { route, action })
}

/// The workload address to use: same IP family as the original destination when it has one.
fn pick_ip(wl: &Workload, like: IpAddr) -> Option<IpAddr> {
    wl.workload_ips.iter().find(|ip| ip.is_ipv4() == like.is_ipv4()).or(wl.workload_ips.first()).copied()
}

/// Whether a service's `ip_families` lets traffic reach `ip`.
fn family_allowed(families: Option<IpFamilies>, ip: &IpAddr) -> bool {
    match families {
        Some(IpFamilies::IPv4) => ip.is_ipv4(),
        Some(IpFamilies::IPv6) => ip.is_ipv6(),
        _ => true,
    }
}

/// [`pick_ip`] among the addresses the service's `ip_families` allows.
fn pick_ip_for(wl: &Workload, like: IpAddr, families: Option<IpFamilies>) -> Option<IpAddr> {
    let allowed = || wl.workload_ips.iter().filter(|ip| family_allowed(families, ip));
    allowed().find(|ip| ip.is_ipv4() == like.is_ipv4()).or_else(|| allowed().next()).copied()
}

/// Picks an endpoint: healthy (unless the service allows all), with a usable port, in the
/// best locality tier the service's routing preferences allow, weighted by capacity.
pub fn pick_endpoint<'a>(
    svc: &'a ServiceEntry,
    source: &Workload,
    svc_port: u16,
    svc_target: u16,
    rand: &mut dyn FnMut(u64) -> u64,
) -> Option<&'a ServiceEndpoint> {
    let lb = svc.service.load_balancer.as_ref();
    let allow_unhealthy = lb.is_some_and(|lb| lb.health_policy == HealthPolicy::AllowAll);
    let usable = |ep: &&ServiceEndpoint| {
        (allow_unhealthy || (ep.status == HealthStatus::Healthy && ep.workload.status == HealthStatus::Healthy))
            && (svc_target != 0 || ep.ports.get(&svc_port).is_some_and(|p| *p != 0))
            && ep.workload.workload_ips.iter().any(|ip| family_allowed(svc.service.ip_families, ip))
            && ep.workload.capacity > 0
    };
    let mut candidates: Vec<(&ServiceEndpoint, usize)> =
        svc.endpoints.iter().filter(usable).map(|ep| (ep, 0)).collect();
    if let Some(lb) = lb.filter(|lb| matches!(lb.mode, LoadBalancerMode::Strict | LoadBalancerMode::Failover)) {
        for (ep, rank) in candidates.iter_mut() {
            *rank = locality_rank(&lb.routing_preferences, source, &ep.workload);
        }
        if lb.mode == LoadBalancerMode::Strict {
            candidates.retain(|(_, rank)| *rank == lb.routing_preferences.len());
        }
        let best = candidates.iter().map(|(_, r)| *r).max()?;
        candidates.retain(|(_, r)| *r == best);
    }
    let total: u64 = candidates.iter().map(|(ep, _)| u64::from(ep.workload.capacity)).sum();
    if total == 0 {
        return None;
    }
    let mut point = rand(total);
    for (ep, _) in &candidates {
        let w = u64::from(ep.workload.capacity);
        if point < w {
            return Some(ep);
        }
        point -= w;
    }
    None
}

/// How many leading routing preferences the endpoint shares with the source.
fn locality_rank(prefs: &[RoutingPreference], src: &Workload, dst: &Workload) -> usize {
    // No locality compares as all-empty fields.
    let (sl, dl) = (src.locality.as_ref(), dst.locality.as_ref());
    let same =
        |f: for<'x> fn(&'x crate::model::Locality) -> &'x str| sl.map(f).unwrap_or("") == dl.map(f).unwrap_or("");
    prefs
        .iter()
        .take_while(|p| match p {
            RoutingPreference::Region => same(|l| l.region.as_str()),
            RoutingPreference::Zone => same(|l| l.zone.as_str()),
            RoutingPreference::Subzone => same(|l| l.subzone.as_str()),
            RoutingPreference::Node => src.node == dst.node,
            RoutingPreference::Cluster => src.cluster_id == dst.cluster_id,
            RoutingPreference::Network => src.network == dst.network,
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ConfigState;
    use crate::snapshot::{LocalScope, SourceInfo};

    fn snapshot(yaml: &str) -> Snapshot {
        let state = crate::control::local::parse(yaml).unwrap();
        Snapshot::build(1, SourceInfo { kind: "test", location: String::new() }, LocalScope::Node(None), state)
    }

    const BASE: &str = r#"
workloads:
- {uid: src, name: src, namespace: ns, workloadIps: [10.0.0.1], node: n1, locality: {region: r1, zone: z1, subzone: s1}}
- uid: e1
  name: e1
  namespace: ns
  workloadIps: [10.0.1.1]
  node: n1
  locality: {region: r1, zone: z1, subzone: s1}
  services: {"ns/web": {80: 8080}}
- uid: e2
  name: e2
  namespace: ns
  workloadIps: [10.0.1.2]
  node: n2
  protocol: HBONE
  capacity: 3
  locality: {region: r1, zone: z2, subzone: s1}
  services: {"ns/web": {80: 9090}}
- uid: sick
  name: sick
  namespace: ns
  workloadIps: [10.0.1.3]
  status: Unhealthy
  services: {"ns/web": {80: 8080}}
services:
- {name: web, namespace: ns, hostname: web, vips: ["/10.96.0.1"], ports: {80: 8080}}
"#;

    fn count_picks(snap: &Snapshot, dst: &str, n: u64) -> std::collections::BTreeMap<String, u64> {
        let src = snap.workload_by_uid("src").unwrap().clone();
        let mut counts = std::collections::BTreeMap::new();
        for i in 0..n {
            let mut r = |total: u64| i % total;
            let route = outbound(snap, &src, dst.parse().unwrap(), &mut r).unwrap();
            *counts.entry(route.workload.unwrap().uid.clone()).or_insert(0) += 1;
        }
        counts
    }

    #[test]
    fn ip_families_filter_endpoints_and_their_addresses() {
        let yaml = r#"
workloads:
- {uid: src, name: src, namespace: ns, workloadIps: [10.0.0.1]}
- {uid: v4, name: v4, namespace: ns, workloadIps: [10.0.1.1], services: {"ns/six": {80: 80}}}
- {uid: dual, name: dual, namespace: ns, workloadIps: [10.0.1.2, "fd00::2"], services: {"ns/six": {80: 80}}}
services:
- {name: six, namespace: ns, hostname: six, vips: ["/10.96.0.6"], ports: {80: 80}, ipFamilies: IPv6}
"#;
        let snap = snapshot(yaml);
        let src = snap.workload_by_uid("src").unwrap().clone();
        for i in 0..10 {
            let r = outbound(&snap, &src, "10.96.0.6:80".parse().unwrap(), &mut |n| i % n).unwrap();
            assert_eq!(r.upstream, "[fd00::2]:80".parse().unwrap(), "only IPv6 endpoints, by their IPv6 address");
        }
    }

    #[test]
    fn service_vip_maps_port_and_weights_by_capacity() {
        let snap = snapshot(BASE);
        let counts = count_picks(&snap, "10.96.0.1:80", 400);
        assert_eq!(counts.get("e1"), Some(&100));
        assert_eq!(counts.get("e2"), Some(&300), "capacity 3 gets three times the share");
        assert!(!counts.contains_key("sick"), "unhealthy endpoints are never picked");
        let src = snap.workload_by_uid("src").unwrap().clone();
        let r = outbound(&snap, &src, "10.96.0.1:80".parse().unwrap(), &mut |_| 3).unwrap();
        assert_eq!(r.upstream, "10.0.1.2:9090".parse().unwrap(), "the endpoint's own port mapping wins");
        assert_eq!(r.transport, Transport::Hbone);
        let r = outbound(&snap, &src, "10.96.0.1:80".parse().unwrap(), &mut |_| 0).unwrap();
        assert_eq!(r.upstream, "10.0.1.1:8080".parse().unwrap());
        assert_eq!(r.transport, Transport::Tcp);
    }

    #[test]
    fn workload_unknown_and_errors() {
        let snap = snapshot(BASE);
        let src = snap.workload_by_uid("src").unwrap().clone();
        let mut r0 = |_| 0;
        let r = outbound(&snap, &src, "10.0.1.1:7000".parse().unwrap(), &mut r0).unwrap();
        assert_eq!(r.workload.unwrap().uid, "e1");
        assert_eq!(r.upstream, "10.0.1.1:7000".parse().unwrap());
        let r = outbound(&snap, &src, "192.0.2.9:443".parse().unwrap(), &mut r0).unwrap();
        assert_eq!(r.transport, Transport::Passthrough);
        assert!(matches!(
            outbound(&snap, &src, "10.96.0.1:81".parse().unwrap(), &mut r0),
            Err(RouteError::NoServicePort { port: 81, .. })
        ));
        let own = OwnAddrs::default();
        let at = PlanContext { network: "", own: &own, fast_path: true, hbone_port: 15008, preferred_namespace: None };
        assert!(matches!(
            plan(&snap, &at, &src, "127.0.0.1:15001".parse().unwrap(), &mut r0),
            Err(RouteError::Loop(_))
        ));
        assert!(
            outbound(&snap, &src, "127.0.0.1:8080".parse().unwrap(), &mut r0).is_ok(),
            "other loopback ports are fine"
        );
    }

    #[test]
    fn locality_strict_and_failover() {
        let with_lb = |mode: &str| {
            BASE.replace(
                "ports: {80: 8080}}",
                &format!("ports: {{80: 8080}}, loadBalancer: {{routingPreferences: [Region, Zone], mode: {mode}, healthPolicy: OnlyHealthy}}}}"),
            )
        };
        // Failover: e1 shares region and zone with the source, so it takes everything.
        let counts = count_picks(&snapshot(&with_lb("Failover")), "10.96.0.1:80", 50);
        assert_eq!(counts.get("e1"), Some(&50));
        // Strict with e1 unhealthy: nobody matches both preferences -> no endpoint.
        let strict =
            with_lb("Strict").replace("workloadIps: [10.0.1.1]", "workloadIps: [10.0.1.1]\n  status: Unhealthy");
        let snap = snapshot(&strict);
        let src = snap.workload_by_uid("src").unwrap().clone();
        assert!(matches!(
            outbound(&snap, &src, "10.96.0.1:80".parse().unwrap(), &mut |_| 0),
            Err(RouteError::NoHealthyEndpoint(_))
        ));
        // Failover with e1 unhealthy falls over to e2 (same region only).
        let failover =
            with_lb("Failover").replace("workloadIps: [10.0.1.1]", "workloadIps: [10.0.1.1]\n  status: Unhealthy");
        let counts = count_picks(&snapshot(&failover), "10.96.0.1:80", 20);
        assert_eq!(counts.get("e2"), Some(&20));
        // AllowAll health policy lets the unhealthy endpoint in.
        let all = BASE.replace(
            "ports: {80: 8080}}",
            "ports: {80: 8080}, loadBalancer: {routingPreferences: [], mode: Standard, healthPolicy: AllowAll}}",
        );
        assert!(count_picks(&snapshot(&all), "10.96.0.1:80", 50).contains_key("sick"));
    }

    #[test]
    fn passthrough_mode_and_empty_state() {
        let pt = BASE.replace(
            "ports: {80: 8080}}",
            "ports: {80: 8080}, loadBalancer: {routingPreferences: [], mode: Passthrough, healthPolicy: OnlyHealthy}}",
        );
        let snap = snapshot(&pt);
        let src = snap.workload_by_uid("src").unwrap().clone();
        let r = outbound(&snap, &src, "10.96.0.1:80".parse().unwrap(), &mut |_| 0).unwrap();
        assert_eq!((r.transport, r.upstream), (Transport::Passthrough, "10.96.0.1:80".parse().unwrap()));
        let empty = Snapshot::build(
            1,
            SourceInfo { kind: "t", location: String::new() },
            LocalScope::Node(None),
            ConfigState::default(),
        );
        let r = outbound(&empty, &src, "10.96.0.1:80".parse().unwrap(), &mut |_| 0).unwrap();
        assert_eq!(r.transport, Transport::Passthrough);
    }

    #[test]
    fn waypoints_for_services_and_workloads_and_never_to_itself() {
        let yaml = r#"
workloads:
- {uid: src, name: src, namespace: ns, workloadIps: [10.0.0.1], protocol: HBONE}
- {uid: wp, name: wp, namespace: ns, serviceAccount: waypoint, workloadIps: [10.0.5.5], protocol: HBONE, services: {"ns/waypoint.ns.svc": {15008: 15008}}}
- uid: pod
  name: pod
  namespace: ns
  workloadIps: [10.0.1.1]
  protocol: HBONE
  waypoint: {destination: "/10.0.5.5", hboneMtlsPort: 15008}
  services: {"ns/web": {80: 8080}}
services:
- {name: web, namespace: ns, hostname: web, vips: ["/10.96.0.1"], ports: {80: 8080}, waypoint: {destination: "ns/waypoint.ns.svc", hboneMtlsPort: 0}, subjectAltNames: ["spiffe://cluster.local/ns/ns/sa/extra"]}
- {name: waypoint, namespace: ns, hostname: waypoint.ns.svc, vips: [], ports: {15008: 15008}}
"#;
        let snap = snapshot(yaml);
        let src = snap.workload_by_uid("src").unwrap().clone();
        let wp_wl = snap.workload_by_uid("wp").unwrap().clone();
        let via = |from: &Workload, dst: &str| {
            let route = outbound(&snap, from, dst.parse().unwrap(), &mut |_| 0).unwrap();
            waypoint(&snap, from, &route, &mut |_| 0).unwrap()
        };
        // Service traffic: the service's waypoint (by hostname; port 0 means 15008), expected
        // to present the waypoint's identity (web's own SANs are not the waypoint's).
        let wp = via(&src, "10.96.0.1:80").expect("service waypoint");
        assert_eq!(wp.hbone_addr, "10.0.5.5:15008".parse().unwrap());
        assert_eq!(wp.workload.uid, "wp");
        assert_eq!(wp.identities, vec!["spiffe://cluster.local/ns/ns/sa/waypoint".parse::<Identity>().unwrap()]);
        // Traffic addressed to the pod: the workload's waypoint (by address).
        assert_eq!(via(&src, "10.0.1.1:8080").unwrap().hbone_addr, "10.0.5.5:15008".parse().unwrap());
        // The waypoint's own outbound goes straight on.
        assert!(via(&wp_wl, "10.96.0.1:80").is_none());
        assert!(via(&wp_wl, "10.0.1.1:8080").is_none());
        // No waypoint configured: none.
        assert!(via(&src, "10.0.5.5:15008").is_none());
        // A waypoint nobody can resolve is an error, not a silent bypass.
        let broken = snapshot(&yaml.replace("ns/waypoint.ns.svc\", hbone", "ns/nowhere.ns.svc\", hbone"));
        let route = outbound(&broken, &src, "10.96.0.1:80".parse().unwrap(), &mut |_| 0).unwrap();
        assert!(matches!(waypoint(&broken, &src, &route, &mut |_| 0), Err(RouteError::WaypointUnresolved(_))));
    }
    #[test]
    fn plan_decides_each_path_and_refuses_loops() {
        let yaml = r#"
workloads:
- {uid: src, name: src, namespace: ns, workloadIps: [10.0.0.1], node: n1, protocol: HBONE}
- {uid: near, name: near, namespace: ns, workloadIps: [10.0.0.2], node: n1, protocol: HBONE}
- {uid: far, name: far, namespace: ns, serviceAccount: far, workloadIps: [10.0.1.2], node: n2, protocol: HBONE, services: {"ns/far": {80: 8080}}}
- {uid: legacy, name: legacy, namespace: ns, workloadIps: [10.0.2.1], node: n2}
- {uid: wp, name: wp, namespace: ns, serviceAccount: waypoint, workloadIps: [10.0.5.5], node: n2, protocol: HBONE}
- {uid: behind, name: behind, namespace: ns, workloadIps: [10.0.3.1], node: n2, protocol: HBONE, waypoint: {destination: "/10.0.5.5", hboneMtlsPort: 15008}}
- {uid: looping, name: looping, namespace: ns, workloadIps: [127.0.0.1], node: n2, services: {"ns/loop": {80: 15001}}}
- {uid: self-wp, name: self-wp, namespace: ns, workloadIps: [10.0.3.2], node: n2, protocol: HBONE, waypoint: {destination: "/127.0.0.1", hboneMtlsPort: 15008}}
services:
- {name: far, namespace: ns, hostname: far, vips: ["/10.96.0.2"], ports: {80: 8080}, subjectAltNames: ["spiffe://cluster.local/ns/ns/sa/extra"]}
- {name: loop, namespace: ns, hostname: loop, vips: ["/10.96.0.9"], ports: {80: 15001}}
"#;
        let state = crate::control::local::parse(yaml).unwrap();
        let source = SourceInfo { kind: "test", location: String::new() };
        let snap = Snapshot::build(1, source, LocalScope::Node(Some("n1".into())), state);
        let src = snap.workload_by_uid("src").unwrap().clone();
        let own = OwnAddrs::default();
        let at = PlanContext { network: "", own: &own, fast_path: true, hbone_port: 15008, preferred_namespace: None };
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        let plan_for = |at: &PlanContext<'_>, dst: &str| plan(&snap, at, &src, sa(dst), &mut |_| 0);

        let p = plan_for(&at, "10.0.0.2:80").unwrap();
        assert!(
            matches!(&p.action, Action::FastPath { target, workload } if *target == sa("10.0.0.2:80") && workload.uid == "near")
        );
        let no_fast = PlanContext { fast_path: false, ..at };
        let p = plan_for(&no_fast, "10.0.0.2:80").unwrap();
        assert!(matches!(p.action, Action::Hbone { hbone_addr, .. } if hbone_addr == sa("10.0.0.2:15008")));

        let p = plan_for(&at, "10.96.0.2:80").unwrap();
        let Action::Hbone { hbone_addr, target, identities } = p.action else { panic!("far is HBONE: {:?}", p.action) };
        assert_eq!((hbone_addr, target), (sa("10.0.1.2:15008"), sa("10.0.1.2:8080")));
        let ids: Vec<String> = identities.iter().map(|i| i.to_string()).collect();
        assert_eq!(ids, ["spiffe://cluster.local/ns/ns/sa/far", "spiffe://cluster.local/ns/ns/sa/extra"]);
        assert_eq!(p.route.service.unwrap().service.name, "far");

        let p = plan_for(&at, "10.0.2.1:5432").unwrap();
        assert!(matches!(p.action, Action::Tcp { upstream } if upstream == sa("10.0.2.1:5432")));
        assert_eq!(p.route.transport, Transport::Tcp);
        let p = plan_for(&at, "192.0.2.1:443").unwrap();
        assert!(matches!(p.action, Action::Tcp { .. }));
        assert_eq!(p.route.transport, Transport::Passthrough);

        let p = plan_for(&at, "10.0.3.1:80").unwrap();
        let Action::Waypoint { waypoint, authority } = p.action else { panic!("behind a waypoint: {:?}", p.action) };
        assert_eq!((waypoint.hbone_addr, authority), (sa("10.0.5.5:15008"), sa("10.0.3.1:80")));

        // Loops, wherever they come from: the destination, the endpoint a service picks, the
        // waypoint. A proxy port on another address is not a loop.
        assert!(matches!(plan_for(&at, "127.0.0.1:15006"), Err(RouteError::Loop(a)) if a == sa("127.0.0.1:15006")));
        assert!(matches!(plan_for(&at, "10.96.0.9:80"), Err(RouteError::Loop(a)) if a == sa("127.0.0.1:15001")));
        assert!(matches!(plan_for(&at, "10.0.3.2:80"), Err(RouteError::Loop(a)) if a == sa("127.0.0.1:15008")));
        assert!(plan_for(&at, "192.0.2.1:15001").is_ok());
    }
}
