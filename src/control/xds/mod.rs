//! istiod's workload xDS, on the control thread: the generated protobuf types (from `proto/`),
//! their conversion into the model, and the delta ADS client that keeps the proxy's workloads,
//! services and policies in sync.

pub mod client;
pub mod convert;
pub mod error;

/// Generated from `proto/` by `build.rs`.
#[allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub)]
pub mod proto {
    pub mod workload {
        include!(concat!(env!("OUT_DIR"), "/istio.workload.rs"));
    }
    pub mod security {
        include!(concat!(env!("OUT_DIR"), "/istio.security.rs"));
    }
    pub mod discovery {
        include!(concat!(env!("OUT_DIR"), "/envoy.service.discovery.v3.rs"));
    }
    pub mod ca {
        include!(concat!(env!("OUT_DIR"), "/istio.v1.auth.rs"));
    }
}

pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";
