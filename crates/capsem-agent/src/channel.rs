//! The host channel's guest end: find the virtio-serial port named
//! [`capsem_proto::CHANNEL_PORT_NAME`], open it once (read + write, non-blocking), and tell when
//! the host end is connected.
//!
//! virtio-serial semantics that shape this module: while no host is connected a read returns 0
//! (EOF) and `poll` reports `POLLIN|POLLHUP`, and writes block. So "host connected" is watched
//! through writability (`POLLOUT`), never through reads; a session's EOF means the host went
//! away, and the next session waits for it to come back on the same descriptor.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::fdio::FdStream;

/// How long to wait for the port to appear after the driver loads.
pub const APPEAR_TIMEOUT: Duration = Duration::from_secs(5);
const POLL_EVERY: Duration = Duration::from_millis(2);

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("no virtio-serial port named {name:?} appeared within {timeout:?}")]
    NotFound { name: String, timeout: Duration },
    #[error("could not open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Find `/dev/vportXpY` whose sysfs name is `name` (polling until `timeout`).
pub fn find_port(name: &str, timeout: Duration) -> Result<PathBuf, ChannelError> {
    let start = Instant::now();
    loop {
        if let Some(p) = scan(Path::new("/sys/class/virtio-ports"), name) {
            let dev = Path::new("/dev").join(p);
            if dev.exists() {
                return Ok(dev);
            }
        }
        if start.elapsed() >= timeout {
            return Err(ChannelError::NotFound {
                name: name.to_string(),
                timeout,
            });
        }
        std::thread::sleep(POLL_EVERY);
    }
}

fn scan(class: &Path, name: &str) -> Option<String> {
    for entry in std::fs::read_dir(class).ok()?.flatten() {
        if let Ok(n) = std::fs::read_to_string(entry.path().join("name")) {
            if n.trim_end() == name {
                return Some(entry.file_name().to_string_lossy().into_owned());
            }
        }
    }
    None
}

/// Open the port read+write, non-blocking, close-on-exec. Returns a plain descriptor so it can
/// be opened before the runtime exists.
pub fn open(path: &Path) -> Result<OwnedFd, ChannelError> {
    let err = |source| ChannelError::Open {
        path: path.to_path_buf(),
        source,
    };
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| err(io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: open with a valid C string; the result is checked.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY,
        )
    };
    if fd < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    // SAFETY: fd was just returned by open and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn writable_now(port: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd: port,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one pollfd we own, zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & libc::POLLOUT != 0
}

/// Resolve once the host end of the port is connected (the port is writable).
///
/// While no host is connected the port reports `POLLHUP`, which `poll` always returns, and
/// which tokio keeps as a final "closed" state for the descriptor's registration: neither can
/// wait for the host to come back without spinning. So the wait is on a private edge-triggered
/// epoll set holding only the port, which wakes once per change of the port's state (the host
/// connecting is one); tokio watches that set's own descriptor, which is only ever readable.
pub async fn wait_host(port: &OwnedFd) -> io::Result<()> {
    let port = port.as_raw_fd();
    // SAFETY: epoll_create1 with a flag; the result is checked and owned at once.
    let set = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if set < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `set` was just created and is owned by nobody else.
    let set = unsafe { OwnedFd::from_raw_fd(set) };
    let mut ev = libc::epoll_event {
        events: (libc::EPOLLOUT | libc::EPOLLET) as u32,
        u64: 0,
    };
    // SAFETY: both descriptors are open; `ev` is a valid event we own.
    if unsafe { libc::epoll_ctl(set.as_raw_fd(), libc::EPOLL_CTL_ADD, port, &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the AsyncFd owns the set and neither replaces nor closes it while registered.
    let set = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(set, tokio::io::Interest::READABLE)?
    };
    loop {
        if writable_now(port) {
            return Ok(());
        }
        let mut guard = set.readable().await?;
        // Take what the set reported (an edge-triggered entry is reported once per change).
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 4];
        // SAFETY: the set is open; the buffer holds `events.len()` entries.
        unsafe { libc::epoll_wait(guard.get_inner().as_raw_fd(), events.as_mut_ptr(), 4, 0) };
        guard.clear_ready();
    }
}

/// A stream on the port for one host session: a duplicate descriptor with a registration of
/// its own, made while the host is connected. (A registration that has seen the host go away
/// counts the port as closed for good; see [`FdStream`].) Needs a tokio runtime.
pub fn session_stream(port: &OwnedFd) -> io::Result<FdStream> {
    FdStream::new(port.try_clone()?)
}
