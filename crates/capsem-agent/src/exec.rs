//! Exec port (5005): one job per stream. Spawns the command in its own process group, streams
//! stdout/stderr as they come (chunks of at most [`CHUNK`] bytes), feeds stdin when asked, and
//! ends with exactly one `Exit` (or `Failed` when the spawn fails).
//!
//! One task, one `select!` loop: output pipes, stdin writes, input frames, the child's exit, the
//! timeout. `Exit` goes out once the child is reaped and both pipes are at EOF — or
//! [`DRAIN_AFTER_EXIT`] after the reap when a background grandchild still holds a pipe.
//! `Kill`, the timeout, or the host closing the stream kill the whole group (SIGKILL to -pgid).
//! Nothing here logs: this is the hot path.

use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::BufMut;
use capsem_proto::exec::{Command, ExecEvent, ExecExit, ExecInput, ExecRequest};
use capsem_proto::frame::{self, FrameError, CHUNK};
use capsem_proto::ExitStatus;
use serde_bytes::ByteBuf;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant as TokioInstant;

use crate::framed::FrameReader;

/// How long to wait for pipe EOF once the child has been reaped.
pub const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(100);

/// Stop reading input frames while this much stdin is waiting for the child.
const STDIN_BACKLOG: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("reading the exec request failed")]
    Request(#[source] FrameError),
    #[error("waiting for the child failed")]
    Wait(#[source] std::io::Error),
}

/// Convert a reaped child's status to the wire form.
pub fn exit_status(st: std::process::ExitStatus) -> ExitStatus {
    match (st.code(), st.signal()) {
        (Some(c), _) => ExitStatus::Code(c),
        (None, Some(s)) => ExitStatus::Signal(s),
        (None, None) => ExitStatus::Code(-1),
    }
}

/// SIGKILL (or `sig`) the process group `pgid`; errors (already gone) are ignored.
pub fn signal_group(pgid: u32, sig: libc::c_int) {
    // SAFETY: kill with a negative pid signals a process group; no memory is involved.
    unsafe { libc::kill(-(pgid as libc::pid_t), sig) };
}

fn build(req: &ExecRequest) -> Result<tokio::process::Command, String> {
    let mut cmd = match &req.command {
        Command::Shell(s) => {
            let mut c = tokio::process::Command::new("/bin/sh");
            c.arg("-c").arg(s);
            c
        }
        Command::Argv(argv) => {
            let Some((prog, args)) = argv.split_first() else {
                return Err("empty argv".to_string());
            };
            let mut c = tokio::process::Command::new(prog);
            c.args(args);
            c
        }
    };
    crate::env::apply(
        &mut cmd,
        req.env.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    );
    cmd.current_dir(req.cwd.as_deref().unwrap_or(crate::env::HOME))
        .process_group(0)
        .stdin(if req.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Ok(cmd)
}

/// First size of an output buffer; it doubles (up to [`CHUNK`]) each time a read fills it.
/// Small on purpose: musl's allocator serves buffers of a few KiB from memory it maps for the
/// job and unmaps after it, and under emulation those page faults and TLB flushes cost a
/// tenth of a millisecond or more per exec.
pub const FIRST_READ: usize = 512;

/// Read once from `r` into `buf`, replacing its contents (the buffer is never zeroed); grows
/// `buf` for the next read when this one filled it.
pub async fn read_chunk<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> std::io::Result<usize> {
    buf.clear();
    if buf.capacity() == 0 {
        buf.reserve_exact(FIRST_READ);
    }
    let cap = buf.capacity().min(CHUNK);
    let n = r.read_buf(&mut (&mut *buf).limit(cap)).await?;
    if n == cap && cap < CHUNK {
        buf.reserve_exact((cap * 2).min(CHUNK));
    }
    Ok(n)
}

/// [`read_chunk`] from an optional pipe; pending forever when the pipe is closed.
async fn read_opt<R: AsyncRead + Unpin>(
    r: &mut Option<R>,
    buf: &mut Vec<u8>,
) -> std::io::Result<usize> {
    match r {
        Some(r) => read_chunk(r, buf).await,
        None => std::future::pending().await,
    }
}

async fn write_opt<W: AsyncWrite + Unpin>(
    w: &mut Option<W>,
    data: &[u8],
) -> std::io::Result<usize> {
    match w {
        Some(w) => w.write(data).await,
        None => std::future::pending().await,
    }
}

/// Send `ev` while the host listens (`host_ok`); the first failure clears `host_ok`.
async fn send<S: AsyncWrite + Unpin>(out: &mut S, host_ok: &mut bool, ev: &ExecEvent) {
    if *host_ok && frame::write_frame(out, ev).await.is_err() {
        *host_ok = false;
    }
}

/// Serve one exec stream to completion.
pub async fn handle<S>(stream: S) -> Result<(), ExecError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut input = FrameReader::new(stream);
    let Some(req) = input
        .next::<ExecRequest>()
        .await
        .map_err(ExecError::Request)?
    else {
        return Ok(());
    };

    let spawned = build(&req).and_then(|mut cmd| {
        let start = Instant::now();
        cmd.spawn().map(|c| (c, start)).map_err(|e| {
            let what = match &req.command {
                Command::Shell(_) => "/bin/sh".to_string(),
                Command::Argv(a) => a[0].clone(),
            };
            format!("cannot start {what}: {e}")
        })
    });
    let (mut child, start) = match spawned {
        Ok(x) => x,
        Err(message) => {
            let s = input.get_mut();
            let _ = frame::write_frame(s, &ExecEvent::Failed { message }).await;
            let _ = s.shutdown().await;
            return Ok(());
        }
    };
    let pid = child.id().unwrap_or(0);

    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let mut stdin = child.stdin.take();
    let mut pending: Vec<u8> = Vec::new();
    let mut close_stdin = false;
    let mut input_open = true;

    let far = TokioInstant::now() + Duration::from_secs(86400 * 365);
    let deadline = req
        .timeout_ms
        .map(|ms| TokioInstant::from_std(start) + Duration::from_millis(ms));
    let timer = tokio::time::sleep_until(deadline.unwrap_or(far));
    tokio::pin!(timer);
    let mut timer_armed = deadline.is_some();
    let drain = tokio::time::sleep_until(far);
    tokio::pin!(drain);

    let mut obuf = Vec::new();
    let mut ebuf = Vec::new();
    let mut status: Option<ExitStatus> = None;
    let mut spawn_to_exit_us = 0u64;
    let mut timed_out = false;
    let mut host_ok = true;

    send(input.get_mut(), &mut host_ok, &ExecEvent::Started { pid }).await;

    loop {
        if status.is_some() && stdout.is_none() && stderr.is_none() {
            break;
        }
        tokio::select! {
            biased;
            r = read_opt(&mut stdout, &mut obuf) => match r {
                Ok(n) if n > 0 => {
                    let ev = ExecEvent::Stdout(ByteBuf::from(&obuf[..]));
                    send(input.get_mut(), &mut host_ok, &ev).await;
                    if !host_ok && status.is_none() { signal_group(pid, libc::SIGKILL); }
                }
                _ => stdout = None,
            },
            r = read_opt(&mut stderr, &mut ebuf) => match r {
                Ok(n) if n > 0 => {
                    let ev = ExecEvent::Stderr(ByteBuf::from(&ebuf[..]));
                    send(input.get_mut(), &mut host_ok, &ev).await;
                    if !host_ok && status.is_none() { signal_group(pid, libc::SIGKILL); }
                }
                _ => stderr = None,
            },
            st = child.wait(), if status.is_none() => {
                spawn_to_exit_us = start.elapsed().as_micros() as u64;
                status = Some(exit_status(st.map_err(ExecError::Wait)?));
                stdin = None;
                pending = Vec::new();
                drain.as_mut().reset(TokioInstant::now() + DRAIN_AFTER_EXIT);
            }
            r = write_opt(&mut stdin, &pending), if !pending.is_empty() => match r {
                Ok(n) if n > 0 => {
                    pending.drain(..n);
                    if pending.is_empty() && close_stdin { stdin = None; }
                }
                _ => { stdin = None; pending = Vec::new(); }
            },
            msg = input.next::<ExecInput>(), if input_open && pending.len() < STDIN_BACKLOG => match msg {
                Ok(Some(ExecInput::Stdin(data))) => {
                    if stdin.is_some() && !close_stdin { pending.extend_from_slice(&data); }
                }
                Ok(Some(ExecInput::CloseStdin)) => {
                    close_stdin = true;
                    if pending.is_empty() { stdin = None; }
                }
                Ok(Some(ExecInput::Kill)) => {
                    if status.is_none() { signal_group(pid, libc::SIGKILL); }
                }
                // The host closed the stream (or broke it): the job dies with it.
                Ok(None) | Err(_) => {
                    input_open = false;
                    if status.is_none() { signal_group(pid, libc::SIGKILL); }
                }
            },
            _ = &mut timer, if timer_armed && status.is_none() => {
                timer_armed = false;
                timed_out = true;
                signal_group(pid, libc::SIGKILL);
            }
            _ = &mut drain, if status.is_some() => break,
        }
    }

    let exit = ExecExit {
        status: status.unwrap_or(ExitStatus::Code(-1)),
        timed_out,
        spawn_to_exit_us,
    };
    send(input.get_mut(), &mut host_ok, &ExecEvent::Exit(exit)).await;
    if host_ok {
        let _ = input.get_mut().shutdown().await;
    }
    Ok(())
}
