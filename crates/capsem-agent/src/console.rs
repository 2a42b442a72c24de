//! Logging to the serial console. In a VM ([`enable`] called by the boot code) `/dev/console`
//! is opened on first use (fd 1 may not be open when the kernel starts `/init`); elsewhere
//! (tests, manual runs) lines go to stderr. Only boot, errors and lifecycle
//! events log: the exec and terminal paths stay silent.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

static CONSOLE: OnceLock<Option<File>> = OnceLock::new();
static ENABLED: AtomicBool = AtomicBool::new(false);

static TRACE: AtomicBool = AtomicBool::new(false);

/// Turn on boot tracing (`capsem.trace=1`): [`trace`] lines carry the uptime in µs.
pub fn enable_trace() {
    TRACE.store(true, Ordering::Relaxed);
}

/// A boot-profiling line, printed only with tracing on; `msg` is only built then.
pub fn trace(msg: impl FnOnce() -> String) {
    if TRACE.load(Ordering::Relaxed) {
        line(&format!("[{:>10} us] {}", crate::clock::uptime_us(), msg()));
    }
}

/// Send log lines to `/dev/console` from now on (only the VM's init does this).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

fn console() -> Option<&'static File> {
    if !ENABLED.load(Ordering::Relaxed) {
        return None;
    }
    CONSOLE
        .get_or_init(|| {
            OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NOCTTY)
                .open("/dev/console")
                .ok()
        })
        .as_ref()
}

/// Write one line to the console (or stderr when there is none).
pub fn line(msg: &str) {
    let text = format!("capsem-agent: {msg}\n");
    match console() {
        Some(mut c) => {
            let _ = c.write_all(text.as_bytes());
        }
        None => {
            let _ = std::io::stderr().write_all(text.as_bytes());
        }
    }
}

/// Format an error with its whole `source()` chain, for printing once at the edge.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        s.push_str(": ");
        s.push_str(&e.to_string());
        cur = e.source();
    }
    s
}

/// `console::log!("...", args)`: format and write one console line.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => { $crate::console::line(&format!($($arg)*)) };
}
