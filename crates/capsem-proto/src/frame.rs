//! Length-prefixed framing: a little-endian `u32` length, then a postcard-encoded message.
//! Frames over [`MAX_FRAME`] are refused on read so a peer cannot make the other side allocate
//! without bound.

use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest frame accepted (data chunks are far smaller; file writes are the big case).
pub const MAX_FRAME: usize = 64 * 1024 * 1024;

/// Size of the data chunks senders put in one frame.
pub const CHUNK: usize = 64 * 1024;

/// Largest header frame accepted where a stream says what it is for (a port, a host name):
/// a peer may open many streams, and each must not cost more than this before it is served.
pub const MAX_HEADER: usize = 4 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("channel i/o failed")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes exceeds the {1}-byte limit")]
    TooLarge(usize, usize),
    #[error("malformed message")]
    Decode(#[source] postcard::Error),
    #[error("could not encode message")]
    Encode(#[source] postcard::Error),
    #[error("peer closed the stream before {0}")]
    UnexpectedEof(&'static str),
}

/// Encode one message as a complete frame (length prefix included).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut buf = vec![0u8; 4];
    buf = postcard::to_extend(msg, buf).map_err(FrameError::Encode)?;
    let len = (buf.len() - 4) as u32;
    buf[..4].copy_from_slice(&len.to_le_bytes());
    Ok(buf)
}

/// Decode a message body (without the length prefix).
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    postcard::from_bytes(body).map_err(FrameError::Decode)
}

/// Write one message and flush.
pub async fn write_frame<W, T>(w: &mut W, msg: &T) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let buf = encode(msg)?;
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

/// Read one message; `Ok(None)` on a clean end of stream before any byte of a frame.
pub async fn read_frame<R, T>(r: &mut R) -> Result<Option<T>, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    read_frame_within(r, MAX_FRAME).await
}

/// [`read_frame`] with a smaller limit than [`MAX_FRAME`]. The body's memory grows as its bytes
/// arrive: a length prefix alone never makes this side allocate.
pub async fn read_frame_within<R, T>(r: &mut R, max: usize) -> Result<Option<T>, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut len[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(FrameError::UnexpectedEof("a frame header"));
        }
        got += n;
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > max.min(MAX_FRAME) {
        return Err(FrameError::TooLarge(len, max.min(MAX_FRAME)));
    }
    // Grown a chunk at a time as the bytes come (a frame of up to a chunk, nearly all of them,
    // in one step).
    let mut body = Vec::new();
    while body.len() < len {
        let start = body.len();
        body.resize(start + (len - start).min(CHUNK), 0);
        r.read_exact(&mut body[start..])
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => {
                    FrameError::UnexpectedEof("the end of a frame")
                }
                _ => FrameError::Io(e),
            })?;
    }
    decode(&body).map(Some)
}

/// Read one message that must be there.
pub async fn expect_frame<R, T>(r: &mut R, what: &'static str) -> Result<T, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    read_frame(r).await?.ok_or(FrameError::UnexpectedEof(what))
}

/// A stream's header frame (at most [`MAX_HEADER`] bytes), which must be there.
pub async fn expect_header<R, T>(r: &mut R, what: &'static str) -> Result<T, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    read_frame_within(r, MAX_HEADER)
        .await?
        .ok_or(FrameError::UnexpectedEof(what))
}
