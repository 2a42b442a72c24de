//! Argument types of every subcommand, kept apart from what the commands do. The list follows
//! the Capsem CLI reference command for command.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Run commands and AI agents in air-gapped Linux VMs.
#[derive(Parser)]
#[command(name = "capsem", version, propagate_version = true)]
pub struct Cli {
    /// Service socket to talk to (default: $CAPSEM_HOME/run/service.sock).
    #[arg(long, global = true, env = "CAPSEM_UDS_PATH")]
    pub uds_path: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Create and boot a session in the background (a NAME makes it persistent).
    Create(CreateArgs),
    /// Open an interactive shell; with no SESSION, in a temporary session destroyed on exit.
    Shell(ShellArgs),
    /// Run a command in a running session; its exit code becomes capsem's.
    Exec(ExecArgs),
    /// Run a command in a fresh temporary session, destroyed afterwards.
    Run(RunArgs),
    /// List sessions.
    #[command(alias = "ls")]
    List(ListArgs),
    /// Show a session's details.
    Info(InfoArgs),
    /// Show a session's serial console and process logs.
    Logs(LogsArgs),
    /// Delete a session and all its state.
    #[command(alias = "rm")]
    Delete(DeleteArgs),
    /// Keep a session under a name: it becomes persistent (also a temporary one mid-run).
    Persist(PersistArgs),
    /// Save a persistent session's RAM and CPU state to disk and stop its VM.
    Suspend(DeleteArgs),
    /// Continue a suspended session where it stopped (a running one: returns at once; a fork
    /// image's name: boot it as a persistent session of that name).
    Resume(DeleteArgs),
    /// Reboot a persistent session with the same disk (a suspended one loses its RAM state).
    Restart(DeleteArgs),
    /// Copy a session's disk, as it is now, into an image for `create --from` or `resume`.
    Fork(ForkArgs),
    /// Destroy all temporary sessions (with --all, persistent ones too).
    Purge(PurgeArgs),
    /// Build the guest image and prepare capsem for use.
    Setup(SetupArgs),
    /// Guest image and fork image commands.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Show the background service's status.
    Status(JsonFlag),
    /// Start the background service.
    Start,
    /// Stop the background service (temporary sessions are destroyed, running persistent ones
    /// suspended with their RAM).
    Stop,
    /// Print shell completions.
    Completions(CompletionsArgs),
    /// Show version and build information.
    Version(JsonFlag),
}

/// Shared by commands that take `-e KEY=VALUE`.
#[derive(Args, Clone, Default)]
pub struct EnvArgs {
    /// Environment variable for the guest (repeatable).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
}

#[derive(Args)]
pub struct CreateArgs {
    /// Name for the session (makes it persistent).
    pub name: Option<String>,
    /// RAM in GB [default: 4, or the source's with --from].
    #[arg(long)]
    pub ram: Option<u32>,
    /// CPU cores [default: 4, at most the host's core count; or the source's with --from].
    #[arg(long)]
    pub cpu: Option<u32>,
    /// Start from a copy of this fork image's (or persistent session's) disk.
    #[arg(long, value_name = "NAME")]
    pub from: Option<String>,
    #[command(flatten)]
    pub env: EnvArgs,
    /// Print the new session as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ShellArgs {
    /// Name or id of a running session.
    pub session: Option<String>,
    #[command(flatten)]
    pub env: EnvArgs,
}

#[derive(Args)]
pub struct ExecArgs {
    /// Name or id of the session.
    pub session: String,
    /// Command to execute (run by /bin/sh -c).
    pub command: String,
    /// Timeout in seconds.
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
    #[command(flatten)]
    pub env: EnvArgs,
}

#[derive(Args)]
pub struct RunArgs {
    /// Command to execute (run by /bin/sh -c).
    pub command: String,
    /// Timeout in seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    #[command(flatten)]
    pub env: EnvArgs,
    /// RAM in GB.
    #[arg(long, default_value_t = 4)]
    pub ram: u32,
    /// CPU cores [default: 4, at most the host's core count].
    #[arg(long)]
    pub cpu: Option<u32>,
}

#[derive(Args)]
pub struct ListArgs {
    /// Print only ids, one per line.
    #[arg(short, long)]
    pub quiet: bool,
    /// Print JSON.
    #[arg(long, conflicts_with = "quiet")]
    pub json: bool,
}

#[derive(Args)]
pub struct InfoArgs {
    /// Name or id of the session.
    pub session: String,
    /// Output as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct LogsArgs {
    /// Name or id of the session.
    pub session: String,
    /// Show only the last N lines of each log.
    #[arg(long, value_name = "N")]
    pub tail: Option<usize>,
    /// Print the logs' bytes as they are, even on a terminal (by default the guest's control
    /// characters are shown as \xNN there, so they cannot drive your terminal).
    #[arg(long)]
    pub raw: bool,
}

#[derive(Args)]
pub struct DeleteArgs {
    /// Name or id of the session.
    pub session: String,
}

#[derive(Args)]
pub struct PersistArgs {
    /// Name or id of the session.
    pub session: String,
    /// The name to keep it under.
    pub name: String,
}

#[derive(Args)]
pub struct ForkArgs {
    /// Name or id of the session to fork (running, suspended or crashed; it keeps running).
    pub session: String,
    /// Name of the new image.
    pub name: String,
    /// A description shown by `capsem image list`.
    #[arg(short = 'd', long = "description", value_name = "TEXT")]
    pub description: Option<String>,
    /// Print the new image as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct PurgeArgs {
    /// Also destroy persistent sessions.
    #[arg(long)]
    pub all: bool,
    /// Do not ask for confirmation.
    #[arg(short, long)]
    pub yes: bool,
}

#[derive(Args)]
pub struct SetupArgs {
    /// Never prompt (also implied when stdin is not a terminal).
    #[arg(long)]
    pub non_interactive: bool,
    /// Rebuild everything even if up to date.
    #[arg(long)]
    pub force: bool,
    /// Network preset written to user.toml: `medium` (package registries, GitHub and the AI
    /// APIs; the default on a first setup) or `high` (the AI APIs only). Everything else is
    /// denied.
    #[arg(long, value_parser = ["medium", "high"])]
    pub preset: Option<String>,
}

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Build (or refresh) the guest kernel, initrd and root filesystem.
    Build(ImageBuildArgs),
    /// List fork images (made by `capsem fork`).
    #[command(alias = "ls")]
    List(JsonFlag),
    /// Delete a fork image (refused while sessions made from it exist, unless --force).
    #[command(alias = "rm")]
    Delete(ImageDeleteArgs),
    /// Boot a guest of this size once and save it, so temporary sessions of that size are
    /// restored from it instead of booting (`capsem setup` does this for the default size).
    Warm(ImageWarmArgs),
}

#[derive(Args)]
pub struct ImageWarmArgs {
    /// RAM in GB [default: 4].
    #[arg(long)]
    pub ram: Option<u32>,
    /// CPU cores [default: 4, at most the host's core count].
    #[arg(long)]
    pub cpu: Option<u32>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ImageDeleteArgs {
    /// Name of the image.
    pub name: String,
    /// Delete it even if sessions were made from it (they keep their own copy of its layers).
    #[arg(long)]
    pub force: bool,
}

#[derive(Args)]
pub struct ImageBuildArgs {
    /// Rebuild everything even if up to date.
    #[arg(long)]
    pub force: bool,
    /// The static (musl) capsem-agent binary to put in the initrd.
    #[arg(long, env = "CAPSEM_AGENT_BIN")]
    pub agent: Option<PathBuf>,
}

#[derive(Args)]
pub struct JsonFlag {
    /// Output as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct CompletionsArgs {
    /// Shell to generate completions for.
    pub shell: clap_complete::Shell,
}
