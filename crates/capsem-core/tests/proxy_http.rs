//! Bodies and upgrades through the proxy, without a VM: a relayed connection is a byte stream,
//! the upstream a local HTTPS server reached through `[network.upstream_override]`. Large
//! bodies must arrive intact both ways (the proxy hands hyper's chunks to TLS as they came),
//! and a WebSocket upgrade must end in a two-way byte pipe between guest and upstream.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use capsem_core::net::stand_in::{client_trusting, policy_for, serve, stand_in_tls};
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

/// Byte `i` of the big body: a hash of the position (splitmix64's mixer), so a chunk lost,
/// repeated or moved anywhere shows.
fn pattern(i: usize) -> u8 {
    let mut x = (i as u64) ^ 0x9e37_79b9_7f4a_7c15;
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (x ^ (x >> 31)) as u8
}

/// A test's whole run may take this long: a proxy that hangs fails the test instead of CI.
const LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Bodies on both sides of the test (the guest's requests, the upstream's responses).
type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// The stand-in upstream: `GET /big` streams [`BIG`] bytes in uneven chunks, `POST /echo` sends
/// the request body back, `GET /ws` upgrades and then echoes every byte. Over TLS (its CA
/// written to `dir/upstream-ca.pem`) for the guest's HTTPS, plain for its HTTP. Returns its port.
async fn upstream(dir: &std::path::Path, https: bool) -> u16 {
    let tls = stand_in_tls(&[NAME], &dir.join("upstream-ca.pem")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(serve(
        listener,
        https.then(|| Arc::new(tls.config)),
        hyper::service::service_fn(respond),
    ));
    port
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

async fn respond(mut req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
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

/// A guest connection to `port` (443 or 80) through a fresh `Network` that allows [`NAME`] and
/// maps it to the stand-in upstream: on 443 TLS to the proxy (trusting its CA), then HTTP/1.1
/// with upgrades.
async fn guest(dir: &std::path::Path, port: u16) -> hyper::client::conn::http1::SendRequest<Body> {
    let up = upstream(dir, port == 443).await;
    std::fs::write(
        dir.join("user.toml"),
        policy_for(NAME, up, &dir.join("upstream-ca.pem")),
    )
    .unwrap();
    let ca = Arc::new(Ca::load_or_create(&dir.join("ca")).unwrap());
    let policy = PolicySource::new(dir.join("user.toml"), dir.join("corp.toml")).unwrap();
    let net = Arc::new(Network::new(ca.clone(), policy, None));
    let (host, mut stream) = tokio::io::duplex(64 * 1024);
    tokio::spawn(net.handle(host));
    let open = NetOpen::Tcp {
        port,
        process: None,
    };
    capsem_proto::frame::write_frame(&mut stream, &open)
        .await
        .unwrap();
    let io: Box<dyn Io> = if port == 443 {
        let cfg = client_trusting(ca.cert_der()).unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::try_from(NAME).unwrap(), stream)
            .await
            .expect("handshake with a minted leaf");
        Box::new(tls)
    } else {
        Box::new(stream)
    };
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
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

/// A large download and a large upload on one keep-alive connection arrive byte for byte, over
/// HTTPS and over plain HTTP.
#[tokio::test]
async fn large_bodies_pass_intact_both_ways() {
    for port in [443, 80] {
        tokio::time::timeout(LIMIT, large_bodies(port))
            .await
            .unwrap_or_else(|_| panic!("the transfers on port {port} finished in time"));
    }
}

async fn large_bodies(port: u16) {
    let dir = tempfile::tempdir().unwrap();
    let mut s = guest(dir.path(), port).await;
    let expected: Vec<u8> = (0..BIG).map(pattern).collect();

    let resp = s
        .send_request(request("GET", "/big", Full::default().boxed()))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let got = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(got.len(), BIG);
    assert!(
        got[..] == expected[..],
        "the download on port {port} arrived altered"
    );

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
    assert!(
        got[..] == expected[..],
        "the upload on port {port} came back altered"
    );
}

/// A WebSocket upgrade the upstream accepts becomes a byte pipe both ways through the proxy,
/// over HTTPS and over plain HTTP.
#[tokio::test]
async fn a_websocket_upgrade_becomes_a_two_way_pipe() {
    for port in [443, 80] {
        tokio::time::timeout(LIMIT, websocket(port))
            .await
            .unwrap_or_else(|_| {
                panic!("the upgrade on port {port} and its echoes finished in time")
            });
    }
}

async fn websocket(port: u16) {
    let dir = tempfile::tempdir().unwrap();
    let mut s = guest(dir.path(), port).await;
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
        io.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg, "port {port}, round {round}");
    }
}
