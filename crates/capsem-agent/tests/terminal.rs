//! Terminal handler: a PTY session runs a shell, sees input, resizes, exits with its status, and
//! is hung up when the host goes away.

use std::time::{Duration, Instant};

use capsem_agent::terminal;
use capsem_proto::frame;
use capsem_proto::terminal::{TerminalEvent, TerminalInput, TerminalRequest};
use capsem_proto::ExitStatus;
use serde_bytes::ByteBuf;
use tokio::io::DuplexStream;

async fn start(command: Option<&str>) -> DuplexStream {
    let (mut host, guest) = tokio::io::duplex(256 * 1024);
    tokio::spawn(async move { terminal::handle(guest).await.unwrap() });
    let req = TerminalRequest {
        command: command.map(str::to_string),
        env: vec![("PS1".into(), "$ ".into())],
        term: "xterm".into(),
        cols: 80,
        rows: 24,
    };
    frame::write_frame(&mut host, &req).await.unwrap();
    host
}

async fn send(host: &mut DuplexStream, s: &str) {
    frame::write_frame(host, &TerminalInput::Data(ByteBuf::from(s.as_bytes())))
        .await
        .unwrap();
}

/// Read events until the accumulated output contains `needle`; returns the output.
async fn until(host: &mut DuplexStream, out: &mut String, needle: &str) {
    let res = tokio::time::timeout(Duration::from_secs(10), async {
        while !out.contains(needle) {
            match frame::read_frame::<_, TerminalEvent>(host).await.unwrap() {
                Some(TerminalEvent::Data(d)) => out.push_str(&String::from_utf8_lossy(&d)),
                other => panic!("unexpected {other:?} while waiting for {needle:?}; got {out:?}"),
            }
        }
    })
    .await;
    assert!(res.is_ok(), "timed out waiting for {needle:?}; got {out:?}");
}

async fn exit_status(host: &mut DuplexStream) -> ExitStatus {
    loop {
        match frame::read_frame::<_, TerminalEvent>(host).await.unwrap() {
            Some(TerminalEvent::Data(_)) => continue,
            Some(TerminalEvent::Exit(s)) => return s,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn shell_session_arithmetic_resize_and_exit() {
    let mut host = start(Some("/bin/sh")).await;
    let mut out = String::new();
    send(&mut host, "echo $((6*7))\n").await;
    until(&mut host, &mut out, "42").await;
    frame::write_frame(
        &mut host,
        &TerminalInput::Resize {
            cols: 100,
            rows: 30,
        },
    )
    .await
    .unwrap();
    send(&mut host, "stty size; echo $TERM\n").await;
    until(&mut host, &mut out, "30 100").await;
    until(&mut host, &mut out, "xterm").await;
    send(&mut host, "exit 3\n").await;
    assert_eq!(exit_status(&mut host).await, ExitStatus::Code(3));
}

#[tokio::test]
async fn output_written_just_before_exit_is_delivered() {
    let mut host = start(Some("seq 1 2000; exit 0")).await;
    let mut out = String::new();
    until(&mut host, &mut out, "2000").await;
    assert_eq!(exit_status(&mut host).await, ExitStatus::Code(0));
}

#[tokio::test]
async fn host_going_away_hangs_up_the_session() {
    let mut host = start(Some("echo pid=$$; exec sleep 60")).await;
    let mut out = String::new();
    until(&mut host, &mut out, "pid=").await;
    until(&mut host, &mut out, "\n").await;
    let pid: u32 = out.split("pid=").nth(1).unwrap().trim().parse().unwrap();
    drop(host);
    let t = Instant::now();
    loop {
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.rsplit(')').next().unwrap().trim_start().starts_with('Z'))
            .unwrap_or(false);
        if !alive {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(3), "session survived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
