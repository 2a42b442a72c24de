//! Fork (issue 4, P5): fork of a session with 1 GiB written to its disk ÷ fork of a fresh one
//! (target ≤ 1.5), and the absolute time (target ≤ 100 ms), as a client of the service sees it.
//! Run: `cargo bench -p capsem-e2e --bench fork` after `scripts/test.sh` built the guest image;
//! `BENCH_RUNS` sets the number of fork pairs (default 7). One sitting, medians.

use std::time::Instant;

use capsem_core::api::{ForkRequest, ImageInfo};
use capsem_core::uds_http::UdsClient;
use capsem_e2e::median;

fn main() {
    let capsem_e2e::Bench {
        runs,
        env,
        rt,
        socket,
    } = capsem_e2e::Bench::new(7);
    let client = UdsClient::new(socket);
    env.ok(&["start"]);
    for name in ["fresh", "loaded"] {
        env.ok(&["create", name, "--ram", "2"]);
    }
    let t = Instant::now();
    let fill = env.ok(&[
        "exec",
        "loaded",
        "--timeout",
        "900",
        "yes capsem-fork-bench | head -c 1073741824 > /root/big && sync && du -m /root/big",
    ]);
    println!(
        "wrote {} MiB to /root in the loaded session in {:.1} s",
        fill.split_whitespace().next().unwrap_or("?"),
        t.elapsed().as_secs_f64()
    );

    let (mut fresh, mut loaded, mut fresh_srv, mut loaded_srv) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        for (source, wall, srv) in [
            ("fresh", &mut fresh, &mut fresh_srv),
            ("loaded", &mut loaded, &mut loaded_srv),
        ] {
            let name = format!("{source}-{i}");
            let t = Instant::now();
            let info: ImageInfo = rt
                .block_on(client.post(
                    &format!("/vms/{source}/fork"),
                    &ForkRequest {
                        name: name.clone(),
                        description: None,
                    },
                ))
                .unwrap();
            wall.push(t.elapsed().as_secs_f64() * 1000.0);
            srv.push(info.took_ms.unwrap_or(0) as f64);
            env.ok(&["image", "delete", &name]);
        }
    }
    let size = |id: &str| -> u64 {
        let out = env.ok(&["info", id, "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let dir = env.path().join("sessions").join(v["id"].as_str().unwrap());
        capsem_core::disk::allocated_bytes(&dir) >> 20
    };
    let (f, l) = (median(&mut fresh), median(&mut loaded));
    println!(
        "runs {runs}; disks: fresh {} MiB, loaded {} MiB",
        size("fresh"),
        size("loaded")
    );
    println!(
        "fork of a fresh session              p50 {f:7.1} ms (service-side {:.0} ms)",
        median(&mut fresh_srv)
    );
    println!(
        "fork of a session with 1 GiB written p50 {l:7.1} ms (service-side {:.0} ms)",
        median(&mut loaded_srv)
    );
    println!(
        "P5 ratio                                 {:7.3}  (target <= 1.5; absolute <= 100 ms)",
        l / f
    );
    env.ok(&["delete", "fresh"]);
    env.ok(&["delete", "loaded"]);
}
