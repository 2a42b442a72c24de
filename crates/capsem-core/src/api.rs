//! The service API's wire types (HTTP/1.1 + JSON over `run/service.sock`), shaped like Capsem's
//! service so its clients can talk to ours. Every front end (CLI, MCP) and the service itself use
//! these types; the tests below pin their JSON shape (bump [`API_VERSION`] when it changes).

use std::collections::BTreeMap;

use capsem_proto::lifecycle::BootTiming;
use serde::{Deserialize, Serialize};

/// Version of the service API. Bump it when a request or response changes shape.
pub const API_VERSION: u32 = 1;

pub const DEFAULT_RAM_MB: u32 = 4096;
pub const DEFAULT_CPUS: u32 = 4;

/// [`DEFAULT_CPUS`], but no more than the host has: extra vCPUs only slow a VM down (under TCG
/// each one is a host thread, and booting them is serial).
pub fn default_cpus() -> u32 {
    let host = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    DEFAULT_CPUS.min(host).max(1)
}
/// Upper bounds accepted at create (a VM bigger than the host makes no sense).
pub const MAX_RAM_MB: u32 = 1024 * 1024;
pub const MAX_CPUS: u32 = 256;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    pub error: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CreateRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram_mb: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Defaults to true when a name is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent: Option<bool>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Creating,
    Running,
    Stopping,
    Crashed,
    /// RAM and device state saved to disk; `resume` continues it.
    Suspended,
    /// Being saved to disk.
    Suspending,
    /// Rebooting (`restart`).
    Restarting,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Creating => "creating",
            Status::Running => "running",
            Status::Stopping => "stopping",
            Status::Crashed => "crashed",
            Status::Suspended => "suspended",
            Status::Suspending => "suspending",
            Status::Restarting => "restarting",
        }
    }
}

/// One session as `list` and `info` show it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SessionInfo {
    pub id: String,
    pub name: Option<String>,
    pub status: Status,
    pub persistent: bool,
    pub ram_mb: u32,
    pub cpus: u32,
    pub uptime_secs: u64,
    pub created_at: u64,
    pub asset_version: String,
    #[serde(default)]
    pub env_keys: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmInfo>,
    /// The session's record (requests, DNS, model calls); only in `info`, not in `list`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telemetry: Option<crate::telemetry::Summary>,
}

/// What the per-VM process knows about its VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VmInfo {
    pub hypervisor: String,
    pub accel: String,
    pub process_pid: u32,
    pub qemu_pid: u32,
    pub agent_version: String,
    pub kernel_release: String,
    /// Guest-side boot stages, ms since kernel start.
    pub boot: BootTiming,
    /// Host wall time from launching QEMU to the guest's ready handshake.
    pub boot_wall_ms: u64,
    /// How the guest came up.
    #[serde(default)]
    pub start: StartKind,
    /// A temporary session that booted cold because its size's template was made for another
    /// configuration (another QEMU build, other guest kernel words): the service replaces it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub other_template: bool,
}

/// How a session's guest came up.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StartKind {
    /// Booted its kernel.
    #[default]
    Cold,
    /// Restored from the warm-start template (see `crate::warm`).
    Warm,
    /// Restored from its own suspended state.
    Resumed,
}

impl StartKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StartKind::Cold => "cold",
            StartKind::Warm => "warm",
            StartKind::Resumed => "resumed",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ListResponse {
    pub sandboxes: Vec<SessionInfo>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ExecRequest {
    pub command: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExecResponse {
    /// UTF-8 (lossy); use the streaming endpoint for binary output.
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
    pub timed_out: bool,
    /// Guest-side spawn-to-reap time of the job, microseconds.
    pub guest_spawn_us: u64,
    /// Time the session's process spent on the call (from its handler taking the request to
    /// the answer, the guest's part included), microseconds: the rest of a round trip is the
    /// HTTP hops.
    #[serde(default)]
    pub process_us: u64,
    /// Output past 64 MiB per stream was dropped (the streaming endpoint has no limit).
    #[serde(default)]
    pub truncated: bool,
}

/// Body of the streaming exec upgrade (`POST /vms/{id}/exec/stream`): after `101`, the client
/// speaks capsem-proto exec frames (it sends the `ExecRequest` frame itself).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StreamRequest {}

/// Body of `POST /run`: create a temporary session, stream one job, destroy the session.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RunRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram_mb: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// `exec` (default) or `terminal`: which stream the upgrade carries.
    #[serde(default)]
    pub stream: StreamKind,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StreamKind {
    #[default]
    Exec,
    Terminal,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileReadRequest {
    pub path: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileReadResponse {
    pub content: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileWriteRequest {
    pub path: String,
    pub content: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LogsResponse {
    pub serial: String,
    pub process: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PurgeRequest {
    #[serde(default)]
    pub all: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PurgeResponse {
    pub deleted: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeleteResponse {
    pub id: String,
}

/// What `suspend` saved.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SuspendResponse {
    pub state_bytes: u64,
    pub took_ms: u64,
}

/// The per-VM `POST /freeze`: the disk layer now frozen (the VM writes a new one above it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FreezeResponse {
    pub frozen: u32,
    pub took_ms: u64,
}

/// `POST /warm`: build the warm-start template for this size (defaults: a session's).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct WarmRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram_mb: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
}

/// What a template build did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WarmResponse {
    pub key: String,
    /// False when a template for this size was there already.
    pub built: bool,
    pub state_bytes: u64,
    pub took_ms: u64,
}

/// `POST /vms/{id}/fork`: a point-in-time copy of the session's disk, kept as image `name`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ForkRequest {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// One fork image as `image list` and `fork` show it: its record and what it uses.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageInfo {
    #[serde(flatten)]
    pub image: crate::forks::ImageRecord,
    /// Bytes its disk layers take (layers shared with sessions are counted in full).
    pub size_bytes: u64,
    /// Sessions created from it.
    pub used_by: Vec<String>,
    /// How long the fork took (only in the reply to `fork`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub took_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageListResponse {
    pub images: Vec<ImageInfo>,
}

/// `POST /vms/{id}/persist`: name a session and keep it (its disk and record outlive its
/// stream, `purge` without `--all` and `capsem stop`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PersistRequest {
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusResponse {
    pub version: String,
    pub pid: u32,
    pub home: String,
    pub sessions: usize,
    pub accel: Option<String>,
    pub assets: Option<String>,
    /// The usable warm-start templates (sizes whose temporary sessions are restored).
    #[serde(default)]
    pub warm: Vec<WarmTemplate>,
    /// The last template taken out of use, and why (a line of `warm/discarded.log`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_discarded: Option<String>,
}

/// One warm-start template, as `status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WarmTemplate {
    pub ram_mb: u32,
    pub cpus: u32,
    pub state_bytes: u64,
    pub created_at: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VersionResponse {
    pub version: String,
    pub api_version: u32,
    pub protocol_version: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct EchoBenchRequest {
    pub count: u32,
    pub size: u32,
    /// Idle this long before each echo (not timed; at most a second, a minute in all, rounded
    /// up to whole milliseconds by tokio's timer): an echo that follows a quiet channel pays
    /// the wake-up of every thread and vCPU on its path, as an exec's answer does after the
    /// guest ran the command.
    #[serde(default)]
    pub gap_us: u32,
    /// The guest answers only after waiting this long, as an exec's answer comes only after
    /// the command ran; the wait (as the guest measured it) is taken off each sample. At most
    /// a second; `size` is then ignored (the answer carries no payload).
    #[serde(default)]
    pub reply_after_us: u32,
}

/// Channel echo round trips measured inside capsem-process, microseconds (less the guest's
/// wait, with `reply_after_us`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EchoBenchResponse {
    pub samples_us: Vec<u64>,
}

/// Parse `K=V` (the CLI's `-e`).
pub fn parse_env_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if valid_env_key(k) => Ok((k.to_string(), v.to_string())),
        _ => Err(format!(
            "invalid environment variable {s:?}: expected KEY=VALUE with KEY made of letters, digits and '_'"
        )),
    }
}

pub fn valid_env_key(k: &str) -> bool {
    !k.is_empty()
        && !k.as_bytes()[0].is_ascii_digit()
        && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON that clients see; a change here is an API change.
    #[test]
    fn wire_shapes_are_pinned() {
        let create: CreateRequest = serde_json::from_str(
            r#"{"name":"b","ram_mb":1024,"cpus":1,"persistent":true,"env":{"K":"v"},"from":"tmpl"}"#,
        )
        .unwrap();
        assert_eq!(create.from.as_deref(), Some("tmpl"));
        assert_eq!(
            serde_json::to_string(&CreateRequest::default()).unwrap(),
            "{}"
        );
        for (status, text) in [
            (Status::Creating, "creating"),
            (Status::Running, "running"),
            (Status::Stopping, "stopping"),
            (Status::Crashed, "crashed"),
            (Status::Suspended, "suspended"),
            (Status::Suspending, "suspending"),
            (Status::Restarting, "restarting"),
        ] {
            assert_eq!(serde_json::to_value(status).unwrap(), text);
            assert_eq!(status.as_str(), text);
        }
        let fork: ForkRequest = serde_json::from_str(r#"{"name":"t"}"#).unwrap();
        assert_eq!(fork.description, None);
        let image = ImageInfo {
            image: crate::forks::ImageRecord {
                name: "t".into(),
                description: "d".into(),
                source: "box".into(),
                created_at: 1,
                asset_version: "0.1.0".into(),
                ram_mb: 1024,
                cpus: 1,
            },
            size_bytes: 2,
            used_by: vec!["c".into()],
            took_ms: None,
        };
        assert_eq!(
            serde_json::to_value(&image).unwrap(),
            serde_json::json!({
                "name": "t", "description": "d", "source": "box", "created_at": 1,
                "asset_version": "0.1.0", "ram_mb": 1024, "cpus": 1,
                "size_bytes": 2, "used_by": ["c"]
            })
        );
        assert_eq!(
            serde_json::to_value(FreezeResponse {
                frozen: 3,
                took_ms: 4
            })
            .unwrap(),
            serde_json::json!({"frozen": 3, "took_ms": 4})
        );
    }

    #[test]
    fn env_pairs() {
        assert_eq!(parse_env_pair("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert_eq!(parse_env_pair("A="), Ok(("A".into(), "".into())));
        for bad in ["A", "=x", "1A=x", "A-B=x", ""] {
            assert!(parse_env_pair(bad).is_err(), "{bad}");
        }
    }
}
