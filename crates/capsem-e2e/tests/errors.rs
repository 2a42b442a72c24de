//! Bad input gets one clear line on stderr and a non-zero exit — never a panic.

use capsem_e2e::{assert_one_clear_line, Env};

#[test]
fn bad_input_is_one_clear_line() {
    let Some(env) = Env::new() else { return };
    assert_one_clear_line(&env.capsem(&["exec", "nosuch", "true"]), "no session named");
    assert_one_clear_line(&env.capsem(&["info", "nosuch"]), "no session named");
    assert_one_clear_line(&env.capsem(&["delete", "nosuch"]), "no session named");
    assert_one_clear_line(
        &env.capsem(&["create", "bad name!"]),
        "invalid session name",
    );
    assert_one_clear_line(&env.capsem(&["create", "--ram", "0"]), "invalid --ram 0");
    assert_one_clear_line(&env.capsem(&["create", "--cpu", "0"]), "invalid --cpu 0");
    assert_one_clear_line(
        &env.capsem(&["run", "-e", "NOEQUALS", "true"]),
        "invalid environment variable",
    );
    assert_one_clear_line(
        &env.capsem(&["run", "-e", "1X=y", "true"]),
        "invalid environment variable",
    );

    env.ok(&["create", "taken", "--ram", "1", "--cpu", "1"]);
    assert_one_clear_line(
        &env.capsem(&["create", "taken", "--ram", "1", "--cpu", "1"]),
        "already exists",
    );
    env.ok(&["delete", "taken"]);
}

#[test]
fn conflict_is_http_409_and_assets_missing_is_503() {
    let Some(env) = Env::new() else { return };
    env.ok(&["create", "dup", "--ram", "1", "--cpu", "1"]);
    let sock = env.path().join("run/service.sock");
    let body = r#"{"name":"dup","ram_mb":1024,"cpus":1}"#;
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--unix-socket",
        ])
        .arg(&sock)
        .args(["-X", "POST", "-d", body, "http://capsem/vms/create"])
        .output()
        .expect("curl is needed for this test (scripts/lib.sh installs it)");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "409");
    env.ok(&["delete", "dup"]);

    // A home without a guest image.
    let bare = Env::bare();
    let out = bare.capsem(&["run", "true"]);
    assert_one_clear_line(&out, "capsem setup");
    let sock = bare.path().join("run/service.sock");
    let out = std::process::Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(&sock)
        .args(["-X", "POST", "-d", "{}", "http://capsem/vms/create"])
        .output()
        .expect("curl is needed for this test (scripts/lib.sh installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.ends_with("503"), "{text}");
    assert!(text.contains("capsem setup"), "{text}");
}

#[test]
fn qemu_missing_is_one_clear_line() {
    let Some(env) = Env::new() else { return };
    let out = env
        .cmd(&["run", "true"])
        .env("CAPSEM_QEMU", "/nonexistent/qemu-system-x86_64")
        .output()
        .unwrap();
    assert_one_clear_line(&out, "QEMU not found");
}
