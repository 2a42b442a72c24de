//! Host-side harness for a real boot: starts QEMU (microvm, TCG unless `ACCEL=kvm`) with the
//! agent's initrd, plays the host end of the channel (UNIX socket, QEMU connects as client),
//! checks echo, exec, a 5 MiB stream, files, a terminal and shutdown, and prints timings.
//! Not part of the product; the real host side lives in capsem-core.
//!
//! Usage: `cargo run --example boot_probe -- [--probe] [DIR]` where DIR (default
//! `/tmp/agent-test`) holds `initrd.img`, `rootfs.squashfs`, `disk.img`; `KERNEL` overrides
//! the kernel path, `NOSEED=1` leaves out the `capsem.seed=` RNG seed, `SMP`/`MEM` the vCPUs (1) and MiB (1024), `APPEND` adds kernel arguments
//! `QEMU_EXTRA` QEMU arguments and `SERIAL_OPTS` options of the virtio-serial device (for
//! example `,max_ports=2`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use capsem_proto::control::{ControlRequest, ControlResponse};
use capsem_proto::exec::{Command, ExecEvent, ExecExit, ExecRequest};
use capsem_proto::frame;
use capsem_proto::lifecycle::{GuestReady, HostHello};
use capsem_proto::mux::{accept, Mux, MuxHandle, Side};
use capsem_proto::terminal::{TerminalEvent, TerminalInput, TerminalRequest};
use capsem_proto::{port, PROTOCOL_VERSION};
use serde_bytes::ByteBuf;
use sha2::{Digest, Sha256};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn qemu(dir: &Path, probe: bool, sock: &Path, server: bool) -> tokio::process::Command {
    let kernel = std::env::var("KERNEL")
        .unwrap_or_else(|_| "/tmp/k/x/boot/vmlinuz-6.1.0-56-cloud-amd64".to_string());
    let accel = std::env::var("ACCEL").unwrap_or_else(|_| "tcg".to_string());
    let khz = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("cpu MHz"))
                .and_then(|l| l.split(':').nth(1))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .map(|mhz| (mhz * 1000.0) as u64)
        .unwrap_or(2_000_000);
    let mut append = format!(
        "console=ttyS0 quiet tsc_early_khz={khz} tsc=reliable panic=-1 capsem.hostname=test"
    );
    if probe {
        append.push_str(" capsem.probe=1");
    }
    // A fresh RNG seed for every boot, as the host should pass (`NOSEED=1` leaves it out).
    if std::env::var_os("NOSEED").is_none() {
        let mut seed = [0u8; 32];
        if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
            use std::io::Read;
            let _ = f.read_exact(&mut seed);
        }
        append.push_str(" capsem.seed=");
        append.extend(seed.iter().map(|b| format!("{b:02x}")));
    }
    if let Ok(extra) = std::env::var("APPEND") {
        append.push(' ');
        append.push_str(&extra);
    }
    let d = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let smp = std::env::var("SMP").unwrap_or_else(|_| "1".to_string());
    let mem = std::env::var("MEM").unwrap_or_else(|_| "1024".to_string());
    let mut c = tokio::process::Command::new("qemu-system-x86_64");
    c.args([
        "-M",
        &format!("microvm,accel={accel}"),
        "-m",
        &mem,
        "-smp",
        &smp,
    ])
    .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
    .args(["-serial", &format!("file:{}", d("serial.log"))])
    .args([
        "-kernel",
        &kernel,
        "-initrd",
        &d("initrd.img"),
        "-append",
        &append,
    ])
    .args([
        "-drive",
        &format!(
            "id=root,file={},format=raw,readonly=on,if=none",
            d("rootfs.squashfs")
        ),
    ])
    .args([
        "-device",
        "virtio-blk-device,drive=root,serial=capsem-rootfs",
    ])
    .args([
        "-drive",
        &format!("id=disk,file={},format=raw,if=none", d("disk.img")),
    ])
    .args(["-device", "virtio-blk-device,drive=disk,serial=capsem-disk"])
    .args([
        "-device",
        &format!(
            "virtio-serial-device{}",
            std::env::var("SERIAL_OPTS").unwrap_or_default()
        ),
    ])
    .args([
        "-chardev",
        &format!(
            "socket,id=ch0,path={},server={}",
            sock.display(),
            if server { "on,wait=off" } else { "off" }
        ),
    ])
    .args(["-device", "virtserialport,chardev=ch0,name=capsem.0"])
    .stdin(Stdio::null())
    .kill_on_drop(true);
    if let Ok(extra) = std::env::var("QEMU_EXTRA") {
        c.args(extra.split_whitespace());
    }
    c
}

struct ExecResult {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit: Option<ExecExit>,
    sha: String,
    rtt: Duration,
}

async fn exec(h: &MuxHandle, cmd: &str, keep: bool) -> Res<ExecResult> {
    let t = Instant::now();
    let mut s = h.open(port::EXEC).await?;
    let req = ExecRequest {
        command: Command::Shell(cmd.into()),
        env: vec![],
        cwd: None,
        stdin: false,
        timeout_ms: Some(60_000),
    };
    frame::write_frame(&mut s, &req).await?;
    let mut r = ExecResult {
        stdout: vec![],
        stderr: vec![],
        exit: None,
        sha: String::new(),
        rtt: Duration::ZERO,
    };
    let mut sha = Sha256::new();
    while let Some(ev) = frame::read_frame::<_, ExecEvent>(&mut s).await? {
        match ev {
            ExecEvent::Stdout(b) => {
                sha.update(&b);
                if keep {
                    r.stdout.extend_from_slice(&b)
                }
            }
            ExecEvent::Stderr(b) => r.stderr.extend_from_slice(&b),
            ExecEvent::Exit(e) => {
                // A host acts on Exit; the stream's FIN follows.
                r.exit = Some(e);
                break;
            }
            ExecEvent::Failed { message } => return Err(message.into()),
            ExecEvent::Started { .. } => {}
        }
    }
    r.rtt = t.elapsed();
    r.sha = sha.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok(r)
}

async fn control(h: &MuxHandle, req: ControlRequest) -> Res<ControlResponse> {
    let mut s = h.open(port::CONTROL).await?;
    frame::write_frame(&mut s, &req).await?;
    Ok(frame::expect_frame(&mut s, "control response").await?)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

async fn terminal(h: &MuxHandle) -> Res<String> {
    let mut t = h.open(port::TERMINAL).await?;
    let req = TerminalRequest {
        command: None,
        env: vec![],
        term: "xterm".into(),
        cols: 80,
        rows: 24,
    };
    frame::write_frame(&mut t, &req).await?;
    frame::write_frame(
        &mut t,
        &TerminalInput::Resize {
            cols: 132,
            rows: 43,
        },
    )
    .await?;
    let input = b"echo $((6*7)); stty size; hostname; exit 4\n".to_vec();
    frame::write_frame(&mut t, &TerminalInput::Data(ByteBuf::from(input))).await?;
    let mut out = String::new();
    loop {
        match frame::read_frame::<_, TerminalEvent>(&mut t).await? {
            Some(TerminalEvent::Data(d)) => out.push_str(&String::from_utf8_lossy(&d)),
            Some(TerminalEvent::Exit(s)) => {
                out.push_str(&format!("\n[exit {s:?}]"));
                return Ok(out);
            }
            other => return Err(format!("unexpected {other:?}").into()),
        }
    }
}

/// Connect to QEMU's chardev server and complete the handshake; returns the mux handle.
async fn handshake(sock: &Path) -> Res<(MuxHandle, GuestReady, impl Drop)> {
    let t = Instant::now();
    let conn = loop {
        match tokio::net::UnixStream::connect(sock).await {
            Ok(c) => break c,
            Err(_) if t.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => return Err(e.into()),
        }
    };
    // The mux driver never closes its socket by itself: keep a clone to shut it down with.
    let std_conn = conn.into_std()?;
    let killer = std_conn.try_clone()?;
    let conn = tokio::net::UnixStream::from_std(std_conn)?;
    let (h, mut inbound, _done) = Mux::start(conn, Side::Host);
    let first = tokio::time::timeout(Duration::from_secs(60), inbound.recv())
        .await?
        .ok_or("channel closed before the guest was ready")?;
    let mut lc = accept(first).await?;
    let ready: GuestReady = frame::expect_frame(&mut lc.stream, "GuestReady").await?;
    frame::write_frame(
        &mut lc.stream,
        &HostHello::Accepted {
            protocol_version: PROTOCOL_VERSION,
        },
    )
    .await?;
    Ok((h, ready, Hangup(killer, Some(Box::new((lc, inbound))))))
}

/// Closes the connection when dropped.
struct Hangup(
    std::os::unix::net::UnixStream,
    Option<Box<dyn std::any::Any + Send>>,
);
impl Drop for Hangup {
    fn drop(&mut self) {
        self.1.take();
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

/// Suspend/resume-style reconnects: QEMU serves the socket; the host connects, handshakes,
/// goes away and comes back; the agent must greet every new connection.
async fn reconnect(dir: &Path) -> Res<()> {
    let sock = dir.join("ch.sock");
    let _ = std::fs::remove_file(&sock);
    let mut child = qemu(dir, false, &sock, true).spawn()?;
    for round in 0..3 {
        let (h, ready, guard) = handshake(&sock).await?;
        let r = control(
            &h,
            ControlRequest::Echo {
                payload: ByteBuf::from(vec![round as u8]),
            },
        )
        .await?;
        let e = exec(&h, "echo round $((1+1))", true).await?;
        println!(
            "connection {round}: ready_ms {} echo {:?} exec {:?}",
            ready.boot.ready_ms,
            r,
            String::from_utf8_lossy(&e.stdout).trim()
        );
        if round == 2 {
            control(&h, ControlRequest::Shutdown { reboot: false }).await?;
            let st = tokio::time::timeout(Duration::from_secs(30), child.wait()).await??;
            println!("shutdown: qemu exited {st}");
        }
        drop(h);
        drop(guard);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

async fn probe(dir: &Path) -> Res<()> {
    let _ = std::fs::remove_file(dir.join("serial.log"));
    let t = Instant::now();
    // The probe boot needs no channel: give QEMU a socket that nobody serves.
    let sock = dir.join("probe.sock");
    let _ = std::fs::remove_file(&sock);
    let _l = tokio::net::UnixListener::bind(&sock)?;
    let st = qemu(dir, true, &sock, false).status().await?;
    let log = std::fs::read_to_string(dir.join("serial.log"))?;
    println!(
        "probe: qemu exited {st} after {:?}; probe line present: {}",
        t.elapsed(),
        log.contains("CAPSEM-PROBE-OK")
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let probe_only = args.iter().any(|a| a == "--probe");
    let dir = PathBuf::from(
        args.iter()
            .find(|a| !a.starts_with("--"))
            .cloned()
            .unwrap_or_else(|| "/tmp/agent-test".into()),
    );
    if probe_only {
        return probe(&dir).await;
    }
    if args.iter().any(|a| a == "--reconnect") {
        return reconnect(&dir).await;
    }
    let sock = dir.join("ch.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = tokio::net::UnixListener::bind(&sock)?;
    let _ = std::fs::remove_file(dir.join("serial.log"));
    let t0 = Instant::now();
    let mut child = qemu(&dir, false, &sock, false).spawn()?;
    let (conn, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept()).await??;
    println!("qemu connected the channel after {:?}", t0.elapsed());
    let (h, mut inbound, _done) = Mux::start(conn, Side::Host);
    let first = tokio::time::timeout(Duration::from_secs(60), inbound.recv())
        .await?
        .ok_or("channel closed before the guest was ready")?;
    let first_stream = t0.elapsed();
    let mut lc = accept(first).await?;
    let ready: GuestReady = frame::expect_frame(&mut lc.stream, "GuestReady").await?;
    let ready_wall = t0.elapsed();
    println!("first inbound stream at {first_stream:?}");
    frame::write_frame(
        &mut lc.stream,
        &HostHello::Accepted {
            protocol_version: PROTOCOL_VERSION,
        },
    )
    .await?;
    let b = &ready.boot;
    println!(
        "GuestReady: agent {} kernel {} protocol {}",
        ready.agent_version, ready.kernel_release, ready.protocol_version
    );
    println!(
        "boot (guest uptime ms): init {} modules {} rootfs {} ready {}  => ready-init {} ms",
        b.init_ms,
        b.modules_ms,
        b.rootfs_ms,
        b.ready_ms,
        b.ready_ms - b.init_ms
    );
    println!("wall: qemu start -> GuestReady {ready_wall:?}");
    if args.iter().any(|a| a == "--boot-only") {
        let t = Instant::now();
        let r = exec(&h, "true", false).await?;
        println!("first exec `true`: rtt {:?} {:?}", t.elapsed(), r.exit);
        control(&h, ControlRequest::Shutdown { reboot: false }).await?;
        child.wait().await?;
        println!("total wall: {:?}", t0.elapsed());
        return Ok(());
    }

    let mut echo = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let r = control(
            &h,
            ControlRequest::Echo {
                payload: ByteBuf::from(vec![1u8; 64]),
            },
        )
        .await?;
        echo.push(t.elapsed());
        assert!(matches!(r, ControlResponse::Echo { .. }));
    }
    println!(
        "echo round trip (new stream each): median {:?}",
        median(echo)
    );

    let r = exec(
        &h,
        "uname -a; id; cat /proc/mounts | cut -d' ' -f1-3; hostname; nproc; grep Cpus_allowed_list /proc/1/status /proc/self/status; cat /sys/devices/system/cpu/online",
        true,
    )
    .await?;
    println!(
        "exec uname: {:?} rtt {:?}\n{}{}",
        r.exit,
        r.rtt,
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );

    let mut over = Vec::new();
    let mut rtts = Vec::new();
    for _ in 0..40 {
        let r = exec(&h, "true", false).await?;
        let e = r.exit.ok_or("no exit")?;
        rtts.push(r.rtt);
        over.push(
            r.rtt
                .saturating_sub(Duration::from_micros(e.spawn_to_exit_us)),
        );
    }
    println!(
        "exec `true` x40: median rtt {:?}, median rtt - spawn_to_exit {:?}",
        median(rtts),
        median(over)
    );

    let r = exec(
        &h,
        "head -c 5242880 /dev/urandom > /tmp/blob && sha256sum /tmp/blob",
        true,
    )
    .await?;
    let guest_sha = String::from_utf8_lossy(&r.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string();
    let t = Instant::now();
    let r = exec(&h, "cat /tmp/blob", false).await?;
    let el = t.elapsed();
    println!(
        "5 MiB stream: {:?} in {:?} ({:.1} MiB/s); sha match: {}",
        r.exit.map(|e| e.status),
        el,
        5.0 / el.as_secs_f64(),
        r.sha == guest_sha
    );

    let data = ByteBuf::from((0..100_000u32).map(|i| i as u8).collect::<Vec<_>>());
    let w = control(
        &h,
        ControlRequest::WriteFile {
            path: "/root/dir/file.bin".into(),
            data: data.clone(),
            mode: Some(0o640),
        },
    )
    .await?;
    let rd = control(
        &h,
        ControlRequest::ReadFile {
            path: "/root/dir/file.bin".into(),
        },
    )
    .await?;
    println!(
        "write/read file: {:?}, read back equal: {}",
        w,
        rd == ControlResponse::File { data }
    );

    println!("terminal:\n{}", terminal(&h).await?);

    let t = Instant::now();
    let r = control(&h, ControlRequest::Shutdown { reboot: false }).await?;
    let st = tokio::time::timeout(Duration::from_secs(30), child.wait()).await??;
    println!("shutdown: {r:?}; qemu exited {st} {:?} later", t.elapsed());
    drop(lc);
    Ok(())
}
