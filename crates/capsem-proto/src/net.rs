//! Network port (5002), guest → host: the air gap's only way out. The guest opens one stream per
//! DNS question and one per TCP connection its relay accepts; the first frame says which
//! ([`NetOpen`]). A DNS stream gets one [`DnsAnswer`] back; a TCP stream carries the
//! connection's raw bytes both ways after the opening frame.

use serde::{Deserialize, Serialize};

/// The only address the guest has besides loopback (on `dummy0`): its DNS server answers every
/// allowed name with it, and the relay listens on it.
pub const GUEST_ADDR: [u8; 4] = [10, 0, 0, 1];

/// Ports the guest relay accepts on [`GUEST_ADDR`]; every other port is closed.
pub const RELAY_PORTS: [u16; 2] = [443, 80];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetOpen {
    /// Should `name` resolve? (A records only; the guest has no IPv6.)
    Dns { name: String },
    /// A TCP connection to [`GUEST_ADDR`]:`port`, opened by `process` when the guest could tell.
    Tcp { port: u16, process: Option<String> },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DnsAnswer {
    /// Resolve to [`GUEST_ADDR`].
    Allow,
    /// NXDOMAIN; `rule` is the policy rule that denied it.
    Deny { rule: String },
}
