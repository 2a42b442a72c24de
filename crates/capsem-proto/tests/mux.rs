//! The multiplexer carries many concurrent streams both ways over one byte pipe.

use capsem_proto::frame;
use capsem_proto::mux::{accept, Mux, MuxHandle, Side};
use capsem_proto::port;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_open_both_ways_and_carry_data() {
    carry_both_ways(64 * 1024).await;
}

/// A pipe far smaller than a frame: every write of the channel is partial and most find the
/// pipe full, and still every byte arrives, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_narrow_pipe_carries_everything() {
    carry_both_ways(512).await;
}

/// Twenty streams each send 300 000 bytes to a guest that echoes them back, over a pipe of
/// `pipe` bytes; then the guest opens a stream towards the host.
async fn carry_both_ways(pipe: usize) {
    let (h, g) = tokio::io::duplex(pipe);
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

/// Every write that reached a channel end, in order.
type Writes = Arc<Mutex<Vec<Vec<u8>>>>;

/// A channel end that records every write reaching it.
struct Recording<T> {
    inner: T,
    writes: Writes,
}

impl<T: AsyncRead + Unpin> AsyncRead for Recording<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Recording<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = r {
            self.writes.lock().unwrap().push(data[..n].to_vec());
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

/// A host and a guest session over an in-memory pipe, every write of the host's end recorded:
/// the host's handle, the guest's inbound streams, the writes.
fn recorded_pair() -> (
    MuxHandle,
    tokio::sync::mpsc::Receiver<yamux::Stream>,
    Writes,
) {
    let (h, g) = tokio::io::duplex(1 << 20);
    let writes = Arc::new(Mutex::new(Vec::new()));
    let h = Recording {
        inner: h,
        writes: writes.clone(),
    };
    let (host, _host_in, _hd) = Mux::start(h, Side::Host);
    let (_guest, guest_in, _gd) = Mux::start(g, Side::Guest);
    (host, guest_in, writes)
}

/// A full TLS record (16 KiB of plaintext and 22 bytes) written to a stream crosses the channel
/// as one frame (yamux's own split size would cut it in two), and the frame's header and body
/// leave in one write of the channel (yamux writes them separately).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_record_is_one_frame_in_one_write() {
    const HEADER: usize = 12;
    let (host, mut guest_in, writes) = recorded_pair();
    let mut s = host.open(port::CONTROL).await.unwrap();
    let mut inb = accept(guest_in.recv().await.unwrap()).await.unwrap();

    let before = writes.lock().unwrap().len();
    let record = vec![0x17u8; 16 * 1024 + 22];
    s.write_all(&record).await.unwrap();
    s.flush().await.unwrap();
    let mut got = vec![0u8; record.len()];
    inb.stream.read_exact(&mut got).await.unwrap();
    assert_eq!(got, record);

    // Walk the yamux frames the host wrote meanwhile (a 12-byte header: version, type, flags,
    // stream id, length; a data frame's body follows), noting the write each began and ended in.
    let during: Vec<Vec<u8>> = writes.lock().unwrap()[before..].to_vec();
    let mut ends = Vec::new();
    let mut total = 0;
    for w in &during {
        total += w.len();
        ends.push(total);
    }
    let bytes = during.concat();
    let write_of = |offset: usize| ends.iter().position(|&e| offset < e).unwrap();
    let (mut at, mut data_frames) = (0, Vec::new());
    while at < bytes.len() {
        let header = &bytes[at..at + HEADER];
        let len = u32::from_be_bytes(header[8..12].try_into().unwrap()) as usize;
        let end = if header[1] == 0 {
            at + HEADER + len
        } else {
            at + HEADER
        };
        if header[1] == 0 {
            data_frames.push((len, write_of(at), write_of(end - 1)));
        }
        at = end;
    }
    assert_eq!(data_frames.len(), 1, "one data frame: {data_frames:?}");
    let (len, first, last) = data_frames[0];
    assert_eq!(len, record.len());
    assert_eq!(first, last, "the frame left in one write");
}

/// Frames that several streams send in one turn of the driver leave together: one write of
/// the channel (one system call, one wake-up of the peer), not one each; and none is held back.
#[tokio::test(flavor = "current_thread")]
async fn frames_of_one_turn_leave_in_one_write() {
    const STREAMS: usize = 6;
    let (host, mut guest_in, writes) = recorded_pair();
    let mut host_streams = Vec::new();
    let mut guest_streams = Vec::new();
    for _ in 0..STREAMS {
        host_streams.push(host.open(port::CONTROL).await.unwrap());
        guest_streams.push(accept(guest_in.recv().await.unwrap()).await.unwrap().stream);
    }

    // On this one-thread runtime the writers all run before the driver they wake.
    let before = writes.lock().unwrap().len();
    let writers: Vec<_> = host_streams
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            tokio::spawn(async move {
                s.write_all(&[i as u8; 100]).await.unwrap();
                s.flush().await.unwrap();
                s
            })
        })
        .collect();
    for (i, s) in guest_streams.iter_mut().enumerate() {
        let mut got = [0u8; 100];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [i as u8; 100]);
    }
    for w in writers {
        w.await.unwrap();
    }
    let during = writes.lock().unwrap()[before..].to_vec();
    assert_eq!(
        during.len(),
        1,
        "{STREAMS} frames in {} writes of {:?} bytes",
        during.len(),
        during.iter().map(Vec::len).collect::<Vec<_>>()
    );
    assert!(during[0].len() >= STREAMS * (12 + 100));
}
