//! The service: the registry of sessions and the verbs on them (create, list, info, delete,
//! purge, logs, run). Front ends — HTTP routes ([`routes`]), and through them the CLI and MCP —
//! turn their input into these calls. Per-VM work is forwarded to that VM's `capsem-process`.
//!
//! Session states as the service sees them:
//! ```text
//!   (create) ─▶ Creating ──ready──▶ Running ──delete/purge──▶ Stopping ─▶ (gone)
//!                  └──boot failed──▶ (gone, directory removed)
//!   Running ──process died──▶ Crashed (persistent; kept on disk) or (gone) (ephemeral)
//!   Running ──suspend──▶ Suspending ─▶ Suspended ──resume──▶ Creating ─▶ Running
//!   Running ──restart──▶ Restarting ─▶ Creating ─▶ Running      (persistent sessions only)
//! ```
//! Fork, clone (`create --from`) and the image verbs are in [`images`]. A session busy with a
//! fork refuses other state changes with 409 until it is done.

pub mod autostart;
mod images;
pub mod routes;
pub mod spawn;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::StatusCode;
use tokio::sync::{watch, Mutex, OnceCell};

use crate::api::{self, CreateRequest, SessionInfo, Status, VmInfo};
use crate::hypervisor::{qemu, Accel};
use crate::names::{self, Lookup};
use crate::paths::Home;
use crate::record::{now_secs, SessionRecord};
use crate::uds_http::UdsClient;

/// How long a VM may take to boot before create gives up (TCG boots in ~2 s).
const BOOT_LIMIT: Duration = Duration::from_secs(120);
/// How long a warm-start template build may take (two boots and saves at most).
const WARM_LIMIT: Duration = Duration::from_secs(300);

/// Environment variable forcing the accelerator (`kvm` or `tcg`) instead of probing.
pub const ACCEL_ENV: &str = "CAPSEM_ACCEL";

pub use crate::uds_http::HttpError;

impl HttpError {
    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    fn not_found(query: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            format!("no session named or with id {query:?}; see `capsem list`"),
        )
    }
}

struct Entry {
    record: SessionRecord,
    status: Status,
    started: Instant,
    vm: Option<VmInfo>,
    /// Becomes true when the session's capsem-process has exited.
    exited: watch::Receiver<bool>,
    pid: Option<u32>,
    /// The VM's per-VM API (kept, so its connections are reused).
    client: UdsClient,
    /// Set while an operation that must not overlap others (a fork's copy) runs.
    busy: Option<&'static str>,
}

struct Inner {
    home: Home,
    sessions: Mutex<HashMap<String, Entry>>,
    accel: OnceCell<Accel>,
    /// Held while a warm-start template is built (one at a time).
    warming: Mutex<()>,
    /// Sizes (MiB, CPUs) a temporary session has started warm at, or a `warm` request built,
    /// since this service started.
    warm_sizes: std::sync::Mutex<std::collections::HashSet<(u32, u32)>>,
    /// Sizes whose template, made for another configuration, this service has replaced (or
    /// tried to) since it started.
    stale_sizes: std::sync::Mutex<std::collections::HashSet<(u32, u32)>>,
}

#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

impl Service {
    pub fn new(home: Home) -> Self {
        Service {
            inner: Arc::new(Inner {
                home,
                sessions: Mutex::new(HashMap::new()),
                accel: OnceCell::new(),
                warming: Mutex::new(()),
                warm_sizes: Default::default(),
                stale_sizes: Default::default(),
            }),
        }
    }

    pub fn home(&self) -> &Home {
        &self.inner.home
    }

    /// Take stock of what is on disk at start: adopt sessions whose process still answers, drop
    /// ephemeral leftovers, keep persistent ones.
    pub async fn adopt(&self) {
        crate::forks::clean_staging(self.home());
        let Ok(dirs) = std::fs::read_dir(self.home().sessions_dir()) else {
            return;
        };
        for d in dirs.flatten() {
            let dir = d.path();
            let Ok(record) = SessionRecord::load(&dir) else {
                continue;
            };
            let client = UdsClient::new(self.home().instance_socket(&record.id));
            match client.get::<VmInfo>("/info").await {
                Ok(vm) => {
                    tracing::info!(id = %record.id, "adopting running session");
                    let exited = watch_pid(vm.process_pid);
                    let pid = Some(vm.process_pid);
                    self.insert_adopted(record, Status::Running, Some(vm), exited, pid)
                        .await;
                }
                Err(_) if !record.persistent => {
                    tracing::info!(id = %record.id, "removing leftover ephemeral session");
                    self.remove_session_files(&record.id);
                }
                Err(_) => {
                    let (_tx, rx) = watch::channel(true);
                    let suspended = dir
                        .join(crate::instance::STATE_DIR)
                        .join(crate::instance::STATE_FILE)
                        .is_file();
                    let status = if suspended {
                        Status::Suspended
                    } else {
                        Status::Crashed
                    };
                    self.insert_adopted(record, status, None, rx, None).await;
                }
            }
        }
    }

    async fn insert_adopted(
        &self,
        record: SessionRecord,
        status: Status,
        vm: Option<VmInfo>,
        exited: watch::Receiver<bool>,
        pid: Option<u32>,
    ) {
        let id = record.id.clone();
        let mut map = self.inner.sessions.lock().await;
        map.insert(
            id.clone(),
            Entry {
                record,
                status,
                started: Instant::now(),
                vm,
                exited: exited.clone(),
                pid,
                client: UdsClient::new(self.home().instance_socket(&id)),
                busy: None,
            },
        );
        drop(map);
        if status == Status::Running {
            self.watch_exit(id, exited);
        }
    }

    /// The accelerator, probed once (and cached in `run/accel.json` for later service starts).
    pub async fn accel(&self) -> Result<Accel, HttpError> {
        self.inner
            .accel
            .get_or_try_init(|| async {
                if let Some(a) = std::env::var(ACCEL_ENV)
                    .ok()
                    .as_deref()
                    .and_then(Accel::parse)
                {
                    return Ok(a);
                }
                let cache = self.home().accel_cache();
                let key = accel_cache_key();
                if let Ok(text) = std::fs::read_to_string(&cache) {
                    if let Ok(c) = serde_json::from_str::<AccelCache>(&text) {
                        if c.key == key {
                            return Ok(c.accel);
                        }
                    }
                }
                let assets = self.assets()?;
                let qemu = qemu::qemu_binary().map_err(unavailable)?;
                let kvm = std::path::Path::new("/dev/kvm").exists()
                    && qemu::probe(
                        &qemu,
                        &assets.kernel,
                        &assets.initrd,
                        Accel::Kvm,
                        Duration::from_millis(2500),
                    )
                    .await
                    .unwrap_or(false);
                let accel = if kvm { Accel::Kvm } else { Accel::Tcg };
                tracing::info!(accel = accel.as_str(), "accelerator probed");
                let json = serde_json::to_vec(&AccelCache { key, accel }).expect("serializes");
                let _ = crate::paths::write_private(&cache, &json);
                Ok(accel)
            })
            .await
            .copied()
    }

    /// The accelerator if it has been decided already.
    pub fn accel_known(&self) -> Option<Accel> {
        self.inner.accel.get().copied()
    }

    fn assets(&self) -> Result<crate::image::Assets, HttpError> {
        crate::image::load(&self.home().assets_root()).map_err(unavailable)
    }

    /// Create and boot a session.
    pub async fn create(&self, req: CreateRequest) -> Result<SessionInfo, HttpError> {
        if let Some(name) = &req.name {
            names::validate_name(name).map_err(|e| HttpError::bad(e.to_string()))?;
        }
        // A clone starts from its source's disk and, unless told otherwise, its size.
        let source = match &req.from {
            Some(from) => Some(self.clone_source(from).await?),
            None => None,
        };
        let ram_mb = req
            .ram_mb
            .or(source.as_ref().map(|s| s.ram_mb))
            .unwrap_or(api::DEFAULT_RAM_MB);
        let cpus = req
            .cpus
            .or(source.as_ref().map(|s| s.cpus))
            .unwrap_or_else(api::default_cpus);
        check_size(ram_mb, cpus)?;
        if let Some(k) = req.env.keys().find(|k| !api::valid_env_key(k)) {
            return Err(HttpError::bad(format!(
                "invalid environment variable name {k:?}: use letters, digits and '_'"
            )));
        }
        let assets = self.assets()?;
        if let Some(src) = &source {
            src.check_assets(&assets.manifest.version)?;
        }
        qemu::qemu_binary().map_err(unavailable)?;
        let accel = self.accel().await?;

        let id = names::new_id();
        let record = SessionRecord {
            id: id.clone(),
            name: req.name.clone(),
            persistent: req.persistent.unwrap_or(req.name.is_some()),
            ram_mb,
            cpus,
            env: req.env.into_iter().collect(),
            created_at: now_secs(),
            asset_version: assets.manifest.version.clone(),
            from_image: source.as_ref().and_then(|s| s.image().map(str::to_string)),
        };
        let (exited_tx, exited_rx) = watch::channel(false);
        {
            let mut map = self.inner.sessions.lock().await;
            if let Some(name) = &record.name {
                name_free(&map, name, &id)?;
            }
            map.insert(
                id.clone(),
                Entry {
                    record: record.clone(),
                    status: Status::Creating,
                    started: Instant::now(),
                    vm: None,
                    exited: exited_rx.clone(),
                    pid: None,
                    client: UdsClient::new(self.home().instance_socket(&id)),
                    busy: None,
                },
            );
        }
        let dir = self.home().session_dir(&id);
        let booted = async {
            crate::paths::private_dir(&dir).map_err(internal)?;
            record.save(&dir).map_err(internal)?;
            if let Some(src) = &source {
                self.clone_disk(src, &dir).await?;
            }
            spawn::start(self.home(), &id, accel, BOOT_LIMIT)
                .await
                .map_err(|e| {
                    HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, crate::error_chain(&e))
                })
        }
        .await;
        let spawned = match booted {
            Ok(s) => s,
            Err(e) => {
                self.inner.sessions.lock().await.remove(&id);
                self.remove_session_files(&id);
                return Err(e);
            }
        };
        let (start, other_template) = (spawned.info.start, spawned.info.other_template);
        self.mark_running(&id, spawned, exited_tx, exited_rx)
            .await?;
        // Only a fresh temporary session could have started warm.
        if !record.persistent && source.is_none() {
            self.heal_warm_start(ram_mb, cpus, start, other_template);
        }
        self.info(&id).await
    }

    /// A fresh temporary session booted cold although its size has a template: either it
    /// started warm before (or a `warm` request built it) and the template was discarded since
    /// (it stopped loading), or the template there was made for another configuration (another
    /// QEMU build, other guest kernel words). Build a new one in the background, once per such
    /// cold start: the size is marked again only by a warm start or a `warm` request, never by
    /// this rebuild, and a template of another configuration is replaced once per service, so
    /// a template that keeps failing is not rebuilt in a loop.
    fn heal_warm_start(&self, ram_mb: u32, cpus: u32, start: api::StartKind, other_template: bool) {
        let mut sizes = self
            .inner
            .warm_sizes
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match start {
            api::StartKind::Warm => {
                sizes.insert((ram_mb, cpus));
            }
            api::StartKind::Cold
                if crate::warm::enabled()
                    && (sizes.remove(&(ram_mb, cpus))
                        || (other_template && self.first_replacement(ram_mb, cpus))) =>
            {
                let svc = self.clone();
                tokio::spawn(async move {
                    match svc.build_warm(ram_mb, cpus).await {
                        Ok(r) => {
                            tracing::info!(key = %r.key, built = r.built, "warm-start template rebuilt")
                        }
                        Err(e) => {
                            tracing::warn!(error = %e.message, "warm-start template not rebuilt")
                        }
                    }
                });
            }
            _ => {}
        }
    }

    /// Whether this service has not yet replaced a template of this size made for another
    /// configuration (it does so once).
    fn first_replacement(&self, ram_mb: u32, cpus: u32) -> bool {
        self.inner
            .stale_sizes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((ram_mb, cpus))
    }

    /// Remove what a session leaves on disk: its directory and its process's socket.
    fn remove_session_files(&self, id: &str) {
        let _ = std::fs::remove_dir_all(self.home().session_dir(id));
        let _ = std::fs::remove_file(self.home().instance_socket(id));
    }

    /// A session's process is up: record it, and watch for its end. A session deleted while it
    /// booted (its process had no socket yet to be told) has its process ended here instead,
    /// and the caller gets the 409 that says so.
    async fn mark_running(
        &self,
        id: &str,
        spawned: spawn::Spawned,
        exited_tx: watch::Sender<bool>,
        exited_rx: watch::Receiver<bool>,
    ) -> Result<(), HttpError> {
        let mut child = spawned.child;
        let pid = child.id();
        let mut map = self.inner.sessions.lock().await;
        match map.get_mut(id) {
            Some(e) if e.status != Status::Stopping => {
                e.status = Status::Running;
                e.vm = Some(spawned.info);
                e.started = Instant::now();
                e.pid = pid;
                e.exited = exited_rx.clone();
                // A fresh pool: connections to a previous process of this session are dead.
                e.client = UdsClient::new(self.home().instance_socket(id));
            }
            deleting => {
                let gone = deleting.is_none();
                drop(map);
                tracing::info!(%id, "deleted while it booted: ending its process");
                let _ = child.kill().await;
                let _ = exited_tx.send(true);
                if gone {
                    // The delete is over: what the process made after it is ours to remove.
                    self.remove_session_files(id);
                }
                return Err(HttpError::new(
                    StatusCode::CONFLICT,
                    format!("session {id} was deleted while it was starting"),
                ));
            }
        }
        drop(map);
        tokio::spawn(async move {
            let _ = child.wait().await;
            let _ = exited_tx.send(true);
        });
        self.watch_exit(id.to_string(), exited_rx);
        Ok(())
    }

    /// Build the warm-start template for a size (default: a session's) unless there is one:
    /// new ephemeral sessions of that size are then restored from it instead of booting.
    pub async fn warm(&self, req: api::WarmRequest) -> Result<api::WarmResponse, HttpError> {
        let ram_mb = req.ram_mb.unwrap_or(api::DEFAULT_RAM_MB);
        let cpus = req.cpus.unwrap_or_else(api::default_cpus);
        check_size(ram_mb, cpus)?;
        let r = self.build_warm(ram_mb, cpus).await?;
        // Sessions of this size are meant to start warm from now on: one that boots cold
        // (its template discarded meanwhile) heals it, as after a warm start.
        self.inner
            .warm_sizes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((ram_mb, cpus));
        Ok(r)
    }

    /// [`Self::warm`]'s build, without marking the size (a heal's rebuild must not lead to
    /// another heal: a template that keeps failing is not rebuilt in a loop).
    async fn build_warm(&self, ram_mb: u32, cpus: u32) -> Result<api::WarmResponse, HttpError> {
        self.assets()?;
        qemu::qemu_binary().map_err(unavailable)?;
        let accel = self.accel().await?;
        let _one = self.inner.warming.lock().await;
        spawn::warm(self.home(), accel, ram_mb, cpus, WARM_LIMIT)
            .await
            .map_err(|e| {
                // capsem-process's own report already says what failed.
                let why = match e {
                    spawn::SpawnError::Failed(why) => why,
                    other => format!(
                        "building the warm-start template failed: {}",
                        crate::error_chain(&other)
                    ),
                };
                HttpError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!(
                        "{why}; sessions still boot cold (see {})",
                        self.home().run_dir().join("warm.log").display()
                    ),
                )
            })
    }

    /// Suspend a running persistent session: its RAM and device state go to disk, its process
    /// and QEMU end, and `resume` continues it.
    pub async fn suspend(&self, query: &str) -> Result<SessionInfo, HttpError> {
        let id = self.resolve(query).await?;
        let (client, mut exited, pid) = self
            .with_entry(&id, query, |e| {
                check_idle(e)?;
                persistent_only(e, "suspended")?;
                if e.status != Status::Running {
                    return Err(not_running(e));
                }
                e.status = Status::Suspending;
                Ok((e.client.clone(), e.exited.clone(), e.pid))
            })
            .await?;
        let saved = client
            .post::<_, api::SuspendResponse>("/suspend", &serde_json::json!({}))
            .await;
        if saved.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(10), exited.wait_for(|e| *e)).await;
        } else {
            // The VM may still run (the guest did not sync, say): end it, so that nothing
            // writes the disk of a session the registry calls crashed.
            end_process(&id, &client, "/kill", exited, pid, Duration::from_secs(5)).await;
        }
        self.with_entry(&id, query, |e| {
            e.vm = None;
            e.pid = None;
            match saved {
                Ok(r) => {
                    tracing::info!(%id, bytes = r.state_bytes, ms = r.took_ms, "session suspended");
                    e.status = Status::Suspended;
                    Ok(session_info(e))
                }
                Err(err) => {
                    e.status = Status::Crashed;
                    Err(HttpError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("suspend failed: {}; the session's disk is intact, `capsem resume` boots it", crate::error_chain(&err)),
                    ))
                }
            }
        })
        .await
    }

    /// Run `f` on session `id`'s entry under the registry lock; 404 naming `query` if it is gone.
    async fn with_entry<T>(
        &self,
        id: &str,
        query: &str,
        f: impl FnOnce(&mut Entry) -> Result<T, HttpError>,
    ) -> Result<T, HttpError> {
        let mut map = self.inner.sessions.lock().await;
        f(map.get_mut(id).ok_or_else(|| HttpError::not_found(query))?)
    }

    /// Resume a suspended session from its saved state (or a crashed persistent one from its
    /// disk); a running session is returned as it is. A name that is no session but a fork
    /// image boots that image as a new persistent session of that name.
    pub async fn resume(&self, query: &str) -> Result<SessionInfo, HttpError> {
        // A session's exact name wins, then an image's name, then a session id (or prefix).
        let named = named(&*self.inner.sessions.lock().await, query).is_some();
        if !named && crate::forks::exists(self.home(), query) {
            return self
                .create(CreateRequest {
                    name: Some(query.to_string()),
                    persistent: Some(true),
                    from: Some(query.to_string()),
                    ..Default::default()
                })
                .await;
        }
        let id = self.resolve(query).await?;
        let running = self
            .with_entry(&id, query, |e| {
                check_idle(e)?;
                match e.status {
                    Status::Running => Ok(Some(session_info(e))),
                    Status::Suspended | Status::Crashed if e.record.persistent => {
                        e.status = Status::Creating;
                        Ok(None)
                    }
                    _ => Err(wrong_state(e, "resumed now")),
                }
            })
            .await?;
        match running {
            Some(info) => Ok(info),
            None => self.boot_existing(&id).await,
        }
    }

    /// Reboot a persistent session with the same disk. A suspended one drops its saved RAM
    /// state and boots cold.
    pub async fn restart(&self, query: &str) -> Result<SessionInfo, HttpError> {
        let id = self.resolve(query).await?;
        let running = self
            .with_entry(&id, query, |e| {
                check_idle(e)?;
                persistent_only(e, "restarted")?;
                match e.status {
                    Status::Running => {
                        e.status = Status::Restarting;
                        Ok(Some((e.client.clone(), e.exited.clone(), e.pid)))
                    }
                    Status::Suspended | Status::Crashed => {
                        e.status = Status::Creating;
                        Ok(None)
                    }
                    _ => Err(wrong_state(e, "restarted now")),
                }
            })
            .await?;
        if let Some((client, exited, pid)) = running {
            // The guest syncs, unmounts and powers off.
            end_process(
                &id,
                &client,
                "/shutdown",
                exited,
                pid,
                Duration::from_secs(20),
            )
            .await;
        }
        let state = self
            .home()
            .session_dir(&id)
            .join(crate::instance::STATE_DIR)
            .join(crate::instance::STATE_FILE);
        let _ = std::fs::remove_file(state);
        self.boot_existing(&id).await
    }

    /// Start the process of an existing session (resume or restart); on failure it is crashed.
    async fn boot_existing(&self, id: &str) -> Result<SessionInfo, HttpError> {
        let started = async {
            self.assets()?;
            let accel = self.accel().await?;
            spawn::start(self.home(), id, accel, BOOT_LIMIT)
                .await
                .map_err(|e| {
                    HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, crate::error_chain(&e))
                })
        }
        .await;
        match started {
            Ok(spawned) => {
                let (tx, rx) = watch::channel(false);
                self.mark_running(id, spawned, tx, rx).await?;
                self.info(id).await
            }
            Err(e) => {
                if let Some(entry) = self.inner.sessions.lock().await.get_mut(id) {
                    entry.status = Status::Crashed;
                    entry.vm = None;
                }
                Err(e)
            }
        }
    }

    /// When a session's process ends without being asked, mark it crashed (persistent) or
    /// remove it (ephemeral).
    fn watch_exit(&self, id: String, mut exited: watch::Receiver<bool>) {
        let svc = self.clone();
        tokio::spawn(async move {
            let _ = exited.wait_for(|e| *e).await;
            let mut map = svc.inner.sessions.lock().await;
            let Some(e) = map.get_mut(&id) else { return };
            if matches!(
                e.status,
                Status::Stopping | Status::Suspending | Status::Suspended | Status::Restarting
            ) {
                return; // delete, suspend or restart owns what happens next
            }
            if e.record.persistent {
                tracing::warn!(%id, "session process exited; marking crashed");
                e.status = Status::Crashed;
                e.vm = None;
            } else {
                tracing::info!(%id, "ephemeral session ended; removing it");
                map.remove(&id);
                svc.remove_session_files(&id);
            }
        });
    }

    /// Resolve a name, id or unique id prefix.
    pub async fn resolve(&self, query: &str) -> Result<String, HttpError> {
        let map = self.inner.sessions.lock().await;
        let pairs: Vec<(&str, Option<&str>)> = map
            .values()
            .map(|e| (e.record.id.as_str(), e.record.name.as_deref()))
            .collect();
        match names::resolve(query, pairs.iter().copied()) {
            Lookup::Found(id) => Ok(id.to_string()),
            Lookup::NotFound => Err(HttpError::not_found(query)),
            Lookup::Ambiguous(ids) => Err(HttpError::bad(format!(
                "{query:?} matches several sessions ({}); give more of the id",
                ids.join(", ")
            ))),
        }
    }

    pub async fn info(&self, query: &str) -> Result<SessionInfo, HttpError> {
        let id = self.resolve(query).await?;
        let map = self.inner.sessions.lock().await;
        let e = map.get(&id).ok_or_else(|| HttpError::not_found(query))?;
        let mut info = session_info(e);
        drop(map);
        let db = self.home().session_dir(&id).join(crate::telemetry::DB_FILE);
        // The record is a summary beside the session: reading it never fails `info`.
        info.telemetry = match tokio::task::spawn_blocking(move || crate::telemetry::summary(&db))
            .await
        {
            Ok(Ok(s)) => Some(s),
            Ok(Err(e)) => {
                tracing::warn!(%id, error = %crate::error_chain(&e), "session record unreadable");
                None
            }
            Err(_) => None,
        };
        Ok(info)
    }

    pub async fn list(&self) -> Vec<SessionInfo> {
        let map = self.inner.sessions.lock().await;
        let mut v: Vec<SessionInfo> = map.values().map(session_info).collect();
        v.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        v
    }

    /// The per-VM API of a running session.
    pub async fn instance(&self, query: &str) -> Result<(String, UdsClient), HttpError> {
        let id = self.resolve(query).await?;
        let map = self.inner.sessions.lock().await;
        let e = map.get(&id).ok_or_else(|| HttpError::not_found(query))?;
        if e.status != Status::Running {
            return Err(not_running(e));
        }
        Ok((id, e.client.clone()))
    }

    /// Make a session persistent under `name` (it must be free). Persisting a persistent
    /// session renames it.
    pub async fn persist(&self, query: &str, name: &str) -> Result<SessionInfo, HttpError> {
        names::validate_name(name).map_err(|e| HttpError::bad(e.to_string()))?;
        let id = self.resolve(query).await?;
        let mut map = self.inner.sessions.lock().await;
        name_free(&map, name, &id)?;
        let e = map
            .get_mut(&id)
            .ok_or_else(|| HttpError::not_found(query))?;
        not_being_deleted(e)?;
        let mut record = e.record.clone();
        record.name = Some(name.to_string());
        record.persistent = true;
        record
            .save(&self.home().session_dir(&id))
            .map_err(internal)?;
        e.record = record;
        Ok(session_info(e))
    }

    /// Whether session `id` is persistent now (a temporary session may be persisted mid-run).
    pub async fn is_persistent(&self, id: &str) -> bool {
        let map = self.inner.sessions.lock().await;
        map.get(id).map(|e| e.record.persistent).unwrap_or(false)
    }

    /// Stop the VM and remove the session and its directory.
    pub async fn delete(&self, query: &str) -> Result<String, HttpError> {
        let id = self.resolve(query).await?;
        tracing::debug!(%id, "delete: start");
        // A fork's copy finishes first (it takes milliseconds); delete never gives up on it.
        let (exited, pid) = loop {
            {
                let mut map = self.inner.sessions.lock().await;
                let e = map
                    .get_mut(&id)
                    .ok_or_else(|| HttpError::not_found(query))?;
                not_being_deleted(e)?;
                if e.busy.is_none() {
                    e.status = Status::Stopping;
                    break (e.exited.clone(), e.pid);
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if !*exited.borrow() {
            let client = UdsClient::new(self.home().instance_socket(&id));
            end_process(&id, &client, "/kill", exited, pid, Duration::from_secs(5)).await;
        }
        self.remove_session_files(&id);
        self.inner.sessions.lock().await.remove(&id);
        tracing::debug!(%id, "delete: done");
        Ok(id)
    }

    /// Clear session `id`'s busy mark.
    pub(super) async fn set_idle(&self, id: &str) {
        if let Some(e) = self.inner.sessions.lock().await.get_mut(id) {
            e.busy = None;
        }
    }

    /// Delete every ephemeral session, or every session with `all`.
    pub async fn purge(&self, all: bool) -> Vec<String> {
        let targets: Vec<String> = {
            let map = self.inner.sessions.lock().await;
            map.values()
                .filter(|e| all || !e.record.persistent)
                .filter(|e| e.status != Status::Stopping)
                .map(|e| e.record.id.clone())
                .collect()
        };
        futures::future::join_all(targets.iter().map(|id| self.delete(id)))
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Serial console and process log of a session, optionally only the last `tail` lines.
    pub async fn logs(
        &self,
        query: &str,
        tail: Option<usize>,
    ) -> Result<api::LogsResponse, HttpError> {
        let id = self.resolve(query).await?;
        let dir = self.home().session_dir(&id);
        let read = |f: &str| {
            // The guest writes the console, without limit: only its end is read.
            let (raw, skipped) = crate::paths::read_window(&dir.join(f), None, LOGS_LIMIT);
            let mut text = String::from_utf8_lossy(&raw).replace('\r', "");
            if skipped > 0 && tail.is_none() {
                text.insert_str(
                    0,
                    &format!("[capsem: the first {skipped} bytes are left out]\n"),
                );
            }
            match tail {
                Some(n) => {
                    let lines: Vec<&str> = text.lines().collect();
                    let mut s = lines[lines.len().saturating_sub(n)..].join("\n");
                    if !s.is_empty() {
                        s.push('\n');
                    }
                    s
                }
                None => text,
            }
        };
        Ok(api::LogsResponse {
            serial: read("serial.log"),
            process: read("process.log"),
        })
    }

    pub async fn count(&self) -> usize {
        self.inner.sessions.lock().await.len()
    }

    /// Stop every session (the service is shutting down).
    pub async fn shutdown(&self) {
        let ids: Vec<String> = self.inner.sessions.lock().await.keys().cloned().collect();
        futures::future::join_all(ids.iter().map(|id| async move {
            let persistent = {
                let map = self.inner.sessions.lock().await;
                map.get(id).map(|e| e.record.persistent).unwrap_or(false)
            };
            if persistent {
                // Nothing is lost: a running persistent session is suspended.
                if let Err(e) = self.suspend(id).await {
                    tracing::warn!(%id, error = %e.message, "could not suspend at shutdown");
                }
            } else {
                let _ = self.delete(id).await;
            }
        }))
        .await;
    }
}

/// Deletes a session when dropped (temporary sessions of `run` and `shell`).
pub struct DeleteOnDrop {
    svc: Service,
    id: Option<String>,
}

impl DeleteOnDrop {
    pub fn new(svc: Service, id: String) -> Self {
        DeleteOnDrop { svc, id: Some(id) }
    }
}

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            let svc = self.svc.clone();
            tokio::spawn(async move {
                // `capsem persist` during the run keeps it.
                if !svc.is_persistent(&id).await {
                    let _ = svc.delete(&id).await;
                }
            });
        }
    }
}

fn session_info(e: &Entry) -> SessionInfo {
    SessionInfo {
        id: e.record.id.clone(),
        name: e.record.name.clone(),
        status: e.status,
        persistent: e.record.persistent,
        ram_mb: e.record.ram_mb,
        cpus: e.record.cpus,
        uptime_secs: if e.status == Status::Running {
            e.started.elapsed().as_secs()
        } else {
            0
        },
        created_at: e.record.created_at,
        asset_version: e.record.asset_version.clone(),
        env_keys: e.record.env.iter().map(|(k, _)| k.clone()).collect(),
        vm: e.vm.clone(),
        telemetry: None,
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct AccelCache {
    key: String,
    accel: Accel,
}

/// The probe result holds for one host boot and one QEMU binary.
fn accel_cache_key() -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let qemu = qemu::qemu_binary()
        .ok()
        .and_then(|p| std::fs::metadata(&p).ok().map(|m| (p, m.len())))
        .map(|(p, len)| format!("{}:{len}", p.display()))
        .unwrap_or_default();
    format!("{}|{qemu}", boot.trim())
}

/// Ask a session's process to end (`how`: `/kill`, or `/shutdown` to power the guest off first),
/// wait up to `limit` for it, then SIGKILL it.
async fn end_process(
    id: &str,
    client: &UdsClient,
    how: &str,
    mut exited: watch::Receiver<bool>,
    pid: Option<u32>,
    limit: Duration,
) {
    let _ = client
        .post::<_, serde_json::Value>(how, &serde_json::json!({}))
        .await;
    if tokio::time::timeout(limit, exited.wait_for(|e| *e))
        .await
        .is_ok()
    {
        return;
    }
    if let Some(pid) = pid {
        tracing::warn!(%id, pid, "process did not stop; killing it");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = tokio::time::timeout(Duration::from_secs(2), exited.wait_for(|e| *e)).await;
    }
}

/// Most of one log `logs` returns (the end of it).
const LOGS_LIMIT: u64 = 8 << 20;

/// A receiver that turns true when `pid` no longer exists (for adopted processes, which are not
/// our children).
fn watch_pid(pid: u32) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        while nix::sys::signal::kill(pid, None).is_ok() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let _ = tx.send(true);
    });
    rx
}

fn unavailable(e: impl std::error::Error) -> HttpError {
    HttpError::new(StatusCode::SERVICE_UNAVAILABLE, crate::error_chain(&e))
}

/// 409 for an operation that needs a running session.
fn not_running(e: &Entry) -> HttpError {
    HttpError::new(
        StatusCode::CONFLICT,
        format!(
            "session {} is {}, not running",
            e.record.display_name(),
            e.status.as_str()
        ),
    )
}

/// 409 while a session is busy with an operation that must not overlap (a fork's copy).
fn check_idle(e: &Entry) -> Result<(), HttpError> {
    match e.busy {
        Some(what) => Err(HttpError::new(
            StatusCode::CONFLICT,
            format!(
                "session {} is busy {what}; try again when that is done",
                e.record.display_name()
            ),
        )),
        None => Ok(()),
    }
}

/// 409 for a verb the session's current state does not allow (`done`: "resumed now", …).
fn wrong_state(e: &Entry, done: &str) -> HttpError {
    HttpError::new(
        StatusCode::CONFLICT,
        format!(
            "session {} is {}; it cannot be {done}",
            e.record.display_name(),
            e.status.as_str()
        ),
    )
}

/// 409 for a verb only persistent sessions have (a temporary one's disk goes with its VM).
fn persistent_only(e: &Entry, done: &str) -> Result<(), HttpError> {
    if e.record.persistent {
        return Ok(());
    }
    Err(HttpError::new(
        StatusCode::CONFLICT,
        format!(
            "only persistent sessions can be {done}: keep this one first with `capsem persist {} NAME`",
            e.record.display_name()
        ),
    ))
}

/// The session named exactly `name`, if any.
fn named<'a>(map: &'a HashMap<String, Entry>, name: &str) -> Option<&'a Entry> {
    map.values()
        .find(|e| e.record.name.as_deref() == Some(name))
}

/// 409 when a session other than `id` already has `name`.
fn name_free(map: &HashMap<String, Entry>, name: &str, id: &str) -> Result<(), HttpError> {
    if named(map, name).is_some_and(|e| e.record.id != id) {
        return Err(HttpError::new(
            StatusCode::CONFLICT,
            format!("a session named {name:?} already exists; pick another name or `capsem delete {name}`"),
        ));
    }
    Ok(())
}

/// 409 when the session is being deleted.
fn not_being_deleted(e: &Entry) -> Result<(), HttpError> {
    if e.status == Status::Stopping {
        return Err(HttpError::new(
            StatusCode::CONFLICT,
            format!("session {} is being deleted", e.record.display_name()),
        ));
    }
    Ok(())
}

/// A VM size the service accepts.
fn check_size(ram_mb: u32, cpus: u32) -> Result<(), HttpError> {
    if !(128..=api::MAX_RAM_MB).contains(&ram_mb) {
        return Err(HttpError::bad(format!(
            "invalid RAM size {ram_mb} MiB: give at least 128 MiB (for example --ram 1)"
        )));
    }
    if cpus == 0 || cpus > api::MAX_CPUS {
        return Err(HttpError::bad(format!(
            "invalid CPU count {cpus}: give 1 to {}",
            api::MAX_CPUS
        )));
    }
    Ok(())
}

fn internal(e: impl std::error::Error) -> HttpError {
    HttpError::new(StatusCode::INTERNAL_SERVER_ERROR, crate::error_chain(&e))
}
