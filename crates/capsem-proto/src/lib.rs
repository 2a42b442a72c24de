//! Wire contract between the host and the guest agent: logical ports, message types, framing and
//! the stream multiplexer. It owns bytes on the wire and nothing else: no I/O policy, no VM logic.
//!
//! Layout of the channel: one virtio-serial port carries a yamux session ([`mux`]). Every yamux
//! stream begins with a [`StreamOpen`] frame naming its logical [`port`]; the rest of the stream is
//! that port's messages, each one length-prefixed ([`frame`]). The same exec and terminal messages
//! also travel between the CLI and `capsem-process` after an HTTP upgrade, so a client speaks one
//! protocol end to end.
//!
//! Versioning: [`PROTOCOL_VERSION`] is exchanged in the lifecycle handshake ([`lifecycle`]); a
//! mismatch is refused by the host. `tests/wire_contract.rs` pins the encoding of every message so
//! that an accidental change fails a test.

pub mod control;
pub mod exec;
pub mod frame;
pub mod lifecycle;
pub mod mux;
pub mod net;
pub mod terminal;

use serde::{Deserialize, Serialize};

/// Version of the guest protocol. Bump it on any change to a message type.
pub const PROTOCOL_VERSION: u32 = 4;

/// Name of the virtio-serial port that carries the channel.
pub const CHANNEL_PORT_NAME: &str = "capsem.0";

/// Logical ports, numbered as in Capsem.
pub mod port {
    /// Request/response: echo, file read/write, shutdown.
    pub const CONTROL: u16 = 5000;
    /// Interactive PTY sessions.
    pub const TERMINAL: u16 = 5001;
    /// Guest → host: one relayed TCP connection per stream (network issue).
    pub const MITM: u16 = 5002;
    /// Guest → host MCP (reserved).
    pub const MCP: u16 = 5003;
    /// Guest → host: readiness handshake and lifecycle notices.
    pub const LIFECYCLE: u16 = 5004;
    /// Host → guest: one exec job per stream, output streamed back.
    pub const EXEC: u16 = 5005;
}

/// First frame of every stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamOpen {
    pub port: u16,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    /// Exited normally with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl ExitStatus {
    /// Shell convention: the code, or 128 + signal.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => s.saturating_add(128),
        }
    }
}
