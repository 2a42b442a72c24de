//! The proxy's TLS towards the guest, without a VM: a relayed connection is a byte stream.

use std::sync::Arc;

use capsem_core::net::{Ca, Network, PolicySource};
use capsem_proto::net::NetOpen;
use rustls::pki_types::ServerName;

/// A network in `dir` (default deny), serving one relayed connection to port 443; returns the
/// guest's end, with the `NetOpen` frame sent, and a client configuration that trusts the CA
/// (ring's suites in ring's order: AES-GCM first, as OpenSSL's).
async fn relayed(
    dir: &std::path::Path,
    guest_aes: bool,
) -> (tokio::io::DuplexStream, rustls::ClientConfig) {
    relayed_with(
        dir,
        guest_aes,
        rustls::crypto::ring::default_provider(),
        rustls::DEFAULT_VERSIONS,
    )
    .await
}

/// [`relayed`] with the client's suites and versions given.
async fn relayed_with(
    dir: &std::path::Path,
    guest_aes: bool,
    client: rustls::crypto::CryptoProvider,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> (tokio::io::DuplexStream, rustls::ClientConfig) {
    std::fs::write(dir.join("user.toml"), "[network]\ndefault = \"deny\"\n").unwrap();
    let ca = Arc::new(Ca::load_or_create(&dir.join("ca")).unwrap());
    let policy = PolicySource::new(dir.join("user.toml"), dir.join("corp.toml")).unwrap();
    let net = Arc::new(Network::new(ca.clone(), policy, None).guest_has_aes(guest_aes));
    let (host, mut guest) = tokio::io::duplex(64 * 1024);
    tokio::spawn(net.handle(host));
    capsem_proto::frame::write_frame(
        &mut guest,
        &NetOpen::Tcp {
            port: 443,
            process: None,
        },
    )
    .await
    .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(client))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (guest, cfg)
}

/// A handshake the proxy cannot complete (here: no server name, so no leaf to mint) ends with
/// the TLS alert that says so, not with the connection just closing: the alert must leave
/// before the proxy drops the stream.
#[tokio::test]
async fn a_failed_guest_handshake_still_gets_its_alert() {
    let dir = tempfile::tempdir().unwrap();
    let (guest, cfg) = relayed(dir.path(), true).await;
    // An address as the server name: the client sends no SNI.
    let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let err = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, guest)
        .await
        .map(|_| ())
        .expect_err("no certificate can be minted without a server name");
    assert!(
        err.to_string().contains("alert"),
        "the client learnt why from an alert: {err}"
    );
}

/// A guest without AES instructions (TCG) gets ChaCha20-Poly1305 although its client lists
/// AES-GCM first, over TLS 1.3 and 1.2; a guest with them gets the client's first choice; a
/// client that offers no ChaCha20 still gets AES-GCM.
#[tokio::test]
async fn a_guest_without_aes_gets_chacha20() {
    use rustls::CipherSuite as S;
    let ring = rustls::crypto::ring::default_provider;
    let aes_only = || {
        let mut p = ring();
        p.cipher_suites
            .retain(|s| !format!("{:?}", s.suite()).contains("CHACHA"));
        p
    };
    let (v13, v12): (&[_], &[_]) = (&[&rustls::version::TLS13], &[&rustls::version::TLS12]);
    for (guest_aes, client, versions, expected) in [
        (false, ring(), v13, S::TLS13_CHACHA20_POLY1305_SHA256),
        (
            false,
            ring(),
            v12,
            S::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        ),
        (false, aes_only(), v13, S::TLS13_AES_256_GCM_SHA384),
        (true, ring(), v13, S::TLS13_AES_256_GCM_SHA384),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (guest, cfg) = relayed_with(dir.path(), guest_aes, client, versions).await;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::try_from("a.example").unwrap(), guest)
            .await
            .expect("handshake with a minted leaf");
        let suite = tls.get_ref().1.negotiated_cipher_suite().unwrap().suite();
        assert_eq!(suite, expected, "guest_has_aes({guest_aes}), {versions:?}");
    }
}
