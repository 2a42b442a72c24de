//! Terminal port (5001): one PTY session per stream. Opens a PTY, starts the command (or a login
//! shell) as a session leader with the PTY slave as its controlling terminal, pumps master output
//! to the host as `Data`, host `Data` into the master, `Resize` to `TIOCSWINSZ` (the kernel sends
//! SIGWINCH). On exit it drains the remaining output, sends `Exit` and closes. If the host goes
//! away first, the session gets SIGHUP, then SIGKILL after [`HANGUP_GRACE`].

use std::ffi::CString;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use capsem_proto::frame::{self, FrameError};
use capsem_proto::terminal::{TerminalEvent, TerminalInput, TerminalRequest};
use capsem_proto::ExitStatus;
use serde_bytes::ByteBuf;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::exec::{exit_status, read_chunk, signal_group, DRAIN_AFTER_EXIT};
use crate::fdio::FdStream;
use crate::framed::FrameReader;

/// Time between SIGHUP and SIGKILL when the host closes the stream.
pub const HANGUP_GRACE: Duration = Duration::from_millis(500);

const INPUT_BACKLOG: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TerminalError {
    #[error("reading the terminal request failed")]
    Request(#[source] FrameError),
    #[error("waiting for the session's process failed")]
    Wait(#[source] io::Error),
}

fn cvt(n: libc::c_int) -> io::Result<libc::c_int> {
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n)
    }
}

/// A PTY pair; both ends close-on-exec, the master non-blocking.
pub struct Pty {
    pub master: OwnedFd,
    pub slave: OwnedFd,
}

/// Open a PTY through `/dev/ptmx` with `TIOCGPTPEER` (no window where another fork could
/// inherit the descriptors), falling back to the `/dev/pts/N` path.
pub fn open_pty(cols: u16, rows: u16) -> io::Result<Pty> {
    // SAFETY: plain syscalls on descriptors we create and own; results are checked.
    unsafe {
        let m = cvt(libc::open(
            c"/dev/ptmx".as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC | libc::O_NONBLOCK,
        ))?;
        let master = OwnedFd::from_raw_fd(m);
        let unlock: libc::c_int = 0;
        cvt(libc::ioctl(m, libc::TIOCSPTLCK, &unlock))?;
        let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
        let s = match cvt(libc::ioctl(m, libc::TIOCGPTPEER, flags)) {
            Ok(s) => s,
            Err(_) => {
                let mut n: libc::c_uint = 0;
                cvt(libc::ioctl(m, libc::TIOCGPTN, &mut n))?;
                let path = CString::new(format!("/dev/pts/{n}")).expect("no NUL");
                cvt(libc::open(path.as_ptr(), flags))?
            }
        };
        let slave = OwnedFd::from_raw_fd(s);
        set_size(m, cols, rows)?;
        Ok(Pty { master, slave })
    }
}

/// `TIOCSWINSZ` on a PTY master.
pub fn set_size(master: RawFd, cols: u16, rows: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize we own.
    cvt(unsafe { libc::ioctl(master, libc::TIOCSWINSZ, &ws) }).map(|_| ())
}

fn build(req: &TerminalRequest, slave: &OwnedFd) -> io::Result<tokio::process::Command> {
    let mut cmd = match &req.command {
        Some(c) => {
            let mut cmd = tokio::process::Command::new("/bin/sh");
            cmd.arg("-c").arg(c);
            cmd
        }
        None if Path::new("/bin/bash").exists() => {
            let mut cmd = tokio::process::Command::new("/bin/bash");
            cmd.arg("-l");
            cmd
        }
        None => tokio::process::Command::new("/bin/sh"),
    };
    let term = if req.term.is_empty() {
        "xterm-256color"
    } else {
        req.term.as_str()
    };
    crate::env::apply(
        &mut cmd,
        std::iter::once(("TERM", term))
            .chain(req.env.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
    );
    let cwd = if Path::new(crate::env::HOME).is_dir() {
        crate::env::HOME
    } else {
        "/"
    };
    cmd.current_dir(cwd)
        .stdin(Stdio::from(slave.try_clone()?))
        .stdout(Stdio::from(slave.try_clone()?))
        .stderr(Stdio::from(slave.try_clone()?));
    // SAFETY: only async-signal-safe calls (setsid, ioctl) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

async fn send<S: AsyncWrite + Unpin>(s: &mut S, ok: &mut bool, ev: &TerminalEvent) {
    if *ok && frame::write_frame(s, ev).await.is_err() {
        *ok = false;
    }
}

/// Serve one terminal stream to completion.
pub async fn handle<S>(stream: S) -> Result<(), TerminalError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut input = FrameReader::new(stream);
    let Some(req) = input
        .next::<TerminalRequest>()
        .await
        .map_err(TerminalError::Request)?
    else {
        return Ok(());
    };

    let started = open_pty(req.cols, req.rows).and_then(|pty| {
        let child = build(&req, &pty.slave)?.spawn()?;
        // The command (and its copies of the slave) is gone; drop ours so EIO marks the end.
        drop(pty.slave);
        Ok((child, FdStream::new(pty.master)?))
    });
    let (mut child, mut master) = match started {
        Ok(x) => x,
        Err(e) => {
            let s = input.get_mut();
            let message = format!("cannot start the terminal: {e}");
            let _ = frame::write_frame(s, &TerminalEvent::Failed { message }).await;
            let _ = s.shutdown().await;
            return Ok(());
        }
    };
    let pid = child.id().unwrap_or(0);
    let mut master_w = master.clone();

    let mut buf = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut master_open = true;
    let mut input_open = true;
    let mut host_ok = true;
    let mut status: Option<ExitStatus> = None;
    let far = Instant::now() + Duration::from_secs(86400 * 365);
    let drain = tokio::time::sleep_until(far);
    tokio::pin!(drain);
    let kill = tokio::time::sleep_until(far);
    tokio::pin!(kill);
    let mut kill_armed = false;

    loop {
        if status.is_some() && !master_open {
            break;
        }
        tokio::select! {
            biased;
            r = read_chunk(&mut master, &mut buf), if master_open => match r {
                Ok(n) if n > 0 => {
                    let ev = TerminalEvent::Data(ByteBuf::from(&buf[..]));
                    send(input.get_mut(), &mut host_ok, &ev).await;
                }
                // EIO: every slave descriptor is closed and the output is drained.
                _ => master_open = false,
            },
            st = child.wait(), if status.is_none() => {
                status = Some(exit_status(st.map_err(TerminalError::Wait)?));
                drain.as_mut().reset(Instant::now() + DRAIN_AFTER_EXIT);
            }
            r = master_w.write(&pending), if !pending.is_empty() && master_open => match r {
                Ok(n) if n > 0 => { pending.drain(..n); }
                _ => pending = Vec::new(),
            },
            msg = input.next::<TerminalInput>(), if input_open && pending.len() < INPUT_BACKLOG => match msg {
                Ok(Some(TerminalInput::Data(d))) => pending.extend_from_slice(&d),
                Ok(Some(TerminalInput::Resize { cols, rows })) => {
                    let _ = set_size(master.raw(), cols, rows);
                }
                Ok(None) | Err(_) => {
                    input_open = false;
                    host_ok = false;
                    if status.is_none() {
                        signal_group(pid, libc::SIGHUP);
                        signal_group(pid, libc::SIGCONT);
                        kill.as_mut().reset(Instant::now() + HANGUP_GRACE);
                        kill_armed = true;
                    }
                }
            },
            _ = &mut kill, if kill_armed && status.is_none() => {
                kill_armed = false;
                signal_group(pid, libc::SIGKILL);
            }
            _ = &mut drain, if status.is_some() => break,
        }
    }
    drop(master);
    drop(master_w);
    let s = input.get_mut();
    let ev = TerminalEvent::Exit(status.unwrap_or(ExitStatus::Code(-1)));
    send(s, &mut host_ok, &ev).await;
    if host_ok {
        let _ = s.shutdown().await;
    }
    Ok(())
}
