//! Which mesh name a DNS query means, and its addresses: COMPAT.md's rules, with no I/O.
//!
//! A query name is tried as asked, then with the Kubernetes expansions for its label count, then
//! with each search domain stripped (and that name's expansions). For each candidate, the exact
//! hostname, then wildcard hosts from the most specific. Services the client may not see
//! (namespace-scoped, another namespace) and services without addresses (unless headless under
//! `.svc.<domain>`) do not count. Beyond Istio's ztunnel, a StatefulSet pod's name
//! (`pod.service.namespace.svc.<domain>`) is answered with the pod's address.

use std::net::IpAddr;
use std::sync::Arc;

use crate::model::{HealthPolicy, HealthStatus, IpFamilies, Service};
use crate::snapshot::{ConfigIndex, ServiceEntry};

/// The address family a query asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn of(ip: &IpAddr) -> Family {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }
}

/// Who asks, and how names are completed for them.
#[derive(Debug, Clone)]
pub struct Asker<'a> {
    pub namespace: &'a str,
    pub network: &'a str,
    pub cluster_domain: &'a str,
    /// Search domains whose stripping is tried (in-pod: `<ns>.svc.<domain>`, `svc.<domain>`,
    /// `<domain>`; dedicated: the resolver's own).
    pub search: &'a [String],
    /// `PREFERED_SERVICE_NAMESPACE` (Istio's spelling).
    pub preferred_namespace: Option<&'a str>,
    pub ipv6_enabled: bool,
}

/// What a name is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// A mesh name: its addresses of the asked family (possibly none: NOERROR, no answers),
    /// owned by `owner`; with `cname` (asked -> `owner`) when a search domain was stripped.
    Mesh { owner: String, cname: Option<String>, addrs: Vec<IpAddr> },
    /// Not a mesh name: forwarded.
    Unknown,
}

/// The in-pod search list for a client in `namespace`.
pub fn pod_search(namespace: &str, cluster_domain: &str) -> Vec<String> {
    vec![format!("{namespace}.svc.{cluster_domain}"), format!("svc.{cluster_domain}"), cluster_domain.to_string()]
}

/// Kubernetes completions of `name` by its label count.
fn expansions(name: &str, ns: &str, cd: &str) -> Vec<String> {
    match name.split('.').count() {
        1 => vec![format!("{name}.{ns}.svc.{cd}")],
        2 => vec![format!("{name}.svc.{cd}"), format!("{name}.{ns}.svc.{cd}")],
        3 => {
            let mut v = Vec::with_capacity(2);
            if name.ends_with(".svc") {
                v.push(format!("{name}.{cd}"));
            }
            v.push(format!("{name}.svc.{cd}"));
            v
        }
        4 if name.ends_with(".svc") => vec![format!("{name}.{cd}")],
        _ => Vec::new(),
    }
}

/// Every candidate for `name`, in order, each with the stripped name it came from (if any).
pub fn aliases(name: &str, asker: &Asker) -> Vec<(String, Option<String>)> {
    let (ns, cd) = (asker.namespace, asker.cluster_domain);
    let mut out: Vec<(String, Option<String>)> = vec![(name.to_string(), None)];
    out.extend(expansions(name, ns, cd).into_iter().map(|e| (e, None)));
    for domain in asker.search {
        let Some(stripped) = name.strip_suffix(domain.as_str()).and_then(|s| s.strip_suffix('.')) else { continue };
        if stripped.is_empty() {
            continue;
        }
        out.push((stripped.to_string(), Some(stripped.to_string())));
        out.extend(expansions(stripped, ns, cd).into_iter().map(|e| (e, Some(stripped.to_string()))));
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|(n, _)| seen.insert(n.clone()));
    out
}

/// `a.b.c` -> `*.b.c`, `*.c`: wildcard hosts from the most specific.
pub fn wildcards(name: &str) -> impl Iterator<Item = String> + '_ {
    name.match_indices('.').map(move |(i, _)| format!("*{}", &name[i..]))
}

/// Whether `svc` can answer at all: it has addresses, or is headless under `.svc.<domain>`.
fn qualifies(svc: &Service, cd: &str) -> bool {
    !svc.vips.is_empty() || svc.hostname.ends_with(&format!(".svc.{cd}"))
}

/// Among services sharing a hostname: the client's namespace, then a canonical one, then the
/// preferred namespace, then the first.
fn best<'s>(cands: &[&'s Arc<ServiceEntry>], asker: &Asker) -> Option<&'s Arc<ServiceEntry>> {
    cands
        .iter()
        .find(|s| s.service.namespace == asker.namespace)
        .or_else(|| cands.iter().find(|s| s.service.canonical))
        .or_else(|| asker.preferred_namespace.and_then(|p| cands.iter().find(|s| s.service.namespace == p)))
        .or_else(|| cands.first())
        .copied()
}

fn family_allowed(svc: &Service, family: Family, asker: &Asker) -> bool {
    match (family, svc.ip_families) {
        (Family::V6, _) if !asker.ipv6_enabled => false,
        (Family::V4, Some(IpFamilies::IPv6)) | (Family::V6, Some(IpFamilies::IPv4)) => false,
        _ => true,
    }
}

/// Endpoints DNS may return: healthy ones, or all under `AllowAll`.
fn serving(entry: &ServiceEntry) -> impl Iterator<Item = &crate::snapshot::ServiceEndpoint> {
    let all = entry.service.load_balancer.as_ref().is_some_and(|lb| lb.health_policy == HealthPolicy::AllowAll);
    entry.endpoints.iter().filter(move |e| all || e.status == HealthStatus::Healthy)
}

/// A service's addresses of `family`: its VIPs on the client's network, or for a headless one
/// the first address of that family of each serving endpoint.
fn addresses(entry: &ServiceEntry, family: Family, asker: &Asker) -> Vec<IpAddr> {
    if !family_allowed(&entry.service, family, asker) {
        return Vec::new();
    }
    if entry.service.vips.is_empty() {
        return serving(entry)
            .filter_map(|e| e.workload.workload_ips.iter().find(|ip| Family::of(ip) == family).copied())
            .collect();
    }
    entry
        .service
        .vips
        .iter()
        .filter(|v| v.network == asker.network && Family::of(&v.address) == family)
        .map(|v| v.address)
        .collect()
}

/// What `name` (lowercase, without the trailing dot) is, for a query of `family`.
pub fn lookup(index: &ConfigIndex, name: &str, family: Family, asker: &Asker) -> Lookup {
    // The common case first, without building the candidates: a resolver that appended the
    // search domain asks for the service's full hostname.
    let exact: Vec<&Arc<ServiceEntry>> = index
        .services_by_hostname(name)
        .iter()
        .filter(|s| s.service.visible_to(asker.namespace) && qualifies(&s.service, asker.cluster_domain))
        .collect();
    if let Some(entry) = best(&exact, asker) {
        return Lookup::Mesh { owner: name.to_string(), cname: None, addrs: addresses(entry, family, asker) };
    }
    let candidates = aliases(name, asker);
    for (alias, stripped) in &candidates {
        for (host, wildcard) in std::iter::once((alias.clone(), false)).chain(wildcards(alias).map(|w| (w, true))) {
            let visible: Vec<&Arc<ServiceEntry>> = index
                .services_by_hostname(&host)
                .iter()
                .filter(|s| s.service.visible_to(asker.namespace) && qualifies(&s.service, asker.cluster_domain))
                .collect();
            let Some(entry) = best(&visible, asker) else { continue };
            let addrs = addresses(entry, family, asker);
            return match stripped {
                Some(target) if !wildcard => Lookup::Mesh { owner: target.clone(), cname: Some(target.clone()), addrs },
                _ => Lookup::Mesh { owner: name.to_string(), cname: None, addrs },
            };
        }
    }
    // Beyond Istio: `pod.service.namespace.svc.<domain>`, a StatefulSet pod behind a headless
    // service.
    for (alias, stripped) in &candidates {
        if let Some(found) = stateful_pod(index, alias, family, asker) {
            return match stripped {
                Some(target) => Lookup::Mesh { owner: target.clone(), cname: Some(target.clone()), addrs: found },
                None => Lookup::Mesh { owner: name.to_string(), cname: None, addrs: found },
            };
        }
    }
    Lookup::Unknown
}

fn stateful_pod(index: &ConfigIndex, name: &str, family: Family, asker: &Asker) -> Option<Vec<IpAddr>> {
    let (pod, service_host) = name.split_once('.')?;
    if !service_host.ends_with(&format!(".svc.{}", asker.cluster_domain)) {
        return None;
    }
    let visible: Vec<&Arc<ServiceEntry>> = index
        .services_by_hostname(service_host)
        .iter()
        .filter(|s| s.service.vips.is_empty() && s.service.visible_to(asker.namespace))
        .collect();
    let entry = best(&visible, asker)?;
    let endpoint = serving(entry).find(|e| e.workload.name == pod)?;
    if !family_allowed(&entry.service, family, asker) {
        return Some(Vec::new());
    }
    Some(endpoint.workload.workload_ips.iter().filter(|ip| Family::of(ip) == family).copied().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ConfigState;
    use crate::snapshot::{LocalScope, SourceInfo};

    const CONFIG: &str = r#"
workloads:
- {uid: r1, name: reviews-1, namespace: ns1, serviceAccount: r, workloadIps: [10.1.0.1, "fd00::1"], services: {"ns1/reviews.ns1.svc.cluster.local": {9080: 9080}}}
- {uid: db0, name: db-0, namespace: ns1, serviceAccount: db, workloadIps: [10.1.0.10], services: {"ns1/db.ns1.svc.cluster.local": {5432: 5432}}}
- {uid: db1, name: db-1, namespace: ns1, serviceAccount: db, workloadIps: [10.1.0.11], status: Unhealthy, services: {"ns1/db.ns1.svc.cluster.local": {5432: 5432}}}
services:
- {name: reviews, namespace: ns1, hostname: reviews.ns1.svc.cluster.local, vips: ["/10.96.0.1", "/fd00:96::1", "other/10.96.9.9"], ports: {9080: 9080}}
- {name: db, namespace: ns1, hostname: db.ns1.svc.cluster.local, vips: [], ports: {5432: 5432}}
- {name: v4only, namespace: ns1, hostname: v4only.ns1.svc.cluster.local, vips: ["/10.96.0.2", "/fd00:96::2"], ports: {80: 80}, ipFamilies: IPv4}
- {name: wild, namespace: ns2, hostname: "*.example.com", vips: ["/240.240.0.1"], ports: {443: 443}}
- {name: wilder, namespace: ns2, hostname: "*.api.example.com", vips: ["/240.240.0.2"], ports: {443: 443}}
- {name: private, namespace: ns2, hostname: private.example.org, vips: ["/240.240.0.3"], ports: {80: 80}, visibility: Namespace}
- {name: shared, namespace: ns3, hostname: shared.example.org, vips: ["/240.240.1.3"], ports: {80: 80}}
- {name: shared, namespace: ns4, hostname: shared.example.org, vips: ["/240.240.1.4"], ports: {80: 80}, canonical: true}
- {name: shared, namespace: ns5, hostname: shared.example.org, vips: ["/240.240.1.5"], ports: {80: 80}}
- {name: novip, namespace: ns2, hostname: novip.example.org, vips: [], ports: {80: 80}}
"#;

    fn index() -> ConfigIndex {
        let state: ConfigState = crate::control::local::parse(CONFIG).unwrap();
        ConfigIndex::build(1, SourceInfo { kind: "test", location: String::new() }, LocalScope::Node(None), state)
    }

    fn asker<'a>(ns: &'a str, search: &'a [String]) -> Asker<'a> {
        Asker {
            namespace: ns,
            network: "",
            cluster_domain: "cluster.local",
            search,
            preferred_namespace: None,
            ipv6_enabled: true,
        }
    }

    fn ips(l: &Lookup) -> Vec<String> {
        match l {
            Lookup::Mesh { addrs, .. } => {
                let mut v: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
                v.sort();
                v
            }
            Lookup::Unknown => vec!["unknown".into()],
        }
    }

    #[test]
    fn kubernetes_expansions_by_label_count() {
        let search = pod_search("ns1", "cluster.local");
        let a = asker("ns1", &search);
        let names = |n: &str| aliases(n, &a).into_iter().map(|(n, _)| n).collect::<Vec<_>>();
        assert_eq!(names("reviews")[..2], ["reviews", "reviews.ns1.svc.cluster.local"]);
        assert_eq!(
            names("reviews.ns1")[..3],
            ["reviews.ns1", "reviews.ns1.svc.cluster.local", "reviews.ns1.ns1.svc.cluster.local"]
        );
        assert_eq!(
            names("reviews.ns1.svc")[..3],
            ["reviews.ns1.svc", "reviews.ns1.svc.cluster.local", "reviews.ns1.svc.svc.cluster.local"]
        );
        assert_eq!(names("a.b.c")[..2], ["a.b.c", "a.b.c.svc.cluster.local"]);
        assert_eq!(names("reviews.ns1.x.svc")[..2], ["reviews.ns1.x.svc", "reviews.ns1.x.svc.cluster.local"]);
        assert_eq!(names("a.b.c.d"), ["a.b.c.d"]);
        assert_eq!(wildcards("a.b.c").collect::<Vec<_>>(), ["*.b.c", "*.c"]);
    }

    #[test]
    fn every_form_of_a_service_name_resolves() {
        let search = pod_search("ns1", "cluster.local");
        let a = asker("ns1", &search);
        let idx = index();
        for name in ["reviews", "reviews.ns1", "reviews.ns1.svc", "reviews.ns1.svc.cluster.local"] {
            assert_eq!(ips(&lookup(&idx, name, Family::V4, &a)), ["10.96.0.1"], "{name}");
        }
        // Only the client's network's VIPs; AAAA gets the IPv6 one.
        assert_eq!(ips(&lookup(&idx, "reviews", Family::V6, &a)), ["fd00:96::1"]);
        // From another namespace the short name is another service: not a mesh name.
        assert_eq!(
            lookup(&idx, "reviews", Family::V4, &asker("ns2", &pod_search("ns2", "cluster.local"))),
            Lookup::Unknown
        );
    }

    #[test]
    fn a_stripped_search_domain_answers_with_a_cname() {
        let search = pod_search("ns1", "cluster.local");
        let a = asker("ns1", &search);
        match lookup(&index(), "reviews.ns1.ns1.svc.cluster.local", Family::V4, &a) {
            Lookup::Mesh { owner, cname, addrs } => {
                assert_eq!(owner, "reviews.ns1");
                assert_eq!(cname.as_deref(), Some("reviews.ns1"));
                assert_eq!(addrs, vec!["10.96.0.1".parse::<IpAddr>().unwrap()]);
            }
            other => panic!("{other:?}"),
        }
        // Not stripped: no CNAME.
        let Lookup::Mesh { cname, .. } = lookup(&index(), "reviews.ns1.svc.cluster.local", Family::V4, &a) else {
            panic!()
        };
        assert_eq!(cname, None);
    }

    #[test]
    fn wildcards_most_specific_first_visibility_and_preference() {
        let search = pod_search("ns1", "cluster.local");
        let a = asker("ns1", &search);
        let idx = index();
        assert_eq!(ips(&lookup(&idx, "x.api.example.com", Family::V4, &a)), ["240.240.0.2"]);
        assert_eq!(ips(&lookup(&idx, "y.example.com", Family::V4, &a)), ["240.240.0.1"]);
        assert_eq!(ips(&lookup(&idx, "a.b.example.com", Family::V4, &a)), ["240.240.0.1"]);
        // Namespace-scoped: only its own namespace sees it.
        assert_eq!(lookup(&idx, "private.example.org", Family::V4, &a), Lookup::Unknown);
        let ns2 = pod_search("ns2", "cluster.local");
        assert_eq!(ips(&lookup(&idx, "private.example.org", Family::V4, &asker("ns2", &ns2))), ["240.240.0.3"]);
        // Several namespaces: the client's, else the canonical, else the preferred, else the first.
        let ns5 = pod_search("ns5", "cluster.local");
        assert_eq!(ips(&lookup(&idx, "shared.example.org", Family::V4, &asker("ns5", &ns5))), ["240.240.1.5"]);
        assert_eq!(ips(&lookup(&idx, "shared.example.org", Family::V4, &a)), ["240.240.1.4"]);
        // Without VIPs and outside .svc.<domain>: not answerable here.
        assert_eq!(lookup(&idx, "novip.example.org", Family::V4, &a), Lookup::Unknown);
    }

    #[test]
    fn families_headless_and_statefulset_pods() {
        let search = pod_search("ns1", "cluster.local");
        let a = asker("ns1", &search);
        let idx = index();
        // A mesh name without the family: NOERROR with no answers, not forwarded.
        assert_eq!(ips(&lookup(&idx, "v4only", Family::V6, &a)), Vec::<String>::new());
        assert_eq!(ips(&lookup(&idx, "v4only", Family::V4, &a)), ["10.96.0.2"]);
        let no6 = Asker { ipv6_enabled: false, ..a.clone() };
        assert_eq!(ips(&lookup(&idx, "reviews", Family::V6, &no6)), Vec::<String>::new());
        // Headless: the serving endpoints' own addresses.
        assert_eq!(ips(&lookup(&idx, "db", Family::V4, &a)), ["10.1.0.10"]);
        // A StatefulSet pod by name.
        assert_eq!(ips(&lookup(&idx, "db-0.db.ns1.svc.cluster.local", Family::V4, &a)), ["10.1.0.10"]);
        assert_eq!(ips(&lookup(&idx, "db-0.db", Family::V4, &a)), ["10.1.0.10"], "expanded like any name");
        assert_eq!(lookup(&idx, "db-9.db.ns1.svc.cluster.local", Family::V4, &a), Lookup::Unknown);
    }
}
