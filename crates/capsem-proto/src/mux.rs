//! Stream multiplexer over the channel: a yamux session driven by one task.
//!
//! [`Mux::start`] takes the raw channel (the virtio-serial port in the guest, the QEMU chardev
//! socket on the host), buffers it both ways ([`CHANNEL_BUFFER`], writes sent once per turn of
//! the driver) and spawns the driver task,
//! which alone touches the `yamux::Connection`. Other tasks open streams through
//! [`MuxHandle::open`] and receive the peer's streams on the inbound queue. Streams come back as
//! tokio `AsyncRead + AsyncWrite` with their [`StreamOpen`] header already written (outbound) or
//! read (inbound).

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

use crate::frame::{self, FrameError};
use crate::StreamOpen;

/// The largest data frame a stream sends. yamux's default (16 KiB) cuts every full TLS record
/// (16 KiB of plaintext plus 22 bytes) into two frames; 64 KiB carries a record, or a batch of
/// them, in one, and keeps a frame short enough (well under a millisecond on the channel)
/// that it does not hold up the other streams.
pub const SPLIT_SEND_SIZE: usize = 64 * 1024;

/// Read and write buffers between yamux and the channel: a whole frame (header and the
/// largest body) fits. yamux reads each frame's 12-byte header and its body with separate
/// reads and writes them with separate writes, flushing after each frame. Unbuffered, each is
/// a system call on QEMU's chardev socket, and in the guest each write is a virtqueue kick (a
/// VM exit, then a chardev write on the host). Buffered, a frame leaves in one write (in the
/// guest, one per 32 KiB: the virtio console takes no more at once), and on the host one read
/// brings in every frame the socket holds (the guest's console hands out one 4 KiB buffer a
/// read at most). See [`Channel`] for when the write buffer goes out.
pub const CHANNEL_BUFFER: usize = SPLIT_SEND_SIZE + 4096;

/// One multiplexed stream, usable with tokio I/O.
pub type MuxStream = Compat<yamux::Stream>;

/// Which side of the session this is (yamux numbers streams by side).
#[derive(Debug, Clone, Copy)]
pub enum Side {
    Host,
    Guest,
}

#[derive(Debug, thiserror::Error)]
pub enum MuxError {
    #[error("the channel to the guest is closed")]
    Closed,
    #[error("opening a stream failed")]
    Open(#[source] yamux::ConnectionError),
    #[error("stream header exchange failed")]
    Header(#[source] FrameError),
}

type OpenReply = oneshot::Sender<Result<yamux::Stream, MuxError>>;

/// Cloneable handle for opening streams.
#[derive(Clone)]
pub struct MuxHandle {
    open_tx: mpsc::UnboundedSender<OpenReply>,
}

/// A stream the peer opened, with the port it asked for.
pub struct Inbound {
    pub port: u16,
    pub stream: MuxStream,
}

pub struct Mux;

impl Mux {
    /// Start the driver. Returns the open handle, the inbound queue, and a receiver that resolves
    /// when the session ends (peer closed or I/O error).
    pub fn start<T>(
        io: T,
        side: Side,
    ) -> (
        MuxHandle,
        mpsc::Receiver<yamux::Stream>,
        oneshot::Receiver<()>,
    )
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut cfg = yamux::Config::default();
        cfg.set_max_num_streams(1024);
        cfg.set_split_send_size(SPLIT_SEND_SIZE);
        let mode = match side {
            Side::Host => yamux::Mode::Client,
            Side::Guest => yamux::Mode::Server,
        };
        let io = Channel::new(io);
        let flusher = io.clone();
        let mut conn = yamux::Connection::new(io.compat(), cfg, mode);
        let (open_tx, mut open_rx) = mpsc::unbounded_channel::<OpenReply>();
        let (in_tx, in_rx) = mpsc::channel(64);
        let (done_tx, done_rx) = oneshot::channel();
        tokio::spawn(async move {
            let mut pending: VecDeque<OpenReply> = VecDeque::new();
            let mut requests_open = true;
            poll_fn(|cx| {
                // What an earlier turn gathered but could not send goes first: that turn may
                // have ended because tokio's budget ran out, not because the channel was full,
                // and this turn's reading must not keep it waiting.
                if let Poll::Ready(Err(e)) = flusher.poll_send(cx) {
                    tracing::debug!(error = %e, "mux channel write failed");
                    return Poll::Ready(());
                }
                while requests_open {
                    match open_rx.poll_recv(cx) {
                        Poll::Ready(Some(reply)) => pending.push_back(reply),
                        Poll::Ready(None) => requests_open = false,
                        Poll::Pending => break,
                    }
                }
                while !pending.is_empty() {
                    match conn.poll_new_outbound(cx) {
                        Poll::Ready(res) => {
                            let reply = pending.pop_front().expect("checked non-empty");
                            let _ = reply.send(res.map_err(MuxError::Open));
                        }
                        Poll::Pending => break,
                    }
                }
                loop {
                    match conn.poll_next_inbound(cx) {
                        Poll::Ready(Some(Ok(stream))) => {
                            if in_tx.try_send(stream).is_err() {
                                tracing::warn!("inbound stream queue full; dropping a stream");
                            }
                        }
                        // The session is over; what the turn gathered (a GoAway, say) still
                        // gets one try.
                        Poll::Ready(Some(Err(e))) => {
                            tracing::debug!(error = %e, "mux session ended with an error");
                            let _ = flusher.poll_send(cx);
                            return Poll::Ready(());
                        }
                        Poll::Ready(None) => {
                            let _ = flusher.poll_send(cx);
                            return Poll::Ready(());
                        }
                        // Nothing more to do this turn: what the turn wrote leaves now, in
                        // one write. Pending here means the channel is full; its readiness
                        // wakes this task again.
                        Poll::Pending => {
                            return match flusher.poll_send(cx) {
                                Poll::Ready(Err(e)) => {
                                    tracing::debug!(error = %e, "mux channel write failed");
                                    Poll::Ready(())
                                }
                                _ => Poll::Pending,
                            };
                        }
                    }
                }
            })
            .await;
            for reply in pending.drain(..) {
                let _ = reply.send(Err(MuxError::Closed));
            }
            let _ = done_tx.send(());
        });
        (MuxHandle { open_tx }, in_rx, done_rx)
    }
}

/// The channel under yamux: reads buffered, writes gathered for a whole turn of the driver.
///
/// yamux flushes after every frame. Here that flush only marks the frame as written; the
/// driver sends what its turn gathered once yamux has nothing more to do ([`Channel::poll_send`]),
/// so frames of several streams that are ready together cross in one write (one system call
/// on the host's chardev socket, one virtqueue kick in the guest) and wake the peer once.
/// Nothing waits for data that may never come: the driver sends at the end of every turn and,
/// if that could not finish, first thing in the next.
struct Channel<T> {
    /// tokio's buffered stream does the buffering both ways; only its flush is taken from
    /// yamux and given to the driver.
    io: Arc<Mutex<tokio::io::BufStream<T>>>,
}

impl<T> Clone for Channel<T> {
    fn clone(&self) -> Self {
        Channel {
            io: self.io.clone(),
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> Channel<T> {
    fn new(io: T) -> Self {
        let io = tokio::io::BufStream::with_capacity(CHANNEL_BUFFER, CHANNEL_BUFFER, io);
        Channel {
            io: Arc::new(Mutex::new(io)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, tokio::io::BufStream<T>> {
        // Only the driver task touches the channel; a poisoned lock still holds valid bytes.
        self.io.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Send everything gathered so far, then flush the channel.
    fn poll_send(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_flush(cx)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for Channel<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_read(cx, buf)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Channel<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.lock()).poll_write(cx, data)
    }

    /// yamux's flush after each frame: the frame is gathered; the driver sends the turn.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_shutdown(cx)
    }
}

impl MuxHandle {
    /// Open a stream to the peer's logical `port`.
    pub async fn open(&self, port: u16) -> Result<MuxStream, MuxError> {
        let (tx, rx) = oneshot::channel();
        self.open_tx.send(tx).map_err(|_| MuxError::Closed)?;
        let stream = rx.await.map_err(|_| MuxError::Closed)??;
        let mut stream = stream.compat();
        frame::write_frame(&mut stream, &StreamOpen { port })
            .await
            .map_err(MuxError::Header)?;
        Ok(stream)
    }
}

/// Read the [`StreamOpen`] header of a stream the peer opened.
pub async fn accept(stream: yamux::Stream) -> Result<Inbound, MuxError> {
    let mut stream = stream.compat();
    let open: StreamOpen = frame::expect_header(&mut stream, "the stream header")
        .await
        .map_err(MuxError::Header)?;
    Ok(Inbound {
        port: open.port,
        stream,
    })
}
