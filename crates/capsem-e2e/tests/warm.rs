//! Warm starts: temporary sessions restored from the saved booted guest instead of booting.
//! Each restored guest must be its own machine (disk, RNG stream, clock), the template must
//! never change, and a template that does not load must leave a session that boots cold.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use capsem_e2e::{sha256_hex, Env};

/// Extra kernel words for this test's service: its templates get keys of their own, so it
/// neither uses nor disturbs the default template other tests run on.
const OWN_KEY_ARGS: &str = "capsem.e2e=warm";

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn start(value: &serde_json::Value) -> String {
    value["vm"]["start"].as_str().unwrap_or("").to_string()
}

/// Ask for the template of `ram_gib` GiB and `cpus` vCPUs (`image warm --json`): its
/// directory and the answer.
fn warm_template(env: &Env, ram_gib: u32, cpus: u32) -> (std::path::PathBuf, serde_json::Value) {
    let (ram, cpu) = (ram_gib.to_string(), cpus.to_string());
    let body = env.ok(&["image", "warm", "--ram", &ram, "--cpu", &cpu, "--json"]);
    let r: serde_json::Value = serde_json::from_str(&body).unwrap();
    let key = r["key"].as_str().unwrap();
    assert!(
        key.starts_with(&format!("{}m{cpus}c-", ram_gib * 1024)),
        "{body}"
    );
    let dir = env
        .path()
        .join("assets")
        .join(format!("v{}", env!("CARGO_PKG_VERSION")))
        .join("warm")
        .join(key);
    (dir, r)
}

/// A session of `size` (`create` arguments) starts warm and runs a command; then it is deleted
/// and nothing of it is left.
fn a_session_starts_warm(env: &Env, size: &[&str]) {
    let id = env.ok(&[&["create"], size].concat()).trim().to_string();
    assert_eq!(start(&env.info(&id)), "warm", "{}", env.session_logs());
    assert_eq!(env.ok(&["exec", &id, "echo $((6*7))"]).trim(), "42");
    env.ok(&["delete", &id]);
    capsem_e2e::assert_nothing_left(env);
}

/// Build a template of `ram_gib` GiB and `cpus` vCPUs afresh (one left by an aborted run is
/// removed first, so the build itself is always tried); returns its directory.
fn build_fresh_template(env: &Env, ram_gib: u32, cpus: u32) -> std::path::PathBuf {
    let (dir, mut r) = warm_template(env, ram_gib, cpus);
    if r["built"] != true {
        std::fs::remove_dir_all(&dir).unwrap();
        r = warm_template(env, ram_gib, cpus).1;
    }
    assert_eq!(r["built"], true, "{r}");
    assert!(dir.join("vm.state").is_file(), "{r}");
    dir
}

/// Build this test's 1 GiB / 1 vCPU template; returns its directory.
fn build_template(env: &Env) -> std::path::PathBuf {
    let (dir, r) = warm_template(env, 1, 1);
    assert!(dir.join("vm.state").is_file(), "{r}");
    dir
}

#[test]
fn restored_sessions_are_separate_machines_and_a_bad_template_boots_cold_and_is_rebuilt() {
    let Some(env) = Env::new() else { return };
    env.start_service_with("CAPSEM_KERNEL_ARGS", OWN_KEY_ARGS);
    let tmpl = build_template(&env);
    // `status` lists it.
    let status: serde_json::Value = serde_json::from_str(&env.ok(&["status", "--json"])).unwrap();
    assert!(
        status["warm"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["ram_mb"] == 1024 && t["cpus"] == 1),
        "{status}"
    );
    // Asking again finds it.
    let again = env.ok(&["image", "warm", "--ram", "1", "--cpu", "1"]);
    assert!(again.starts_with("warm start up to date"), "{again}");
    // Every template file is private, like the rest of CAPSEM_HOME.
    for f in ["vm.state", "disk.qcow2", "warm.json"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(tmpl.join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{f} is {mode:o}");
    }
    let disk_before = sha256_hex(&std::fs::read(tmpl.join("disk.qcow2")).unwrap());
    // The saved clock falls behind while the template waits: a guest that did not take the
    // host's time would be at least this far off.
    std::thread::sleep(Duration::from_secs(4));

    // One unnamed, one named but temporary (the API's `persistent: false`): both restored.
    let unnamed = env
        .ok(&["create", "--ram", "1", "--cpu", "1"])
        .trim()
        .to_string();
    let (code, body) = env.http(
        "POST",
        "/vms/create",
        r#"{"name":"w1","persistent":false,"ram_mb":1024,"cpus":1}"#,
    );
    assert_eq!(code, 200, "{body}");
    let named: serde_json::Value = serde_json::from_str(&body).unwrap();
    let ids = [unnamed, named["id"].as_str().unwrap().to_string()];
    let mut draws = Vec::new();
    for (id, hostname) in ids.iter().zip(["capsem", "w1"]) {
        assert_eq!(start(&env.info(id)), "warm", "{}", env.session_logs());
        // The session's link to the saved machine is gone once it is loaded.
        assert!(!env
            .path()
            .join("sessions")
            .join(id)
            .join("warm.state")
            .exists());
        let before = now_secs();
        let out = env.ok(&[
            "exec",
            id,
            "date +%s.%N; hostname; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo",
        ]);
        let after = now_secs();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        let guest: f64 = lines[0].parse().unwrap();
        assert!(
            guest > before - 1.0 && guest < after + 1.0,
            "guest clock {guest} not within a second of the host's {before}..{after}"
        );
        assert_eq!(lines[1], hostname);
        draws.push(lines[2].to_string());
        // The template's agent was saved after a hang-up: it must wait, not spin.
        env.assert_agent_idle(id);
    }
    assert_eq!(draws[0].len(), 64);
    assert_ne!(
        draws[0], draws[1],
        "two guests restored from one template drew the same random bytes"
    );
    // Separate disks: what one writes, the other does not see.
    env.ok(&["exec", &ids[0], "echo one > /root/mine && sync"]);
    let out = env.capsem(&["exec", &ids[1], "test -e /root/mine"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "the second session sees the first's file"
    );
    for id in &ids {
        env.ok(&["delete", id]);
    }
    assert_eq!(
        sha256_hex(&std::fs::read(tmpl.join("disk.qcow2")).unwrap()),
        disk_before,
        "the template's disk changed"
    );

    // A template whose state does not load is discarded; the session boots cold and works.
    std::fs::write(tmpl.join("vm.state"), b"not a saved machine").unwrap();
    let id = env
        .ok(&["create", "--ram", "1", "--cpu", "1"])
        .trim()
        .to_string();
    assert_eq!(start(&env.info(&id)), "cold");
    assert_eq!(env.ok(&["exec", &id, "echo $((6*7))"]).trim(), "42");
    assert!(!tmpl.exists(), "the bad template is still in use");
    // The removal is noted, with QEMU's refusal as the reason.
    let key = tmpl.file_name().unwrap().to_string_lossy().into_owned();
    let noted = std::fs::read_to_string(tmpl.with_file_name(capsem_core::warm::DISCARD_LOG))
        .unwrap_or_default();
    assert!(
        noted
            .lines()
            .any(|l| l.contains(&format!(" {key} (")) && l.contains("exit status: 1")),
        "{noted}"
    );
    // `status` shows the last one.
    let status = env.ok(&["status"]);
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("  discarded ") && l.contains(&key)),
        "{status}"
    );
    env.ok(&["delete", &id]);
    // The service saw this size start warm before: it builds a new template by itself, and
    // the next session starts warm again.
    assert!(
        env.wait_until(Duration::from_secs(180), || tmpl
            .join("warm.json")
            .is_file()),
        "no new template: {}",
        std::fs::read_to_string(env.path().join("run/warm.log")).unwrap_or_default()
    );
    a_session_starts_warm(&env, &["--ram", "1", "--cpu", "1"]);
    // This test's template is of no use to anyone else.
    let _ = std::fs::remove_dir_all(&tmpl);
}

#[test]
fn setup_prepares_warm_starts_for_the_default_size_and_persistent_sessions_boot_cold() {
    let Some(env) = Env::new() else { return };
    // `capsem setup` (scripts/test.sh runs it) saved the default template; asking for it
    // again does nothing.
    env.ok(&["start"]);
    let (code, body) = env.http("POST", "/warm", "{}");
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains(r#""built":false"#),
        "setup's template is gone (or was never built): {body}\n{}",
        env.session_logs()
    );
    let id = env.ok(&["create"]).trim().to_string();
    assert_eq!(start(&env.info(&id)), "warm");
    assert_eq!(
        env.ok(&["exec", &id, "python3 -c 'print(1+1)'"]).trim(),
        "2"
    );
    env.ok(&["delete", &id]);
    // A named session is its own machine from the first boot.
    env.ok(&["create", "keeper"]);
    assert_eq!(start(&env.info("keeper")), "cold");
    assert_eq!(env.ok(&["exec", "keeper", "hostname"]).trim(), "keeper");
    env.ok(&["delete", "keeper"]);
    // Bad sizes get one clear line (the API's 400, and the CLI's).
    let (code, body) = env.http("POST", "/warm", r#"{"ram_mb":0}"#);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("invalid RAM size"), "{body}");
    capsem_e2e::assert_one_clear_line(
        &env.capsem(&["image", "warm", "--cpu", "0"]),
        "invalid CPU count",
    );
}

#[test]
fn a_home_on_another_filesystem_than_its_image_still_starts_warm() {
    // Sessions on a tmpfs, the image (and its templates) on the disk: the template's disk is
    // copied and its saved machine read through the handle capsem-process holds.
    let Some(env) = Env::new_in("/dev/shm") else {
        return;
    };
    // The default size: `capsem setup` saved its template.
    a_session_starts_warm(&env, &[]);
}

#[test]
fn a_home_deeper_than_a_socket_address_builds_templates_and_starts_sessions() {
    // A socket address holds 107 bytes of path; a CI checkout or a long mount point puts the
    // home's sockets (service, per-session API, guest channel, QMP, the template build's)
    // beyond that. Every one must still bind and connect.
    let outer = tempfile::Builder::new()
        .prefix("capsem-e2e-deep-")
        .tempdir_in("/tmp")
        .unwrap();
    let parent = outer.path().join("d".repeat(100));
    std::fs::create_dir_all(&parent).unwrap();
    let Some(env) = Env::new_in(parent.to_str().unwrap()) else {
        return;
    };
    assert!(env.path().join("run/service.sock").as_os_str().len() > 107);
    env.start_service_with("CAPSEM_KERNEL_ARGS", "capsem.e2e=deep-home");
    // Other clients cannot dial such a socket; `status` says so.
    let status = env.ok(&["status"]);
    assert!(status.contains("too long for other clients"), "{status}");
    // This test's own template is built here, in a directory as deep as the home. Its size is
    // one no other test builds: publishing a template discards those of its size under other
    // keys.
    let tmpl = build_fresh_template(&env, 2, 1);
    a_session_starts_warm(&env, &["--ram", "2", "--cpu", "1"]);
    let _ = std::fs::remove_dir_all(&tmpl);
}

#[test]
fn a_template_made_for_another_configuration_is_replaced_after_a_cold_start() {
    // After a QEMU upgrade (or other guest kernel words) the template of a size no longer
    // matches: sessions of that size boot cold, and the service builds a matching template by
    // itself. A size no other test builds (publishing sweeps a size's other templates).
    let Some(env) = Env::new() else { return };
    env.start_service_with("CAPSEM_KERNEL_ARGS", "capsem.e2e=stale-a");
    let old = build_fresh_template(&env, 3, 1);
    env.ok(&["stop"]);

    env.start_service_with("CAPSEM_KERNEL_ARGS", "capsem.e2e=stale-b");
    let id = env
        .ok(&["create", "--ram", "3", "--cpu", "1"])
        .trim()
        .to_string();
    let info = env.info(&id);
    assert_eq!(start(&info), "cold", "{}", env.session_logs());
    // The process says why: the size's template was made for another configuration.
    assert_eq!(info["vm"]["other_template"], true, "{info}");
    env.ok(&["delete", &id]);
    let warm_dir = old.parent().unwrap().to_path_buf();
    let replacement = || {
        std::fs::read_dir(&warm_dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                name.starts_with("3072m1c-")
                    && !name.contains('.')
                    && *p != old
                    && p.join(capsem_core::warm::META_FILE).is_file()
            })
    };
    assert!(
        env.wait_until(Duration::from_secs(180), || replacement().is_some()),
        "no template for the new configuration: {}",
        std::fs::read_to_string(env.path().join("run/service.log")).unwrap_or_default()
    );
    assert!(
        !old.exists(),
        "the old configuration's template is still there"
    );
    a_session_starts_warm(&env, &["--ram", "3", "--cpu", "1"]);
    if let Some(new) = replacement() {
        let _ = std::fs::remove_dir_all(new);
    }
}
