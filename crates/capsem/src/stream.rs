//! The client side of the two streams: an exec job (stdout and stderr to ours, the exit code
//! back) and an interactive terminal. Both speak capsem-proto frames over an upgraded
//! connection to the service.

use std::io::Write;
use std::time::Duration;

use capsem_core::uds_http::Upgraded;
use capsem_proto::exec::{Command, ExecEvent, ExecRequest};
use capsem_proto::frame;
use capsem_proto::terminal::{TerminalEvent, TerminalInput, TerminalRequest};
use serde_bytes::ByteBuf;
use tokio::io::AsyncReadExt;

use crate::term;

/// Exit code for a timed-out command, as `timeout(1)`.
pub const TIMEOUT_EXIT: i32 = 124;

/// Run `command` over `io`; returns the exit code capsem should exit with.
pub async fn exec(
    mut io: Upgraded,
    command: String,
    env: Vec<(String, String)>,
    timeout_secs: u64,
) -> anyhow::Result<i32> {
    let req = ExecRequest {
        command: Command::Shell(command),
        env,
        cwd: None,
        stdin: false,
        timeout_ms: Some(timeout_secs.saturating_mul(1000)),
    };
    frame::write_frame(&mut io, &req).await?;
    // The guest enforces the timeout; this is the backstop if it stops answering.
    let backstop = Duration::from_secs(timeout_secs.saturating_add(10));
    let pump = async {
        let mut out = std::io::stdout().lock();
        loop {
            let ev: Option<ExecEvent> = frame::read_frame(&mut io).await?;
            match ev {
                None => anyhow::bail!("the session ended before the command finished"),
                Some(ExecEvent::Started { .. }) => {}
                Some(ExecEvent::Stdout(b)) => {
                    out.write_all(&b)?;
                    out.flush()?;
                }
                Some(ExecEvent::Stderr(b)) => {
                    let mut err = std::io::stderr().lock();
                    err.write_all(&b)?;
                    err.flush()?;
                }
                Some(ExecEvent::Exit(e)) => {
                    if e.timed_out {
                        eprintln!("capsem: command timed out after {timeout_secs}s and was killed");
                        return Ok(TIMEOUT_EXIT);
                    }
                    return Ok(e.status.shell_code());
                }
                Some(ExecEvent::Failed { message }) => {
                    anyhow::bail!("the command could not start: {message}")
                }
            }
        }
    };
    match tokio::time::timeout(backstop, pump).await {
        Ok(r) => r,
        Err(_) => {
            eprintln!(
                "capsem: command timed out after {timeout_secs}s (the guest stopped answering)"
            );
            Ok(TIMEOUT_EXIT)
        }
    }
}

/// Interactive terminal over `io`; returns the shell's exit code.
pub async fn terminal(io: Upgraded, env: Vec<(String, String)>) -> anyhow::Result<i32> {
    let (cols, rows) = term::size();
    let req = TerminalRequest {
        command: None,
        env,
        term: std::env::var("TERM").unwrap_or_else(|_| "xterm-256color".into()),
        cols,
        rows,
    };
    let (mut rd, mut wr) = tokio::io::split(io);
    frame::write_frame(&mut wr, &req).await?;
    let _raw = if term::is_tty(0) {
        Some(term::RawMode::enable()?)
    } else {
        None
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<TerminalInput>(64);
    // Keystrokes.
    let keys = tx.clone();
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 4096];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if keys
                        .send(TerminalInput::Data(ByteBuf::from(buf[..n].to_vec())))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
    // Window resizes.
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut winch) = signal(SignalKind::window_change()) else {
            return;
        };
        while winch.recv().await.is_some() {
            let (cols, rows) = term::size();
            if tx.send(TerminalInput::Resize { cols, rows }).await.is_err() {
                break;
            }
        }
    });
    tokio::spawn(async move {
        while let Some(input) = rx.recv().await {
            if frame::write_frame(&mut wr, &input).await.is_err() {
                break;
            }
        }
    });
    let mut out = std::io::stdout();
    loop {
        match frame::read_frame::<_, TerminalEvent>(&mut rd).await? {
            None => anyhow::bail!("the session ended"),
            Some(TerminalEvent::Data(b)) => {
                out.write_all(&b)?;
                out.flush()?;
            }
            Some(TerminalEvent::Exit(status)) => return Ok(status.shell_code()),
            Some(TerminalEvent::Failed { message }) => {
                anyhow::bail!("the shell could not start: {message}")
            }
        }
    }
}
