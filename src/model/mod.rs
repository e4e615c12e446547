//! Plain data both planes share: workloads, services, policies, addresses and identities.
//!
//! Immutable once built; shared behind `Arc` inside a snapshot. The serde shapes are the
//! standalone config file's (camelCase, as Istio's ztunnel writes them), so `config_dump`
//! prints what an operator would write. Values are validated while deserializing, so a bad
//! value is reported with its field path.

mod addr;
mod policy;
mod service;
mod workload;

pub use addr::{IpNet, NamespacedHostname, NetworkAddress, NetworkCidr};
pub use policy::{Action, Authorization, PolicyScope, RbacMatch, ServiceAccountMatch, StringMatch};
pub use service::{
    Endpoint, HealthPolicy, IpFamilies, LoadBalancer, LoadBalancerMode, RoutingPreference, Service, Visibility,
};
pub use workload::{
    ApplicationTunnel, GatewayAddress, GatewayDestination, HealthStatus, Identity, Locality, NetworkMode, Protocol,
    TunnelProtocol, Workload,
};

/// One complete configuration, as a config source delivers it. A snapshot is built from this.
#[derive(Debug, Clone, Default)]
pub struct ConfigState {
    pub workloads: Vec<Workload>,
    pub services: Vec<Service>,
    pub policies: Vec<Authorization>,
}
