//! Services: VIPs, ports and load-balancing settings. Endpoints are derived from the workloads
//! that name the service (and may also be listed explicitly, as Istio's file format allows).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::addr::{NamespacedHostname, NetworkAddress};
use super::workload::{GatewayAddress, HealthStatus};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RoutingPreference {
    Region,
    Zone,
    Subzone,
    Node,
    Cluster,
    Network,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum LoadBalancerMode {
    /// Every healthy endpoint is eligible.
    #[default]
    Standard,
    /// Only endpoints matching the source on every routing preference.
    Strict,
    /// The endpoints matching the most leading routing preferences.
    Failover,
    /// No endpoint selection: the original destination is used.
    Passthrough,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum HealthPolicy {
    #[default]
    OnlyHealthy,
    AllowAll,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancer {
    pub routing_preferences: Vec<RoutingPreference>,
    pub mode: LoadBalancerMode,
    pub health_policy: HealthPolicy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IpFamilies {
    Dual,
    IPv4,
    IPv6,
}

/// An endpoint listed explicitly in a service (the file format allows it; xDS derives them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoint {
    pub workload_uid: String,
    pub port: BTreeMap<u16, u16>,
    pub status: HealthStatus,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    pub vips: Vec<NetworkAddress>,
    /// Addresses that are ranges (`network/ip/length`): a destination inside one is this
    /// service's, the longest prefix winning.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cidr_vips: Vec<crate::model::NetworkCidr>,
    /// Service port -> target port (0: the endpoint's own mapping decides).
    pub ports: BTreeMap<u16, u16>,
    #[serde(default)]
    pub endpoints: BTreeMap<String, Endpoint>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<GatewayAddress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_families: Option<IpFamilies>,
    /// Among services sharing a hostname, the one DNS prefers after the client's namespace.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub canonical: bool,
    /// Who may resolve it: everyone, or only clients in its namespace.
    #[serde(default, skip_serializing_if = "Visibility::is_public")]
    pub visibility: Visibility,
}

/// A service's visibility to DNS clients (Istio's `exportTo: .` ServiceEntries are `Namespace`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Visibility {
    #[default]
    Public,
    Namespace,
}

impl Visibility {
    pub fn is_public(&self) -> bool {
        *self == Visibility::Public
    }
}

impl Service {
    /// Whether a client in `namespace` may see this service (DNS).
    pub fn visible_to(&self, namespace: &str) -> bool {
        self.visibility == Visibility::Public || self.namespace == namespace
    }

    pub fn namespaced_hostname(&self) -> NamespacedHostname {
        NamespacedHostname { namespace: self.namespace.clone(), hostname: self.hostname.clone() }
    }
}
