//! Reaching the service: connect to its socket, and start it when nothing answers.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use capsem_core::api::VersionResponse;
use capsem_core::paths::Home;
use capsem_core::service::spawn::sibling_binary;
use capsem_core::uds_http::UdsClient;

pub struct Target {
    pub home: Home,
    pub socket: PathBuf,
}

impl Target {
    pub fn new(uds_path: Option<PathBuf>) -> anyhow::Result<Self> {
        let home = Home::from_env().context("cannot find the capsem home (set CAPSEM_HOME)")?;
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
    pub async fn connect(&self) -> anyhow::Result<UdsClient> {
        if !self.is_running().await {
            self.start().await?;
        }
        Ok(self.client())
    }

    /// Start `capsem-service` detached and wait for it to answer.
    pub async fn start(&self) -> anyhow::Result<()> {
        let bin = sibling_binary("capsem-service", "CAPSEM_SERVICE_BIN");
        if !bin.is_file() {
            bail!(
                "capsem-service not found at {}: build the workspace (`cargo build --release`) or set CAPSEM_SERVICE_BIN",
                bin.display()
            );
        }
        self.home
            .ensure()
            .with_context(|| format!("cannot create {}", self.home.root().display()))?;
        let log = capsem_core::paths::private_log(&self.home.service_log())?;
        let mut cmd = std::process::Command::new(&bin);
        cmd.arg("--uds-path")
            .arg(&self.socket)
            .env(capsem_core::paths::HOME_ENV, self.home.root())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: setsid is async-signal-safe; it detaches the service from our terminal so
        // Ctrl-C in this shell never reaches it.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if self.is_running().await {
                return Ok(());
            }
            if let Ok(Some(status)) = child.try_wait() {
                bail!(
                    "capsem-service exited at start ({status}); see {}",
                    self.home.service_log().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        bail!(
            "capsem-service did not answer within 15 s; see {}",
            self.home.service_log().display()
        )
    }
}
