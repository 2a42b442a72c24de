//! capsem's logic, shared by every binary: where things live on disk, session records, the QEMU
//! backend, the host end of the guest channel, the per-VM instance server and the service
//! registry. Binaries only parse arguments and call into here.

pub mod api;
pub mod channel;
pub mod disk;
pub mod forks;
pub mod hypervisor;
pub mod image;
pub mod instance;
pub mod names;
pub mod net;
pub mod paths;
pub mod policy;
pub mod record;
pub mod service;
pub mod sock;
pub mod telemetry;
pub mod uds_http;
pub mod warm;

/// Render an error and its sources as one line: `outer: cause: root cause`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let msg = c.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = c.source();
    }
    s
}
