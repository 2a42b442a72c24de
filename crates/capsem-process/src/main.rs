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
    #[arg(long)]
    id: String,
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
    let cfg = InstanceConfig {
        home,
        id: args.id,
        accel: Accel::parse(&args.accel).expect("clap checked the value"),
    };
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
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("capsem-process: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
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
