//! `capsem info SESSION [--json]`.

use capsem_core::api::{SessionInfo, StartKind};

use crate::cli::InfoArgs;
use crate::client::Target;

pub async fn run(target: &Target, a: InfoArgs) -> anyhow::Result<i32> {
    let info: SessionInfo = target
        .connect()
        .await?
        .get(&format!("/vms/{}/info", super::seg(&a.session)))
        .await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(0);
    }
    let kind = if info.persistent {
        "persistent"
    } else {
        "ephemeral"
    };
    println!("Session     {}", info.name.as_deref().unwrap_or(&info.id));
    println!("  id        {}", info.id);
    println!("  status    {} ({kind})", info.status.as_str());
    println!("  resources {} MiB RAM, {} CPUs", info.ram_mb, info.cpus);
    println!("  uptime    {}", super::human_secs(info.uptime_secs));
    println!("  assets    v{}", info.asset_version);
    if !info.env_keys.is_empty() {
        println!("  env       {}", info.env_keys.join(", "));
    }
    if let Some(vm) = &info.vm {
        println!("VM");
        println!("  backend   {} ({})", vm.hypervisor, vm.accel);
        println!(
            "  pids      process {}, qemu {}",
            vm.process_pid, vm.qemu_pid
        );
        println!(
            "  guest     agent {} on Linux {}",
            vm.agent_version, vm.kernel_release
        );
        match vm.start {
            StartKind::Cold => println!(
                "  boot      cold, {} ms to ready (guest: init {} ms, modules {} ms, rootfs {} ms, ready {} ms)",
                vm.boot_wall_ms, vm.boot.init_ms, vm.boot.modules_ms, vm.boot.rootfs_ms, vm.boot.ready_ms
            ),
            StartKind::Warm => println!(
                "  boot      warm (restored from the saved booted guest), {} ms to ready",
                vm.boot_wall_ms
            ),
            StartKind::Resumed => println!(
                "  boot      resumed from its saved state, {} ms to ready",
                vm.boot_wall_ms
            ),
        }
    }
    if let Some(t) = &info.telemetry {
        println!("Network");
        println!(
            "  requests  {} allowed, {} denied (DNS: {} allowed, {} denied)",
            t.requests_allowed, t.requests_denied, t.dns_allowed, t.dns_denied
        );
        if !t.top_domains.is_empty() {
            let top: Vec<String> = t
                .top_domains
                .iter()
                .map(|(d, n)| format!("{d} ({n})"))
                .collect();
            println!("  top       {}", top.join(", "));
        }
        println!("Model calls");
        println!(
            "  calls     {} ({} input, {} output, {} cache read, {} cache write tokens)",
            t.model_calls.len(),
            t.input_tokens,
            t.output_tokens,
            t.cache_read_tokens,
            t.cache_write_tokens
        );
        println!("  cost      ${:.6}", t.cost_usd);
        for m in &t.model_calls {
            println!(
                "  {:<9} {} {}in/{}out{} {}",
                m.provider,
                m.model,
                m.input_tokens,
                m.output_tokens,
                if m.streamed { " streamed" } else { "" },
                m.cost_usd
                    .map(|c| format!("${c:.6}"))
                    .unwrap_or_else(|| "(no price)".into())
            );
        }
    }
    Ok(0)
}
