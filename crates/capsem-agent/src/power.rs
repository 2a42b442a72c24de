//! Sync and power off or reboot the VM. Only called where the agent knows it runs as a VM's
//! init (see [`crate::serve::Mode`]); never from tests.

use std::os::fd::{AsRawFd, OwnedFd};

/// The session disk's mount (set at boot), so power-off can remount it read-only.
pub static DISK_MOUNT: std::sync::OnceLock<OwnedFd> = std::sync::OnceLock::new();

/// Flush filesystems.
pub fn sync() {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
}

/// Leave the session disk clean for its next boot: end every other process, flush, and remount
/// the root overlay and then the disk read-only (ext4 then needs no journal recovery at mount).
/// Best effort: whatever fails leaves a synced disk, which recovers at mount as after a crash.
pub fn quiesce() {
    use nix::mount::{mount, MsFlags};
    // From a process other than init, -1 reaches every process but init and the caller.
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(-1), nix::sys::signal::SIGKILL);
    std::thread::sleep(std::time::Duration::from_millis(20));
    sync();
    let ro = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    let _ = mount(None::<&str>, "/", None::<&str>, ro, None::<&str>);
    if let Some(fd) = DISK_MOUNT.get() {
        let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
        if let Err(e) = mount(None::<&str>, path.as_str(), None::<&str>, ro, None::<&str>) {
            crate::console::line(&format!(
                "shutdown: the disk stays writable ({e}); it will recover at the next boot"
            ));
        }
    }
}

/// Sync and power off; if the kernel refuses, exit (PID 1's death panics the kernel, which
/// `panic=-1` turns into a reset).
pub fn power_off() -> ! {
    sync();
    // SAFETY: reboot with a valid command; on success it does not return.
    unsafe { libc::reboot(libc::RB_POWER_OFF) };
    std::process::exit(1)
}

/// Sync and reboot (QEMU started with `-no-reboot` exits instead).
pub fn reboot() -> ! {
    sync();
    // SAFETY: as above.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    std::process::exit(1)
}
