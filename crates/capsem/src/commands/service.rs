//! `capsem status|start|stop`: the background service.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use capsem_core::api::StatusResponse;

use crate::client::Target;

pub async fn status(target: &Target, json: bool) -> anyhow::Result<i32> {
    if !target.is_running().await {
        if json {
            println!("{}", serde_json::json!({ "running": false }));
        } else {
            println!("service: not running (socket {})", target.socket.display());
        }
        return Ok(1);
    }
    let s: StatusResponse = target.client().get("/status").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(0);
    }
    println!("service: running (pid {}, version {})", s.pid, s.version);
    println!("  home      {}", s.home);
    println!("  socket    {}", target.socket.display());
    if !capsem_core::sock::fits_address(&target.socket) {
        println!(
            "            (too long for other clients such as `curl --unix-socket`; for them, start the service with --uds-path at a shorter path)"
        );
    }
    println!("  sessions  {}", s.sessions);
    println!(
        "  accel     {}",
        s.accel.as_deref().unwrap_or("not probed yet")
    );
    match s.assets {
        Some(a) => println!("  assets    {a}"),
        None => println!("  assets    missing: run `capsem setup`"),
    }
    if s.warm.is_empty() {
        println!("  warm      none: temporary sessions boot cold (`capsem image warm` saves one)");
    }
    for t in &s.warm {
        println!(
            "  warm      {} MiB, {} CPUs: temporary sessions of this size are restored ({} MiB saved)",
            t.ram_mb,
            t.cpus,
            t.state_bytes >> 20
        );
    }
    if let Some(d) = &s.warm_discarded {
        println!("  discarded {d}");
    }
    Ok(0)
}

pub async fn start(target: &Target) -> anyhow::Result<i32> {
    if target.is_running().await {
        println!("service already running");
        return Ok(0);
    }
    target.start().await?;
    println!("service started");
    Ok(0)
}

pub async fn stop(target: &Target) -> anyhow::Result<i32> {
    if !target.is_running().await {
        println!("service not running");
        return Ok(0);
    }
    let s: StatusResponse = target.client().get("/status").await?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(s.pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .context("cannot signal the service")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if nix::sys::signal::kill(nix::unistd::Pid::from_raw(s.pid as i32), None).is_err() {
            println!("service stopped");
            return Ok(0);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("the service (pid {}) did not stop within 60 s", s.pid)
}
