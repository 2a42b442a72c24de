//! `capsem-service`: the daemon. Binds the API socket, adopts running sessions, serves
//! [`capsem_core::service::routes`] until SIGTERM/SIGINT, then stops its sessions.

use std::path::PathBuf;

use anyhow::Context;
use capsem_core::paths::{self, Home};
use capsem_core::service::autostart::{self, ClaimError};
use capsem_core::service::{routes, Service};
use clap::Parser;

/// The capsem background service (the CLI starts it when needed).
#[derive(Parser)]
#[command(version)]
struct Args {
    /// API socket path (default: $CAPSEM_HOME/run/service.sock).
    #[arg(long, env = "CAPSEM_UDS_PATH")]
    uds_path: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CAPSEM_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(false)
        .init();
    // SAFETY: umask only changes this process's file creation mask.
    unsafe { libc::umask(0o077) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(serve(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e)
            if matches!(
                e.downcast_ref::<ClaimError>(),
                Some(ClaimError::AlreadyRunning(_))
            ) =>
        {
            eprintln!("capsem-service: {e:#}");
            std::process::ExitCode::from(autostart::ALREADY_RUNNING)
        }
        Err(e) => {
            eprintln!("capsem-service: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let home = Home::from_env().context("cannot find the capsem home")?;
    home.ensure()
        .with_context(|| format!("cannot create {}", home.root().display()))?;
    let sock = args.uds_path.unwrap_or_else(|| home.service_socket());
    if let Some(dir) = sock.parent() {
        paths::private_dir(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // One service per socket, for its whole life.
    let (_lock, listener) = autostart::claim(&sock).await?;
    paths::write_private(
        &home.service_pid(),
        std::process::id().to_string().as_bytes(),
    )?;

    // The CA every session's proxy mints from; made here, once, before any session races to.
    capsem_core::net::Ca::load_or_create(&home.ca_dir())?;
    let svc = Service::new(home.clone());
    svc.adopt().await;
    // Decide KVM vs TCG now, so the first create does not wait for the probe.
    let probe = svc.clone();
    tokio::spawn(async move {
        let _ = probe.accel().await;
    });
    tracing::info!(socket = %sock.display(), "capsem service listening");

    let stopping = svc.clone();
    axum::serve(listener, routes::router(svc))
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            tracing::info!("stopping: shutting down sessions");
            stopping.shutdown().await;
        })
        .await
        .context("the API server failed")?;
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(home.service_pid());
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("signal handler");
    let mut int = signal(SignalKind::interrupt()).expect("signal handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
