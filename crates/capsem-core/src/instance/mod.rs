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

use crate::api::{StartKind, VmInfo};
use crate::channel::{ChannelError, GuestChannel};
use crate::hypervisor::{self, Accel, HypervisorError, VmSpec};
use crate::paths::Home;
use crate::record::SessionRecord;

/// Extra guest kernel arguments, for debugging and A/B measurements (e.g. `capsem.trace=1`).
/// Read by capsem-process, so set it where the service starts.
pub const KERNEL_ARGS_ENV: &str = "CAPSEM_KERNEL_ARGS";

/// The serial console log in a VM's directory, beside the sockets QEMU and capsem share (the
/// guest channel's, where capsem listens, and QMP's, where QEMU listens).
const SERIAL_LOG: &str = "serial.log";

/// Point `spec`'s channel, QMP socket and console log into `dir`.
fn place(spec: &mut VmSpec, dir: &std::path::Path) {
    spec.socket_dir = dir.to_path_buf();
    spec.serial_log = dir.join(SERIAL_LOG);
}

/// Remove the sockets [`place`] put in `dir` (the VM is gone).
fn remove_sockets(dir: &std::path::Path) {
    for f in [hypervisor::CHANNEL_SOCKET, hypervisor::CONTROL_SOCKET] {
        let _ = std::fs::remove_file(dir.join(f));
    }
}

/// Where a suspended session's RAM and device state is saved (`sessions/<id>/state/vm.state`).
pub const STATE_DIR: &str = "state";
pub const STATE_FILE: &str = "vm.state";

/// How long a suspend may take to save the VM and quit.
const SUSPEND_LIMIT: Duration = Duration::from_secs(300);

/// How long QEMU gets to connect its end of the channel after launch.
const CONNECT_LIMIT: Duration = Duration::from_secs(10);
/// How long a cold-booting guest gets to reach the ready handshake (a boot takes ~2 s under
/// TCG); one that does not is booted again, once.
const READY_LIMIT: Duration = Duration::from_secs(40);
/// How long a resumed guest gets after it was hung up on; past that its saved state is set
/// aside and the session boots cold.
const RESUME_READY_LIMIT: Duration = Duration::from_secs(20);
/// How long a resumed guest gets to greet before it is hung up on and asked again (one that
/// missed the suspend's hang-up is still in its old session and never greets by itself).
const RESUME_GREET_LIMIT: Duration = Duration::from_secs(3);
/// How long the agent gets to say on the console that it saw the host hang up before a save
/// (it takes milliseconds on an idle machine).
const HANGUP_SEEN_LIMIT: Duration = Duration::from_secs(10);
/// The same, for a resumed guest hung up on for not greeting: one that never started a session
/// says nothing, so this is what such a guest costs before QEMU may redial.
const RESUME_HANGUP_SEEN_LIMIT: Duration = Duration::from_secs(3);

/// Fault injection for tests: suspend without hanging up first, so the saved guest is still
/// in its old channel session (the race the hang-up wait avoids), and resume must recover.
pub const FAULT_STALE_SUSPEND_ENV: &str = "CAPSEM_FAULT_STALE_SUSPEND";

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
    #[error("the restored guest did not take its new identity: {0}")]
    Identity(String),
    #[error("building the warm-start template failed: {0}")]
    Template(String),
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
    /// The session directory.
    pub dir: PathBuf,
    /// The guest channel's socket, to hang up on suspend.
    pub hangup: std::os::unix::net::UnixStream,
    /// Set while a suspend saves the VM: the channel closing then is expected, and QEMU is
    /// left to finish and quit by itself.
    pub suspending: std::sync::atomic::AtomicBool,
    /// Notified once the suspend's state file is safely on disk.
    pub saved: Notify,
    /// Serializes the operations that pause the VM (suspend, freeze).
    pub ops: tokio::sync::Mutex<()>,
    /// The backend (for new disk layers).
    pub hv: Box<dyn hypervisor::Hypervisor>,
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
    remove_sockets(&cfg.home.session_dir(&cfg.id));
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
        let aes = hypervisor::qemu::guest_has_aes(hv.accel());
        tokio::task::spawn_blocking(move || -> Result<crate::net::Network, InstanceError> {
            Ok(crate::net::Network::new(
                Arc::new(crate::net::Ca::load_or_create(&home.ca_dir())?),
                crate::net::PolicySource::for_home(&home)?,
                Some(crate::telemetry::Recorder::open(
                    &dir.join(crate::telemetry::DB_FILE),
                )?),
            )
            .guest_has_aes(aes))
        })
    };

    tracing::debug!(id = %cfg.id, "instance: starting");
    let cmdline_extra = kernel_args_from_env();
    // The top layer of the session's disk chain (a clone arrives with its layers linked in). A
    // new ephemeral session starts from the warm-start template when there is one for its size.
    let mut template = None;
    let mut taken_state = None;
    // The template's saved machine held open for QEMU across filesystems (see `warm::take`).
    let mut held_state = None;
    let mut other_template = false;
    let disk = match crate::disk::top_path(&dir)
        .map_err(|e| InstanceError::Record(cfg.id.clone(), e))?
    {
        Some(top) => top,
        None => {
            if !record.persistent && crate::warm::enabled() {
                let key = crate::warm::key(
                    &assets,
                    hv.as_ref(),
                    record.ram_mb,
                    record.cpus,
                    &cmdline_extra,
                );
                template = crate::warm::find(&assets, &key);
                other_template = template.is_none()
                    && crate::warm::usable(&assets)
                        .iter()
                        .any(|m| (m.ram_mb, m.cpus) == (record.ram_mb, record.cpus));
            }
            match template
                .as_ref()
                .map(|t| crate::warm::take(t, &dir, hv.as_ref()))
            {
                Some(Ok(taken)) => {
                    taken_state = Some(taken.state);
                    held_state = taken.held;
                    taken.top
                }
                Some(Err(e)) => {
                    // Nothing says the template is bad (a full disk, a template being
                    // replaced): this session boots cold, the template stays.
                    tracing::warn!(id = %cfg.id, error = %crate::error_chain(&e), "cannot take the warm-start template; booting cold");
                    template = None;
                    cold_disk(hv.as_ref(), &assets, &dir)?
                }
                None => cold_disk(hv.as_ref(), &assets, &dir)?,
            }
        }
    };
    // The VM writes the top from now on: it is no longer a fresh copy point.
    crate::disk::clear_fresh(&dir).map_err(|e| InstanceError::Record(cfg.id.clone(), e))?;
    let state = dir.join(STATE_DIR).join(STATE_FILE);
    let own_state = state.is_file();
    let mut spec = VmSpec {
        kernel: assets.kernel.clone(),
        initrd: assets.initrd.clone(),
        rootfs: assets.rootfs.clone(),
        disk,
        ram_mb: record.ram_mb,
        cpus: record.cpus,
        socket_dir: PathBuf::new(),
        serial_log: PathBuf::new(),
        hostname: record.name.clone().unwrap_or_else(|| "capsem".into()),
        incoming: if own_state {
            Some(state.clone())
        } else {
            taken_state
        },
        cmdline_extra,
    };
    place(&mut spec, &dir);
    let mut start = match (&spec.incoming, &template) {
        (None, _) => StartKind::Cold,
        (Some(_), Some(_)) => StartKind::Warm,
        (Some(_), None) => StartKind::Resumed,
    };
    let started = Instant::now();
    // Resuming: QEMU loads the saved state, then is told to continue; a state that does not
    // load is kept aside and the session boots cold from its disk.
    // A cold boot that never reaches the handshake (a rare TCG hang) is tried once more.
    let mut cold_retries = 1;
    let (mut vm, channel) = loop {
        let listener = bind(&spec.channel_socket())?;
        let mut vm = hv.launch(&spec)?;
        tracing::info!(id = %cfg.id, pid = vm.pid, accel = cfg.accel.as_str(), resume = spec.incoming.is_some(), "VM launched");
        let (running_tx, running) = tokio::sync::oneshot::channel();
        let resumer = spec
            .incoming
            .as_ref()
            .map(|_| tokio::spawn(continue_after_load(spec.control_socket(), running_tx)));
        // Whether a failure proves the saved machine bad (QEMU refused it, or the guest refused
        // its identity) rather than only unlucky (no greeting in time, which a rare TCG hang
        // of a good machine also causes; a QEMU killed from outside; a channel that broke).
        let mut proven_bad = false;
        let outcome = tokio::select! {
            ch = connect_guest(listener, &spec, running) => match ch {
                Ok(ch) => Ok(ch),
                // A restored guest that did not come up: whether its saved state is to blame
                // (QEMU refused it) is told below.
                Err(e) if spec.incoming.is_some() => Err(e.to_string()),
                Err(ChannelError::ReadyTimeout(limit)) if cold_retries > 0 => {
                    cold_retries -= 1;
                    let _ = vm.child.kill().await;
                    tracing::warn!(id = %cfg.id, ?limit, "the guest did not come up; booting it again");
                    continue;
                }
                Err(e) => return Err(e.into()),
            },
            // How a restored VM's QEMU ended is told below, with the other restore failures.
            status = vm.child.wait() => Err(if spec.incoming.is_some() {
                "QEMU ended before the guest was in".to_string()
            } else {
                exit_text(status)
            }),
        };
        if let Some(r) = resumer {
            r.abort();
        }
        // Did QEMU end by itself? (A channel that broke may be QEMU ending as it refuses the
        // state: a moment tells. One that has ended answers at once.)
        let outcome = match outcome {
            Err(why) if spec.incoming.is_some() => {
                match tokio::time::timeout(Duration::from_secs(1), vm.child.wait()).await {
                    Ok(status) => {
                        proven_bad = refused_state(&status);
                        Err(format!("{why}; QEMU {}", exit_text(status)))
                    }
                    Err(_) => Err(why),
                }
            }
            other => other,
        };
        // A restored guest becomes this session's before anything else reaches it.
        let outcome = match outcome {
            Ok(ch) if spec.incoming.is_some() => {
                match take_identity(&ch.handle(), &spec.hostname).await {
                    Ok(()) => Ok(ch),
                    Err(e) => {
                        // The guest answered, and said no.
                        proven_bad = matches!(
                            e,
                            InstanceError::Identity(_)
                                | InstanceError::Channel(ChannelError::Guest(_))
                        );
                        Err(crate::error_chain(&e))
                    }
                }
            }
            other => other,
        };
        match outcome {
            Ok(ch) => {
                if let Some(state) = spec.incoming.take() {
                    // Consumed: the disk moves on from here. (The session's own state, or its
                    // link to the template's; never the template's file itself.)
                    if state.starts_with(&dir) {
                        let _ = std::fs::remove_file(&state);
                    }
                    tracing::info!(id = %cfg.id, start = start.as_str(), "restored from saved state");
                }
                break (vm, ch);
            }
            Err(why) if template.is_some() => {
                // This session boots cold on a disk of its own. A template whose machine does
                // not load or refuses its identity is of no use to anyone: taken out of use. One
                // whose guest only did not greet stays (it passed that check when it was built).
                let _ = vm.child.kill().await;
                let t = template.take().expect("checked");
                if proven_bad {
                    crate::warm::discard(&t, &why);
                }
                crate::warm::drop_taken(&dir);
                spec.incoming = None;
                spec.disk = cold_disk(hv.as_ref(), &assets, &dir)?;
                start = StartKind::Cold;
                tracing::warn!(id = %cfg.id, %why, discarded = proven_bad, "the warm-start template did not come up; booting cold");
            }
            Err(why) if spec.incoming.is_some() => {
                let _ = vm.child.kill().await;
                let state = spec.incoming.take().expect("checked");
                start = StartKind::Cold;
                let aside = state.with_extension("bad");
                let _ = std::fs::rename(&state, &aside);
                tracing::warn!(id = %cfg.id, %why, aside = %aside.display(), "saved state did not load; kept aside, booting cold from the disk");
                println!("capsem: the saved state of this session did not load ({why}); it is kept as {} and the session boots from its disk", aside.display());
            }
            Err(why) => return Err(InstanceError::VmExited(why)),
        }
    };
    // Loaded (or given up on): QEMU has read the saved machine.
    drop(held_state);
    let network = Arc::new(
        network_task
            .await
            .map_err(|e| InstanceError::NetworkSetup(e.to_string()))??,
    );
    let guest = channel.handle();
    serve_guest_streams(channel.inbound, network.clone());
    let t = Instant::now();
    match guest
        .control(&capsem_proto::control::ControlRequest::TrustCa {
            pem: network.ca.cert_pem().to_string(),
        })
        .await?
    {
        capsem_proto::control::ControlResponse::Done => {}
        other => return Err(InstanceError::TrustCa(format!("{other:?}"))),
    }
    tracing::debug!(trust_ca_ms = t.elapsed().as_millis() as u64, "CA trusted");
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
        start,
        other_template,
    };
    tracing::info!(id = %cfg.id, boot_wall_ms, start = start.as_str(), guest_ready_ms = info.boot.ready_ms, "guest ready");

    let api = bind(&cfg.home.instance_socket(&cfg.id))?;
    let inst = Arc::new(Instance {
        guest,
        info,
        env: record.env.clone(),
        stop: Notify::new(),
        graceful: std::sync::atomic::AtomicBool::new(false),
        recorder: network.recorder.clone(),
        dir: dir.clone(),
        hangup: channel.hangup,
        suspending: std::sync::atomic::AtomicBool::new(false),
        saved: Notify::new(),
        ops: tokio::sync::Mutex::new(()),
        hv,
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
    if inst.suspending.load(std::sync::atomic::Ordering::SeqCst) {
        // The state is being saved: wait for it (or for QEMU to give up), let the reply to
        // the suspend request leave, then end the paused VM.
        tokio::select! {
            _ = tokio::time::timeout(SUSPEND_LIMIT, inst.saved.notified()) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            _ = vm.child.wait() => {}
        }
        let _ = vm.child.kill().await;
        return Ok(());
    }
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

/// Accept the guest's channel on `listener`, which is closed once the guest is in: after a
/// later hang-up (a suspend) QEMU then has nothing to dial back into, so the agent sees the
/// host gone however long it takes to notice. (With the listener open QEMU reconnects within
/// a second, and an agent slower than that stays in its old session.)
///
/// A resumed guest that does not greet within [`RESUME_GREET_LIMIT`] of running again
/// (`running` resolves when it does) is hung up on so it starts a fresh session: the listener
/// is closed until its console says it saw that (or [`RESUME_HANGUP_SEEN_LIMIT`]), then opened
/// again for QEMU to redial, and the guest is waited for once more.
async fn connect_guest(
    listener: tokio::net::UnixListener,
    spec: &VmSpec,
    running: tokio::sync::oneshot::Receiver<()>,
) -> Result<GuestChannel, ChannelError> {
    if spec.incoming.is_none() {
        return GuestChannel::establish(&listener, CONNECT_LIMIT, READY_LIMIT).await;
    }
    let before = console_end(&spec.serial_log);
    let running = async {
        let _ = running.await;
    };
    match GuestChannel::establish_from(&listener, CONNECT_LIMIT, RESUME_GREET_LIMIT, running).await
    {
        Err(e @ (ChannelError::ReadyTimeout(_) | ChannelError::ClosedEarly)) => {
            tracing::warn!(error = %e, "the resumed guest did not greet; hung up so it starts a fresh session");
        }
        other => return other,
    }
    drop(listener);
    let seen = hangup_seen(&spec.serial_log, before, RESUME_HANGUP_SEEN_LIMIT).await;
    tracing::debug!(seen, "listening for the resumed guest again");
    let listener =
        crate::sock::bind_private(&spec.channel_socket()).map_err(ChannelError::Accept)?;
    GuestChannel::establish(&listener, CONNECT_LIMIT, RESUME_READY_LIMIT).await
}

/// Where the console (`serial`) ends now: a later [`hangup_said_since`] reads only what
/// follows (the guest writes the console; it may be large).
fn console_end(serial: &std::path::Path) -> u64 {
    std::fs::metadata(serial).map(|m| m.len()).unwrap_or(0)
}

/// Whether the agent has said on the console, after byte `from`, that the host hung up. (The
/// console is bytes: a kernel line need not be UTF-8.)
fn hangup_said_since(serial: &std::path::Path, from: u64) -> bool {
    const SAID: &[u8] = b"waiting for the host";
    // At most 1 MiB of what follows `from` is read (the line comes at once, not after a
    // flood); the search starts a little before, in case the line straddles `from`.
    let start = from.saturating_sub(SAID.len() as u64 - 1);
    let (text, _) = crate::paths::read_window(serial, Some(start), 1 << 20);
    text.windows(SAID.len()).any(|w| w == SAID)
}

/// Wait up to `limit` for the agent to say, after console byte `from`, that it saw a hang-up;
/// whether it did.
async fn hangup_seen(serial: &std::path::Path, from: u64, limit: Duration) -> bool {
    let t = Instant::now();
    loop {
        if hangup_said_since(serial, from) {
            tracing::debug!(
                ms = t.elapsed().as_millis() as u64,
                "the agent saw the hang-up"
            );
            return true;
        }
        if t.elapsed() >= limit {
            tracing::warn!(?limit, "the agent did not say it saw the hang-up");
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The guest's handshake on `listener` within `ready_limit` of `running`, or the VM's end if
/// QEMU exits first.
async fn handshake_or_exit(
    listener: &tokio::net::UnixListener,
    vm: &mut hypervisor::RunningVm,
    ready_limit: Duration,
    running: impl std::future::Future<Output = ()>,
) -> Result<GuestChannel, InstanceError> {
    tokio::select! {
        ch = GuestChannel::establish_from(listener, CONNECT_LIMIT, ready_limit, running) => Ok(ch?),
        status = vm.child.wait() => Err(InstanceError::VmExited(exit_text(status))),
    }
}

/// Whether QEMU's end, before its restored guest was in, condemns the saved state: QEMU exits
/// by itself when the state does not load (with an error) or when the restored guest powers
/// off or panics at once. A signal (the OOM killer, a user) says nothing about the state.
fn refused_state(status: &std::io::Result<std::process::ExitStatus>) -> bool {
    status.as_ref().is_ok_and(|s| s.code().is_some())
}

/// How a VM process ended, in words.
fn exit_text(status: std::io::Result<std::process::ExitStatus>) -> String {
    status
        .map(|s| s.to_string())
        .unwrap_or_else(|e| e.to_string())
}

/// `CAPSEM_KERNEL_ARGS`, split into words.
fn kernel_args_from_env() -> Vec<String> {
    std::env::var(KERNEL_ARGS_ENV)
        .map(|v| v.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

/// A new top layer over the empty base disk, for a cold boot.
fn cold_disk(
    hv: &dyn hypervisor::Hypervisor,
    assets: &crate::image::Assets,
    dir: &std::path::Path,
) -> Result<PathBuf, InstanceError> {
    let disk = dir.join(crate::disk::FIRST);
    hv.create_disk(&assets.base_disk, &disk)?;
    tracing::debug!("instance: disk created");
    Ok(disk)
}

/// A restored guest becomes this session's: hostname, fresh entropy and a forced RNG reseed
/// (every guest restored from one template would otherwise share its random stream), and the
/// host's clock. No exec runs before this returns.
async fn take_identity(guest: &crate::channel::Guest, hostname: &str) -> Result<(), InstanceError> {
    let t = Instant::now();
    let seed: [u8; 32] = rand::random();
    let unix_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    match guest
        .control(&capsem_proto::control::ControlRequest::Identity {
            hostname: hostname.to_string(),
            seed: serde_bytes::ByteBuf::from(seed.to_vec()),
            unix_ns,
        })
        .await?
    {
        capsem_proto::control::ControlResponse::Done => {
            tracing::debug!(ms = t.elapsed().as_millis() as u64, "identity taken");
            Ok(())
        }
        other => Err(InstanceError::Identity(format!("{other:?}"))),
    }
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

/// Once QEMU has loaded a saved state it waits, paused: tell it to continue, and say so on
/// `running` (dropped unsent if QEMU cannot be reached).
async fn continue_after_load(control: PathBuf, running: tokio::sync::oneshot::Sender<()>) {
    use crate::hypervisor::qmp::Qmp;
    let Ok(mut q) = Qmp::connect(&control, CONNECT_LIMIT).await else {
        return;
    };
    let t = Instant::now();
    let end = t + READY_LIMIT;
    while Instant::now() < end {
        match q.status().await.as_deref() {
            Ok("inmigrate") => tokio::time::sleep(Duration::from_millis(10)).await,
            Ok("running") => {
                let _ = running.send(());
                return;
            }
            Ok(_) => {
                tracing::debug!(ms = t.elapsed().as_millis() as u64, "saved state loaded");
                if let Err(e) = q.execute("cont", serde_json::Value::Null).await {
                    tracing::warn!(error = %e, "could not continue the resumed VM");
                }
                let _ = running.send(());
                return;
            }
            Err(_) => return,
        }
    }
}

/// Suspend: make the guest's filesystems consistent, hang up the channel (the guest goes back
/// to waiting for a host, so a resumed guest starts a fresh mux session), pause, save RAM and
/// device state to `state/vm.state` (written aside, fsynced, renamed), and quit QEMU.
pub(crate) async fn suspend(inst: &Instance) -> Result<u64, String> {
    let _op = inst.ops.lock().await;
    let size = save_machine(
        &inst.guest,
        &inst.hangup,
        &inst.dir,
        &inst.dir.join(STATE_DIR).join(STATE_FILE),
        false,
        || {
            inst.suspending
                .store(true, std::sync::atomic::Ordering::SeqCst)
        },
    )
    .await?;
    inst.saved.notify_one();
    Ok(size)
}

/// Save a running VM whose session files are in `dir` to `state` (RAM and devices, as QEMU's
/// migration stream): sync the guest, call `hanging_up`, hang up the channel and wait until the
/// agent is back to waiting for a host (so the restored guest greets a new host at once; with
/// `must_be_seen`, an agent that does not see it in time fails the save), pause, migrate to
/// `state` (written aside, fsynced, renamed). The VM stays paused.
///
/// Nothing may listen on the VM's channel socket by then (see [`connect_guest`]): QEMU would
/// dial straight back in, and an agent that missed that moment stays in the old session.
async fn save_machine(
    guest: &crate::channel::Guest,
    hangup: &std::os::unix::net::UnixStream,
    dir: &std::path::Path,
    state: &std::path::Path,
    must_be_seen: bool,
    hanging_up: impl FnOnce(),
) -> Result<u64, String> {
    guest_sync(guest).await?;
    let serial = dir.join(SERIAL_LOG);
    let before = console_end(&serial);
    hanging_up();
    let stale = std::env::var_os(FAULT_STALE_SUSPEND_ENV).is_some();
    if !stale {
        let _ = hangup.shutdown(std::net::Shutdown::Both);
    }
    // Let the agent see the hang-up before the machine stops. (A state saved before it did
    // resumes into a stale session; resume recovers from that by hanging up again, at the
    // cost of RESUME_GREET_LIMIT and QEMU's redial, see `connect_guest`.)
    let limit = if stale {
        Duration::ZERO
    } else {
        HANGUP_SEEN_LIMIT
    };
    if !hangup_seen(&serial, before, limit).await && must_be_seen {
        return Err(format!(
            "the guest agent did not see the host hang up within {limit:?}"
        ));
    }
    let state_dir = state.parent().unwrap_or(dir);
    crate::paths::private_dir(state_dir)
        .map_err(|e| format!("cannot create {}: {e}", state_dir.display()))?;
    let tmp = state.with_extension("partial");
    let mut q = paused(dir).await?;
    // QEMU caps migration at 128 MiB/s by default (meant for live migration over a network);
    // saving a paused VM to a local file should go as fast as the disk takes it.
    q.execute(
        "migrate-set-parameters",
        serde_json::json!({ "max-bandwidth": 1u64 << 40 }),
    )
    .await
    .map_err(|e| e.to_string())?;
    let quoted = tmp.display().to_string().replace('\'', "'\\''");
    q.execute(
        "migrate",
        serde_json::json!({ "uri": format!("exec:cat > '{quoted}'") }),
    )
    .await
    .map_err(|e| e.to_string())?;
    loop {
        let r = q
            .execute("query-migrate", serde_json::Value::Null)
            .await
            .map_err(|e| e.to_string())?;
        match r["status"].as_str().unwrap_or("") {
            "completed" => break,
            "failed" | "cancelled" => {
                // The channel is gone: nothing useful can run on; the caller sees the error
                // (a session ends as crashed, its disk intact).
                let _ = q.execute("quit", serde_json::Value::Null).await;
                return Err(format!(
                    "saving the VM state failed: {}",
                    r["error-desc"].as_str().unwrap_or("unknown error")
                ));
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let size = std::fs::File::open(&tmp)
        .and_then(|f| {
            f.sync_all()?;
            f.metadata()
        })
        .map(|m| m.len())
        .map_err(|e| format!("cannot sync {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, state).map_err(|e| format!("cannot save {}: {e}", state.display()))?;
    let _ = std::fs::File::open(state_dir).and_then(|d| d.sync_all());
    Ok(size)
}

/// A QMP connection to the VM whose session files are in `dir`, which it has just paused.
async fn paused(dir: &std::path::Path) -> Result<crate::hypervisor::qmp::Qmp, String> {
    let mut q =
        crate::hypervisor::qmp::Qmp::connect(&dir.join(hypervisor::CONTROL_SOCKET), CONNECT_LIMIT)
            .await
            .map_err(|e| e.to_string())?;
    q.execute("stop", serde_json::Value::Null)
        .await
        .map_err(|e| e.to_string())?;
    Ok(q)
}

/// Run `command` (a shell string, no session env) in the guest for capsem's own housekeeping;
/// its exit status, or why it did not run.
async fn run_in_guest(
    guest: &crate::channel::Guest,
    command: &str,
) -> Result<capsem_proto::ExitStatus, ChannelError> {
    let job = capsem_proto::exec::ExecRequest {
        command: capsem_proto::exec::Command::Shell(command.into()),
        env: vec![],
        cwd: None,
        stdin: false,
        timeout_ms: Some(30_000),
    };
    Ok(guest.exec(&job).await?.exit.status)
}

/// Flush the guest's page cache to its disk (so a pause or copy sees what programs wrote).
async fn guest_sync(guest: &crate::channel::Guest) -> Result<(), String> {
    run_in_guest(guest, "sync")
        .await
        .map(drop)
        .map_err(|e| format!("syncing the guest failed: {e}"))
}

/// Freeze the running disk's top layer for a fork or clone: sync the guest, pause it, switch
/// QEMU's writes to a new empty layer over the current top (QMP `blockdev-snapshot-sync` onto a
/// layer made beforehand, so its backing name stays relative), continue. Returns the number of
/// the layer now frozen; it and those below it never change again.
pub(crate) async fn freeze(inst: &Instance) -> Result<u32, String> {
    let _op = inst.ops.lock().await;
    if inst.suspending.load(std::sync::atomic::Ordering::SeqCst) {
        return Err("the session is being suspended".into());
    }
    guest_sync(&inst.guest).await?;
    let top = crate::disk::top(&inst.dir)
        .map_err(|e| format!("cannot read the session's disk layers: {e}"))?
        .ok_or("the session has no disk")?;
    let below = inst.dir.join(crate::disk::layer_name(top));
    let next = inst.dir.join(crate::disk::layer_name(top + 1));
    inst.hv
        .create_disk(&below, &next)
        .map_err(|e| crate::error_chain(&e))?;
    let mut q = match paused(&inst.dir).await {
        Ok(q) => q,
        Err(e) => {
            let _ = std::fs::remove_file(&next);
            return Err(format!("pausing the VM for the copy failed: {e}"));
        }
    };
    let switched = q
        .execute(
            "blockdev-snapshot-sync",
            serde_json::json!({
                "device": "disk",
                "snapshot-file": next.display().to_string(),
                "format": "qcow2",
                "mode": "existing",
            }),
        )
        .await;
    let resumed = q.execute("cont", serde_json::Value::Null).await;
    if let Err(e) = switched {
        // QEMU still writes the old top (the switch is all or nothing): drop the unused layer.
        let _ = std::fs::remove_file(&next);
        return Err(format!("switching the disk to a new layer failed: {e}"));
    }
    // The switch happened: QEMU writes `next` now, so it stays whatever `cont` says.
    resumed.map_err(|e| format!("the VM did not continue after the copy: {e}"))?;
    Ok(top)
}

/// How many times a template build is tried before giving up.
const TEMPLATE_TRIES: u32 = 2;
/// Where in a template's staging directory its verify restore runs.
const VERIFY_DIR: &str = "verify";

/// Build the warm-start template for `ram_mb` × `cpus` (see [`crate::warm`]) unless there is
/// one: boot a guest cold with no session identity, run one command so the shell and libc are
/// in its page cache, save it the way a suspend does, restore the saved state once to check that
/// it greets at once, and publish it.
pub async fn build_template(
    home: &Home,
    accel: Accel,
    ram_mb: u32,
    cpus: u32,
) -> Result<crate::api::WarmResponse, InstanceError> {
    let started = Instant::now();
    let assets = crate::image::load(&home.assets_root())?;
    let hv = hypervisor::detect(accel)?;
    let extra = kernel_args_from_env();
    let key = crate::warm::key(&assets, hv.as_ref(), ram_mb, cpus, &extra);
    if crate::warm::find(&assets, &key).is_some() {
        return Ok(crate::api::WarmResponse {
            key,
            built: false,
            state_bytes: 0,
            took_ms: 0,
        });
    }
    let mut attempt = 0;
    loop {
        attempt += 1;
        let staging = crate::warm::staging_dir(&assets, &key)
            .map_err(|e| InstanceError::Template(crate::error_chain(&e)))?;
        match make_template(hv.as_ref(), &assets, &staging, ram_mb, cpus, &extra).await {
            Ok(state_bytes) => {
                let meta = crate::warm::TemplateMeta {
                    key: key.clone(),
                    build: format!("{:016x}", rand::random::<u64>()),
                    ram_mb,
                    cpus,
                    assets: crate::warm::assets_digest(&assets),
                    base: std::fs::canonicalize(&assets.base_disk).unwrap_or_default(),
                    created_at: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0),
                    state_bytes,
                };
                crate::warm::publish(&assets, &staging, &meta)
                    .map_err(|e| InstanceError::Template(crate::error_chain(&e)))?;
                return Ok(crate::api::WarmResponse {
                    key,
                    built: true,
                    state_bytes,
                    took_ms: started.elapsed().as_millis() as u64,
                });
            }
            Err(e) => {
                // The guests' consoles go with the staging directory: say how they ended.
                let console = crate::paths::tail_of(&staging.join(SERIAL_LOG), 3);
                let verify = crate::paths::tail_of(&staging.join(VERIFY_DIR).join(SERIAL_LOG), 3);
                tracing::warn!(attempt, error = %crate::error_chain(&e), %console, %verify, "template build failed");
                let _ = std::fs::remove_dir_all(&staging);
                if attempt == TEMPLATE_TRIES {
                    return Err(match e {
                        InstanceError::Template(_) => e,
                        other => InstanceError::Template(crate::error_chain(&other)),
                    });
                }
            }
        }
    }
}

/// One template build in `staging`; returns the saved state's size.
async fn make_template(
    hv: &dyn hypervisor::Hypervisor,
    assets: &crate::image::Assets,
    staging: &std::path::Path,
    ram_mb: u32,
    cpus: u32,
    extra: &[String],
) -> Result<u64, InstanceError> {
    let mut spec = crate::warm::template_spec(assets, ram_mb, cpus, extra);
    // The template is shared by every home that links these assets: its disk names the base
    // by its real path, not through the linking home's `assets`.
    let base = std::fs::canonicalize(&assets.base_disk)
        .map_err(|e| InstanceError::Template(format!("{}: {e}", assets.base_disk.display())))?;
    spec.disk = staging.join(crate::disk::FIRST);
    hv.create_disk(&base, &spec.disk)?;
    place(&mut spec, staging);
    let listener = bind(&spec.channel_socket())?;
    let mut vm = hv.launch(&spec)?;
    let channel =
        handshake_or_exit(&listener, &mut vm, READY_LIMIT, std::future::ready(())).await?;
    // Closed before the save hangs up, so QEMU cannot dial back in (see `save_machine`).
    drop(listener);
    let guest = channel.handle();
    let mut inbound = channel.inbound;
    tokio::spawn(async move { while inbound.recv().await.is_some() {} });
    // Done once here rather than in every session: reading the shell and libc from the
    // squashfs, and copying up what `TrustCa` writes.
    warm_up(&guest, TEMPLATE_PREPARE).await?;
    let state = staging.join(crate::warm::STATE_FILE);
    let saved = save_machine(&guest, &channel.hangup, staging, &state, true, || {}).await;
    let _ = vm.child.kill().await;
    let bytes = saved.map_err(InstanceError::Template)?;
    verify_template(hv, &spec, staging, &state).await?;
    remove_sockets(staging);
    Ok(bytes)
}

/// Restore a just-saved template once, in a scratch directory with its own disk top: it must
/// greet without being hung up on again (or every warm start would wait for that), take an
/// identity and run a command.
async fn verify_template(
    hv: &dyn hypervisor::Hypervisor,
    spec: &VmSpec,
    staging: &std::path::Path,
    state: &std::path::Path,
) -> Result<(), InstanceError> {
    let scratch = staging.join(VERIFY_DIR);
    crate::paths::private_dir(&scratch).map_err(|source| InstanceError::Bind {
        path: scratch.clone(),
        source,
    })?;
    let mut spec = spec.clone();
    let top = scratch.join(crate::disk::layer_name(1));
    hv.create_disk(&spec.disk, &top)?;
    spec.disk = top;
    place(&mut spec, &scratch);
    spec.incoming = Some(state.to_path_buf());
    let listener = bind(&spec.channel_socket())?;
    let mut vm = hv.launch(&spec)?;
    let (running_tx, running) = tokio::sync::oneshot::channel();
    let resumer = tokio::spawn(continue_after_load(spec.control_socket(), running_tx));
    let checked = async {
        let t = Instant::now();
        let running = async {
            let _ = running.await;
        };
        let ch = handshake_or_exit(&listener, &mut vm, RESUME_READY_LIMIT, running)
            .await
            .map_err(|e| {
                InstanceError::Template(format!(
                    "the restored template did not greet: {}",
                    crate::error_chain(&e)
                ))
            })?;
        tracing::debug!(
            ms = t.elapsed().as_millis() as u64,
            "restored template greeted"
        );
        take_identity(&ch.handle(), "capsem").await?;
        warm_up(&ch.handle(), "true").await
    }
    .await;
    resumer.abort();
    let _ = vm.child.kill().await;
    let _ = std::fs::remove_dir_all(&scratch);
    checked
}

/// What a template runs before it is saved (see [`make_template`]): the shell, and the copy-up
/// of the files `TrustCa` writes (the system bundle, the capsem CA's file and its directories)
/// from the read-only root to the disk, so each session's `TrustCa` only writes a few bytes.
const TEMPLATE_PREPARE: &str = "true && : >> /etc/ssl/certs/ca-certificates.crt \
    && mkdir -p /usr/local/share/ca-certificates \
    && : > /usr/local/share/ca-certificates/capsem-ca.crt";

/// Run `command` in the guest; it must succeed.
async fn warm_up(guest: &crate::channel::Guest, command: &str) -> Result<(), InstanceError> {
    match run_in_guest(guest, command).await? {
        capsem_proto::ExitStatus::Code(0) => Ok(()),
        other => Err(InstanceError::Template(format!(
            "`{command}` in the guest ended with {other:?}"
        ))),
    }
}

fn bind(path: &std::path::Path) -> Result<tokio::net::UnixListener, InstanceError> {
    crate::sock::bind_private(path).map_err(|source| InstanceError::Bind {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;

    #[test]
    fn only_qemu_ending_by_itself_condemns_a_saved_state() {
        let ended = |raw| Ok(ExitStatus::from_raw(raw));
        // exit(1): the state did not load; exit(0): the restored guest powered off at once.
        assert!(super::refused_state(&ended(1 << 8)));
        assert!(super::refused_state(&ended(0)));
        // Killed by a signal, or not waited for: says nothing about the state.
        assert!(!super::refused_state(&ended(libc::SIGKILL)));
        assert!(!super::refused_state(&Err(std::io::Error::other(
            "wait failed"
        ))));
    }

    #[test]
    fn a_hang_up_counts_only_when_said_after_the_mark() {
        let d = tempfile::tempdir().unwrap();
        let serial = d.path().join("serial.log");
        assert_eq!(super::console_end(&serial), 0);
        assert!(!super::hangup_said_since(&serial, 0));
        std::fs::write(&serial, b"boot\xff\ncapsem-agent: waiting for the host\n").unwrap();
        let mark = super::console_end(&serial);
        assert!(super::hangup_said_since(&serial, 0));
        assert!(!super::hangup_said_since(&serial, mark));
        let mut more = std::fs::read(&serial).unwrap();
        more.extend_from_slice(b"\x1b[0mcapsem-agent: waiting for the host\n");
        std::fs::write(&serial, more).unwrap();
        assert!(super::hangup_said_since(&serial, mark));
    }
}
