//! Exec handler over an in-memory pipe: output, exit codes, env, stdin, binary streams, kill,
//! timeout and the host going away.

use std::time::{Duration, Instant};

use capsem_agent::exec;
use capsem_proto::exec::{Command, ExecEvent, ExecExit, ExecInput, ExecRequest};
use capsem_proto::frame::{self, CHUNK};
use capsem_proto::ExitStatus;
use serde_bytes::ByteBuf;
use tokio::io::DuplexStream;

fn req(cmd: Command) -> ExecRequest {
    ExecRequest {
        command: cmd,
        env: vec![],
        cwd: None,
        stdin: false,
        timeout_ms: None,
    }
}

fn sh(s: &str) -> ExecRequest {
    req(Command::Shell(s.into()))
}

#[derive(Debug, Default)]
struct Outcome {
    pid: Option<u32>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit: Option<ExecExit>,
    failed: Option<String>,
    max_chunk: usize,
}

async fn start(r: &ExecRequest) -> DuplexStream {
    let (mut host, guest) = tokio::io::duplex(256 * 1024);
    tokio::spawn(async move { exec::handle(guest).await.unwrap() });
    frame::write_frame(&mut host, r).await.unwrap();
    host
}

async fn collect(host: &mut DuplexStream) -> Outcome {
    let mut o = Outcome::default();
    while let Some(ev) = frame::read_frame::<_, ExecEvent>(host).await.unwrap() {
        match ev {
            ExecEvent::Started { pid } => o.pid = Some(pid),
            ExecEvent::Stdout(b) => {
                o.max_chunk = o.max_chunk.max(b.len());
                o.stdout.extend_from_slice(&b)
            }
            ExecEvent::Stderr(b) => {
                o.max_chunk = o.max_chunk.max(b.len());
                o.stderr.extend_from_slice(&b)
            }
            ExecEvent::Exit(e) => {
                assert!(o.exit.is_none(), "two Exit events");
                o.exit = Some(e)
            }
            ExecEvent::Failed { message } => o.failed = Some(message),
        }
    }
    o
}

async fn run(r: ExecRequest) -> Outcome {
    let mut host = start(&r).await;
    collect(&mut host).await
}

fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // A zombie waiting for its (new) parent is dead too.
        Ok(s) => s
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
    }
}

async fn wait_gone(pid: u32, within: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < within {
        if gone(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test]
async fn echo_and_exit_codes() {
    let o = run(sh("echo hello")).await;
    assert!(o.pid.is_some());
    assert_eq!(o.stdout, b"hello\n");
    let e = o.exit.unwrap();
    assert_eq!(e.status, ExitStatus::Code(0));
    assert!(!e.timed_out);
    assert!(e.spawn_to_exit_us > 0);

    let o = run(sh("exit 7")).await;
    assert_eq!(o.exit.unwrap().status, ExitStatus::Code(7));

    let o = run(req(Command::Argv(vec![
        "sh".into(),
        "-c".into(),
        "kill -TERM $$".into(),
    ])))
    .await;
    assert_eq!(o.exit.unwrap().status, ExitStatus::Signal(15));
}

#[tokio::test]
async fn stdout_and_stderr_are_separate() {
    let o = run(sh("echo out; echo err >&2; echo out2")).await;
    assert_eq!(o.stdout, b"out\nout2\n");
    assert_eq!(o.stderr, b"err\n");
}

#[tokio::test]
async fn environment_cwd_and_base_env() {
    let mut r = sh("echo $FOO $HOME $USER $LANG; echo $PATH; pwd");
    r.env = vec![("FOO".into(), "bar".into()), ("HOME".into(), "/tmp".into())];
    r.cwd = Some("/tmp".into());
    let o = run(r).await;
    let out = String::from_utf8(o.stdout).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "bar /tmp root C.UTF-8");
    assert_eq!(lines[1], capsem_agent::env::PATH);
    assert_eq!(lines[2], "/tmp");
}

#[tokio::test]
async fn spawn_failure_is_reported() {
    let o = run(req(Command::Argv(vec!["/nonexistent/prog".into()]))).await;
    assert!(o.failed.unwrap().contains("/nonexistent/prog"));
    assert!(o.exit.is_none());
    let o = run(req(Command::Argv(vec![]))).await;
    assert!(o.failed.is_some());
}

#[tokio::test]
async fn five_mib_binary_stream_is_identical_and_chunked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blob");
    let mut data = vec![0u8; 5 << 20];
    let mut x: u32 = 0x1234_5678;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    std::fs::write(&path, &data).unwrap();
    let o = run(req(Command::Argv(vec![
        "cat".into(),
        path.to_string_lossy().into_owned(),
    ])))
    .await;
    assert_eq!(o.exit.unwrap().status, ExitStatus::Code(0));
    assert!(o.max_chunk <= CHUNK);
    assert!(
        o.max_chunk > exec::FIRST_READ,
        "output buffers did not grow"
    );
    assert!(o.stdout == data, "stream differs");
}

#[tokio::test]
async fn stdin_is_fed_and_closed() {
    let mut r = req(Command::Argv(vec!["cat".into()]));
    r.stdin = true;
    let mut host = start(&r).await;
    for part in [&b"hello "[..], b"world"] {
        frame::write_frame(&mut host, &ExecInput::Stdin(ByteBuf::from(part)))
            .await
            .unwrap();
    }
    frame::write_frame(&mut host, &ExecInput::CloseStdin)
        .await
        .unwrap();
    let o = collect(&mut host).await;
    assert_eq!(o.stdout, b"hello world");
    assert_eq!(o.exit.unwrap().status, ExitStatus::Code(0));
}

#[tokio::test]
async fn large_stdin_flows_while_output_flows() {
    let mut r = req(Command::Argv(vec!["cat".into()]));
    r.stdin = true;
    let host = start(&r).await;
    let (mut rd, mut wr) = tokio::io::split(host);
    let data: Vec<u8> = (0..3 << 20).map(|i| (i * 7 % 251) as u8).collect();
    let sent = data.clone();
    let feeder = tokio::spawn(async move {
        for c in sent.chunks(CHUNK) {
            frame::write_frame(&mut wr, &ExecInput::Stdin(ByteBuf::from(c)))
                .await
                .unwrap();
        }
        frame::write_frame(&mut wr, &ExecInput::CloseStdin)
            .await
            .unwrap();
        wr
    });
    let mut out = Vec::new();
    let mut exit = None;
    while let Some(ev) = frame::read_frame::<_, ExecEvent>(&mut rd).await.unwrap() {
        match ev {
            ExecEvent::Stdout(b) => out.extend_from_slice(&b),
            ExecEvent::Exit(e) => exit = Some(e),
            _ => {}
        }
    }
    let _wr = feeder.await.unwrap();
    assert_eq!(exit.unwrap().status, ExitStatus::Code(0));
    assert!(out == data);
}

#[tokio::test]
async fn timeout_kills_the_whole_group() {
    let mut r = sh("sleep 60 & echo $!; sleep 60");
    r.timeout_ms = Some(300);
    let t = Instant::now();
    let o = run(r).await;
    let e = o.exit.unwrap();
    assert!(e.timed_out);
    assert_eq!(e.status, ExitStatus::Signal(libc::SIGKILL));
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
    let bg: u32 = String::from_utf8(o.stdout).unwrap().trim().parse().unwrap();
    assert!(
        wait_gone(bg, Duration::from_secs(2)).await,
        "background sleep survived"
    );
}

#[tokio::test]
async fn kill_input_kills_the_group() {
    let mut host = start(&sh("sleep 60")).await;
    let ev: ExecEvent = frame::expect_frame(&mut host, "Started").await.unwrap();
    assert!(matches!(ev, ExecEvent::Started { .. }));
    let t = Instant::now();
    frame::write_frame(&mut host, &ExecInput::Kill)
        .await
        .unwrap();
    let o = collect(&mut host).await;
    let e = o.exit.unwrap();
    assert_eq!(e.status, ExitStatus::Signal(libc::SIGKILL));
    assert!(!e.timed_out);
    assert!(t.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn host_closing_the_stream_kills_the_group() {
    let mut host = start(&req(Command::Argv(vec!["sleep".into(), "60".into()]))).await;
    let ExecEvent::Started { pid } = frame::expect_frame(&mut host, "Started").await.unwrap()
    else {
        panic!("no Started");
    };
    drop(host);
    assert!(
        wait_gone(pid, Duration::from_secs(2)).await,
        "sleep survived"
    );
}

#[tokio::test]
async fn background_holder_does_not_block_exit() {
    // The shell exits at once; a grandchild keeps stdout open for 5 s.
    let t = Instant::now();
    let o = run(sh("echo first; (sleep 5; echo late) &")).await;
    assert_eq!(o.exit.unwrap().status, ExitStatus::Code(0));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("first\n"));
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn children_get_default_sigpipe() {
    // With SIGPIPE ignored (as the Rust runtime sets it for itself) `yes` would never stop.
    let mut r = sh("yes | head -n 1");
    r.timeout_ms = Some(5000);
    let o = run(r).await;
    let e = o.exit.unwrap();
    assert!(!e.timed_out);
    assert_eq!(o.stdout, b"y\n");
}
