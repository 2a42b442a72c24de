//! Local stand-ins for real sites in tests and benchmarks: a throw-away CA and a certificate
//! from it for the names the stand-in serves (the proxy reaches such a server through
//! `[network.upstream_override]` and trusts its CA through `extra_ca_bundle`, exactly as it
//! would a mirror), the server loop that serves HTTP on them, and for a guest's client a
//! configuration that trusts one CA. Nothing in a session uses this.

use std::path::Path;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why a stand-in's TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum StandInError {
    #[error("cannot make the stand-in's certificates")]
    Certificate(#[from] rcgen::Error),
    #[error("cannot write the stand-in CA to {}", .0.display())]
    Write(std::path::PathBuf, #[source] std::io::Error),
    #[error("the stand-in's TLS configuration was refused")]
    Tls(#[from] rustls::Error),
}

/// A stand-in's server side.
pub struct StandInTls {
    /// The server configuration (ring's suites, ALPN http/1.1).
    pub config: rustls::ServerConfig,
    /// The stand-in CA's certificate, for clients that trust it directly.
    pub ca_der: CertificateDer<'static>,
}

/// A new CA (its certificate written to `ca_pem` as PEM) and a server configuration with a
/// certificate from it for `names`.
pub fn stand_in_tls(names: &[&str], ca_pem: &Path) -> Result<StandInTls, StandInError> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "capsem stand-in CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key)?;
    std::fs::write(ca_pem, ca.pem()).map_err(|e| StandInError::Write(ca_pem.to_path_buf(), e))?;
    let key = KeyPair::generate()?;
    let cert = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?
        .signed_by(&key, &ca, &ca_key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(StandInTls {
        config,
        ca_der: ca.der().clone(),
    })
}

/// A `user.toml` under which a session may reach `name` and nothing else, served by the stand-in
/// listening on 127.0.0.1:`port` whose CA certificate is at `ca_pem`.
pub fn policy_for(name: &str, port: u16, ca_pem: &Path) -> String {
    format!(
        "[network]\ndefault = \"deny\"\nallow = [\"{name}\"]\nextra_ca_bundle = \"{}\"\n\
         [network.upstream_override]\n\"{name}\" = \"127.0.0.1:{port}\"\n",
        ca_pem.display()
    )
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

/// Serve HTTP/1.1 (upgrades allowed) with `svc` on every connection `listener` accepts, over
/// TLS when `tls` is given; runs until it is dropped. A failed handshake ends only its own
/// connection.
pub async fn serve<S, B>(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    svc: S,
) where
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<B>,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use tokio_util::either::Either;
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // Out of descriptors, say: wait rather than spin, and try again.
                tracing::debug!(error = %e, "stand-in accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, svc) = (acceptor.clone(), svc.clone());
        tokio::spawn(async move {
            let io = match acceptor {
                Some(a) => match a.accept(tcp).await {
                    Ok(tls) => Either::Left(tls),
                    Err(_) => return,
                },
                None => Either::Right(tcp),
            };
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
                .with_upgrades()
                .await;
        });
    }
}
