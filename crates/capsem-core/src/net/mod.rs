//! The host side of the air gap, run by each `capsem-process`: answers the guest's DNS
//! questions from the policy and terminates every relayed TCP connection in a MITM proxy that
//! judges each HTTP request before anything leaves the host.
//!
//! ```text
//!   guest stream (port 5002) ─▶ NetOpen::Dns ─▶ policy.decide_domain ─▶ DnsAnswer
//!                            └▶ NetOpen::Tcp 443 ─▶ TLS (leaf minted for the SNI) ─▶ HTTP/1.1
//!                            └▶ NetOpen::Tcp 80  ─▶ HTTP/1.1 (judged by Host; CONNECT → TLS)
//!   each request ─▶ Host == SNI? ─▶ policy.decide ─▶ 403 naming the rule
//!                                               └▶ upstream (TLS, system roots + extra CA)
//! ```
//!
//! Policy files are re-read when they change ([`PolicySource`]), so an edit reaches running
//! sessions without a restart.

mod addr;
pub mod ca;
mod proxy;
pub mod stand_in;
mod upstream;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use capsem_proto::frame;
use capsem_proto::net::{DnsAnswer, NetOpen};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::policy::{Policy, PolicyError};

pub use ca::{Ca, CaError};

/// Environment variable naming the corp lockdown file (default [`crate::policy::CORP_FILE`]);
/// tests point it at a temporary file.
pub const CORP_FILE_ENV: &str = "CAPSEM_CORP_FILE";

/// The user and corp settings files, re-read when either changes on disk.
pub struct PolicySource {
    user: PathBuf,
    corp: PathBuf,
    current: Mutex<Current>,
}

struct Current {
    stamp: Option<Stamp>,
    policy: Arc<Policy>,
    /// When the files were last looked at: at most every [`RECHECK`], not on every request.
    checked: Instant,
}

/// How stale a policy may be: an edit reaches running sessions within this.
pub const RECHECK: Duration = Duration::from_millis(100);

type Stamp = (Option<SystemTime>, Option<SystemTime>, u64, u64);

fn stamp(user: &Path, corp: &Path) -> Stamp {
    let m = |p: &Path| std::fs::metadata(p).ok();
    let (u, c) = (m(user), m(corp));
    (
        u.as_ref().and_then(|m| m.modified().ok()),
        c.as_ref().and_then(|m| m.modified().ok()),
        u.map(|m| m.len()).unwrap_or(0),
        c.map(|m| m.len()).unwrap_or(0),
    )
}

impl PolicySource {
    /// `<CAPSEM_HOME>/user.toml` and the corp file (`$CAPSEM_CORP_FILE` or `/etc/capsem/corp.toml`).
    pub fn for_home(home: &crate::paths::Home) -> Result<PolicySource, PolicyError> {
        let corp = std::env::var_os(CORP_FILE_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(crate::policy::CORP_FILE));
        PolicySource::new(home.user_settings(), corp)
    }

    pub fn new(user: PathBuf, corp: PathBuf) -> Result<PolicySource, PolicyError> {
        let s = stamp(&user, &corp);
        let policy = Policy::load(&user, &corp)?;
        Ok(PolicySource {
            user,
            corp,
            current: Mutex::new(Current {
                stamp: Some(s),
                policy: Arc::new(policy),
                checked: Instant::now(),
            }),
        })
    }

    /// The policy as the files say now. A file that became invalid keeps the last good policy
    /// (and says so in the log) rather than opening or closing everything.
    pub fn current(&self) -> Arc<Policy> {
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if cur.checked.elapsed() < RECHECK {
            return cur.policy.clone();
        }
        cur.checked = Instant::now();
        let now = stamp(&self.user, &self.corp);
        if cur.stamp.as_ref() != Some(&now) {
            match Policy::load(&self.user, &self.corp) {
                Ok(p) => {
                    tracing::info!("policy reloaded");
                    cur.policy = Arc::new(p);
                }
                Err(e) => {
                    tracing::warn!(error = %crate::error_chain(&e), "policy not reloaded; keeping the previous one");
                }
            }
            cur.stamp = Some(now);
        }
        cur.policy.clone()
    }
}

/// Everything a session's network needs; shared by all its streams.
pub struct Network {
    pub ca: Arc<Ca>,
    pub policy: PolicySource,
    /// Where requests, DNS answers and model calls are recorded (none in some tests).
    pub recorder: Option<crate::telemetry::Recorder>,
    native_roots: Vec<rustls_pki_types::CertificateDer<'static>>,
    /// The upstream TLS configuration, for the extra bundle (path, mtime) it was built with.
    upstream: Mutex<Option<(BundleStamp, Arc<rustls::ClientConfig>)>>,
    /// The guest-facing TLS configuration (certificates are minted per SNI by its resolver).
    server: Mutex<Option<Arc<rustls::ServerConfig>>>,
    /// Whether the guest's CPU has AES instructions (see [`Network::guest_has_aes`]).
    guest_aes: bool,
}

type BundleStamp = Option<(PathBuf, Option<SystemTime>)>;

impl Network {
    pub fn new(
        ca: Arc<Ca>,
        policy: PolicySource,
        recorder: Option<crate::telemetry::Recorder>,
    ) -> Network {
        let native = rustls_native_certs::load_native_certs();
        if native.certs.is_empty() {
            tracing::warn!("no system root certificates found; only the extra CA bundle will be trusted upstream");
        }
        Network {
            ca,
            policy,
            recorder,
            native_roots: native.certs,
            upstream: Mutex::new(None),
            server: Mutex::new(None),
            guest_aes: true,
        }
    }

    /// Tell the proxy whether the guest's CPU has AES instructions (it has unless told
    /// otherwise). Without them, the guest-facing TLS chooses ChaCha20-Poly1305 whenever the
    /// client offers it, whatever the client's own order: OpenSSL (curl, Python, Node) lists
    /// AES-GCM first on any CPU, and in software AES-GCM is several times slower. Under TCG
    /// (`qemu64`, no AES) `openssl speed` in the guest measured 11 MB/s for AES-256-GCM
    /// against 90–103 MB/s for ChaCha20-Poly1305, and a guest's download through the proxy
    /// went from about 7 to 13.4 MiB/s (`benches/guest_net.rs`, docs/benchmarks.md).
    pub fn guest_has_aes(mut self, yes: bool) -> Network {
        self.guest_aes = yes;
        self
    }

    /// Serve one guest stream on the network port.
    pub async fn handle<S>(self: Arc<Self>, mut stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let open: NetOpen = match frame::expect_header(&mut stream, "the network request").await {
            Ok(o) => o,
            Err(e) => {
                tracing::debug!(error = %e, "network stream without a request");
                return;
            }
        };
        match open {
            NetOpen::Dns { name } => {
                let d = self.policy.current().decide_domain(&name);
                tracing::info!(domain = ?name, decision = d.action.as_str(), rule = %d.rule, "dns");
                self.record(crate::telemetry::Event::Dns(crate::telemetry::DnsEvent {
                    name: name.trim_end_matches('.').to_ascii_lowercase(),
                    decision: d.action.as_str().to_string(),
                    rule: d.rule.clone(),
                }));
                let answer = match d.action {
                    crate::policy::Action::Allow => DnsAnswer::Allow,
                    crate::policy::Action::Deny => DnsAnswer::Deny { rule: d.rule },
                };
                let _ = frame::write_frame(&mut stream, &answer).await;
            }
            NetOpen::Tcp { port, process } => {
                // No write buffer here: a small response already leaves as one record and one
                // channel frame (see `proxy`'s note on its writes), so a buffer only added a
                // copy of every byte; without it neither the proxy bench (A/B in both orders)
                // nor a guest's requests and downloads (`benches/guest_net.rs`) moved beyond
                // the noise.
                proxy::serve(self, stream, port, process).await;
            }
        }
    }

    pub(crate) fn record(&self, ev: crate::telemetry::Event) {
        if let Some(r) = &self.recorder {
            r.record(ev);
        }
    }

    /// The TLS client configuration for upstream connections: system roots plus the policy's
    /// extra CA bundle. Certificate errors upstream are failures; nothing is ever skipped.
    fn upstream_tls(&self, policy: &Policy) -> Result<Arc<rustls::ClientConfig>, String> {
        let stamp: BundleStamp = policy.extra_ca_bundle().map(|p| {
            let mtime = std::fs::metadata(p).and_then(|m| m.modified()).ok();
            (p.to_path_buf(), mtime)
        });
        let mut cached = self.upstream.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((s, cfg)) = cached.as_ref() {
            if *s == stamp {
                return Ok(cfg.clone());
            }
        }
        let cfg = self.build_upstream_tls(policy)?;
        *cached = Some((stamp, cfg.clone()));
        Ok(cfg)
    }

    fn build_upstream_tls(&self, policy: &Policy) -> Result<Arc<rustls::ClientConfig>, String> {
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(self.native_roots.iter().cloned());
        if let Some(bundle) = policy.extra_ca_bundle() {
            let certs = rustls_pki_types::CertificateDer::pem_file_iter(bundle).map_err(|e| {
                format!("cannot read the extra CA bundle {}: {e}", bundle.display())
            })?;
            for c in certs.flatten() {
                let _ = roots.add(c);
            }
        }
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }
}

impl Network {
    /// The guest-facing TLS server configuration (built once).
    pub(crate) fn server_tls(&self) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        let mut cached = self.server.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cached.as_ref() {
            return Ok(c.clone());
        }
        let mut provider = rustls::crypto::ring::default_provider();
        if !self.guest_aes {
            // ChaCha20-Poly1305 first (a stable sort keeps the rest in ring's order), and the
            // server's order decides.
            provider
                .cipher_suites
                .sort_by_key(|s| !is_chacha(s.suite()));
        }
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(proxy::Minting(self.ca.clone())));
        cfg.ignore_client_order = !self.guest_aes;
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let cfg = Arc::new(cfg);
        *cached = Some(cfg.clone());
        Ok(cfg)
    }
}

fn is_chacha(suite: rustls::CipherSuite) -> bool {
    use rustls::CipherSuite as S;
    matches!(
        suite,
        S::TLS13_CHACHA20_POLY1305_SHA256
            | S::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
            | S::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
    )
}
