//! TLS for HBONE: per-identity certificate material whose rustls configs are built once (not per
//! connection), SPIFFE verification, and the local CA.
//!
//! Built on the control thread and shared read-only (`Arc`) with the workers. Only TLS 1.3 with
//! AES-256-GCM or AES-128-GCM is offered; ALPN is `h2`; both sides present certificates.
//!
//! Identity checks: a server's chain must lead to our roots, and after the handshake the HBONE
//! client compares its leaf's SPIFFE identity with the identities it expected
//! ([`check_server_identity`]); a client's chain must lead to the same roots and its identity
//! must be in our trust domain, and is then the source identity ([`peer_identity`]).

pub mod ca;
mod record;
pub mod stream;
mod verify;

use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::model::Identity;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate is not valid X.509: {0}")]
    BadCertificate(String),
    #[error("certificate carries no SPIFFE identity (URI SAN spiffe://...)")]
    NoIdentity,
    #[error("certificate is for {found}, expected {expected}")]
    WrongIdentity { found: String, expected: String },
    #[error("empty certificate chain")]
    EmptyChain,
    #[error("no trust roots")]
    NoRoots,
    #[error("building the TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("building the client certificate verifier: {0}")]
    Verifier(String),
    #[error("local CA: {0}")]
    Ca(String),
}

/// The crypto rustls may use: TLS 1.3 AES-GCM suites only, aws-lc's implementations (its AES-GCM
/// uses AVX-512 where the CPU has it; measured cheaper per byte than ring's here).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut p = rustls::crypto::aws_lc_rs::default_provider();
            p.cipher_suites = vec![
                rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
                rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
            ];
            Arc::new(p)
        })
        .clone()
}

/// Makes aws-lc's full provider the process default. rustls is built with both ring (through
/// tonic) and aws-lc, so it cannot pick a default itself, and anything that asks for one
/// (tonic's TLS for istiod and the CA) would fail. Our own configs name their provider.
pub fn install_process_provider() {
    // Err: already installed (a second start in one process, or an embedding program's choice).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Makes aws-lc seed its random generator (the process's, and this thread's) now. Built as this
/// repository builds it (`.cargo/config.toml`), aws-lc seeds from the kernel: microseconds. A
/// build without that setting gathers CPU-jitter entropy at the first use in a process, 30 to
/// 55 ms of one core (measured here), and left to the first TLS handshake that would stall the
/// worker making it with all its connections. Called at start and by each worker before it
/// serves.
pub(crate) fn seed_random() {
    let mut bytes = [0u8; 16];
    if let Err(e) = aws_lc_rs::rand::fill(&mut bytes) {
        tracing::warn!(error = %e, "seeding the random generator at start failed; the first handshake will");
    }
}

/// Validity and serial of a certificate, for `config_dump`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// The certificate of one workload identity, with its rustls configs.
pub struct WorkloadCert {
    pub identity: Identity,
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    pub roots: Vec<CertificateDer<'static>>,
    pub info: CertInfo,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

impl std::fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCert").field("identity", &self.identity).field("info", &self.info).finish()
    }
}

impl WorkloadCert {
    /// Checks that the leaf carries exactly `identity` and builds both configs.
    pub fn new(
        identity: Identity,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<WorkloadCert, TlsError> {
        let leaf = chain.first().ok_or(TlsError::EmptyChain)?;
        let ids = spiffe_ids(leaf)?;
        if ids.len() != 1 || ids[0] != identity {
            return Err(TlsError::WrongIdentity {
                found: ids.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
                expected: identity.to_string(),
            });
        }
        let info = cert_info(leaf)?;
        if roots.is_empty() {
            return Err(TlsError::NoRoots);
        }
        let mut store = RootCertStore::empty();
        for r in &roots {
            store.add(r.clone()).map_err(|e| TlsError::BadCertificate(format!("root: {e}")))?;
        }
        let store = Arc::new(store);
        let provider = provider();

        let client_verifier =
            verify::SpiffeClientVerifier::new(store.clone(), provider.clone(), &identity.trust_domain)?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(client_verifier))
            .with_single_cert(chain.clone(), key.clone_key())?;
        server.alpn_protocols = vec![b"h2".to_vec()];
        // No resumption (as Istio): a resumed session would skip our SPIFFE verifiers.
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        // Our stream protects records itself once the handshake is done (`stream`).
        server.enable_secret_extraction = true;

        let server_verifier = verify::SpiffeServerVerifier::new(store, provider.clone());
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(server_verifier))
            .with_client_auth_cert(chain.clone(), key)?;
        client.alpn_protocols = vec![b"h2".to_vec()];
        // HBONE peers are addressed by IP; there is no name to send.
        client.enable_sni = false;
        client.resumption = rustls::client::Resumption::disabled();
        client.enable_secret_extraction = true;

        Ok(WorkloadCert { identity, chain, roots, info, server: Arc::new(server), client: Arc::new(client) })
    }

    /// The server config presenting this identity (inbound HBONE for this workload).
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// The client config presenting this identity (outbound HBONE from this workload).
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.client.clone()
    }
}

/// The SPIFFE identities in a certificate's URI SANs.
pub fn spiffe_ids(der: &CertificateDer<'_>) -> Result<Vec<Identity>, TlsError> {
    Ok(uri_sans(der)?.iter().filter(|u| u.starts_with("spiffe://")).filter_map(|u| u.parse().ok()).collect())
}

fn uri_sans(der: &CertificateDer<'_>) -> Result<Vec<String>, TlsError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    let san = cert.subject_alternative_name().map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(uri) => Some(uri.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The one identity of a peer's leaf: exactly one URI SAN, a SPIFFE id. A leaf naming two
/// identities is refused rather than read as the first of them.
pub fn sole_identity(der: &CertificateDer<'_>) -> Result<Identity, TlsError> {
    let uris = uri_sans(der)?;
    match uris.as_slice() {
        [one] => one.parse().map_err(|_| TlsError::BadCertificate(format!("URI SAN {one:?} is not a SPIFFE identity"))),
        [] => Err(TlsError::BadCertificate("no URI SAN (a SPIFFE identity is required)".into())),
        many => {
            Err(TlsError::BadCertificate(format!("{} URI SANs; exactly one SPIFFE identity is allowed", many.len())))
        }
    }
}

/// Serial number and validity of a certificate.
pub fn cert_info(der: &CertificateDer<'_>) -> Result<CertInfo, TlsError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    let to_system = |t: ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs as u64)
        } else {
            SystemTime::UNIX_EPOCH
        }
    };
    Ok(CertInfo {
        // Decimal, as Istio's ztunnel and istioctl show it.
        serial: cert.tbs_certificate.serial.to_string(),
        not_before: to_system(cert.validity().not_before),
        not_after: to_system(cert.validity().not_after),
    })
}

/// The peer's identity: the first SPIFFE URI SAN of its leaf certificate.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<Identity> {
    sole_identity(certs?.first()?).ok()
}

/// After an HBONE client handshake: the server must be one of the identities we expected.
pub fn check_server_identity(
    certs: Option<&[CertificateDer<'_>]>,
    expected: &[Identity],
) -> Result<Identity, TlsError> {
    let leaf = certs.and_then(|c| c.first()).ok_or(TlsError::EmptyChain)?;
    let id = sole_identity(leaf)?;
    if expected.contains(&id) {
        return Ok(id);
    }
    Err(TlsError::WrongIdentity {
        found: id.to_string(),
        expected: expected.iter().map(ToString::to_string).collect::<Vec<_>>().join(" or "),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rustls::pki_types::ServerName;
    use rustls::{ClientConnection, ServerConnection};

    use super::ca::LocalCa;
    use super::*;

    fn id(td: &str, sa: &str) -> Identity {
        format!("spiffe://{td}/ns/ns/sa/{sa}").parse().unwrap()
    }

    /// Runs a handshake in memory, both ways, until neither side is handshaking.
    fn handshake(client: &mut ClientConnection, server: &mut ServerConnection) -> Result<(), rustls::Error> {
        for _ in 0..20 {
            let mut buf = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() {
                server.read_tls(&mut buf.as_slice()).unwrap();
                server.process_new_packets()?;
            }
            let mut buf = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() {
                client.read_tls(&mut buf.as_slice()).unwrap();
                client.process_new_packets()?;
            }
            if !client.is_handshaking() && !server.is_handshaking() {
                return Ok(());
            }
        }
        panic!("handshake did not finish");
    }

    fn connect(
        client: &WorkloadCert,
        server: &WorkloadCert,
    ) -> Result<(ClientConnection, ServerConnection), rustls::Error> {
        let mut c = ClientConnection::new(
            client.client_config(),
            ServerName::IpAddress("10.0.0.1".parse::<std::net::IpAddr>().unwrap().into()),
        )?;
        let mut s = ServerConnection::new(server.server_config())?;
        handshake(&mut c, &mut s)?;
        Ok((c, s))
    }

    #[test]
    fn mutual_tls_exposes_both_identities() {
        let ca = LocalCa::generate("cluster.local", Duration::from_secs(3600)).unwrap();
        let sleep = ca.issue(&id("cluster.local", "sleep"), SystemTime::now()).unwrap();
        let httpbin = ca.issue(&id("cluster.local", "httpbin"), SystemTime::now()).unwrap();
        let (c, s) = connect(&sleep, &httpbin).unwrap();
        assert_eq!(c.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
        assert_eq!(c.alpn_protocol(), Some(&b"h2"[..]));
        let suite = c.negotiated_cipher_suite().unwrap().suite();
        assert!(matches!(
            suite,
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 | rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        ));
        assert_eq!(peer_identity(s.peer_certificates()), Some(sleep.identity.clone()), "server sees the client");
        let expected = [httpbin.identity.clone()];
        assert_eq!(check_server_identity(c.peer_certificates(), &expected).unwrap(), httpbin.identity);
        let wrong = [id("cluster.local", "other")];
        assert!(matches!(check_server_identity(c.peer_certificates(), &wrong), Err(TlsError::WrongIdentity { .. })));
    }

    /// A leaf signed by `ca` naming every URI in `uris`, as a client config (the server is
    /// verified as usual).
    fn client_naming(ca: &LocalCa, uris: &[&str]) -> Arc<ClientConfig> {
        let (root_pem, key_pem) = ca.root_pem();
        let issuer = rcgen::Issuer::from_ca_cert_pem(&root_pem, rcgen::KeyPair::from_pem(&key_pem).unwrap()).unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names =
            uris.iter().map(|u| rcgen::SanType::URI(u.to_string().try_into().unwrap())).collect();
        if uris.is_empty() {
            params.subject_alt_names.push(rcgen::SanType::DnsName("sleep.ns.svc".try_into().unwrap()));
        }
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let leaf = params.signed_by(&key, &issuer).unwrap();
        let mut store = RootCertStore::empty();
        use rustls::pki_types::pem::PemObject;
        store.add(CertificateDer::from_pem_slice(root_pem.as_bytes()).unwrap()).unwrap();
        let verifier = verify::SpiffeServerVerifier::new(Arc::new(store), provider());
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(vec![leaf.der().clone()], PrivateKeyDer::Pkcs8(key.serialize_der().into()))
            .unwrap();
        Arc::new(config)
    }

    #[test]
    fn a_leaf_naming_two_identities_or_none_is_refused() {
        let ca = LocalCa::generate("cluster.local", Duration::from_secs(3600)).unwrap();
        let server = ca.issue(&id("cluster.local", "httpbin"), SystemTime::now()).unwrap();
        let attempt = |uris: &[&str]| {
            let name = ServerName::IpAddress("10.0.0.1".parse::<std::net::IpAddr>().unwrap().into());
            let mut c = ClientConnection::new(client_naming(&ca, uris), name).unwrap();
            let mut s = ServerConnection::new(server.server_config()).unwrap();
            handshake(&mut c, &mut s).map(|_| peer_identity(s.peer_certificates()))
        };
        let one = attempt(&["spiffe://cluster.local/ns/ns/sa/sleep"]).unwrap();
        assert_eq!(one, Some(id("cluster.local", "sleep")), "one identity: accepted");
        let two = attempt(&["spiffe://cluster.local/ns/ns/sa/sleep", "spiffe://cluster.local/ns/ns/sa/admin"]);
        assert!(two.is_err(), "two URI SANs: refused, not read as the first");
        let other_uri = attempt(&["spiffe://cluster.local/ns/ns/sa/sleep", "https://example.com/"]);
        assert!(other_uri.is_err(), "a second URI of any kind: refused");
        assert!(attempt(&["https://example.com/"]).is_err(), "no SPIFFE identity: refused");
        assert!(attempt(&[]).is_err(), "no URI SAN at all (a DNS name only): refused");
        // A client that speaks only HTTP/1.1 gets no HBONE.
        let mut h1 = (*client_naming(&ca, &["spiffe://cluster.local/ns/ns/sa/sleep"])).clone();
        h1.alpn_protocols = vec![b"http/1.1".to_vec()];
        let name = ServerName::IpAddress("10.0.0.1".parse::<std::net::IpAddr>().unwrap().into());
        let mut c = ClientConnection::new(Arc::new(h1), name).unwrap();
        let mut s = ServerConnection::new(server.server_config()).unwrap();
        assert!(handshake(&mut c, &mut s).is_err(), "ALPN http/1.1 only: refused");
    }

    #[test]
    fn resumption_is_off_on_both_sides() {
        let ca = LocalCa::generate("cluster.local", Duration::from_secs(3600)).unwrap();
        let cert = ca.issue(&id("cluster.local", "sleep"), SystemTime::now()).unwrap();
        assert_eq!(cert.server_config().send_tls13_tickets, 0);
        assert!(!cert.server_config().session_storage.can_cache());
        let (_c, s) = connect(&cert, &cert).unwrap();
        assert_eq!(s.received_resumption_data(), None);
        // A second handshake with the same client config is a full one (it presents and checks
        // certificates again).
        let (c2, s2) = connect(&cert, &cert).unwrap();
        assert!(c2.peer_certificates().is_some() && s2.peer_certificates().is_some());
        assert_eq!(c2.handshake_kind(), Some(rustls::HandshakeKind::Full));
    }

    #[test]
    fn foreign_roots_and_trust_domains_are_refused() {
        let ca = LocalCa::generate("cluster.local", Duration::from_secs(3600)).unwrap();
        let other_ca = LocalCa::generate("cluster.local", Duration::from_secs(3600)).unwrap();
        let server = ca.issue(&id("cluster.local", "httpbin"), SystemTime::now()).unwrap();
        // A client whose certificate chains to another root: the server refuses it.
        let stranger = other_ca.issue(&id("cluster.local", "sleep"), SystemTime::now()).unwrap();
        assert!(connect(&stranger, &server).is_err());
        // Same root, other trust domain: refused by the server.
        let foreign = ca.issue(&id("evil.example", "sleep"), SystemTime::now()).unwrap();
        let err = connect(&foreign, &server).unwrap_err().to_string();
        assert!(err.contains("trust domain"), "{err}");
        // A client trusting only the other root refuses our server.
        let client = other_ca.issue(&id("cluster.local", "sleep"), SystemTime::now()).unwrap();
        assert!(connect(&client, &server).is_err());
    }

    #[test]
    fn missing_client_certificate_tls12_and_expiry_are_refused() {
        let ca = LocalCa::generate("cluster.local", Duration::from_secs(3600)).unwrap();
        let server = ca.issue(&id("cluster.local", "httpbin"), SystemTime::now()).unwrap();
        let roots = |cert: &WorkloadCert| {
            let mut store = RootCertStore::empty();
            store.add(cert.roots[0].clone()).unwrap();
            Arc::new(store)
        };
        let ip = || ServerName::IpAddress("10.0.0.1".parse::<std::net::IpAddr>().unwrap().into());
        // A client without a certificate.
        let anonymous = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verify::SpiffeServerVerifier::new(roots(&server), provider())))
            .with_no_client_auth();
        let mut c = ClientConnection::new(Arc::new(anonymous), ip()).unwrap();
        let mut s = ServerConnection::new(server.server_config()).unwrap();
        assert!(handshake(&mut c, &mut s).is_err(), "client certificate required");
        // A client offering only TLS 1.2 (refused at version negotiation, before client auth).
        let mut p12 = rustls::crypto::ring::default_provider();
        p12.cipher_suites = vec![rustls::crypto::ring::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256];
        let old = ClientConfig::builder_with_provider(Arc::new(p12))
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verify::SpiffeServerVerifier::new(roots(&server), provider())))
            .with_no_client_auth();
        let mut c = ClientConnection::new(Arc::new(old), ip()).unwrap();
        let mut s = ServerConnection::new(server.server_config()).unwrap();
        assert!(handshake(&mut c, &mut s).is_err(), "TLS 1.2 is refused");
        // An expired client certificate (issued two hours ago for one hour).
        let short = LocalCa::load(&ca.root_pem().0, &ca.root_pem().1, Duration::from_secs(3600)).unwrap();
        let expired =
            short.issue(&id("cluster.local", "sleep"), SystemTime::now() - Duration::from_secs(7200)).unwrap();
        assert!(connect(&expired, &server).is_err(), "expired client certificate refused");
        assert!(connect(&server, &expired).is_err(), "expired server certificate refused");
    }

    #[test]
    fn issued_certificates_have_the_expected_shape() {
        use x509_parser::prelude::*;
        let ttl = Duration::from_secs(7200);
        let ca = LocalCa::generate("cluster.local", ttl).unwrap();
        let now = SystemTime::now();
        let cert = ca.issue(&id("cluster.local", "sleep"), now).unwrap();
        let (_, x) = X509Certificate::from_der(&cert.chain[0]).unwrap();
        assert!(x.subject().iter_attributes().next().is_none(), "empty subject");
        let san = x.subject_alternative_name().unwrap().unwrap();
        assert!(san.critical, "the URI SAN is critical");
        assert_eq!(san.value.general_names.len(), 1);
        assert!(matches!(x.public_key().parsed().unwrap(), x509_parser::public_key::PublicKey::EC(_)));
        let lifetime = cert.info.not_after.duration_since(now).unwrap();
        assert!(lifetime <= ttl && lifetime > ttl - Duration::from_secs(120), "{lifetime:?}");
        assert_eq!(cert.roots.len(), 1);
        // The identity check rejects material for another identity.
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(rcgen::KeyPair::generate().unwrap().serialize_der().into());
        let err =
            WorkloadCert::new(id("cluster.local", "other"), cert.chain.clone(), key, cert.roots.clone()).unwrap_err();
        assert!(matches!(err, TlsError::WrongIdentity { .. }));
    }

    #[test]
    fn a_loaded_root_issues_like_a_generated_one() {
        let ca = LocalCa::generate("cluster.local", Duration::from_secs(3600)).unwrap();
        let (cert_pem, key_pem) = ca.root_pem();
        let loaded = LocalCa::load(&cert_pem, &key_pem, Duration::from_secs(3600)).unwrap();
        let a = loaded.issue(&id("cluster.local", "a"), SystemTime::now()).unwrap();
        let b = ca.issue(&id("cluster.local", "b"), SystemTime::now()).unwrap();
        assert!(connect(&a, &b).is_ok(), "both chain to the same root");
        assert!(LocalCa::load("not pem", &key_pem, Duration::from_secs(1)).is_err());
    }
}
