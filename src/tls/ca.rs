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

/// The local CA's directory and files must be this process's user's, and the directory and the
/// key closed to everyone else: in a shared temporary directory another local user could
/// otherwise create the directory first and plant a trust root (and its key) of their own.
fn check_private(path: &Path) -> Result<(), TlsError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path).map_err(|e| ca_err(format!("{}: {e}", path.display())))?;
    let me = crate::sys::effective_uid();
    let refuse = |why: String| {
        ca_err(format!(
            "refusing the local CA at {}: {why}; remove it, or set ZTUNNEL_LOCAL_CA_DIR to a directory only this user can write",
            path.display()
        ))
    };
    if meta.file_type().is_symlink() {
        return Err(refuse("it is a symbolic link".into()));
    }
    if meta.uid() != me {
        return Err(refuse(format!("it is owned by uid {}, not by this process's uid {me}", meta.uid())));
    }
    // The certificate may be world-readable (it is public); nothing may be writable by others,
    // and the directory and the key must not even be readable by them.
    let forbidden =
        if meta.is_file() && path.file_name().is_some_and(|n| n == "root-cert.pem") { 0o022 } else { 0o077 };
    if meta.mode() & forbidden != 0 {
        return Err(refuse(format!("its mode is {:o}: open to other users", meta.mode() & 0o777)));
    }
    Ok(())
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
                for path in [&cfg.dir, &key_path, &cert_path] {
                    check_private(path)?;
                }
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
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => return Err(ca_err(e)),
                Err(e) => return Err(ca_err(format!("writing the root to {}: {e}", cfg.dir.display()))),
            }
        }
        Err(ca_err(format!("{} stays unreadable", cert_path.display())))
    }

    /// Writes the root: the key first, created exclusively and readable by the owner only, so
    /// two proxies starting together agree on one root. The directory is ours and private, or
    /// nothing is written.
    fn write(&self, dir: &Path, cert_path: &Path, key_path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        check_private(dir).map_err(|e| std::io::Error::new(std::io::ErrorKind::PermissionDenied, e.to_string()))?;
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

    #[test]
    fn a_directory_open_to_others_or_not_ours_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("ztunnel-ca-open-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = LocalCaConfig { cert: None, key: None, dir: dir.clone() };
        // Planted before us, open to everyone: nothing is written into it, nothing read from it.
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = LocalCa::from_config(&cfg, "cluster.local", Duration::from_secs(60)).unwrap_err().to_string();
        assert!(e.contains("mode is 777") && e.contains("ZTUNNEL_LOCAL_CA_DIR"), "{e}");
        assert!(!dir.join("root-key.pem").exists());
        // A root already there whose key others can read is not used either.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        LocalCa::from_config(&cfg, "cluster.local", Duration::from_secs(60)).unwrap();
        std::fs::set_permissions(dir.join("root-key.pem"), std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = LocalCa::from_config(&cfg, "cluster.local", Duration::from_secs(60)).unwrap_err().to_string();
        assert!(e.contains("root-key.pem") && e.contains("644"), "{e}");
        // Owned by someone else (only root can make that here).
        if crate::sys::effective_uid() == 0 {
            std::fs::set_permissions(dir.join("root-key.pem"), std::fs::Permissions::from_mode(0o600)).unwrap();
            std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
            let e = LocalCa::from_config(&cfg, "cluster.local", Duration::from_secs(60)).unwrap_err().to_string();
            assert!(e.contains("owned by uid 65534"), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
