//! A cancel-safe frame reader: the same length-prefixed framing as [`capsem_proto::frame`], but
//! [`FrameReader::next`] may be dropped mid-frame (inside `tokio::select!`) without losing bytes,
//! because partial input stays in the reader's buffer. It owns the stream, so handlers write
//! their replies through [`FrameReader::get_mut`] from the same task.

use capsem_proto::frame::{self, FrameError, MAX_FRAME};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::exec::FIRST_READ;

pub struct FrameReader<S> {
    inner: S,
    buf: Vec<u8>,
    /// Bytes of `buf` already consumed by returned frames.
    start: usize,
}

impl<S: AsyncRead + Unpin> FrameReader<S> {
    pub fn new(inner: S) -> Self {
        FrameReader {
            inner,
            buf: Vec::new(),
            start: 0,
        }
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Next message; `Ok(None)` on a clean end of stream between frames. Cancel-safe.
    pub async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        loop {
            let avail = &self.buf[self.start..];
            let mut want = 4;
            if avail.len() >= 4 {
                let len = u32::from_le_bytes(avail[..4].try_into().expect("4 bytes")) as usize;
                if len > MAX_FRAME {
                    return Err(FrameError::TooLarge(len, MAX_FRAME));
                }
                if avail.len() >= 4 + len {
                    let msg = frame::decode(&avail[4..4 + len]);
                    self.start += 4 + len;
                    if self.start == self.buf.len() {
                        self.buf.clear();
                        self.start = 0;
                    }
                    return msg.map(Some);
                }
                want = 4 + len;
            }
            // Compact before growing so the buffer does not creep.
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            // As small a first reservation as the output buffers' (see `FIRST_READ`: musl maps
            // and unmaps larger ones per stream); a long frame reserves its whole length at once.
            let need = want.saturating_sub(self.buf.len()).max(FIRST_READ);
            self.buf.reserve(need);
            let n = self.inner.read_buf(&mut self.buf).await?;
            if n == 0 {
                return if self.buf.len() == self.start {
                    Ok(None)
                } else {
                    Err(FrameError::UnexpectedEof("the end of a frame"))
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn reads_frames_split_across_writes_and_survives_cancellation() {
        let (mut a, b) = tokio::io::duplex(16);
        let mut r = FrameReader::new(b);
        let mut bytes = Vec::new();
        for i in 0..50u32 {
            bytes.extend(frame::encode(&vec![i; i as usize]).unwrap());
        }
        let writer = tokio::spawn(async move {
            for c in bytes.chunks(7) {
                a.write_all(c).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let mut got = 0u32;
        loop {
            // Cancel the read now and then; nothing may be lost.
            tokio::select! {
                m = r.next::<Vec<u32>>() => match m.unwrap() {
                    Some(v) => { assert_eq!(v, vec![got; got as usize]); got += 1; }
                    None => break,
                },
                _ = tokio::task::yield_now() => {}
            }
        }
        assert_eq!(got, 50);
        writer.await.unwrap();
    }
}
