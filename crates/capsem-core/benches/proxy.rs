//! MITM proxy throughput (issue 3): requests/s and latency through the proxy vs. direct to the
//! same local HTTPS upstream (keep-alive, small responses), and a 100 MiB download both ways.
//! Run: `cargo bench -p capsem-core --bench proxy` (`BENCH_SECS` per round, default 3;
//! `BENCH_ROUNDS` rounds of each path, alternating, default 5; `BENCH_CONNS` concurrent
//! keep-alive connections, default 8; `BENCH_PART=requests|download` runs one half;
//! `BENCH_PATH` names the paths to run instead of direct and proxy, comma-separated, a line per
//! round and the medians (throughput, CPU, ratio to the first named) at the end: one alone
//! for profiling it, several to compare them in one sitting; `bare` is the proxy without the
//! channel's multiplexer, `splice` a MITM proxy with no HTTP at all (see [`splice`]);
//! `BENCH_NO_RECORD=1` leaves out the session record).
//! Besides throughput it reports the CPU time the process spent per request and per download:
//! on a noisy machine that ratio moves far less than the wall-clock one.
//!
//! The proxy path is the real one minus the VM: the client plays the guest relay — one yamux
//! session over a UNIX socket (as QEMU's chardev is), a stream per connection with the
//! `NetOpen::Tcp` frame, then TLS — and the proxy side accepts the streams exactly as
//! capsem-process does, terminates TLS with a minted leaf, applies the policy, records the
//! request in a real `session.db`, and forwards over its own TLS connection to the upstream.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use capsem_core::net::{Ca, Network, PolicySource};
use capsem_proto::mux::{Mux, MuxHandle, Side};
use capsem_proto::net::NetOpen;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};

const NAME: &str = "bench.example";

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}
const BIG: usize = 100 << 20;

fn main() {
    let number = |name: &str, default: usize| -> usize {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (secs, conns, rounds) = (
        number("BENCH_SECS", 3) as u64,
        number("BENCH_CONNS", 8),
        number("BENCH_ROUNDS", 5),
    );
    // Checked before anything is made, so that a misspelt name leaves nothing behind.
    let chosen = match std::env::var("BENCH_PATH") {
        Err(_) => None,
        Ok(list) => match list.split(',').map(|n| Which::parse(n.trim())).collect() {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("BENCH_PATH: {e}");
                std::process::exit(2);
            }
        },
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(Duration::from_secs(secs), conns, rounds, chosen));
}

async fn run(round: Duration, conns: usize, rounds: usize, chosen: Option<Vec<Which>>) {
    let dir = tempfile::tempdir().unwrap();
    let (up_port, up_ca) = upstream(dir.path()).await;
    std::fs::write(
        dir.path().join("user.toml"),
        capsem_core::net::stand_in::policy_for(NAME, up_port, &dir.path().join("upstream-ca.pem")),
    )
    .unwrap();
    let ca = Arc::new(Ca::load_or_create(&dir.path().join("ca")).unwrap());
    let policy =
        PolicySource::new(dir.path().join("user.toml"), dir.path().join("corp.toml")).unwrap();
    let recorder = capsem_core::telemetry::Recorder::open(&dir.path().join("session.db")).unwrap();
    let recorder = (std::env::var_os("BENCH_NO_RECORD").is_none()).then_some(recorder);
    let net = Arc::new(Network::new(ca.clone(), policy, recorder));
    let bare_net = net.clone();
    // The channel: a yamux session over a UNIX socket pair, host side feeding the proxy.
    let (host_io, guest_io) = tokio::net::UnixStream::pair().unwrap();
    let (_host, mut inbound, _closed) = Mux::start(host_io, Side::Host);
    tokio::spawn(async move {
        while let Some(stream) = inbound.recv().await {
            let net = net.clone();
            tokio::spawn(async move {
                if let Ok(inb) = capsem_proto::mux::accept(stream).await {
                    net.handle(inb.stream).await;
                }
            });
        }
    });
    let (guest, _guest_inbound, _guest_closed) = Mux::start(guest_io, Side::Guest);
    let direct = Target {
        route: Route::Direct(up_port),
        roots: up_ca,
    };
    let (splice_guest, splice_ca) = splice(dir.path(), direct.clone());
    let paths = Paths {
        direct,
        proxy: Target {
            route: Route::Relay(guest),
            roots: ca.cert_der(),
        },
        bare: Target {
            route: Route::Bare(bare_net),
            roots: ca.cert_der(),
        },
        splice: Target {
            route: Route::Relay(splice_guest),
            roots: splice_ca,
        },
        chosen,
    };
    println!(
        "machine: {} cores; {conns} keep-alive connections, {} s rounds",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        round.as_secs()
    );
    let part = std::env::var("BENCH_PART").unwrap_or_default();
    if part != "download" {
        requests(&paths, conns, round, rounds).await;
    }
    if part != "requests" {
        downloads(&paths, rounds).await;
    }
}

/// `rounds` rounds of small keep-alive GETs each way, alternating; medians and percentiles.
async fn requests(paths: &Paths, conns: usize, round: Duration, rounds: usize) {
    let (direct, via) = (&paths.direct, &paths.proxy);
    let (mut d_rps, mut p_rps) = (Vec::new(), Vec::new());
    let (mut d_cpu, mut p_cpu) = (Vec::new(), Vec::new());
    let (mut d_lat, mut p_lat) = (Vec::new(), Vec::new());
    // The paths `BENCH_PATH` names, a line per round: one alone for profiling it (`perf
    // record` of this), several to compare them in one sitting.
    if let Some(chosen) = &paths.chosen {
        let mut seen = vec![(Vec::new(), Vec::new()); chosen.len()];
        for _ in 0..rounds {
            for (which, seen) in chosen.iter().zip(&mut seen) {
                let (r, c, l) = load(paths.get(*which), conns, round).await;
                println!(
                    "{:7} {r:8.0} req/s  cpu {c:.1} us/req  ({} requests)",
                    which.name(),
                    l.len()
                );
                seen.0.push(r);
                seen.1.push(c);
            }
        }
        medians(chosen, &mut seen, "req/s", "us/req");
        return;
    }
    for _ in 0..rounds {
        let (r, c, mut l) = load(direct, conns, round).await;
        d_rps.push(r);
        d_cpu.push(c);
        d_lat.append(&mut l);
        let (r, c, mut l) = load(via, conns, round).await;
        p_rps.push(r);
        p_cpu.push(c);
        p_lat.append(&mut l);
    }
    let (d, p) = (median(&mut d_rps), median(&mut p_rps));
    let (dc, pc) = (median(&mut d_cpu), median(&mut p_cpu));
    println!(
        "direct  {d:8.0} req/s  p50 {:.3} ms  p99 {:.3} ms  cpu {dc:.1} us/req",
        pct(&mut d_lat, 0.5),
        pct(&mut d_lat, 0.99)
    );
    println!(
        "proxy   {p:8.0} req/s  p50 {:.3} ms  p99 {:.3} ms  cpu {pc:.1} us/req",
        pct(&mut p_lat, 0.5),
        pct(&mut p_lat, 0.99)
    );
    println!(
        "ratio   {:8.3}  (targets: ratio >= 0.5, proxy >= 5000 req/s); cpu per request direct/proxy {:.3}",
        p / d,
        dc / pc
    );
    ceiling("request", pc - dc, "us", dc);
}

/// The paths the bench can take to the upstream.
struct Paths {
    direct: Target,
    proxy: Target,
    /// The proxy without the channel's multiplexer, to tell the channel's share of the proxy
    /// path from the proxy's own (only through `BENCH_PATH`).
    bare: Target,
    /// A MITM proxy with no HTTP, on a channel like the proxy path's (only through
    /// `BENCH_PATH`).
    splice: Target,
    /// The paths `BENCH_PATH` names, in its order, when it is set.
    chosen: Option<Vec<Which>>,
}

/// A path `BENCH_PATH` can name.
#[derive(Clone, Copy)]
enum Which {
    Direct,
    Proxy,
    Bare,
    Splice,
}

impl Which {
    const ALL: [Which; 4] = [Which::Direct, Which::Proxy, Which::Bare, Which::Splice];

    fn name(self) -> &'static str {
        match self {
            Which::Direct => "direct",
            Which::Proxy => "proxy",
            Which::Bare => "bare",
            Which::Splice => "splice",
        }
    }

    fn parse(name: &str) -> Result<Which, String> {
        Which::ALL
            .into_iter()
            .find(|w| w.name() == name)
            .ok_or_else(|| {
                format!("unknown path {name:?}; the paths are direct, proxy, bare and splice")
            })
    }
}

impl Paths {
    fn get(&self, which: Which) -> &Target {
        match which {
            Which::Direct => &self.direct,
            Which::Proxy => &self.proxy,
            Which::Bare => &self.bare,
            Which::Splice => &self.splice,
        }
    }
}

/// The medians of each chosen path's rounds (throughput and CPU), and its throughput's ratio to
/// the first path named. An even number of rounds takes the upper of the two middle values.
fn medians(chosen: &[Which], seen: &mut [(Vec<f64>, Vec<f64>)], unit: &str, cpu_unit: &str) {
    let first = median(&mut seen[0].0);
    for (which, (rate, cpu)) in chosen.iter().zip(seen) {
        let m = median(rate);
        println!(
            "median  {:7} {m:8.0} {unit}  cpu {:.1} {cpu_unit}  ratio to {} {:.3}",
            which.name(),
            median(cpu),
            chosen[0].name(),
            m / first
        );
    }
}

/// The proxy's own CPU beside that of the client and the upstream together. A MITM proxy is a
/// TLS + HTTP server towards the guest and a TLS + HTTP client towards the upstream, i.e. the
/// work of both ends again: at 1.00 here the proxy adds nothing of its own, and on a machine
/// whose cores are all busy the throughput ratio is then 1 / (1 + 1.00) = 0.5.
fn ceiling(what: &str, own: f64, unit: &str, ends: f64) {
    println!(
        "   proxy's own cpu per {what} {own:.1} {unit} = {:.2} x (client + upstream); \
         a proxy doing exactly their work again lands at ratio 0.5",
        own / ends
    );
}

/// `rounds` 100 MiB downloads each way, alternating; medians.
async fn downloads(paths: &Paths, rounds: usize) {
    let (direct, via) = (&paths.direct, &paths.proxy);
    let (mut d_mb, mut p_mb) = (Vec::new(), Vec::new());
    let (mut d_cpu, mut p_cpu) = (Vec::new(), Vec::new());
    if let Some(chosen) = &paths.chosen {
        let mut seen = vec![(Vec::new(), Vec::new()); chosen.len()];
        for _ in 0..rounds {
            for (which, seen) in chosen.iter().zip(&mut seen) {
                let (r, c) = download(paths.get(*which)).await;
                println!(
                    "{:7} {r:6.0} MiB/s  cpu {c:.0} ms per 100 MiB",
                    which.name()
                );
                seen.0.push(r);
                seen.1.push(c);
            }
        }
        medians(chosen, &mut seen, "MiB/s", "ms per 100 MiB");
        return;
    }
    for _ in 0..rounds {
        let (r, c) = download(direct).await;
        d_mb.push(r);
        d_cpu.push(c);
        let (r, c) = download(via).await;
        p_mb.push(r);
        p_cpu.push(c);
    }
    let (d, p) = (median(&mut d_mb), median(&mut p_mb));
    let (dc, pc) = (median(&mut d_cpu), median(&mut p_cpu));
    println!(
        "100 MiB download: direct {d:.0} MiB/s ({dc:.0} ms cpu), proxy {p:.0} MiB/s ({pc:.0} ms cpu), \
         ratio {:.3} (target >= 0.5); cpu direct/proxy {:.3}",
        p / d,
        dc / pc
    );
    ceiling("download", pc - dc, "ms", dc);
}

#[derive(Clone)]
struct Target {
    route: Route,
    /// The CA the client trusts on this path.
    roots: CertificateDer<'static>,
}

#[derive(Clone)]
enum Route {
    /// TCP to the upstream's port.
    Direct(u16),
    /// The guest end of the channel: a stream per connection, the `NetOpen` frame first.
    Relay(MuxHandle),
    /// The proxy itself, over a UNIX socket pair of its own per connection.
    Bare(Arc<Network>),
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// A stream to the proxy, after the relay's `NetOpen` frame for port 443.
async fn relayed<S: tokio::io::AsyncWrite + Unpin>(mut s: S) -> S {
    let open = NetOpen::Tcp {
        port: 443,
        process: None,
    };
    capsem_proto::frame::write_frame(&mut s, &open)
        .await
        .unwrap();
    s
}

async fn connect(t: &Target) -> Sender {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls_to(t).await))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// A TLS connection along `t`'s route, trusting `t`'s CA, to the name the upstream serves.
async fn tls_to(t: &Target) -> tokio_rustls::client::TlsStream<Box<dyn Io>> {
    let io: Box<dyn Io> = match &t.route {
        Route::Relay(mux) => {
            Box::new(relayed(mux.open(capsem_proto::port::MITM).await.unwrap()).await)
        }
        Route::Bare(net) => {
            let (mine, theirs) = tokio::net::UnixStream::pair().unwrap();
            tokio::spawn(net.clone().handle(theirs));
            Box::new(relayed(mine).await)
        }
        Route::Direct(port) => {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", *port))
                .await
                .unwrap();
            tcp.set_nodelay(true).unwrap();
            Box::new(tcp)
        }
    };
    let cfg = capsem_core::net::stand_in::client_trusting(t.roots.clone()).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from(NAME).unwrap(), io)
        .await
        .unwrap()
}

fn get(path: &str) -> hyper::Request<Empty<Bytes>> {
    hyper::Request::get(path)
        .header("host", NAME)
        .body(Empty::new())
        .unwrap()
}

/// `conns` connections issuing small GETs back to back for `round`: (req/s, CPU µs of the
/// whole process per request, latencies in ms).
async fn load(t: &Target, conns: usize, round: Duration) -> (f64, f64, Vec<f64>) {
    let mut tasks = Vec::new();
    let cpu0 = cpu_ms();
    let start = Instant::now();
    let end = start + round;
    for _ in 0..conns {
        let mut s = connect(t).await;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < end {
                let t0 = Instant::now();
                s.ready().await.unwrap();
                let resp = s.send_request(get("/small")).await.unwrap();
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(&body[..], b"ok");
                lat.push(t0.elapsed().as_secs_f64() * 1000.0);
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let n = all.len() as f64;
    (
        n / start.elapsed().as_secs_f64(),
        (cpu_ms() - cpu0) * 1000.0 / n,
        all,
    )
}

/// One 100 MiB GET: (MiB/s, CPU ms of the whole process). The client reads in a task of the
/// runtime, as the requests half's clients do, not on the bench's main thread: there it would
/// be a third busy thread on two cores, and the kernel's shuffling of three threads between
/// two cores is noise, not either path's cost.
async fn download(t: &Target) -> (f64, f64) {
    let t = t.clone();
    tokio::spawn(async move { download_here(&t).await })
        .await
        .unwrap()
}

async fn download_here(t: &Target) -> (f64, f64) {
    let mut s = connect(t).await;
    let t0 = Instant::now();
    let cpu0 = cpu_ms();
    let resp = s.send_request(get("/big")).await.unwrap();
    let mut body = resp.into_body();
    let mut n = 0usize;
    while let Some(f) = body.frame().await {
        if let Ok(d) = f.unwrap().into_data() {
            n += d.len();
        }
    }
    assert_eq!(n, BIG);
    (
        (n as f64 / (1 << 20) as f64) / t0.elapsed().as_secs_f64(),
        cpu_ms() - cpu0,
    )
}

/// A MITM proxy that does nothing but its two TLS connections: on a channel of its own built
/// like the proxy path's (a yamux session over a UNIX socket pair, the `NetOpen` frame first),
/// it terminates the guest's TLS with a certificate made once for the name, opens a TLS
/// connection to the upstream per guest connection and copies the plaintext between them
/// ([`pipe`]); no HTTP, no policy, no record. Beside the proxy path it shows what the proxy's
/// HTTP handling costs. Returns the guest end of its channel and the CA its certificate is from.
fn splice(dir: &std::path::Path, upstream: Target) -> (MuxHandle, CertificateDer<'static>) {
    let tls =
        capsem_core::net::stand_in::stand_in_tls(&[NAME], &dir.join("splice-ca.pem")).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls.config));
    let upstream = Arc::new(upstream);
    let (host_io, guest_io) = tokio::net::UnixStream::pair().unwrap();
    let (_host, mut inbound, _closed) = Mux::start(host_io, Side::Host);
    tokio::spawn(async move {
        while let Some(stream) = inbound.recv().await {
            let (acceptor, upstream) = (acceptor.clone(), upstream.clone());
            tokio::spawn(async move {
                let mut s = capsem_proto::mux::accept(stream).await.unwrap().stream;
                let _: NetOpen = capsem_proto::frame::expect_header(&mut s, "the network request")
                    .await
                    .unwrap();
                let guest = acceptor.accept(s).await.unwrap();
                pipe(guest, tls_to(&upstream).await).await;
            });
        }
    });
    let (guest, _inbound, _closed) = Mux::start(guest_io, Side::Guest);
    (guest, tls.ca_der)
}

/// Copy plaintext both ways between the guest's TLS and the upstream's, pipelined as the proxy
/// is: towards the guest one task reads (decrypts) while another writes (encrypts), so a
/// download keeps both cores busy; towards the upstream one task copies. One task doing
/// everything (tokio's `copy_bidirectional`) halved the download's throughput here
/// (docs/benchmarks.md, fourteenth session).
async fn pipe<G: Io + 'static, U: Io + 'static>(guest: G, up: U) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut guest_rd, mut guest_wr) = tokio::io::split(guest);
    let (mut up_rd, mut up_wr) = tokio::io::split(up);
    let upward = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut guest_rd, &mut up_wr).await;
        // The upstream learns the guest is done (close_notify, then FIN) and ends its side.
        let _ = up_wr.shutdown().await;
    });
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let reader = tokio::spawn(async move {
        loop {
            let mut b = bytes::BytesMut::with_capacity(64 << 10);
            match up_rd.read_buf(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if tx.send(b.freeze()).await.is_err() {
                return;
            }
        }
    });
    while let Some(b) = rx.recv().await {
        if guest_wr.write_all(&b).await.is_err() {
            break;
        }
        // rustls may still hold records the channel did not take: send them once nothing more
        // is queued, not after every piece.
        if rx.is_empty() && guest_wr.flush().await.is_err() {
            break;
        }
    }
    // The upstream has ended (or the guest is gone): tell the guest, and let the upward copy
    // finish what the guest still sends.
    let _ = guest_wr.shutdown().await;
    let _ = upward.await;
    reader.abort();
}

/// The stand-in upstream: `/small` → "ok", `/big` → 100 MiB in 64 KiB chunks. Returns its
/// port and CA certificate (also written to `upstream-ca.pem`).
async fn upstream(dir: &std::path::Path) -> (u16, CertificateDer<'static>) {
    let tls =
        capsem_core::net::stand_in::stand_in_tls(&[NAME], &dir.join("upstream-ca.pem")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let svc = hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
        let body = if req.uri().path() == "/big" {
            let chunk = Bytes::from(vec![0x5a; 64 << 10]);
            let chunks = (0..BIG / chunk.len())
                .map(move |_| Ok::<_, std::convert::Infallible>(Frame::data(chunk.clone())));
            StreamBody::new(futures::stream::iter(chunks)).boxed()
        } else {
            http_body_util::Full::new(Bytes::from_static(b"ok"))
                .map_err(|never| match never {})
                .boxed()
        };
        Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
    });
    tokio::spawn(capsem_core::net::stand_in::serve(
        listener,
        Some(Arc::new(tls.config)),
        svc,
    ));
    (port, tls.ca_der)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// CPU time (user + system) the whole process has used: client, proxy and upstream together.
fn cpu_ms() -> f64 {
    // SAFETY: getrusage fills the struct it is given; all-zero is a valid rusage.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 * 1000.0 + v.tv_usec as f64 / 1000.0;
    t(u.ru_utime) + t(u.ru_stime)
}
