//! `capsem run --timeout`: the job is killed on time, the exit code is 124, and the VM is gone.
//! Alone in its test binary so that no other VM competes for the CPU while it is timed.

use std::time::{Duration, Instant};

use capsem_e2e::{stderr, Env};

#[test]
fn timeout_kills_and_cleans_up() {
    let Some(env) = Env::new() else { return };
    // Boot first so the measured time is the run, not the accelerator probe.
    env.ok(&["run", "true"]);
    let t = Instant::now();
    let out = env.capsem(&["run", "--timeout", "2", "sleep 60"]);
    let took = t.elapsed();
    assert_eq!(out.status.code(), Some(124), "{}", stderr(&out));
    assert!(stderr(&out).contains("timed out"), "{}", stderr(&out));
    assert!(took < Duration::from_secs(5), "took {took:?}");
    capsem_e2e::assert_nothing_left(&env);
}
