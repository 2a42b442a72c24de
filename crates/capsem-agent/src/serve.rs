//! The agent's server: one mux session per host connection over the channel, the lifecycle
//! handshake, and dispatch of inbound streams to the port handlers.
//!
//! ```text
//!   wait for host ──▶ Mux::start ──▶ open LIFECYCLE, send GuestReady ──▶ HostHello
//!        ▲                                   Refused: print, power off ◀──┤
//!        │                                                     Accepted ──▼
//!        └──────────── channel EOF (host went away) ◀──── serve inbound streams
//! ```
//!
//! Power is only touched in [`Mode::Vm`]; [`Mode::Standalone`] (tests, manual runs) never powers
//! anything off.

use std::os::fd::OwnedFd;
use std::time::Duration;

use capsem_proto::frame::{self, FrameError};
use capsem_proto::lifecycle::{BootTiming, GuestReady, HostHello};
use capsem_proto::mux::{self, Mux, MuxError, Side};
use capsem_proto::{port, PROTOCOL_VERSION};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::control::{self, Outcome};
use crate::{channel, clock, console, exec, power, terminal};

/// Whether this agent is a VM's init (may power off) or a standalone process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Vm,
    Standalone,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("opening the lifecycle stream failed")]
    Lifecycle(#[source] MuxError),
    #[error("the lifecycle handshake failed")]
    Handshake(#[source] FrameError),
    #[error("the host refused the agent: {0}")]
    Refused(String),
    #[error("finding the channel failed")]
    Channel(#[from] channel::ChannelError),
    #[error("starting the runtime failed")]
    Runtime(#[source] std::io::Error),
}

/// Find and open the channel, build the runtime and [`run`] on it. Blocks.
pub fn start(boot: BootTiming, mode: Mode) -> Result<(), ServeError> {
    console::trace(|| "agent child started".into());
    let path = channel::find_port(capsem_proto::CHANNEL_PORT_NAME, channel::APPEAR_TIMEOUT)?;
    let fd = channel::open(&path)?;
    console::trace(|| format!("channel {} open", path.display()));
    // The mux draws random ids: wait for the kernel RNG here, visibly, not inside it.
    let waited = crate::boot::entropy::wait_ready();
    if waited > Duration::from_millis(50) {
        console::line(&format!(
            "waited {} ms for the kernel RNG to be seeded (pass capsem.seed=<hex> or give the VM an RNG)",
            waited.as_millis()
        ));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;
    console::trace(|| "runtime built".into());
    rt.block_on(run(fd, boot, mode))
}

/// The running kernel's release (`uname -r`).
pub fn kernel_release() -> String {
    // SAFETY: uname fills a utsname we own; the field is NUL-terminated.
    unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut u) != 0 {
            return String::new();
        }
        std::ffi::CStr::from_ptr(u.release.as_ptr())
            .to_string_lossy()
            .into_owned()
    }
}

/// Serve the host over the channel port for as long as the VM runs: one mux session per
/// host connection. Returns only when the host refuses the agent.
pub async fn run(port: OwnedFd, mut boot: BootTiming, mode: Mode) -> Result<(), ServeError> {
    let release = kernel_release();
    let mut first = true;
    let link = crate::net::HostLink::default();
    if mode == Mode::Vm {
        crate::net::start(link.clone());
    }
    loop {
        // Failing to wait or to register (out of descriptors, say) is worth a retry, not the
        // VM: the agent returning powers it off.
        let stream = channel::wait_host(&port)
            .await
            .and_then(|()| channel::session_stream(&port));
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                console::line(&format!("waiting for the host failed: {e}; trying again"));
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        console::trace(|| "host connected".into());
        if first {
            boot.ready_ms = clock::uptime_ms();
        }
        let ready = GuestReady {
            protocol_version: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            kernel_release: release.clone(),
            boot: boot.clone(),
        };
        let conn = serve_connection_linked(stream, ready, mode, &link).await;
        link.set(None);
        match conn {
            Ok(()) => {}
            Err(ServeError::Refused(reason)) => {
                console::line(&format!("host refused the agent: {reason}"));
                if mode == Mode::Vm {
                    power::power_off();
                }
                return Err(ServeError::Refused(reason));
            }
            Err(e) => console::line(&format!("host session ended: {}", console::chain(&e))),
        }
        first = false;
        console::line("host channel closed; waiting for the host");
    }
}

/// One host connection: start the mux on `io`, do the lifecycle handshake with `ready`, then
/// serve inbound streams until the connection ends.
pub async fn serve_connection<T>(io: T, ready: GuestReady, mode: Mode) -> Result<(), ServeError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    serve_connection_linked(io, ready, mode, &crate::net::HostLink::default()).await
}

/// [`serve_connection`], publishing the connection's mux handle on `link` once the host has
/// accepted the agent (the DNS server and relay open their streams with it).
pub async fn serve_connection_linked<T>(
    io: T,
    ready: GuestReady,
    mode: Mode,
    link: &crate::net::HostLink,
) -> Result<(), ServeError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (handle, mut inbound, mut done) = Mux::start(io, Side::Guest);
    let mut lifecycle = handle
        .open(port::LIFECYCLE)
        .await
        .map_err(ServeError::Lifecycle)?;
    console::trace(|| "lifecycle stream open".into());
    frame::write_frame(&mut lifecycle, &ready)
        .await
        .map_err(ServeError::Handshake)?;
    console::trace(|| "GuestReady sent".into());
    match frame::expect_frame(&mut lifecycle, "HostHello")
        .await
        .map_err(ServeError::Handshake)?
    {
        HostHello::Accepted { .. } => {
            console::trace(|| "HostHello received".into());
            link.set(Some(handle.clone()));
        }
        HostHello::Refused { reason } => return Err(ServeError::Refused(reason)),
    }
    let b = &ready.boot;
    console::line(&format!(
        "ready: init {} ms, modules {} ms, rootfs {} ms, ready {} ms",
        b.init_ms, b.modules_ms, b.rootfs_ms, b.ready_ms
    ));
    loop {
        tokio::select! {
            s = inbound.recv() => match s {
                Some(s) => { tokio::spawn(dispatch(s, mode)); }
                None => break,
            },
            _ = &mut done => break,
        }
    }
    drop(lifecycle);
    Ok(())
}

/// Read a stream's header and run its port's handler.
pub async fn dispatch(stream: yamux::Stream, mode: Mode) {
    let Ok(inb) = mux::accept(stream).await else {
        return;
    };
    serve_port(inb.port, inb.stream, mode).await;
}

/// Run the handler for `port` on `stream` (tests call this with any byte stream).
pub async fn serve_port<S>(port_no: u16, mut stream: S, mode: Mode)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match port_no {
        port::CONTROL => match control::handle(stream, mode == Mode::Vm).await {
            Ok(Outcome::Done) => {}
            Ok(Outcome::Shutdown { reboot }) => {
                if mode == Mode::Vm {
                    // Let the reply leave the virtqueue before the machine goes away.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    power::quiesce();
                    if reboot {
                        power::reboot();
                    }
                    power::power_off();
                }
            }
            Err(e) => console::line(&format!("control: {}", console::chain(&e))),
        },
        port::EXEC => {
            if let Err(e) = exec::handle(stream).await {
                console::line(&format!("exec: {}", console::chain(&e)));
            }
        }
        port::TERMINAL => {
            if let Err(e) = terminal::handle(stream).await {
                console::line(&format!("terminal: {}", console::chain(&e)));
            }
        }
        _ => {
            let _ = stream.shutdown().await;
        }
    }
}
