//! Control port (5000): one request and one response per stream.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ControlRequest {
    /// Sent back unchanged; measures the channel round trip.
    Echo { payload: ByteBuf },
    /// Read a whole file.
    ReadFile { path: String },
    /// Create or replace a file (parents created), with an optional mode.
    WriteFile {
        path: String,
        data: ByteBuf,
        mode: Option<u32>,
    },
    /// Sync filesystems and power off (or reboot).
    Shutdown { reboot: bool },
    /// Trust this PEM certificate (the capsem CA) system-wide: the OpenSSL bundle and the
    /// variables exec and shell set for Python and Node. Idempotent.
    TrustCa { pem: String },
    /// A guest restored from a saved machine (a warm start or a resume) takes on the identity
    /// of its new session: the hostname, fresh entropy mixed into the kernel RNG and a forced
    /// reseed (every guest restored from one saved state would otherwise draw the same
    /// numbers), and the host's wall clock (the saved clock is as old as the save).
    Identity {
        hostname: String,
        seed: ByteBuf,
        unix_ns: u64,
    },
    /// Answer [`ControlResponse::Waited`] after waiting `us` microseconds: an echo with an
    /// exec's timing, whose answer also comes after a quiet spell (the command's run).
    Wait { us: u32 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ControlResponse {
    Echo {
        payload: ByteBuf,
    },
    File {
        data: ByteBuf,
    },
    Done,
    Error {
        message: String,
    },
    /// How long the guest actually waited (its timer's granularity makes it a little longer).
    Waited {
        us: u64,
    },
}
