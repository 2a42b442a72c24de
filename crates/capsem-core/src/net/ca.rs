//! The per-install certificate authority (`ca/ca.key` 0600, `ca/ca.crt`) and the leaf
//! certificates minted from it, one per TLS server name, cached for the life of the process.
//! The key never leaves the host: the guest is only ever given [`Ca::cert_pem`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// File names under `<CAPSEM_HOME>/ca/`.
pub const CA_KEY: &str = "ca.key";
pub const CA_CERT: &str = "ca.crt";
const CA_NAME: &str = "capsem sandbox CA";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the capsem CA in {0} is damaged: delete the directory and run `capsem setup`")]
    Damaged(PathBuf, #[source] rcgen::Error),
    #[error("minting a certificate for {0} failed")]
    Mint(String, #[source] rcgen::Error),
    #[error("the minted key for {0} is unusable: {1}")]
    Key(String, rustls::Error),
}

pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    cert_pem: String,
    /// One key for every leaf: minting is then a signature, not a key generation.
    leaf_key: KeyPair,
    leaves: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

/// The CA's subject: fixed, so that the issuer of every leaf matches the stored certificate.
fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    dn.push(DnType::OrganizationName, "capsem");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

/// Most minted leaves kept per CA (per session's proxy).
const LEAF_CACHE_MAX: usize = 1024;

impl Ca {
    /// Load the CA from `dir`, creating it (0700 directory, 0600 key) if it does not exist.
    pub fn load_or_create(dir: &Path) -> Result<Ca, CaError> {
        let key_path = dir.join(CA_KEY);
        let cert_path = dir.join(CA_CERT);
        let io = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| CaError::Io {
                action,
                path,
                source,
            }
        };
        let missing = || !key_path.exists() || !cert_path.exists();
        // Two first runs at once (setup and a service) must not write one's key beside the
        // other's certificate: creation is serialised, and the second finds the first's.
        let _creating = if missing() {
            crate::paths::private_dir(dir).map_err(io("create", dir))?;
            let lock_path = dir.join(".lock");
            Some(crate::paths::lock(&lock_path).map_err(io("lock", &lock_path))?)
        } else {
            None
        };
        if missing() {
            let key = KeyPair::generate().map_err(|e| CaError::Damaged(dir.into(), e))?;
            let cert = ca_params()
                .self_signed(&key)
                .map_err(|e| CaError::Damaged(dir.into(), e))?;
            crate::paths::write_private(&key_path, key.serialize_pem().as_bytes())
                .map_err(io("write", &key_path))?;
            crate::paths::write_private(&cert_path, cert.pem().as_bytes())
                .map_err(io("write", &cert_path))?;
        }
        let key_pem = std::fs::read_to_string(&key_path).map_err(io("read", &key_path))?;
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(io("read", &cert_path))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Damaged(dir.into(), e))?;
        // The issuer object rcgen signs with: same subject and key as the stored certificate.
        let cert = ca_params()
            .self_signed(&key)
            .map_err(|e| CaError::Damaged(dir.into(), e))?;
        let leaf_key = KeyPair::generate().map_err(|e| CaError::Damaged(dir.into(), e))?;
        Ok(Ca {
            cert,
            key,
            cert_pem,
            leaf_key,
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The CA certificate, PEM: what the guest trusts.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        rustls_pki_types::pem::PemObject::from_pem_slice(self.cert_pem.as_bytes())
            .unwrap_or_else(|_| self.cert.der().clone())
    }

    /// A certificate for `name` (minted on first use), chained to this CA.
    pub fn leaf(&self, name: &str) -> Result<Arc<CertifiedKey>, CaError> {
        let name = name.to_ascii_lowercase();
        let mut cache = self.leaves.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cache.get(&name) {
            return Ok(c.clone());
        }
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name.as_str());
        p.distinguished_name = dn;
        p.subject_alt_names = vec![match name.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                name.clone()
                    .try_into()
                    .map_err(|e| CaError::Mint(name.clone(), e))?,
            ),
        }];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.use_authority_key_identifier_extension = true;
        p.serial_number = Some(SerialNumber::from(rand::random::<[u8; 16]>().to_vec()));
        let cert = p
            .signed_by(&self.leaf_key, &self.cert, &self.key)
            .map_err(|e| CaError::Mint(name.clone(), e))?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.leaf_key.serialize_der()));
        let signer = rustls::crypto::ring::sign::any_supported_type(&key_der)
            .map_err(|e| CaError::Key(name.clone(), e))?;
        let ck = Arc::new(CertifiedKey::new(
            vec![cert.der().clone(), self.cert_der()],
            signer,
        ));
        // The guest picks the names: the cache is bounded (a full one starts over).
        if cache.len() >= LEAF_CACHE_MAX {
            cache.clear();
        }
        cache.insert(name, ck.clone());
        Ok(ck)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn created_private_reloaded_and_leaves_verify_against_it() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let ca = Ca::load_or_create(&ca_dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&ca_dir), 0o700);
        assert_eq!(mode(&ca_dir.join(CA_KEY)), 0o600);
        let pem = ca.cert_pem().to_string();
        assert!(!pem.contains("PRIVATE KEY"));
        // A second load keeps the same CA.
        let again = Ca::load_or_create(&ca_dir).unwrap();
        assert_eq!(again.cert_pem(), pem);

        // A leaf from the reloaded CA verifies against the stored certificate.
        let leaf = again.leaf("Allowed.Example").unwrap();
        assert!(Arc::ptr_eq(&leaf, &again.leaf("allowed.example").unwrap()));
        // Names without end do not grow the cache without end.
        for i in 0..LEAF_CACHE_MAX + 5 {
            again.leaf(&format!("n{i}.example")).unwrap();
        }
        assert!(again.leaves.lock().unwrap().len() <= LEAF_CACHE_MAX);
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let name = rustls_pki_types::ServerName::try_from("allowed.example").unwrap();
        verifier
            .verify_server_cert(
                &leaf.cert[0],
                &leaf.cert[1..],
                &name,
                &[],
                rustls_pki_types::UnixTime::now(),
            )
            .unwrap();
        let other = rustls_pki_types::ServerName::try_from("other.example").unwrap();
        assert!(verifier
            .verify_server_cert(
                &leaf.cert[0],
                &leaf.cert[1..],
                &other,
                &[],
                rustls_pki_types::UnixTime::now()
            )
            .is_err());
    }
}
