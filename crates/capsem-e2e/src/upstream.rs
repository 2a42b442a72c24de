//! A local HTTPS server standing in for real sites: a throw-away CA (its PEM is written for the
//! policy's `extra_ca_bundle`), one certificate for every name it impersonates, HTTP/1.1 with
//! keep-alive. Responses: `GET /` → `hello from <host>`; a path registered with
//! [`Upstream::fixture`] → its recorded body (the streamed one when the request asks for a
//! stream); anything else → `<METHOD> <path>`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};

/// A recorded response: content type and body.
pub type Fixture = (String, Vec<u8>);
/// Fixtures by (path, streamed).
type Fixtures = HashMap<(String, bool), Fixture>;

pub struct Upstream {
    pub port: u16,
    pub ca_pem: PathBuf,
    fixtures: Arc<Mutex<Fixtures>>,
    _rt: tokio::runtime::Runtime,
}

impl Upstream {
    /// Serve on 127.0.0.1 (a free port) with a certificate for `names`; the CA goes to `dir`.
    pub fn start(names: &[&str], dir: &Path) -> Upstream {
        let ca_pem = dir.join("stand-in-ca.pem");
        let tls = capsem_core::net::stand_in::stand_in_tls(names, &ca_pem).unwrap();

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let fixtures: Arc<Mutex<Fixtures>> = Arc::default();
        let fx = fixtures.clone();
        let svc = hyper::service::service_fn(move |req| {
            let fx = fx.clone();
            async move { Ok::<_, Infallible>(respond(req, &fx).await) }
        });
        rt.spawn(capsem_core::net::stand_in::serve(
            listener,
            Some(Arc::new(tls.config)),
            svc,
        ));
        Upstream {
            port,
            ca_pem,
            fixtures,
            _rt: rt,
        }
    }

    /// Serve `body` with `content_type` for requests to `path` — to streaming requests (a
    /// `"stream": true` body or a path naming a stream) when `streamed`.
    pub fn fixture(&self, path: &str, streamed: bool, content_type: &str, body: &[u8]) {
        self.fixtures.lock().unwrap().insert(
            (path.to_string(), streamed),
            (content_type.to_string(), body.to_vec()),
        );
    }
}

async fn respond(
    req: Request<hyper::body::Incoming>,
    fixtures: &Mutex<Fixtures>,
) -> Response<Full<Bytes>> {
    use http_body_util::BodyExt;
    let host = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
        .to_string();
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let sent = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let sent = String::from_utf8_lossy(&sent).replace(' ', "");
    let streamed = sent.contains("\"stream\":true") || path.contains("stream");
    if let Some((ct, body)) = fixtures
        .lock()
        .unwrap()
        .get(&(path.clone(), streamed))
        .cloned()
    {
        return Response::builder()
            .header("content-type", ct)
            .body(Full::new(Bytes::from(body)))
            .unwrap();
    }
    let body = if path == "/" {
        format!("hello from {host}\n")
    } else {
        format!("{method} {path}\n")
    };
    Response::new(Full::new(Bytes::from(body)))
}
