//! Sync and power off or reboot the VM. Only called where the agent knows it runs as a VM's
//! init (see [`crate::serve::Mode`]); never from tests.

/// Flush filesystems.
pub fn sync() {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
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
