//! TLS for local stand-ins in tests and benchmarks: for a real site, a throw-away CA and a
//! certificate from it for the names the stand-in serves (the proxy reaches such a server
//! through `[network.upstream_override]` and trusts its CA through `extra_ca_bundle`, exactly
//! as it would a mirror); for a guest's client, a configuration that trusts one CA. Nothing in
//! a session uses this.

use std::path::Path;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::CaError;

/// A stand-in's server side.
pub struct StandInTls {
    /// The server configuration (ring's suites, ALPN http/1.1).
    pub config: rustls::ServerConfig,
    /// The stand-in CA's certificate, for clients that trust it directly.
    pub ca_der: CertificateDer<'static>,
}

/// A new CA (its certificate written to `ca_pem` as PEM) and a server configuration with a
/// certificate from it for `names`.
pub fn stand_in_tls(names: &[&str], ca_pem: &Path) -> Result<StandInTls, CaError> {
    let what = names.join(", ");
    let mint = |e| CaError::Mint(what.clone(), e);
    let ca_key = KeyPair::generate().map_err(mint)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(mint)?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "capsem stand-in CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).map_err(mint)?;
    std::fs::write(ca_pem, ca.pem()).map_err(|source| CaError::Io {
        action: "write",
        path: ca_pem.to_path_buf(),
        source,
    })?;
    let key = KeyPair::generate().map_err(mint)?;
    let cert = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        .map_err(mint)?
        .signed_by(&key, &ca, &ca_key)
        .map_err(mint)?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| CaError::Key(what.clone(), e))?
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .map_err(|e| CaError::Key(what.clone(), e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(StandInTls {
        config,
        ca_der: ca.der().clone(),
    })
}

/// A client configuration that trusts only `ca` (ring's suites, ALPN http/1.1): a guest's
/// client trusting the capsem CA, or any client of a stand-in.
pub fn client_trusting(ca: CertificateDer<'static>) -> Result<rustls::ClientConfig, rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca)?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}
