//! Host end of the guest channel: accept QEMU's connection to the chardev socket, run the
//! multiplexer, complete the versioned handshake, and offer typed calls (control, exec).
//! It knows the guest protocol; it knows nothing of HTTP or sessions.

use std::time::{Duration, Instant};

use capsem_proto::control::{ControlRequest, ControlResponse};
use capsem_proto::exec::{ExecEvent, ExecExit, ExecRequest};
use capsem_proto::frame::{self, FrameError};
use capsem_proto::lifecycle::{GuestReady, HostHello};
use capsem_proto::mux::{self, Mux, MuxError, MuxHandle, MuxStream, Side};
use capsem_proto::{port, PROTOCOL_VERSION};
use serde_bytes::ByteBuf;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("the VM did not connect its channel within {0:?}")]
    ConnectTimeout(Duration),
    #[error("the guest agent did not report ready within {0:?}; see `capsem logs`")]
    ReadyTimeout(Duration),
    #[error("the guest channel closed before the agent was ready; see `capsem logs`")]
    ClosedEarly,
    #[error("guest agent speaks protocol {guest}, host speaks {host}: rebuild the guest image with `capsem setup --force`")]
    VersionMismatch { guest: u32, host: u32 },
    #[error("accepting the channel connection failed")]
    Accept(#[source] std::io::Error),
    #[error(transparent)]
    Mux(#[from] MuxError),
    #[error("guest protocol error")]
    Frame(#[from] FrameError),
    #[error("the guest answered {0}")]
    Unexpected(&'static str),
    #[error("guest: {0}")]
    Guest(String),
}

/// An established channel.
pub struct GuestChannel {
    mux: MuxHandle,
    pub ready: GuestReady,
    /// Resolves when the channel ends (guest gone).
    pub closed: oneshot::Receiver<()>,
    /// Streams the guest opens after the handshake (DNS questions and relayed connections).
    pub inbound: mpsc::Receiver<yamux::Stream>,
    /// The channel's socket, to hang up on the guest (it then waits for a new host).
    pub hangup: std::os::unix::net::UnixStream,
}

/// Collected result of a non-streaming exec.
#[derive(Debug)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit: ExecExit,
    /// Output past [`EXEC_OUTPUT_LIMIT`] (per stream) was dropped.
    pub truncated: bool,
}

/// Most output [`Guest::exec`] keeps of each stream: a job that prints without end must not
/// fill the host's memory (the streaming exec has no such limit: it holds nothing).
pub const EXEC_OUTPUT_LIMIT: usize = 64 << 20;

/// Append what fits of `data` to `buf` under `limit`; false when some did not fit.
fn keep(buf: &mut Vec<u8>, data: &[u8], limit: usize) -> bool {
    let room = limit.saturating_sub(buf.len());
    buf.extend_from_slice(&data[..data.len().min(room)]);
    data.len() <= room
}

impl GuestChannel {
    /// Accept the VM's connection on `listener`, then wait for the guest's ready handshake.
    pub async fn establish(
        listener: &UnixListener,
        connect_limit: Duration,
        ready_limit: Duration,
    ) -> Result<Self, ChannelError> {
        Self::establish_from(listener, connect_limit, ready_limit, std::future::ready(())).await
    }

    /// [`establish`](Self::establish), with `ready_limit` counted from when `running` resolves
    /// rather than from the connection (a restored VM connects its channel before its saved
    /// state has even loaded).
    pub async fn establish_from(
        listener: &UnixListener,
        connect_limit: Duration,
        ready_limit: Duration,
        running: impl std::future::Future<Output = ()>,
    ) -> Result<Self, ChannelError> {
        let (io, _) = tokio::time::timeout(connect_limit, listener.accept())
            .await
            .map_err(|_| ChannelError::ConnectTimeout(connect_limit))?
            .map_err(ChannelError::Accept)?;
        // A second handle on the socket, so the host can hang up on the guest (suspend).
        let raw = io
            .into_std()
            .and_then(|s| {
                let keep = s.try_clone()?;
                Ok((s, keep))
            })
            .map_err(ChannelError::Accept)?;
        let io = tokio::net::UnixStream::from_std(raw.0).map_err(ChannelError::Accept)?;
        let hangup = raw.1;
        let (handle, mut inbound, mut closed) = Mux::start(io, Side::Host);
        let handshake = Self::handshake(&mut inbound, &mut closed, ready_limit, running).await;
        let ready = match handshake {
            Ok(r) => r,
            Err(e) => {
                // Hang up, so the guest sees its port close and waits for a fresh session.
                let _ = hangup.shutdown(std::net::Shutdown::Both);
                return Err(e);
            }
        };
        Ok(GuestChannel {
            mux: handle,
            ready,
            closed,
            inbound,
            hangup,
        })
    }

    /// Wait for the guest's lifecycle stream and its `GuestReady`, and accept it.
    async fn handshake(
        inbound: &mut mpsc::Receiver<yamux::Stream>,
        closed: &mut oneshot::Receiver<()>,
        ready_limit: Duration,
        running: impl std::future::Future<Output = ()>,
    ) -> Result<GuestReady, ChannelError> {
        let expired = async move {
            running.await;
            tokio::time::sleep(ready_limit).await
        };
        tokio::pin!(expired);
        loop {
            let stream = tokio::select! {
                s = inbound.recv() => match s {
                    None => return Err(ChannelError::ClosedEarly),
                    Some(s) => s,
                },
                _ = &mut expired => return Err(ChannelError::ReadyTimeout(ready_limit)),
                _ = &mut *closed => return Err(ChannelError::ClosedEarly),
            };
            let mut inb = mux::accept(stream).await?;
            if inb.port != port::LIFECYCLE {
                tracing::warn!(
                    port = inb.port,
                    "guest opened a stream before the handshake"
                );
                continue;
            }
            let ready: GuestReady = frame::expect_frame(&mut inb.stream, "ready").await?;
            if ready.protocol_version != PROTOCOL_VERSION {
                let reason = format!(
                    "host speaks protocol {PROTOCOL_VERSION}, guest {}",
                    ready.protocol_version
                );
                let _ = frame::write_frame(&mut inb.stream, &HostHello::Refused { reason }).await;
                return Err(ChannelError::VersionMismatch {
                    guest: ready.protocol_version,
                    host: PROTOCOL_VERSION,
                });
            }
            frame::write_frame(
                &mut inb.stream,
                &HostHello::Accepted {
                    protocol_version: PROTOCOL_VERSION,
                },
            )
            .await?;
            // Keep the lifecycle stream open for the life of the channel.
            tokio::spawn(async move {
                let mut sink = Vec::new();
                let _ = tokio::io::AsyncReadExt::read_to_end(&mut inb.stream, &mut sink).await;
            });
            return Ok(ready);
        }
    }

    pub fn handle(&self) -> Guest {
        Guest {
            mux: self.mux.clone(),
        }
    }
}

/// Cheap, cloneable access to a live channel.
#[derive(Clone)]
pub struct Guest {
    mux: MuxHandle,
}

impl Guest {
    pub async fn open(&self, port: u16) -> Result<MuxStream, ChannelError> {
        Ok(self.mux.open(port).await?)
    }

    /// One control request on its own stream.
    pub async fn control(&self, req: &ControlRequest) -> Result<ControlResponse, ChannelError> {
        let mut s = self.open(port::CONTROL).await?;
        frame::write_frame(&mut s, req).await?;
        let resp: ControlResponse = frame::expect_frame(&mut s, "the control response").await?;
        if let ControlResponse::Error { message } = resp {
            return Err(ChannelError::Guest(message));
        }
        Ok(resp)
    }

    /// Round trip of `payload` through the guest; returns the elapsed time.
    pub async fn echo(&self, payload: Vec<u8>) -> Result<Duration, ChannelError> {
        let t = Instant::now();
        match self
            .control(&ControlRequest::Echo {
                payload: ByteBuf::from(payload),
            })
            .await?
        {
            ControlResponse::Echo { .. } => Ok(t.elapsed()),
            _ => Err(ChannelError::Unexpected("something other than an echo")),
        }
    }

    /// A round trip the guest answers after waiting `after`: the channel with an exec's timing
    /// (its answer follows the command's run). Returns the round trip and the guest's wait.
    pub async fn echo_after(&self, after: Duration) -> Result<(Duration, Duration), ChannelError> {
        let us = u32::try_from(after.as_micros()).unwrap_or(u32::MAX);
        let t = Instant::now();
        match self.control(&ControlRequest::Wait { us }).await? {
            ControlResponse::Waited { us } => Ok((t.elapsed(), Duration::from_micros(us))),
            _ => Err(ChannelError::Unexpected(
                "something other than the end of a wait",
            )),
        }
    }

    pub async fn read_file(&self, path: &str) -> Result<Vec<u8>, ChannelError> {
        match self
            .control(&ControlRequest::ReadFile {
                path: path.to_string(),
            })
            .await?
        {
            ControlResponse::File { data } => Ok(data.into_vec()),
            _ => Err(ChannelError::Unexpected("something other than file data")),
        }
    }

    pub async fn write_file(
        &self,
        path: &str,
        data: Vec<u8>,
        mode: Option<u32>,
    ) -> Result<(), ChannelError> {
        self.control(&ControlRequest::WriteFile {
            path: path.to_string(),
            data: ByteBuf::from(data),
            mode,
        })
        .await
        .map(|_| ())
    }

    /// Run a job and collect its output.
    pub async fn exec(&self, req: &ExecRequest) -> Result<ExecOutput, ChannelError> {
        let mut s = self.open(port::EXEC).await?;
        frame::write_frame(&mut s, req).await?;
        let mut out = ExecOutput {
            stdout: Vec::new(),
            stderr: Vec::new(),
            exit: ExecExit {
                status: capsem_proto::ExitStatus::Code(-1),
                timed_out: false,
                spawn_to_exit_us: 0,
            },
            truncated: false,
        };
        loop {
            match frame::expect_frame::<_, ExecEvent>(&mut s, "the job's exit").await? {
                ExecEvent::Started { .. } => {}
                ExecEvent::Stdout(b) => {
                    out.truncated |= !keep(&mut out.stdout, &b, EXEC_OUTPUT_LIMIT);
                }
                ExecEvent::Stderr(b) => {
                    out.truncated |= !keep(&mut out.stderr, &b, EXEC_OUTPUT_LIMIT);
                }
                ExecEvent::Exit(e) => {
                    out.exit = e;
                    return Ok(out);
                }
                ExecEvent::Failed { message } => return Err(ChannelError::Guest(message)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn collected_output_stops_at_the_limit() {
        let mut buf = Vec::new();
        assert!(super::keep(&mut buf, b"abcd", 6));
        assert!(!super::keep(&mut buf, b"efgh", 6));
        assert_eq!(buf, b"abcdef");
        assert!(!super::keep(&mut buf, b"ij", 6));
        assert!(super::keep(&mut buf, b"", 6));
        assert_eq!(buf, b"abcdef");
    }
}
