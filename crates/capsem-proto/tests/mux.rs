//! The multiplexer carries many concurrent streams both ways over one byte pipe.

use capsem_proto::frame;
use capsem_proto::mux::{accept, Mux, Side};
use capsem_proto::port;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_open_both_ways_and_carry_data() {
    let (h, g) = tokio::io::duplex(64 * 1024);
    let (host, mut _host_in, _hd) = Mux::start(h, Side::Host);
    let (guest, mut guest_in, _gd) = Mux::start(g, Side::Guest);

    // Guest echoes every stream it is given.
    tokio::spawn(async move {
        while let Some(s) = guest_in.recv().await {
            tokio::spawn(async move {
                let mut inb = accept(s).await.unwrap();
                assert_eq!(inb.port, port::CONTROL);
                let mut buf = Vec::new();
                inb.stream.read_to_end(&mut buf).await.unwrap();
                inb.stream.write_all(&buf).await.unwrap();
                inb.stream.shutdown().await.unwrap();
            });
        }
    });

    let mut jobs = Vec::new();
    for i in 0..20u8 {
        let host = host.clone();
        jobs.push(tokio::spawn(async move {
            let mut s = host.open(port::CONTROL).await.unwrap();
            let data = vec![i; 300_000];
            s.write_all(&data).await.unwrap();
            s.shutdown().await.unwrap();
            let mut back = Vec::new();
            s.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, data);
        }));
    }
    for j in jobs {
        j.await.unwrap();
    }

    // And the guest can open towards the host.
    let mut s = guest.open(port::LIFECYCLE).await.unwrap();
    frame::write_frame(&mut s, &42u32).await.unwrap();
    let inbound = _host_in.recv().await.unwrap();
    let mut inb = accept(inbound).await.unwrap();
    assert_eq!(inb.port, port::LIFECYCLE);
    let v: u32 = frame::expect_frame(&mut inb.stream, "value").await.unwrap();
    assert_eq!(v, 42);
}
