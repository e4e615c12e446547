//! A fake istiod for tests: the delta ADS service over TLS (its own test root), driven by the
//! test. It keeps a set of resources per type, sends all of them to each new stream (as istiod
//! does), pushes changes to open streams, records every request and its metadata, and can drop
//! its streams or stop and start again on the same port.
#![allow(dead_code)]
// The fake runs on a multi-threaded tokio runtime and is shared with the test thread: a lock is
// the plain tool here, and none of this is the proxy.
#![allow(clippy::disallowed_types)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use ztunnel::control::xds::proto::ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use ztunnel::control::xds::proto::ca::{IstioCertificateRequest, IstioCertificateResponse};
use ztunnel::control::xds::proto::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use ztunnel::control::xds::proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};

pub use ztunnel::control::xds::proto::security as psec;
pub use ztunnel::control::xds::proto::workload as pwl;
pub use ztunnel::control::xds::{ADDRESS_TYPE, AUTHORIZATION_TYPE};

/// What the fake saw and holds.
#[derive(Default)]
pub struct State {
    /// (type url, name) -> (version, encoded resource).
    resources: BTreeMap<(String, String), (String, Vec<u8>)>,
    version: u64,
    /// Every request received, in order.
    pub requests: Vec<DeltaDiscoveryRequest>,
    /// `authorization` and `clusterid` metadata of each stream, in order.
    pub streams: Vec<(Option<String>, Option<String>)>,
    senders: Vec<mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>>,
    /// The mesh root the fake CA signs with: (certificate PEM, key PEM).
    pub mesh_root: Option<(String, String)>,
    /// Sign this identity instead of the one asked for (a broken CA).
    pub ca_wrong_identity: Option<String>,
    /// ImpersonatedIdentity of every CreateCertificate call, in order.
    pub ca_requests: Vec<String>,
}

#[derive(Clone, Default)]
pub struct Fake(pub Arc<Mutex<State>>);

fn any_of(type_url: &str, bytes: Vec<u8>) -> prost_types::Any {
    prost_types::Any { type_url: type_url.into(), value: bytes }
}

impl State {
    fn response(&mut self, type_url: &str, names: &[String], removed: &[String]) -> DeltaDiscoveryResponse {
        self.version += 1;
        let resources = names
            .iter()
            .filter_map(|n| {
                let (v, bytes) = self.resources.get(&(type_url.to_string(), n.clone()))?;
                Some(Resource {
                    version: v.clone(),
                    name: n.clone(),
                    resource: Some(any_of(type_url, bytes.clone())),
                    aliases: vec![],
                })
            })
            .collect();
        DeltaDiscoveryResponse {
            system_version_info: self.version.to_string(),
            resources,
            type_url: type_url.into(),
            nonce: format!("n{}", self.version),
            removed_resources: removed.to_vec(),
        }
    }

    fn names_of(&self, type_url: &str) -> Vec<String> {
        self.resources.keys().filter(|(t, _)| t == type_url).map(|(_, n)| n.clone()).collect()
    }
}

impl Fake {
    /// Sets resources (raw bytes, so a test can send garbage) and pushes them to open streams.
    pub fn push_raw(&self, type_url: &str, items: Vec<(String, Vec<u8>)>, removed: Vec<String>) {
        let mut s = self.0.lock().unwrap();
        let names: Vec<String> = items.iter().map(|(n, _)| n.clone()).collect();
        for (name, bytes) in items {
            let v = format!("v{}", s.version + 1);
            s.resources.insert((type_url.to_string(), name), (v, bytes));
        }
        for r in &removed {
            s.resources.remove(&(type_url.to_string(), r.clone()));
        }
        let resp = s.response(type_url, &names, &removed);
        s.senders.retain(|tx| tx.try_send(Ok(resp.clone())).is_ok());
    }

    pub fn push_workloads(&self, ws: Vec<pwl::Workload>) {
        let items = ws
            .into_iter()
            .map(|w| {
                let name = w.uid.clone();
                (name, pwl::Address { r#type: Some(pwl::address::Type::Workload(w)) }.encode_to_vec())
            })
            .collect();
        self.push_raw(ADDRESS_TYPE, items, vec![]);
    }

    pub fn push_services(&self, ss: Vec<pwl::Service>) {
        let items = ss
            .into_iter()
            .map(|s| {
                let name = format!("{}/{}", s.namespace, s.hostname);
                (name, pwl::Address { r#type: Some(pwl::address::Type::Service(s)) }.encode_to_vec())
            })
            .collect();
        self.push_raw(ADDRESS_TYPE, items, vec![]);
    }

    pub fn push_policies(&self, ps: Vec<psec::Authorization>) {
        let items = ps.into_iter().map(|p| (format!("{}/{}", p.namespace, p.name), p.encode_to_vec())).collect();
        self.push_raw(AUTHORIZATION_TYPE, items, vec![]);
    }

    pub fn remove(&self, type_url: &str, names: &[&str]) {
        self.push_raw(type_url, vec![], names.iter().map(|s| s.to_string()).collect());
    }

    /// Ends every open stream (istiod restarting its side).
    pub fn drop_streams(&self) {
        self.0.lock().unwrap().senders.clear();
    }

    pub fn requests(&self) -> Vec<DeltaDiscoveryRequest> {
        self.0.lock().unwrap().requests.clone()
    }

    pub fn streams(&self) -> Vec<(Option<String>, Option<String>)> {
        self.0.lock().unwrap().streams.clone()
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl IstioCertificateService for Fake {
    async fn create_certificate(
        &self,
        req: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let req = req.into_inner();
        let asked = req
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get("ImpersonatedIdentity"))
            .and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .ok_or_else(|| Status::invalid_argument("no ImpersonatedIdentity"))?;
        let (root_pem, key_pem, wrong) = {
            let mut s = self.0.lock().unwrap();
            s.ca_requests.push(asked.clone());
            let (c, k) = s.mesh_root.clone().ok_or_else(|| Status::unavailable("no CA root"))?;
            (c, k, s.ca_wrong_identity.clone())
        };
        let csr = rcgen::CertificateSigningRequestParams::from_pem(&req.csr)
            .map_err(|e| Status::invalid_argument(format!("bad CSR: {e}")))?;
        let mut params = csr.params;
        if let Some(other) = wrong {
            params.subject_alt_names = vec![rcgen::SanType::URI(other.try_into().unwrap())];
        }
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + time::Duration::seconds(req.validity_duration.max(1));
        params.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature, rcgen::KeyUsagePurpose::KeyEncipherment];
        let key = rcgen::KeyPair::from_pem(&key_pem).unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_pem(&root_pem, key).unwrap();
        let leaf = params.signed_by(&csr.public_key, &issuer).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(IstioCertificateResponse { cert_chain: vec![leaf.pem(), root_pem] }))
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Fake {
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let meta = |k: &str| req.metadata().get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
        let (auth, cluster) = (meta("authorization"), meta("clusterid"));
        let (tx, rx) = mpsc::channel(1024);
        {
            let mut s = self.0.lock().unwrap();
            s.streams.push((auth, cluster));
            // Like istiod: everything current, per type, on a new stream.
            for t in [ADDRESS_TYPE, AUTHORIZATION_TYPE] {
                let names = s.names_of(t);
                let resp = s.response(t, &names, &[]);
                let _ = tx.try_send(Ok(resp));
            }
            s.senders.push(tx);
        }
        let state = self.0.clone();
        let mut inbound = req.into_inner();
        tokio::spawn(async move {
            while let Ok(Some(r)) = inbound.message().await {
                state.lock().unwrap().requests.push(r);
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

/// A running fake istiod.
pub struct Istiod {
    pub fake: Fake,
    pub addr: SocketAddr,
    /// The root its certificate chains to (`XDS_ROOT_CA`), and the name in it.
    pub root_pem: String,
    pub hostname: &'static str,
    identity: (String, String),
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Istiod {
    /// Starts on 127.0.0.1 (port 0: any).
    pub fn start(port: u16) -> Istiod {
        Istiod::start_at(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    /// Starts on `addr`, in the calling thread's network namespace (as is [`Istiod::restart`]).
    pub fn start_at(addr: SocketAddr) -> Istiod {
        let root_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut root_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        root_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        root_params.distinguished_name.push(rcgen::DnType::CommonName, "fake istiod root");
        let root = root_params.self_signed(&root_key).unwrap();
        let issuer = rcgen::Issuer::new(root_params, root_key);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params = rcgen::CertificateParams::new(vec!["istiod.test".to_string()]).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let identity = (cert.pem(), key.serialize_pem());
        // A separate mesh root for workload certificates (as istiod's CA has).
        let mesh_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut mesh_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        mesh_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        mesh_params.distinguished_name.push(rcgen::DnType::OrganizationName, "cluster.local");
        let mesh_root = mesh_params.self_signed(&mesh_key).unwrap();
        let fake = Fake::default();
        fake.0.lock().unwrap().mesh_root = Some((mesh_root.pem(), mesh_key.serialize_pem()));
        let mut istiod = Istiod {
            fake,
            addr,
            root_pem: root.pem(),
            hostname: "istiod.test",
            identity,
            shutdown: None,
            thread: None,
        };
        istiod.serve();
        istiod
    }

    fn serve(&mut self) {
        let listener = std::net::TcpListener::bind(self.addr).unwrap();
        listener.set_nonblocking(true).unwrap();
        self.addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let fake = self.fake.clone();
        let (cert, key) = self.identity.clone();
        self.thread = Some(std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            // rustls is built with two crypto providers here (ring, aws-lc): tonic's server needs
            // a process default. Err: one is installed already, which serves as well.
            let _ = rustls::crypto::ring::default_provider().install_default();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                let tls =
                    tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(cert, key));
                let _ = tonic::transport::Server::builder()
                    .tls_config(tls)
                    .unwrap()
                    .add_service(AggregatedDiscoveryServiceServer::new(fake.clone()))
                    .add_service(IstioCertificateServiceServer::new(fake))
                    .serve_with_incoming_shutdown(incoming, async {
                        let _ = stop_rx.await;
                    })
                    .await;
            });
            // The runtime's drop ends the streams still open.
        }));
        self.shutdown = Some(stop_tx);
    }

    /// Stops serving (istiod gone): open streams end, connects are refused.
    pub fn stop(&mut self) {
        self.fake.drop_streams();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Serves again on the same port, with the same resources.
    pub fn restart(&mut self) {
        self.stop();
        self.serve();
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }
}

impl Drop for Istiod {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn workload(uid: &str, ip: [u8; 4], hbone: bool) -> pwl::Workload {
    pwl::Workload {
        uid: uid.into(),
        name: uid.into(),
        namespace: "ns".into(),
        addresses: vec![ip.to_vec()],
        service_account: uid.into(),
        tunnel_protocol: if hbone { pwl::TunnelProtocol::Hbone as i32 } else { pwl::TunnelProtocol::None as i32 },
        ..Default::default()
    }
}
