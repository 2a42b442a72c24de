//! A non-blocking file descriptor as tokio `AsyncRead + AsyncWrite` through `AsyncFd`: the
//! virtio-serial port (one descriptor for both directions; the port cannot be opened twice)
//! and PTY masters. Clones share the descriptor, so one task may read while another writes.
//! [`Coalesce`] gathers the channel's small writes into one `write(2)` per flush.
//!
//! tokio keeps a hang-up (`POLLHUP`) as a final state of a registration: from then on it always
//! reports the descriptor ready. So once the other end has hung up, a read that would block is
//! the end of the stream and a write that would block is a broken pipe, instead of a retry loop
//! that never sleeps. (A channel stream is registered anew for each host session.)

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

#[derive(Clone)]
pub struct FdStream {
    fd: Arc<AsyncFd<OwnedFd>>,
}

/// Put `fd` in non-blocking mode.
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, with integer arguments.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

impl FdStream {
    /// Wrap a descriptor that is already non-blocking. Needs a tokio runtime.
    pub fn new(fd: OwnedFd) -> io::Result<FdStream> {
        // SAFETY: the OwnedFd is valid and owned by the AsyncFd, which never replaces or
        // closes it while registered.
        let fd = unsafe { AsyncFd::register(fd)? };
        Ok(FdStream { fd: Arc::new(fd) })
    }

    pub fn raw(&self) -> RawFd {
        self.fd.get_ref().as_raw_fd()
    }
}

fn cvt(n: isize) -> io::Result<usize> {
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

impl AsyncRead for FdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let closed = guard.ready().is_read_closed();
            let unfilled = buf.initialize_unfilled();
            let res = guard.try_io(|fd| {
                // SAFETY: reading into a slice we hold mutably, of its length.
                cvt(unsafe {
                    libc::read(fd.as_raw_fd(), unfilled.as_mut_ptr().cast(), unfilled.len())
                })
            });
            match res {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // The other end went away since this registration began: end of stream.
                Err(_would_block) if closed => return Poll::Ready(Ok(())),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            let closed = guard.ready().is_write_closed();
            let res = guard.try_io(|fd| {
                // SAFETY: writing from a slice we hold, of its length.
                cvt(unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) })
            });
            match res {
                Ok(Ok(n)) => return Poll::Ready(Ok(n)),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // The other end went away (a virtio-serial port whose host hung up blocks
                // writes rather than failing them): nothing written now will be read.
                Err(_would_block) if closed => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the other end hung up",
                    )))
                }
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Write coalescing for the channel: writes are gathered in memory and reach the inner stream
/// on flush (or when [`COALESCE_LIMIT`] bytes are waiting). yamux writes each frame's 12-byte
/// header and its body separately and flushes after a batch of frames; on a virtio-serial port
/// every `write(2)` is a virtqueue kick (a VM exit and a separate chardev write on the host), so
/// gathering halves the exits per frame or better. Reads pass through.
pub struct Coalesce<T> {
    inner: T,
    buf: Vec<u8>,
    /// Bytes of `buf` already written to `inner`.
    sent: usize,
}

/// Flush to the inner stream once this much is waiting.
pub const COALESCE_LIMIT: usize = 64 * 1024;

impl<T> Coalesce<T> {
    pub fn new(inner: T) -> Self {
        Coalesce {
            inner,
            buf: Vec::new(),
            sent: 0,
        }
    }
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    /// Write out everything gathered so far.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.buf.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.buf.len() >= COALESCE_LIMIT {
            ready!(self.poll_drain(cx))?;
        }
        let n = data.len().min(COALESCE_LIMIT - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Counts the writes that reach it.
    struct Counting(Vec<Vec<u8>>);
    impl AsyncWrite for Counting {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            d: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = d.len().min(32 * 1024);
            self.0.push(d[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A PTY master whose other end is closed takes a few KiB, then blocks writes while
    /// reporting a hang-up, as a virtio-serial port with no host does (which never takes
    /// them): the write that would block fails.
    #[tokio::test]
    async fn a_write_after_the_other_end_hung_up_fails() {
        let pty = nix::pty::openpty(None, None).unwrap();
        drop(pty.slave);
        set_nonblocking(pty.master.as_raw_fd()).unwrap();
        let mut s = FdStream::new(pty.master).unwrap();
        let big = vec![b'x'; 1 << 20];
        let r = tokio::time::timeout(std::time::Duration::from_secs(5), s.write_all(&big))
            .await
            .expect("the write neither failed nor finished");
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    }

    #[tokio::test]
    async fn writes_are_gathered_until_flush() {
        let mut c = Coalesce::new(Counting(Vec::new()));
        c.write_all(b"header012345").await.unwrap();
        c.write_all(b"body").await.unwrap();
        assert!(c.inner.0.is_empty());
        c.flush().await.unwrap();
        assert_eq!(c.inner.0, vec![b"header012345body".to_vec()]);
        // Large writes go out in pieces the inner stream accepts, in order.
        let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        c.write_all(&big).await.unwrap();
        c.flush().await.unwrap();
        let out: Vec<u8> = c.inner.0[1..].concat();
        assert_eq!(out, big);
    }

    #[tokio::test]
    async fn reads_pass_through() {
        let (mut a, b) = tokio::io::duplex(64);
        let mut c = Coalesce::new(b);
        a.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    }
}
