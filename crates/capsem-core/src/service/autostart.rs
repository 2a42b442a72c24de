//! Reaching the service from a front end (CLI, MCP): connect to its socket, and start
//! `capsem-service` detached when nothing answers. Front ends must not start it any other way.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::api::VersionResponse;
use crate::paths::{self, Home};
use crate::service::spawn::sibling_binary;
use crate::uds_http::UdsClient;

/// How long a freshly started service gets to answer.
const START_LIMIT: Duration = Duration::from_secs(15);
/// `capsem-service`'s exit code when another service has its socket (EX_TEMPFAIL): a starter
/// then waits for that one instead of failing.
pub const ALREADY_RUNNING: u8 = 75;

/// Why a service could not take its socket.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// The service's exit code then is [`ALREADY_RUNNING`].
    #[error("a capsem service is already running on {}", .0.display())]
    AlreadyRunning(PathBuf),
    #[error("cannot lock {}", .0.display())]
    Lock(PathBuf, #[source] std::io::Error),
    #[error("cannot listen on {}", .0.display())]
    Bind(PathBuf, #[source] std::io::Error),
}

/// The service's side of starting: take `<sock>.lock` for the service's whole life (two
/// services started at once, by two first commands, must not both bind the socket, the second
/// unlinking the first's), make sure no service of an older build answers there, and bind the
/// socket. The lock is held while the returned one is.
pub async fn claim(sock: &Path) -> Result<(paths::Lock, tokio::net::UnixListener), ClaimError> {
    let lock_path = sock.with_extension("lock");
    let lock = paths::try_lock(&lock_path)
        .map_err(|e| ClaimError::Lock(lock_path.clone(), e))?
        .ok_or_else(|| ClaimError::AlreadyRunning(sock.to_path_buf()))?;
    if UdsClient::new(sock)
        .get::<VersionResponse>("/version")
        .await
        .is_ok()
    {
        return Err(ClaimError::AlreadyRunning(sock.to_path_buf()));
    }
    let listener =
        crate::sock::bind_private(sock).map_err(|e| ClaimError::Bind(sock.to_path_buf(), e))?;
    Ok((lock, listener))
}

#[derive(Debug, thiserror::Error)]
pub enum AutostartError {
    #[error("cannot find the capsem home (set CAPSEM_HOME)")]
    Home(#[source] std::io::Error),
    #[error("capsem-service not found at {0}: build the workspace (`cargo build --release`) or set CAPSEM_SERVICE_BIN")]
    Missing(PathBuf),
    #[error("cannot prepare {path}")]
    Prepare {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start {bin}")]
    Spawn {
        bin: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("capsem-service exited at start ({status}); see {log}")]
    Exited { status: String, log: PathBuf },
    #[error("capsem-service did not answer within {limit:?}; see {log}")]
    Timeout { limit: Duration, log: PathBuf },
}

/// Which service a front end talks to: a home and a socket (`--uds-path` or the home's).
pub struct Target {
    pub home: Home,
    pub socket: PathBuf,
}

impl Target {
    pub fn new(uds_path: Option<PathBuf>) -> Result<Self, AutostartError> {
        let home = Home::from_env().map_err(AutostartError::Home)?;
        let socket = uds_path.unwrap_or_else(|| home.service_socket());
        Ok(Target { home, socket })
    }

    pub fn client(&self) -> UdsClient {
        UdsClient::new(&self.socket)
    }

    pub async fn is_running(&self) -> bool {
        self.client()
            .get::<VersionResponse>("/version")
            .await
            .is_ok()
    }

    /// A client for a running service, starting the service first if needed.
    pub async fn connect(&self) -> Result<UdsClient, AutostartError> {
        if !self.is_running().await {
            self.start().await?;
        }
        Ok(self.client())
    }

    /// Start `capsem-service` detached (its own session, so a Ctrl-C in the user's terminal never
    /// reaches it) and wait for it to answer.
    pub async fn start(&self) -> Result<(), AutostartError> {
        let bin = sibling_binary("capsem-service", "CAPSEM_SERVICE_BIN");
        if !bin.is_file() {
            return Err(AutostartError::Missing(bin));
        }
        let prepare = |path: PathBuf| move |source| AutostartError::Prepare { path, source };
        self.home
            .ensure()
            .map_err(prepare(self.home.root().to_path_buf()))?;
        let log_path = self.home.service_log();
        let log = paths::private_log(&log_path).map_err(prepare(log_path.clone()))?;
        let log2 = log.try_clone().map_err(prepare(log_path.clone()))?;
        let mut cmd = std::process::Command::new(&bin);
        cmd.arg("--uds-path")
            .arg(&self.socket)
            .env(paths::HOME_ENV, self.home.root())
            .stdin(Stdio::null())
            .stdout(log2)
            .stderr(log);
        // SAFETY: setsid is async-signal-safe and only affects the child.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = Some(cmd.spawn().map_err(|source| AutostartError::Spawn {
            bin: bin.clone(),
            source,
        })?);
        let deadline = Instant::now() + START_LIMIT;
        while Instant::now() < deadline {
            if self.is_running().await {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = child.as_mut().map(|c| c.try_wait()) {
                if status.code() != Some(i32::from(ALREADY_RUNNING)) {
                    return Err(AutostartError::Exited {
                        status: status.to_string(),
                        log: log_path,
                    });
                }
                // Another command started one at the same moment: wait for that one.
                child = None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(AutostartError::Timeout {
            limit: START_LIMIT,
            log: log_path,
        })
    }
}
