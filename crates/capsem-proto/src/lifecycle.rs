//! Lifecycle port (5004): the guest opens this stream as soon as its end of the channel is up and
//! says it is ready; the host answers with its own version. One exchange, then the stream stays
//! open for lifecycle notices in later versions.

use serde::{Deserialize, Serialize};

/// Guest → host, first message on the lifecycle stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestReady {
    pub protocol_version: u32,
    pub agent_version: String,
    pub kernel_release: String,
    pub boot: BootTiming,
}

/// Milliseconds since the kernel started (from `/proc/uptime`) at each stage of the agent's boot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BootTiming {
    /// `/init` started.
    pub init_ms: u64,
    /// Kernel modules loaded.
    pub modules_ms: u64,
    /// Root overlay mounted and switched into.
    pub rootfs_ms: u64,
    /// Channel open and ready to serve.
    pub ready_ms: u64,
}

/// Host → guest answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HostHello {
    Accepted { protocol_version: u32 },
    Refused { reason: String },
}
