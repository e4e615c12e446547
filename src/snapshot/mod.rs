//! The immutable snapshot: config indexes plus the certificates of this node's workloads.
//!
//! Built on the control thread, numbered by a generation and shared read-only with every worker
//! behind an `Arc`. A worker never mutates it; a connection takes the worker's current snapshot
//! once, at accept, and keeps it for its life. A change of config, or a new or renewed
//! certificate, is a new snapshot published whole (see `publish`). The config part is
//! itself shared, so a certificate renewal does not rebuild the indexes.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::ops::Deref;
use std::sync::Arc;

use crate::model::Identity;
use crate::tls::WorkloadCert;

pub mod publish;

/// Certificates by identity, as published to workers.
pub type CertMap = BTreeMap<Identity, Arc<WorkloadCert>>;

/// One published generation: config indexes and certificates.
#[derive(Debug)]
pub struct Snapshot {
    pub generation: u64,
    pub certs: Arc<CertMap>,
    index: Arc<ConfigIndex>,
}

impl Deref for Snapshot {
    type Target = ConfigIndex;
    fn deref(&self) -> &ConfigIndex {
        &self.index
    }
}

impl Snapshot {
    /// Builds the indexes of a new config, with no certificates yet.
    pub fn build(generation: u64, source: SourceInfo, scope: LocalScope, state: ConfigState) -> Snapshot {
        Snapshot {
            generation,
            certs: Arc::default(),
            index: Arc::new(ConfigIndex::build(generation, source, scope, state)),
        }
    }

    /// The next generation with a new config, keeping the certificates.
    pub fn with_config(&self, index: ConfigIndex) -> Snapshot {
        Snapshot { generation: self.generation + 1, certs: self.certs.clone(), index: Arc::new(index) }
    }

    /// The next generation with new certificates, sharing the config indexes.
    pub fn with_certs(&self, certs: CertMap) -> Snapshot {
        Snapshot { generation: self.generation + 1, certs: Arc::new(certs), index: self.index.clone() }
    }
}

use crate::config::{Config, ProxyMode, WorkloadInfo};
use crate::model::{
    Authorization, ConfigState, Endpoint, HealthStatus, NamespacedHostname, NetworkAddress, PolicyScope, Service,
    Workload,
};

/// Which workloads this proxy serves (as source of outbound, as destination of inbound).
#[derive(Debug, Clone)]
pub enum LocalScope {
    /// Workloads whose `node` equals ours; every workload when no node name is configured.
    Node(Option<String>),
    /// Exactly one workload.
    Dedicated(WorkloadInfo),
}

impl LocalScope {
    pub fn from_config(cfg: &Config) -> LocalScope {
        match (cfg.proxy_mode, &cfg.workload_info) {
            (ProxyMode::Dedicated, Some(info)) => LocalScope::Dedicated(info.clone()),
            _ => LocalScope::Node(cfg.node_name.clone()),
        }
    }

    pub fn contains(&self, wl: &Workload) -> bool {
        match self {
            LocalScope::Node(None) => true,
            LocalScope::Node(Some(node)) => wl.node == *node,
            LocalScope::Dedicated(info) => {
                wl.namespace == info.namespace
                    && wl.name == info.name
                    && wl.identity().service_account == info.service_account
            }
        }
    }
}

/// An endpoint of a service, resolved to its workload.
#[derive(Debug, Clone)]
pub struct ServiceEndpoint {
    pub workload: Arc<Workload>,
    /// Service port -> target port for this endpoint.
    pub ports: BTreeMap<u16, u16>,
    pub status: HealthStatus,
}

/// A service with its endpoints resolved.
#[derive(Debug)]
pub struct ServiceEntry {
    /// As configured, with `endpoints` filled in from the workloads that name it (for dumps).
    pub service: Service,
    pub endpoints: Vec<ServiceEndpoint>,
}

/// Where a piece of config came from, for `config_dump`.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceInfo {
    pub kind: &'static str,
    pub location: String,
}

/// The config of a generation and its indexes.
#[derive(Debug)]
pub struct ConfigIndex {
    /// Counts accepted configs (a snapshot's `generation` also counts certificate updates).
    pub config_generation: u64,
    pub source: SourceInfo,
    pub scope: LocalScope,
    workloads: BTreeMap<String, Arc<Workload>>,
    workload_by_addr: ByAddr<Workload>,
    services: BTreeMap<NamespacedHostname, Arc<ServiceEntry>>,
    service_by_vip: ByAddr<ServiceEntry>,
    /// VIPs that several services claim, with all of them (chosen per client).
    shared_vips: HashMap<NetworkAddress, Vec<Arc<ServiceEntry>>>,
    /// Services' address ranges, longest prefix first.
    service_cidrs: Vec<(crate::model::NetworkCidr, Arc<ServiceEntry>)>,
    service_by_host: HashMap<String, Vec<Arc<ServiceEntry>>>,
    policies: BTreeMap<String, Arc<Authorization>>,
    /// `Global` policies, and `Namespace` policies by namespace: a connection's policies are
    /// looked up, not searched for (the mesh may have thousands).
    global_policies: Vec<Arc<Authorization>>,
    namespace_policies: HashMap<String, Vec<Arc<Authorization>>>,
    /// Warnings found while building (dangling references and the like), for logs and dumps.
    pub warnings: Vec<String>,
}

impl ConfigIndex {
    /// Builds the indexes. Never fails: the state was validated by its source; inconsistencies
    /// that can arise between valid pieces (a workload naming an unknown service) are warnings.
    pub fn build(config_generation: u64, source: SourceInfo, scope: LocalScope, state: ConfigState) -> ConfigIndex {
        let mut warnings = Vec::new();
        let (workloads, workload_by_addr) = index_workloads(state.workloads, &mut warnings);
        let endpoints = endpoints_named_by_workloads(&workloads);
        let (services, service_by_vip, service_by_host, shared_vips) =
            index_services(state.services, &workloads, endpoints, &mut warnings);
        let service_cidrs = service_cidrs(&services);
        let policies: BTreeMap<String, Arc<Authorization>> =
            state.policies.into_iter().map(|p| (p.key(), Arc::new(p))).collect();
        let (global_policies, namespace_policies) = policies_by_scope(&policies);
        warn_unknown_policy_names(&workloads, &policies, &mut warnings);
        ConfigIndex {
            config_generation,
            source,
            scope,
            workloads,
            workload_by_addr,
            services,
            service_by_vip,
            shared_vips,
            service_cidrs,
            service_by_host,
            policies,
            global_policies,
            namespace_policies,
            warnings,
        }
    }

    pub fn workload_by_uid(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workloads.get(uid)
    }

    pub fn workload_by_ip(&self, network: &str, ip: IpAddr) -> Option<&Arc<Workload>> {
        get_by_addr(&self.workload_by_addr, network, ip)
    }

    pub fn service_by_vip(&self, network: &str, ip: IpAddr) -> Option<&Arc<ServiceEntry>> {
        get_by_addr(&self.service_by_vip, network, ip).or_else(|| {
            // No exact VIP: the service whose range holds the address (longest prefix).
            self.service_cidrs.iter().find(|(c, _)| c.network == network && c.net.contains(ip)).map(|(_, s)| s)
        })
    }

    /// The service behind a VIP for a client in `namespace`: where several services share the
    /// VIP, the one in the client's namespace, then a canonical one, then one in `preferred`
    /// (`PREFERED_SERVICE_NAMESPACE`), then the first configured.
    pub fn service_by_vip_for(
        &self,
        network: &str,
        ip: IpAddr,
        namespace: &str,
        preferred: Option<&str>,
    ) -> Option<&Arc<ServiceEntry>> {
        let found = self.service_by_vip(network, ip)?;
        if self.shared_vips.is_empty() {
            return Some(found);
        }
        let key = NetworkAddress { network: network.to_string(), address: ip.to_canonical() };
        let Some(all) = self.shared_vips.get(&key) else { return Some(found) };
        all.iter()
            .find(|s| s.service.namespace == namespace)
            .or_else(|| all.iter().find(|s| s.service.canonical))
            .or_else(|| preferred.and_then(|p| all.iter().find(|s| s.service.namespace == p)))
            .or_else(|| all.first())
    }

    /// A service by hostname; with several namespaces using the name, the caller's namespace wins.
    pub fn service_by_hostname(&self, hostname: &str, prefer_namespace: &str) -> Option<&Arc<ServiceEntry>> {
        let all = self.service_by_host.get(hostname.trim_end_matches('.'))?;
        all.iter().find(|s| s.service.namespace == prefer_namespace).or_else(|| all.first())
    }

    /// Every service with this hostname (several namespaces may use one), in config order.
    pub fn services_by_hostname(&self, hostname: &str) -> &[Arc<ServiceEntry>] {
        self.service_by_host.get(hostname).map(Vec::as_slice).unwrap_or_default()
    }

    pub fn service(&self, key: &NamespacedHostname) -> Option<&Arc<ServiceEntry>> {
        self.services.get(key)
    }

    /// The local workload behind an address (source of outbound, destination of inbound).
    pub fn local_workload_by_ip(&self, network: &str, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.workload_by_ip(network, ip).filter(|wl| self.scope.contains(wl))
    }

    /// The one workload a dedicated proxy serves.
    pub fn dedicated_workload(&self) -> Option<&Arc<Workload>> {
        match &self.scope {
            LocalScope::Dedicated(_) => self.workloads.values().find(|wl| self.scope.contains(wl)),
            LocalScope::Node(_) => None,
        }
    }

    /// The identities this proxy needs certificates for: its HBONE workloads.
    pub fn local_identities(&self) -> std::collections::BTreeSet<Identity> {
        self.workloads
            .values()
            .filter(|wl| wl.protocol == crate::model::Protocol::HBONE && self.scope.contains(wl))
            .map(|wl| wl.identity())
            .collect()
    }

    /// The policies that apply to a destination workload: its namespace's, the global ones, and
    /// the ones it names.
    pub fn policies_for(&self, wl: &Workload) -> Vec<&Arc<Authorization>> {
        let mut out: Vec<&Arc<Authorization>> = self.global_policies.iter().collect();
        out.extend(self.namespace_policies.get(&wl.namespace).into_iter().flatten());
        // Named ones apply whatever their scope says, once.
        for key in &wl.authorization_policies {
            if let Some(p) = self.policies.get(key) {
                if p.scope == PolicyScope::WorkloadSelector {
                    out.push(p);
                }
            }
        }
        out
    }

    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.values()
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<ServiceEntry>> {
        self.services.values()
    }

    pub fn policies(&self) -> impl Iterator<Item = &Arc<Authorization>> {
        self.policies.values()
    }
}

type ByAddr<T> = HashMap<IpAddr, Vec<(String, Arc<T>)>>;

/// Inserts `value` at `network`/`ip`; returns what was there before.
fn insert_by_addr<T>(map: &mut ByAddr<T>, network: &str, ip: IpAddr, value: Arc<T>) -> Option<Arc<T>> {
    let list = map.entry(ip.to_canonical()).or_default();
    match list.iter_mut().find(|(n, _)| n == network) {
        Some((_, v)) => Some(std::mem::replace(v, value)),
        None => {
            list.push((network.to_string(), value));
            None
        }
    }
}

/// A lookup by address that allocates nothing: by IP, then the (usually one) network.
fn get_by_addr<'a, T>(map: &'a ByAddr<T>, network: &str, ip: IpAddr) -> Option<&'a Arc<T>> {
    map.get(&ip.to_canonical())?.iter().find(|(n, _)| n == network).map(|(_, v)| v)
}

/// Workloads by uid and by network address; a shared address is a warning, the later one wins.
fn index_workloads(
    list: Vec<Workload>,
    warnings: &mut Vec<String>,
) -> (BTreeMap<String, Arc<Workload>>, ByAddr<Workload>) {
    let mut workloads = BTreeMap::new();
    let mut by_addr = HashMap::new();
    for wl in list {
        let wl = Arc::new(wl);
        // A host-network pod has the node's address: that address is not the pod's.
        let addressed = wl.network_mode != crate::model::NetworkMode::HostNetwork;
        for ip in wl.workload_ips.iter().filter(|_| addressed) {
            if let Some(prev) = insert_by_addr(&mut by_addr, &wl.network, *ip, wl.clone()) {
                let key = NetworkAddress { network: wl.network.clone(), address: ip.to_canonical() };
                warnings.push(format!("workloads {} and {} share address {key}; using {}", prev.uid, wl.uid, wl.uid));
            }
        }
        workloads.insert(wl.uid.clone(), wl);
    }
    (workloads, by_addr)
}

/// The endpoints each service gets from the workloads that name it, by service and uid.
fn endpoints_named_by_workloads(
    workloads: &BTreeMap<String, Arc<Workload>>,
) -> HashMap<NamespacedHostname, BTreeMap<String, ServiceEndpoint>> {
    let mut endpoints: HashMap<NamespacedHostname, BTreeMap<String, ServiceEndpoint>> = HashMap::new();
    for wl in workloads.values() {
        for (svc, ports) in &wl.services {
            endpoints.entry(svc.clone()).or_default().insert(
                wl.uid.clone(),
                ServiceEndpoint { workload: wl.clone(), ports: ports.clone(), status: wl.status },
            );
        }
    }
    endpoints
}

type ServiceIndexes = (
    BTreeMap<NamespacedHostname, Arc<ServiceEntry>>,
    ByAddr<ServiceEntry>,
    HashMap<String, Vec<Arc<ServiceEntry>>>,
    HashMap<NetworkAddress, Vec<Arc<ServiceEntry>>>,
);

/// Services with their endpoints resolved (named by workloads, or listed by the service), by
/// key, by VIP and by hostname. Endpoints of services nobody configured are warnings.
fn index_services(
    list: Vec<Service>,
    workloads: &BTreeMap<String, Arc<Workload>>,
    mut endpoints: HashMap<NamespacedHostname, BTreeMap<String, ServiceEndpoint>>,
    warnings: &mut Vec<String>,
) -> ServiceIndexes {
    let mut services = BTreeMap::new();
    let mut by_vip = HashMap::new();
    let mut by_host: HashMap<String, Vec<Arc<ServiceEntry>>> = HashMap::new();
    let mut shared: HashMap<NetworkAddress, Vec<Arc<ServiceEntry>>> = HashMap::new();
    for mut svc in list {
        let key = svc.namespaced_hostname();
        let mut eps = endpoints.remove(&key).unwrap_or_default();
        for (uid, ep) in &svc.endpoints {
            match workloads.get(&ep.workload_uid) {
                Some(wl) => {
                    eps.entry(uid.clone()).or_insert_with(|| ServiceEndpoint {
                        workload: wl.clone(),
                        ports: ep.port.clone(),
                        status: ep.status,
                    });
                }
                None => {
                    warnings.push(format!("service {key}: endpoint {uid} names unknown workload {}", ep.workload_uid))
                }
            }
        }
        svc.endpoints = eps
            .iter()
            .map(|(uid, ep)| {
                let endpoint =
                    Endpoint { workload_uid: ep.workload.uid.clone(), port: ep.ports.clone(), status: ep.status };
                (uid.clone(), endpoint)
            })
            .collect();
        let entry = Arc::new(ServiceEntry { service: svc, endpoints: eps.into_values().collect() });
        for vip in &entry.service.vips {
            if let Some(prev) = insert_by_addr(&mut by_vip, &vip.network, vip.address, entry.clone()) {
                // Several services on one VIP (Istio allows it): each client gets the one Istio
                // would choose for it.
                let key = NetworkAddress { network: vip.network.clone(), address: vip.address.to_canonical() };
                let list = shared.entry(key).or_default();
                if list.is_empty() {
                    list.push(prev);
                }
                list.push(entry.clone());
            }
        }
        by_host.entry(entry.service.hostname.clone()).or_default().push(entry.clone());
        services.insert(key, entry);
    }
    for (svc, eps) in endpoints {
        for uid in eps.keys() {
            warnings.push(format!("workload {uid} names service {svc}, which is not configured"));
        }
    }
    (services, by_vip, by_host, shared)
}

/// Every service's address ranges, longest prefix first (the first that holds an address wins).
fn service_cidrs(
    services: &BTreeMap<NamespacedHostname, Arc<ServiceEntry>>,
) -> Vec<(crate::model::NetworkCidr, Arc<ServiceEntry>)> {
    let mut out: Vec<_> =
        services.values().flat_map(|s| s.service.cidr_vips.iter().map(move |c| (c.clone(), s.clone()))).collect();
    out.sort_by_key(|c| std::cmp::Reverse(c.0.net.prefix));
    out
}

type PolicyLists = (Vec<Arc<Authorization>>, HashMap<String, Vec<Arc<Authorization>>>);

/// `Global` policies, and `Namespace` policies by namespace (selector policies are named by
/// their workloads instead).
fn policies_by_scope(policies: &BTreeMap<String, Arc<Authorization>>) -> PolicyLists {
    let mut global = Vec::new();
    let mut by_namespace: HashMap<String, Vec<Arc<Authorization>>> = HashMap::new();
    for p in policies.values() {
        match p.scope {
            PolicyScope::Global => global.push(p.clone()),
            PolicyScope::Namespace => by_namespace.entry(p.namespace.clone()).or_default().push(p.clone()),
            PolicyScope::WorkloadSelector => {}
        }
    }
    (global, by_namespace)
}

fn warn_unknown_policy_names(
    workloads: &BTreeMap<String, Arc<Workload>>,
    policies: &BTreeMap<String, Arc<Authorization>>,
    warnings: &mut Vec<String>,
) {
    for wl in workloads.values() {
        for p in wl.authorization_policies.iter().filter(|p| !policies.contains_key(*p)) {
            warnings.push(format!("workload {} names policy {p}, which is not configured", wl.uid));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Action, Protocol};

    fn wl(uid: &str, ip: &str, node: &str, svc: &[(&str, u16, u16)]) -> Workload {
        let mut w: Workload = serde_yaml_ng::from_str(&format!(
            "uid: {uid}\nname: {uid}\nnamespace: ns\nworkloadIps: [{ip}]\nnode: {node}\nprotocol: TCP"
        ))
        .unwrap();
        for (s, p, t) in svc {
            w.services.entry(s.parse().unwrap()).or_default().insert(*p, *t);
        }
        w
    }

    fn svc(host: &str, vip: &str) -> Service {
        serde_yaml_ng::from_str(&format!(
            "name: {host}\nnamespace: ns\nhostname: {host}\nvips: [\"{vip}\"]\nports: {{80: 8080}}"
        ))
        .unwrap()
    }

    fn state() -> ConfigState {
        ConfigState {
            workloads: vec![
                wl("a", "10.0.0.1", "n1", &[("ns/web.ns.svc", 80, 8080)]),
                wl("b", "10.0.0.2", "n2", &[("ns/web.ns.svc", 80, 9090), ("ns/missing", 1, 1)]),
            ],
            services: vec![svc("web.ns.svc", "/10.96.0.1")],
            policies: vec![Authorization {
                name: "p".into(),
                namespace: "ns".into(),
                scope: PolicyScope::Namespace,
                action: Action::Allow,
                rules: vec![],
                dry_run: false,
            }],
        }
    }

    #[test]
    fn indexes() {
        let s = Snapshot::build(
            7,
            SourceInfo { kind: "test", location: String::new() },
            LocalScope::Node(Some("n1".into())),
            state(),
        );
        assert_eq!(s.generation, 7);
        assert_eq!(s.workload_by_ip("", "10.0.0.2".parse().unwrap()).unwrap().uid, "b");
        assert!(s.workload_by_ip("other", "10.0.0.2".parse().unwrap()).is_none());
        assert_eq!(s.workload_by_ip("", "::ffff:10.0.0.1".parse().unwrap()).unwrap().uid, "a");
        assert_eq!(s.workload_by_uid("a").unwrap().protocol, Protocol::TCP);
        assert!(s.local_workload_by_ip("", "10.0.0.1".parse().unwrap()).is_some());
        assert!(s.local_workload_by_ip("", "10.0.0.2".parse().unwrap()).is_none(), "b is on another node");
        let web = s.service_by_vip("", "10.96.0.1".parse().unwrap()).unwrap();
        assert_eq!(web.endpoints.len(), 2);
        assert_eq!(web.service.endpoints["b"].port[&80], 9090);
        assert!(std::ptr::eq(s.service_by_hostname("web.ns.svc.", "x").unwrap().as_ref(), web.as_ref()));
        assert!(s.warnings.iter().any(|w| w.contains("ns/missing")), "{:?}", s.warnings);
        let a = s.workload_by_uid("a").unwrap().clone();
        assert_eq!(s.policies_for(&a).len(), 1);
    }

    #[test]
    fn shared_vips_are_chosen_per_client_and_host_network_pods_have_no_address() {
        let yaml = r#"
workloads:
- {uid: hn, name: hn, namespace: ns, workloadIps: [10.0.0.9], networkMode: HostNetwork}
- {uid: pod, name: pod, namespace: ns, workloadIps: [10.0.0.8]}
services:
- {name: s, namespace: a, hostname: s.a.svc.cluster.local, vips: ["/10.96.0.1"], ports: {80: 80}}
- {name: s, namespace: b, hostname: s.b.svc.cluster.local, vips: ["/10.96.0.1"], ports: {80: 80}, canonical: true}
- {name: s, namespace: c, hostname: s.c.svc.cluster.local, vips: ["/10.96.0.1"], ports: {80: 80}}
"#;
        let state = crate::control::local::parse(yaml).unwrap();
        let s = Snapshot::build(1, SourceInfo { kind: "t", location: String::new() }, LocalScope::Node(None), state);
        let vip: IpAddr = "10.96.0.1".parse().unwrap();
        let pick = |ns: &str| s.service_by_vip_for("", vip, ns, Some("c")).unwrap().service.namespace.clone();
        assert_eq!(pick("a"), "a", "the client's namespace first");
        assert_eq!(pick("c"), "c");
        assert_eq!(pick("elsewhere"), "b", "then the canonical one, not the last configured");
        assert!(s.workload_by_ip("", "10.0.0.9".parse().unwrap()).is_none(), "host network: the node's address");
        assert!(s.workload_by_uid("hn").is_some());
        assert!(s.workload_by_ip("", "10.0.0.8".parse().unwrap()).is_some());
    }

    #[test]
    fn cidr_vips_longest_prefix_wins() {
        let yaml = r#"
services:
- {name: wide, namespace: ns, hostname: wide, vips: [], cidrVips: ["/10.200.0.0/16"], ports: {80: 80}}
- {name: narrow, namespace: ns, hostname: narrow, vips: ["/10.96.0.9"], cidrVips: ["/10.200.1.0/24"], ports: {80: 80}}
"#;
        let state = crate::control::local::parse(yaml).unwrap();
        let s = Snapshot::build(1, SourceInfo { kind: "t", location: String::new() }, LocalScope::Node(None), state);
        let name = |ip: &str| s.service_by_vip("", ip.parse().unwrap()).map(|e| e.service.name.clone());
        assert_eq!(name("10.200.1.5").as_deref(), Some("narrow"));
        assert_eq!(name("10.200.2.5").as_deref(), Some("wide"));
        assert_eq!(name("10.96.0.9").as_deref(), Some("narrow"), "exact VIPs first");
        assert_eq!(name("10.201.0.1"), None);
        assert_eq!(s.service_by_vip("other", "10.200.1.5".parse().unwrap()).map(|e| e.service.name.clone()), None);
    }

    #[test]
    fn dedicated_scope() {
        let scope = LocalScope::Dedicated(WorkloadInfo {
            namespace: "ns".into(),
            name: "b".into(),
            service_account: "default".into(),
        });
        let s = Snapshot::build(1, SourceInfo { kind: "test", location: String::new() }, scope, state());
        assert_eq!(s.dedicated_workload().unwrap().uid, "b");
        assert!(s.local_workload_by_ip("", "10.0.0.1".parse().unwrap()).is_none());
    }

    #[test]
    fn policies_for_a_workload_by_scope() {
        let mut st = state();
        let pol = |name: &str, ns: &str, scope: PolicyScope| Authorization {
            name: name.into(),
            namespace: ns.into(),
            scope,
            action: Action::Allow,
            rules: vec![],
            dry_run: false,
        };
        st.policies = vec![
            pol("global", "istio-system", PolicyScope::Global),
            pol("same-ns", "ns", PolicyScope::Namespace),
            pol("other-ns", "other", PolicyScope::Namespace),
            pol("named", "ns", PolicyScope::WorkloadSelector),
            pol("unnamed", "ns", PolicyScope::WorkloadSelector),
        ];
        st.workloads[0].authorization_policies = vec!["ns/named".into(), "other/other-ns".into(), "ns/missing".into()];
        let s = Snapshot::build(1, SourceInfo { kind: "test", location: String::new() }, LocalScope::Node(None), st);
        let a = s.workload_by_uid("a").unwrap().clone();
        let mut names: Vec<String> = s.policies_for(&a).iter().map(|p| p.name.clone()).collect();
        names.sort();
        assert_eq!(names, ["global", "named", "same-ns"], "a Namespace policy elsewhere applies by scope, not by name");
    }
}
