//! Issue 4, the rest: disk state through suspend, restart and a killed VM; fork, images and
//! clones; and the bad-input answers of the lasting-session verbs.

use std::time::Duration;

use capsem_e2e::{assert_one_clear_line, stderr, Env};

/// These tests boot, kill and copy VMs and some time what follows: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn status_of(env: &Env, name: &str) -> String {
    env.info(name)["status"].as_str().unwrap_or("").to_string()
}

/// The session's disk is mounted, writable, and the kernel logged no ext4 error for it.
fn disk_is_healthy(env: &Env, name: &str) -> String {
    let dmesg = env.ok(&["exec", name, "dmesg | grep 'EXT4-fs' || true"]);
    assert!(
        !dmesg.contains("error") && !dmesg.contains("warning") && dmesg.contains("mounted"),
        "{dmesg}"
    );
    assert_eq!(
        env.ok(&[
            "exec",
            name,
            "touch /root/.probe && rm /root/.probe && echo rw"
        ]),
        "rw\n"
    );
    dmesg
}

#[test]
fn disk_state_survives_suspend_restart_and_a_killed_vm() {
    let _one_at_a_time = serial();
    let Some(env) = Env::new() else { return };
    env.ok(&["create", "disky", "--ram", "1"]);
    env.ok(&["exec", "disky", "echo one > /root/one; sync"]);

    env.ok(&["suspend", "disky"]);
    env.ok(&["resume", "disky"]);
    assert_eq!(env.ok(&["exec", "disky", "cat /root/one"]), "one\n");
    disk_is_healthy(&env, "disky");

    // restart: a real reboot (uptime starts over), same disk, unmounted cleanly before.
    env.ok(&["exec", "disky", "echo two > /root/two; sync"]);
    let up = |env: &Env| -> f64 {
        env.ok(&["exec", "disky", "cut -d' ' -f1 /proc/uptime"])
            .trim()
            .parse()
            .unwrap()
    };
    std::thread::sleep(Duration::from_secs(2));
    let before = up(&env);
    env.ok(&["restart", "disky"]);
    assert_eq!(status_of(&env, "disky"), "running");
    assert!(up(&env) < before, "uptime did not start over");
    assert_eq!(
        env.ok(&["exec", "disky", "cat /root/one /root/two"]),
        "one\ntwo\n"
    );
    let dmesg = disk_is_healthy(&env, "disky");
    assert!(
        !dmesg.contains("recovery"),
        "the disk was not unmounted cleanly before the reboot: {dmesg}"
    );

    // kill -9 of QEMU: what was synced is there after the (journal-recovering) cold boot.
    env.ok(&["exec", "disky", "echo three > /root/three; sync"]);
    let qemu = env.info("disky")["vm"]["qemu_pid"].as_i64().unwrap() as i32;
    // SAFETY: signalling this test's own VM.
    unsafe { libc::kill(qemu, libc::SIGKILL) };
    assert!(
        env.wait_until(Duration::from_secs(5), || status_of(&env, "disky")
            == "crashed")
    );
    env.ok(&["resume", "disky"]);
    assert_eq!(
        env.ok(&["exec", "disky", "cat /root/one /root/two /root/three"]),
        "one\ntwo\nthree\n"
    );
    disk_is_healthy(&env, "disky");
    env.ok(&["delete", "disky"]);
}

#[test]
fn fork_is_a_point_in_time_copy_and_images_behave() {
    let _one_at_a_time = serial();
    let Some(env) = Env::new() else { return };
    env.ok(&["create", "src", "--ram", "1"]);
    // Not synced by the test: the fork itself flushes the guest.
    env.ok(&["exec", "src", "echo before > /root/before"]);
    let fork: serde_json::Value =
        serde_json::from_str(&env.ok(&["fork", "src", "tmpl", "-d", "with before", "--json"]))
            .unwrap();
    assert_eq!(fork["name"], "tmpl");
    assert_eq!(fork["source"], "src");
    assert_eq!(fork["description"], "with before");
    env.ok(&["exec", "src", "echo after > /root/after"]);

    // The source runs on, with both files.
    assert_eq!(status_of(&env, "src"), "running");
    assert_eq!(
        env.ok(&["exec", "src", "cat /root/before /root/after"]),
        "before\nafter\n"
    );
    // A clone has the fork-time files and not later ones, and a disk of its own.
    env.ok(&["create", "clone", "--from", "tmpl"]);
    assert_eq!(env.ok(&["exec", "clone", "ls /root"]), "before\n");
    assert_eq!(
        env.info("clone")["ram_mb"],
        1024,
        "RAM defaults to the image's"
    );
    env.ok(&["exec", "clone", "echo mine > /root/mine"]);
    assert_eq!(env.ok(&["exec", "src", "ls /root"]), "after\nbefore\n");
    // `resume FORK` boots the image as a persistent session of that name.
    env.ok(&["resume", "tmpl"]);
    let t = env.info("tmpl");
    assert_eq!(
        (t["status"].as_str(), t["persistent"].as_bool()),
        (Some("running"), Some(true))
    );
    assert_eq!(env.ok(&["exec", "tmpl", "ls /root"]), "before\n");

    // An image's name wins over a session id it happens to prefix.
    let id = env.info("src")["id"].as_str().unwrap().to_string();
    let prefix = &id[..4];
    env.ok(&["fork", "src", prefix]);
    env.ok(&["resume", prefix]);
    assert_eq!(env.info(prefix)["name"], prefix);
    env.ok(&["delete", prefix]);
    env.ok(&["image", "delete", prefix]);

    // image list shows it and who uses it.
    let list: serde_json::Value =
        serde_json::from_str(&env.ok(&["image", "list", "--json"])).unwrap();
    let images = list["images"].as_array().unwrap();
    assert_eq!(images.len(), 1, "{list}");
    assert_eq!(images[0]["name"], "tmpl");
    assert_eq!(images[0]["used_by"], serde_json::json!(["clone", "tmpl"]));
    assert!(env.ok(&["image", "list"]).contains("with before"));

    // A fork of a suspended session, and a clone of a persistent session: the source's state.
    env.ok(&["exec", "src", "echo ram > /tmp/ram-note"]);
    env.ok(&["suspend", "src"]);
    env.ok(&["fork", "src", "later"]);
    // Copies of a stopped session share one frozen point: its chain grows once, not per copy.
    let src_dir = env.path().join("sessions").join(&id);
    let layers = || {
        std::fs::read_dir(&src_dir)
            .unwrap()
            .filter(|e| {
                let n = e.as_ref().unwrap().file_name();
                let n = n.to_string_lossy();
                n.starts_with("disk") && n.ends_with(".qcow2")
            })
            .count()
    };
    let before = layers();
    env.ok(&["fork", "src", "later2"]);
    assert_eq!(layers(), before);
    env.ok(&["image", "delete", "later2"]);
    env.ok(&["resume", "src"]);
    assert_eq!(env.ok(&["exec", "src", "cat /tmp/ram-note"]), "ram\n");
    env.ok(&["create", "twin", "--from", "src"]);
    assert_eq!(env.ok(&["exec", "twin", "ls /root"]), "after\nbefore\n");
    env.ok(&["delete", "twin"]);

    // Deleting an image in use is refused; with --force the sessions keep their copy.
    assert_one_clear_line(
        &env.capsem(&["image", "delete", "tmpl"]),
        "in use by clone, tmpl",
    );
    env.ok(&["delete", "tmpl"]);
    env.ok(&["image", "delete", "tmpl", "--force"]);
    assert_eq!(
        env.ok(&["exec", "clone", "cat /root/before /root/mine"]),
        "before\nmine\n"
    );
    env.ok(&["restart", "clone"]);
    assert_eq!(
        env.ok(&["exec", "clone", "cat /root/before /root/mine"]),
        "before\nmine\n"
    );
    env.ok(&["delete", "clone"]);
    // The source's deletion does not take the image's data with it.
    env.ok(&["delete", "src"]);
    env.ok(&["create", "last", "--from", "later"]);
    assert_eq!(env.ok(&["exec", "last", "ls /root"]), "after\nbefore\n");
    env.ok(&["delete", "last"]);
    env.ok(&["image", "delete", "later"]);
    assert!(env
        .ok(&["image", "list", "--json"])
        .contains("\"images\": []"));
    assert!(std::fs::read_dir(env.path().join("images"))
        .unwrap()
        .next()
        .is_none());
}

#[test]
fn lasting_session_verbs_answer_bad_input_with_one_line_and_the_right_status() {
    let _one_at_a_time = serial();
    let Some(env) = Env::new() else { return };
    env.ok(&["create", "base", "--ram", "1"]);
    let tmp = env.ok(&["create", "--ram", "1"]).trim().to_string();

    // Suspend or restart of a temporary session: 409, naming `capsem persist`.
    assert_one_clear_line(&env.capsem(&["suspend", &tmp]), "capsem persist");
    assert_one_clear_line(&env.capsem(&["restart", &tmp]), "capsem persist");
    let (code, body) = env.http("POST", &format!("/vms/{tmp}/suspend"), "{}");
    assert_eq!(code, 409, "{body}");
    // Unknown names: 404.
    assert_one_clear_line(&env.capsem(&["resume", "nosuch"]), "no session named");
    assert_one_clear_line(&env.capsem(&["fork", "nosuch", "x"]), "no session named");
    assert_one_clear_line(
        &env.capsem(&["create", "--from", "nosuch"]),
        "no image or session named",
    );
    assert_one_clear_line(
        &env.capsem(&["image", "delete", "nosuch"]),
        "no image named",
    );
    assert_eq!(env.http("POST", "/vms/nosuch/resume", "{}").0, 404);
    assert_eq!(
        env.http("POST", "/vms/nosuch/fork", r#"{"name":"x"}"#).0,
        404
    );
    assert_eq!(env.http("DELETE", "/images/nosuch", "").0, 404);
    // Names never reach outside the home.
    assert_one_clear_line(&env.capsem(&["image", "delete", "../sessions"]), "invalid");
    assert_eq!(env.http("DELETE", "/images/..%2Fsessions", "").0, 400);
    assert_one_clear_line(
        &env.capsem(&["create", "--from", "/tmp"]),
        "no image or session named",
    );
    // Fork to a taken name (an image's or a session's), or an invalid one.
    env.ok(&["fork", "base", "snap"]);
    assert_one_clear_line(&env.capsem(&["fork", "base", "snap"]), "already exists");
    assert_one_clear_line(&env.capsem(&["fork", "base", "base"]), "already exists");
    assert_one_clear_line(
        &env.capsem(&["fork", "base", "bad name!"]),
        "invalid image name",
    );
    assert_eq!(
        env.http("POST", "/vms/base/fork", r#"{"name":"snap"}"#).0,
        409
    );
    assert_eq!(
        env.http("POST", "/vms/base/fork", r#"{"name":"no/pe"}"#).0,
        400
    );
    // A clone of a temporary session is refused (fork it instead).
    assert_one_clear_line(&env.capsem(&["create", "--from", &tmp]), "capsem fork");
    // An image in use: 409.
    env.ok(&["create", "user", "--from", "snap"]);
    assert_one_clear_line(&env.capsem(&["image", "delete", "snap"]), "in use");
    assert_eq!(env.http("DELETE", "/images/snap", "").0, 409);

    // Resume while suspending: dirty some RAM so the save takes a while, and ask meanwhile.
    env.ok(&[
        "exec",
        "base",
        "--timeout",
        "120",
        "yes capsem | head -c 300000000 > /tmp/fill",
    ]);
    std::thread::scope(|s| {
        let suspend = s.spawn(|| env.capsem(&["suspend", "base"]));
        assert!(
            env.wait_until(Duration::from_secs(20), || status_of(&env, "base")
                == "suspending"),
            "never saw the session suspending"
        );
        let (code, body) = env.http("POST", "/vms/base/resume", "{}");
        assert_eq!(code, 409, "{body}");
        assert!(body.contains("suspending"), "{body}");
        let out = suspend.join().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    });
    assert_eq!(status_of(&env, "base"), "suspended");
    for s in ["user", "base", &tmp] {
        env.ok(&["delete", s]);
    }
    env.ok(&["image", "delete", "snap"]);
}
