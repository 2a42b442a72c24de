//! Issue 4, first items: sessions outlive a killed service, a dead VM is marked crashed
//! quickly, and one name cannot be taken twice by racing creates.

use std::time::{Duration, Instant};

use capsem_e2e::{stderr, Env};

/// These tests kill, suspend and resume VMs and time what follows: one at a time, so that
/// no other test's VMs compete for the two cores while they do.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn status_of(env: &Env, name: &str) -> String {
    let json: serde_json::Value = serde_json::from_str(&env.ok(&["info", name, "--json"])).unwrap();
    json["status"].as_str().unwrap_or("").to_string()
}

#[test]
fn kill_9_of_the_service_loses_no_session() {
    let _one_at_a_time = serial();
    let Some(env) = Env::new() else { return };
    for name in ["keep", "keep2", "keep3"] {
        env.ok(&["create", name, "--ram", "1", "--cpu", "1"]);
        env.ok(&["exec", name, "echo still here > /root/note"]);
    }
    let pid: i32 = std::fs::read_to_string(env.path().join("run/service.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: signalling a process of this test's own home.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(
        env.wait_until(Duration::from_secs(5), || !std::path::Path::new(&format!(
            "/proc/{pid}"
        ))
        .exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true))
    );
    // The next command starts a new service, which adopts the running VM.
    for name in ["keep", "keep2", "keep3"] {
        assert_eq!(env.ok(&["exec", name, "cat /root/note"]), "still here\n");
        assert_eq!(status_of(&env, name), "running");
    }
    assert_eq!(env.ids().len(), 3);
    // kill -9 of one session's process: that one is crashed within 5 s, the others untouched.
    let json: serde_json::Value =
        serde_json::from_str(&env.ok(&["info", "keep2", "--json"])).unwrap();
    let process = json["vm"]["process_pid"].as_i64().unwrap() as i32;
    // SAFETY: signalling a process of this test's own home.
    unsafe { libc::kill(process, libc::SIGKILL) };
    assert!(
        env.wait_until(Duration::from_secs(5), || status_of(&env, "keep2")
            == "crashed")
    );
    assert_eq!(env.ok(&["exec", "keep", "echo ok"]), "ok\n");
    assert_eq!(env.ok(&["exec", "keep3", "echo ok"]), "ok\n");
    for name in ["keep", "keep2", "keep3"] {
        env.ok(&["delete", name]);
    }
}

#[test]
fn a_killed_vm_is_marked_crashed_within_5_seconds() {
    let _one_at_a_time = serial();
    let Some(env) = Env::new() else { return };
    env.ok(&["create", "fragile", "--ram", "1"]);
    env.ok(&["exec", "fragile", "echo kept > /root/note; sync"]);
    let json: serde_json::Value =
        serde_json::from_str(&env.ok(&["info", "fragile", "--json"])).unwrap();
    let qemu = json["vm"]["qemu_pid"].as_i64().unwrap() as i32;
    let t = Instant::now();
    // SAFETY: signalling this test's own VM.
    unsafe { libc::kill(qemu, libc::SIGKILL) };
    assert!(
        env.wait_until(Duration::from_secs(5), || status_of(&env, "fragile")
            == "crashed"),
        "status after {:?}: {}",
        t.elapsed(),
        status_of(&env, "fragile")
    );
    // A crashed session says so instead of hanging.
    let out = env.capsem(&["exec", "fragile", "true"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("crashed"), "{}", stderr(&out));
    // A crashed persistent session resumes by booting from its disk.
    env.ok(&["resume", "fragile"]);
    assert_eq!(env.ok(&["exec", "fragile", "cat /root/note"]), "kept\n");
    env.ok(&["delete", "fragile"]);
}

#[test]
fn ten_racing_creates_of_one_name_make_one_session() {
    let _one_at_a_time = serial();
    let Some(env) = Env::new() else { return };
    // Start the service first so the racers do not also race to start it.
    env.ok(&["start"]);
    let outs: Vec<std::process::Output> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..10)
            .map(|_| s.spawn(|| env.capsem(&["create", "same", "--ram", "1", "--cpu", "1"])))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = outs.iter().filter(|o| o.status.success()).count();
    assert_eq!(ok, 1, "{:?}", outs.iter().map(stderr).collect::<Vec<_>>());
    for o in outs.iter().filter(|o| !o.status.success()) {
        assert!(stderr(o).contains("already exists"), "{}", stderr(o));
        assert_eq!(stderr(o).lines().count(), 1, "{}", stderr(o));
    }
    assert_eq!(env.ids().len(), 1);
    env.ok(&["delete", "same"]);
}

#[test]
fn persist_keeps_a_temporary_session_even_mid_run() {
    let _one_at_a_time = serial();
    let Some(env) = Env::new() else { return };
    // A detached session without a name is temporary: purge would take it.
    let id = env.ok(&["create", "--ram", "1"]).trim().to_string();
    env.ok(&["persist", &id[..6], "kept"]);
    let json: serde_json::Value =
        serde_json::from_str(&env.ok(&["info", "kept", "--json"])).unwrap();
    assert_eq!(
        (json["id"].as_str(), json["persistent"].as_bool()),
        (Some(id.as_str()), Some(true))
    );
    env.ok(&["purge"]);
    assert_eq!(env.ids(), vec![id.clone()]);
    // The name is taken now.
    let other = env.ok(&["create", "--ram", "1"]).trim().to_string();
    let out = env.capsem(&["persist", &other, "kept"]);
    assert!(
        !out.status.success() && stderr(&out).contains("already exists"),
        "{}",
        stderr(&out)
    );
    env.ok(&["delete", &other]);

    // `run` is temporary until persisted; then the CLI going away does not delete it.
    let mut run = env
        .cmd(&["run", "--ram", "1", "--timeout", "120", "sleep 100"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(env.wait_until(Duration::from_secs(60), || env.ids().len() == 2));
    let run_id = env.ids().into_iter().find(|i| *i != id).unwrap();
    assert!(
        env.wait_until(Duration::from_secs(60), || status_of(&env, &run_id)
            == "running")
    );
    env.ok(&["persist", &run_id, "fromrun"]);
    // SAFETY: interrupting the CLI this test started.
    unsafe { libc::kill(run.id() as i32, libc::SIGINT) };
    let _ = run.wait();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(env.ok(&["exec", "fromrun", "echo alive"]), "alive\n");
    assert_eq!(status_of(&env, "fromrun"), "running");
    env.ok(&["delete", "fromrun"]);
    env.ok(&["delete", "kept"]);
}

#[test]
fn suspend_saves_ram_and_resume_continues_where_it_stopped() {
    let _one_at_a_time = serial();
    let Some(env) = Env::new() else { return };
    env.ok(&["create", "nap", "--ram", "1"]);
    // State that lives only in RAM: a tmpfs file and a running process.
    env.ok(&[
        "exec",
        "nap",
        "echo in-ram > /tmp/ram-note; echo on-disk > /root/disk-note",
    ]);
    env.ok(&[
        "exec",
        "nap",
        "nohup sleep 1000 > /dev/null 2>&1 & echo $! > /tmp/sleeper",
    ]);
    let pid = env.ok(&["exec", "nap", "cat /tmp/sleeper"]);
    let uptime = |env: &Env| -> f64 {
        env.ok(&["exec", "nap", "cut -d' ' -f1 /proc/uptime"])
            .trim()
            .parse()
            .unwrap()
    };
    let before = uptime(&env);

    // Only persistent sessions can be suspended.
    let tmp = env.ok(&["create", "--ram", "1"]).trim().to_string();
    let out = env.capsem(&["suspend", &tmp]);
    assert!(
        !out.status.success() && stderr(&out).contains("capsem persist"),
        "{}",
        stderr(&out)
    );
    env.ok(&["delete", &tmp]);

    env.ok(&["suspend", "nap"]);
    assert_eq!(status_of(&env, "nap"), "suspended");
    let id = serde_json::from_str::<serde_json::Value>(&env.ok(&["info", "nap", "--json"]))
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let state = env.path().join("sessions").join(&id).join("state/vm.state");
    assert!(std::fs::metadata(&state).unwrap().len() > 0);
    assert!(
        env.processes("qemu-system").is_empty(),
        "QEMU still running"
    );

    env.ok(&["resume", "nap"]);
    assert_eq!(status_of(&env, "nap"), "running");
    assert_eq!(env.ok(&["exec", "nap", "cat /tmp/ram-note"]), "in-ram\n");
    assert_eq!(env.ok(&["exec", "nap", "cat /root/disk-note"]), "on-disk\n");
    assert_eq!(
        env.ok(&[
            "exec",
            "nap",
            &format!("kill -0 {} && echo alive", pid.trim())
        ]),
        "alive\n"
    );
    assert!(!state.exists(), "the state is consumed by the resume");
    // The agent saw the suspend's hang-up; it must wait for the next host, not spin.
    env.assert_agent_idle("nap");
    let after = uptime(&env);
    assert!(after >= before, "uptime reset: {before} -> {after}");
    // Resume of a running session returns at once.
    env.ok(&["resume", "nap"]);
    env.ok(&["delete", "nap"]);
}

#[test]
fn service_stop_suspends_and_a_bad_state_boots_cold() {
    let _one_at_a_time = serial();
    let Some(env) = Env::new() else { return };
    env.ok(&["create", "keeper", "--ram", "1"]);
    let tmp = env.ok(&["create", "--ram", "1"]).trim().to_string();
    env.ok(&[
        "exec",
        "keeper",
        "echo in-ram > /tmp/ram-note; echo on-disk > /root/disk-note; sync",
    ]);
    // Stopping the service: the temporary session is destroyed, the persistent one suspended.
    env.ok(&["stop"]);
    assert!(env.processes("qemu-system").is_empty(), "QEMU left running");
    env.ok(&["start"]);
    assert_eq!(env.ids().len(), 1, "the temporary session should be gone");
    assert!(!env.ids().contains(&tmp));
    assert_eq!(status_of(&env, "keeper"), "suspended");
    env.ok(&["resume", "keeper"]);
    assert_eq!(env.ok(&["exec", "keeper", "cat /tmp/ram-note"]), "in-ram\n");

    // A state file that does not load is kept aside; the session boots from its disk.
    env.ok(&["suspend", "keeper"]);
    let id = serde_json::from_str::<serde_json::Value>(&env.ok(&["info", "keeper", "--json"]))
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let state_dir = env.path().join("sessions").join(&id).join("state");
    std::fs::write(state_dir.join("vm.state"), b"not a QEMU migration stream").unwrap();
    env.ok(&["resume", "keeper"]);
    assert_eq!(status_of(&env, "keeper"), "running");
    assert!(state_dir.join("vm.bad").exists(), "bad state kept aside");
    assert_eq!(
        env.ok(&["exec", "keeper", "cat /root/disk-note"]),
        "on-disk\n"
    );
    let out = env.capsem(&["exec", "keeper", "cat /tmp/ram-note"]);
    assert!(!out.status.success(), "a cold boot has an empty /tmp");
    let logs = env.ok(&["logs", "keeper"]);
    assert!(logs.contains("did not load"), "{logs}");
    env.ok(&["delete", "keeper"]);
}

#[test]
fn a_resumed_guest_that_missed_the_hang_up_is_recovered() {
    let _one_at_a_time = serial();
    let Some(env) = Env::new() else { return };
    // A service whose suspends skip the hang-up: the saved guest is still in its old channel
    // session, the race that made resumes hang now and then.
    env.start_service_with(capsem_core::instance::FAULT_STALE_SUSPEND_ENV, "1");
    env.ok(&["create", "stale", "--ram", "1"]);
    env.ok(&["exec", "stale", "echo in-ram > /tmp/note"]);
    env.ok(&["suspend", "stale"]);
    env.ok(&["resume", "stale"]);
    assert_eq!(env.ok(&["exec", "stale", "cat /tmp/note"]), "in-ram\n");
    let logs = env.ok(&["logs", "stale"]);
    assert!(
        logs.contains("did not greet"),
        "recovery path not taken: {logs}"
    );
    env.assert_agent_idle("stale");
    env.ok(&["delete", "stale"]);
}
