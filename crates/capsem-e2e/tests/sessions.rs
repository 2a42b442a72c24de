//! Session commands against long-lived VMs: create, list, exec, info, logs, delete, purge,
//! lookup by name, id and id prefix.

use std::time::Duration;

use capsem_e2e::{stderr, Env};

#[test]
fn create_list_exec_info_logs_delete() {
    let Some(env) = Env::new() else { return };
    let id = env
        .ok(&[
            "create",
            "box1",
            "--ram",
            "1",
            "--cpu",
            "1",
            "-e",
            "COLOR=blue",
        ])
        .trim()
        .to_string();
    assert_eq!(id.len(), 12, "create prints the id: {id:?}");

    let list = env.ok(&["list"]);
    let header = list.lines().next().unwrap();
    for col in ["NAME", "STATUS", "RAM", "CPUS", "UPTIME"] {
        assert!(header.contains(col), "{header}");
    }
    let row = list
        .lines()
        .find(|l| l.contains("box1"))
        .expect("box1 listed");
    assert!(row.contains("running") && row.contains("1G"), "{row}");
    assert_eq!(env.ids(), vec![id.clone()]);

    // exec by name, by id and by unique prefix; the exit code comes back; env is kept.
    assert_eq!(env.ok(&["exec", "box1", "echo $COLOR"]), "blue\n");
    assert_eq!(env.ok(&["exec", &id, "hostname"]), "box1\n");
    let out = env.capsem(&["exec", &id[..6], "exit 3"]);
    assert_eq!(out.status.code(), Some(3));
    // State persists between execs in the same session.
    env.ok(&["exec", "box1", "echo kept > /root/note"]);
    assert_eq!(env.ok(&["exec", "box1", "cat /root/note"]), "kept\n");

    let info = env.ok(&["info", "box1"]);
    assert!(
        info.contains(&id) && info.contains("running") && info.contains("persistent"),
        "{info}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&env.ok(&["info", "box1", "--json"])).unwrap();
    assert_eq!(json["id"], id.as_str());
    assert_eq!(json["name"], "box1");
    assert_eq!(json["ram_mb"], 1024);
    assert_eq!(json["cpus"], 1);
    assert_eq!(json["persistent"], true);
    assert!(json["vm"]["boot"]["ready_ms"].as_u64().unwrap() > 0);
    assert!(["kvm", "tcg"].contains(&json["vm"]["accel"].as_str().unwrap()));

    let logs = env.ok(&["logs", "box1"]);
    assert!(
        logs.contains("serial console") && logs.contains("guest ready"),
        "{logs}"
    );
    let tail = env.ok(&["logs", "box1", "--tail", "1"]);
    assert!(tail.lines().count() <= 4, "{tail}");

    assert!(env.ok(&["delete", "box1"]).contains(&id));
    assert!(env.ids().is_empty());
    assert!(!env.path().join("sessions").join(&id).exists());
}

#[test]
fn purge_and_purge_all() {
    let Some(env) = Env::new() else { return };
    let temp = env
        .ok(&["create", "--ram", "1", "--cpu", "1"])
        .trim()
        .to_string();
    let kept = env
        .ok(&["create", "keeper", "--ram", "1", "--cpu", "1"])
        .trim()
        .to_string();
    let out = env.ok(&["purge"]);
    assert!(out.contains(&temp) && !out.contains(&kept), "{out}");
    assert_eq!(env.ids(), vec![kept.clone()]);

    // --all asks first; without a terminal it refuses unless -y.
    let out = env.capsem(&["purge", "--all"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("-y"), "{}", stderr(&out));
    assert_eq!(env.ids(), vec![kept.clone()]);

    let out = env.ok(&["purge", "--all", "-y"]);
    assert!(out.contains(&kept));
    assert!(env.ids().is_empty());
    assert!(env.wait_until(Duration::from_secs(5), || env
        .processes("qemu-system")
        .is_empty()));
}

#[test]
fn private_files_and_socket() {
    use std::os::unix::fs::PermissionsExt;
    let Some(env) = Env::new() else { return };
    let id = env
        .ok(&["create", "--ram", "1", "--cpu", "1"])
        .trim()
        .to_string();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(env.path()), 0o700);
    assert_eq!(mode(&env.path().join("run/service.sock")), 0o600);
    assert_eq!(
        mode(&env.path().join(format!("run/instances/{id}.sock"))),
        0o600
    );
    let dir = env.path().join("sessions").join(&id);
    assert_eq!(mode(&dir), 0o700);
    for f in ["session.json", "process.log", "disk.qcow2", "serial.log"] {
        let p = dir.join(f);
        assert_eq!(mode(&p) & 0o077, 0, "{f} is readable by others");
    }
}

#[test]
fn uds_path_selects_another_service() {
    let Some(env) = Env::new() else { return };
    let sock = env.path().join("other.sock");
    let sock = sock.to_str().unwrap();
    let id = env
        .ok(&["--uds-path", sock, "create", "--ram", "1", "--cpu", "1"])
        .trim()
        .to_string();
    assert!(std::path::Path::new(sock).exists());
    assert_eq!(
        env.ok(&["--uds-path", sock, "exec", &id, "echo via-other"]),
        "via-other\n"
    );
    // The default socket has no service behind it.
    let out = env.capsem(&["status"]);
    assert!(!out.status.success());
    env.ok(&["--uds-path", sock, "delete", &id]);
    env.ok(&["--uds-path", sock, "stop"]);
}

#[test]
fn first_commands_at_once_start_one_service() {
    let Some(env) = Env::new() else { return };
    // Six commands with no service running: each starts one, and all must end up on the same.
    let racers: Vec<_> = (0..6)
        .map(|_| {
            env.cmd(&["list", "-q"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for r in racers {
        let out = r.wait_with_output().unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    assert_eq!(
        env.processes("capsem-service").len(),
        1,
        "more than one service for one socket"
    );
    // The lock beside the socket is private too.
    use std::os::unix::fs::PermissionsExt;
    let lock = std::fs::metadata(env.path().join("run/service.lock")).unwrap();
    assert_eq!(lock.permissions().mode() & 0o777, 0o600);
}
