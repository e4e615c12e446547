//! In-pod mode: what `PROXY_MODE=shared` means in current Istio. istio-cni's node agent sets up
//! redirection inside each ambient pod's network namespace and hands the namespace over a unix
//! socket (ZDS, `zds`); the control thread keeps the pods (`control::pods`) and every worker
//! binds that pod's listeners inside its namespace (`worker::pods`), so each pod is served
//! thread-per-core like the node's own listeners.
//!
//! This module holds what both sides share: who a pod is ([`PodSpec`]) and the wire protocol.

pub mod zds;

use std::sync::Arc;

use crate::sys::NetNs;

/// Who a pod is, as the node agent describes it (Kubernetes names).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodInfo {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
}

/// One pod's proxy, as handed to every worker. A replaced pod (same uid, new namespace) gets a
/// new `id`, so its old listeners and connections drain apart from the new ones.
#[derive(Debug)]
pub struct PodSpec {
    /// Unique over the process's life; never 0 (0 tags the node's own connections).
    pub id: u64,
    /// The Kubernetes pod uid.
    pub uid: String,
    pub info: PodInfo,
    /// The pod's network namespace, held open for as long as any worker serves the pod (a
    /// retry after a failed start shares it under a new id).
    pub netns: Arc<NetNs>,
}

/// What a worker reports of a pod's open connections (for `config_dump`'s `workloadState`).
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodConnection {
    #[serde(skip)]
    pub pod: u64,
    #[serde(skip)]
    pub inbound: bool,
    pub src: std::net::SocketAddr,
    pub original_dst: Option<std::net::SocketAddr>,
    pub actual_dst: Option<std::net::SocketAddr>,
    pub protocol: &'static str,
}

pub type SharedPod = Arc<PodSpec>;
