//! Issue 4, first items: sessions outlive a killed service, a dead VM is marked crashed
//! quickly, and one name cannot be taken twice by racing creates.

use std::time::{Duration, Instant};

use capsem_e2e::{stderr, Env};

fn status_of(env: &Env, name: &str) -> String {
    let json: serde_json::Value = serde_json::from_str(&env.ok(&["info", name, "--json"])).unwrap();
    json["status"].as_str().unwrap_or("").to_string()
}

#[test]
fn kill_9_of_the_service_loses_no_session() {
    let Some(env) = Env::new() else { return };
    env.ok(&["create", "keep", "--ram", "1"]);
    env.ok(&["exec", "keep", "echo still here > /root/note"]);
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
    assert_eq!(env.ok(&["exec", "keep", "cat /root/note"]), "still here\n");
    assert_eq!(status_of(&env, "keep"), "running");
    assert_eq!(env.ids().len(), 1);
    env.ok(&["delete", "keep"]);
}

#[test]
fn a_killed_vm_is_marked_crashed_within_5_seconds() {
    let Some(env) = Env::new() else { return };
    env.ok(&["create", "fragile", "--ram", "1"]);
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
    env.ok(&["delete", "fragile"]);
}

#[test]
fn ten_racing_creates_of_one_name_make_one_session() {
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
