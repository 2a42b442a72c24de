//! The whole server over a real mux pair on the host: lifecycle handshake, then control, exec and
//! terminal streams side by side; a refusal ends the connection.

use capsem_agent::serve::{serve_connection, Mode, ServeError};
use capsem_proto::control::{ControlRequest, ControlResponse};
use capsem_proto::exec::{Command, ExecEvent, ExecRequest};
use capsem_proto::frame;
use capsem_proto::lifecycle::{BootTiming, GuestReady, HostHello};
use capsem_proto::mux::{accept, Mux, Side};
use capsem_proto::terminal::{TerminalEvent, TerminalInput, TerminalRequest};
use capsem_proto::{port, ExitStatus, PROTOCOL_VERSION};
use serde_bytes::ByteBuf;

fn ready() -> GuestReady {
    GuestReady {
        protocol_version: PROTOCOL_VERSION,
        agent_version: "test".into(),
        kernel_release: capsem_agent::serve::kernel_release(),
        boot: BootTiming::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_then_streams() {
    let (h, g) = tokio::io::duplex(256 * 1024);
    let agent = tokio::spawn(serve_connection(g, ready(), Mode::Standalone));
    let (host, mut inbound, _done) = Mux::start(h, Side::Host);

    let mut lc = accept(inbound.recv().await.unwrap()).await.unwrap();
    assert_eq!(lc.port, port::LIFECYCLE);
    let gr: GuestReady = frame::expect_frame(&mut lc.stream, "GuestReady")
        .await
        .unwrap();
    assert_eq!(gr.protocol_version, PROTOCOL_VERSION);
    frame::write_frame(
        &mut lc.stream,
        &HostHello::Accepted {
            protocol_version: PROTOCOL_VERSION,
        },
    )
    .await
    .unwrap();

    let mut jobs = Vec::new();
    for i in 0..8 {
        let host = host.clone();
        jobs.push(tokio::spawn(async move {
            let mut s = host.open(port::EXEC).await.unwrap();
            let req = ExecRequest {
                command: Command::Shell(format!("echo job{i}; exit {i}")),
                env: vec![],
                cwd: None,
                stdin: false,
                timeout_ms: None,
            };
            frame::write_frame(&mut s, &req).await.unwrap();
            let mut out = Vec::new();
            let mut status = None;
            while let Some(ev) = frame::read_frame::<_, ExecEvent>(&mut s).await.unwrap() {
                match ev {
                    ExecEvent::Stdout(b) => out.extend_from_slice(&b),
                    ExecEvent::Exit(e) => status = Some(e.status),
                    _ => {}
                }
            }
            assert_eq!(out, format!("job{i}\n").as_bytes());
            assert_eq!(status, Some(ExitStatus::Code(i)));
        }));
    }

    let mut c = host.open(port::CONTROL).await.unwrap();
    let payload = ByteBuf::from(vec![9u8; 100_000]);
    frame::write_frame(
        &mut c,
        &ControlRequest::Echo {
            payload: payload.clone(),
        },
    )
    .await
    .unwrap();
    let r: ControlResponse = frame::expect_frame(&mut c, "echo").await.unwrap();
    assert_eq!(r, ControlResponse::Echo { payload });

    let mut t = host.open(port::TERMINAL).await.unwrap();
    let req = TerminalRequest {
        command: Some("/bin/sh".into()),
        env: vec![],
        term: "dumb".into(),
        cols: 80,
        rows: 24,
    };
    frame::write_frame(&mut t, &req).await.unwrap();
    frame::write_frame(
        &mut t,
        &TerminalInput::Data(ByteBuf::from(b"echo $((6*7)); exit 5\n".to_vec())),
    )
    .await
    .unwrap();
    let mut out = String::new();
    let status = loop {
        match frame::read_frame::<_, TerminalEvent>(&mut t).await.unwrap() {
            Some(TerminalEvent::Data(d)) => out.push_str(&String::from_utf8_lossy(&d)),
            Some(TerminalEvent::Exit(s)) => break s,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(out.contains("42"), "{out:?}");
    assert_eq!(status, ExitStatus::Code(5));

    for j in jobs {
        j.await.unwrap();
    }
    assert!(!agent.is_finished());
}

#[tokio::test]
async fn channel_closing_ends_the_connection() {
    let (h, g) = tokio::io::duplex(64 * 1024);
    let agent = tokio::spawn(serve_connection(g, ready(), Mode::Standalone));
    drop(h);
    let r = tokio::time::timeout(std::time::Duration::from_secs(5), agent).await;
    assert!(r.expect("agent did not notice").unwrap().is_err());
}

#[tokio::test]
async fn refusal_ends_the_connection() {
    let (h, g) = tokio::io::duplex(64 * 1024);
    let agent = tokio::spawn(serve_connection(g, ready(), Mode::Standalone));
    let (_host, mut inbound, _done) = Mux::start(h, Side::Host);
    let mut lc = accept(inbound.recv().await.unwrap()).await.unwrap();
    let _: GuestReady = frame::expect_frame(&mut lc.stream, "GuestReady")
        .await
        .unwrap();
    frame::write_frame(
        &mut lc.stream,
        &HostHello::Refused {
            reason: "too old".into(),
        },
    )
    .await
    .unwrap();
    match agent.await.unwrap() {
        Err(ServeError::Refused(r)) => assert_eq!(r, "too old"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}
