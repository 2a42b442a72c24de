//! One module per subcommand; [`dispatch`] routes the parsed command line to it. Each returns the
//! process exit code.

mod completions;
mod create;
mod delete;
mod exec;
mod images;
mod info;
mod list;
mod logs;
mod persist;
mod purge;
mod run;
mod service;
mod setup;
mod shell;
mod version;

use std::collections::BTreeMap;

use anyhow::bail;

use crate::cli::{Cli, Command, EnvArgs, ImageCommand};
use crate::client::Target;

pub async fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    let target = Target::new(cli.uds_path)?;
    match cli.command {
        Command::Create(a) => create::run(&target, a).await,
        Command::Shell(a) => shell::run(&target, a).await,
        Command::Exec(a) => exec::run(&target, a).await,
        Command::Run(a) => run::run(&target, a).await,
        Command::List(a) => list::run(&target, a).await,
        Command::Info(a) => info::run(&target, a).await,
        Command::Logs(a) => logs::run(&target, a).await,
        Command::Delete(a) => delete::run(&target, a).await,
        Command::Persist(a) => persist::run(&target, a).await,
        Command::Suspend(a) => persist::suspend(&target, &a.session).await,
        Command::Resume(a) => persist::resume(&target, &a.session).await,
        Command::Restart(a) => persist::restart(&target, &a.session).await,
        Command::Fork(a) => images::fork(&target, a).await,
        Command::Purge(a) => purge::run(&target, a).await,
        Command::Setup(a) => setup::setup(&target, a).await,
        Command::Image(ImageCommand::Build(a)) => setup::image_build(&target, a).await,
        Command::Image(ImageCommand::List(a)) => images::list(&target, a.json).await,
        Command::Image(ImageCommand::Delete(a)) => images::delete(&target, a).await,
        Command::Image(ImageCommand::Warm(a)) => setup::image_warm(&target, a).await,
        Command::Status(a) => service::status(&target, a.json).await,
        Command::Start => service::start(&target).await,
        Command::Stop => service::stop(&target).await,
        Command::Completions(a) => completions::run(a),
        Command::Version(a) => version::run(&target, a.json).await,
    }
}

/// `-e K=V` flags as a map, or one clear error.
pub fn env_map(env: &EnvArgs) -> anyhow::Result<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    for e in &env.env {
        match capsem_core::api::parse_env_pair(e) {
            Ok((k, v)) => {
                map.insert(k, v);
            }
            Err(msg) => bail!(msg),
        }
    }
    Ok(map)
}

/// `--ram` in GB as MiB, refusing 0.
pub fn ram_mb(gb: u32) -> anyhow::Result<u32> {
    if gb == 0 {
        bail!("invalid --ram 0: give the RAM in GB, at least 1");
    }
    gb.checked_mul(1024)
        .ok_or_else(|| anyhow::anyhow!("invalid --ram {gb}: too large"))
}

/// `--cpu`, refusing 0; `None` lets the service pick its default.
pub fn cpus(n: Option<u32>) -> anyhow::Result<Option<u32>> {
    if n == Some(0) {
        bail!("invalid --cpu 0: give at least 1 core");
    }
    Ok(n)
}

/// Seconds as a short human duration (`3m 12s`).
pub fn human_secs(s: u64) -> String {
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        _ => format!("{}h {}m", s / 3600, (s % 3600) / 60),
    }
}

/// Rows as left-aligned columns two spaces apart (the first row is the header).
pub fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let widths: Vec<usize> = (0..N)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            r.iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Path segment for a session query.
pub fn seg(q: &str) -> String {
    q.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
