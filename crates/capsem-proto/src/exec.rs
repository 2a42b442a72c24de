//! Exec port (5005): one job per stream. The host sends an [`ExecRequest`], then optionally
//! [`ExecInput`] frames; the guest answers with [`ExecEvent`]s ending in `Exit` or `Failed`.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::ExitStatus;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Run through `/bin/sh -c`.
    Shell(String),
    /// Run directly; the first element is looked up in `PATH`.
    Argv(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub command: Command,
    /// Added to the agent's base environment (PATH, HOME, LANG, …), overriding it.
    pub env: Vec<(String, String)>,
    /// Working directory; `/root` when absent.
    pub cwd: Option<String>,
    /// When true the host streams `ExecInput::Stdin` and then `CloseStdin`; otherwise stdin is
    /// `/dev/null`.
    pub stdin: bool,
    /// Kill the whole process group after this long and report `timed_out`.
    pub timeout_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ExecInput {
    Stdin(ByteBuf),
    CloseStdin,
    /// Kill the process group now (the client went away or asked).
    Kill,
}

/// The first byte of an encoded [`ExecEvent::Exit`] (its variant index): lets a relay spot the
/// exit frame without decoding the output frames. Pinned by `tests/wire_contract.rs`.
pub const EXIT_TAG: u8 = 3;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ExecEvent {
    Started {
        pid: u32,
    },
    Stdout(ByteBuf),
    Stderr(ByteBuf),
    Exit(ExecExit),
    /// The job could not start (no such program, bad cwd, …).
    Failed {
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ExecExit {
    pub status: ExitStatus,
    pub timed_out: bool,
    /// Guest-side time from just before spawn to reaping the child, in microseconds.
    pub spawn_to_exit_us: u64,
}
