//! `capsem run`: exit codes, separate streams, environment, binary-safe output, timeouts, the
//! guest's timers — each in a real VM that must be gone afterwards.

use capsem_e2e::{assert_nothing_left, sha256_hex, stderr, stdout, Env};

#[test]
fn exit_code_streams_and_env() {
    let Some(env) = Env::new() else { return };
    let out = env.capsem(&["run", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));

    let out = env.capsem(&["run", "echo to-out; echo to-err >&2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "to-out\n");
    assert!(stderr(&out).contains("to-err\n"), "{}", stderr(&out));
    assert!(!stdout(&out).contains("to-err"));

    let out = env.capsem(&[
        "run",
        "-e",
        "GREETING=hello world",
        "-e",
        "N=42",
        "echo \"$GREETING:$N\"",
    ]);
    assert_eq!(stdout(&out), "hello world:42\n", "{}", stderr(&out));

    let out = env.capsem(&["run", "python3 -c 'print(1+1)'"]);
    assert_eq!(stdout(&out), "2\n", "{}", stderr(&out));
    assert_nothing_left(&env);
}

#[test]
fn five_mib_binary_stream_is_byte_identical() {
    let Some(env) = Env::new() else { return };
    // The guest hashes what it sends (on stderr); we hash what arrives (stdout).
    let out = env.capsem(&[
        "run",
        "head -c 5M /dev/urandom > /tmp/blob && sha256sum /tmp/blob >&2 && cat /tmp/blob",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout.len(), 5 * 1024 * 1024);
    let guest_sum = stderr(&out)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string();
    assert_eq!(sha256_hex(&out.stdout), guest_sum);
    assert_nothing_left(&env);
}

/// The guest kernel runs high-resolution, tickless timers (`-cpu …,+arat` under TCG): an idle
/// guest then does not wake QEMU on the host 250 times a second per vCPU, and its timers are
/// precise to well under a jiffy.
#[test]
fn the_guest_is_tickless_when_idle() {
    let Some(env) = Env::new() else { return };
    let out = env.capsem(&["run", "grep -E 'hres_active|nohz_mode' /proc/timer_list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let values = |key: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.contains(key))
            .filter_map(|l| l.split(':').nth(1))
            .map(|v| v.trim().to_string())
            .collect()
    };
    let (hres, nohz) = (values("hres_active"), values("nohz_mode"));
    assert!(!hres.is_empty() && !nohz.is_empty(), "{text}");
    // One line per CPU: high-resolution timers on, NOHZ_MODE_HIGHRES (2).
    assert!(hres.iter().all(|v| v == "1"), "{text}");
    assert!(nohz.iter().all(|v| v == "2"), "{text}");
    assert_nothing_left(&env);
}
