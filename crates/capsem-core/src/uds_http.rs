//! HTTP/1.1 over UNIX sockets: the client every front end uses to reach the service (and the
//! service uses to reach a per-VM process), the server loop, and raw-stream upgrades. Request and
//! response bodies are JSON; errors come back as `{"error": "..."}`.

use std::path::PathBuf;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{de::DeserializeOwned, Serialize};

use crate::api::ErrorBody;

pub use hyper::Method;

/// A raw byte stream after an HTTP upgrade.
pub type Upgraded = TokioIo<hyper::upgrade::Upgraded>;

/// Protocol name used in `Upgrade:` headers.
pub const UPGRADE_PROTOCOL: &str = "capsem-stream";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP exchange failed")]
    Http(#[from] hyper::Error),
    #[error("{message}")]
    Api { status: StatusCode, message: String },
    #[error("unreadable response ({0})")]
    Decode(String),
}

/// An error answered as `{"error": "..."}` with a fitting status: the one error type of every
/// route, the service's and the per-VM process's.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct HttpError {
    pub status: StatusCode,
    pub message: String,
}

impl HttpError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        HttpError {
            status,
            message: message.into(),
        }
    }
}

impl axum::response::IntoResponse for HttpError {
    fn into_response(self) -> axum::response::Response {
        (
            self.status,
            axum::Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response()
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// Idle keep-alive connections kept per client (clones share them).
const MAX_IDLE: usize = 8;

/// Client for one socket. Clones share a small pool of idle keep-alive connections, so a
/// long-lived client (the service's handle on a VM) skips the connect and handshake per call.
#[derive(Clone)]
pub struct UdsClient {
    path: PathBuf,
    idle: std::sync::Arc<std::sync::Mutex<Vec<Sender>>>,
}

impl std::fmt::Debug for UdsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdsClient")
            .field("path", &self.path)
            .finish()
    }
}

impl UdsClient {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        UdsClient {
            path: path.into(),
            idle: Default::default(),
        }
    }

    fn pooled(&self) -> Option<Sender> {
        let mut idle = self.idle.lock().expect("pool lock");
        while let Some(s) = idle.pop() {
            if s.is_ready() {
                return Some(s);
            }
        }
        None
    }

    fn give_back(&self, s: Sender) {
        if s.is_ready() {
            let mut idle = self.idle.lock().expect("pool lock");
            if idle.len() < MAX_IDLE {
                idle.push(s);
            }
        }
    }

    async fn connect(&self) -> Result<Sender, ClientError> {
        let stream =
            crate::sock::connect(&self.path)
                .await
                .map_err(|source| ClientError::Connect {
                    path: self.path.clone(),
                    source,
                })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(sender)
    }

    fn build(method: Method, path: &str, body: Option<Vec<u8>>) -> Request<Full<Bytes>> {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "capsem");
        if body.is_some() {
            b = b.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        b.body(Full::new(Bytes::from(body.unwrap_or_default())))
            .expect("request parts are valid")
    }

    /// Send a request and return the raw status and body.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let req = Self::build(method.clone(), path, body.clone());
        let resp = match self.pooled() {
            // A kept connection the server has since closed fails at once: retry on a new one.
            Some(mut s) => match s.send_request(req).await {
                Ok(r) => Ok((s, r)),
                Err(e) if e.is_closed() || e.is_canceled() => Err(()),
                Err(e) => return Err(e.into()),
            },
            None => Err(()),
        };
        let (sender, resp) = match resp {
            Ok(x) => x,
            Err(()) => {
                let mut s = self.connect().await?;
                let r = s.send_request(Self::build(method, path, body)).await?;
                (s, r)
            }
        };
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        self.give_back(sender);
        Ok((status, bytes))
    }

    /// JSON request → JSON response; non-2xx becomes [`ClientError::Api`].
    pub async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let body = body.map(|b| serde_json::to_vec(b).expect("request serializes"));
        let (status, bytes) = self.raw(method, path, body).await?;
        decode_response(status, &bytes)
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call::<(), T>(Method::GET, path, None).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.call(Method::POST, path, Some(body)).await
    }

    /// POST `body` asking to upgrade; on 101 returns the raw stream.
    pub async fn upgrade<B: Serialize>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<Upgraded, ClientError> {
        let mut sender = self.connect().await?;
        let mut req = Self::build(
            Method::POST,
            path,
            Some(serde_json::to_vec(body).expect("request serializes")),
        );
        let h = req.headers_mut();
        h.insert(
            hyper::header::CONNECTION,
            "upgrade".parse().expect("static"),
        );
        h.insert(
            hyper::header::UPGRADE,
            UPGRADE_PROTOCOL.parse().expect("static"),
        );
        let resp = sender.send_request(req).await?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let status = resp.status();
            let bytes = resp.into_body().collect().await?.to_bytes();
            return Err(api_error(status, &bytes));
        }
        let up = hyper::upgrade::on(resp).await?;
        Ok(TokioIo::new(up))
    }
}

fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    let message = serde_json::from_slice::<ErrorBody>(body)
        .map(|e| e.error)
        .unwrap_or_else(|_| {
            let text = String::from_utf8_lossy(body).trim().to_string();
            if text.is_empty() {
                format!("request failed with HTTP {status}")
            } else {
                text
            }
        });
    ClientError::Api { status, message }
}

pub fn decode_response<T: DeserializeOwned>(
    status: StatusCode,
    body: &[u8],
) -> Result<T, ClientError> {
    if !status.is_success() {
        return Err(api_error(status, body));
    }
    serde_json::from_slice(body).map_err(|e| ClientError::Decode(e.to_string()))
}

/// Take the upgrade handle out of an incoming request, if it asked for one.
pub fn take_upgrade<B>(req: &mut Request<B>) -> Option<hyper::upgrade::OnUpgrade> {
    let wants = req
        .headers()
        .get(hyper::header::UPGRADE)
        .map(|v| v.as_bytes() == UPGRADE_PROTOCOL.as_bytes())
        .unwrap_or(false);
    if !wants {
        return None;
    }
    Some(hyper::upgrade::on(req))
}

/// The 101 answer that completes an upgrade.
pub fn switching_protocols() -> hyper::Response<axum::body::Body> {
    hyper::Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(hyper::header::CONNECTION, "upgrade")
        .header(hyper::header::UPGRADE, UPGRADE_PROTOCOL)
        .body(axum::body::Body::empty())
        .expect("static response")
}
