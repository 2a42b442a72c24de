//! The MITM proxy for one relayed connection: TLS termination with a leaf minted for the
//! client's SNI, hyper's HTTP/1.1 (or HTTP/2) server towards the guest, a policy decision per
//! request, and [`super::upstream`]'s HTTP/1.1 client towards the real upstream (or its
//! `[network.upstream_override]`). Bodies stream both ways without buffering; upgrades
//! (WebSocket) are spliced once both sides agreed; a guest connection keeps its upstream
//! connections alive across its requests (`upstream::Pool`).
//!
//! The guest-facing server leaves the write strategy to hyper, which asks the stream. A TLS
//! stream writes vectored, so hyper keeps a body's chunks as they came and hands TLS the head
//! and the chunks as one list of slices, which rustls seals into records directly; a small
//! response is one record and one channel frame. A guest's plain-HTTP stream (port 80) does
//! not, so hyper flattens there, and a response is again one frame. Forcing flattened writes
//! (`writev(false)`, the eleventh and twelfth sessions) copied every body byte into hyper's own
//! buffer first: dropping that saved 6 % of the instructions and about 6 % of the CPU of a
//! proxied download in `benches/proxy.rs`; requests did not move (docs/benchmarks.md).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite};

use super::upstream::{self, Failure, UpBody, Upstream, UpstreamError};
use super::{Ca, Network};
use crate::policy::Action;
use crate::telemetry::models::{self, Api};
use crate::telemetry::{Event, ModelCall, NetEvent};

/// Any byte stream the proxy serves (guest streams, TLS on top of them, CONNECT tunnels).
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
pub(super) type BoxIo = Box<dyn Io>;

type Body = BoxBody<Bytes, UpstreamError>;

const CONNECT_LIMIT: Duration = Duration::from_secs(10);
/// At most this much of a model API response is kept for reading its usage.
const MODEL_BODY_LIMIT: usize = 16 << 20;

pub(super) async fn serve<S>(net: Arc<Network>, stream: S, port: u16, process: Option<String>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io: BoxIo = Box::new(stream);
    match port {
        443 => tls(net, io, None, process).await,
        80 => serve_http(net, io, None, process, false).await,
        other => tracing::warn!(
            port = other,
            "relayed connection to a port that is not proxied"
        ),
    }
}

/// Picks (mints) the certificate for the SNI the client sent.
#[derive(Debug)]
pub(super) struct Minting(pub(super) Arc<Ca>);

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ca")
    }
}

impl ResolvesServerCert for Minting {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?;
        match self.0.leaf(name) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "cannot mint a certificate");
                None
            }
        }
    }
}

/// Terminate TLS on `io`, then serve HTTP on it. `expected` is the host a CONNECT named: the
/// SNI must match it.
fn tls(
    net: Arc<Network>,
    io: BoxIo,
    expected: Option<String>,
    process: Option<String>,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(async move {
        let cfg = match net.server_tls() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "TLS server configuration failed");
                return;
            }
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
        let stream = match acceptor.accept(io).into_fallible().await {
            Ok(s) => s,
            Err((e, mut io)) => {
                tracing::info!(error = %e, "guest TLS handshake failed");
                // tokio-rustls has written the alert that says why; closing the stream sees
                // it through the stream's own buffering (the channel's) before it ends.
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut io).await;
                return;
            }
        };
        let Some(sni) = stream.get_ref().1.server_name().map(str::to_string) else {
            return;
        };
        let sni = match expected {
            Some(host) if !host.eq_ignore_ascii_case(&sni) => {
                // Judged per request below: every request on it is refused.
                format!("{sni}\u{0}{host}")
            }
            _ => sni,
        };
        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
        serve_http(net, Box::new(stream), Some(sni), process, h2).await;
    })
}

/// Per guest connection: what every request on it shares.
struct Conn {
    net: Arc<Network>,
    /// The TLS server name, when the connection is TLS.
    sni: Option<String>,
    process: Option<String>,
    /// The upstream connections kept alive between this connection's requests.
    upstream: upstream::Pool,
    port: u16,
}

async fn serve_http(
    net: Arc<Network>,
    io: BoxIo,
    sni: Option<String>,
    process: Option<String>,
    h2: bool,
) {
    let port = if sni.is_some() { 443 } else { 80 };
    let conn = Arc::new(Conn {
        net,
        sni,
        process,
        upstream: upstream::Pool::new(),
        port,
    });
    let svc = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(conn.request(req).await) }
    });
    let r = if h2 {
        hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .max_concurrent_streams(upstream::CONCURRENT as u32)
            .serve_connection(TokioIo::new(io), svc)
            .await
    } else {
        hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(io), svc)
            .with_upgrades()
            .await
    };
    if let Err(e) = r {
        tracing::debug!(error = %e, "guest HTTP connection ended");
    }
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Whether the request names its host once, as `host[:port]`: at most one `Host` field,
/// neither it nor the target's authority (HTTP/2's `:authority`, HTTP/1.1's absolute form)
/// carrying user information or a port that is not a number below 65536, and the two, when
/// both are there, naming the same host.
fn one_authority<B>(req: &Request<B>) -> Result<(), &'static str> {
    use hyper::http::uri::Authority;
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let field = hosts.next();
    if hosts.next().is_some() {
        return Err("more than one Host header");
    }
    // http's `Authority` takes user information and any text after the last colon (its
    // `port()` is then merely `None`): both are checked here.
    let plain = |a: &Authority| {
        let rest = &a.as_str()[a.host().len()..];
        !a.as_str().contains('@')
            && !a.host().is_empty()
            && (rest.is_empty()
                || rest
                    .strip_prefix(':')
                    .is_some_and(|p| !p.is_empty() && p.parse::<u16>().is_ok()))
    };
    let field = match field {
        None => None,
        Some(v) => match v.to_str().ok().and_then(|t| t.parse::<Authority>().ok()) {
            Some(a) if plain(&a) => Some(a),
            _ => return Err("the Host header is not host[:port]"),
        },
    };
    if let Some(a) = req.uri().authority() {
        if !plain(a) {
            return Err("the request's authority is not host[:port]");
        }
        if field.is_some_and(|f| host_only(f.as_str()) != host_only(a.as_str())) {
            return Err("the Host header and the request's authority name different hosts");
        }
    }
    Ok(())
}

/// `host[:port]` → `host`, lower-cased.
fn host_only(authority: &str) -> String {
    let h = if let Some(rest) = authority.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        authority
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(authority)
    };
    h.trim_end_matches('.').to_ascii_lowercase()
}

impl Conn {
    async fn request(self: Arc<Self>, mut req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let method = req.method().clone();
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        if method == Method::CONNECT {
            return self.connect(req).await;
        }
        // One Host, naming a host (and port) only: with two, or with user information
        // (`allowed.example:80@other.example`), the name judged here and the one an upstream's
        // front end serves could differ.
        if let Err(why) = one_authority(&req) {
            return text(StatusCode::BAD_REQUEST, format!("capsem: {why}\n"));
        }
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(host_only)
            .or_else(|| req.uri().host().map(host_only));
        let Some(host) = host else {
            return text(
                StatusCode::BAD_REQUEST,
                "capsem: request without a Host header\n".into(),
            );
        };
        let scheme = if self.sni.is_some() { "https" } else { "http" };
        if let Some(sni) = &self.sni {
            let (sni_name, connect_host) = match sni.split_once('\u{0}') {
                Some((s, c)) => (s, Some(c)),
                None => (sni.as_str(), None),
            };
            if let Some(c) = connect_host {
                let rule = format!("TLS server name {sni_name} differs from the CONNECT host {c}");
                self.log(&host, &method, &path, Action::Deny, &rule, 403);
                return text(StatusCode::FORBIDDEN, format!("capsem: denied: {rule}\n"));
            }
            if !host.eq_ignore_ascii_case(sni_name) {
                let rule = format!(
                    "Host {host} differs from the TLS server name {sni_name} (domain fronting)"
                );
                self.log(&host, &method, &path, Action::Deny, &rule, 403);
                return text(StatusCode::FORBIDDEN, format!("capsem: denied: {rule}\n"));
            }
        }
        // The policy judges a path with its dot segments resolved; the path goes upstream as
        // the guest wrote it. Where the two could be read as different paths, it goes nowhere.
        if let Some(why) = crate::policy::ambiguous_path(&path) {
            let rule = format!("the path has {why}");
            self.log(&host, &method, &path, Action::Deny, &rule, 400);
            return text(
                StatusCode::BAD_REQUEST,
                format!("capsem: refused: {rule}; send it resolved\n"),
            );
        }
        let policy = self.net.policy.current();
        let d = policy.decide(&host, method.as_str(), req.uri().path());
        if d.action == Action::Deny {
            self.log(&host, &method, &path, Action::Deny, &d.rule, 403);
            return text(
                StatusCode::FORBIDDEN,
                format!(
                    "capsem: {method} {scheme}://{host}{path} is blocked by the policy rule \"{}\"\n",
                    d.rule
                ),
            );
        }
        // Recognised by the path the policy judged, so that `//v1/messages` (which the API
        // serves alike) is not a way around the accounting.
        let api = models::recognize(
            &host,
            method.as_str(),
            &crate::policy::canonical_path(&path),
        );
        if api.is_some() {
            // Read usage from plain bytes: ask the upstream not to compress.
            req.headers_mut().remove(header::ACCEPT_ENCODING);
        }

        // The guest's hop ends here. Of the protocols a connection may switch to, only
        // WebSocket is let through (see `upstream::asks_websocket`); any other offer is
        // dropped and the request goes as a plain one.
        let websocket = upstream::asks_websocket(req.headers());
        let trailers = upstream::has_token(req.headers(), &header::TE, "trailers");
        upstream::strip_hop_by_hop(req.headers_mut(), websocket);
        if trailers {
            // The proxy passes trailers on, so it may say that it takes them (RFC 9110 §10.1.4).
            let h = req.headers_mut();
            h.insert(header::TE, header::HeaderValue::from_static("trailers"));
            h.append(header::CONNECTION, header::HeaderValue::from_static("te"));
        }
        // Credentials for a proxy are the guest's business with its proxy, not the upstream's.
        req.headers_mut().remove(header::PROXY_AUTHORIZATION);
        let guest_upgrade = websocket.then(|| hyper::upgrade::on(&mut req));
        // A kept connection if one is idle; an HTTP/2 guest's concurrent requests each get
        // their own (see `upstream::Pool`).
        let (home, reuse) = self.upstream.checkout(&host).await;
        let (up, reused) = match reuse {
            Some(s) => (s, true),
            None => match self
                .open_upstream(&host, &policy, &method, &path, &d.rule)
                .await
            {
                Ok(s) => (s, false),
                Err(refusal) => return refusal,
            },
        };
        drop(policy);
        to_http1(&mut req, &host);
        let bytes_up = Arc::new(AtomicU64::new(0));
        let failed = |e: UpstreamError| {
            self.log(&host, &method, &path, Action::Allow, &d.rule, 502);
            text(
                StatusCode::BAD_GATEWAY,
                format!("capsem: upstream {host} failed: {e}\n"),
            )
        };
        let req = match upstream::prepare(req, bytes_up.clone()).await {
            Ok(r) => r,
            Err(e) => return failed(e),
        };
        let reply = match upstream::exchange(up, req, home, reused).await {
            Ok(r) => r,
            Err(Failure::Failed(e)) => return failed(e),
            // The kept connection was closed under the request: once more on a new one.
            Err(Failure::Again(req, home)) => {
                // Where to connect is read afresh; the request was judged already.
                let policy = self.net.policy.current();
                let up = match self
                    .open_upstream(&host, &policy, &method, &path, &d.rule)
                    .await
                {
                    Ok(s) => s,
                    Err(refusal) => return refusal,
                };
                drop(policy);
                match upstream::exchange(up, *req, home, false).await {
                    Ok(r) => r,
                    Err(Failure::Failed(e)) => return failed(e),
                    // (Not asked of a new connection.)
                    Err(Failure::Again(..)) => return failed(UpstreamError::Truncated),
                }
            }
        };
        let resp = reply.response;
        let status = resp.status().as_u16();
        self.log(&host, &method, &path, Action::Allow, &d.rule, status);
        // Only a model call's body is read, and only then its type matters.
        let content_type = match api {
            Some(_) => resp
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string(),
            None => String::new(),
        };
        let mut event = NetEvent {
            domain: host,
            port: self.port,
            method: method.to_string(),
            path: path.clone(),
            status: Some(status),
            bytes_up: 0,
            bytes_down: 0,
            duration: Duration::ZERO,
            decision: Action::Allow.as_str().to_string(),
            rule: d.rule,
            process: self.process.clone(),
        };
        // A 101 (only ever to a WebSocket request): a pipe both ways once hyper has handed
        // over the guest's side, starting with what the upstream sent after its head. The
        // request is recorded when the pipe ends, with what crossed it.
        if let (Some((mut up, early)), Some(guest_up)) = (reply.tunnel, guest_upgrade) {
            let net = self.net.clone();
            tokio::spawn(async move {
                let (mut sent, mut got) = (0, 0);
                if let Ok(g) = guest_up.await {
                    let mut g = Counted::new(TokioIo::new(g));
                    if tokio::io::AsyncWriteExt::write_all(&mut g, &early)
                        .await
                        .is_ok()
                    {
                        let _ = tokio::io::copy_bidirectional(&mut g, &mut up).await;
                    }
                    (sent, got) = (g.read, g.written);
                }
                event.bytes_up = bytes_up.load(Ordering::Relaxed) + sent;
                event.bytes_down = got;
                event.duration = started.elapsed();
                net.record(Event::Net(event));
            });
            return resp.map(|b| b.boxed());
        }
        let tap = Tap {
            ctx: Some(TapCtx {
                net: self.net.clone(),
                event,
                started,
                bytes_up,
                api,
                content_type,
            }),
            bytes: 0,
            buf: api.map(|_| Vec::new()),
        };
        resp.map(|b| Tapped { inner: b, tap }.boxed())
    }

    /// `CONNECT host:443` from an `HTTPS_PROXY` client: judged by its host, then a TLS MITM on
    /// the tunnel whose SNI must name the same host.
    async fn connect(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let authority = req.uri().authority().map(|a| a.as_str().to_string());
        let Some(authority) = authority else {
            return text(
                StatusCode::BAD_REQUEST,
                "capsem: CONNECT without host:port\n".into(),
            );
        };
        let host = host_only(&authority);
        let port = req.uri().port_u16().unwrap_or(443);
        // A proxy client says CONNECT on its plain connection to the proxy (port 80). Inside
        // TLS, which includes every tunnel a CONNECT opened, it would open tunnels within
        // tunnels, each with its own upstream connections: one level is all a client needs.
        if self.sni.is_some() {
            let rule = "CONNECT is only accepted on a plain (port 80) proxy connection";
            self.log(&host, &Method::CONNECT, &authority, Action::Deny, rule, 403);
            return text(StatusCode::FORBIDDEN, format!("capsem: denied: {rule}\n"));
        }
        if port != 443 {
            let rule = format!("CONNECT is only proxied to port 443, not {port}");
            self.log(
                &host,
                &Method::CONNECT,
                &authority,
                Action::Deny,
                &rule,
                403,
            );
            return text(StatusCode::FORBIDDEN, format!("capsem: denied: {rule}\n"));
        }
        let d = self.net.policy.current().decide_domain(&host);
        if d.action == Action::Deny {
            self.log(
                &host,
                &Method::CONNECT,
                &authority,
                Action::Deny,
                &d.rule,
                403,
            );
            return text(
                StatusCode::FORBIDDEN,
                format!(
                    "capsem: CONNECT {authority} is blocked by the policy rule \"{}\"\n",
                    d.rule
                ),
            );
        }
        let (net, process) = (self.net.clone(), self.process.clone());
        tokio::spawn(async move {
            match hyper::upgrade::on(req).await {
                Ok(up) => {
                    // The 200 may not have left yet (hyper hands the connection over once it
                    // has written it), and the client sends its TLS hello only once it has
                    // seen it.
                    let mut up = TokioIo::new(up);
                    if tokio::io::AsyncWriteExt::flush(&mut up).await.is_ok() {
                        tls(net, Box::new(up), Some(host), process).await;
                    }
                }
                Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
            }
        });
        Response::new(
            Full::new(Bytes::new())
                .map_err(|never| match never {})
                .boxed(),
        )
    }

    /// A new connection to `host` (TLS when the guest's was), where the policy says: its
    /// `upstream_override`, else the name's public addresses. A refusal is the response that
    /// says why, recorded.
    async fn open_upstream(
        &self,
        host: &str,
        policy: &crate::policy::Policy,
        method: &Method,
        path: &str,
        rule: &str,
    ) -> Result<Upstream, Response<Body>> {
        // Only a new upstream connection needs the TLS configuration (a cached one, checked
        // against the extra bundle's mtime).
        let tls = match self.sni.is_some().then(|| self.net.upstream_tls(policy)) {
            Some(Err(e)) => {
                // The reason names host paths: it goes to the host's log, not the guest.
                tracing::warn!(error = %e, "upstream TLS settings unusable");
                return Err(text(
                    StatusCode::BAD_GATEWAY,
                    "capsem: the host's TLS settings for upstreams are unusable (see the session's process log)\n".into(),
                ));
            }
            Some(Ok(c)) => Some(c),
            None => None,
        };
        // A name the user mapped is reached where they said; any other only at a public
        // address.
        let overridden = policy.upstream_for(host);
        let inward_ok = overridden.is_some();
        let target = overridden
            .map(str::to_string)
            .unwrap_or_else(|| format!("{host}:{}", if self.sni.is_some() { 443 } else { 80 }));
        match connect_upstream(host, &target, inward_ok, tls).await {
            Ok(s) => Ok(s),
            Err(Refused::Inward(e)) => {
                let rule = format!("{host} {e}");
                self.log(host, method, path, Action::Deny, &rule, 403);
                Err(text(
                    StatusCode::FORBIDDEN,
                    format!("capsem: denied: {rule}\n"),
                ))
            }
            Err(Refused::Other(e)) => {
                self.log(host, method, path, Action::Allow, rule, 502);
                // Where an override points is the host's business, not the guest's.
                tracing::warn!(%host, %target, error = %e, "upstream unreachable");
                Err(text(
                    StatusCode::BAD_GATEWAY,
                    format!("capsem: cannot reach {host}: {e}\n"),
                ))
            }
        }
    }

    fn log(
        &self,
        host: &str,
        method: &Method,
        path: &str,
        action: Action,
        rule: &str,
        status: u16,
    ) {
        // Allowed requests are recorded when their response ends (with their byte counts).
        if action == Action::Deny || status == 502 {
            self.net.record(Event::Net(NetEvent {
                domain: host.to_string(),
                port: self.port,
                method: method.to_string(),
                path: path.to_string(),
                status: Some(status),
                bytes_up: 0,
                bytes_down: 0,
                duration: Duration::ZERO,
                decision: action.as_str().to_string(),
                rule: rule.to_string(),
                process: self.process.clone(),
            }));
        }
        // Denials go to the log; every request is in the session record.
        if action == Action::Deny {
            tracing::info!(
                domain = host,
                method = %method,
                path,
                rule,
                status,
                process = self.process.as_deref().unwrap_or(""),
                "http denied"
            );
        } else {
            tracing::debug!(domain = host, method = %method, path, rule, status, "http");
        }
    }
}

/// Why no upstream connection was made.
enum Refused {
    /// The name resolves only to addresses capsem does not reach (a policy answer: 403).
    Inward(super::addr::AddrError),
    /// Anything else (502).
    Other(String),
}

impl From<String> for Refused {
    fn from(e: String) -> Self {
        Refused::Other(e)
    }
}

async fn connect_upstream(
    host: &str,
    target: &str,
    inward_ok: bool,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<Upstream, Refused> {
    use super::addr::{public_addrs, AddrError};
    let connect = async {
        if inward_ok {
            return tokio::net::TcpStream::connect(target)
                .await
                .map_err(|e| Refused::Other(e.to_string()));
        }
        let addrs = public_addrs(target).await.map_err(|e| match e {
            AddrError::Inward(_) => Refused::Inward(e),
            other => Refused::Other(other.to_string()),
        })?;
        tokio::net::TcpStream::connect(&addrs[..])
            .await
            .map_err(|e| Refused::Other(e.to_string()))
    };
    let tcp = tokio::time::timeout(CONNECT_LIMIT, connect)
        .await
        .map_err(|_| format!("no connection within {CONNECT_LIMIT:?}"))??;
    let _ = tcp.set_nodelay(true);
    let io: BoxIo = match tls {
        Some(cfg) => {
            let name = rustls_pki_types::ServerName::try_from(host.to_string())
                .map_err(|e| e.to_string())?;
            let s = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            Box::new(s)
        }
        None => Box::new(tcp),
    };
    Ok(Upstream::new(io))
}

/// Make a guest request (HTTP/1.1 or HTTP/2) fit for the HTTP/1.1 upstream connection:
/// origin-form target, a `Host` header, no HTTP/2-only version.
fn to_http1<B>(req: &mut Request<B>, host: &str) {
    if !req.headers().contains_key(header::HOST) {
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_else(|| host.to_string());
        if let Ok(v) = header::HeaderValue::from_str(&authority) {
            req.headers_mut().insert(header::HOST, v);
        }
    }
    if req.uri().authority().is_some() {
        let pq = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        if let Ok(u) = pq.parse() {
            *req.uri_mut() = u;
        }
    }
    *req.version_mut() = hyper::Version::HTTP_11;
}

/// What a response needs to record itself when it ends.
struct TapCtx {
    net: Arc<Network>,
    event: NetEvent,
    started: Instant,
    bytes_up: Arc<AtomicU64>,
    api: Option<Api>,
    content_type: String,
}

struct Tap {
    ctx: Option<TapCtx>,
    bytes: u64,
    /// The body so far, for model APIs (up to [`MODEL_BODY_LIMIT`]).
    buf: Option<Vec<u8>>,
}

impl Tap {
    fn data(&mut self, d: &[u8]) {
        self.bytes += d.len() as u64;
        if let Some(buf) = &mut self.buf {
            if buf.len() + d.len() <= MODEL_BODY_LIMIT {
                buf.extend_from_slice(d);
            } else {
                self.buf = None;
            }
        }
    }

    /// Record the request (and the model call in it) once, at the end of the body or when the
    /// guest went away first.
    fn finish(&mut self) {
        let Some(mut ctx) = self.ctx.take() else {
            return;
        };
        let duration = ctx.started.elapsed();
        ctx.event.bytes_up = ctx.bytes_up.load(Ordering::Relaxed);
        ctx.event.bytes_down = self.bytes;
        ctx.event.duration = duration;
        let model = match (ctx.api, self.buf.take()) {
            (Some(api), Some(buf)) => Some((api, ctx.event.path.clone(), buf)),
            _ => None,
        };
        ctx.net.record(Event::Net(ctx.event));
        if let Some((api, path, buf)) = model {
            if let Some(u) = models::parse(api, &path, &ctx.content_type, &buf) {
                let cost = crate::telemetry::prices::cost(
                    &u.model,
                    u.input,
                    u.output,
                    u.cache_read,
                    u.cache_write,
                );
                tracing::info!(provider = api.provider(), model = %u.model, input = u.input, output = u.output, "model call");
                ctx.net.record(Event::Model(ModelCall {
                    provider: api.provider().to_string(),
                    model: u.model,
                    streamed: u.streamed,
                    input_tokens: u.input,
                    output_tokens: u.output,
                    cache_read_tokens: u.cache_read,
                    cache_write_tokens: u.cache_write,
                    cost_usd: cost,
                    stop_reason: u.stop_reason,
                    duration_ms: duration.as_millis() as u64,
                }));
            }
        }
    }
}

/// A response body that streams through unchanged while [`Tap`] counts and keeps it.
/// A stream that counts the bytes read from it and written to it (a WebSocket's guest side:
/// what the guest sent, and what it got).
struct Counted<T> {
    inner: T,
    read: u64,
    written: u64,
}

impl<T> Counted<T> {
    fn new(inner: T) -> Counted<T> {
        Counted {
            inner,
            read: 0,
            written: 0,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = r {
            self.written += n as u64;
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

struct Tapped {
    inner: UpBody,
    tap: Tap,
}

impl hyper::body::Body for Tapped {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, UpstreamError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    let d = d.clone();
                    self.tap.data(&d);
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.tap.finish(),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tapped {
    fn drop(&mut self) {
        self.tap.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::host_only;

    #[test]
    fn host_header_forms() {
        assert_eq!(host_only("Example.COM:8443"), "example.com");
        assert_eq!(host_only("example.com."), "example.com");
        assert_eq!(host_only("[::1]:443"), "::1");
        assert_eq!(host_only("a.b"), "a.b");
    }
}
