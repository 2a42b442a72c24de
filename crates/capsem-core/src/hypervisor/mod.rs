//! The hypervisor seam: what capsem asks of a backend (launch a VM from a [`VmSpec`], say which
//! acceleration it uses). QEMU is the only backend today ([`qemu`]); Apple VZ or cloud-hypervisor
//! would add a sibling module and a branch in [`detect`], without touching session logic.

pub mod qemu;
pub mod qmp;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// CPU acceleration in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
    pub fn parse(s: &str) -> Option<Accel> {
        match s {
            "kvm" => Some(Accel::Kvm),
            "tcg" => Some(Accel::Tcg),
            _ => None,
        }
    }
}

/// Everything a backend needs to boot one VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Read-only squashfs, the overlay lower.
    pub rootfs: PathBuf,
    /// The session's writable disk (qcow2 over the empty ext4 base).
    pub disk: PathBuf,
    pub ram_mb: u32,
    pub cpus: u32,
    /// The VM's directory for its sockets: [`CHANNEL_SOCKET`], which the backend connects the
    /// guest channel to (capsem listens on it), and [`CONTROL_SOCKET`], the backend's control
    /// protocol (QMP). The backend names them relative to this directory, so their length
    /// does not depend on how deep the home is.
    pub socket_dir: PathBuf,
    pub serial_log: PathBuf,
    pub hostname: String,
    /// Extra `key=value` words for the guest kernel command line.
    pub cmdline_extra: Vec<String>,
    /// Resume from this saved state (RAM and devices) instead of booting.
    pub incoming: Option<PathBuf>,
}

/// File names of a VM's sockets in [`VmSpec::socket_dir`].
pub const CHANNEL_SOCKET: &str = "channel.sock";
pub const CONTROL_SOCKET: &str = "qmp.sock";

impl VmSpec {
    pub fn channel_socket(&self) -> PathBuf {
        self.socket_dir.join(CHANNEL_SOCKET)
    }
    pub fn control_socket(&self) -> PathBuf {
        self.socket_dir.join(CONTROL_SOCKET)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("QEMU not found (looked for {0}): install it with `sudo apt-get install qemu-system-x86 qemu-utils`")]
    QemuMissing(String),
    #[error("could not start {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("creating the session disk failed: {0}")]
    Disk(String),
}

/// A launched VM process.
pub struct RunningVm {
    pub child: tokio::process::Child,
    pub pid: u32,
}

/// A VM backend.
pub trait Hypervisor: Send + Sync {
    fn name(&self) -> &'static str;
    fn accel(&self) -> Accel;
    /// Create a writable qcow2 layer `disk` over `backing` (the raw base disk, or a frozen
    /// qcow2 layer in the same directory): copy-on-write, O(1).
    fn create_disk(
        &self,
        backing: &std::path::Path,
        disk: &std::path::Path,
    ) -> Result<(), HypervisorError>;
    /// Start the VM. The returned child is killed if the calling process dies.
    fn launch(&self, spec: &VmSpec) -> Result<RunningVm, HypervisorError>;
    /// Everything about how `spec` would be launched (binary, machine, kernel command line): a
    /// machine saved under one fingerprint is only restored into a launch with the same.
    fn fingerprint(&self, spec: &VmSpec) -> String;
}

/// The backend for this host.
pub fn detect(accel: Accel) -> Result<Box<dyn Hypervisor>, HypervisorError> {
    Ok(Box::new(qemu::Qemu::locate(accel)?))
}
