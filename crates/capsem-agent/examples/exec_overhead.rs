//! Native micro-benchmark of the agent's exec path: a host mux and the agent's server in one
//! process over an in-memory pipe; reports the median exec round trip, the guest-reported
//! spawn-to-exit time, their difference (the protocol + agent overhead) and the echo round trip.
//! Not part of the product.

use std::time::{Duration, Instant};

use capsem_agent::serve::{serve_connection, Mode};
use capsem_proto::control::{ControlRequest, ControlResponse};
use capsem_proto::exec::{Command, ExecEvent, ExecRequest};
use capsem_proto::frame;
use capsem_proto::lifecycle::{BootTiming, GuestReady, HostHello};
use capsem_proto::mux::{accept, Mux, Side};
use capsem_proto::{port, PROTOCOL_VERSION};
use serde_bytes::ByteBuf;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (h, g) = tokio::io::duplex(256 * 1024);
        let ready = GuestReady {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "bench".into(),
            kernel_release: String::new(),
            boot: BootTiming::default(),
        };
        tokio::spawn(serve_connection(g, ready, Mode::Standalone));
        let (host, mut inbound, _done) = Mux::start(h, Side::Host);
        let mut lc = accept(inbound.recv().await.unwrap()).await.unwrap();
        let _: GuestReady = frame::expect_frame(&mut lc.stream, "ready").await.unwrap();
        frame::write_frame(
            &mut lc.stream,
            &HostHello::Accepted {
                protocol_version: PROTOCOL_VERSION,
            },
        )
        .await
        .unwrap();

        let n = 300;
        let (mut rtts, mut over, mut echo) = (vec![], vec![], vec![]);
        for _ in 0..n {
            let t = Instant::now();
            let mut c = host.open(port::CONTROL).await.unwrap();
            let req = ControlRequest::Echo {
                payload: ByteBuf::from(vec![0u8; 16]),
            };
            frame::write_frame(&mut c, &req).await.unwrap();
            let _: ControlResponse = frame::expect_frame(&mut c, "echo").await.unwrap();
            echo.push(t.elapsed());
        }
        for _ in 0..n {
            let t = Instant::now();
            let mut s = host.open(port::EXEC).await.unwrap();
            let req = ExecRequest {
                command: Command::Argv(vec!["/bin/true".into()]),
                env: vec![],
                cwd: Some("/".into()),
                stdin: false,
                timeout_ms: None,
            };
            frame::write_frame(&mut s, &req).await.unwrap();
            loop {
                match frame::read_frame::<_, ExecEvent>(&mut s).await.unwrap() {
                    Some(ExecEvent::Exit(e)) => {
                        let rtt = t.elapsed();
                        rtts.push(rtt);
                        over.push(rtt.saturating_sub(Duration::from_micros(e.spawn_to_exit_us)));
                        break;
                    }
                    Some(_) => {}
                    None => panic!("no exit"),
                }
            }
        }
        println!(
            "echo rtt {:?}; exec /bin/true rtt {:?}, rtt - spawn_to_exit {:?}",
            median(echo),
            median(rtts),
            median(over)
        );
    });
}
