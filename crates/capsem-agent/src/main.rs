//! `capsem-agent` binary: as PID 1 it boots the guest ([`capsem_agent::boot`]) and serves the
//! host as the forked agent child; run as any other process it only serves (for debugging),
//! and never powers anything off.

use capsem_agent::serve::{self, Mode};
use capsem_agent::{boot, console};
use capsem_proto::lifecycle::BootTiming;

fn main() {
    let (timing, mode) = if std::process::id() == 1 {
        match boot::init() {
            Ok(t) => (t, Mode::Vm),
            Err(e) => {
                console::line(&format!("boot failed: {}", console::chain(&e)));
                capsem_agent::power::power_off();
            }
        }
    } else {
        (BootTiming::default(), Mode::Standalone)
    };
    if let Err(e) = serve::start(timing, mode) {
        console::line(&format!("agent stopped: {}", console::chain(&e)));
        std::process::exit(1);
    }
}
