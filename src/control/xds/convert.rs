//! istiod's resources (protobuf) into our model. Every conversion is `TryFrom`; an error names
//! the field and why, and the caller prefixes the resource name, so a NACK reads like
//! `ns/web: services[0]... port 70000 out of range`.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::proto::security as psec;
use super::proto::workload as pwl;
use crate::model::{
    Action, ApplicationTunnel, Authorization, GatewayAddress, GatewayDestination, HealthPolicy, HealthStatus,
    IpFamilies, IpNet, LoadBalancer, LoadBalancerMode, Locality, NamespacedHostname, NetworkAddress, NetworkMode,
    PolicyScope, Protocol, RbacMatch, RoutingPreference, Service, ServiceAccountMatch, StringMatch, TunnelProtocol,
    Visibility, Workload,
};

/// Why a resource could not be converted: the field path and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertError {
    pub field: String,
    pub reason: String,
}

impl std::fmt::Display for ConvertError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl std::error::Error for ConvertError {}

fn err(field: impl Into<String>, reason: impl Into<String>) -> ConvertError {
    ConvertError { field: field.into(), reason: reason.into() }
}

/// Prefixes an error's field with `outer` (`outer.field` or `outer[i].field`).
fn within(outer: &str, e: ConvertError) -> ConvertError {
    let field = if e.field.starts_with('[') { format!("{outer}{}", e.field) } else { format!("{outer}.{}", e.field) };
    ConvertError { field, reason: e.reason }
}

fn ip(field: &str, bytes: &[u8]) -> Result<IpAddr, ConvertError> {
    match bytes.len() {
        4 => Ok(IpAddr::from(<[u8; 4]>::try_from(bytes).expect("length checked"))),
        16 => Ok(IpAddr::from(<[u8; 16]>::try_from(bytes).expect("length checked")).to_canonical()),
        n => Err(err(field, format!("an IP address is 4 or 16 bytes, got {n}"))),
    }
}

fn port(field: &str, p: u32) -> Result<u16, ConvertError> {
    u16::try_from(p).map_err(|_| err(field, format!("port {p} out of range")))
}

fn enum_value<T: TryFrom<i32>>(field: &str, v: i32) -> Result<T, ConvertError> {
    T::try_from(v).map_err(|_| err(field, format!("unknown enum value {v}")))
}

/// Identity parts may not contain `/` (they become a SPIFFE path).
fn name_part(field: &str, v: &str) -> Result<(), ConvertError> {
    if v.contains('/') { Err(err(field, format!("{v:?} may not contain '/'"))) } else { Ok(()) }
}

impl TryFrom<pwl::NetworkAddress> for NetworkAddress {
    type Error = ConvertError;
    fn try_from(a: pwl::NetworkAddress) -> Result<Self, ConvertError> {
        Ok(NetworkAddress { network: a.network, address: ip("address", &a.address)? })
    }
}

impl TryFrom<pwl::GatewayAddress> for GatewayAddress {
    type Error = ConvertError;
    fn try_from(g: pwl::GatewayAddress) -> Result<Self, ConvertError> {
        let destination = match g.destination {
            Some(pwl::gateway_address::Destination::Address(a)) => {
                GatewayDestination::Address(NetworkAddress::try_from(a).map_err(|e| within("address", e))?)
            }
            Some(pwl::gateway_address::Destination::Hostname(h)) => {
                if h.hostname.is_empty() {
                    return Err(err("hostname.hostname", "empty"));
                }
                GatewayDestination::Hostname(NamespacedHostname { namespace: h.namespace, hostname: h.hostname })
            }
            None => return Err(err("destination", "missing (neither address nor hostname)")),
        };
        Ok(GatewayAddress { destination, hbone_mtls_port: port("hbone_mtls_port", g.hbone_mtls_port)? })
    }
}

fn gateway(field: &str, g: Option<pwl::GatewayAddress>) -> Result<Option<GatewayAddress>, ConvertError> {
    g.map(GatewayAddress::try_from).transpose().map_err(|e| within(field, e))
}

impl TryFrom<pwl::Workload> for Workload {
    type Error = ConvertError;
    fn try_from(w: pwl::Workload) -> Result<Self, ConvertError> {
        if w.uid.is_empty() {
            return Err(err("uid", "empty"));
        }
        name_part("namespace", &w.namespace)?;
        name_part("service_account", &w.service_account)?;
        let workload_ips =
            w.addresses.iter().enumerate().map(|(i, a)| ip(&format!("addresses[{i}]"), a)).collect::<Result<_, _>>()?;
        let protocol = match enum_value::<pwl::TunnelProtocol>("tunnel_protocol", w.tunnel_protocol)? {
            pwl::TunnelProtocol::Hbone => Protocol::HBONE,
            pwl::TunnelProtocol::None => Protocol::TCP,
            pwl::TunnelProtocol::LegacyIstioMtls => {
                return Err(err("tunnel_protocol", "LEGACY_ISTIO_MTLS is not supported"));
            }
        };
        let status = match enum_value::<pwl::WorkloadStatus>("status", w.status)? {
            pwl::WorkloadStatus::Healthy => HealthStatus::Healthy,
            pwl::WorkloadStatus::Unhealthy => HealthStatus::Unhealthy,
        };
        let workload_type = match enum_value::<pwl::WorkloadType>("workload_type", w.workload_type)? {
            pwl::WorkloadType::Deployment => "deployment",
            pwl::WorkloadType::Cronjob => "cronjob",
            pwl::WorkloadType::Pod => "pod",
            pwl::WorkloadType::Job => "job",
        };
        let network_mode = match enum_value::<pwl::NetworkMode>("network_mode", w.network_mode)? {
            pwl::NetworkMode::Standard => NetworkMode::Standard,
            pwl::NetworkMode::HostNetwork => NetworkMode::HostNetwork,
        };
        let application_tunnel = match w.application_tunnel {
            None => None,
            Some(t) => Some(ApplicationTunnel {
                protocol: match enum_value::<pwl::application_tunnel::Protocol>(
                    "application_tunnel.protocol",
                    t.protocol,
                )? {
                    pwl::application_tunnel::Protocol::None => TunnelProtocol::NONE,
                    pwl::application_tunnel::Protocol::Proxy => TunnelProtocol::PROXY,
                },
                port: if t.port == 0 { None } else { Some(port("application_tunnel.port", t.port)?) },
            }),
        };
        let mut services = BTreeMap::new();
        for (key, list) in w.services {
            let field = format!("services[{key:?}]");
            let name: NamespacedHostname = key.parse().map_err(|e: String| err(&field, e))?;
            let mut ports = BTreeMap::new();
            for (i, p) in list.ports.iter().enumerate() {
                ports.insert(
                    port(&format!("{field}.ports[{i}].service_port"), p.service_port)?,
                    port(&format!("{field}.ports[{i}].target_port"), p.target_port)?,
                );
            }
            services.insert(name, ports);
        }
        Ok(Workload {
            uid: w.uid,
            name: w.name,
            namespace: w.namespace,
            trust_domain: w.trust_domain,
            service_account: w.service_account,
            workload_ips,
            protocol,
            network_mode,
            network: w.network,
            node: w.node,
            waypoint: gateway("waypoint", w.waypoint)?,
            network_gateway: gateway("network_gateway", w.network_gateway)?,
            hostname: w.hostname,
            workload_name: w.workload_name,
            workload_type: workload_type.into(),
            canonical_name: w.canonical_name,
            canonical_revision: w.canonical_revision,
            native_tunnel: w.native_tunnel,
            application_tunnel,
            authorization_policies: w.authorization_policies,
            status,
            cluster_id: w.cluster_id,
            locality: w.locality.map(|l| Locality { region: l.region, zone: l.zone, subzone: l.subzone }),
            capacity: w.capacity.unwrap_or(1),
            services,
        })
    }
}

impl TryFrom<pwl::Service> for Service {
    type Error = ConvertError;
    fn try_from(s: pwl::Service) -> Result<Self, ConvertError> {
        if s.hostname.is_empty() {
            return Err(err("hostname", "empty"));
        }
        // Traffic split over several waypoints is not implemented: refused by name (the
        // resource is NACKed) rather than sent past the waypoints.
        if !s.weighted_waypoints.is_empty() {
            return Err(err("weighted_waypoints", "not supported by this proxy"));
        }
        let (mut vips, mut cidr_vips) = (Vec::new(), Vec::new());
        for (i, a) in s.addresses.into_iter().enumerate() {
            let length = a.length;
            let addr = NetworkAddress::try_from(a).map_err(|e| within(&format!("addresses[{i}]"), e))?;
            let max = if addr.address.is_ipv4() { 32 } else { 128 };
            match length {
                // A length short of the whole address makes the address a range.
                Some(len) if len < max => cidr_vips.push(crate::model::NetworkCidr {
                    network: addr.network,
                    net: crate::model::IpNet { addr: addr.address, prefix: len as u8 },
                }),
                Some(len) if len > max => {
                    return Err(err(format!("addresses[{i}].length"), format!("{len} is longer than the address")));
                }
                _ => vips.push(addr),
            }
        }
        let mut ports = BTreeMap::new();
        for (i, p) in s.ports.iter().enumerate() {
            ports.insert(
                port(&format!("ports[{i}].service_port"), p.service_port)?,
                port(&format!("ports[{i}].target_port"), p.target_port)?,
            );
        }
        let load_balancer = match s.load_balancing {
            None => None,
            Some(lb) => {
                use pwl::load_balancing::{HealthPolicy as H, Mode as M, Scope as S};
                let routing_preferences = lb
                    .routing_preference
                    .iter()
                    .enumerate()
                    .filter_map(|(i, v)| {
                        match enum_value::<S>(&format!("load_balancing.routing_preference[{i}]"), *v) {
                            Ok(S::UnspecifiedScope) => None,
                            Ok(S::Region) => Some(Ok(RoutingPreference::Region)),
                            Ok(S::Zone) => Some(Ok(RoutingPreference::Zone)),
                            Ok(S::Subzone) => Some(Ok(RoutingPreference::Subzone)),
                            Ok(S::Node) => Some(Ok(RoutingPreference::Node)),
                            Ok(S::Cluster) => Some(Ok(RoutingPreference::Cluster)),
                            Ok(S::Network) => Some(Ok(RoutingPreference::Network)),
                            Err(e) => Some(Err(e)),
                        }
                    })
                    .collect::<Result<_, _>>()?;
                let mode = match enum_value::<M>("load_balancing.mode", lb.mode)? {
                    M::UnspecifiedMode => LoadBalancerMode::Standard,
                    M::Strict => LoadBalancerMode::Strict,
                    M::Failover => LoadBalancerMode::Failover,
                    M::Passthrough => LoadBalancerMode::Passthrough,
                };
                let health_policy = match enum_value::<H>("load_balancing.health_policy", lb.health_policy)? {
                    H::OnlyHealthy => HealthPolicy::OnlyHealthy,
                    H::AllowAll => HealthPolicy::AllowAll,
                };
                Some(LoadBalancer { routing_preferences, mode, health_policy })
            }
        };
        let ip_families = match enum_value::<pwl::IpFamilies>("ip_families", s.ip_families)? {
            pwl::IpFamilies::Automatic => None,
            pwl::IpFamilies::Ipv4Only => Some(IpFamilies::IPv4),
            pwl::IpFamilies::Ipv6Only => Some(IpFamilies::IPv6),
            pwl::IpFamilies::Dual => Some(IpFamilies::Dual),
        };
        Ok(Service {
            name: s.name,
            namespace: s.namespace,
            hostname: s.hostname,
            vips,
            cidr_vips,
            ports,
            endpoints: BTreeMap::new(),
            subject_alt_names: s.subject_alt_names,
            waypoint: gateway("waypoint", s.waypoint)?,
            load_balancer,
            ip_families,
            canonical: s.canonical,
            // An unknown value is public, as in Istio's ztunnel.
            visibility: match pwl::Visibility::try_from(s.visibility) {
                Ok(pwl::Visibility::Namespace) => Visibility::Namespace,
                _ => Visibility::Public,
            },
        })
    }
}

/// One `Address` resource: a workload or a service.
#[derive(Debug, Clone, PartialEq)]
pub enum AddressResource {
    Workload(Box<Workload>),
    Service(Box<Service>),
}

impl TryFrom<pwl::Address> for AddressResource {
    type Error = ConvertError;
    fn try_from(a: pwl::Address) -> Result<Self, ConvertError> {
        match a.r#type {
            Some(pwl::address::Type::Workload(w)) => {
                Ok(AddressResource::Workload(Box::new(Workload::try_from(w).map_err(|e| within("workload", e))?)))
            }
            Some(pwl::address::Type::Service(s)) => {
                Ok(AddressResource::Service(Box::new(Service::try_from(s).map_err(|e| within("service", e))?)))
            }
            None => Err(err("type", "neither workload nor service")),
        }
    }
}

fn string_match(field: &str, m: psec::StringMatch) -> Result<StringMatch, ConvertError> {
    use psec::string_match::MatchType;
    match m.match_type {
        Some(MatchType::Exact(s)) => Ok(StringMatch::Exact(s)),
        Some(MatchType::Prefix(s)) => Ok(StringMatch::Prefix(s)),
        Some(MatchType::Suffix(s)) => Ok(StringMatch::Suffix(s)),
        Some(MatchType::Presence(())) => Ok(StringMatch::Presence()),
        None => Err(err(field, "empty string match")),
    }
}

fn strings(field: &str, v: Vec<psec::StringMatch>) -> Result<Vec<StringMatch>, ConvertError> {
    v.into_iter().enumerate().map(|(i, m)| string_match(&format!("{field}[{i}]"), m)).collect()
}

fn nets(field: &str, v: Vec<psec::Address>) -> Result<Vec<IpNet>, ConvertError> {
    v.into_iter()
        .enumerate()
        .map(|(i, a)| {
            let f = format!("{field}[{i}]");
            let addr = ip(&format!("{f}.address"), &a.address)?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            // A v4-mapped v6 address is stored as v4: its prefix shrinks accordingly.
            let len = if a.address.len() == 16 && addr.is_ipv4() { a.length.saturating_sub(96) } else { a.length };
            let prefix = u8::try_from(len).ok().filter(|p| u32::from(*p) <= max).ok_or_else(|| {
                err(format!("{f}.length"), format!("prefix length {} too long for the address", a.length))
            })?;
            Ok(IpNet { addr, prefix })
        })
        .collect()
}

fn ports(field: &str, v: Vec<u32>) -> Result<Vec<u16>, ConvertError> {
    v.into_iter().enumerate().map(|(i, p)| port(&format!("{field}[{i}]"), p)).collect()
}

fn accounts(v: Vec<psec::ServiceAccountMatch>) -> Vec<ServiceAccountMatch> {
    v.into_iter().map(|a| ServiceAccountMatch { namespace: a.namespace, service_account: a.service_account }).collect()
}

/// A match converts whole or is marked not understood (an extension, a string match of a kind
/// this proxy does not know, a malformed address): never an error that would drop the whole
/// policy, since a dropped ALLOW policy can leave a workload with none, which allows everyone.
impl From<psec::Match> for RbacMatch {
    fn from(m: psec::Match) -> RbacMatch {
        if !m.extensions.is_empty() {
            let names: Vec<&str> = m.extensions.iter().map(|e| e.name.as_str()).collect();
            return RbacMatch { not_understood: Some(format!("extensions {names:?}")), ..RbacMatch::default() };
        }
        match match_fields(m) {
            Ok(r) if r.is_empty() => RbacMatch {
                not_understood: Some("no condition this proxy knows (only unknown fields, or none)".into()),
                ..r
            },
            Ok(r) => r,
            Err(e) => RbacMatch { not_understood: Some(e.to_string()), ..RbacMatch::default() },
        }
    }
}

fn match_fields(m: psec::Match) -> Result<RbacMatch, ConvertError> {
    {
        Ok(RbacMatch {
            namespaces: strings("namespaces", m.namespaces)?,
            not_namespaces: strings("not_namespaces", m.not_namespaces)?,
            principals: strings("principals", m.principals)?,
            not_principals: strings("not_principals", m.not_principals)?,
            source_ips: nets("source_ips", m.source_ips)?,
            not_source_ips: nets("not_source_ips", m.not_source_ips)?,
            destination_ips: nets("destination_ips", m.destination_ips)?,
            not_destination_ips: nets("not_destination_ips", m.not_destination_ips)?,
            destination_ports: ports("destination_ports", m.destination_ports)?,
            not_destination_ports: ports("not_destination_ports", m.not_destination_ports)?,
            service_accounts: accounts(m.service_accounts),
            not_service_accounts: accounts(m.not_service_accounts),
            not_understood: None,
        })
    }
}

impl TryFrom<psec::Authorization> for Authorization {
    type Error = ConvertError;
    fn try_from(a: psec::Authorization) -> Result<Self, ConvertError> {
        if a.name.is_empty() {
            return Err(err("name", "empty"));
        }
        let scope = match enum_value::<psec::Scope>("scope", a.scope)? {
            psec::Scope::Global => PolicyScope::Global,
            psec::Scope::Namespace => PolicyScope::Namespace,
            psec::Scope::WorkloadSelector => PolicyScope::WorkloadSelector,
        };
        let action = match enum_value::<psec::Action>("action", a.action)? {
            psec::Action::Allow => Action::Allow,
            psec::Action::Deny => Action::Deny,
        };
        let rules = a
            .rules
            .into_iter()
            .map(|rule| {
                rule.clauses.into_iter().map(|c| c.matches.into_iter().map(RbacMatch::from).collect()).collect()
            })
            .collect();
        Ok(Authorization { name: a.name, namespace: a.namespace, scope, action, rules, dry_run: a.dry_run })
    }
}

/// An `Authorization` as istiod sends it (its protobuf bytes), converted, with every match that
/// carries a field our proto does not know marked `not_understood`. protobuf drops unknown
/// fields when it decodes, so they are found on the wire first: a match that adds a condition
/// this proxy cannot evaluate must fail closed, not be evaluated on what is left of it.
pub fn authorization_from_wire(bytes: &[u8]) -> Result<Authorization, String> {
    use prost::Message;
    let proto = psec::Authorization::decode(bytes).map_err(|e| format!("decoding: {e}"))?;
    let mut policy = Authorization::try_from(proto).map_err(|e| e.to_string())?;
    let unknown = match matches_with_unknown_fields(bytes) {
        Ok(u) => u,
        // prost decoded these bytes; a walk that cannot is a bug here: fail closed, everywhere.
        Err(e) => {
            let all = policy.rules.iter().enumerate().flat_map(|(r, rule)| {
                rule.iter().enumerate().flat_map(move |(c, clause)| (0..clause.len()).map(move |m| (r, c, m, e)))
            });
            all.collect()
        }
    };
    for (r, c, m, why) in unknown {
        if let Some(mat) = policy.rules.get_mut(r).and_then(|rule| rule.get_mut(c)).and_then(|cl| cl.get_mut(m)) {
            mat.not_understood.get_or_insert_with(|| why.to_string());
        }
    }
    Ok(policy)
}

/// The highest field number of `istio.security.Match` this proxy knows (`extensions` = 13).
const MATCH_LAST_FIELD: u64 = 13;

/// (rule, clause, match) of every match whose bytes carry a field number we do not know.
fn matches_with_unknown_fields(policy: &[u8]) -> Result<Vec<(usize, usize, usize, &'static str)>, &'static str> {
    let mut out = Vec::new();
    let mut rule = 0;
    for (field, body) in wire_fields(policy)? {
        if field != 5 {
            continue;
        }
        let mut clause = 0;
        for (field, body) in wire_fields(body.ok_or("rule is not a message")?)? {
            if field != 1 {
                continue;
            }
            let mut m = 0;
            for (field, body) in wire_fields(body.ok_or("clause is not a message")?)? {
                if field != 2 {
                    continue;
                }
                let fields = wire_fields(body.ok_or("match is not a message")?)?;
                if fields.iter().any(|(f, _)| *f == 0 || *f > MATCH_LAST_FIELD) {
                    out.push((rule, clause, m, "a field this proxy's Match does not know"));
                }
                m += 1;
            }
            clause += 1;
        }
        rule += 1;
    }
    Ok(out)
}

/// A field on the wire: its number, and its bytes when it is length-delimited.
type WireField<'a> = (u64, Option<&'a [u8]>);

/// The top-level fields of one protobuf message.
fn wire_fields(mut buf: &[u8]) -> Result<Vec<WireField<'_>>, &'static str> {
    fn varint(buf: &mut &[u8]) -> Result<u64, &'static str> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = buf.split_first().ok_or("truncated varint")?;
            *buf = rest;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("varint too long")
    }
    let mut out = Vec::new();
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let (field, wire) = (key >> 3, key & 7);
        let body = match wire {
            0 => {
                varint(&mut buf)?;
                None
            }
            1 | 5 => {
                let n = if wire == 1 { 8 } else { 4 };
                buf = buf.get(n..).ok_or("truncated fixed field")?;
                None
            }
            2 => {
                let n = usize::try_from(varint(&mut buf)?).map_err(|_| "length too large")?;
                let (body, rest) = (buf.get(..n).ok_or("truncated field")?, &buf[n.min(buf.len())..]);
                buf = rest;
                Some(body)
            }
            _ => return Err("unsupported wire type"),
        };
        out.push((field, body));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    fn rich_workload() -> pwl::Workload {
        let mut w = pwl::Workload {
            uid: "c1//Pod/ns/web-1".into(),
            name: "web-1".into(),
            namespace: "ns".into(),
            addresses: vec![vec![10, 0, 0, 1], std::net::Ipv6Addr::LOCALHOST.octets().to_vec()],
            tunnel_protocol: pwl::TunnelProtocol::Hbone as i32,
            service_account: "web".into(),
            node: "n1".into(),
            canonical_name: "web".into(),
            canonical_revision: "v1".into(),
            workload_type: pwl::WorkloadType::Pod as i32,
            workload_name: "web".into(),
            authorization_policies: vec!["ns/allow".into()],
            status: pwl::WorkloadStatus::Unhealthy as i32,
            cluster_id: "c1".into(),
            locality: Some(pwl::Locality { region: "r".into(), zone: "z".into(), subzone: "s".into() }),
            capacity: Some(3),
            waypoint: Some(pwl::GatewayAddress {
                destination: Some(pwl::gateway_address::Destination::Hostname(pwl::NamespacedHostname {
                    namespace: "ns".into(),
                    hostname: "waypoint.ns.svc.cluster.local".into(),
                })),
                hbone_mtls_port: 15008,
            }),
            ..Default::default()
        };
        w.services.insert(
            "ns/web.ns.svc.cluster.local".into(),
            pwl::PortList { ports: vec![pwl::Port { service_port: 80, target_port: 8080, app_protocol: 0 }] },
        );
        w
    }

    #[test]
    fn a_workload_converts_field_by_field() {
        let w = Workload::try_from(rich_workload()).unwrap();
        assert_eq!(w.workload_ips, vec!["10.0.0.1".parse::<IpAddr>().unwrap(), "::1".parse().unwrap()]);
        assert_eq!((w.protocol, w.status, w.capacity), (Protocol::HBONE, HealthStatus::Unhealthy, 3));
        assert_eq!(w.identity().to_string(), "spiffe://cluster.local/ns/ns/sa/web");
        assert_eq!(w.workload_type, "pod");
        assert_eq!(w.services.values().next().unwrap()[&80], 8080);
        assert!(matches!(w.waypoint.unwrap().destination, GatewayDestination::Hostname(_)));
        // Capacity absent means 1, as in Istio.
        let mut plain = rich_workload();
        plain.capacity = None;
        assert_eq!(Workload::try_from(plain).unwrap().capacity, 1);
    }

    #[test]
    fn an_address_with_a_short_length_is_a_range() {
        let addr = |ip: [u8; 4], length: Option<u32>| pwl::NetworkAddress {
            network: String::new(),
            address: ip.to_vec(),
            length,
        };
        let s = pwl::Service {
            name: "s".into(),
            namespace: "ns".into(),
            hostname: "s.ns.svc.cluster.local".into(),
            addresses: vec![
                addr([10, 96, 0, 1], None),
                addr([10, 96, 0, 2], Some(32)),
                addr([10, 200, 0, 0], Some(16)),
            ],
            ..Default::default()
        };
        let svc = Service::try_from(s.clone()).unwrap();
        assert_eq!(svc.vips.len(), 2);
        assert_eq!(svc.cidr_vips.iter().map(|c| c.to_string()).collect::<Vec<_>>(), ["/10.200.0.0/16"]);
        let mut bad = s;
        bad.addresses = vec![addr([10, 0, 0, 0], Some(33))];
        assert!(Service::try_from(bad).unwrap_err().to_string().contains("addresses[0].length"));
    }

    #[test]
    fn weighted_waypoints_are_refused_by_name() {
        let s = pwl::Service {
            name: "s".into(),
            namespace: "ns".into(),
            hostname: "s.ns.svc.cluster.local".into(),
            weighted_waypoints: vec![Default::default()],
            ..Default::default()
        };
        let e = Service::try_from(s).unwrap_err().to_string();
        assert!(e.contains("weighted_waypoints"), "{e}");
    }

    #[test]
    fn errors_name_the_field() {
        let mut w = rich_workload();
        w.addresses[1] = vec![1, 2, 3];
        let e = AddressResource::try_from(pwl::Address { r#type: Some(pwl::address::Type::Workload(w)) }).unwrap_err();
        assert_eq!(e.to_string(), "workload.addresses[1]: an IP address is 4 or 16 bytes, got 3");
        let mut w = rich_workload();
        w.services.values_mut().next().unwrap().ports[0].target_port = 70_000;
        let e = Workload::try_from(w).unwrap_err().to_string();
        assert!(e.contains("target_port") && e.contains("70000"), "{e}");
        let mut w = rich_workload();
        w.tunnel_protocol = 9;
        assert_eq!(Workload::try_from(w).unwrap_err().to_string(), "tunnel_protocol: unknown enum value 9");
        let p = psec::Authorization {
            name: "p".into(),
            namespace: "ns".into(),
            rules: vec![psec::Rule {
                clauses: vec![psec::Clause {
                    matches: vec![psec::Match {
                        source_ips: vec![psec::Address { address: vec![10, 0, 0, 0], length: 40 }],
                        ..Default::default()
                    }],
                }],
            }],
            ..Default::default()
        };
        // A malformed match keeps its policy and fails closed, naming the field.
        let converted = Authorization::try_from(p).unwrap();
        let why = converted.rules[0][0][0].not_understood.clone().unwrap();
        assert!(why.starts_with("source_ips[0].length"), "{why}");
    }

    #[test]
    fn matches_with_nothing_we_understand_are_marked_not_dropped() {
        let policy = |m: psec::Match| psec::Authorization {
            name: "p".into(),
            namespace: "ns".into(),
            rules: vec![psec::Rule { clauses: vec![psec::Clause { matches: vec![m] }] }],
            ..Default::default()
        };
        // Only fields our proto does not know decode to an empty match.
        let empty = Authorization::try_from(policy(psec::Match::default())).unwrap();
        assert!(empty.rules[0][0][0].not_understood.is_some());
        let ext = psec::Match {
            extensions: vec![psec::Extension { name: "future.match".into(), config: None }],
            destination_ports: vec![80],
            ..Default::default()
        };
        let with_ext = Authorization::try_from(policy(ext)).unwrap();
        assert!(with_ext.rules[0][0][0].not_understood.as_deref().unwrap().contains("future.match"));
        let unknown_kind =
            psec::Match { principals: vec![psec::StringMatch { match_type: None }], ..Default::default() };
        assert!(Authorization::try_from(policy(unknown_kind)).unwrap().rules[0][0][0].not_understood.is_some());
        let fine = psec::Match { destination_ports: vec![80], ..Default::default() };
        assert!(Authorization::try_from(policy(fine)).unwrap().rules[0][0][0].not_understood.is_none());
    }

    #[test]
    fn a_policy_converts_with_every_match_field() {
        let sm = |t: psec::string_match::MatchType| psec::StringMatch { match_type: Some(t) };
        use psec::string_match::MatchType as T;
        let m = psec::Match {
            namespaces: vec![sm(T::Exact("a".into()))],
            not_namespaces: vec![sm(T::Prefix("b".into()))],
            principals: vec![sm(T::Suffix("/sa/c".into()))],
            not_principals: vec![sm(T::Presence(()))],
            source_ips: vec![psec::Address { address: vec![10, 0, 0, 0], length: 8 }],
            not_source_ips: vec![psec::Address {
                address: std::net::Ipv6Addr::LOCALHOST.octets().to_vec(),
                length: 128,
            }],
            destination_ips: vec![psec::Address { address: vec![10, 1, 0, 0], length: 16 }],
            not_destination_ips: vec![],
            destination_ports: vec![80],
            not_destination_ports: vec![81],
            service_accounts: vec![psec::ServiceAccountMatch { namespace: "ns".into(), service_account: "sa".into() }],
            not_service_accounts: vec![],
            extensions: vec![],
        };
        let p = psec::Authorization {
            name: "p".into(),
            namespace: "ns".into(),
            scope: psec::Scope::WorkloadSelector as i32,
            action: psec::Action::Deny as i32,
            rules: vec![psec::Rule { clauses: vec![psec::Clause { matches: vec![m] }] }],
            dry_run: true,
            extensions: vec![],
        };
        let a = Authorization::try_from(p).unwrap();
        assert_eq!((a.scope, a.action, a.dry_run), (PolicyScope::WorkloadSelector, Action::Deny, true));
        let m = &a.rules[0][0][0];
        assert_eq!(m.not_principals, vec![StringMatch::Presence()]);
        assert_eq!(m.source_ips[0].to_string(), "10.0.0.0/8");
        assert_eq!((m.destination_ports.as_slice(), m.not_destination_ports.as_slice()), (&[80][..], &[81][..]));
        assert_eq!(m.service_accounts[0].service_account, "sa");
    }

    /// A stand-in for fuzzing in CI: valid encodings, mutated, truncated and extended, must
    /// decode and convert to a value or an error, never a panic. (`fuzz/` has the real target.)
    #[test]
    fn mutated_resources_never_panic() {
        let mut rng = fastrand::Rng::with_seed(0x0d5);
        let workload = pwl::Address { r#type: Some(pwl::address::Type::Workload(rich_workload())) }.encode_to_vec();
        let policy = psec::Authorization {
            name: "p".into(),
            namespace: "ns".into(),
            rules: vec![psec::Rule {
                clauses: vec![psec::Clause {
                    matches: vec![psec::Match {
                        principals: vec![psec::StringMatch {
                            match_type: Some(psec::string_match::MatchType::Exact("x".into())),
                        }],
                        source_ips: vec![psec::Address { address: vec![10, 0, 0, 0], length: 8 }],
                        destination_ports: vec![80],
                        ..Default::default()
                    }],
                }],
            }],
            ..Default::default()
        }
        .encode_to_vec();
        let mut outcomes = [0usize; 2];
        for i in 0..4000 {
            let base = if i % 2 == 0 { &workload } else { &policy };
            let mut m = base.clone();
            match rng.u8(..3) {
                0 => {
                    for _ in 0..rng.usize(1..6) {
                        let at = rng.usize(..m.len());
                        m[at] = rng.u8(..);
                    }
                }
                1 => m.truncate(rng.usize(..m.len())),
                _ => m.extend((0..rng.usize(1..64)).map(|_| rng.u8(..))),
            }
            let ok = if i % 2 == 0 {
                pwl::Address::decode(m.as_slice()).ok().map(|a| AddressResource::try_from(a).is_ok())
            } else {
                psec::Authorization::decode(m.as_slice()).ok().map(|a| Authorization::try_from(a).is_ok())
            };
            outcomes[usize::from(ok == Some(true))] += 1;
        }
        assert!(outcomes[0] > 0 && outcomes[1] > 0, "both outcomes seen: {outcomes:?}");
    }

    #[test]
    fn a_match_with_a_field_we_do_not_know_fails_closed_on_the_wire() {
        use prost::Message;
        let m = psec::Match { destination_ports: vec![80], ..Default::default() };
        let mut match_bytes = m.encode_to_vec();
        // Field 99, varint 1: a condition a newer istiod could send.
        match_bytes.extend_from_slice(&[0x98, 0x06, 0x01]);
        let len_delimited = |field: u8, body: &[u8]| {
            let mut out = vec![(field << 3) | 2];
            prost::encoding::encode_varint(body.len() as u64, &mut out);
            out.extend_from_slice(body);
            out
        };
        let clean = psec::Match { destination_ports: vec![81], ..Default::default() }.encode_to_vec();
        let mut clause = len_delimited(2, &clean);
        clause.extend(len_delimited(2, &match_bytes));
        let rule = len_delimited(1, &clause);
        let mut policy =
            psec::Authorization { name: "p".into(), namespace: "ns".into(), ..Default::default() }.encode_to_vec();
        policy.extend(len_delimited(5, &rule));
        let converted = authorization_from_wire(&policy).unwrap();
        let matches = &converted.rules[0][0];
        assert!(matches[0].not_understood.is_none(), "the match we fully know is kept as is");
        assert!(matches[1].not_understood.is_some(), "the match with field 99 fails closed");
        assert_eq!(matches[1].destination_ports, vec![80], "what we know of it is still shown");
        // A policy istiod sends with nothing unknown converts as before.
        let plain = psec::Authorization {
            name: "p".into(),
            namespace: "ns".into(),
            rules: vec![psec::Rule { clauses: vec![psec::Clause { matches: vec![m] }] }],
            ..Default::default()
        };
        assert!(authorization_from_wire(&plain.encode_to_vec()).unwrap().rules[0][0][0].not_understood.is_none());
    }
}
