//! Warm starts: a guest booted once, idle at its agent's "waiting for the host", saved with its
//! RAM (a *template*), and restored for every new ephemeral session of the same machine
//! configuration instead of booting a kernel. This module owns where templates live, what they
//! are keyed by, and how a session takes one; building one is [`crate::instance::build_template`].
//!
//! ```text
//! <assets>/v<version>/warm/<key>/
//!     warm.json        what the template was made from (key, build id, RAM, CPUs, assets, base)
//!     disk.qcow2       the guest's disk at the save (over the empty ext4 base, by its real path)
//!     vm.state         RAM and device state, as QEMU's migration stream
//! <assets>/v<version>/warm/discarded.log   templates taken out of use: when, which, why
//! ```
//!
//! A session restored from a template hard-links the template's `disk.qcow2` (as its layer 0)
//! and `vm.state` (as `warm.state`, removed once loaded) from one open handle on the template's
//! directory, so deleting or replacing the template never breaks or mixes it, and adds a new
//! empty top: the disk is exactly the one the saved RAM expects. The guest then takes its own
//! identity ([`capsem_proto::control::ControlRequest::Identity`]): hostname, a reseeded RNG,
//! the clock. The key covers what the saved state depends on: the asset files' digests, the
//! launch description (QEMU binary, machine flags, kernel command line; per-session paths and
//! the boot-only TSC hint left out; the host kernel and CPU flags under KVM), RAM and CPUs;
//! anything else gets a cold boot.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::hypervisor::{Hypervisor, HypervisorError, VmSpec};
use crate::image::Assets;

/// `CAPSEM_WARM=0` turns warm starts off (every session boots cold); for A/B measurements.
pub const WARM_ENV: &str = "CAPSEM_WARM";
/// The template's description file.
pub const META_FILE: &str = "warm.json";
/// The log of discarded templates, in the templates' root (see [`discard`]).
pub const DISCARD_LOG: &str = "discarded.log";
/// The template's saved machine.
pub const STATE_FILE: &str = "vm.state";

/// What a template was made from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TemplateMeta {
    pub key: String,
    /// Random, per build: tells a template from a later one published under the same key.
    #[serde(default)]
    pub build: String,
    pub ram_mb: u32,
    pub cpus: u32,
    /// Digest of the asset files it boots (templates of other assets are swept away).
    pub assets: String,
    /// The empty ext4 base its disk layer is backed by (by real path): a template whose base
    /// is gone (its `CAPSEM_HOME` moved) is not used.
    #[serde(default)]
    pub base: PathBuf,
    pub created_at: u64,
    pub state_bytes: u64,
}

/// A published template, as found: its directory, its build id (so that taking it out of use
/// never hits a newer template published under the same key meanwhile), and the handle on the
/// directory its description was read through, which [`take`] links from (so a template
/// replaced meanwhile can never pair one build's description, disk and RAM with another's).
#[derive(Debug, Clone)]
pub struct Template {
    pub dir: PathBuf,
    build: String,
    handle: std::sync::Arc<std::fs::File>,
}

impl Template {
    /// Open the template in `dir`; `None` when it has no readable description.
    fn open(dir: PathBuf) -> Option<(Template, TemplateMeta)> {
        let handle = std::fs::File::open(&dir).ok()?;
        let meta = read_meta(&crate::paths::via_fd(&handle, ""))?;
        let t = Template {
            dir,
            build: meta.build.clone(),
            handle: std::sync::Arc::new(handle),
        };
        Some((t, meta))
    }

    /// `name` in this template, through its handle.
    fn file(&self, name: &str) -> PathBuf {
        crate::paths::via_fd(&*self.handle, name)
    }

    /// Whether it has its files and its base.
    fn is_usable(&self, meta: &TemplateMeta) -> bool {
        self.file(STATE_FILE).is_file()
            && self.file(crate::disk::FIRST).is_file()
            && meta.base.is_file()
    }
}

/// What a session took from a template: its disk top, and the saved machine to load (the
/// session's own link to the template's state; across filesystems, the template's file as this
/// process holds it open, `/proc/<pid>/fd/<n>`, valid while `held` is).
#[derive(Debug)]
pub struct Taken {
    pub top: PathBuf,
    pub state: PathBuf,
    pub held: Option<std::fs::File>,
}

/// The session's link to the template's saved machine (removed once loaded).
pub const TAKEN_STATE: &str = "warm.state";

/// Whether warm starts are allowed in this process (see [`WARM_ENV`]).
pub fn enabled() -> bool {
    std::env::var(WARM_ENV).map_or(true, |v| v != "0")
}

/// Where the templates of `assets` live.
pub fn root(assets: &Assets) -> PathBuf {
    assets.dir.join("warm")
}

/// Digest of the asset files (their recorded sha256s).
pub fn assets_digest(assets: &Assets) -> String {
    let mut h = Sha256::new();
    for (name, entry) in &assets.manifest.files {
        h.update(name.as_bytes());
        h.update(b"=");
        h.update(entry.sha256.as_bytes());
        h.update(b"\n");
    }
    hex::encode(h.finalize())
}

/// The launch description a template is made with; the per-session paths (disk, sockets,
/// console log) are placeholders for the caller to fill in.
pub fn template_spec(assets: &Assets, ram_mb: u32, cpus: u32, cmdline_extra: &[String]) -> VmSpec {
    let p = |n: &str| PathBuf::from(format!("/capsem-warm/{n}"));
    VmSpec {
        kernel: assets.kernel.clone(),
        initrd: assets.initrd.clone(),
        rootfs: assets.rootfs.clone(),
        disk: p("disk"),
        ram_mb,
        cpus,
        socket_dir: p("sockets"),
        serial_log: p("serial"),
        hostname: "capsem".into(),
        cmdline_extra: cmdline_extra.to_vec(),
        incoming: None,
    }
}

/// The key of the template for this configuration.
pub fn key(
    assets: &Assets,
    hv: &dyn Hypervisor,
    ram_mb: u32,
    cpus: u32,
    cmdline_extra: &[String],
) -> String {
    // Every path is a placeholder: the asset files count by their digests (a home whose
    // `assets` is a link to another's shares its templates), the rest is per session.
    let mut spec = template_spec(assets, ram_mb, cpus, cmdline_extra);
    spec.kernel = "/capsem-warm/kernel".into();
    spec.initrd = "/capsem-warm/initrd".into();
    spec.rootfs = "/capsem-warm/rootfs".into();
    let mut h = Sha256::new();
    h.update(assets_digest(assets).as_bytes());
    h.update(b"\n");
    h.update(hv.fingerprint(&spec).as_bytes());
    let digest = hex::encode(h.finalize());
    format!("{ram_mb}m{cpus}c-{}", &digest[..16])
}

/// The published template with `key`, if there is a complete and usable one.
pub fn find(assets: &Assets, key: &str) -> Option<Template> {
    let (t, meta) = Template::open(root(assets).join(key))?;
    t.is_usable(&meta).then_some(t)
}

fn read_meta(dir: &Path) -> Option<TemplateMeta> {
    serde_json::from_slice(&std::fs::read(dir.join(META_FILE)).ok()?).ok()
}

/// The descriptions of the templates of `assets` that [`find`] would use.
pub fn usable(assets: &Assets) -> Vec<TemplateMeta> {
    list(assets)
        .into_iter()
        .filter(|(t, m)| t.is_usable(m))
        .map(|(_, m)| m)
        .collect()
}

/// Remove the template directory of `key` if it is there but not usable (see [`find`]), so a
/// new build can take its place.
pub fn clear_unusable(assets: &Assets, key: &str) {
    let dir = root(assets).join(key);
    if dir.is_dir() && find(assets, key).is_none() {
        remove_aside(&dir);
    }
}

/// Every published template of `assets`, with its description.
pub fn list(assets: &Assets) -> Vec<(Template, TemplateMeta)> {
    let Ok(entries) = std::fs::read_dir(root(assets)) else {
        return Vec::new();
    };
    let mut v: Vec<_> = entries
        .flatten()
        .filter_map(|e| {
            // Staging (`.partial-`) and discarded (`.discarded-`) directories are no templates.
            if e.file_name().to_string_lossy().contains('.') {
                return None;
            }
            Template::open(e.path())
        })
        .collect();
    v.sort_by(|a, b| a.1.key.cmp(&b.1.key));
    v
}

/// Give session directory `dir` what it needs from the template: its disk layer 0 and its
/// saved machine, both linked from the handle its description was read through (so a template
/// replaced meanwhile can never pair one build's disk with another's RAM, or with the build id
/// a discard goes by), then a new empty top over layer 0. Across filesystems layer 0 is copied
/// and the state is opened through the same handle and held.
pub fn take(t: &Template, dir: &Path, hv: &dyn Hypervisor) -> Result<Taken, WarmError> {
    use std::os::fd::AsRawFd;
    let io = |p: &Path, e: io::Error| WarmError::Io(p.to_path_buf(), e);
    let handle = &*t.handle;
    let link = |name: &str, to: &Path| {
        nix::unistd::linkat(
            Some(handle.as_raw_fd()),
            Path::new(name),
            None,
            to,
            nix::fcntl::AtFlags::empty(),
        )
        .map_err(io::Error::from)
    };
    let first = dir.join(crate::disk::FIRST);
    match link(crate::disk::FIRST, &first) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            std::fs::copy(t.file(crate::disk::FIRST), &first).map_err(|e| io(&first, e))?;
        }
        Err(e) => return Err(io(&first, e)),
    }
    let own = dir.join(TAKEN_STATE);
    let (state, held) = match link(STATE_FILE, &own) {
        Ok(()) => (own, None),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            match std::fs::File::open(t.file(STATE_FILE)) {
                Ok(f) => {
                    let path = format!("/proc/{}/fd/{}", std::process::id(), f.as_raw_fd());
                    (PathBuf::from(path), Some(f))
                }
                Err(e) => {
                    drop_taken(dir);
                    return Err(io(&t.dir.join(STATE_FILE), e));
                }
            }
        }
        Err(e) => {
            drop_taken(dir);
            return Err(io(&own, e));
        }
    };
    let top = dir.join(crate::disk::layer_name(1));
    if let Err(e) = hv.create_disk(&first, &top) {
        drop_taken(dir);
        return Err(e.into());
    }
    Ok(Taken { top, state, held })
}

/// Undo [`take`] in `dir` (the restore failed; the session boots cold instead).
pub fn drop_taken(dir: &Path) {
    for n in [1, 0] {
        let _ = std::fs::remove_file(dir.join(crate::disk::layer_name(n)));
    }
    let _ = std::fs::remove_file(dir.join(TAKEN_STATE));
}

/// Take a template out of use (its saved machine did not load, or a newer one replaces it):
/// later sessions boot cold until one is built again. Sessions already restored from it keep
/// their own links. A directory that is no longer the one `t` was found as (a newer build took
/// its place) is left alone. Each removal is noted, with `why`, in `warm/discarded.log`, so
/// that "why do my sessions boot cold" has an answer.
pub fn discard(t: &Template, why: &str) {
    if read_meta(&t.dir).is_some_and(|m| m.build == t.build) {
        remove_aside(&t.dir);
        let key = t.dir.file_name().unwrap_or_default().to_string_lossy();
        let line = format!(
            "{} {key} ({}): {}\n",
            crate::image::rfc3339_utc(std::time::SystemTime::now()),
            t.build,
            why.replace('\n', " ")
        );
        let log = t.dir.with_file_name(DISCARD_LOG);
        if let Err(e) = crate::paths::private_log(&log).and_then(|mut f| {
            use std::io::Write;
            f.write_all(line.as_bytes())
        }) {
            tracing::warn!(log = %log.display(), error = %e, "cannot note a discarded template");
        }
    }
}

/// The last line of `assets`' `warm/discarded.log`: when, which and why the last template was
/// taken out of use (`status` shows it).
pub fn last_discard(assets: &Assets) -> Option<String> {
    let line = crate::paths::tail_of(&root(assets).join(DISCARD_LOG), 1);
    (!line.is_empty()).then_some(line)
}

/// Rename `dir` aside (atomic for its readers), then remove it.
fn remove_aside(dir: &Path) {
    let aside = dir.with_extension(format!("discarded-{}", std::process::id()));
    if std::fs::rename(dir, &aside).is_ok() {
        let _ = std::fs::remove_dir_all(&aside);
    }
}

/// Publish the template built in `staging` as `key`. When another process published the same
/// key first, ours is dropped and theirs kept. Templates of other assets are removed.
pub fn publish(
    assets: &Assets,
    staging: &Path,
    meta: &TemplateMeta,
) -> Result<Template, WarmError> {
    let json = serde_json::to_vec_pretty(meta).expect("template meta serializes");
    let meta_path = staging.join(META_FILE);
    crate::paths::write_private(&meta_path, &json).map_err(|e| WarmError::Io(meta_path, e))?;
    let dir = root(assets).join(&meta.key);
    match std::fs::rename(staging, &dir) {
        Ok(()) => {}
        Err(e)
            if dir.is_dir() && matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST)) =>
        {
            let _ = std::fs::remove_dir_all(staging);
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(staging);
            return Err(WarmError::Io(dir, e));
        }
    }
    sweep(assets, meta);
    find(assets, &meta.key).ok_or_else(|| {
        WarmError::Io(
            dir,
            io::Error::new(
                io::ErrorKind::NotFound,
                "the published template is not usable",
            ),
        )
    })
}

/// Remove what `current` replaces: templates made from other assets, and templates of the
/// same size under another key (made with another QEMU or kernel command line).
fn sweep(assets: &Assets, current: &TemplateMeta) {
    for (t, meta) in list(assets) {
        let same_size = (meta.ram_mb, meta.cpus) == (current.ram_mb, current.cpus);
        if meta.assets != current.assets {
            discard(&t, "made from other guest assets");
        } else if same_size && meta.key != current.key {
            discard(&t, &format!("replaced by {}", current.key));
        }
    }
    sweep_leftovers(assets);
}

/// Remove the staging and discarded directories of processes that are gone (a build killed at
/// its time limit, a removal cut short).
pub fn sweep_leftovers(assets: &Assets) {
    let Ok(entries) = std::fs::read_dir(root(assets)) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = [".partial-", ".discarded-"]
            .iter()
            .find_map(|m| name.rsplit_once(m).map(|(_, p)| p))
        else {
            continue;
        };
        let alive = pid
            .parse::<i32>()
            .is_ok_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A private staging directory for a template build of `key` by this process (leftovers of
/// earlier builds, and an unusable template of this key, are cleared first).
pub fn staging_dir(assets: &Assets, key: &str) -> Result<PathBuf, WarmError> {
    let root = root(assets);
    crate::paths::private_dir(&root).map_err(|e| WarmError::Io(root.clone(), e))?;
    sweep_leftovers(assets);
    clear_unusable(assets, key);
    let dir = root.join(format!("{key}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    crate::paths::private_dir(&dir).map_err(|e| WarmError::Io(dir.clone(), e))?;
    Ok(dir)
}

#[derive(Debug, thiserror::Error)]
pub enum WarmError {
    #[error("{0}")]
    Io(PathBuf, #[source] io::Error),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{FileEntry, Manifest};

    struct FakeHv;
    impl Hypervisor for FakeHv {
        fn name(&self) -> &'static str {
            "fake"
        }
        fn accel(&self) -> crate::hypervisor::Accel {
            crate::hypervisor::Accel::Tcg
        }
        fn create_disk(&self, backing: &Path, disk: &Path) -> Result<(), HypervisorError> {
            std::fs::write(disk, format!("over {}", backing.display())).unwrap();
            Ok(())
        }
        fn launch(&self, _: &VmSpec) -> Result<crate::hypervisor::RunningVm, HypervisorError> {
            unreachable!("no VM in unit tests")
        }
        fn fingerprint(&self, spec: &VmSpec) -> String {
            format!("{spec:?}")
        }
    }

    fn assets(dir: &Path, initrd_sha: &str) -> Assets {
        let entry = |sha: &str| FileEntry {
            sha256: sha.into(),
            size: 1,
            digest: Default::default(),
            mtime_ns: 0,
            inputs_digest: String::new(),
        };
        Assets {
            dir: dir.to_path_buf(),
            kernel: dir.join("kernel"),
            initrd: dir.join("initrd.img"),
            rootfs: dir.join("rootfs.squashfs"),
            base_disk: dir.join("disk-base.ext4"),
            manifest: Manifest {
                version: "0".into(),
                format: 1,
                kernel_release: String::new(),
                kernel_package: String::new(),
                kernel_package_version: String::new(),
                kernel_deb_sha256: String::new(),
                modules: vec![],
                suite: String::new(),
                packages: vec![],
                built_at: String::new(),
                inputs_digest: String::new(),
                files: [
                    ("kernel".to_string(), entry("k")),
                    ("initrd.img".to_string(), entry(initrd_sha)),
                ]
                .into_iter()
                .collect(),
            },
        }
    }

    #[test]
    fn the_key_covers_everything_the_saved_machine_depends_on() {
        let d = tempfile::tempdir().unwrap();
        let a = assets(d.path(), "i1");
        let k = key(&a, &FakeHv, 4096, 2, &[]);
        assert!(k.starts_with("4096m2c-"), "{k}");
        assert_eq!(k, key(&a, &FakeHv, 4096, 2, &[]));
        let elsewhere = tempfile::tempdir().unwrap();
        assert_eq!(
            k,
            key(&assets(elsewhere.path(), "i1"), &FakeHv, 4096, 2, &[])
        );
        for other in [
            key(&a, &FakeHv, 1024, 2, &[]),
            key(&a, &FakeHv, 4096, 1, &[]),
            key(&a, &FakeHv, 4096, 2, &["capsem.trace=1".into()]),
            key(&assets(d.path(), "i2"), &FakeHv, 4096, 2, &[]),
        ] {
            assert_ne!(k, other);
        }
    }

    fn meta(a: &Assets, key: &str) -> TemplateMeta {
        std::fs::write(&a.base_disk, "base").unwrap();
        TemplateMeta {
            key: key.into(),
            ram_mb: 4096,
            cpus: 2,
            assets: assets_digest(a),
            base: a.base_disk.clone(),
            build: format!("{:x}", rand::random::<u64>()),
            created_at: 0,
            state_bytes: 1,
        }
    }

    fn build(a: &Assets, key: &str) -> PathBuf {
        let staging = staging_dir(a, key).unwrap();
        std::fs::write(staging.join(crate::disk::FIRST), "layer 0").unwrap();
        std::fs::write(staging.join(STATE_FILE), "ram").unwrap();
        staging
    }

    #[test]
    fn publish_find_take_and_discard() {
        let d = tempfile::tempdir().unwrap();
        let a = assets(d.path(), "i1");
        assert!(find(&a, "k1").is_none());
        let staging = build(&a, "k1");
        let t = publish(&a, &staging, &meta(&a, "k1")).unwrap();
        assert!(!staging.exists());
        assert!(find(&a, "k1").is_some());
        // A second build of the same key keeps the first.
        let again = build(&a, "k1");
        publish(&a, &again, &meta(&a, "k1")).unwrap();
        assert!(!again.exists());
        assert_eq!(list(&a).len(), 1);

        let session = d.path().join("session");
        std::fs::create_dir(&session).unwrap();
        let taken = take(&t, &session, &FakeHv).unwrap();
        assert_eq!(taken.top, session.join("disk.1.qcow2"));
        assert_eq!(taken.state, session.join(TAKEN_STATE));
        assert_eq!(
            std::fs::read_to_string(session.join("disk.qcow2")).unwrap(),
            "layer 0"
        );
        assert_eq!(std::fs::read_to_string(&taken.state).unwrap(), "ram");
        assert_eq!(crate::disk::top(&session).unwrap(), Some(1));
        // The session keeps its disk and state when the template goes.
        discard(&t, "a test");
        assert!(find(&a, "k1").is_none());
        let log = std::fs::read_to_string(root(&a).join(DISCARD_LOG)).unwrap();
        assert!(
            log.contains(" k1 (") && log.ends_with(": a test\n"),
            "{log}"
        );
        assert_eq!(last_discard(&a).as_deref(), Some(log.trim_end()));
        assert!(session.join("disk.qcow2").is_file());
        assert!(taken.state.is_file());
        drop_taken(&session);
        assert_eq!(crate::disk::top(&session).unwrap(), None);
        assert!(!taken.state.exists());
    }

    #[test]
    fn a_stale_handle_never_discards_a_newer_template_and_a_lost_base_is_unusable() {
        let d = tempfile::tempdir().unwrap();
        let a = assets(d.path(), "i1");
        let old = publish(&a, &build(&a, "k"), &meta(&a, "k")).unwrap();
        discard(&old, "a test");
        let new = publish(&a, &build(&a, "k"), &meta(&a, "k")).unwrap();
        discard(&old, "a test");
        assert!(find(&a, "k").is_some(), "a newer template was discarded");
        // Nor is a newer template taken under the old one's build id.
        let session = d.path().join("session");
        std::fs::create_dir(&session).unwrap();
        assert!(take(&old, &session, &FakeHv).is_err());
        assert_eq!(crate::disk::top(&session).unwrap(), None);
        // Across filesystems (a tmpfs session directory): layer 0 is copied, and the saved
        // machine is the template's own file, held open by this process.
        let other = tempfile::tempdir_in("/dev/shm").unwrap();
        let taken = take(&new, other.path(), &FakeHv).unwrap();
        let held = taken.held.as_ref().expect("held across filesystems");
        assert!(taken
            .state
            .starts_with(format!("/proc/{}/fd/", std::process::id())));
        assert_eq!(std::fs::read_to_string(&taken.state).unwrap(), "ram");
        assert!(held.metadata().unwrap().is_file());
        assert_eq!(
            std::fs::read_to_string(other.path().join(crate::disk::FIRST)).unwrap(),
            "layer 0"
        );
        // Its base gone (CAPSEM_HOME moved): not used, and cleared for a new build.
        std::fs::remove_file(&a.base_disk).unwrap();
        assert!(find(&a, "k").is_none());
        assert!(new.dir.is_dir());
        clear_unusable(&a, "k");
        assert!(!new.dir.exists());
    }

    #[test]
    fn publishing_sweeps_templates_of_other_assets_and_dead_builds() {
        let d = tempfile::tempdir().unwrap();
        let old = assets(d.path(), "i1");
        let staging = build(&old, "old");
        publish(&old, &staging, &meta(&old, "old")).unwrap();
        let dead = root(&old).join("x.partial-999999999");
        std::fs::create_dir_all(&dead).unwrap();
        let new = assets(d.path(), "i2");
        let staging = build(&new, "new");
        publish(&new, &staging, &meta(&new, "new")).unwrap();
        let keys: Vec<_> = list(&new).into_iter().map(|(_, m)| m.key).collect();
        assert_eq!(keys, ["new"]);
        // Another size stays; the same size under a new key replaces the old.
        let mut small = meta(&new, "small");
        small.ram_mb = 1024;
        publish(&new, &build(&new, "small"), &small).unwrap();
        publish(&new, &build(&new, "newer"), &meta(&new, "newer")).unwrap();
        let keys: Vec<_> = list(&new).into_iter().map(|(_, m)| m.key).collect();
        assert_eq!(keys, ["newer", "small"]);
        assert!(!dead.exists());
    }
}
