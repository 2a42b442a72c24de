//! The guest's `/init` (PID 1) up to the point where the agent serves: probe mode, kernel
//! modules, the root overlay and switch-root, system mounts, then the fork into the PID 1 reaper
//! and the agent child. Linux-PID-1-only: [`init`] refuses to run in any other process, so tests
//! can never reach it. Any failure prints the failing step to the console and powers off.
//!
//! ```text
//! /init ─▶ mount /proc ─▶ probe? ─yes─▶ "CAPSEM-PROBE-OK", power off
//!                           │no
//!   /sys, /dev ─▶ credit capsem.seed ─▶ modules ─▶ disks by serial ─▶ ext4 + squashfs
//!   ─▶ overlay ─▶ switch root ─▶ devpts, tmpfs, lo, hostname
//!   ─▶ fork ─┬─ parent (PID 1): reap orphans; when the agent exits, power off
//!            └─ child: return BootTiming, serve the host
//! ```
//!
//! Everything runs on one thread, in order: under TCG, helpers (a disk-mounting thread beside
//! the module loading, modules loaded in parallel by dependency, a background `/bin/sh` to warm
//! the first exec) measured slower, as they compete for the same host CPUs. PID 1 forks with no
//! other thread alive.

pub mod entropy;
pub mod modules;
pub mod pid1;
pub mod rootfs;
pub mod system;

use std::io;
use std::path::PathBuf;

use capsem_proto::lifecycle::BootTiming;

use crate::cmdline::Cmdline;
use crate::{clock, console, power};

/// The line probe mode prints; the host looks for it on the serial console.
pub const PROBE_LINE: &str = "CAPSEM-PROBE-OK";

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("not PID 1; refusing to run the boot sequence")]
    NotPid1,
    #[error("mounting {fstype} on {target}")]
    Mount {
        fstype: &'static str,
        target: String,
        #[source]
        source: io::Error,
    },
    #[error("creating {path}")]
    Mkdir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("loading kernel module {module}")]
    Module {
        module: String,
        #[source]
        source: io::Error,
    },
    #[error("no virtio disk with serial {serial:?} appeared within 5 s (found: {found})")]
    DiskNotFound { serial: &'static str, found: String },
    #[error("switching root: {step}")]
    SwitchRoot {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("bringing up lo")]
    Loopback(#[source] io::Error),
    #[error("setting up dummy0 (10.0.0.1), IPv6 off and resolv.conf")]
    Network(#[source] io::Error),
    #[error("setting the hostname")]
    Hostname(#[source] io::Error),
}

/// Mount helper that names the mount in its error.
pub(crate) fn mount(
    src: &str,
    target: &str,
    fstype: &'static str,
    flags: nix::mount::MsFlags,
    data: Option<&str>,
) -> Result<(), BootError> {
    nix::mount::mount(Some(src), target, Some(fstype), flags, data).map_err(|e| BootError::Mount {
        fstype,
        target: target.to_string(),
        source: e.into(),
    })
}

fn mkdir(path: &str) -> Result<(), BootError> {
    std::fs::create_dir_all(path).map_err(|source| BootError::Mkdir {
        path: path.into(),
        source,
    })
}

/// Mount `/proc` if it is not mounted yet.
fn mount_proc() -> Result<(), BootError> {
    if std::path::Path::new("/proc/self").exists() {
        return Ok(());
    }
    mkdir("/proc")?;
    mount("proc", "/proc", "proc", nix::mount::MsFlags::empty(), None)
}

/// Probe mode: print the probe line on the console and power off, nothing else.
fn probe() -> ! {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let open = || {
        std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open("/dev/console")
    };
    let con = open().or_else(|_| {
        let _ = mkdir("/dev");
        let _ = mount(
            "devtmpfs",
            "/dev",
            "devtmpfs",
            nix::mount::MsFlags::empty(),
            None,
        );
        open()
    });
    if let Ok(mut c) = con {
        let _ = c.write_all(format!("{PROBE_LINE}\n").as_bytes());
    }
    // SAFETY: reboot with a valid command; nothing to sync on a probe boot.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
    std::process::exit(1)
}

/// Run the boot sequence as PID 1. Returns only in the forked agent child, with the boot
/// timings so far; the PID 1 parent never returns. Any failure powers off.
pub fn init() -> Result<BootTiming, BootError> {
    let init_ms = clock::uptime_ms();
    if std::process::id() != 1 {
        return Err(BootError::NotPid1);
    }
    console::enable();
    let cmdline_text = match mount_proc().and_then(|()| {
        std::fs::read_to_string("/proc/cmdline").map_err(|source| BootError::Read {
            path: "/proc/cmdline".into(),
            source,
        })
    }) {
        Ok(line) => line,
        Err(e) => fail(&e),
    };
    let cmdline = Cmdline::parse(&cmdline_text);
    if cmdline.probe {
        probe();
    }
    if cmdline.trace {
        console::enable_trace();
        console::trace(|| format!("init; cmdline: {}", cmdline_text.trim()));
    }
    let mut timing = BootTiming {
        init_ms,
        ..BootTiming::default()
    };
    if let Err(e) = boot(&cmdline, &mut timing) {
        fail(&e);
    }
    pid1::fork_reaper();
    Ok(timing)
}

fn fail(e: &BootError) -> ! {
    console::line(&format!("boot failed: {}", console::chain(e)));
    power::power_off()
}

fn boot(cmdline: &Cmdline, timing: &mut BootTiming) -> Result<(), BootError> {
    use nix::mount::MsFlags;
    mkdir("/sys")?;
    mkdir("/dev")?;
    mount_or_busy("sysfs", "/sys", "sysfs", MsFlags::empty(), None)?;
    mount_or_busy("devtmpfs", "/dev", "devtmpfs", MsFlags::empty(), None)?;
    console::trace(|| "sys, dev mounted".into());
    entropy::prepare(cmdline.seed.as_deref());
    modules::load_all(
        std::path::Path::new("/modules"),
        &cmdline.virtio_mmio_params,
    )?;
    timing.modules_ms = clock::uptime_ms();
    rootfs::mount_disks()?;
    rootfs::overlay_and_switch()?;
    timing.rootfs_ms = clock::uptime_ms();
    system::mounts()?;
    system::network_and_hostname(&cmdline.hostname)?;
    console::trace(|| "system set up".into());
    Ok(())
}

/// Mount, treating "already mounted" as success.
fn mount_or_busy(
    src: &str,
    target: &str,
    fstype: &'static str,
    flags: nix::mount::MsFlags,
    data: Option<&str>,
) -> Result<(), BootError> {
    match mount(src, target, fstype, flags, data) {
        Err(BootError::Mount { source, .. }) if source.raw_os_error() == Some(libc::EBUSY) => {
            Ok(())
        }
        r => r,
    }
}
