//! The proxy's TLS towards the guest, without a VM: a relayed connection is a byte stream.

use std::sync::Arc;

use capsem_core::net::{Ca, Network, PolicySource};
use capsem_proto::net::NetOpen;
use rustls::pki_types::ServerName;

/// A handshake the proxy cannot complete (here: no server name, so no leaf to mint) ends with
/// the TLS alert that says so, not with the connection just closing: the proxy buffers its
/// writes to the guest, and the alert must still leave.
#[tokio::test]
async fn a_failed_guest_handshake_still_gets_its_alert() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("user.toml"),
        "[network]\ndefault = \"deny\"\n",
    )
    .unwrap();
    let ca = Arc::new(Ca::load_or_create(&dir.path().join("ca")).unwrap());
    let policy =
        PolicySource::new(dir.path().join("user.toml"), dir.path().join("corp.toml")).unwrap();
    let net = Arc::new(Network::new(ca.clone(), policy, None));
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
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
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
