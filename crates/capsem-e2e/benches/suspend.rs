//! Suspend and resume (issue 4): P3 = resume → exec-ready ÷ cold boot → exec-ready, and the
//! suspend time of a `--ram 1` session and of a `--ram 4` session that has touched 1 GiB.
//! Run: `cargo bench -p capsem-e2e --bench suspend` after `scripts/test.sh` built the guest
//! image; `BENCH_RUNS` sets the number of cold/resume pairs (default 5). One sitting, medians.

use std::time::Instant;

use capsem_core::api::{CreateRequest, SessionInfo};
use capsem_core::uds_http::UdsClient;
use capsem_e2e::median;

fn main() {
    let capsem_e2e::Bench {
        runs,
        env,
        rt,
        socket,
    } = capsem_e2e::Bench::new(5);
    env.ok(&["run", "true"]);
    let client = UdsClient::new(socket);
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1000.0;
    let empty = serde_json::json!({});

    let (mut cold, mut resume, mut suspend_1g) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let t = Instant::now();
        let info: SessionInfo = rt
            .block_on(client.post(
                "/vms/create",
                &CreateRequest {
                    name: Some(format!("p3-{i}")),
                    ram_mb: Some(1024),
                    ..Default::default()
                },
            ))
            .unwrap();
        cold.push(ms(t));
        let _: SessionInfo = rt
            .block_on(client.post(&format!("/vms/{}/suspend", info.id), &empty))
            .unwrap();
        let t = Instant::now();
        let _: SessionInfo = rt
            .block_on(client.post(&format!("/vms/{}/resume", info.id), &empty))
            .unwrap();
        resume.push(ms(t));
        // A second suspend, timed (the first made the state this resume loaded).
        let t = Instant::now();
        let _: SessionInfo = rt
            .block_on(client.post(&format!("/vms/{}/suspend", info.id), &empty))
            .unwrap();
        suspend_1g.push(ms(t));
        env.ok(&["delete", &info.id]);
    }

    // A --ram 4 session with 1 GiB of non-zero data in RAM (tmpfs).
    env.ok(&["create", "p3-big", "--ram", "4"]);
    env.ok(&[
        "exec",
        "p3-big",
        "--timeout",
        "600",
        "python3 -c \"open('/dev/shm/fill','wb').write(b'Z' * (1 << 30))\" && du -m /dev/shm/fill",
    ]);
    let info: SessionInfo = serde_json::from_value(env.info("p3-big")).unwrap();
    let t = Instant::now();
    let _: SessionInfo = rt
        .block_on(client.post(&format!("/vms/{}/suspend", info.id), &empty))
        .unwrap();
    let suspend_4g = ms(t);
    let state = env
        .path()
        .join("sessions")
        .join(&info.id)
        .join("state/vm.state");
    let state_mib = std::fs::metadata(&state).map(|m| m.len()).unwrap_or(0) / (1 << 20);
    let t = Instant::now();
    let _: SessionInfo = rt
        .block_on(client.post(&format!("/vms/{}/resume", info.id), &empty))
        .unwrap();
    let resume_4g = ms(t);
    env.ok(&["delete", &info.id]);

    let (c, r) = (median(&mut cold), median(&mut resume));
    println!("runs {runs}, --ram 1 sessions");
    println!("cold boot -> exec-ready (create)      p50 {c:8.1} ms");
    println!("resume -> exec-ready                  p50 {r:8.1} ms");
    println!(
        "P3 ratio                                  {:8.3}  (target <= 0.4)",
        r / c
    );
    println!(
        "suspend, --ram 1 idle                 p50 {:8.1} ms",
        median(&mut suspend_1g)
    );
    println!("suspend, --ram 4 with 1 GiB touched        {suspend_4g:8.1} ms (state {state_mib} MiB); its resume {resume_4g:.1} ms");
}
