//! Workloads (pods, VMs) and their SPIFFE identities.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::addr::{NamespacedHostname, NetworkAddress};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Protocol {
    /// Plain TCP: the workload is not (yet) in the mesh.
    #[default]
    TCP,
    /// Reached over HBONE (mTLS + HTTP/2 CONNECT on 15008).
    HBONE,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum NetworkMode {
    #[default]
    Standard,
    HostNetwork,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum HealthStatus {
    #[default]
    Healthy,
    Unhealthy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum TunnelProtocol {
    #[default]
    NONE,
    PROXY,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApplicationTunnel {
    pub protocol: TunnelProtocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

/// Where a waypoint or network gateway is: an address, or a service by hostname.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayDestination {
    Address(NetworkAddress),
    Hostname(NamespacedHostname),
}

impl FromStr for GatewayDestination {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(a) = s.parse::<NetworkAddress>() {
            return Ok(GatewayDestination::Address(a));
        }
        s.parse::<NamespacedHostname>()
            .map(GatewayDestination::Hostname)
            .map_err(|_| format!("{s:?} is neither network/ip nor namespace/hostname"))
    }
}

impl fmt::Display for GatewayDestination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GatewayDestination::Address(a) => a.fmt(f),
            GatewayDestination::Hostname(h) => h.fmt(f),
        }
    }
}

impl Serialize for GatewayDestination {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for GatewayDestination {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayAddress {
    pub destination: GatewayDestination,
    pub hbone_mtls_port: u16,
}

/// A SPIFFE identity, `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

impl FromStr for Identity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s.strip_prefix("spiffe://").ok_or_else(|| format!("{s:?} does not start with spiffe://"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if !td.is_empty() && !ns.is_empty() && !sa.is_empty() => Ok(Identity {
                trust_domain: td.to_string(),
                namespace: ns.to_string(),
                service_account: sa.to_string(),
            }),
            _ => Err(format!("{s:?} is not spiffe://<trust domain>/ns/<namespace>/sa/<service account>")),
        }
    }
}

fn default_capacity() -> u32 {
    1
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

fn is_one(v: &u32) -> bool {
    *v == 1
}

/// A workload as the config file and `config_dump` spell it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub name: String,
    pub namespace: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub trust_domain: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service_account: String,
    pub workload_ips: Vec<IpAddr>,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default, skip_serializing_if = "is_default")]
    pub network_mode: NetworkMode,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub network: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<GatewayAddress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_gateway: Option<GatewayAddress>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hostname: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub workload_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub workload_type: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub canonical_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub canonical_revision: String,
    #[serde(default, skip_serializing_if = "is_default")]
    pub native_tunnel: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub application_tunnel: Option<ApplicationTunnel>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub authorization_policies: Vec<String>,
    #[serde(default)]
    pub status: HealthStatus,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cluster_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<Locality>,
    #[serde(default = "default_capacity", skip_serializing_if = "is_one")]
    pub capacity: u32,
    /// The services this workload backs, with service port -> target port.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub services: BTreeMap<NamespacedHostname, BTreeMap<u16, u16>>,
}

impl Workload {
    /// The workload's SPIFFE identity, with Istio's defaults for empty fields.
    pub fn identity(&self) -> Identity {
        Identity {
            trust_domain: if self.trust_domain.is_empty() { "cluster.local".into() } else { self.trust_domain.clone() },
            namespace: self.namespace.clone(),
            service_account: if self.service_account.is_empty() {
                "default".into()
            } else {
                self.service_account.clone()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_roundtrip_and_defaults() {
        let id: Identity = "spiffe://cluster.local/ns/default/sa/sleep".parse().unwrap();
        assert_eq!(id.namespace, "default");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/sleep");
        for bad in ["cluster.local/ns/a/sa/b", "spiffe://td/ns/a", "spiffe://td/sa/b/ns/a", "spiffe:///ns/a/sa/b"] {
            assert!(bad.parse::<Identity>().is_err(), "{bad}");
        }
        let wl: Workload = serde_yaml_ng::from_str("namespace: ns\nworkloadIps: [10.0.0.1]").unwrap();
        assert_eq!(wl.identity().to_string(), "spiffe://cluster.local/ns/ns/sa/default");
        assert_eq!(wl.capacity, 1);
        assert_eq!(wl.protocol, Protocol::TCP);
    }

    #[test]
    fn gateway_destination_forms() {
        assert!(matches!("/10.0.0.1".parse::<GatewayDestination>(), Ok(GatewayDestination::Address(_))));
        assert!(matches!("ns/waypoint.ns.svc".parse::<GatewayDestination>(), Ok(GatewayDestination::Hostname(_))));
        assert!("justaname".parse::<GatewayDestination>().is_err());
    }
}
