//! The delta ADS client: one gRPC stream to istiod carrying both resource types (workload
//! addresses and authorization policies), on the control thread.
//!
//! - Wildcard subscription to both types; every response is ACKed, or NACKed with
//!   `name: reason; ...` while the valid resources of it still apply.
//! - One response becomes one new config generation (never half a push).
//! - On any failure: reconnect after a backoff (10 ms doubling to 15 s, reset by a response),
//!   announcing what we hold in `initial_resource_versions`; the last config keeps serving.
//! - The bearer token is re-read from its file on every connect (it rotates).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use prost::Message;
use serde::Serialize;

use super::convert::AddressResource;
use super::error::XdsError;
use super::proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use super::proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Status};
use super::proto::workload as pwl;
use super::{ADDRESS_TYPE, AUTHORIZATION_TYPE};
use crate::model::{Authorization, ConfigState};

const BACKOFF_START: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(15);

/// How to reach istiod and who we are to it.
#[derive(Debug, Clone)]
pub struct XdsOptions {
    /// `https://host:port`.
    pub address: String,
    /// PEM roots istiod's certificate must chain to.
    pub root_ca: Vec<u8>,
    /// The name to verify istiod's certificate against, when not the address's host.
    pub alt_hostname: Option<String>,
    /// File holding the bearer token, re-read on every connect.
    pub token_path: Option<PathBuf>,
    pub cluster_id: String,
    pub node_id: String,
    pub node_metadata: BTreeMap<String, String>,
    /// `XDS_HEADER_*`: extra request metadata.
    pub headers: Vec<(String, String)>,
}

/// Everything istiod has sent that is still current, by resource name, with its version.
#[derive(Debug, Default)]
pub struct XdsStore {
    pub addresses: BTreeMap<String, (String, AddressResource)>,
    pub policies: BTreeMap<String, (String, Authorization)>,
}

impl XdsStore {
    /// The store as config, to merge with the other sources.
    pub fn config_state(&self) -> ConfigState {
        let mut state = ConfigState::default();
        for (_, r) in self.addresses.values() {
            match r {
                AddressResource::Workload(w) => state.workloads.push((**w).clone()),
                AddressResource::Service(s) => state.services.push((**s).clone()),
            }
        }
        state.policies = self.policies.values().map(|(_, p)| p.clone()).collect();
        state
    }

    fn versions(&self, type_url: &str) -> HashMap<String, String> {
        match type_url {
            ADDRESS_TYPE => self.addresses.iter().map(|(k, (v, _))| (k.clone(), v.clone())).collect(),
            AUTHORIZATION_TYPE => self.policies.iter().map(|(k, (v, _))| (k.clone(), v.clone())).collect(),
            _ => HashMap::new(),
        }
    }
}

/// The connection's state, for readiness and `config_dump`.
#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XdsStatus {
    pub address: String,
    pub connected: bool,
    /// Types received and answered (ACK or NACK) at least once since start.
    pub synced_types: BTreeSet<String>,
    pub connects: u64,
    pub last_error: Option<String>,
    pub last_nack: Option<String>,
}

/// `istio_xds_*` counters.
#[derive(Debug, Default)]
pub struct XdsCounters {
    pub terminations: BTreeMap<String, u64>,
    pub messages: BTreeMap<String, u64>,
    pub message_bytes: BTreeMap<String, u64>,
}

/// Called with the store after every response (one new generation per push).
pub type OnUpdate = Box<dyn Fn(&XdsStore)>;

pub struct XdsClient {
    opts: XdsOptions,
    pub store: RefCell<XdsStore>,
    pub status: RefCell<XdsStatus>,
    pub counters: RefCell<XdsCounters>,
    on_update: OnUpdate,
}

impl XdsClient {
    pub fn new(opts: XdsOptions, on_update: OnUpdate) -> Rc<XdsClient> {
        let status = XdsStatus { address: opts.address.clone(), ..XdsStatus::default() };
        Rc::new(XdsClient {
            opts,
            store: RefCell::default(),
            status: RefCell::new(status),
            counters: RefCell::default(),
            on_update,
        })
    }

    /// True once both types have been received and answered.
    pub fn synced(&self) -> bool {
        let s = self.status.borrow();
        s.synced_types.contains(ADDRESS_TYPE) && s.synced_types.contains(AUTHORIZATION_TYPE)
    }

    /// Runs forever: a session, then a backoff, then the next session.
    pub async fn run(self: Rc<Self>) {
        let mut backoff = BACKOFF_START;
        loop {
            let ended = self.session(&mut backoff).await.err().unwrap_or(XdsError::ClosedByServer);
            let reason = ended.describe();
            *self.counters.borrow_mut().terminations.entry(ended.kind().into()).or_default() += 1;
            {
                let mut st = self.status.borrow_mut();
                st.connected = false;
                st.last_error = Some(reason.clone());
            }
            tracing::warn!(address = %self.opts.address, retry_in = ?backoff, "xDS connection ended: {reason}");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn connect(&self) -> Result<tonic::transport::Channel, XdsError> {
        let endpoint =
            tls_endpoint(&self.opts.address, &self.opts.root_ca, self.opts.alt_hostname.as_deref(), "XDS_ADDRESS")?
                .http2_keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(10));
        endpoint.connect().await.map_err(|source| XdsError::Connect { address: self.opts.address.clone(), source })
    }

    /// Adds the bearer token (read now), the cluster id and the configured extra headers to a
    /// request.
    pub fn authorize<T>(
        token_path: Option<&PathBuf>,
        cluster_id: &str,
        headers: &[(String, String)],
        req: &mut tonic::Request<T>,
    ) -> Result<(), XdsError> {
        for (name, value) in headers {
            let key = tonic::metadata::MetadataKey::from_bytes(name.as_bytes())
                .map_err(|_| XdsError::Header { what: "an XDS_HEADER_/CA_HEADER_ name" })?;
            let value = value.parse().map_err(|_| XdsError::Header { what: "an XDS_HEADER_/CA_HEADER_ value" })?;
            req.metadata_mut().insert(key, value);
        }
        if let Some(path) = token_path {
            let token =
                std::fs::read_to_string(path).map_err(|source| XdsError::Token { path: path.clone(), source })?;
            let value =
                format!("Bearer {}", token.trim()).parse().map_err(|_| XdsError::Header { what: "the token" })?;
            req.metadata_mut().insert("authorization", value);
        }
        let cluster = cluster_id.parse().map_err(|_| XdsError::Header { what: "CLUSTER_ID" })?;
        req.metadata_mut().insert("clusterid", cluster);
        Ok(())
    }

    fn node(&self) -> Node {
        let fields = self
            .opts
            .node_metadata
            .iter()
            .map(|(k, v)| {
                (k.clone(), prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(v.clone())) })
            })
            .collect();
        Node {
            id: self.opts.node_id.clone(),
            cluster: self.opts.cluster_id.clone(),
            metadata: Some(prost_types::Struct { fields }),
        }
    }

    async fn session(&self, backoff: &mut Duration) -> Result<(), XdsError> {
        let channel = self.connect().await?;
        let (tx, rx) = tokio::sync::mpsc::channel::<DeltaDiscoveryRequest>(16);
        for type_url in [ADDRESS_TYPE, AUTHORIZATION_TYPE] {
            let initial = DeltaDiscoveryRequest {
                node: Some(self.node()),
                type_url: type_url.into(),
                // Empty on the first request: a wildcard subscription.
                resource_names_subscribe: Vec::new(),
                initial_resource_versions: self.store.borrow().versions(type_url),
                ..Default::default()
            };
            tx.send(initial).await.map_err(|_| XdsError::RequestClosed)?;
        }
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        XdsClient::authorize(self.opts.token_path.as_ref(), &self.opts.cluster_id, &self.opts.headers, &mut request)?;
        let mut client = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(256 * 1024 * 1024)
            .max_encoding_message_size(16 * 1024 * 1024);
        let mut responses = client.delta_aggregated_resources(request).await.map_err(XdsError::Open)?.into_inner();
        {
            let mut st = self.status.borrow_mut();
            st.connected = true;
            st.connects += 1;
        }
        tracing::info!(address = %self.opts.address, "xDS stream open");
        while let Some(resp) = responses.message().await.map_err(XdsError::Stream)? {
            *backoff = BACKOFF_START;
            let answer = self.handle(resp);
            tx.send(answer).await.map_err(|_| XdsError::RequestClosed)?;
        }
        Err(XdsError::ClosedByServer)
    }

    /// Applies one response and returns its ACK (or NACK).
    fn handle(&self, resp: DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        let type_url = resp.type_url.clone();
        {
            let mut c = self.counters.borrow_mut();
            *c.messages.entry(type_url.clone()).or_default() += 1;
            *c.message_bytes.entry(type_url.clone()).or_default() += resp.encoded_len() as u64;
        }
        let errors = self.apply(&resp);
        (self.on_update)(&self.store.borrow());
        let error_detail = (!errors.is_empty()).then(|| {
            let message = errors.join("; ");
            tracing::warn!(type_url = %type_url, nonce = %resp.nonce, "NACK: {message}");
            self.status.borrow_mut().last_nack = Some(message.clone());
            // INVALID_ARGUMENT
            Status { code: 3, message }
        });
        tracing::debug!(type_url = %type_url, resources = resp.resources.len(), removed = resp.removed_resources.len(), "xDS response applied");
        self.status.borrow_mut().synced_types.insert(type_url.clone());
        DeltaDiscoveryRequest { type_url, response_nonce: resp.nonce, error_detail, ..Default::default() }
    }

    /// Applies what converts, returns `name: reason` for what does not.
    fn apply(&self, resp: &DeltaDiscoveryResponse) -> Vec<String> {
        let mut errors = Vec::new();
        let mut store = self.store.borrow_mut();
        match resp.type_url.as_str() {
            ADDRESS_TYPE => merge(&mut store.addresses, resp, &mut errors, |bytes| {
                let proto = pwl::Address::decode(bytes).map_err(|e| format!("decoding: {e}"))?;
                AddressResource::try_from(proto).map_err(|e| e.to_string())
            }),
            AUTHORIZATION_TYPE => {
                merge(&mut store.policies, resp, &mut errors, super::convert::authorization_from_wire)
            }
            other => errors.push(format!("{other}: a type this client did not subscribe to")),
        }
        errors
    }

    /// The `istio_xds_*` counters in the Prometheus text format.
    pub fn render_metrics(&self, out: &mut String, openmetrics: bool) {
        use std::fmt::Write;
        let c = self.counters.borrow();
        // OpenMetrics names a counter family without its `_total` suffix.
        let fam = |n: &str| if openmetrics { n.trim_end_matches("_total").to_string() } else { n.to_string() };
        let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
        let name = "istio_xds_connection_terminations_total";
        let _ = writeln!(out, "# HELP {} xDS connections ended, by reason.", fam(name));
        let _ = writeln!(out, "# TYPE {} counter", fam(name));
        for (k, v) in &c.terminations {
            let _ = writeln!(out, "istio_xds_connection_terminations_total{{reason=\"{}\"}} {v}", esc(k));
        }
        let name = "istio_xds_message_total";
        let _ = writeln!(out, "# HELP {} xDS responses received, by type.", fam(name));
        let _ = writeln!(out, "# TYPE {} counter", fam(name));
        for (k, v) in &c.messages {
            let _ = writeln!(out, "istio_xds_message_total{{url=\"{}\"}} {v}", esc(k));
        }
        let name = "istio_xds_message_bytes_total";
        let _ = writeln!(out, "# HELP {} Bytes of xDS responses received, by type.", fam(name));
        let _ = writeln!(out, "# TYPE {} counter", fam(name));
        for (k, v) in &c.message_bytes {
            let _ = writeln!(out, "istio_xds_message_bytes_total{{url=\"{}\"}} {v}", esc(k));
        }
    }
}

/// Decodes and converts each resource of `resp` with `convert` and stores it by name with its
/// version; removes the removed names. What fails is reported as `name: reason`.
fn merge<M>(
    into: &mut BTreeMap<String, (String, M)>,
    resp: &DeltaDiscoveryResponse,
    errors: &mut Vec<String>,
    convert: impl Fn(&[u8]) -> Result<M, String>,
) {
    for r in &resp.resources {
        let decoded = r
            .resource
            .as_ref()
            .ok_or_else(|| "no resource body".to_string())
            .and_then(|any| convert(any.value.as_slice()));
        match decoded {
            Ok(m) => {
                into.insert(r.name.clone(), (r.version.clone(), m));
            }
            Err(e) => errors.push(format!("{}: {e}", r.name)),
        }
    }
    for name in &resp.removed_resources {
        into.remove(name);
    }
}

/// A gRPC endpoint at `address` over TLS, istiod's certificate checked against `root_ca` for
/// `alt_hostname` (or the address's host). `setting` names the setting in errors.
pub fn tls_endpoint(
    address: &str,
    root_ca: &[u8],
    alt_hostname: Option<&str>,
    setting: &'static str,
) -> Result<tonic::transport::Endpoint, XdsError> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    let invalid = |source| XdsError::Endpoint { setting, address: address.to_string(), source };
    let endpoint = Endpoint::from_shared(address.to_string()).map_err(invalid)?;
    let host =
        alt_hostname.map(str::to_string).unwrap_or_else(|| endpoint.uri().host().unwrap_or_default().to_string());
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(root_ca)).domain_name(host);
    Ok(endpoint.tls_config(tls).map_err(invalid)?.connect_timeout(Duration::from_secs(5)))
}
