//! Fork, clone and the image verbs. A fork freezes the source's disk (the running VM moves on
//! to a new layer, or a stopped one gets a new top) and hard-links the frozen layers into
//! `images/<name>/`; a clone (`create --from`) links an image's or a session's frozen layers into
//! the new session's directory and puts a fresh top on them. Both are O(1) in disk size.

use std::path::Path;

use hyper::StatusCode;

use super::{check_idle, internal, named, unavailable, wrong_state, HttpError, Service};
use crate::api::{FreezeResponse, ImageInfo, Status};
use crate::disk;
use crate::forks::{self, ImageRecord};
use crate::record::now_secs;

/// Which disk a clone starts from.
enum Origin {
    /// A fork image (its name).
    Image(String),
    /// A persistent session (its id).
    Session(String),
}

/// Where a clone's disk comes from.
pub(super) struct CloneSource {
    origin: Origin,
    label: String,
    pub ram_mb: u32,
    pub cpus: u32,
    asset_version: String,
}

impl CloneSource {
    /// The fork image's name, when the source is one.
    pub fn image(&self) -> Option<&str> {
        match &self.origin {
            Origin::Image(name) => Some(name),
            Origin::Session(_) => None,
        }
    }

    /// A disk made for other assets does not fit the current kernel and root filesystem.
    pub fn check_assets(&self, current: &str) -> Result<(), HttpError> {
        if self.asset_version == current {
            return Ok(());
        }
        Err(HttpError::new(
            StatusCode::CONFLICT,
            format!(
                "{} was made for guest assets v{}, but v{current} are installed; it cannot be cloned",
                self.label, self.asset_version
            ),
        ))
    }
}

impl Service {
    /// What `create --from NAME` clones: the image of that name, else that persistent session.
    pub(super) async fn clone_source(&self, from: &str) -> Result<CloneSource, HttpError> {
        if forks::exists(self.home(), from) {
            let r = ImageRecord::load(&self.home().image_dir(from)).map_err(internal)?;
            return Ok(CloneSource {
                origin: Origin::Image(r.name.clone()),
                label: format!("image {from}"),
                ram_mb: r.ram_mb,
                cpus: r.cpus,
                asset_version: r.asset_version,
            });
        }
        let id = self.resolve(from).await.map_err(|e| {
            if e.status == StatusCode::NOT_FOUND {
                HttpError::new(
                    StatusCode::NOT_FOUND,
                    format!("no image or session named {from:?}; see `capsem image list` and `capsem list`"),
                )
            } else {
                e
            }
        })?;
        let map = self.inner.sessions.lock().await;
        let e = map.get(&id).ok_or_else(|| HttpError::not_found(from))?;
        if !e.record.persistent {
            return Err(HttpError::new(
                StatusCode::CONFLICT,
                format!(
                    "session {} is temporary; clone a persistent session or an image (`capsem fork {} NAME`)",
                    e.record.display_name(),
                    e.record.display_name()
                ),
            ));
        }
        Ok(CloneSource {
            origin: Origin::Session(id.clone()),
            label: format!("session {}", e.record.display_name()),
            ram_mb: e.record.ram_mb,
            cpus: e.record.cpus,
            asset_version: e.record.asset_version.clone(),
        })
    }

    /// Give the new session directory `dir` its source's disk: linked frozen layers plus a
    /// fresh writable top.
    pub(super) async fn clone_disk(&self, src: &CloneSource, dir: &Path) -> Result<(), HttpError> {
        let (from, upto) = match &src.origin {
            Origin::Image(name) => {
                let from = self.home().image_dir(name);
                let top = disk::top(&from).map_err(internal)?.ok_or_else(|| {
                    HttpError::new(StatusCode::CONFLICT, format!("image {name} has no disk"))
                })?;
                (from, top)
            }
            Origin::Session(id) => (self.home().session_dir(id), self.freeze(id).await?),
        };
        let (dir, label) = (dir.to_path_buf(), src.label.clone());
        let made = async {
            let hv = crate::hypervisor::detect(self.accel().await?).map_err(unavailable)?;
            tokio::task::spawn_blocking(move || {
                disk::link_layers(&from, &dir, upto).map_err(|e| copy_failed(&label, e))?;
                hv.create_disk(
                    &dir.join(disk::layer_name(upto)),
                    &dir.join(disk::layer_name(upto + 1)),
                )
                .map_err(internal)
            })
            .await
            .map_err(internal)?
        }
        .await;
        // The source session was kept busy (nothing deletes it) until its layers were linked.
        if let Origin::Session(id) = &src.origin {
            self.set_idle(id).await;
        }
        made
    }

    /// Freeze session `id`'s current disk top so it can be shared; returns its layer number.
    /// A running VM keeps running (it writes a new layer from now on). On success the session
    /// stays busy — nothing deletes it — until the caller has linked the layers and calls
    /// `set_idle`.
    async fn freeze(&self, id: &str) -> Result<u32, HttpError> {
        let client = self
            .with_entry(id, id, |e| {
                check_idle(e)?;
                let client = match e.status {
                    Status::Running => Some(e.client.clone()),
                    // Stopped for sure: no QEMU writes the top any more.
                    Status::Suspended | Status::Crashed if *e.exited.borrow() => None,
                    _ => {
                        return Err(wrong_state(
                            e,
                            "copied now (it can be when running, suspended or crashed)",
                        ))
                    }
                };
                e.busy = Some("forking");
                Ok(client)
            })
            .await?;
        let frozen = async {
            match client {
                Some(c) => c
                    .post::<_, FreezeResponse>("/freeze", &serde_json::json!({}))
                    .await
                    .map(|r| r.frozen)
                    .map_err(|e| {
                        HttpError::new(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            format!("copying the disk failed: {}", crate::error_chain(&e)),
                        )
                    }),
                None => {
                    let hv = crate::hypervisor::detect(self.accel().await?).map_err(unavailable)?;
                    let dir = self.home().session_dir(id);
                    tokio::task::spawn_blocking(move || {
                        let top = disk::top(&dir).map_err(internal)?.ok_or_else(|| {
                            HttpError::new(StatusCode::CONFLICT, "the session has no disk yet")
                        })?;
                        // Not booted since the last freeze: the layer below is still the copy.
                        if disk::is_fresh(&dir, top) {
                            return Ok(top - 1);
                        }
                        hv.create_disk(
                            &dir.join(disk::layer_name(top)),
                            &dir.join(disk::layer_name(top + 1)),
                        )
                        .map_err(internal)?;
                        disk::mark_fresh(&dir, top + 1).map_err(internal)?;
                        Ok(top)
                    })
                    .await
                    .map_err(internal)?
                }
            }
        }
        .await;
        if frozen.is_err() {
            self.set_idle(id).await;
        }
        frozen
    }

    /// `fork SESSION NAME`: a point-in-time copy of the session's disk, kept as image `name`.
    pub async fn fork(
        &self,
        query: &str,
        name: &str,
        description: Option<String>,
    ) -> Result<ImageInfo, HttpError> {
        let started = std::time::Instant::now();
        crate::names::validate_image_name(name).map_err(|e| HttpError::bad(e.to_string()))?;
        let id = self.resolve(query).await?;
        let taken = |what: &str| {
            HttpError::new(
                StatusCode::CONFLICT,
                format!("{what} named {name:?} already exists; pick another name for the fork"),
            )
        };
        if forks::exists(self.home(), name) {
            return Err(taken("an image"));
        }
        let record = {
            let map = self.inner.sessions.lock().await;
            if named(&map, name).is_some() {
                return Err(taken("a session"));
            }
            let e = map.get(&id).ok_or_else(|| HttpError::not_found(query))?;
            ImageRecord {
                name: name.to_string(),
                description: description.unwrap_or_default(),
                source: e.record.display_name().to_string(),
                created_at: now_secs(),
                asset_version: e.record.asset_version.clone(),
                ram_mb: e.record.ram_mb,
                cpus: e.record.cpus,
            }
        };
        let upto = self.freeze(&id).await?;
        let (home, from) = (self.home().clone(), self.home().session_dir(&id));
        let rec = record.clone();
        let published = tokio::task::spawn_blocking(move || {
            forks::publish(&home, &rec, |dir| disk::link_layers(&from, dir, upto))
        })
        .await;
        self.set_idle(&id).await;
        published.map_err(internal)?.map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => taken("an image"),
            _ => copy_failed(&format!("session {query}"), e),
        })?;
        tracing::info!(%id, image = name, ms = started.elapsed().as_millis() as u64, "forked");
        let mut info = self.image_info(record).await;
        info.took_ms = Some(started.elapsed().as_millis() as u64);
        Ok(info)
    }

    async fn image_info(&self, r: ImageRecord) -> ImageInfo {
        let used_by = {
            let map = self.inner.sessions.lock().await;
            let mut v: Vec<String> = map
                .values()
                .filter(|e| e.record.from_image.as_deref() == Some(r.name.as_str()))
                .map(|e| e.record.display_name().to_string())
                .collect();
            v.sort();
            v
        };
        ImageInfo {
            size_bytes: disk::allocated_bytes(&self.home().image_dir(&r.name)),
            image: r,
            used_by,
            took_ms: None,
        }
    }

    pub async fn images(&self) -> Vec<ImageInfo> {
        let mut v = Vec::new();
        for r in forks::list(self.home()) {
            v.push(self.image_info(r).await);
        }
        v
    }

    /// Remove image `name`. Refused while sessions made from it exist, unless `force`: their
    /// disks hold their own links to its layers, so they keep working either way.
    pub async fn delete_image(&self, name: &str, force: bool) -> Result<ImageInfo, HttpError> {
        crate::names::validate_image_name(name).map_err(|e| HttpError::bad(e.to_string()))?;
        if !forks::exists(self.home(), name) {
            return Err(HttpError::new(
                StatusCode::NOT_FOUND,
                format!("no image named {name:?}; see `capsem image list`"),
            ));
        }
        let dir = self.home().image_dir(name);
        let info = self
            .image_info(ImageRecord::load(&dir).map_err(internal)?)
            .await;
        if !info.used_by.is_empty() && !force {
            return Err(HttpError::new(
                StatusCode::CONFLICT,
                format!(
                    "image {name} is in use by {}; delete those sessions first, or pass --force (they keep their own copy)",
                    info.used_by.join(", ")
                ),
            ));
        }
        std::fs::remove_dir_all(&dir).map_err(internal)?;
        Ok(info)
    }
}

fn copy_failed(what: &str, e: std::io::Error) -> HttpError {
    HttpError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("copying the disk of {what} failed ({e}); was it deleted meanwhile?"),
    )
}
