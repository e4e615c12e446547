//! The local CA, the embedded default certificate source: a root generated at start (or loaded
//! from PEM files, RSA or ECDSA, so a mesh can share a root with other proxies) that mints
//! ECDSA P-256 workload certificates with one critical SPIFFE URI SAN and an empty subject,
//! the shape Istio's CA issues.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use std::path::Path;

use super::{TlsError, WorkloadCert};
use crate::config::LocalCaConfig;
use crate::model::Identity;

/// How far back a new certificate's validity starts, for peers whose clocks run behind.
const BACKDATE: Duration = Duration::from_secs(60);
/// Lifetime of a generated root.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86_400);

pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    root: CertificateDer<'static>,
    root_pem: String,
    key_pem: String,
    ttl: Duration,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa").field("ttl", &self.ttl).finish()
    }
}

fn ca_err(e: impl std::fmt::Display) -> TlsError {
    TlsError::Ca(e.to_string())
}

fn offset(t: SystemTime) -> Result<time::OffsetDateTime, TlsError> {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).map_err(ca_err)?.as_secs();
    time::OffsetDateTime::from_unix_timestamp(secs as i64).map_err(ca_err)
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    for b in bytes.iter_mut() {
        *b = fastrand::u8(..);
    }
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // no leading zero byte
    SerialNumber::from_slice(&bytes)
}

impl LocalCa {
    /// A fresh root for `trust_domain`; workload certificates live for `ttl`.
    pub fn generate(trust_domain: &str, ttl: Duration) -> Result<LocalCa, TlsError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(ca_err)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, "ztunnel local CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = SystemTime::now();
        params.not_before = offset(now - BACKDATE)?;
        params.not_after = offset(now + ROOT_LIFETIME)?;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(ca_err)?;
        let (root_pem, key_pem) = (cert.pem(), key.serialize_pem());
        Ok(LocalCa { root: cert.der().clone(), root_pem, key_pem, issuer: Issuer::new(params, key), ttl })
    }

    /// A root loaded from PEM (`LOCAL_CA_CERT`, `LOCAL_CA_KEY`).
    pub fn load(cert_pem: &str, key_pem: &str, ttl: Duration) -> Result<LocalCa, TlsError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| ca_err(format!("CA key: {e}")))?;
        let der =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| ca_err(format!("CA certificate: {e}")))?;
        let issuer = Issuer::from_ca_cert_der(&der, key).map_err(|e| ca_err(format!("CA certificate: {e}")))?;
        Ok(LocalCa { issuer, root: der, root_pem: cert_pem.to_string(), key_pem: key_pem.to_string(), ttl })
    }

    /// The CA the configuration asks for: the given root, else the one in `dir` (generated and
    /// written there by the first proxy that needed it). Returns where the root came from.
    pub fn from_config(cfg: &LocalCaConfig, trust_domain: &str, ttl: Duration) -> Result<(LocalCa, String), TlsError> {
        let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| ca_err(format!("reading {}: {e}", p.display())));
        if let (Some(cert), Some(key)) = (&cfg.cert, &cfg.key) {
            let ca = LocalCa::load(&read(cert)?, &read(key)?, ttl)?;
            return Ok((ca, format!("loaded from {}", cert.display())));
        }
        let (cert_path, key_path) = (cfg.dir.join("root-cert.pem"), cfg.dir.join("root-key.pem"));
        for _ in 0..50 {
            if cert_path.exists() && key_path.exists() {
                match LocalCa::load(&read(&cert_path)?, &read(&key_path)?, ttl) {
                    Ok(ca) => return Ok((ca, format!("reused {}", cert_path.display()))),
                    // Another proxy may be half way through writing it.
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
                continue;
            }
            let ca = LocalCa::generate(trust_domain, ttl)?;
            match ca.write(&cfg.dir, &cert_path, &key_path) {
                Ok(()) => return Ok((ca, format!("generated, written to {}", cert_path.display()))),
                // Lost the race to another proxy: load theirs.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(ca_err(format!("writing the root to {}: {e}", cfg.dir.display()))),
            }
        }
        Err(ca_err(format!("{} stays unreadable", cert_path.display())))
    }

    /// Writes the root: the key first, created exclusively and readable by the owner only, so
    /// two proxies starting together agree on one root.
    fn write(&self, dir: &Path, cert_path: &Path, key_path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        let mut key = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(key_path)?;
        key.write_all(self.key_pem.as_bytes())?;
        let tmp = dir.join(format!(".root-cert.{}.tmp", std::process::id()));
        std::fs::write(&tmp, &self.root_pem)?;
        std::fs::rename(&tmp, cert_path)
    }

    /// The root certificate and key, PEM encoded (to write out or share).
    pub fn root_pem(&self) -> (String, String) {
        (self.root_pem.clone(), self.key_pem.clone())
    }

    /// Mints a workload certificate for `identity`, valid from `now` for the CA's TTL.
    pub fn issue(&self, identity: &Identity, now: SystemTime) -> Result<WorkloadCert, TlsError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(ca_err)?;
        let mut params = CertificateParams::default();
        // Empty subject: the identity is the (then critical) URI SAN alone.
        params.distinguished_name = DistinguishedName::new();
        let uri = identity.to_string().try_into().map_err(ca_err)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = offset(now - BACKDATE)?;
        params.not_after = offset(now + self.ttl)?;
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&key, &self.issuer).map_err(ca_err)?;
        let key = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        WorkloadCert::new(identity.clone(), vec![cert.der().clone()], key, vec![self.root.clone()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxies_sharing_a_directory_share_a_root() {
        let dir = std::env::temp_dir().join(format!("ztunnel-ca-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = LocalCaConfig { cert: None, key: None, dir: dir.clone() };
        let (a, how_a) = LocalCa::from_config(&cfg, "cluster.local", Duration::from_secs(60)).unwrap();
        let (b, how_b) = LocalCa::from_config(&cfg, "cluster.local", Duration::from_secs(60)).unwrap();
        assert!(how_a.starts_with("generated") && how_b.starts_with("reused"), "{how_a} / {how_b}");
        assert_eq!(a.root, b.root);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("root-key.pem")).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the key is private");
        let given = LocalCaConfig {
            cert: Some(dir.join("root-cert.pem")),
            key: Some(dir.join("root-key.pem")),
            dir: "/nonexistent".into(),
        };
        let (c, how_c) = LocalCa::from_config(&given, "cluster.local", Duration::from_secs(60)).unwrap();
        assert!(how_c.starts_with("loaded"));
        assert_eq!(c.root, a.root);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
