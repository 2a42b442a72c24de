//! Time since the kernel started, as `/proc/uptime` reports it (`CLOCK_BOOTTIME`), readable
//! before `/proc` is mounted.

/// Milliseconds since boot.
pub fn uptime_ms() -> u64 {
    uptime_us() / 1000
}

/// Microseconds since boot.
pub fn uptime_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}
