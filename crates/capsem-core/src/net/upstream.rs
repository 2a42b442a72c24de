//! The proxy's HTTP/1.1 client towards an upstream, driven in the task that serves the guest's
//! connection: a request's head (and a small body) is written there, its response head is read
//! there, and a response whose body is already in hand, or short enough to wait for, goes back
//! to the guest whole with the connection returned to its slot at once. Only a longer body gets
//! a task of its own ([`pump`]), which reads ahead while the guest's side writes, so a download
//! stays pipelined; only a request body that may be long gets a writing task, so an upstream
//! may answer while it is still coming.
//!
//! hyper's client, which this replaced, hands every request to a connection task of its own
//! and the response back through channels: two hand-offs between tasks per request that a
//! small exchange does not need. Without them the proxy's HTTP handling costs 12–14 µs of CPU
//! per request more than a proxy that does no HTTP at all, where it cost 17–31 µs
//! (`BENCH_PATH=direct,proxy,splice` of `benches/proxy.rs`; docs/benchmarks.md, fifteenth
//! session).
//!
//! Framing follows RFC 9112 §6.3: no body after `HEAD`, 1xx, 204 and 304; `Transfer-Encoding`
//! ending in `chunked`, else read to the close; else `Content-Length`; else read to the close.
//! A response with differing lengths is refused and its connection dropped, since a misread
//! length on a reused connection would hand one response's bytes to the next request; one with
//! both `Content-Length` and `Transfer-Encoding` is read by the latter, passed on without the
//! length, and its connection not reused (RFC 9112 §6.3). Interim responses (100, 103) are
//! skipped; a 101 hands the connection over as a tunnel, and only for a WebSocket handshake.
//! The fields of one hop (RFC 9110 §7.6.1) are not passed on in either direction
//! ([`strip_hop_by_hop`]).

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures::FutureExt;
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::proxy::BoxIo;

/// A response head may be this long; hyper's client allowed about 400 KiB of buffer, servers
/// commonly stop at 8–64 KiB.
const MAX_HEAD: usize = 128 << 10;
/// At most this many header fields in a head or a trailer section (hyper's default: 100).
const MAX_HEADERS: usize = 128;
/// A chunk-size line (with its extensions) may be this long.
const MAX_CHUNK_LINE: usize = 4 << 10;
/// A request body of at most this exact size is read before the head is written and leaves
/// with it; a response body of at most this `Content-Length` (one TLS record) is waited for in
/// the guest's task.
const INLINE: u64 = 16 << 10;
/// The body task reads in pieces of this much room (a TLS record is 16 KiB of plaintext).
const READ_ROOM: usize = 16 << 10;
/// The body task hands the guest's side pieces of up to this much (see [`gather`]).
const GATHER: usize = 64 << 10;
/// How many read-ahead pieces of a body may wait for the guest.
const AHEAD: usize = 4;
/// How long a request body still being written when its response has ended may take to finish.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(100);

/// Why an exchange with the upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("malformed response: {0}")]
    Malformed(&'static str),
    #[error("the upstream closed the connection before the response was complete")]
    Truncated,
    #[error("the guest's request body failed: {0}")]
    Guest(hyper::Error),
}

/// One HTTP/1.1 connection to an upstream, idle between exchanges.
pub(super) struct Upstream {
    rd: ReadHalf<BoxIo>,
    wr: WriteHalf<BoxIo>,
    /// Bytes read past the last response (none on a healthy idle connection).
    buf: BytesMut,
}

impl Upstream {
    pub(super) fn new(io: BoxIo) -> Upstream {
        let (rd, wr) = tokio::io::split(io);
        Upstream {
            rd,
            wr,
            buf: BytesMut::new(),
        }
    }

    /// Whether an idle connection can carry another request: the upstream has not closed it
    /// (or sent anything unasked) since its last response.
    pub(super) fn is_alive(&mut self) -> bool {
        let mut probe = [0u8; 1];
        // Pending means open and quiet; data, the end, or an error all retire the connection.
        self.buf.is_empty() && self.rd.read(&mut probe).now_or_never().is_none()
    }
}

/// The idle upstream connections a guest connection keeps alive between its requests (at
/// most [`IDLE`]), and how many exchanges it may have open at once ([`CONCURRENT`]: an
/// HTTP/1.1 guest has one at a time; an HTTP/2 guest's concurrent requests each get a
/// connection of their own rather than waiting on another's response).
#[derive(Clone)]
pub(super) struct Pool {
    idle: Arc<std::sync::Mutex<Vec<(String, Upstream)>>>,
    open: Arc<Semaphore>,
}

/// Idle connections kept per guest connection.
const IDLE: usize = 4;
/// Exchanges open at once per guest connection; the guest-facing HTTP/2 server allows no more
/// streams than this, so a guest's client queues the rest itself.
pub(super) const CONCURRENT: usize = 16;

impl Pool {
    pub(super) fn new() -> Pool {
        Pool {
            idle: Arc::default(),
            open: Arc::new(Semaphore::new(CONCURRENT)),
        }
    }

    /// A turn for an exchange with `host` (waiting while [`CONCURRENT`] are open), as the
    /// [`Home`] its connection returns to, and an idle connection to `host` if one can carry
    /// another request.
    pub(super) async fn checkout(&self, host: &str) -> (Home, Option<Upstream>) {
        let turn = self
            .open
            .clone()
            .acquire_owned()
            .await
            .expect("the pool's semaphore is never closed");
        let home = Home {
            pool: self.clone(),
            host: host.to_string(),
            _turn: turn,
        };
        (home, self.take(host))
    }

    /// An idle connection to `host` that can carry another request; stale ones are dropped.
    fn take(&self, host: &str) -> Option<Upstream> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(i) = idle.iter().rposition(|(h, _)| h == host) {
            let (_, mut up) = idle.remove(i);
            if up.is_alive() {
                return Some(up);
            }
        }
        None
    }

    fn keep(&self, host: String, up: Upstream) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() >= IDLE {
            idle.remove(0);
        }
        idle.push((host, up));
    }
}

/// Where a connection goes when its exchange ends well, and the exchange's turn in the pool
/// (given back when the exchange ends either way).
pub(super) struct Home {
    pool: Pool,
    host: String,
    /// Held until the exchange ends.
    _turn: OwnedSemaphorePermit,
}

impl Home {
    fn keep(self, up: Upstream) {
        self.pool.keep(self.host, up);
    }
}

/// What came back: the response for the guest and, for a 101, the connection as a tunnel
/// (with any bytes the upstream sent after the head).
pub(super) struct Reply {
    pub(super) response: Response<UpBody>,
    pub(super) tunnel: Option<(BoxIo, Bytes)>,
}

/// A request made ready for the upstream: its head, with the body when that is short (or
/// absent) and so in hand, else the body still to stream.
pub(super) struct Prepared {
    out: Vec<u8>,
    /// A body too long to hold, and how it is framed upstream.
    stream: Option<(Incoming, Sent)>,
    head_only: bool,
    asks_upgrade: bool,
    /// Whether the request may go again on another connection if the first turns out closed
    /// before any of its response came: whole in hand, and idempotent (RFC 9110 §9.2.2), since
    /// the upstream may have acted on it before it closed.
    replayable: bool,
    bytes_up: Arc<AtomicU64>,
}

/// Make `req` (origin-form target, `Host` set) ready to send: its head, and a short body read
/// now to go with it. `bytes_up` counts the body's bytes.
pub(super) async fn prepare(
    req: Request<Incoming>,
    bytes_up: Arc<AtomicU64>,
) -> Result<Prepared, UpstreamError> {
    let head_only = req.method() == Method::HEAD;
    let asks_upgrade = req.headers().contains_key(header::UPGRADE);
    let (parts, mut body) = req.into_parts();
    let framing = request_framing(&parts.method, &parts.headers, &body);
    let mut out = Vec::with_capacity(512);
    write_head(&mut out, &parts, framing);
    let small = match body.size_hint().exact() {
        _ if matches!(framing, Sent::None | Sent::AddZeroLength) => true,
        Some(n) => n <= INLINE,
        None => false,
    };
    let stream = if small {
        // The body is short (or absent): read it now and send it with the head.
        if !matches!(framing, Sent::None | Sent::AddZeroLength) {
            while let Some(f) = body.frame().await {
                if let Ok(d) = f.map_err(UpstreamError::Guest)?.into_data() {
                    bytes_up.fetch_add(d.len() as u64, Ordering::Relaxed);
                    put_data(&mut out, &d, framing);
                }
            }
            if matches!(framing, Sent::Chunked | Sent::AddChunked) {
                out.extend_from_slice(b"0\r\n\r\n");
            }
        }
        None
    } else {
        Some((body, framing))
    };
    Ok(Prepared {
        replayable: stream.is_none() && parts.method.is_idempotent(),
        out,
        stream,
        head_only,
        asks_upgrade,
        bytes_up,
    })
}

/// Why an exchange gave no response.
pub(super) enum Failure {
    /// The connection, kept from an earlier exchange (`reused`), was closed by the upstream
    /// as the request went out: no byte of a response came. An upstream may close an idle
    /// connection at any moment, so this is a race, not a fault; a replayable request may go
    /// again, once, on a new connection, with the exchange's turn.
    Again(Box<Prepared>, Home),
    Failed(UpstreamError),
}

impl From<UpstreamError> for Failure {
    fn from(e: UpstreamError) -> Failure {
        Failure::Failed(e)
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Failure {
        Failure::Failed(e.into())
    }
}

async fn write_all_flush(wr: &mut WriteHalf<BoxIo>, out: &[u8]) -> io::Result<()> {
    wr.write_all(out).await?;
    wr.flush().await
}

/// Send `req` on `up` and read its response head. The connection goes back to `home` when the
/// exchange ends well. `reused`: `up` carried an earlier exchange (see [`Failure::Again`]).
pub(super) async fn exchange(
    up: Upstream,
    mut req: Prepared,
    home: Home,
    reused: bool,
) -> Result<Reply, Failure> {
    let Upstream {
        mut rd,
        mut wr,
        mut buf,
    } = up;
    let again = reused && req.replayable && buf.is_empty();
    let (head_only, asks_upgrade) = (req.head_only, req.asks_upgrade);
    // Whether the connection may carry another request afterwards. The guest's own wish to
    // close ended with its hop ([`strip_hop_by_hop`]); the upstream's is read from its answer.
    let mut keep = true;
    let mut unsent = None;
    let (writer, req) = match req.stream.take() {
        None => {
            if let Err(e) = write_all_flush(&mut wr, &req.out).await {
                if again {
                    return Err(Failure::Again(Box::new(req), home));
                }
                // An upstream may answer early (413, say) and close before reading all of
                // the request: its answer is still read below, and is what the guest gets.
                unsent = Some(e);
                keep = false;
            }
            let writer = Writer {
                idle: Some(wr),
                busy: None,
            };
            (writer, Some(req))
        }
        Some((body, framing)) => {
            let (out, bytes_up) = (req.out, req.bytes_up);
            let task = tokio::spawn(async move {
                let ok = send_body(&mut wr, out, body, framing, &bytes_up)
                    .await
                    .is_ok();
                (wr, ok)
            });
            let writer = Writer {
                idle: None,
                busy: Some(task),
            };
            (writer, None)
        }
    };

    // The response head, past any interim (1xx) responses. It is parsed only once its end is
    // in, and each read is searched once, so a head that trickles in costs no more than one
    // that arrives whole.
    let mut searched = 0;
    let mut heard = false;
    let (status, headers, version) = loop {
        if head_may_end(&buf, &mut searched) {
            if let Some((status, headers, version, len)) = parse_head(&buf)? {
                buf.advance(len);
                searched = 0;
                if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
                    continue;
                }
                break (status, headers, version);
            }
        }
        if buf.len() > MAX_HEAD {
            return Err(UpstreamError::Malformed("response head too long").into());
        }
        buf.reserve(8 << 10);
        match rd.read_buf(&mut buf).await {
            Ok(n) if n > 0 => heard = true,
            // Nothing at all came back on a kept connection: it was closed under the request.
            _ if again && !heard => {
                if let Some(req) = req {
                    return Err(Failure::Again(Box::new(req), home));
                }
                return Err(UpstreamError::Truncated.into());
            }
            // No answer at all: the failed write, if there was one, says why.
            Ok(_) => {
                return Err(unsent
                    .map_or(UpstreamError::Truncated, UpstreamError::Io)
                    .into())
            }
            Err(e) => return Err(unsent.unwrap_or(e).into()),
        }
    };
    let mut response = Response::new(UpBody::empty());
    *response.status_mut() = status;

    if status == StatusCode::SWITCHING_PROTOCOLS {
        *response.headers_mut() = headers;
        if !asks_upgrade {
            return Err(UpstreamError::Malformed("101 to a request without Upgrade").into());
        }
        if !asks_websocket(response.headers()) {
            return Err(UpstreamError::Malformed("101 to a protocol other than WebSocket").into());
        }
        strip_hop_by_hop(response.headers_mut(), true);
        let wr = match (unsent, writer.finish(true).await) {
            (None, Some(wr)) => wr,
            (Some(e), _) => return Err(UpstreamError::Io(e).into()),
            (None, None) => return Err(UpstreamError::Truncated.into()),
        };
        return Ok(Reply {
            response,
            tunnel: Some((rd.unsplit(wr), buf.freeze())),
        });
    }

    keep &= version == 1 && !has_token(&headers, &header::CONNECTION, "close");
    let mut headers = headers;
    // The upstream's hop ends here: its `Connection: close` closes this connection, not the
    // guest's.
    strip_hop_by_hop(&mut headers, false);
    let framing = response_framing(head_only, status, &headers)?;
    if headers.contains_key(header::TRANSFER_ENCODING)
        && headers.remove(header::CONTENT_LENGTH).is_some()
    {
        // Transfer-Encoding wins and the length goes (RFC 9112 §6.3); a server that sends both
        // may be framing its messages for someone else, so its connection is not reused.
        keep = false;
    }
    *response.headers_mut() = headers;
    let mut body = Decoder::new(framing);
    let mut frames = VecDeque::new();
    let mut ended = body.drain(&mut buf, &mut frames)?;
    // A short Content-Length body is waited for here rather than handed to a task.
    if let Framing::Length(left) = body.framing {
        if left <= INLINE {
            while !ended {
                buf.reserve(left as usize);
                if rd.read_buf(&mut buf).await? == 0 {
                    return Err(UpstreamError::Truncated.into());
                }
                ended = body.drain(&mut buf, &mut frames)?;
            }
        }
    }
    let conn = Parts {
        rd,
        writer,
        buf,
        keep,
    };
    if ended {
        conn.finish(&body, home).await;
        *response.body_mut() = UpBody::Ready(frames);
    } else {
        let hint = match body.framing {
            Framing::Length(left) => Some(left + frames.iter().map(data_len).sum::<u64>()),
            _ => None,
        };
        let (tx, rx) = mpsc::channel(AHEAD);
        tokio::spawn(pump(conn, body, frames, tx, home));
        *response.body_mut() = UpBody::Stream(rx, hint);
    }
    Ok(Reply {
        response,
        tunnel: None,
    })
}

fn data_len(f: &Frame<Bytes>) -> u64 {
    f.data_ref().map(|d| d.len() as u64).unwrap_or(0)
}

/// The request's write half: idle (the body went with the head), or with the task still
/// sending the body (it says whether all of it went). A task left behind is stopped.
struct Writer {
    idle: Option<WriteHalf<BoxIo>>,
    busy: Option<JoinHandle<(WriteHalf<BoxIo>, bool)>>,
}

impl Writer {
    /// The write half back, when the request went out whole and the connection is to be
    /// reused. The response has ended, so a body still being written is either in its last
    /// step or one the upstream answered without reading it all; after [`SETTLE`] it is the
    /// second, cut off, and its connection is not reused. Waited for in place, so a caller
    /// that goes away meanwhile still stops the task (on drop).
    async fn finish(mut self, reusable: bool) -> Option<WriteHalf<BoxIo>> {
        if let Some(wr) = self.idle.take() {
            return reusable.then_some(wr);
        }
        let task = self.busy.as_mut().filter(|_| reusable)?;
        match tokio::time::timeout(SETTLE, task).await {
            Ok(Ok((wr, true))) => {
                self.busy = None;
                Some(wr)
            }
            _ => None,
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Some(task) = self.busy.take() {
            task.abort();
        }
    }
}

/// A connection in the middle of an exchange, once its response head was read.
struct Parts {
    rd: ReadHalf<BoxIo>,
    writer: Writer,
    buf: BytesMut,
    /// The request went out whole, the upstream did not ask to close, and it answered in
    /// HTTP/1.1.
    keep: bool,
}

impl Parts {
    /// The response has ended: back to the pool if it can carry another request.
    async fn finish(self, body: &Decoder, home: Home) {
        let reusable = self.keep && body.framing != Framing::Close && self.buf.is_empty();
        if let Some(wr) = self.writer.finish(reusable).await {
            home.keep(Upstream {
                rd: self.rd,
                wr,
                buf: self.buf,
            });
        }
    }
}

/// Read the rest of a response body ahead of the guest, a piece at a time. The connection goes
/// back to the pool before the body's last piece goes to the guest (hyper's server may end the
/// exchange on the last byte of a known length, and the guest's next request should find it),
/// and is closed as soon as the guest stops wanting the body, even while the upstream is quiet.
async fn pump(
    mut conn: Parts,
    mut body: Decoder,
    mut frames: VecDeque<Frame<Bytes>>,
    tx: mpsc::Sender<Result<Frame<Bytes>, UpstreamError>>,
    home: Home,
) {
    loop {
        while let Some(f) = frames.pop_front() {
            if tx.send(Ok(f)).await.is_err() {
                return; // the guest went away: the connection is dropped mid-body
            }
        }
        if conn.buf.capacity() - conn.buf.len() < READ_ROOM {
            conn.buf.reserve(4 * READ_ROOM);
        }
        let read = tokio::select! {
            biased;
            r = conn.rd.read_buf(&mut conn.buf) => r,
            _ = tx.closed() => return,
        };
        let ended = match read.and_then(|n| gather(&mut conn, n)) {
            Ok(0) => body.at_close(),
            Ok(_) => body.drain(&mut conn.buf, &mut frames),
            Err(e) => Err(e.into()),
        };
        match ended {
            Ok(false) => {}
            Ok(true) => {
                conn.finish(&body, home).await;
                for f in frames {
                    if tx.send(Ok(f)).await.is_err() {
                        return;
                    }
                }
                return;
            }
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        }
    }
}

/// After a read of `n` bytes, take in what else is ready at once, up to [`GATHER`] bytes: a read
/// brings one TLS record (16 KiB), and each piece handed to the guest's side costs a hand-over
/// and a pass through hyper and TLS there. Returns `n` (0 for the end), or the error that cut
/// the body. The end, found here, is seen again by the next read.
fn gather(conn: &mut Parts, n: usize) -> io::Result<usize> {
    if n == 0 {
        return Ok(0);
    }
    while conn.buf.len() < GATHER && conn.buf.capacity() > conn.buf.len() {
        match conn.rd.read_buf(&mut conn.buf).now_or_never() {
            Some(Ok(more)) if more > 0 => {}
            Some(Err(e)) => return Err(e),
            // Nothing ready now (the next read proper waits for it), or the end.
            _ => break,
        }
    }
    Ok(n)
}

/// How the request body travels upstream.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Sent {
    /// No body.
    None,
    /// As it is, under the guest's `Content-Length`.
    Raw,
    /// Chunked (the guest's own `Transfer-Encoding`, or one added for an HTTP/2 body of
    /// unknown length).
    Chunked,
    /// Chunked, with the header added.
    AddChunked,
    /// No body, and `content-length: 0` added: an HTTP/2 guest's empty POST, PUT or PATCH
    /// (servers may refuse those without a length).
    AddZeroLength,
}

fn request_framing(method: &Method, headers: &HeaderMap, body: &Incoming) -> Sent {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        // hyper's server accepts a request's Transfer-Encoding only when it ends in chunked,
        // and has decoded it: it is encoded again.
        Sent::Chunked
    } else if headers.contains_key(header::CONTENT_LENGTH) {
        Sent::Raw
    } else if body.is_end_stream() {
        match *method {
            Method::POST | Method::PUT | Method::PATCH => Sent::AddZeroLength,
            _ => Sent::None,
        }
    } else if matches!(
        *method,
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE
    ) {
        // An HTTP/2 guest's body of unknown length on a method that has none in practice is
        // not passed on, as hyper's client did not (servers may refuse it chunked).
        Sent::None
    } else {
        Sent::AddChunked
    }
}

/// The request line and fields as they go upstream. The proxy has already removed the
/// fields of the guest's hop ([`strip_hop_by_hop`]); here the framing fields are written
/// afresh, and a cookie sent as several fields (as HTTP/2 clients do) leaves as one, the only
/// form HTTP/1.1 allows (RFC 9113 §8.2.3).
fn write_head(out: &mut Vec<u8>, parts: &hyper::http::request::Parts, framing: Sent) {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let chunked = matches!(framing, Sent::Chunked | Sent::AddChunked);
    let put = |out: &mut Vec<u8>, name: &[u8], value: &[u8]| {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    };
    for (name, value) in &parts.headers {
        if name == header::TRANSFER_ENCODING || name == header::COOKIE {
            continue; // written below
        }
        if chunked && name == header::CONTENT_LENGTH {
            continue; // the chunks carry the length (hyper's server already drops it)
        }
        put(out, name.as_str().as_bytes(), value.as_bytes());
    }
    let cookies: Vec<&[u8]> = parts
        .headers
        .get_all(header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    if !cookies.is_empty() {
        put(out, b"cookie", &cookies.join(&b"; "[..]));
    }
    match framing {
        // The guest's codings stay, in order; hyper's server has undone the chunking (however
        // often it was named), which is done again here, once and last.
        Sent::Chunked | Sent::AddChunked => {
            let mut codings: Vec<&[u8]> = parts
                .headers
                .get_all(header::TRANSFER_ENCODING)
                .iter()
                .flat_map(|v| v.as_bytes().split(|&b| b == b','))
                .map(<[u8]>::trim_ascii)
                .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case(b"chunked"))
                .collect();
            codings.push(b"chunked");
            put(out, b"transfer-encoding", &codings.join(&b", "[..]));
        }
        Sent::AddZeroLength => put(out, b"content-length", b"0"),
        Sent::None | Sent::Raw => {}
    }
    out.extend_from_slice(b"\r\n");
}

/// Fields that concern one connection, not the message (RFC 9110 §7.6.1), besides those a
/// `Connection` field names: a proxy does not pass them on. `HTTP2-Settings` belongs to an
/// upgrade to cleartext HTTP/2 (RFC 7540 §3.2.1). `Transfer-Encoding` is one too, but it frames
/// the message: each direction's framing code deals with it.
const HOP_BY_HOP: [HeaderName; 5] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    HeaderName::from_static("http2-settings"),
];

/// Fields a `Connection` field may name but that stay: they frame the message or name its
/// host.
const KEPT: [HeaderName; 3] = [
    header::TRANSFER_ENCODING,
    header::CONTENT_LENGTH,
    header::HOST,
];

/// Remove the fields of one hop: [`HOP_BY_HOP`], those `Connection` names (never the framing
/// fields or `Host`, whatever it says) and `Upgrade`, except for a WebSocket handshake
/// (`websocket`), which keeps its `Upgrade` and gets `Connection: upgrade`.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap, websocket: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(&HOP_BY_HOP) {
        if !(KEPT.contains(name) || websocket && name == header::UPGRADE) {
            headers.remove(name);
        }
    }
    if websocket {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Whether `headers` offer (or, in a 101, accept) a switch to WebSocket and nothing else. It is
/// the one protocol the proxy lets a connection switch to: after a switch it relays bytes it
/// can no longer judge request by request, and a WebSocket's messages are not requests, where
/// cleartext HTTP/2's (`h2c`) would be, out of the policy's sight.
pub(super) fn asks_websocket(headers: &HeaderMap) -> bool {
    let mut any = false;
    for value in headers.get_all(header::UPGRADE) {
        let Ok(text) = value.to_str() else {
            return false;
        };
        for p in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if !p.eq_ignore_ascii_case("websocket") {
                return false;
            }
            any = true;
        }
    }
    any
}

fn put_data(out: &mut Vec<u8>, d: &[u8], framing: Sent) {
    if d.is_empty() {
        return;
    }
    match framing {
        Sent::Chunked | Sent::AddChunked => {
            out.extend_from_slice(format!("{:x}\r\n", d.len()).as_bytes());
            out.extend_from_slice(d);
            out.extend_from_slice(b"\r\n");
        }
        Sent::Raw | Sent::None | Sent::AddZeroLength => out.extend_from_slice(d),
    }
}

/// Write the head, then the body as it comes (flushed piece by piece, so a slow upload moves).
async fn send_body(
    wr: &mut WriteHalf<BoxIo>,
    head: Vec<u8>,
    mut body: Incoming,
    framing: Sent,
    bytes_up: &AtomicU64,
) -> Result<(), UpstreamError> {
    wr.write_all(&head).await?;
    wr.flush().await?;
    let chunked = matches!(framing, Sent::Chunked | Sent::AddChunked);
    let mut piece = Vec::new();
    while let Some(f) = body.frame().await {
        let Ok(d) = f.map_err(UpstreamError::Guest)?.into_data() else {
            continue; // trailers of a request are not passed on
        };
        bytes_up.fetch_add(d.len() as u64, Ordering::Relaxed);
        if chunked {
            piece.clear();
            put_data(&mut piece, &d, framing);
            wr.write_all(&piece).await?;
        } else {
            wr.write_all(&d).await?;
        }
        wr.flush().await?;
    }
    if chunked {
        wr.write_all(b"0\r\n\r\n").await?;
    }
    wr.flush().await?;
    Ok(())
}

type Head = (StatusCode, HeaderMap, u8, usize);

/// A whole response head at the start of `buf`: its status, fields, minor version and length.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, UpstreamError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut r = httparse::Response::new(&mut fields);
    let len = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(UpstreamError::Malformed("too many header fields"))
        }
        Err(_) => return Err(UpstreamError::Malformed("unreadable response head")),
    };
    let status = r
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(UpstreamError::Malformed("bad status code"))?;
    let headers = header_map(r.headers)?;
    Ok(Some((status, headers, r.version.unwrap_or(1), len)))
}

fn header_map(fields: &[httparse::Header<'_>]) -> Result<HeaderMap, UpstreamError> {
    let mut map = HeaderMap::with_capacity(fields.len());
    for f in fields {
        let name = HeaderName::from_bytes(f.name.as_bytes())
            .map_err(|_| UpstreamError::Malformed("bad header name"))?;
        let value = HeaderValue::from_bytes(f.value)
            .map_err(|_| UpstreamError::Malformed("bad header value"))?;
        map.append(name, value);
    }
    Ok(map)
}

/// Whether the comma-separated values of `name` include `token` (case-insensitive).
pub(super) fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// How a response's body is delimited (RFC 9112 §6.3).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Framing {
    /// This many bytes are still to come.
    Length(u64),
    Chunked(Chunk),
    /// Until the upstream closes the connection.
    Close,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Chunk {
    /// A chunk-size line is next.
    Size,
    /// This many bytes of the current chunk are still to come.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// The trailer section after the last chunk.
    Trailers,
    Done,
}

fn response_framing(
    head_only: bool,
    status: StatusCode,
    headers: &HeaderMap,
) -> Result<Framing, UpstreamError> {
    if head_only
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Length(0));
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        // Any Content-Length beside it is ignored (and removed before the guest sees it).
        let mut last = None;
        for value in headers.get_all(header::TRANSFER_ENCODING) {
            let text = value
                .to_str()
                .map_err(|_| UpstreamError::Malformed("bad Transfer-Encoding"))?;
            if let Some(t) = text.split(',').map(str::trim).rfind(|t| !t.is_empty()) {
                last = Some(t);
            }
        }
        return Ok(match last {
            Some(t) if t.eq_ignore_ascii_case("chunked") => Framing::Chunked(Chunk::Size),
            _ => Framing::Close,
        });
    }
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH).iter() {
        let text = value
            .to_str()
            .map_err(|_| UpstreamError::Malformed("bad Content-Length"))?;
        for part in text.split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(UpstreamError::Malformed("bad Content-Length"));
            }
            let n: u64 = part
                .parse()
                .map_err(|_| UpstreamError::Malformed("bad Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(UpstreamError::Malformed("differing Content-Lengths"));
            }
            length = Some(n);
        }
    }
    Ok(length.map(Framing::Length).unwrap_or(Framing::Close))
}

/// Turns the bytes of a response body, as they arrive, into frames for the guest.
struct Decoder {
    framing: Framing,
    /// How far a trailer section has been searched for its end.
    searched: usize,
}

impl Decoder {
    fn new(framing: Framing) -> Decoder {
        Decoder {
            framing,
            searched: 0,
        }
    }

    /// Take what `buf` holds of the body into `out`; whether the body has ended.
    fn drain(
        &mut self,
        buf: &mut BytesMut,
        out: &mut VecDeque<Frame<Bytes>>,
    ) -> Result<bool, UpstreamError> {
        loop {
            match self.framing {
                Framing::Length(0) => return Ok(true),
                Framing::Length(left) => {
                    if buf.is_empty() {
                        return Ok(false);
                    }
                    let n = (left as usize).min(buf.len());
                    out.push_back(Frame::data(buf.split_to(n).freeze()));
                    self.framing = Framing::Length(left - n as u64);
                }
                Framing::Close => {
                    if !buf.is_empty() {
                        out.push_back(Frame::data(buf.split().freeze()));
                    }
                    return Ok(false);
                }
                Framing::Chunked(state) => match chunk_step(state, buf, out, &mut self.searched)? {
                    Some(Chunk::Done) => {
                        self.framing = Framing::Chunked(Chunk::Done);
                        return Ok(true);
                    }
                    Some(next) => self.framing = Framing::Chunked(next),
                    None => return Ok(false),
                },
            }
        }
    }

    /// The upstream closed the connection: the end of a read-to-close body, else a cut one.
    fn at_close(&self) -> Result<bool, UpstreamError> {
        match self.framing {
            Framing::Close | Framing::Length(0) | Framing::Chunked(Chunk::Done) => Ok(true),
            _ => Err(UpstreamError::Truncated),
        }
    }
}

/// One step of chunked decoding from `state`: the next state, or `None` when `buf` needs more.
fn chunk_step(
    state: Chunk,
    buf: &mut BytesMut,
    out: &mut VecDeque<Frame<Bytes>>,
    searched: &mut usize,
) -> Result<Option<Chunk>, UpstreamError> {
    Ok(Some(match state {
        Chunk::Done => Chunk::Done,
        Chunk::Size => {
            let Some(end) = find_crlf(buf) else {
                return if buf.len() > MAX_CHUNK_LINE {
                    Err(UpstreamError::Malformed("chunk-size line too long"))
                } else {
                    Ok(None)
                };
            };
            let size = chunk_size(&buf[..end])?;
            buf.advance(end + 2);
            if size == 0 {
                Chunk::Trailers
            } else {
                Chunk::Data(size)
            }
        }
        Chunk::Data(left) => {
            if buf.is_empty() {
                return Ok(None);
            }
            let n = (left as usize).min(buf.len());
            out.push_back(Frame::data(buf.split_to(n).freeze()));
            match left - n as u64 {
                0 => Chunk::DataEnd,
                rest => Chunk::Data(rest),
            }
        }
        Chunk::DataEnd => {
            if buf.len() < 2 {
                return Ok(None);
            }
            if &buf[..2] != b"\r\n" {
                return Err(UpstreamError::Malformed("chunk data longer than its size"));
            }
            buf.advance(2);
            Chunk::Size
        }
        Chunk::Trailers => {
            if buf.starts_with(b"\r\n") || buf.starts_with(b"\n") {
                buf.advance(if buf[0] == b'\r' { 2 } else { 1 });
                return Ok(Some(Chunk::Done));
            }
            if !head_may_end(buf, searched) {
                return if buf.len() > MAX_HEAD {
                    Err(UpstreamError::Malformed("unreadable trailers"))
                } else {
                    Ok(None)
                };
            }
            let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
            match httparse::parse_headers(buf, &mut fields) {
                Ok(httparse::Status::Complete((n, fields))) => {
                    let trailers = header_map(fields)?;
                    buf.advance(n);
                    out.push_back(Frame::trailers(trailers));
                    Chunk::Done
                }
                Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => return Ok(None),
                _ => return Err(UpstreamError::Malformed("unreadable trailers")),
            }
        }
    }))
}

/// Whether `buf` may hold the end of a head or trailer section (an empty line, CRLF or bare
/// LF), looking only at what arrived since the last look (`searched`, kept by the caller).
fn head_may_end(buf: &[u8], searched: &mut usize) -> bool {
    let from = searched.saturating_sub(2).min(buf.len());
    *searched = buf.len();
    buf[from..].windows(2).any(|w| w == b"\n\n" || w == b"\n\r")
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// The size in a chunk-size line (hex digits, then optional whitespace and extensions).
fn chunk_size(line: &[u8]) -> Result<u64, UpstreamError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let rest = &line[digits..];
    let rest_ok = rest
        .iter()
        .position(|&b| b == b';')
        .map(|i| &rest[..i])
        .unwrap_or(rest)
        .iter()
        .all(|&b| b == b' ' || b == b'\t');
    if digits == 0 || digits > 16 || !rest_ok {
        return Err(UpstreamError::Malformed("bad chunk size"));
    }
    let text = std::str::from_utf8(&line[..digits]).expect("hex digits are ASCII");
    u64::from_str_radix(text, 16).map_err(|_| UpstreamError::Malformed("bad chunk size"))
}

/// A response body from the upstream: whole (read with its head) or still arriving from
/// [`pump`], with the exact length still to come when it is known.
pub(super) enum UpBody {
    Ready(VecDeque<Frame<Bytes>>),
    Stream(
        mpsc::Receiver<Result<Frame<Bytes>, UpstreamError>>,
        Option<u64>,
    ),
}

impl UpBody {
    fn empty() -> UpBody {
        UpBody::Ready(VecDeque::new())
    }
}

impl hyper::body::Body for UpBody {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        match self.get_mut() {
            UpBody::Ready(frames) => Poll::Ready(frames.pop_front().map(Ok)),
            UpBody::Stream(rx, left) => {
                let r = rx.poll_recv(cx);
                if let (Poll::Ready(Some(Ok(f))), Some(n)) = (&r, left.as_mut()) {
                    *n = n.saturating_sub(data_len(f));
                }
                r
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, UpBody::Ready(frames) if frames.is_empty())
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Ready(frames) => SizeHint::with_exact(frames.iter().map(data_len).sum()),
            UpBody::Stream(_, Some(n)) => SizeHint::with_exact(*n),
            UpBody::Stream(_, None) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn framing(pairs: &[(&str, &str)]) -> Result<Framing, UpstreamError> {
        response_framing(false, StatusCode::OK, &headers(pairs))
    }

    /// Feed `wire` to a decoder in pieces of `step` bytes; the body's bytes and trailers.
    fn decode(f: Framing, wire: &[u8], step: usize) -> (Vec<u8>, Option<HeaderMap>, bool) {
        let mut d = Decoder::new(f);
        let (mut buf, mut out) = (BytesMut::new(), VecDeque::new());
        let mut ended = false;
        for piece in wire.chunks(step) {
            buf.extend_from_slice(piece);
            ended = d.drain(&mut buf, &mut out).unwrap();
        }
        let mut body = Vec::new();
        let mut trailers = None;
        for fr in out {
            match fr.into_data() {
                Ok(b) => body.extend_from_slice(&b),
                Err(fr) => trailers = fr.into_trailers().ok(),
            }
        }
        (body, trailers, ended && buf.is_empty())
    }

    #[test]
    fn framing_follows_rfc_9112() {
        assert_eq!(
            framing(&[("content-length", "12")]).unwrap(),
            Framing::Length(12)
        );
        assert_eq!(
            framing(&[("content-length", "5, 5"), ("content-length", "5")]).unwrap(),
            Framing::Length(5)
        );
        assert_eq!(
            framing(&[("transfer-encoding", "gzip, chunked")]).unwrap(),
            Framing::Chunked(Chunk::Size)
        );
        assert_eq!(
            framing(&[("transfer-encoding", "chunked, gzip")]).unwrap(),
            Framing::Close
        );
        assert_eq!(framing(&[]).unwrap(), Framing::Close);
        // Transfer-Encoding wins over a length beside it (which `exchange` then removes).
        assert_eq!(
            framing(&[("content-length", "3"), ("transfer-encoding", "chunked")]).unwrap(),
            Framing::Chunked(Chunk::Size)
        );
        for (status, head_only) in [(204, false), (304, false), (200, true)] {
            let f = response_framing(
                head_only,
                StatusCode::from_u16(status).unwrap(),
                &headers(&[("content-length", "99")]),
            );
            assert_eq!(
                f.unwrap(),
                Framing::Length(0),
                "{status} head-only {head_only}"
            );
        }
    }

    #[test]
    fn conflicting_framing_is_refused() {
        for bad in [
            vec![("content-length", "3"), ("content-length", "4")],
            vec![("content-length", "3, 4")],
            vec![("content-length", "+3")],
            vec![("content-length", "0x10")],
            vec![("content-length", "")],
        ] {
            assert!(
                matches!(framing(&bad), Err(UpstreamError::Malformed(_))),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn chunked_bodies_decode_in_any_pieces() {
        let wire =
            b"5;name=v\r\nhello\r\n1A \r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-sum: 9\r\n\r\n";
        for step in [1, 2, 3, 7, wire.len()] {
            let (body, trailers, ended) = decode(Framing::Chunked(Chunk::Size), wire, step);
            assert_eq!(body, b"helloabcdefghijklmnopqrstuvwxyz", "step {step}");
            assert_eq!(trailers.unwrap()["x-sum"], "9", "step {step}");
            assert!(ended, "step {step}");
        }
        let (body, trailers, ended) =
            decode(Framing::Chunked(Chunk::Size), b"3\r\nabc\r\n0\r\n\r\n", 1);
        assert_eq!(
            (body, trailers.is_none(), ended),
            (b"abc".to_vec(), true, true)
        );
    }

    #[test]
    fn bad_chunks_are_refused() {
        for wire in [
            &b"zz\r\nab\r\n"[..],
            b"3\r\nabcd\r\n",
            b"-1\r\n",
            b"11111111111111111\r\n",
            b"3 x\r\nabc\r\n",
        ] {
            let mut d = Decoder::new(Framing::Chunked(Chunk::Size));
            let mut buf = BytesMut::from(wire);
            let r = d.drain(&mut buf, &mut VecDeque::new());
            assert!(
                r.is_err(),
                "{:?} was accepted",
                String::from_utf8_lossy(wire)
            );
        }
        let mut d = Decoder::new(Framing::Chunked(Chunk::Size));
        let mut buf = BytesMut::from(&[b'1'; MAX_CHUNK_LINE + 1][..]);
        assert!(d.drain(&mut buf, &mut VecDeque::new()).is_err());
    }

    #[test]
    fn a_length_body_stops_at_its_length() {
        let mut d = Decoder::new(Framing::Length(4));
        let mut buf = BytesMut::from(&b"abcdEXTRA"[..]);
        let mut out = VecDeque::new();
        assert!(d.drain(&mut buf, &mut out).unwrap());
        assert_eq!(out.pop_front().unwrap().into_data().unwrap(), "abcd");
        assert_eq!(&buf[..], b"EXTRA");
        // A cut body is an error, the end of a read-to-close one is not.
        assert!(Decoder::new(Framing::Length(1)).at_close().is_err());
        assert!(Decoder::new(Framing::Close).at_close().unwrap());
    }

    #[test]
    fn heads_parse_and_interim_ones_are_seen() {
        let (status, h, version, len) =
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-A: 1\r\nX-A: 2\r\n\r\nok")
                .unwrap()
                .unwrap();
        assert_eq!((status.as_u16(), version, len), (200, 1, 54));
        assert_eq!(h.get_all("x-a").iter().count(), 2);
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Le")
            .unwrap()
            .is_none());
        assert!(parse_head(b"HTTP/1.1 abc\r\n\r\n").is_err());
        let (status, ..) = parse_head(b"HTTP/1.1 100 Continue\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(status.is_informational());
    }

    #[test]
    fn a_trickling_head_is_parsed_once_it_has_ended() {
        let wire = b"HTTP/1.1 200 OK\r\nA: b\r\nC: d\r\n\r\n";
        let (mut buf, mut searched, mut tries) = (Vec::new(), 0, 0);
        for &byte in wire {
            buf.push(byte);
            if head_may_end(&buf, &mut searched) {
                tries += 1;
                if parse_head(&buf).unwrap().is_some() {
                    break;
                }
            }
        }
        assert_eq!(buf.len(), wire.len(), "parsed only when whole");
        assert!(
            tries <= 2,
            "{tries} parses of a head that came a byte at a time"
        );
        // Bare line feeds end a head too.
        let mut searched = 0;
        assert!(head_may_end(b"HTTP/1.1 200 OK\nA: b\n\n", &mut searched));
    }

    fn head_of(pairs: &[(&str, &str)], framing: Sent) -> String {
        let mut req = Request::post("/up").body(()).unwrap();
        *req.headers_mut() = headers(pairs);
        let mut out = Vec::new();
        write_head(&mut out, &req.into_parts().0, framing);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_request_head_is_framed_once() {
        // chunked named twice (hyper's server decodes once): one chunked goes up, last, after
        // the guest's other codings; a length beside it goes.
        let head = head_of(
            &[
                ("transfer-encoding", "gzip, chunked"),
                ("transfer-encoding", "chunked"),
                ("content-length", "5"),
                ("host", "up.example"),
            ],
            Sent::Chunked,
        );
        assert_eq!(
            head,
            "POST /up HTTP/1.1\r\nhost: up.example\r\ntransfer-encoding: gzip, chunked\r\n\r\n"
        );
        let head = head_of(&[("cookie", "a=1"), ("cookie", "b=2")], Sent::AddChunked);
        assert_eq!(
            head,
            "POST /up HTTP/1.1\r\ncookie: a=1; b=2\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        let head = head_of(&[("content-length", "5")], Sent::Raw);
        assert_eq!(head, "POST /up HTTP/1.1\r\ncontent-length: 5\r\n\r\n");
    }

    #[test]
    fn hop_fields_go_but_framing_stays() {
        let mut h = headers(&[
            (
                "connection",
                "close, content-length, host, transfer-encoding, x-a",
            ),
            ("x-a", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMA"),
            ("content-length", "3"),
            ("host", "up.example"),
            ("x-b", "2"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-length", "host", "x-b"]);

        let mut ws = headers(&[
            ("connection", "Upgrade, keep-alive"),
            ("upgrade", "WebSocket"),
            ("keep-alive", "1"),
        ]);
        strip_hop_by_hop(&mut ws, true);
        assert_eq!(ws["connection"], "upgrade");
        assert_eq!(ws["upgrade"], "WebSocket");
        assert!(!ws.contains_key("keep-alive"));
    }

    #[test]
    fn only_websocket_alone_is_an_upgrade() {
        let asks = |v: &[&str]| {
            let pairs: Vec<(&str, &str)> = v.iter().map(|v| ("upgrade", *v)).collect();
            asks_websocket(&headers(&pairs))
        };
        assert!(asks(&["websocket"]));
        assert!(asks(&["WebSocket"]));
        assert!(asks(&["websocket", " websocket "]));
        assert!(!asks(&[]));
        assert!(!asks(&["h2c"]));
        assert!(!asks(&["websocket, h2c"]));
        assert!(!asks(&["websocket", "TLS/1.2"]));
        let mut h = HeaderMap::new();
        h.insert(
            header::UPGRADE,
            HeaderValue::from_bytes(b"websocket\xff").unwrap(),
        );
        assert!(!asks_websocket(&h));
    }

    #[test]
    fn an_unreadable_transfer_coding_is_refused() {
        let mut h = headers(&[("transfer-encoding", "chunked")]);
        h.append(
            header::TRANSFER_ENCODING,
            HeaderValue::from_bytes(b"\x80gzip").unwrap(),
        );
        assert!(matches!(
            response_framing(false, StatusCode::OK, &h),
            Err(UpstreamError::Malformed(_))
        ));
    }

    #[test]
    fn connection_tokens() {
        let h = headers(&[("connection", "keep-alive, Close")]);
        assert!(has_token(&h, &header::CONNECTION, "close"));
        assert!(!has_token(
            &headers(&[("connection", "closed")]),
            &header::CONNECTION,
            "close"
        ));
    }
}
