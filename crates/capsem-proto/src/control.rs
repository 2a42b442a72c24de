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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ControlResponse {
    Echo { payload: ByteBuf },
    File { data: ByteBuf },
    Done,
    Error { message: String },
}
