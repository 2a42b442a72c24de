//! Terminal port (5001): one PTY session per stream.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::ExitStatus;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TerminalRequest {
    /// Program to run; the user's login shell when absent.
    pub command: Option<String>,
    pub env: Vec<(String, String)>,
    pub term: String,
    pub cols: u16,
    pub rows: u16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TerminalInput {
    Data(ByteBuf),
    Resize { cols: u16, rows: u16 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TerminalEvent {
    Data(ByteBuf),
    Exit(ExitStatus),
    Failed { message: String },
}
