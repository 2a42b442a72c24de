//! One VM, owned by one `capsem-process`: create its disk, launch the hypervisor, establish the
//! guest channel, then serve the per-VM API on `run/instances/<id>.sock` until the VM ends.
//!
//! State machine (one owner: [`run`]):
//! ```text
//!   Launching ──channel ready──▶ Serving ──/kill, /shutdown or VM exit──▶ Exited
//!       └──VM exit / timeout──▶ Failed (reported on the ready pipe)
//! ```
//! Only this module (through [`crate::hypervisor`]) touches the QEMU process.

mod routes;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::api::VmInfo;
use crate::channel::{ChannelError, GuestChannel};
use crate::hypervisor::{self, Accel, HypervisorError, VmSpec};
use crate::paths::Home;
use crate::record::SessionRecord;

/// Extra guest kernel arguments, for debugging and A/B measurements (e.g. `capsem.trace=1`).
/// Read by capsem-process, so set it where the service starts.
pub const KERNEL_ARGS_ENV: &str = "CAPSEM_KERNEL_ARGS";

/// How long QEMU gets to connect its end of the channel after launch.
const CONNECT_LIMIT: Duration = Duration::from_secs(10);
/// How long the guest gets to boot to the ready handshake.
const READY_LIMIT: Duration = Duration::from_secs(90);

#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("session {0} has no readable session.json")]
    Record(String, #[source] std::io::Error),
    #[error(transparent)]
    Assets(#[from] crate::image::ImageError),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error("could not bind {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error("QEMU exited during boot ({0}); see `capsem logs`")]
    VmExited(String),
    #[error(transparent)]
    Ca(#[from] crate::net::CaError),
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    #[error(transparent)]
    Telemetry(#[from] crate::telemetry::TelemetryError),
    #[error("the guest did not accept the capsem CA: {0}")]
    TrustCa(String),
    #[error("setting up the session's network failed: {0}")]
    NetworkSetup(String),
}

pub struct InstanceConfig {
    pub home: Home,
    pub id: String,
    pub accel: Accel,
}

/// Shared with the route handlers.
pub(crate) struct Instance {
    pub guest: crate::channel::Guest,
    pub info: VmInfo,
    pub env: Vec<(String, String)>,
    /// Notified when the instance should end (`/kill` or `/shutdown`).
    pub stop: Notify,
    /// True when the guest was asked to power off (wait for it) rather than killed.
    pub graceful: std::sync::atomic::AtomicBool,
    /// The session's record (exec jobs go here; the network writes its own).
    pub recorder: Option<crate::telemetry::Recorder>,
}

impl Instance {
    pub(crate) fn record_exec(&self, command: &str, exit_code: Option<i32>, took: Duration) {
        if let Some(r) = &self.recorder {
            r.record(crate::telemetry::Event::Exec(crate::telemetry::ExecEvent {
                command: command.to_string(),
                exit_code,
                duration: took,
            }));
        }
    }
}

/// Boot the VM and serve until it ends. `ready` is called once: with the VM's info when the guest
/// is ready and the API is up, or with the error that stopped the boot.
pub async fn run(
    cfg: InstanceConfig,
    ready: impl FnOnce(Result<&VmInfo, &InstanceError>),
) -> Result<(), InstanceError> {
    let mut ready = Some(ready);
    let result = boot_and_serve(&cfg, &mut ready).await;
    if let (Err(e), Some(r)) = (&result, ready.take()) {
        r(Err(e));
    }
    let dir = cfg.home.session_dir(&cfg.id);
    for f in ["channel.sock", "qmp.sock"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let _ = std::fs::remove_file(cfg.home.instance_socket(&cfg.id));
    result
}

async fn boot_and_serve<F>(cfg: &InstanceConfig, ready: &mut Option<F>) -> Result<(), InstanceError>
where
    F: FnOnce(Result<&VmInfo, &InstanceError>),
{
    let dir = cfg.home.session_dir(&cfg.id);
    let record = SessionRecord::load(&dir).map_err(|e| InstanceError::Record(cfg.id.clone(), e))?;
    let assets = crate::image::load(&cfg.home.assets_root())?;
    let hv = hypervisor::detect(cfg.accel)?;
    // The network side (CA, policy, session record, system roots: tens of milliseconds) is
    // made while the guest boots; the guest needs it only after its handshake.
    let network_task = {
        let (home, dir) = (cfg.home.clone(), dir.clone());
        tokio::task::spawn_blocking(move || -> Result<crate::net::Network, InstanceError> {
            Ok(crate::net::Network::new(
                Arc::new(crate::net::Ca::load_or_create(&home.ca_dir())?),
                crate::net::PolicySource::for_home(&home)?,
                Some(crate::telemetry::Recorder::open(
                    &dir.join(crate::telemetry::DB_FILE),
                )?),
            ))
        })
    };

    tracing::debug!(id = %cfg.id, "instance: starting");
    let disk = dir.join("disk.qcow2");
    if !disk.exists() {
        hv.create_disk(&assets.base_disk, &disk)?;
        tracing::debug!(id = %cfg.id, "instance: disk created");
    }
    let channel_path = dir.join("channel.sock");
    let listener =
        crate::uds_http::bind_private(&channel_path).map_err(|source| InstanceError::Bind {
            path: channel_path.clone(),
            source,
        })?;
    let spec = VmSpec {
        kernel: assets.kernel.clone(),
        initrd: assets.initrd.clone(),
        rootfs: assets.rootfs.clone(),
        disk,
        ram_mb: record.ram_mb,
        cpus: record.cpus,
        channel_socket: channel_path,
        control_socket: dir.join("qmp.sock"),
        serial_log: dir.join("serial.log"),
        hostname: record.name.clone().unwrap_or_else(|| "capsem".into()),
        cmdline_extra: std::env::var(KERNEL_ARGS_ENV)
            .map(|v| v.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default(),
    };
    let started = Instant::now();
    let mut vm = hv.launch(&spec)?;
    tracing::info!(id = %cfg.id, pid = vm.pid, accel = cfg.accel.as_str(), "VM launched");

    let channel = tokio::select! {
        ch = GuestChannel::establish(&listener, CONNECT_LIMIT, READY_LIMIT) => ch?,
        status = vm.child.wait() => {
            let why = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
            return Err(InstanceError::VmExited(why));
        }
    };
    let network = Arc::new(
        network_task
            .await
            .map_err(|e| InstanceError::NetworkSetup(e.to_string()))??,
    );
    let guest = channel.handle();
    serve_guest_streams(channel.inbound, network.clone());
    match guest
        .control(&capsem_proto::control::ControlRequest::TrustCa {
            pem: network.ca.cert_pem().to_string(),
        })
        .await?
    {
        capsem_proto::control::ControlResponse::Done => {}
        other => return Err(InstanceError::TrustCa(format!("{other:?}"))),
    }
    let boot_wall_ms = started.elapsed().as_millis() as u64;
    let info = VmInfo {
        hypervisor: hv.name().to_string(),
        accel: cfg.accel.as_str().to_string(),
        process_pid: std::process::id(),
        qemu_pid: vm.pid,
        agent_version: channel.ready.agent_version.clone(),
        kernel_release: channel.ready.kernel_release.clone(),
        boot: channel.ready.boot.clone(),
        boot_wall_ms,
    };
    tracing::info!(id = %cfg.id, boot_wall_ms, guest_ready_ms = info.boot.ready_ms, "guest ready");

    let sock = cfg.home.instance_socket(&cfg.id);
    let api = crate::uds_http::bind_private(&sock).map_err(|source| InstanceError::Bind {
        path: sock.clone(),
        source,
    })?;
    let inst = Arc::new(Instance {
        guest,
        info,
        env: record.env.clone(),
        stop: Notify::new(),
        graceful: std::sync::atomic::AtomicBool::new(false),
        recorder: network.recorder.clone(),
    });
    if let Some(r) = ready.take() {
        r(Ok(&inst.info));
    }
    let server = axum::serve(api, routes::router(inst.clone()));
    let mut closed = channel.closed;
    tokio::select! {
        r = server => { tracing::warn!(?r, "instance API server ended"); }
        _ = inst.stop.notified() => { tracing::info!(id = %cfg.id, "stop requested"); }
        status = vm.child.wait() => { tracing::info!(id = %cfg.id, ?status, "VM exited"); return Ok(()); }
        _ = &mut closed => { tracing::info!(id = %cfg.id, "guest channel closed"); }
    }
    // A guest asked to power off gets a moment to do so; otherwise QEMU is killed at once
    // (an ephemeral disk is thrown away, so there is nothing to flush).
    let grace = if inst.graceful.load(std::sync::atomic::Ordering::SeqCst) {
        Duration::from_secs(10)
    } else {
        Duration::ZERO
    };
    if tokio::time::timeout(grace, vm.child.wait()).await.is_err() {
        let _ = vm.child.kill().await;
    }
    Ok(())
}

/// Hand every stream the guest opens on the network port to the proxy; others are closed.
fn serve_guest_streams(
    mut inbound: tokio::sync::mpsc::Receiver<yamux::Stream>,
    network: Arc<crate::net::Network>,
) {
    tokio::spawn(async move {
        while let Some(stream) = inbound.recv().await {
            let network = network.clone();
            tokio::spawn(async move {
                match capsem_proto::mux::accept(stream).await {
                    Ok(inb) if inb.port == capsem_proto::port::MITM => {
                        network.handle(inb.stream).await
                    }
                    Ok(inb) => tracing::warn!(port = inb.port, "guest opened an unknown port"),
                    Err(e) => tracing::debug!(error = %e, "guest stream without a header"),
                }
            });
        }
    });
}
