//! Harness for the end-to-end tests: each [`Env`] is a private `CAPSEM_HOME` (with the guest
//! image linked in from `$CAPSEM_E2E_HOME`, built by `scripts/test.sh`), driven through the real
//! `capsem` binary. Dropping it stops the service and checks that no VM of it is left.
//!
//! With `CAPSEM_E2E=1` (CI) a missing image or QEMU fails the test; without it the tests are
//! skipped with a note, so `cargo test` works on a machine that has not built an image.

pub mod upstream;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub struct Env {
    pub home: tempfile::TempDir,
    pub bin: PathBuf,
}

/// `target/<profile>`, found from the test executable's own path.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    exe.parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>/deps")
        .to_path_buf()
}

fn e2e_home() -> PathBuf {
    std::env::var_os("CAPSEM_E2E_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/e2e-home"))
}

fn required() -> bool {
    std::env::var("CAPSEM_E2E")
        .map(|v| v == "1")
        .unwrap_or(false)
}

impl Env {
    /// A fresh home with the guest image, or `None` (test skipped) when the image or QEMU is
    /// missing and `CAPSEM_E2E` is not set.
    pub fn new() -> Option<Env> {
        Env::new_in("/tmp")
    }

    /// [`Env::new`] with the home under `parent` (another filesystem than the image's, say).
    pub fn new_in(parent: &str) -> Option<Env> {
        let assets = e2e_home().join("assets");
        let bin = bin_dir();
        let mut missing = Vec::new();
        if !assets
            .join(format!("v{}", env!("CARGO_PKG_VERSION")))
            .join("manifest.json")
            .is_file()
        {
            missing.push(format!(
                "guest image in {} (run scripts/test.sh)",
                assets.display()
            ));
        }
        if which("qemu-system-x86_64").is_none() {
            missing.push("qemu-system-x86_64".to_string());
        }
        for b in ["capsem", "capsem-service", "capsem-process"] {
            if !bin.join(b).is_file() {
                missing.push(format!(
                    "{} (cargo build --workspace)",
                    bin.join(b).display()
                ));
            }
        }
        if !missing.is_empty() {
            if required() {
                panic!("CAPSEM_E2E=1 but missing: {}", missing.join(", "));
            }
            eprintln!("skipping e2e test: missing {}", missing.join(", "));
            return None;
        }
        let env = Env::bare_in(parent);
        std::os::unix::fs::symlink(&assets, env.home.path().join("assets")).expect("link assets");
        // Reuse the accelerator probe of the image home if it has one (it is per host boot).
        let cache = e2e_home().join("run/accel.json");
        if cache.is_file() {
            std::fs::create_dir_all(env.home.path().join("run")).unwrap();
            std::fs::copy(&cache, env.home.path().join("run/accel.json")).unwrap();
        }
        Some(env)
    }

    /// A home with no guest image (for the "assets missing" checks).
    pub fn bare() -> Env {
        Env::bare_in("/tmp")
    }

    fn bare_in(parent: &str) -> Env {
        let home = tempfile::Builder::new()
            .prefix("capsem-e2e-")
            .tempdir_in(parent)
            .expect("temp home");
        Env {
            home,
            bin: bin_dir(),
        }
    }

    pub fn path(&self) -> &Path {
        self.home.path()
    }

    /// The corp lockdown file this home's service reads (absent until a test writes it).
    pub fn corp_file(&self) -> PathBuf {
        self.home.path().join("corp.toml")
    }

    /// Write `user.toml` (0600), as a user editing their settings would.
    pub fn write_settings(&self, text: &str) {
        write_private(&self.home.path().join("user.toml"), text);
        policy_settles();
    }

    /// Write the corp lockdown file.
    pub fn write_corp(&self, text: &str) {
        write_private(&self.corp_file(), text);
        policy_settles();
    }

    /// A `capsem` command with this home.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(self.bin.join("capsem"));
        c.args(args)
            .env("CAPSEM_HOME", self.home.path())
            // Never the host's /etc/capsem/corp.toml: a test writes its own with `corp_file`.
            .env("CAPSEM_CORP_FILE", self.corp_file())
            .env_remove("CAPSEM_UDS_PATH")
            .stdin(Stdio::null());
        c
    }

    /// Run `capsem args…` to completion.
    pub fn capsem(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run capsem")
    }

    /// Run and require success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.capsem(args);
        assert!(
            out.status.success(),
            "capsem {args:?} failed ({}): {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.session_logs()
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    /// Start this home's service with `var=value` in its environment (a fault switch, kernel
    /// words, warm starts off); every session it runs sees it.
    pub fn start_service_with(&self, var: &str, value: &str) {
        let out = self.cmd(&["start"]).env(var, value).output().unwrap();
        assert!(
            out.status.success(),
            "capsem start failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// One raw call to the service API (through curl, as a third-party client would):
    /// the HTTP status and the body.
    pub fn http(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let out = Command::new("curl")
            .args(["-s", "-w", "\n%{http_code}", "--unix-socket"])
            .arg(self.path().join("run/service.sock"))
            .args(["-X", method, "-d", body])
            .arg(format!("http://capsem{path}"))
            .output()
            .expect("curl is needed for this test (scripts/setup.sh installs it)");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// A session's `info --json`.
    pub fn info(&self, session: &str) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["info", session, "--json"])).expect("info JSON")
    }

    /// The guest agent of `session` must be idle while the guest is: it may use no more than a
    /// quarter of a CPU over two quiet seconds. (An agent that busy-waits on its channel, as
    /// one did after every host hang-up, uses all of one.) The agent is the exec'd shell's
    /// parent; its CPU time is fields 14 and 15 of its `/proc/PID/stat` (12 and 13 after the
    /// name's closing parenthesis), in 1/100 s.
    pub fn assert_agent_idle(&self, session: &str) {
        let out = self.ok(&[
            "exec",
            session,
            "t() { sed 's/.*) //' /proc/$PPID/stat | cut -d' ' -f12,13; }; a=$(t); sleep 2; b=$(t); echo $a $b",
        ]);
        let n: Vec<u64> = out
            .split_whitespace()
            .map(|w| w.parse().expect("ticks"))
            .collect();
        assert_eq!(n.len(), 4, "{out}");
        let used = (n[2] + n[3]).saturating_sub(n[0] + n[1]);
        assert!(
            used <= 50,
            "the guest agent of {session} used {used}/200 ticks of CPU in two idle seconds"
        );
    }

    /// The tail of every session's logs in this home, and of the warm-start builds' log, read
    /// from disk (for failure messages: a boot that went wrong says why there).
    pub fn session_logs(&self) -> String {
        let tail = |path: &Path, name: &str| {
            let body = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = body.lines().collect();
            format!(
                "==> {name} <==\n{}\n",
                lines[lines.len().saturating_sub(25)..].join("\n")
            )
        };
        let mut text = String::new();
        let dirs = std::fs::read_dir(self.path().join("sessions"));
        for d in dirs.into_iter().flatten().flatten() {
            for f in ["serial.log", "process.log"] {
                let name = format!("{}/{f}", d.file_name().to_string_lossy());
                text.push_str(&tail(&d.path().join(f), &name));
            }
        }
        // This home's template builds, the e2e home's (`capsem setup`'s), and the templates
        // every home shares that were taken out of use, and why.
        let mut logs = vec![
            (self.path().join("run/warm.log"), "run/warm.log".to_string()),
            (
                e2e_home().join("run/warm.log"),
                "the e2e home's run/warm.log".to_string(),
            ),
        ];
        let assets = std::fs::read_dir(self.path().join("assets"));
        for v in assets.into_iter().flatten().flatten() {
            let name = format!(
                "assets/{}/warm/discarded.log",
                v.file_name().to_string_lossy()
            );
            logs.push((v.path().join("warm/discarded.log"), name));
        }
        for (path, name) in logs {
            if path.is_file() {
                text.push_str(&tail(&path, &name));
            }
        }
        text
    }

    /// Ids of the sessions the service lists.
    pub fn ids(&self) -> Vec<String> {
        self.ok(&["list", "-q"])
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// PIDs of processes whose command line mentions this home (QEMU, capsem-process, service).
    pub fn processes(&self, pattern: &str) -> Vec<u32> {
        processes_matching(&[self.home.path().to_str().unwrap(), pattern])
    }

    /// Wait until `f` holds, up to `limit`.
    pub fn wait_until(&self, limit: Duration, mut f: impl FnMut() -> bool) -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        f()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = self
            .cmd(&["stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // Anything still alive is a leak: kill it so other tests are not disturbed.
        for pid in processes_matching(&[self.home.path().to_str().unwrap()]) {
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// Every process whose `/proc/<pid>/cmdline` or environment-free command line contains all of
/// `needles` (the service and capsem-process carry the home in `CAPSEM_HOME`, QEMU in its paths).
pub fn processes_matching(needles: &[&str]) -> Vec<u32> {
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let mut text = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        text.extend(std::fs::read(e.path().join("environ")).unwrap_or_default());
        let text = String::from_utf8_lossy(&text).replace('\0', " ");
        if needles.iter().all(|n| text.contains(n)) {
            found.push(pid);
        }
    }
    found
}

pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// No session, VM process or session directory of `env` remains.
pub fn assert_nothing_left(env: &Env) {
    assert!(
        env.wait_until(Duration::from_secs(5), || env.ids().is_empty()),
        "sessions left: {:?}",
        env.ids()
    );
    assert!(
        env.wait_until(Duration::from_secs(5), || env
            .processes("qemu-system")
            .is_empty()
            && env.processes("capsem-process").is_empty()),
        "processes left"
    );
    let sessions = env.path().join("sessions");
    let left: Vec<_> = std::fs::read_dir(&sessions)
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "session directories left: {left:?}");
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// A failed command said one clear line containing `needle` on stderr — never a panic.
pub fn assert_one_clear_line(out: &Output, needle: &str) {
    let err = stderr(out);
    assert!(!out.status.success(), "should fail: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line expected: {err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

/// The median (mean of the middle two for an even count); sorts `v`.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A benchmark's sitting: its run count (`BENCH_RUNS`, else `default`), a private home with the
/// guest image (e2e mode on: a missing image fails), and a runtime to drive the service API.
pub struct Bench {
    pub runs: usize,
    pub env: Env,
    pub rt: tokio::runtime::Runtime,
    /// The service socket, for `capsem_core::uds_http::UdsClient::new`.
    pub socket: PathBuf,
}

impl Bench {
    pub fn new(default_runs: usize) -> Bench {
        std::env::set_var("CAPSEM_E2E", "1");
        let runs = std::env::var("BENCH_RUNS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default_runs);
        let env = Env::new().expect("guest image and binaries");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let socket = env.path().join("run/service.sock");
        Bench {
            runs,
            env,
            rt,
            socket,
        }
    }
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Running sessions re-read the policy files at most every 100 ms (`capsem_core::net::RECHECK`,
/// the documented "within a tenth of a second"): wait that out, with a margin, so that a DNS
/// answer and the request after it are judged by the same policy.
fn policy_settles() {
    std::thread::sleep(Duration::from_millis(250));
}

/// Replace `path` with `text`, mode 0600, and make sure its mtime moves even within the
/// filesystem's timestamp granularity (policy reload keys on mtime and size).
fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    let before = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    if let Some(b) = before {
        let f = std::fs::File::options().write(true).open(path).unwrap();
        let now = std::time::SystemTime::now().max(b + Duration::from_millis(10));
        f.set_modified(now).unwrap();
    }
}
