//! The air gap and the egress policy, seen from inside a real guest. A local HTTPS server stands
//! in for the real sites (`[network.upstream_override]` points the proxy at it, the policy's
//! `extra_ca_bundle` makes the proxy trust it); the guest only ever sees capsem's minted chain.

use std::process::Output;

use capsem_e2e::upstream::Upstream;
use capsem_e2e::{stderr, stdout, Env};

const NAMES: &[&str] = &["allowed.example", "blocked.example", "other.example"];

fn settings(up: &Upstream, extra: &str) -> String {
    let target = format!("127.0.0.1:{}", up.port);
    format!(
        r#"[network]
default = "deny"
allow = ["allowed.example"]
block = ["blocked.example"]
rules = [
  {{ domain = "allowed.example", method = "POST", path = "/v1/*", action = "deny" }},
]
extra_ca_bundle = "{ca}"
{extra}
[network.upstream_override]
"allowed.example" = "{target}"
"blocked.example" = "{target}"
"other.example" = "{target}"
"#,
        ca = up.ca_pem.display()
    )
}

struct Guest<'a> {
    env: &'a Env,
    name: &'a str,
}

impl Guest<'_> {
    fn run(&self, cmd: &str) -> Output {
        self.env.capsem(&["exec", self.name, cmd])
    }

    /// Run and require exit 0; returns stdout.
    fn ok(&self, cmd: &str) -> String {
        let out = self.run(cmd);
        assert!(
            out.status.success(),
            "`{cmd}` failed ({}): {}{}",
            out.status,
            stdout(&out),
            stderr(&out)
        );
        stdout(&out)
    }

    /// Run and require a failure; returns stdout + stderr.
    fn fails(&self, cmd: &str) -> String {
        let out = self.run(cmd);
        let text = format!("{}{}", stdout(&out), stderr(&out));
        assert!(!out.status.success(), "`{cmd}` should fail: {text}");
        text
    }
}

#[test]
fn egress_is_only_what_the_policy_allows() {
    let Some(env) = Env::new() else { return };
    let up = Upstream::start(NAMES, env.path());
    env.write_settings(&settings(&up, ""));
    env.ok(&["create", "net", "--ram", "1"]);
    let g = Guest {
        env: &env,
        name: "net",
    };

    // Allowed: curl, Python (urllib and requests) and Node validate the minted chain, no flags.
    let hello = "hello from allowed.example\n";
    assert_eq!(g.ok("curl -sS https://allowed.example/"), hello);
    assert_eq!(
        g.ok(r#"python3 -c 'import urllib.request as u; print(u.urlopen("https://allowed.example/").read().decode(), end="")'"#),
        hello
    );
    assert_eq!(
        g.ok(r#"python3 -c 'import requests; print(requests.get("https://allowed.example/").text, end="")'"#),
        hello
    );
    assert_eq!(
        g.ok(r#"node -e 'fetch("https://allowed.example/").then(r => r.text()).then(t => process.stdout.write(t))'"#),
        hello
    );
    // HTTP/2 towards the guest when the client offers it; HTTP/1.1 otherwise.
    assert_eq!(
        g.ok("curl -sS --http2 -w '%{http_version}' https://allowed.example/"),
        format!("{hello}2")
    );
    assert_eq!(
        g.ok("curl -sS --http1.1 -w '%{http_version}' https://allowed.example/"),
        format!("{hello}1.1")
    );
    // Keep-alive: two requests on one connection.
    assert_eq!(
        g.ok("curl -sS https://allowed.example/ https://allowed.example/a"),
        format!("{hello}GET /a\n")
    );
    // A guest CPU without AES instructions (TCG's) gets ChaCha20-Poly1305 although curl
    // (OpenSSL) lists AES-GCM first; one with AES (KVM on most hosts) gets curl's choice.
    let guest_aes = g.ok("grep -qw aes /proc/cpuinfo && echo yes || echo no") == "yes\n";
    let handshake = g.ok("curl -sS -v -o /dev/null https://allowed.example/ 2>&1");
    let line = handshake
        .lines()
        .find(|l| l.contains("SSL connection using"))
        .unwrap_or_else(|| panic!("no cipher in curl's output: {handshake}"));
    let expected = if guest_aes {
        "TLS_AES_256_GCM_SHA384"
    } else {
        "TLS_CHACHA20_POLY1305_SHA256"
    };
    assert!(line.contains(expected), "guest AES {guest_aes}: {line}");

    // A blocked domain does not resolve; neither does one the default denies.
    let t = g.fails("curl -sS https://blocked.example/");
    assert!(t.contains("Could not resolve host"), "{t}");
    let t = g.fails("curl -sS https://other.example/");
    assert!(t.contains("Could not resolve host"), "{t}");

    // A per-domain rule: POST /v1/* denied with a 403 naming the rule, GET allowed.
    let t = g.ok("curl -sS -w ' %{http_code}' -X POST https://allowed.example/v1/messages");
    assert!(
        t.contains("blocked by the policy rule")
            && t.contains("deny POST allowed.example/v1/*")
            && t.ends_with(" 403"),
        "{t}"
    );
    assert_eq!(
        g.ok("curl -sS https://allowed.example/v1/messages"),
        "GET /v1/messages\n"
    );
    assert_eq!(
        g.ok("curl -sS -X POST https://allowed.example/v2/x"),
        "POST /v2/x\n"
    );

    // Direct IP: no route (and the relay address itself speaks only TLS with a name).
    let t = g.fails("curl -sS -m 5 https://93.184.215.14/");
    assert!(
        t.contains("Failed to connect") || t.contains("unreachable"),
        "{t}"
    );
    g.fails("curl -sS -m 5 -k https://10.0.0.1/");
    // DNS to a public resolver, UDP, QUIC, ICMP, IPv6: all unreachable.
    let t = g.fails(r#"python3 -c 'import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.sendto(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x03com\x00\x00\x01\x00\x01", ("8.8.8.8", 53)); s.settimeout(3); print(s.recv(512))'"#);
    assert!(t.contains("Network is unreachable"), "{t}");
    let t = g.fails(r#"python3 -c 'import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3); s.sendto(b"\xc0quic-initial", ("10.0.0.1", 443)); print(s.recv(512))'"#);
    assert!(t.contains("refused") || t.contains("timed out"), "{t}");
    let t = g.fails("ping -c 1 -W 2 1.1.1.1");
    assert!(t.contains("unreachable"), "{t}");
    let t = g.fails(r#"python3 -c 'import socket; s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM); s.settimeout(3); s.connect(("2606:4700:4700::1111", 443))'"#);
    assert!(
        t.contains("unreachable") || t.contains("Address family") || t.contains("Cannot assign"),
        "{t}"
    );
    assert_eq!(g.ok("cat /proc/sys/net/ipv6/conf/all/disable_ipv6"), "1\n");
    // Another port of an allowed domain.
    let t = g.fails("curl -sS -m 5 https://allowed.example:8443/");
    assert!(t.contains("Failed to connect"), "{t}");

    // Domain fronting: SNI of the allowed domain, Host of the blocked one.
    let t = g.ok("curl -sS -w ' %{http_code}' -H 'Host: blocked.example' https://allowed.example/");
    assert!(t.contains("domain fronting") && t.ends_with(" 403"), "{t}");
    // Plain HTTP is judged by its Host header.
    let t = g.ok(
        "curl -sS -w ' %{http_code}' --resolve blocked.example:80:10.0.0.1 http://blocked.example/",
    );
    assert!(
        t.contains("block blocked.example") && t.ends_with(" 403"),
        "{t}"
    );
    // A name the policy allows but that resolves on the host to the host itself, or an inward
    // address literal, is refused (the guest must not reach host-local services or a cloud
    // metadata endpoint); upstream_override is the deliberate way to map a name inward.
    env.write_settings(&settings(&up, "").replace(
        r#"allow = ["allowed.example"]"#,
        r#"allow = ["allowed.example", "localhost", "169.254.169.254"]"#,
    ));
    for name in ["localhost", "169.254.169.254"] {
        let t = g.ok(&format!(
            "curl -sS -w ' %{{http_code}}' -H 'Host: {name}' http://10.0.0.1/latest/"
        ));
        assert!(
            t.contains("capsem reaches public addresses only") && t.ends_with(" 403"),
            "{t}"
        );
    }
    env.write_settings(&settings(&up, ""));
    // CONNECT (HTTPS_PROXY clients): allowed host through, blocked host refused.
    assert_eq!(
        g.ok("curl -sS -x http://10.0.0.1:80 https://allowed.example/"),
        hello
    );
    let t = g.fails("curl -sS -x http://10.0.0.1:80 https://blocked.example/");
    assert!(t.contains("403"), "{t}");

    // A policy edit reaches the running session: block the allowed domain, then allow it back.
    env.write_settings(&settings(&up, "").replace(
        r#"block = ["blocked.example"]"#,
        r#"block = ["blocked.example", "allowed.example"]"#,
    ));
    let t = g.fails("curl -sS https://allowed.example/");
    assert!(t.contains("Could not resolve host"), "{t}");
    env.write_settings(&settings(&up, ""));
    assert_eq!(g.ok("curl -sS https://allowed.example/"), hello);

    // Everything above is on record in the session's SQLite file.
    let db = session_db(&env, "net");
    let count = |sql: &str| -> i64 {
        wait_for_row(&db, sql);
        rusqlite::Connection::open(&db)
            .unwrap()
            .query_row(sql, [], |r| r.get(0))
            .unwrap()
    };
    assert!(count("SELECT COUNT(*) FROM dns_events WHERE name = 'blocked.example' AND decision = 'deny' AND rule = 'block blocked.example'") >= 1);
    assert!(count("SELECT COUNT(*) FROM net_events WHERE domain = 'allowed.example' AND method = 'POST' AND path = '/v1/messages' AND decision = 'deny' AND status = 403") >= 1);
    assert!(count("SELECT COUNT(*) FROM net_events WHERE domain = 'blocked.example' AND port = 80 AND decision = 'deny'") >= 1);
    assert!(count("SELECT COUNT(*) FROM net_events WHERE domain = 'allowed.example' AND decision = 'allow' AND status = 200 AND bytes_down > 0") >= 5);
    // Tagged with the guest process that opened the connection.
    assert!(
        count(
            "SELECT COUNT(*) FROM net_events WHERE domain = 'allowed.example' AND process = 'curl'"
        ) >= 3
    );
    assert!(
        count(
            "SELECT COUNT(*) FROM net_events WHERE domain = 'allowed.example' AND process = 'node'"
        ) >= 1
    );
    assert!(count("SELECT COUNT(*) FROM exec_events WHERE command = 'curl -sS https://blocked.example/' AND exit_code = 6") >= 1);
    assert!(count("SELECT COUNT(*) FROM exec_events WHERE command = 'curl -sS https://allowed.example/' AND exit_code = 0") >= 1);
    let info: serde_json::Value =
        serde_json::from_str(&env.ok(&["info", "net", "--json"])).unwrap();
    let t = &info["telemetry"];
    assert!(t["requests_allowed"].as_u64().unwrap() >= 5, "{t}");
    assert!(t["requests_denied"].as_u64().unwrap() >= 3, "{t}");
    assert_eq!(t["top_domains"][0][0], "allowed.example", "{t}");

    env.ok(&["delete", "net"]);
}

fn session_db(env: &Env, name: &str) -> std::path::PathBuf {
    let info: serde_json::Value = serde_json::from_str(&env.ok(&["info", name, "--json"])).unwrap();
    env.path()
        .join("sessions")
        .join(info["id"].as_str().unwrap())
        .join("session.db")
}

/// The recorder writes in the background: wait (briefly) until `sql` counts a row.
fn wait_for_row(db: &std::path::Path, sql: &str) {
    for _ in 0..100 {
        if let Ok(c) = rusqlite::Connection::open(db) {
            if c.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap_or(0) > 0 {
                return;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Recorded responses of the four model APIs, as the stand-in for their real hosts serves
/// them, and what the session record must say about each.
const MODEL_CASES: &[(&str, &str, &str, &str, u64, u64, &str)] = &[
    // fixture, host, path, model, input, output, cost
    (
        "anthropic.json",
        "api.anthropic.com",
        "/v1/messages",
        "claude-sonnet-4-5-20250929",
        2095,
        503,
        "0.018480",
    ),
    (
        "anthropic.sse",
        "api.anthropic.com",
        "/v1/messages",
        "claude-opus-4-1-20250805",
        472,
        15,
        "0.011277",
    ),
    (
        "openai_chat.json",
        "api.openai.com",
        "/v1/chat/completions",
        "gpt-4o-2024-08-06",
        876,
        10,
        "0.003570",
    ),
    (
        "openai_chat.sse",
        "api.openai.com",
        "/v1/chat/completions",
        "gpt-4o-mini-2024-07-18",
        120,
        300,
        "0.000198",
    ),
    (
        "openai_responses.json",
        "api.openai.com",
        "/v1/responses",
        "gpt-4.1-2025-04-14",
        36,
        87,
        "0.000768",
    ),
    (
        "openai_responses.sse",
        "api.openai.com",
        "/v1/responses",
        "o4-mini-2025-04-16",
        1000,
        640,
        "0.004009",
    ),
    (
        "gemini.json",
        "generativelanguage.googleapis.com",
        "/v1beta/models/gemini-2.5-flash:generateContent",
        "gemini-2.5-flash",
        8,
        32,
        "0.000082",
    ),
    (
        "gemini.sse",
        "generativelanguage.googleapis.com",
        "/v1beta/models/gemini-2.5-pro:streamGenerateContent",
        "gemini-2.5-pro",
        3000,
        100,
        "0.005060",
    ),
];

#[test]
fn model_calls_are_recorded_with_tokens_and_cost() {
    let Some(env) = Env::new() else { return };
    let hosts = [
        "api.anthropic.com",
        "api.openai.com",
        "generativelanguage.googleapis.com",
    ];
    let up = Upstream::start(&hosts, env.path());
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../capsem-core/tests/fixtures/models");
    for (file, _, path, ..) in MODEL_CASES {
        let sse = file.ends_with(".sse");
        let ct = if sse {
            "text/event-stream"
        } else {
            "application/json"
        };
        up.fixture(path, sse, ct, &std::fs::read(fixtures.join(file)).unwrap());
    }
    let target = format!("127.0.0.1:{}", up.port);
    env.write_settings(&format!(
        "[network]\ndefault = \"deny\"\nallow = [{}]\nextra_ca_bundle = \"{}\"\n[network.upstream_override]\n{}",
        hosts.iter().map(|h| format!("\"{h}\"")).collect::<Vec<_>>().join(", "),
        up.ca_pem.display(),
        hosts.iter().map(|h| format!("\"{h}\" = \"{target}\"\n")).collect::<String>()
    ));
    env.ok(&["create", "models", "--ram", "1"]);
    let g = Guest {
        env: &env,
        name: "models",
    };
    for (file, host, path, ..) in MODEL_CASES {
        let stream = if file.ends_with(".sse") {
            "true"
        } else {
            "false"
        };
        let path = if path.contains("streamGenerateContent") {
            format!("{path}?alt=sse")
        } else {
            path.to_string()
        };
        let out = g.ok(&format!(
            "curl -sS -H 'content-type: application/json' -H 'accept-encoding: gzip' \
             -d '{{\"model\": \"m\", \"stream\": {stream}}}' 'https://{host}{path}'"
        ));
        assert!(
            out.contains("usage") || out.contains("usageMetadata"),
            "{file}: {out}"
        );
    }
    let db = session_db(&env, "models");
    wait_for_row(&db, "SELECT COUNT(*) >= 8 FROM model_calls");
    let conn = rusqlite::Connection::open(&db).unwrap();
    let mut st = conn
        .prepare("SELECT model, input_tokens, output_tokens, printf('%.6f', cost_usd), streamed, provider FROM model_calls ORDER BY id")
        .unwrap();
    let rows: Vec<(String, u64, u64, String, bool, String)> = st
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows.len(), MODEL_CASES.len(), "{rows:?}");
    for ((file, host, _, model, input, output, cost), row) in MODEL_CASES.iter().zip(&rows) {
        assert_eq!(
            (row.0.as_str(), row.1, row.2, row.3.as_str(), row.4),
            (*model, *input, *output, *cost, file.ends_with(".sse")),
            "{file}"
        );
        let provider = match *host {
            "api.anthropic.com" => "anthropic",
            "api.openai.com" => "openai",
            _ => "google",
        };
        assert_eq!(row.5, provider, "{file}");
    }
    // `capsem info` shows them.
    let info = env.ok(&["info", "models"]);
    assert!(
        info.contains("Model calls") && info.contains("calls     8"),
        "{info}"
    );
    assert!(
        info.contains("claude-opus-4-1-20250805") && info.contains("gemini-2.5-pro"),
        "{info}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&env.ok(&["info", "models", "--json"])).unwrap();
    let total: f64 = MODEL_CASES
        .iter()
        .map(|c| c.6.parse::<f64>().unwrap())
        .sum();
    let cost = json["telemetry"]["cost_usd"].as_f64().unwrap();
    assert!((cost - total).abs() < 1e-5, "{cost} vs {total}");
    env.ok(&["delete", "models"]);
}

#[test]
fn corp_file_overrides_and_locks_the_user_file() {
    let Some(env) = Env::new() else { return };
    let up = Upstream::start(NAMES, env.path());
    env.write_settings(&settings(&up, ""));
    // Corp blocks what the user allows...
    env.write_corp("[network]\nblock = [\"allowed.example\"]\n");
    env.ok(&["create", "corp", "--ram", "1"]);
    let g = Guest {
        env: &env,
        name: "corp",
    };
    let t = g.fails("curl -sS https://allowed.example/");
    assert!(t.contains("Could not resolve host"), "{t}");
    // ...and a user edit cannot undo it: the corp file's key wins.
    env.write_settings(
        &settings(&up, "").replace(r#"block = ["blocked.example"]"#, r#"block = []"#),
    );
    let t = g.fails("curl -sS https://allowed.example/");
    assert!(t.contains("Could not resolve host"), "{t}");
    // The other direction: corp allows what the user's default denies, and the user cannot
    // take the corp allow list away.
    env.write_corp("[network]\nallow = [\"other.example\"]\n");
    assert_eq!(
        g.ok("curl -sS https://other.example/"),
        "hello from other.example\n"
    );
    env.write_settings(
        &settings(&up, "").replace(r#"allow = ["allowed.example"]"#, r#"allow = []"#),
    );
    assert_eq!(
        g.ok("curl -sS https://other.example/"),
        "hello from other.example\n"
    );
    env.ok(&["delete", "corp"]);
}

#[test]
fn the_ca_private_key_is_nowhere_in_the_guest() {
    let Some(env) = Env::new() else { return };
    env.ok(&["create", "keys", "--ram", "1"]);
    let key = std::fs::read_to_string(env.path().join("ca/ca.key")).unwrap();
    // A distinctive line of the key's base64 body.
    let needle = key
        .lines()
        .find(|l| !l.starts_with("-----") && l.len() > 20)
        .unwrap()
        .to_string();
    let g = Guest {
        env: &env,
        name: "keys",
    };
    // The certificate is trusted...
    let ca_crt = std::fs::read_to_string(env.path().join("ca/ca.crt")).unwrap();
    let trusted = g.ok("cat /usr/local/share/ca-certificates/capsem-ca.crt");
    assert_eq!(trusted.trim(), ca_crt.trim());
    // ...the key's body is in no file (every filesystem but /proc and /sys), in no process
    // environment and not on the kernel command line. (Process command lines are left out:
    // this very search carries the needle in its own.)
    let out = env.capsem(&[
        "exec",
        "keys",
        "--timeout",
        "600",
        &format!(
            "grep -rlsF -e '{needle}' / --exclude-dir=proc --exclude-dir=sys; \
             cat /proc/[0-9]*/environ /proc/cmdline 2>/dev/null \
             | tr '\\0' '\\n' | grep -cF -e '{needle}' -e 'PRIVATE KEY'"
        ),
    ]);
    assert_eq!(
        stdout(&out),
        "0\n",
        "CA key material found: {}",
        stderr(&out)
    );
    env.ok(&["delete", "keys"]);
}
