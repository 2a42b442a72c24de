//! capsem-agent: the guest side of capsem. As `/init` (PID 1) it prepares the root filesystem
//! ([`boot`]), forks a reaper, and the child serves the host over the virtio-serial channel
//! ([`channel`], [`serve`]) with one handler per logical port ([`control`], [`exec`], [`terminal`]).
//!
//! The handlers are generic over `AsyncRead + AsyncWrite` so tests drive them over in-memory pipes
//! or a host-side mux; only [`boot`] and [`power`] touch machine-wide state, and they act only
//! when the process really is PID 1 of a VM.
//!
//! **Invariant:** nothing on the exec/terminal hot path writes to the console.

pub mod boot;
pub mod channel;
pub mod clock;
pub mod cmdline;
pub mod console;
pub mod control;
pub mod env;
pub mod exec;
pub mod fdio;
pub mod framed;
pub mod net;
pub mod power;
pub mod serve;
pub mod terminal;
