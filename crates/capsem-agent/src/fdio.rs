//! A non-blocking file descriptor as tokio `AsyncRead + AsyncWrite` through `AsyncFd`: the
//! virtio-serial port (one descriptor for both directions; the port cannot be opened twice)
//! and PTY masters. Clones share the descriptor, so one task may read while another writes.
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

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
}
