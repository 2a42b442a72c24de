//! The root filesystem: find the two virtio disks by serial, mount the squashfs lower and the
//! ext4 upper, stack the overlay at `/mnt/root`, move `/dev`, `/proc`, `/sys` into it and switch
//! root in place (this process keeps running; nothing is exec'ed).

use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::MsFlags;

use super::{mkdir, mount, BootError};

pub const ROOTFS_SERIAL: &str = "capsem-rootfs";
pub const DISK_SERIAL: &str = "capsem-disk";

const LOWER: &str = "/mnt/lower";
const DISK: &str = "/mnt/disk";
const ROOT: &str = "/mnt/root";
const APPEAR_TIMEOUT: Duration = Duration::from_secs(5);
const POLL_EVERY: Duration = Duration::from_millis(1);

/// `(serial, /dev/vdX)` for every virtio disk that has a serial and a device node.
fn scan() -> Vec<(String, PathBuf)> {
    let Ok(dir) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("vd") {
            continue;
        }
        if let Ok(serial) = std::fs::read_to_string(e.path().join("serial")) {
            out.push((serial.trim().to_string(), Path::new("/dev").join(&name)));
        }
    }
    out
}

/// Wait until both disks are visible; returns `(rootfs, disk)` device paths.
pub fn find_disks() -> Result<(PathBuf, PathBuf), BootError> {
    let start = Instant::now();
    loop {
        let found = scan();
        let get = |serial: &str| {
            found
                .iter()
                .find(|(s, dev)| s == serial && dev.exists())
                .map(|(_, d)| d.clone())
        };
        if let (Some(r), Some(d)) = (get(ROOTFS_SERIAL), get(DISK_SERIAL)) {
            return Ok((r, d));
        }
        if start.elapsed() >= APPEAR_TIMEOUT {
            let serial = if get(ROOTFS_SERIAL).is_none() {
                ROOTFS_SERIAL
            } else {
                DISK_SERIAL
            };
            let found = found
                .iter()
                .map(|(s, d)| format!("{}={s}", d.display()))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(BootError::DiskNotFound { serial, found });
        }
        std::thread::sleep(POLL_EVERY);
    }
}

fn switch_err(step: &'static str) -> impl FnOnce(nix::Error) -> BootError {
    move |e| BootError::SwitchRoot {
        step,
        source: e.into(),
    }
}

/// Find the disks and mount them: ext4 at `/mnt/disk` (with `upper/` and `work/`), the
/// squashfs at `/mnt/lower`.
pub fn mount_disks() -> Result<(), BootError> {
    let (rootfs, disk) = find_disks()?;
    crate::console::trace(|| format!("disks {} {}", rootfs.display(), disk.display()));
    for d in [LOWER, DISK, ROOT] {
        mkdir(d)?;
    }
    let dev = |p: &Path| p.to_string_lossy().into_owned();
    // No background inode-table zeroing: it would compete with the session for the CPU.
    mount(
        &dev(&disk),
        DISK,
        "ext4",
        MsFlags::MS_NOATIME,
        Some("noinit_itable"),
    )?;
    // Keep a handle on the disk's mount: after the switch it is hidden under the new root,
    // and a clean power-off remounts it read-only through this handle.
    if let Ok(fd) = nix::fcntl::open(
        DISK,
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    ) {
        // SAFETY: `open` just returned this descriptor and nothing else owns it.
        let _ = crate::power::DISK_MOUNT.set(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
    }
    mkdir("/mnt/disk/upper")?;
    mkdir("/mnt/disk/work")?;
    mount(&dev(&rootfs), LOWER, "squashfs", MsFlags::MS_RDONLY, None)?;
    crate::console::trace(|| "ext4 and squashfs mounted".into());
    Ok(())
}

/// Stack the overlay on the mounted disks and switch root into it.
pub fn overlay_and_switch() -> Result<(), BootError> {
    mount(
        "overlay",
        ROOT,
        "overlay",
        MsFlags::empty(),
        Some("lowerdir=/mnt/lower,upperdir=/mnt/disk/upper,workdir=/mnt/disk/work"),
    )?;
    crate::console::trace(|| "overlay mounted".into());
    for d in ["dev", "proc", "sys"] {
        let target = format!("{ROOT}/{d}");
        mkdir(&target)?;
        nix::mount::mount(
            Some(format!("/{d}").as_str()),
            target.as_str(),
            None::<&str>,
            MsFlags::MS_MOVE,
            None::<&str>,
        )
        .map_err(switch_err("moving a mount into the new root"))?;
    }
    nix::unistd::chdir(ROOT).map_err(switch_err("chdir into the new root"))?;
    nix::mount::mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(switch_err("moving the new root onto /"))?;
    nix::unistd::chroot(".").map_err(switch_err("chroot"))?;
    nix::unistd::chdir("/").map_err(switch_err("chdir /"))?;
    Ok(())
}
