//! `capsem setup` and `capsem image build`: build the guest assets from Debian packages, with a
//! progress line per step. Re-running with unchanged inputs does nothing.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context};
use capsem_core::api::{WarmRequest, WarmResponse};
use capsem_core::image::{self, BuildOptions, BuildProgress};
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::{ImageBuildArgs, ImageWarmArgs, SetupArgs};
use crate::client::Target;

pub async fn setup(target: &Target, a: SetupArgs) -> anyhow::Result<i32> {
    // There is nothing to ask yet; --non-interactive is accepted for scripts.
    let _ = a.non_interactive;
    // An explicit --preset always applies; a first setup gets the default, `medium`.
    let file = target.home.user_settings();
    let preset = match a.preset.as_deref() {
        Some(p) => Some(p),
        None if !file.exists() => Some("medium"),
        None => None,
    };
    if let Some(p) = preset {
        let parsed = capsem_core::policy::Preset::parse(p).context("clap checked the preset")?;
        target
            .home
            .ensure()
            .with_context(|| format!("cannot create {}", target.home.root().display()))?;
        capsem_core::policy::write_preset(&file, parsed)?;
        println!(
            "network preset {p} written to {} (edit it to allow or block domains)",
            file.display()
        );
    }
    build(target, a.force, None).await?;
    warm(target).await;
    Ok(0)
}

/// Prepare warm starts for the default session size (see [`image_warm`]; the build itself
/// tries twice). Not fatal: without it sessions boot cold.
async fn warm(target: &Target) {
    match post_warm(target, &WarmRequest::default()).await {
        Ok(r) => print_warm(&r),
        Err(e) => eprintln!("capsem: warning: {}; sessions boot cold", crate::render(&e)),
    }
}

/// `capsem image warm`: the service boots a guest of this size once and saves it; new temporary
/// sessions of that size are restored from it instead of booting.
pub async fn image_warm(target: &Target, a: ImageWarmArgs) -> anyhow::Result<i32> {
    let req = WarmRequest {
        ram_mb: a.ram.map(super::ram_mb).transpose()?,
        cpus: a.cpu,
    };
    let r = post_warm(target, &req).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print_warm(&r);
    }
    Ok(0)
}

async fn post_warm(target: &Target, req: &WarmRequest) -> anyhow::Result<WarmResponse> {
    let client = target.connect().await?;
    let pb = crate::progress::spinner("warm start: booting a guest once to save it");
    let r = client.post("/warm", req).await;
    pb.finish_and_clear();
    Ok(r?)
}

fn print_warm(r: &WarmResponse) {
    if r.built {
        println!(
            "warm start ready ({}): {} MiB saved in {:.1}s",
            r.key,
            r.state_bytes >> 20,
            r.took_ms as f64 / 1000.0
        );
    } else {
        println!("warm start up to date ({})", r.key);
    }
}

pub async fn image_build(target: &Target, a: ImageBuildArgs) -> anyhow::Result<i32> {
    build(target, a.force, a.agent).await
}

async fn build(target: &Target, force: bool, agent: Option<PathBuf>) -> anyhow::Result<i32> {
    let agent = match agent {
        Some(p) => p,
        None => find_agent()?,
    };
    if !agent.is_file() {
        bail!("guest agent binary not found at {}", agent.display());
    }
    let home = target.home.clone();
    home.ensure()
        .with_context(|| format!("cannot create {}", home.root().display()))?;
    let mut opts = BuildOptions::new(home.assets_root(), home.cache_dir(), agent);
    opts.force = force;
    let outcome = tokio::task::spawn_blocking(move || {
        let progress = Bars::default();
        let r = image::build(&opts, &progress);
        progress.finish();
        r
    })
    .await
    .context("the image build task failed")?;
    // Everything under CAPSEM_HOME is private to the user, the guest image included, and so
    // is what a failed build left behind.
    for tree in [home.assets_root(), home.cache_dir()] {
        if tree.exists() {
            let made = capsem_core::paths::make_private_tree(&tree);
            if outcome.is_ok() {
                made.with_context(|| format!("cannot make {} private", tree.display()))?;
            }
        }
    }
    let outcome = outcome?;
    capsem_core::net::Ca::load_or_create(&home.ca_dir()).context("cannot create the capsem CA")?;
    if outcome.rebuilt.is_empty() {
        println!("guest image up to date in {}", outcome.assets.dir.display());
    } else {
        println!(
            "guest image built in {:.1}s ({}) in {}",
            outcome.secs,
            outcome.rebuilt.join(", "),
            outcome.assets.dir.display()
        );
    }
    Ok(0)
}

/// The static guest agent: `$CAPSEM_AGENT_BIN`, else the musl build beside this binary's
/// target directory (`target/x86_64-unknown-linux-musl/release/capsem-agent`), else an
/// installed `capsem-agent.musl` next to this binary.
fn find_agent() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("binary has no directory")?;
    let mut candidates = vec![dir.join("capsem-agent.musl")];
    if let Some(target_dir) = dir.parent() {
        for profile in ["release", "debug"] {
            candidates.push(
                target_dir
                    .join("x86_64-unknown-linux-musl")
                    .join(profile)
                    .join("capsem-agent"),
            );
        }
    }
    candidates.into_iter().find(|p| p.is_file()).context(
        "the static guest agent is not built: run `cargo build --release -p capsem-agent --target x86_64-unknown-linux-musl` or pass --agent",
    )
}

/// One spinner per build step on stderr (drawn only on a terminal; plain lines otherwise).
#[derive(Default)]
struct Bars {
    current: Mutex<Option<ProgressBar>>,
}

impl Bars {
    fn finish(&self) {
        if let Some(pb) = self.current.lock().expect("lock").take() {
            pb.finish_and_clear();
        }
    }
}

impl BuildProgress for Bars {
    fn step(&self, index: usize, total: usize, name: &str) {
        self.finish();
        let pb = ProgressBar::new_spinner();
        pb.set_style(
            ProgressStyle::with_template("{spinner} [{prefix}] {msg} ({elapsed})")
                .expect("static template"),
        );
        pb.set_prefix(format!("{}/{} {name}", index + 1, total));
        pb.enable_steady_tick(Duration::from_millis(120));
        if pb.is_hidden() {
            eprintln!("[{}/{}] {name}", index + 1, total);
        }
        *self.current.lock().expect("lock") = Some(pb);
    }

    fn detail(&self, text: &str) {
        if let Some(pb) = self.current.lock().expect("lock").as_ref() {
            let t: String = text.chars().take(70).collect();
            pb.set_message(t);
        }
    }

    fn done(&self, name: &str, secs: f64) {
        self.finish();
        eprintln!("  done: {name} ({secs:.1}s)");
    }
}
