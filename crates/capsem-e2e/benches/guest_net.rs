//! The proxy as a guest sees it (issue 3): `curl` inside a real VM downloads 32 MiB and makes
//! 200 small requests on one connection (HTTP/2, curl's default, which the proxy offers)
//! through the relay, the channel and the host's MITM proxy to a local stand-in upstream. No direct path exists to compare with (the guest has no network of
//! its own), so the figures are absolute: MiB/s and ms per request. Under TCG the guest's own
//! CPU (curl's TLS, its kernel, the agent's relay) sets most of them; the bench is there to
//! catch a change on the host side that costs the guest, such as the size of the channel's
//! frames. Run: `cargo bench -p capsem-e2e --bench guest_net` after `scripts/test.sh` built the
//! guest image; `BENCH_RUNS` sets the number of rounds (default 5). One sitting, medians.

use capsem_e2e::median;
use capsem_e2e::upstream::Upstream;

const HOST: &str = "dl.example";
const BIG_MIB: usize = 32;
const SMALL: usize = 200;

fn main() {
    let capsem_e2e::Bench { runs, env, .. } = capsem_e2e::Bench::new(5);
    let up = Upstream::start(&[HOST], env.path());
    up.fixture(
        "/big",
        false,
        "application/octet-stream",
        &vec![0x5a; BIG_MIB << 20],
    );
    env.write_settings(&format!(
        "[network]\ndefault = \"deny\"\nallow = [\"{HOST}\"]\nextra_ca_bundle = \"{}\"\n\
         [network.upstream_override]\n\"{HOST}\" = \"127.0.0.1:{}\"\n",
        up.ca_pem.display(),
        up.port
    ));
    env.ok(&["create", "net", "--ram", "1"]);
    let exec = |cmd: &str| env.ok(&["exec", "net", "--timeout", "300", cmd]);
    let numbers = |out: String| -> Vec<f64> {
        out.split_whitespace()
            .map(|w| w.parse::<f64>().expect("a number from curl's --write-out"))
            .collect()
    };

    let (mut mib_s, mut per_req) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        // curl's speed_download is bytes/s over the whole transfer; size_download checks it
        // all arrived.
        let got = numbers(exec(&format!(
            "curl -sS -o /dev/null -w '%{{speed_download}} %{{size_download}}' https://{HOST}/big"
        )));
        assert_eq!(got[1] as usize, BIG_MIB << 20, "the download was cut short");
        mib_s.push(got[0] / (1 << 20) as f64);
        // One connection, SMALL requests back to back; time_total per request, the first
        // (with the TLS handshake) left out.
        let mut times = numbers(exec(&format!(
            "curl -sS -o /dev/null -w '%{{time_total}} ' 'https://{HOST}/n/[1-{SMALL}]'"
        )));
        assert_eq!(times.len(), SMALL);
        times.remove(0);
        per_req.push(median(&mut times) * 1000.0);
    }
    env.ok(&["delete", "net"]);
    println!(
        "guest download of {BIG_MIB} MiB through the proxy: {:.1} MiB/s (median of {runs})",
        median(&mut mib_s)
    );
    println!(
        "guest keep-alive requests through the proxy: {:.3} ms per request, {:.0} req/s on one connection (median of {runs})",
        median(&mut per_req),
        1000.0 / median(&mut per_req)
    );
}
