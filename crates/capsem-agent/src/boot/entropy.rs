//! The kernel RNG at boot. The channel's multiplexer draws its ids from `getrandom(2)`, which
//! blocks until the kernel's CRNG is seeded; a TCG guest without RDRAND or virtio-rng seeds it
//! by timer jitter at one bit per tick: about a second after the first blocked caller, measured
//! at 0.9–1.0 s per boot here.
//!
//! So `capsem.seed=<hex>` on the kernel command line (random bytes from the host, new for every
//! boot) is credited to the pool with `RNDADDENTROPY` at the start of boot, which makes the CRNG
//! ready at once. Without it, the agent waits for the kernel in [`wait_ready`], in the open,
//! and says on the console how long that took. It never makes up entropy. (Starting the
//! kernel's jitter seeding early from an idle-priority helper process gained nothing: the
//! seeding needs about a second of ticks whatever it overlaps.)

use std::io;
use std::os::fd::AsRawFd;

/// `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`: reseed the CRNG from the input pool now.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
/// Most seed bytes taken from the command line.
const MAX_SEED: usize = 64;

/// True once `getrandom(2)` no longer blocks.
pub fn crng_ready() -> bool {
    let mut b = [0u8; 1];
    // SAFETY: getrandom writes at most one byte into `b`.
    let r = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 1, libc::GRND_NONBLOCK) };
    r == 1
}

/// Decode a hex seed; `None` when it is not hex or shorter than 16 bytes.
pub fn parse_seed(hex: &str) -> Option<Vec<u8>> {
    let hex = hex.trim();
    if hex.len() & 1 != 0 || hex.len() < 32 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect();
    bytes.map(|mut b| {
        b.truncate(MAX_SEED);
        b
    })
}

/// Mix `seed` into the kernel pool and credit it as entropy (needs `/dev/urandom`).
fn credit(seed: &[u8]) -> io::Result<()> {
    #[repr(C)]
    struct RandPoolInfo {
        entropy_count: libc::c_int,
        buf_size: libc::c_int,
        buf: [u8; MAX_SEED],
    }
    let mut info = RandPoolInfo {
        entropy_count: (seed.len() * 8) as libc::c_int,
        buf_size: seed.len() as libc::c_int,
        buf: [0; MAX_SEED],
    };
    info.buf[..seed.len()].copy_from_slice(seed);
    let f = std::fs::File::open("/dev/urandom")?;
    // SAFETY: RNDADDENTROPY reads a rand_pool_info whose buffer holds buf_size bytes.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, &info) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Mix fresh host entropy into the pool and force the CRNG to reseed from it, so a guest
/// restored from a saved machine stops sharing its random stream with every other guest
/// restored from the same state. Needs at least 16 bytes.
pub fn reseed(seed: &[u8]) -> io::Result<()> {
    if seed.len() < 16 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a reseed needs at least 16 bytes of entropy",
        ));
    }
    credit(&seed[..seed.len().min(MAX_SEED)])?;
    let f = std::fs::File::open("/dev/urandom")?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Credit `capsem.seed` when the CRNG is not ready yet (see the module docs). Needs `/dev`.
pub fn prepare(seed: Option<&str>) {
    if crng_ready() {
        return;
    }
    if let Some(seed) = seed {
        match parse_seed(seed) {
            Some(bytes) => {
                if let Err(e) = credit(&bytes) {
                    crate::console::line(&format!("capsem.seed not credited: {e}"));
                }
            }
            None => crate::console::line("capsem.seed ignored: not 32+ hex digits"),
        }
        if crng_ready() {
            crate::console::trace(|| "crng seeded from capsem.seed".into());
            return;
        }
    }
    crate::console::trace(|| "crng not ready".into());
}

/// Block until the CRNG is ready; returns how long that took.
pub fn wait_ready() -> std::time::Duration {
    let t = std::time::Instant::now();
    let mut b = [0u8; 1];
    // SAFETY: getrandom writes at most one byte into `b`.
    while unsafe { libc::getrandom(b.as_mut_ptr().cast(), 1, 0) } < 0
        && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
    {}
    t.elapsed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_are_hex_of_at_least_16_bytes() {
        let s = "00112233445566778899aabbccddeeff";
        assert_eq!(parse_seed(s).unwrap().len(), 16);
        assert_eq!(parse_seed(&"ab".repeat(100)).unwrap().len(), MAX_SEED);
        assert!(parse_seed("0011").is_none());
        assert!(parse_seed(&"zz".repeat(16)).is_none());
        assert!(parse_seed(&"a".repeat(33)).is_none());
    }

    #[test]
    fn the_host_rng_is_ready() {
        assert!(crng_ready());
        assert!(wait_ready() < std::time::Duration::from_secs(1));
    }
}
