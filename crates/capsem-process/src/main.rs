//! `capsem-process`: the per-VM process. Parses its arguments and runs
//! [`capsem_core::instance::run`]; the service starts it, one per session.

use std::io::Write;
use std::os::fd::FromRawFd;
use std::process::ExitCode;

use capsem_core::hypervisor::Accel;
use capsem_core::instance::{self, InstanceConfig};
use capsem_core::paths::Home;
use capsem_core::service::spawn::ReadyLine;
use clap::Parser;

/// Run one capsem VM (started by capsem-service; not meant to be run by hand).
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Session id (its directory under $CAPSEM_HOME/sessions must exist).
    #[arg(long, required_unless_present = "warm")]
    id: Option<String>,
    /// Instead of serving a session, build the warm-start template for `--ram-mb` × `--cpus`
    /// and print what was done as one JSON line.
    #[arg(long, requires_all = ["ram_mb", "cpus"], conflicts_with = "id")]
    warm: bool,
    /// RAM of the template, MiB (with --warm).
    #[arg(long)]
    ram_mb: Option<u32>,
    /// vCPUs of the template (with --warm).
    #[arg(long)]
    cpus: Option<u32>,
    /// Accelerator: kvm or tcg.
    #[arg(long, value_parser = ["kvm", "tcg"])]
    accel: String,
    /// File descriptor to report readiness on (one JSON line).
    #[arg(long)]
    ready_fd: Option<i32>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CAPSEM_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    // SAFETY: umask only changes this process's file creation mask.
    unsafe { libc::umask(0o077) };
    let home = match Home::from_env() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("capsem-process: {e}");
            return ExitCode::FAILURE;
        }
    };
    let accel = Accel::parse(&args.accel).expect("clap checked the value");
    let Some(id) = args.id else {
        let (ram_mb, cpus) = (args.ram_mb.unwrap_or(0), args.cpus.unwrap_or(0));
        return build_template(&home, accel, ram_mb, cpus);
    };
    let cfg = InstanceConfig { home, id, accel };
    let ready_fd = args.ready_fd;
    if let Some(fd) = ready_fd {
        // Keep the ready pipe out of QEMU, or the service would never see it close.
        // SAFETY: F_SETFD on an fd we were handed; no memory is involved.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    let report = move |res: Result<&capsem_core::api::VmInfo, &instance::InstanceError>| {
        let Some(fd) = ready_fd else { return };
        let line = match res {
            Ok(info) => ReadyLine::Ready(info.clone()),
            Err(e) => ReadyLine::Failed(capsem_core::error_chain(e)),
        };
        // SAFETY: the service handed us this fd for exactly this one write; we own it now.
        let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
        let mut buf = serde_json::to_vec(&line).expect("ready line serializes");
        buf.push(b'\n');
        let _ = f.write_all(&buf);
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    // QEMU is spawned from inside this block_on, i.e. on the main thread, which lives as long as
    // the process: its parent-death signal then fires exactly when this process dies.
    match rt.block_on(instance::run(cfg, report)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", capsem_core::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("capsem-process: cannot start the runtime: {e}");
            ExitCode::FAILURE
        })
}

/// `--warm`: build the template, print the report (or the error) as one JSON line on stdout.
fn build_template(home: &Home, accel: Accel, ram_mb: u32, cpus: u32) -> ExitCode {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    // As with a session, QEMU is spawned on the main thread (see `main`).
    match rt.block_on(instance::build_template(home, accel, ram_mb, cpus)) {
        Ok(report) => {
            println!(
                "{}",
                serde_json::to_string(&report).expect("report serializes")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            let why = capsem_core::error_chain(&e);
            tracing::error!("{why}");
            println!("{}", serde_json::json!({ "error": why }));
            ExitCode::FAILURE
        }
    }
}
