//! The multiplexer carries many concurrent streams both ways over one byte pipe.

use capsem_proto::frame;
use capsem_proto::mux::{accept, Mux, Side};
use capsem_proto::port;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

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

/// A channel end that counts the writes reaching it and their bytes.
struct Counting<T> {
    inner: T,
    writes: Arc<AtomicUsize>,
    bytes: Arc<AtomicUsize>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counting<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counting<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = r {
            self.writes.fetch_add(1, Ordering::SeqCst);
            self.bytes.fetch_add(n, Ordering::SeqCst);
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A full TLS record (16 KiB of plaintext and 22 bytes) written to a stream crosses the channel
/// as one frame (yamux's own split size would cut it in two), and the frame's header and body
/// leave in one write of the channel (yamux writes them separately).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_record_is_one_frame_in_one_write() {
    let (h, g) = tokio::io::duplex(1 << 20);
    let (writes, bytes) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let h = Counting {
        inner: h,
        writes: writes.clone(),
        bytes: bytes.clone(),
    };
    let (host, _host_in, _hd) = Mux::start(h, Side::Host);
    let (_guest, mut guest_in, _gd) = Mux::start(g, Side::Guest);
    let mut s = host.open(port::CONTROL).await.unwrap();
    let mut inb = accept(guest_in.recv().await.unwrap()).await.unwrap();
    // One exchange first, so that the session's opening (its round-trip ping) is over.
    s.write_all(b"x").await.unwrap();
    s.flush().await.unwrap();
    let mut one = [0u8; 1];
    inb.stream.read_exact(&mut one).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;

    let (w0, b0) = (writes.load(Ordering::SeqCst), bytes.load(Ordering::SeqCst));
    let record = vec![0x17u8; 16 * 1024 + 22];
    s.write_all(&record).await.unwrap();
    s.flush().await.unwrap();
    let mut got = vec![0u8; record.len()];
    inb.stream.read_exact(&mut got).await.unwrap();
    assert_eq!(got, record);
    assert_eq!(
        bytes.load(Ordering::SeqCst) - b0,
        12 + record.len(),
        "one frame header"
    );
    assert_eq!(writes.load(Ordering::SeqCst) - w0, 1, "one write");
}
