//! The CLI without a VM: help, completions, version, and argument errors that never reach the
//! service.

use std::process::Command;

fn capsem(args: &[&str]) -> std::process::Output {
    let home = tempfile::tempdir().unwrap();
    Command::new(env!("CARGO_BIN_EXE_capsem"))
        .args(args)
        .env("CAPSEM_HOME", home.path())
        .output()
        .unwrap()
}

#[test]
fn help_lists_the_reference_commands() {
    let out = capsem(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "create",
        "shell",
        "exec",
        "run",
        "list",
        "info",
        "logs",
        "delete",
        "purge",
        "setup",
        "status",
        "start",
        "stop",
        "completions",
        "version",
    ] {
        assert!(text.contains(cmd), "--help lacks {cmd}: {text}");
    }
    let out = capsem(&["run", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("--timeout") && text.contains("KEY=VALUE"),
        "{text}"
    );
}

#[test]
fn completions_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let out = capsem(&["completions", shell]);
        assert!(out.status.success(), "{shell}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("capsem") && text.contains("exec"),
            "{shell}: {text}"
        );
    }
    let out = capsem(&["completions", "tcsh"]);
    assert!(!out.status.success());
}

#[test]
fn version_without_a_service() {
    let out = capsem(&["version"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(env!("CARGO_PKG_VERSION")) && text.contains("not running"),
        "{text}"
    );
    let out = capsem(&["version", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn bad_flags_fail_before_any_service_starts() {
    for (args, needle) in [
        (vec!["create", "--ram", "0"], "invalid --ram 0"),
        (vec!["run", "--cpu", "0", "true"], "invalid --cpu 0"),
        (
            vec!["run", "-e", "NOPE", "true"],
            "invalid environment variable",
        ),
        (
            vec!["exec", "box", "true", "-e", "=x"],
            "invalid environment variable",
        ),
    ] {
        let out = capsem(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}
