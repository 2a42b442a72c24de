//! Pins the encoding of the guest protocol. If one of these fails, a message changed shape:
//! bump `PROTOCOL_VERSION` and update the expected bytes together.

use capsem_proto::control::{ControlRequest, ControlResponse};
use capsem_proto::exec::{Command, ExecEvent, ExecExit, ExecInput, ExecRequest};
use capsem_proto::frame;
use capsem_proto::lifecycle::{BootTiming, GuestReady, HostHello};
use capsem_proto::net::{DnsAnswer, NetOpen};
use capsem_proto::terminal::{TerminalEvent, TerminalInput, TerminalRequest};
use capsem_proto::{ExitStatus, StreamOpen, PROTOCOL_VERSION};
use serde_bytes::ByteBuf;

fn hex<T: serde::Serialize>(msg: &T) -> String {
    frame::encode(msg)
        .unwrap()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn exit_tag_leads_the_exit_frame() {
    let body = frame::encode(&ExecEvent::Exit(ExecExit {
        status: ExitStatus::Code(0),
        timed_out: false,
        spawn_to_exit_us: 0,
    }))
    .unwrap();
    assert_eq!(body[4], capsem_proto::exec::EXIT_TAG);
    let out = frame::encode(&ExecEvent::Stdout(ByteBuf::from(vec![3u8]))).unwrap();
    assert_ne!(out[4], capsem_proto::exec::EXIT_TAG);
}

#[test]
fn protocol_version_is_pinned() {
    assert_eq!(PROTOCOL_VERSION, 4);
}

#[test]
fn encodings_are_stable() {
    let cases: Vec<(String, &str)> = vec![
        (hex(&StreamOpen { port: 5005 }), "02000000 8d27"),
        (
            hex(&GuestReady {
                protocol_version: 1,
                agent_version: "0.1.0".into(),
                kernel_release: "6.1".into(),
                boot: BootTiming {
                    init_ms: 1,
                    modules_ms: 2,
                    rootfs_ms: 3,
                    ready_ms: 4,
                },
            }),
            "0f000000 01 05302e312e30 03362e31 01020304",
        ),
        (
            hex(&HostHello::Accepted {
                protocol_version: 1,
            }),
            "02000000 0001",
        ),
        (
            hex(&ControlRequest::Echo {
                payload: ByteBuf::from(vec![7u8]),
            }),
            "03000000 000107",
        ),
        (hex(&ControlResponse::Done), "01000000 02"),
        (hex(&ControlRequest::Wait { us: 300 }), "03000000 06ac02"),
        (hex(&ControlResponse::Waited { us: 300 }), "03000000 04ac02"),
        (
            hex(&ControlRequest::TrustCa { pem: "P".into() }),
            "03000000 040150",
        ),
        (
            hex(&ControlRequest::Identity {
                hostname: "h".into(),
                seed: ByteBuf::from(vec![1u8]),
                unix_ns: 2,
            }),
            "06000000 05016801 0102",
        ),
        (
            hex(&NetOpen::Dns { name: "a.b".into() }),
            "05000000 0003612e62",
        ),
        (
            hex(&NetOpen::Tcp {
                port: 443,
                process: Some("curl".into()),
            }),
            "09000000 01bb0301 046375726c",
        ),
        (
            hex(&DnsAnswer::Deny { rule: "x".into() }),
            "03000000 010178",
        ),
        (
            hex(&ExecRequest {
                command: Command::Shell("true".into()),
                env: vec![("K".into(), "V".into())],
                cwd: None,
                stdin: false,
                timeout_ms: Some(1000),
            }),
            "10000000 0004747275 6501014b0156 00 00 01e807",
        ),
        (hex(&ExecInput::CloseStdin), "01000000 01"),
        (
            hex(&ExecEvent::Stdout(ByteBuf::from(b"hi".to_vec()))),
            "04000000 01026869",
        ),
        (
            hex(&ExecEvent::Exit(ExecExit {
                status: ExitStatus::Signal(9),
                timed_out: true,
                spawn_to_exit_us: 300,
            })),
            "06000000 03 0112 01 ac02",
        ),
        (
            hex(&TerminalRequest {
                command: None,
                env: vec![],
                term: "xterm".into(),
                cols: 80,
                rows: 24,
            }),
            "0a000000 0000 057874657 26d 50 18",
        ),
        (
            hex(&TerminalInput::Resize {
                cols: 100,
                rows: 30,
            }),
            "03000000 01 64 1e",
        ),
        (
            hex(&TerminalEvent::Exit(ExitStatus::Code(3))),
            "03000000 01 0006",
        ),
    ];
    for (got, want) in cases {
        assert_eq!(got, want.replace(' ', ""), "encoding drifted");
    }
}

#[tokio::test]
async fn frames_round_trip_and_limits_hold() {
    let (mut a, mut b) = tokio::io::duplex(1 << 20);
    let big = ByteBuf::from(vec![0xAB; 5 << 20]);
    let w = tokio::spawn(async move {
        frame::write_frame(&mut a, &ExecEvent::Stdout(big))
            .await
            .unwrap();
        // A header announcing more than MAX_FRAME must be refused by the reader.
        use tokio::io::AsyncWriteExt;
        a.write_all(&(u32::MAX).to_le_bytes()).await.unwrap();
    });
    let got: ExecEvent = frame::expect_frame(&mut b, "data").await.unwrap();
    assert_eq!(got, ExecEvent::Stdout(ByteBuf::from(vec![0xAB; 5 << 20])));
    let err = frame::read_frame::<_, ExecEvent>(&mut b).await.unwrap_err();
    assert!(matches!(err, frame::FrameError::TooLarge(_, _)));
    w.await.unwrap();
}

#[tokio::test]
async fn a_stream_header_is_small_and_a_length_alone_allocates_nothing() {
    use tokio::io::AsyncWriteExt;
    // A header frame over MAX_HEADER is refused (a peer opening many streams cannot make the
    // other side hold much for each).
    let (mut a, mut b) = tokio::io::duplex(64 * 1024);
    let open = NetOpen::Dns {
        name: "x".repeat(frame::MAX_HEADER),
    };
    frame::write_frame(&mut a, &open).await.unwrap();
    let err = frame::expect_header::<_, NetOpen>(&mut b, "the header")
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        frame::FrameError::TooLarge(_, frame::MAX_HEADER)
    ));
    // A frame that announces MAX_FRAME bytes and then ends is a torn frame, not 64 MiB held.
    let (mut a, mut b) = tokio::io::duplex(64);
    a.write_all(&(frame::MAX_FRAME as u32).to_le_bytes())
        .await
        .unwrap();
    a.write_all(b"abc").await.unwrap();
    drop(a);
    let err = frame::read_frame::<_, ExecInput>(&mut b).await.unwrap_err();
    assert!(matches!(err, frame::FrameError::UnexpectedEof(_)), "{err}");
}

#[tokio::test]
async fn clean_eof_is_none_and_torn_frame_is_error() {
    let (a, mut b) = tokio::io::duplex(64);
    drop(a);
    assert!(frame::read_frame::<_, ExecInput>(&mut b)
        .await
        .unwrap()
        .is_none());

    let (mut a, mut b) = tokio::io::duplex(64);
    use tokio::io::AsyncWriteExt;
    a.write_all(&[5, 0]).await.unwrap();
    drop(a);
    assert!(frame::read_frame::<_, ExecInput>(&mut b).await.is_err());
}
