//! Bodies and upgrades through the proxy, without a VM: a relayed connection is a byte stream,
//! the upstream a local HTTPS server reached through `[network.upstream_override]`. Large
//! bodies must arrive intact both ways (the proxy hands hyper's chunks to TLS as they came),
//! and a WebSocket upgrade must end in a two-way byte pipe between guest and upstream.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use capsem_core::net::stand_in::{client_trusting, stand_in_tls};
use capsem_core::net::{Ca, Network, PolicySource};
use capsem_proto::net::NetOpen;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{header, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NAME: &str = "up.example";
/// Bigger than any buffer on the way (hyper's, TLS records, the channel's frames).
const BIG: usize = 3 << 20;

/// Byte `i` of the big body: not periodic over any buffer size, so a chunk lost, repeated or
/// reordered shows.
fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 11)) as u8
}

/// Bodies on both sides of the test (the guest's requests, the upstream's responses).
type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// The stand-in upstream: `GET /big` streams [`BIG`] bytes in uneven chunks, `POST /echo` sends
/// the request body back, `GET /ws` upgrades and then echoes every byte. Returns its port and
/// writes its CA to `dir/upstream-ca.pem`.
async fn upstream(dir: &std::path::Path) -> u16 {
    let tls = stand_in_tls(&[NAME], &dir.join("upstream-ca.pem")).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls.config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(serve);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    port
}

async fn serve(mut req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let full = |b: Bytes| Full::new(b).boxed();
    Ok(match req.uri().path() {
        "/big" => {
            // Uneven chunks, so they never line up with the records or frames on the way.
            let mut chunks = Vec::new();
            let mut at = 0;
            for size in [1usize, 7000, 65_536, 100_003].into_iter().cycle() {
                if at == BIG {
                    break;
                }
                let end = (at + size).min(BIG);
                chunks.push(Ok(Frame::data(Bytes::from(
                    (at..end).map(pattern).collect::<Vec<u8>>(),
                ))));
                at = end;
            }
            Response::new(StreamBody::new(futures::stream::iter(chunks)).boxed())
        }
        "/echo" => {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            Response::new(full(body))
        }
        "/ws" => {
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let mut io = TokioIo::new(upgrade.await.unwrap());
                let mut buf = vec![0u8; 8192];
                loop {
                    let n = io.read(&mut buf).await.unwrap_or(0);
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header(header::CONNECTION, "upgrade")
                .header(header::UPGRADE, "websocket")
                .body(full(Bytes::new()))
                .unwrap()
        }
        _ => Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(full(Bytes::new()))
            .unwrap(),
    })
}

/// A guest connection through a fresh `Network` that allows [`NAME`] and maps it to the
/// stand-in upstream: TLS to the proxy (trusting its CA), then HTTP/1.1 with upgrades.
async fn guest(dir: &std::path::Path) -> hyper::client::conn::http1::SendRequest<Body> {
    let port = upstream(dir).await;
    std::fs::write(
        dir.join("user.toml"),
        format!(
            "[network]\ndefault = \"deny\"\nallow = [\"{NAME}\"]\nextra_ca_bundle = \"{}\"\n\
             [network.upstream_override]\n\"{NAME}\" = \"127.0.0.1:{port}\"\n",
            dir.join("upstream-ca.pem").display()
        ),
    )
    .unwrap();
    let ca = Arc::new(Ca::load_or_create(&dir.join("ca")).unwrap());
    let policy = PolicySource::new(dir.join("user.toml"), dir.join("corp.toml")).unwrap();
    let net = Arc::new(Network::new(ca.clone(), policy, None));
    let (host, mut stream) = tokio::io::duplex(64 * 1024);
    tokio::spawn(net.handle(host));
    let open = NetOpen::Tcp {
        port: 443,
        process: None,
    };
    capsem_proto::frame::write_frame(&mut stream, &open)
        .await
        .unwrap();
    let cfg = client_trusting(ca.cert_der()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from(NAME).unwrap(), stream)
        .await
        .expect("handshake with a minted leaf");
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    sender
}

fn request(method: &str, path: &str, body: Body) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, NAME)
        .body(body)
        .unwrap()
}

/// A large download and a large upload on one keep-alive connection arrive byte for byte.
#[tokio::test]
async fn large_bodies_pass_intact_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = guest(dir.path()).await;
    let expected: Vec<u8> = (0..BIG).map(pattern).collect();

    let resp = s
        .send_request(request("GET", "/big", Full::default().boxed()))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let got = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(got.len(), BIG);
    assert!(got[..] == expected[..], "the download arrived altered");

    // The upload in uneven chunks too, so the proxy's client side writes many slices.
    let chunks: Vec<Result<Frame<Bytes>, Infallible>> = expected
        .chunks(50_001)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    s.ready().await.unwrap();
    let resp = s
        .send_request(request(
            "POST",
            "/echo",
            StreamBody::new(futures::stream::iter(chunks)).boxed(),
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let got = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(got[..] == expected[..], "the upload came back altered");
}

/// A WebSocket upgrade the upstream accepts becomes a byte pipe both ways through the proxy.
#[tokio::test]
async fn a_websocket_upgrade_becomes_a_two_way_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = guest(dir.path()).await;
    let mut req = request("GET", "/ws", Full::default().boxed());
    req.headers_mut()
        .insert(header::CONNECTION, "upgrade".parse().unwrap());
    req.headers_mut()
        .insert(header::UPGRADE, "websocket".parse().unwrap());
    let resp = s.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let mut io = TokioIo::new(hyper::upgrade::on(resp).await.expect("upgraded"));
    for round in 0..3u8 {
        let msg: Vec<u8> = (0..20_000).map(|i| (i as u8) ^ round).collect();
        io.write_all(&msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(std::time::Duration::from_secs(10), io.read_exact(&mut back))
            .await
            .expect("the echo came back in time")
            .unwrap();
        assert_eq!(back, msg, "round {round}");
    }
}
