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

/// Run `test` within [`LIMIT`]; a hang fails with what should have happened.
async fn in_time<T>(what: &str, test: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, test)
        .await
        .unwrap_or_else(|_| panic!("{what}: not within {LIMIT:?}"))
}

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
    guest_to(dir, port, up).await
}

/// A guest connection to `port` through a fresh `Network` that maps [`NAME`] to `up`.
async fn guest_to(
    dir: &std::path::Path,
    port: u16,
    up: u16,
) -> hyper::client::conn::http1::SendRequest<Body> {
    http1_over(guest_stream(dir, port, up, b"http/1.1").await).await
}

/// An HTTP/1.1 client (upgrades allowed) on `io`.
async fn http1_over<T: Io + 'static>(io: T) -> hyper::client::conn::http1::SendRequest<Body> {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    sender
}

/// The guest's byte stream for a connection to `port` (TLS offering `alpn` on 443).
async fn guest_stream(dir: &std::path::Path, port: u16, up: u16, alpn: &[u8]) -> Box<dyn Io> {
    guest_stream_with(dir, port, up, alpn, None).await
}

/// [`guest_stream`] through a proxy that records into `recorder`.
async fn guest_stream_with(
    dir: &std::path::Path,
    port: u16,
    up: u16,
    alpn: &[u8],
    recorder: Option<capsem_core::telemetry::Recorder>,
) -> Box<dyn Io> {
    if !dir.join("upstream-ca.pem").exists() {
        // Only for the CA file the policy names (a plain upstream has no server for it).
        stand_in_tls(&[NAME], &dir.join("upstream-ca.pem")).unwrap();
    }
    std::fs::write(
        dir.join("user.toml"),
        policy_for(NAME, up, &dir.join("upstream-ca.pem")),
    )
    .unwrap();
    let ca = Arc::new(Ca::load_or_create(&dir.join("ca")).unwrap());
    let policy = PolicySource::new(dir.join("user.toml"), dir.join("corp.toml")).unwrap();
    let net = Arc::new(Network::new(ca.clone(), policy, recorder));
    let (host, mut stream) = tokio::io::duplex(64 * 1024);
    tokio::spawn(net.handle(host));
    let open = NetOpen::Tcp {
        port,
        process: None,
    };
    capsem_proto::frame::write_frame(&mut stream, &open)
        .await
        .unwrap();
    if port != 443 {
        return Box::new(stream);
    }
    let mut cfg = client_trusting(ca.cert_der()).unwrap();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from(NAME).unwrap(), stream)
        .await
        .expect("handshake with a minted leaf");
    Box::new(tls)
}

/// A body that streams `chunks` one frame each, with no length announced.
fn streamed(chunks: impl IntoIterator<Item = Bytes>) -> Body {
    let frames: Vec<Result<Frame<Bytes>, Infallible>> =
        chunks.into_iter().map(|c| Ok(Frame::data(c))).collect();
    StreamBody::new(futures::stream::iter(frames)).boxed()
}

/// An upload of `len` bytes (a multiple of 128 KiB) in 128 KiB pieces.
fn upload(len: usize) -> Body {
    streamed((0..len / (128 << 10)).map(|_| Bytes::from(vec![7u8; 128 << 10])))
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
    let chunks = expected.chunks(50_001).map(Bytes::copy_from_slice);
    s.ready().await.unwrap();
    let resp = s
        .send_request(request("POST", "/echo", streamed(chunks)))
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
    let up = upstream(dir.path(), port == 443).await;
    let db = dir.path().join("session.db");
    let recorder = capsem_core::telemetry::Recorder::open(&db).unwrap();
    let io = guest_stream_with(dir.path(), port, up, b"http/1.1", Some(recorder)).await;
    let mut s = http1_over(io).await;
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
    // Once the pipe ends, the request is on record with what crossed it both ways.
    drop(io);
    let row = loop {
        let found = rusqlite::Connection::open(&db).ok().and_then(|c| {
            c.query_row(
                "SELECT status, bytes_up, bytes_down FROM net_events WHERE path = '/ws'",
                [],
                |r| {
                    Ok((
                        r.get::<_, u16>(0)?,
                        r.get::<_, u64>(1)?,
                        r.get::<_, u64>(2)?,
                    ))
                },
            )
            .ok()
        });
        if let Some(row) = found {
            break row;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(row, (101, 60_000, 60_000), "port {port}");
}

/// A hand-scripted HTTP/1.1 upstream (plain TCP): each request's path picks raw bytes to
/// answer with, so the proxy's client meets every way a response can be framed. Returns its
/// port, the number of connections it has accepted, and a notice of the proxy closing a
/// connection that is in the middle of a `/hang` response.
async fn scripted(
    tls: Option<Arc<rustls::ServerConfig>>,
) -> (
    u16,
    Arc<std::sync::atomic::AtomicUsize>,
    Arc<tokio::sync::Notify>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let hung_up = Arc::new(tokio::sync::Notify::new());
    let (count, notice) = (accepted.clone(), hung_up.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let (notice, tls) = (notice.clone(), tls.clone());
            tokio::spawn(async move {
                match tls {
                    None => script(tcp, notice).await,
                    Some(cfg) => {
                        if let Ok(s) = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await {
                            script(s, notice).await;
                        }
                    }
                }
            });
        }
    });
    (port, accepted, hung_up)
}

async fn script<S: Io>(mut tcp: S, hung_up: Arc<tokio::sync::Notify>) {
    let mut buf = Vec::new();
    // After `/linger`, the next request is read and the connection closed unanswered, as an
    // upstream's idle timeout may close a connection just as a request comes in on it.
    let mut linger = false;
    loop {
        // One request head (bodies are read only where a script needs them).
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut more = [0u8; 4096];
            match tcp.read(&mut more).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&more[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        buf.drain(..end);
        if linger {
            return;
        }
        // The body, by its length or to its last chunk (the tests' bodies never hold one).
        let body_end = |buf: &[u8]| {
            if head.contains("transfer-encoding: chunked") {
                buf.windows(5)
                    .position(|w| w == b"0\r\n\r\n")
                    .map(|i| i + 5)
            } else {
                let length = head
                    .split("content-length: ")
                    .nth(1)
                    .and_then(|v| v.split("\r\n").next())
                    .map(|v| v.parse::<usize>().unwrap())
                    .unwrap_or(0);
                (buf.len() >= length).then_some(length)
            }
        };
        let path = head.split(' ').nth(1).unwrap_or("").to_string();
        // The `/early` answers come before the body has been read (if ever).
        if !path.starts_with("/early") {
            let end = loop {
                if let Some(end) = body_end(&buf) {
                    break end;
                }
                let mut more = [0u8; 65536];
                match tcp.read(&mut more).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&more[..n]),
                }
            };
            buf.drain(..end);
        }
        // `/echo` answers with the head it got; `/h2c` and `/ws-h2c` switch to cleartext
        // HTTP/2 for a request that offers any upgrade, as a server that speaks it may.
        let echo = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{head}",
            head.len()
        );
        let offers = head.contains("\r\nupgrade:");
        let parts: Vec<&[u8]> = match path.as_str() {
            "/echo" => vec![echo.as_bytes()],
            "/h2c" | "/ws-h2c" if offers => vec![
                b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n",
            ],
            "/h2c" => vec![b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nplain"],
            "/hop" => vec![
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: keep-alive, x-hop\r\nkeep-alive: timeout=5\r\nx-hop: 1\r\nx-end: 1\r\n\r\nok",
            ],
            "/small" | "/linger" => vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"],
            "/chunked" => vec![
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-trailer\r\n\r\n5\r\nhel",
                b"lo\r\n6;ext=1\r\n world\r\n0\r\nx-trailer: t\r\n\r\n",
            ],
            "/head" => vec![b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n"],
            "/nocontent" => vec![b"HTTP/1.1 204 No Content\r\n\r\n"],
            "/notmodified" => vec![b"HTTP/1.1 304 Not Modified\r\ncontent-length: 50\r\n\r\n"],
            "/continue" => vec![
                b"HTTP/1.1 100 Continue\r\n\r\n",
                b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
            ],
            "/conflict" => vec![
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            ],
            "/lengths" => vec![
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!",
            ],
            "/to-close" => vec![b"HTTP/1.1 200 OK\r\n\r\nuntil ", b"the end"],
            "/bye" => vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"],
            "/quiet-close" => vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"],
            "/hang" => vec![b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n"],
            "/early-keep" => vec![b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n"],
            "/early" => vec![
                b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            ],
            _ => vec![b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"],
        };
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            if tcp.write_all(part).await.is_err() {
                return;
            }
        }
        linger = path == "/linger";
        if path == "/hang" {
            // The rest never comes: wait for the proxy to close the connection.
            let mut more = [0u8; 64];
            while matches!(tcp.read(&mut more).await, Ok(n) if n > 0) {}
            hung_up.notify_one();
            return;
        }
        if matches!(
            path.as_str(),
            "/to-close" | "/quiet-close" | "/early" | "/lengths"
        ) {
            return;
        }
    }
}

/// A [`scripted`] upstream over TLS, its CA written where the policy names it: its port and
/// count of accepted connections.
async fn scripted_tls(dir: &std::path::Path) -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
    let tls = stand_in_tls(&[NAME], &dir.join("upstream-ca.pem")).unwrap();
    let (up, accepted, _) = scripted(Some(Arc::new(tls.config))).await;
    (up, accepted)
}

/// A guest's plain-HTTP connection through a fresh proxy to a fresh [`scripted`] upstream; the
/// directory holds the proxy's files, kept as long as the connection is used.
async fn scripted_guest() -> (
    tempfile::TempDir,
    hyper::client::conn::http1::SendRequest<Body>,
) {
    let dir = tempfile::tempdir().unwrap();
    let (up, _, _) = scripted(None).await;
    let s = guest_to(dir.path(), 80, up).await;
    (dir, s)
}

/// Send `method path` with `body`; the status, the body's bytes and its trailers.
async fn exchange(
    s: &mut hyper::client::conn::http1::SendRequest<Body>,
    method: &str,
    path: &str,
    body: Body,
) -> (StatusCode, Bytes, Option<hyper::HeaderMap>) {
    s.ready()
        .await
        .unwrap_or_else(|e| panic!("the guest connection is open for {method} {path}: {e}"));
    let mut req = request(method, path, body);
    // hyper's server passes trailers on only to a client that said it takes them.
    req.headers_mut()
        .insert(header::TE, header::HeaderValue::from_static("trailers"));
    let resp = s.send_request(req).await.unwrap();
    let status = resp.status();
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    (status, collected.to_bytes(), trailers)
}

/// `POST /small` with a one-byte body (sent whole, with the head).
async fn post_x(
    s: &mut hyper::client::conn::http1::SendRequest<Body>,
) -> (StatusCode, Bytes, Option<hyper::HeaderMap>) {
    exchange(s, "POST", "/small", Full::new(Bytes::from("x")).boxed()).await
}

/// Every framing a response can have reaches the guest as the upstream meant it; one upstream
/// connection carries a guest connection's requests until a response says or shows otherwise.
#[tokio::test]
async fn every_response_framing_reaches_the_guest() {
    in_time("the exchanges finished", framings()).await;
}

async fn framings() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let (up, accepted, _) = scripted(None).await;
    let mut s = guest_to(dir.path(), 80, up).await;
    let empty = || Full::default().boxed();

    let (st, body, trailers) = exchange(&mut s, "GET", "/chunked", empty()).await;
    assert_eq!((st, &body[..]), (StatusCode::OK, &b"hello world"[..]));
    assert_eq!(
        trailers.expect("the trailers came through")["x-trailer"],
        "t"
    );
    let (st, body, _) = exchange(&mut s, "HEAD", "/head", empty()).await;
    assert_eq!((st, body.len()), (StatusCode::OK, 0));
    let (st, body, _) = exchange(&mut s, "GET", "/nocontent", empty()).await;
    assert_eq!((st, body.len()), (StatusCode::NO_CONTENT, 0));
    let (st, body, _) = exchange(&mut s, "GET", "/notmodified", empty()).await;
    assert_eq!((st, body.len()), (StatusCode::NOT_MODIFIED, 0));
    let (st, body, _) = exchange(&mut s, "GET", "/continue", empty()).await;
    assert_eq!((st, &body[..]), (StatusCode::OK, &b"ok"[..]));
    // A POST of a short body, and of one long enough to be streamed by a task of its own.
    let (st, body, _) = post_x(&mut s).await;
    assert_eq!((st, &body[..]), (StatusCode::OK, &b"ok"[..]));
    let long = streamed((0..3).map(|_| Bytes::from(vec![7u8; 100_000])));
    let (st, body, _) = exchange(&mut s, "POST", "/small", long).await;
    assert_eq!((st, &body[..]), (StatusCode::OK, &b"ok"[..]));
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "every response so far left the connection fit to reuse"
    );

    // Read to the close: whole, and the next request gets a new connection.
    let (st, body, _) = exchange(&mut s, "GET", "/to-close", empty()).await;
    assert_eq!((st, &body[..]), (StatusCode::OK, &b"until the end"[..]));
    let (st, _, _) = exchange(&mut s, "GET", "/small", empty()).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(accepted.load(Ordering::SeqCst), 2);

    // The upstream says it will close (and keeps its socket open, so that only the header
    // tells). That closes the upstream's hop only: the guest's connection carries on. Then
    // one that closes without saying so, while idle.
    let (st, _, _) = exchange(&mut s, "GET", "/bye", empty()).await;
    assert_eq!(st, StatusCode::OK);
    let (st, _, _) = exchange(&mut s, "GET", "/quiet-close", empty()).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let (st, body, _) = exchange(&mut s, "GET", "/small", empty()).await;
    assert_eq!((st, &body[..]), (StatusCode::OK, &b"ok"[..]));
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        4,
        "a closed idle connection is not reused"
    );

    // A length beside chunked framing: the chunks win, the length is not passed on, and the
    // connection is not reused (the script keeps it open; the count shows a new one).
    s.ready().await.unwrap();
    let resp = s
        .send_request(request("GET", "/conflict", empty()))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(!resp.headers().contains_key(header::CONTENT_LENGTH));
    assert_eq!(
        &resp.into_body().collect().await.unwrap().to_bytes()[..],
        b"hello"
    );
    // Differing lengths are refused, never guessed at.
    let (st, body, _) = exchange(&mut s, "GET", "/lengths", empty()).await;
    assert_eq!(st, StatusCode::BAD_GATEWAY);
    assert!(
        String::from_utf8_lossy(&body).contains("malformed response"),
        "{body:?}"
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 5);
}

/// An upstream that answers before it has read the request body: an HTTP/1.1 guest still gets
/// the answer (`connections_in_doubt_are_not_reused` shows the connection is not reused).
#[tokio::test]
async fn an_early_answer_to_a_long_upload_reaches_the_guest() {
    in_time("the early answer arrived in time", async {
        let (_dir, mut s) = scripted_guest().await;
        let resp = s
            .send_request(request("POST", "/early", upload(8 << 20)))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let _ = resp.into_body().collect().await;
    })
    .await;
}

/// An HTTP/2 guest's requests do not wait on each other's responses: one whose body the guest
/// has not read yet leaves the next request free to use an upstream connection of its own.
#[tokio::test]
async fn http2_requests_do_not_wait_for_each_other() {
    in_time(
        "the second request was answered while the first was still open",
        async {
            let dir = tempfile::tempdir().unwrap();
            let up = upstream(dir.path(), true).await;
            let mut s = h2_guest(dir.path(), up).await;
            let big = s
                .send_request(request("GET", "/big", Full::default().boxed()))
                .await
                .unwrap();
            assert_eq!(big.status(), StatusCode::OK);
            // The download is far bigger than the guest's window (64 KiB) and what the
            // proxy buffers on the way: unread, it cannot end.
            let other = s
                .send_request(request(
                    "POST",
                    "/echo",
                    Full::new(Bytes::from("hi")).boxed(),
                ))
                .await
                .unwrap();
            let body = other.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"hi");
            let got = big.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(got.len(), BIG);
        },
    )
    .await;
}

/// A guest that stops reading a response whose upstream has gone quiet (a long poll, an idle
/// event stream) does not leave the upstream connection open behind it.
#[tokio::test]
async fn a_body_the_guest_drops_closes_its_upstream_connection() {
    in_time(
        "the upstream connection was closed once the guest dropped the body",
        async {
            let dir = tempfile::tempdir().unwrap();
            let (up, _, hung_up) = scripted(None).await;
            let mut s = guest_to(dir.path(), 80, up).await;
            let resp = s
                .send_request(request("GET", "/hang", Full::default().boxed()))
                .await
                .unwrap();
            let mut body = resp.into_body();
            let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
            assert_eq!(&first[..], b"hello");
            drop(body);
            hung_up.notified().await;
        },
    )
    .await;
}

/// An HTTP/2 guest connection (offering only `h2`, with a 64 KiB stream window) through a
/// fresh `Network` that maps [`NAME`] to the HTTPS upstream at `up`.
async fn h2_guest(dir: &std::path::Path, up: u16) -> hyper::client::conn::http2::SendRequest<Body> {
    let io = guest_stream(dir, 443, up, b"h2").await;
    let (s, conn) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .initial_stream_window_size(65_535)
        .handshake(TokioIo::new(io))
        .await
        .expect("an HTTP/2 connection");
    tokio::spawn(conn);
    s
}

/// Send `GET path` and read the whole response; its status.
async fn h2_get(s: &mut hyper::client::conn::http2::SendRequest<Body>, path: &str) -> StatusCode {
    let resp = s
        .send_request(request("GET", path, Full::default().boxed()))
        .await
        .unwrap();
    let status = resp.status();
    let _ = resp.into_body().collect().await.unwrap();
    status
}

/// An upstream connection is reused only when its last exchange ended clean: not after the
/// upstream said it closes, nor after an answer that came before the upload it answered had
/// gone. (Over HTTP/2, whose guest connection outlives any one response, so that the pool's
/// choice shows in the upstream's count of connections.)
#[tokio::test]
async fn connections_in_doubt_are_not_reused() {
    in_time("the exchanges finished", async {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let (up, accepted) = scripted_tls(dir.path()).await;
        let mut s = h2_guest(dir.path(), up).await;
        assert_eq!(h2_get(&mut s, "/small").await, StatusCode::OK);
        assert_eq!(h2_get(&mut s, "/small").await, StatusCode::OK);
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "a clean exchange is reused"
        );
        assert_eq!(h2_get(&mut s, "/bye").await, StatusCode::OK);
        assert_eq!(h2_get(&mut s, "/small").await, StatusCode::OK);
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "`connection: close` is honoured"
        );

        // 32 MiB: more than the kernel buffers, so the upload is still going when the answer
        // has ended.
        let resp = s
            .send_request(request("POST", "/early-keep", upload(32 << 20)))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(h2_get(&mut s, "/small").await, StatusCode::OK);
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            3,
            "a connection with an upload cut short is not reused"
        );
    })
    .await;
}

/// A request as the guest's HTTP/1.1 client sends it, with `fields` added; the response with
/// its body read.
async fn send_with(
    s: &mut hyper::client::conn::http1::SendRequest<Body>,
    path: &str,
    fields: &[(&str, &str)],
) -> Response<Bytes> {
    s.ready().await.expect("the guest connection is open");
    let mut req = request("GET", path, Full::default().boxed());
    for (name, value) in fields {
        req.headers_mut().append(
            header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            header::HeaderValue::from_str(value).unwrap(),
        );
    }
    let (parts, body) = s.send_request(req).await.unwrap().into_parts();
    Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
}

/// The fields of one hop stay on it (RFC 9110 §7.6.1), both ways: what `Connection` names,
/// `Keep-Alive`, `TE`, the guest's proxy credentials. Cookies an HTTP/2 client splits leave
/// as one field.
#[tokio::test]
async fn hop_by_hop_fields_stay_on_their_hop() {
    in_time("the exchanges finished", async {
        let (_dir, mut s) = scripted_guest().await;
        let resp = send_with(
            &mut s,
            "/echo",
            &[
                ("connection", "x-secret, keep-alive"),
                ("x-secret", "1"),
                ("keep-alive", "timeout=5"),
                ("proxy-connection", "keep-alive"),
                ("proxy-authorization", "Basic Z3Vlc3Q6c2VjcmV0"),
                ("te", "trailers, deflate"),
                ("cookie", "a=1"),
                ("cookie", "b=2"),
                ("x-kept", "yes"),
            ],
        )
        .await;
        assert_eq!(resp.status(), StatusCode::OK);
        let seen = String::from_utf8_lossy(resp.body()).to_string();
        for gone in ["x-secret", "keep-alive", "proxy-", "deflate", "basic"] {
            assert!(
                !seen.contains(gone),
                "{gone:?} reached the upstream:\n{seen}"
            );
        }
        // The proxy takes trailers (it passes them on), so it says so on its own hop.
        assert!(seen.contains("\r\nte: trailers\r\n"), "{seen}");
        assert_eq!(seen.matches("connection:").count(), 1, "{seen}");
        assert!(seen.contains("\r\nconnection: te\r\n"), "{seen}");
        assert_eq!(seen.matches("cookie:").count(), 1, "{seen}");
        assert!(seen.contains("\r\ncookie: a=1; b=2\r\n"), "{seen}");
        assert!(seen.contains("\r\nx-kept: yes\r\n"), "{seen}");
        assert!(seen.contains("\r\nhost: up.example\r\n"), "{seen}");

        // The upstream's own hop fields do not reach the guest; the rest does.
        let resp = send_with(&mut s, "/hop", &[]).await;
        assert_eq!(resp.status(), StatusCode::OK);
        for gone in ["connection", "keep-alive", "x-hop"] {
            assert!(
                !resp.headers().contains_key(gone),
                "{gone} reached the guest"
            );
        }
        assert_eq!(resp.headers()["x-end"], "1");
    })
    .await;
}

/// Only WebSocket may take a connection out of the policy's sight. An offer to switch to
/// cleartext HTTP/2 (whose streams would be requests the policy never saw) goes as a plain
/// request; a 101 to anything but the WebSocket the guest asked for is refused.
#[tokio::test]
async fn only_websocket_upgrades_pass() {
    in_time("the exchanges finished", async {
        let (_dir, mut s) = scripted_guest().await;
        let h2c = [
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAAQAAP__"),
        ];
        let resp = send_with(&mut s, "/h2c", &h2c).await;
        assert_eq!(resp.status(), StatusCode::OK, "no switch");
        assert_eq!(&resp.body()[..], b"plain");
        // Offering WebSocket and h2c together lets the server pick h2c: also a plain request.
        let resp = send_with(
            &mut s,
            "/h2c",
            &[("connection", "upgrade"), ("upgrade", "websocket, h2c")],
        )
        .await;
        assert_eq!(
            (resp.status(), &resp.body()[..]),
            (StatusCode::OK, &b"plain"[..])
        );
        let resp = send_with(
            &mut s,
            "/ws-h2c",
            &[("connection", "upgrade"), ("upgrade", "websocket")],
        )
        .await;
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        assert!(
            String::from_utf8_lossy(resp.body()).contains("other than WebSocket"),
            "{:?}",
            resp.body()
        );
    })
    .await;
}

/// A request names its host once, as `host[:port]`: a second `Host`, or one with user
/// information, could make the name the policy and the TLS server name were checked against
/// differ from the one an upstream's front end serves.
#[tokio::test]
async fn a_request_names_its_host_once() {
    in_time("the exchanges finished", async {
        let dir = tempfile::tempdir().unwrap();
        let (up, accepted) = scripted_tls(dir.path()).await;
        let mut s = guest_to(dir.path(), 443, up).await;
        let resp = send_with(&mut s, "/small", &[("host", "other.example")]).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert!(String::from_utf8_lossy(resp.body()).contains("more than one Host header"));
        for bad in [
            "up.example:443@other.example",
            "up.example:abc",
            "up.example:99999",
            "up.example:",
        ] {
            let mut req = request("GET", "/small", Full::default().boxed());
            req.headers_mut()
                .insert(header::HOST, header::HeaderValue::from_static(bad));
            s.ready().await.unwrap();
            let resp = s.send_request(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "Host: {bad}");
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert!(
                String::from_utf8_lossy(&body).contains("not host[:port]"),
                "Host: {bad}: {body:?}"
            );
        }
        // The absolute form names the host too: it must be the Host's.
        let mut req = request("GET", "http://other.example/small", Full::default().boxed());
        req.headers_mut()
            .insert(header::HOST, header::HeaderValue::from_static(NAME));
        s.ready().await.unwrap();
        let resp = s.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(
            String::from_utf8_lossy(&body).contains("different hosts"),
            "{body:?}"
        );
        assert_eq!(
            accepted.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "nothing reached the upstream"
        );
        let resp = send_with(&mut s, "/small", &[]).await;
        assert_eq!(
            (resp.status(), &resp.body()[..]),
            (StatusCode::OK, &b"ok"[..])
        );
        let mut req = request(
            "GET",
            "https://up.example:443/small",
            Full::default().boxed(),
        );
        req.headers_mut()
            .insert(header::HOST, header::HeaderValue::from_static("UP.example"));
        s.ready().await.unwrap();
        assert_eq!(s.send_request(req).await.unwrap().status(), StatusCode::OK);
    })
    .await;
}

/// An upstream may close a kept connection just as the next request goes out on it. A request
/// that is safe to send twice (idempotent, and whole in hand) then goes again, once, on a new
/// connection; any other gets a 502, since the upstream may have acted on it before it closed.
#[tokio::test]
async fn a_request_caught_by_an_upstream_closing_goes_again_when_safe() {
    in_time("the exchanges finished", async {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let (up, accepted, _) = scripted(None).await;
        let mut s = guest_to(dir.path(), 80, up).await;
        let empty = || Full::default().boxed();
        let (st, _, _) = exchange(&mut s, "GET", "/linger", empty()).await;
        assert_eq!(st, StatusCode::OK);
        let (st, body, _) = exchange(&mut s, "GET", "/small", empty()).await;
        assert_eq!((st, &body[..]), (StatusCode::OK, &b"ok"[..]));
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "the GET went again, on a new connection"
        );
        let (st, _, _) = exchange(&mut s, "GET", "/linger", empty()).await;
        assert_eq!(st, StatusCode::OK);
        let (st, body, _) = post_x(&mut s).await;
        assert_eq!(st, StatusCode::BAD_GATEWAY, "{body:?}");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "the POST was not sent twice"
        );
    })
    .await;
}

/// The policy judges a path with its dot segments resolved, and the path goes upstream as the
/// guest wrote it: a path that servers could read as another (a dot segment, escaped or not,
/// or a backslash) is refused, never judged as one path and served as another.
#[tokio::test]
async fn a_path_servers_could_read_otherwise_is_refused() {
    in_time("the exchanges finished", async {
        let (_dir, mut s) = scripted_guest().await;
        for path in [
            "/x/../small",
            "/x/%2e%2e/small",
            "/x/..;/small",
            "/small%5c",
        ] {
            let resp = send_with(&mut s, path, &[]).await;
            assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{path}");
            assert!(
                String::from_utf8_lossy(resp.body()).contains("refused"),
                "{path}: {:?}",
                resp.body()
            );
        }
        let resp = send_with(&mut s, "/small", &[]).await;
        assert_eq!(
            (resp.status(), &resp.body()[..]),
            (StatusCode::OK, &b"ok"[..])
        );
    })
    .await;
}

/// CONNECT opens one tunnel from a plain proxy connection; inside TLS (so inside any tunnel)
/// it is refused, so a guest cannot nest tunnels, each with upstream connections of its own.
#[tokio::test]
async fn connect_is_one_level_deep() {
    in_time("the exchanges finished", async {
        let dir = tempfile::tempdir().unwrap();
        let (up, _) = scripted_tls(dir.path()).await;
        let connect = || {
            Request::builder()
                .method("CONNECT")
                .uri(format!("{NAME}:443"))
                .body(Full::default().boxed())
                .unwrap()
        };
        let mut plain = guest_to(dir.path(), 80, up).await;
        let resp = plain.send_request(connect()).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let tunnel = TokioIo::new(hyper::upgrade::on(resp).await.expect("a tunnel"));
        let ca = Ca::load_or_create(&dir.path().join("ca")).unwrap();
        let tls =
            tokio_rustls::TlsConnector::from(Arc::new(client_trusting(ca.cert_der()).unwrap()))
                .connect(ServerName::try_from(NAME).unwrap(), tunnel)
                .await
                .expect("TLS inside the tunnel");
        let mut inner = http1_over(tls).await;
        let resp = send_with(&mut inner, "/small", &[]).await;
        assert_eq!(
            (resp.status(), &resp.body()[..]),
            (StatusCode::OK, &b"ok"[..])
        );
        inner.ready().await.unwrap();
        let resp = inner.send_request(connect()).await.unwrap();
        assert_eq!(
            resp.status(),
            StatusCode::FORBIDDEN,
            "a tunnel in the tunnel"
        );
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("plain"), "{body:?}");
    })
    .await;
}
