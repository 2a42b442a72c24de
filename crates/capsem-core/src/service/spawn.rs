//! Starting one `capsem-process`: detached in its own session (so it outlives the service),
//! logging to `sessions/<id>/process.log`, and reporting readiness on an inherited pipe as one
//! JSON line ([`ReadyLine`]).

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt;

use crate::api::VmInfo;
use crate::hypervisor::Accel;
use crate::paths::Home;

/// The fd number the child finds its ready pipe on.
pub const READY_FD: i32 = 3;

/// Environment variable naming the capsem-process binary (default: beside the current binary).
pub const PROCESS_BIN_ENV: &str = "CAPSEM_PROCESS_BIN";

/// What the child writes on the ready pipe.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadyLine {
    Ready(VmInfo),
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("capsem-process not found at {0}: build the workspace (`cargo build --release`) or set CAPSEM_PROCESS_BIN")]
    Missing(PathBuf),
    #[error("could not start capsem-process")]
    Io(#[from] std::io::Error),
    #[error("the VM did not become ready within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Failed(String),
    #[error("capsem-process exited before the VM was ready; see `capsem logs`: {0}")]
    Died(String),
}

/// A binary installed beside the running one (`target/release/capsem` → `capsem-process`).
pub fn sibling_binary(name: &str, env: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env).filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

pub struct Spawned {
    pub child: tokio::process::Child,
    pub info: VmInfo,
}

/// A `capsem-process` command for `home` and `accel` (stdin closed); the caller adds its mode.
fn process_command(home: &Home, accel: Accel) -> Result<tokio::process::Command, SpawnError> {
    let bin = sibling_binary("capsem-process", PROCESS_BIN_ENV);
    if !bin.is_file() {
        return Err(SpawnError::Missing(bin));
    }
    let mut cmd = tokio::process::Command::new(&bin);
    cmd.arg("--accel")
        .arg(accel.as_str())
        .env(crate::paths::HOME_ENV, home.root())
        .stdin(Stdio::null());
    Ok(cmd)
}

/// Start the process for session `id` and wait until its VM is ready.
pub async fn start(
    home: &Home,
    id: &str,
    accel: Accel,
    limit: Duration,
) -> Result<Spawned, SpawnError> {
    let mut cmd = process_command(home, accel)?;
    let dir = home.session_dir(id);
    let log = crate::paths::private_log(&dir.join("process.log"))?;
    let (read_end, write_end) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(std::io::Error::from)?;
    cmd.arg("--id")
        .arg(id)
        .arg("--ready-fd")
        .arg(READY_FD.to_string())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(false);
    let w = write_end.as_raw_fd();
    // SAFETY: setsid and dup2 are async-signal-safe; they only affect the child.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::dup2(w, READY_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    drop(write_end);
    let line = tokio::select! {
        r = tokio::time::timeout(limit, read_line(read_end)) => match r {
            Ok(r) => r?,
            Err(_) => {
                let _ = child.start_kill();
                return Err(SpawnError::Timeout(limit));
            }
        },
    };
    match serde_json::from_slice::<ReadyLine>(line.trim_ascii()) {
        Ok(ReadyLine::Ready(info)) => Ok(Spawned { child, info }),
        Ok(ReadyLine::Failed(msg)) => {
            let _ = child.wait().await;
            Err(SpawnError::Failed(msg))
        }
        Err(_) => {
            let status = child
                .wait()
                .await
                .map(|s| s.to_string())
                .unwrap_or_default();
            Err(SpawnError::Died(format!(
                "{status}; {}",
                crate::paths::tail_of(&dir.join("process.log"), 3)
            )))
        }
    }
}

/// Build the warm-start template for `ram_mb` × `cpus` with `capsem-process --warm` (which
/// logs to `run/warm.log` and prints its report as one JSON line).
pub async fn warm(
    home: &Home,
    accel: Accel,
    ram_mb: u32,
    cpus: u32,
    limit: Duration,
) -> Result<crate::api::WarmResponse, SpawnError> {
    let log_path = home.run_dir().join("warm.log");
    let log = crate::paths::private_log(&log_path)?;
    let child = process_command(home, accel)?
        .arg("--warm")
        .arg("--ram-mb")
        .arg(ram_mb.to_string())
        .arg("--cpus")
        .arg(cpus.to_string())
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()?;
    let out = match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(out) => out?,
        Err(_) => return Err(SpawnError::Timeout(limit)),
    };
    let line = String::from_utf8_lossy(&out.stdout);
    if let Ok(report) = serde_json::from_str::<crate::api::WarmResponse>(line.trim()) {
        return Ok(report);
    }
    let why = serde_json::from_str::<serde_json::Value>(line.trim())
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| {
            format!(
                "building the warm-start template failed: capsem-process {}; {}",
                out.status,
                crate::paths::tail_of(&log_path, 3)
            )
        });
    Err(SpawnError::Failed(why))
}

/// Read the ready line: up to the first newline, or to EOF if the child dies first.
async fn read_line(fd: OwnedFd) -> std::io::Result<Vec<u8>> {
    let rx = tokio::net::unix::pipe::Receiver::from_owned_fd(fd)?;
    let mut line = Vec::new();
    tokio::io::BufReader::new(rx)
        .read_until(b'\n', &mut line)
        .await?;
    Ok(line)
}
