//! The Istio CA client: `CreateCertificate` with a CSR for each workload identity, behind the
//! certificate manager's `CertSource`. A node proxy asks on behalf of its workloads
//! (`ImpersonatedIdentity`); the answer must carry exactly the requested identity and chain to
//! the root it came with, or it is refused.

use std::cell::RefCell;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use super::xds::client::{XdsClient, tls_endpoint};
use super::xds::error::XdsError;
use super::xds::proto::ca::IstioCertificateRequest;
use super::xds::proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use crate::control::certs::CertSource;
use crate::model::Identity;
use crate::tls::{TlsError, WorkloadCert};

/// Where the CA is and how to talk to it.
#[derive(Debug, Clone)]
pub struct CaOptions {
    /// `https://host:port`.
    pub address: String,
    pub root_ca: Vec<u8>,
    pub alt_hostname: Option<String>,
    pub token_path: Option<PathBuf>,
    pub cluster_id: String,
    /// `CA_HEADER_*`: extra request metadata.
    pub headers: Vec<(String, String)>,
    /// Requested certificate lifetime (`SECRET_TTL`).
    pub ttl: Duration,
}

pub struct IstioCa {
    opts: CaOptions,
    channel: RefCell<Option<tonic::transport::Channel>>,
}

fn ca_err(e: impl std::fmt::Display) -> TlsError {
    TlsError::Ca(e.to_string())
}

impl IstioCa {
    pub fn new(opts: CaOptions) -> IstioCa {
        IstioCa { opts, channel: RefCell::new(None) }
    }

    async fn channel(&self) -> Result<tonic::transport::Channel, XdsError> {
        if let Some(c) = self.channel.borrow().clone() {
            return Ok(c);
        }
        let channel =
            tls_endpoint(&self.opts.address, &self.opts.root_ca, self.opts.alt_hostname.as_deref(), "CA_ADDRESS")?
                .timeout(Duration::from_secs(30))
                .connect()
                .await
                .map_err(|source| XdsError::Connect { address: self.opts.address.clone(), source })?;
        *self.channel.borrow_mut() = Some(channel.clone());
        Ok(channel)
    }

    async fn request(&self, id: &Identity) -> Result<WorkloadCert, TlsError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(ca_err)?;
        let mut params = rcgen::CertificateParams::default();
        // Empty subject: the identity is the URI SAN alone (critical for an empty subject).
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![rcgen::SanType::URI(id.to_string().try_into().map_err(ca_err)?)];
        let csr = params.serialize_request(&key).map_err(ca_err)?.pem().map_err(ca_err)?;
        let metadata = prost_types::Struct {
            fields: [(
                "ImpersonatedIdentity".to_string(),
                prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(id.to_string())) },
            )]
            .into_iter()
            .collect(),
        };
        let body = IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(self.opts.ttl.as_secs()).unwrap_or(i64::MAX),
            metadata: Some(metadata),
        };
        let mut request = tonic::Request::new(body);
        XdsClient::authorize(self.opts.token_path.as_ref(), &self.opts.cluster_id, &self.opts.headers, &mut request)
            .map_err(ca_err)?;
        let channel = self.channel().await.map_err(|e| ca_err(e.describe()))?;
        let response = IstioCertificateServiceClient::new(channel).create_certificate(request).await.map_err(|s| {
            // A broken connection is redialed next time.
            self.channel.borrow_mut().take();
            ca_err(format!("CreateCertificate for {id}: {} {}", s.code(), s.message()))
        })?;
        let pems = response.into_inner().cert_chain;
        let mut ders = Vec::new();
        for pem in &pems {
            let mut reader = pem.as_bytes();
            for cert in rustls_pemfile_certs(&mut reader)? {
                ders.push(cert);
            }
        }
        if ders.len() < 2 {
            return Err(ca_err(format!("CA answered {} certificate(s); need the leaf and a root", ders.len())));
        }
        // Leaf first, root(s) last.
        let root = ders.pop().expect("two or more");
        let chain = ders;
        verify_chain(&chain, &root)?;
        let key = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        // Also refuses a leaf whose identity is not exactly the one asked for.
        WorkloadCert::new(id.clone(), chain, key, vec![root])
    }
}

/// The certificates of a PEM text.
fn rustls_pemfile_certs(reader: &mut &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(reader)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificate(format!("CA answer: {e}")))
}

/// The leaf (with any intermediates) must chain to `root` and be valid now.
fn verify_chain(chain: &[CertificateDer<'static>], root: &CertificateDer<'static>) -> Result<(), TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).map_err(|e| TlsError::BadCertificate(format!("CA root: {e}")))?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), crate::tls::provider())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    verifier
        .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
        .map_err(|e| TlsError::BadCertificate(format!("CA answer does not chain to its root: {e}")))?;
    Ok(())
}

impl CertSource for IstioCa {
    fn issue<'a>(&'a self, id: &'a Identity) -> Pin<Box<dyn Future<Output = Result<WorkloadCert, TlsError>> + 'a>> {
        Box::pin(self.request(id))
    }
}
