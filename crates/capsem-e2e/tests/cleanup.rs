//! Nothing is left behind when the CLI dies in the middle of `run` (SIGINT or SIGKILL).

use std::process::Stdio;
use std::time::Duration;

use capsem_e2e::Env;

fn kill_mid_run(signal: i32) {
    let Some(env) = Env::new() else { return };
    let mut child = env
        .cmd(&["run", "sleep 600"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the job is really running in the guest.
    assert!(
        env.wait_until(Duration::from_secs(60), || !env
            .processes("qemu-system")
            .is_empty()
            && env.ids().len() == 1
            && env
                .capsem(&["exec", &env.ids()[0], "pgrep -x sleep"])
                .status
                .success()),
        "the run never started"
    );
    let id = env.ids()[0].clone();
    unsafe { libc::kill(child.id() as i32, signal) };
    let _ = child.wait();
    assert!(
        env.wait_until(Duration::from_secs(10), || env.ids().is_empty()),
        "session still listed after the CLI died"
    );
    assert!(
        env.wait_until(Duration::from_secs(10), || env
            .processes("qemu-system")
            .is_empty()
            && env.processes("capsem-process").is_empty()),
        "QEMU or capsem-process left running"
    );
    assert!(
        !env.path().join("sessions").join(id).exists(),
        "session directory left"
    );
}

#[test]
fn sigint_mid_run_leaves_nothing() {
    kill_mid_run(libc::SIGINT);
}

#[test]
fn sigkill_mid_run_leaves_nothing() {
    kill_mid_run(libc::SIGKILL);
}

#[test]
fn killed_process_takes_its_qemu_along() {
    let Some(env) = Env::new() else { return };
    let id = env
        .ok(&["create", "--ram", "1", "--cpu", "1"])
        .trim()
        .to_string();
    let procs = env.processes("capsem-process");
    assert_eq!(procs.len(), 1);
    unsafe { libc::kill(procs[0] as i32, libc::SIGKILL) };
    assert!(
        env.wait_until(Duration::from_secs(5), || env
            .processes("qemu-system")
            .is_empty()),
        "QEMU outlived its capsem-process"
    );
    // An ephemeral session whose VM died is removed.
    assert!(env.wait_until(Duration::from_secs(5), || env.ids().is_empty()));
    assert!(!env.path().join("sessions").join(id).exists());
}

#[test]
fn a_session_deleted_while_it_boots_leaves_nothing() {
    let Some(env) = Env::new() else { return };
    // A cold boot (no warm start) leaves seconds to delete the session in.
    env.start_service_with(capsem_core::warm::WARM_ENV, "0");
    let create = env
        .cmd(&["create", "--ram", "1", "--cpu", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        env.wait_until(Duration::from_secs(30), || env.ids().len() == 1),
        "the session never showed up"
    );
    let id = env.ids()[0].clone();
    env.ok(&["delete", &id]);
    let out = create.wait_with_output().unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("deleted while it was starting"),
        "{out:?}"
    );
    capsem_e2e::assert_nothing_left(&env);
}
