//! Builds the guest assets from the command line without the CLI, printing each step:
//! `cargo run -p capsem-core --example build_image -- AGENT_BIN [ASSETS_ROOT [CACHE_DIR]] [--force] [--verify]`
//! (defaults: /tmp/imgtest/assets and /tmp/imgtest/cache). A development aid only.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use capsem_core::image::{self, BuildOptions, BuildProgress};

struct Print(Instant);

impl BuildProgress for Print {
    fn step(&self, index: usize, total: usize, name: &str) {
        eprintln!(
            "[{:6.1}s] ({}/{total}) {name}",
            self.0.elapsed().as_secs_f64(),
            index + 1
        );
    }
    fn detail(&self, text: &str) {
        eprintln!("[{:6.1}s]     {text}", self.0.elapsed().as_secs_f64());
    }
    fn done(&self, name: &str, secs: f64) {
        eprintln!(
            "[{:6.1}s] {name} done in {secs:.1}s",
            self.0.elapsed().as_secs_f64()
        );
    }
}

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let force = take_flag(&mut args, "--force");
    let verify = take_flag(&mut args, "--verify");
    let mut args = args.into_iter();
    let Some(agent) = args.next() else {
        eprintln!("usage: build_image AGENT_BIN [ASSETS_ROOT [CACHE_DIR]] [--force] [--verify]");
        return ExitCode::from(2);
    };
    let assets = args.next().unwrap_or_else(|| "/tmp/imgtest/assets".into());
    let cache = args.next().unwrap_or_else(|| "/tmp/imgtest/cache".into());
    let mut opts = BuildOptions::new(PathBuf::from(assets), PathBuf::from(cache), agent);
    opts.force = force;
    opts.verify = verify;
    match image::build(&opts, &Print(Instant::now())) {
        Ok(outcome) => {
            if outcome.up_to_date() {
                println!(
                    "up to date ({:.2}s): {}",
                    outcome.secs,
                    outcome.assets.dir.display()
                );
            } else {
                println!(
                    "rebuilt {} in {:.1}s: {}",
                    outcome.rebuilt.join(", "),
                    outcome.secs,
                    outcome.assets.dir.display()
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            let mut text = format!("error: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                text.push_str(&format!("\n  caused by: {cause}"));
                source = cause.source();
            }
            eprintln!("{text}");
            ExitCode::FAILURE
        }
    }
}

fn take_flag(args: &mut Vec<String>, flag: &str) -> bool {
    let before = args.len();
    args.retain(|a| a != flag);
    args.len() != before
}
