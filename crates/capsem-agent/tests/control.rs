//! Control handler: echo, wait, file write/read, errors, shutdown reporting, unknown ports.

use std::os::unix::fs::PermissionsExt;

use capsem_agent::control::{self, Outcome};
use capsem_agent::serve::{serve_port, Mode};
use capsem_proto::control::{ControlRequest, ControlResponse};
use capsem_proto::frame;
use serde_bytes::ByteBuf;
use tokio::io::AsyncReadExt;

async fn call(r: ControlRequest) -> (ControlResponse, Outcome) {
    let (mut host, guest) = tokio::io::duplex(1 << 20);
    let h = tokio::spawn(async move { control::handle(guest, false).await.unwrap() });
    frame::write_frame(&mut host, &r).await.unwrap();
    let resp = frame::expect_frame(&mut host, "response").await.unwrap();
    (resp, h.await.unwrap())
}

#[tokio::test]
async fn echo_returns_the_payload() {
    let payload = ByteBuf::from((0..=255u8).collect::<Vec<_>>());
    let (r, o) = call(ControlRequest::Echo {
        payload: payload.clone(),
    })
    .await;
    assert_eq!(r, ControlResponse::Echo { payload });
    assert_eq!(o, Outcome::Done);
}

#[tokio::test]
async fn wait_answers_after_waiting_and_says_how_long() {
    let t = std::time::Instant::now();
    let (r, o) = call(ControlRequest::Wait { us: 20_000 }).await;
    let ControlResponse::Waited { us } = r else {
        panic!("expected Waited, got {r:?}");
    };
    assert!(us >= 20_000, "waited only {us} us");
    assert!(t.elapsed().as_micros() as u64 >= us);
    assert_eq!(o, Outcome::Done);
}

#[tokio::test]
async fn write_then_read_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a/b/c.txt");
    let p = path.to_string_lossy().into_owned();
    let (r, _) = call(ControlRequest::WriteFile {
        path: p.clone(),
        data: ByteBuf::from(b"content\0bin".to_vec()),
        mode: Some(0o600),
    })
    .await;
    assert_eq!(r, ControlResponse::Done);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let (r, _) = call(ControlRequest::ReadFile { path: p }).await;
    assert_eq!(
        r,
        ControlResponse::File {
            data: ByteBuf::from(b"content\0bin".to_vec())
        }
    );
}

#[tokio::test]
async fn reading_a_missing_file_is_an_error() {
    let (r, _) = call(ControlRequest::ReadFile {
        path: "/nonexistent/x".into(),
    })
    .await;
    assert!(matches!(r, ControlResponse::Error { message } if message.contains("/nonexistent/x")));
}

#[tokio::test]
async fn shutdown_is_acknowledged_and_reported_not_performed() {
    let (r, o) = call(ControlRequest::Shutdown { reboot: false }).await;
    assert_eq!(r, ControlResponse::Done);
    assert_eq!(o, Outcome::Shutdown { reboot: false });
}

#[tokio::test]
async fn unknown_port_closes_the_stream() {
    let (mut host, guest) = tokio::io::duplex(1024);
    serve_port(4242, guest, Mode::Standalone).await;
    let mut buf = Vec::new();
    assert_eq!(host.read_to_end(&mut buf).await.unwrap(), 0);
}
