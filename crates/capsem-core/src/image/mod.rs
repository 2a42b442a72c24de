//! Guest assets: building them from Debian packages on this host, and finding them for a VM.
//! The only module that writes under `<assets_root>`; it never starts a VM.
//!
//! ```text
//! <assets_root>/v<VERSION>/
//!     kernel           linux-image-cloud-amd64's current kernel, unpacked to an ELF
//!                      that boots via PVH where possible (kernel.rs, pvh.rs)
//!     initrd.img       cpio: capsem-agent as /init + the modules it loads         (initrd.rs)
//!     rootfs.squashfs  mmdebstrap of bookworm minbase + packages, lz4             (rootfs.rs)
//!     disk-base.ext4   16 GiB sparse empty ext4, backing file of session qcow2s   (disk.rs)
//!     manifest.json    what was built from what, with digests                     (manifest.rs)
//! <cache_dir>/debs/    downloaded kernel packages; unpacked trees live here only during a build
//! ```
//!
//! [`build`] is idempotent and incremental: each piece records the digest of its own inputs and
//! only stale pieces are rebuilt (see `manifest.rs`). Pieces are built into a staging directory
//! beside the version directory, unchanged pieces are hard-linked in, and the staging directory
//! atomically replaces the version directory at the end, so a failed or interrupted build leaves
//! the previous assets untouched. Host tools are found up front (`tools.rs`). [`load`] is what
//! the rest of capsem calls to find the assets of this version.

mod build;
mod disk;
mod error;
mod initrd;
mod kernel;
mod manifest;
pub mod pvh;
mod rootfs;
mod tools;

#[cfg(test)]
mod tests;

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

pub use build::build;
pub use disk::{BASE_DISK_LABEL, BASE_DISK_SIZE};
pub use error::ImageError;
pub use initrd::{INITRD_DIRS, MODULE_ORDER_FILE};
pub use kernel::{KernelPackage, INITRD_MODULES, KERNEL_META_PACKAGE};
pub(crate) use manifest::rfc3339_utc;
pub use manifest::{
    sha256_file, sparse_blocks_sha256, DigestKind, FileEntry, Manifest, BUILDER_FORMAT,
    MANIFEST_FILE,
};
pub use rootfs::{
    default_packages, DEFAULT_PACKAGES, GUEST_HOSTNAME, RESOLV_CONF_PLACEHOLDER, SUITE,
};
pub use tools::{default_search_path, find_tool, HostTools, HOST_TOOLS};

/// The asset version: capsem-core's own version, so a new capsem gets assets built for it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// File names in the version directory.
pub const KERNEL: &str = "kernel";
pub const INITRD: &str = "initrd.img";
pub const ROOTFS: &str = "rootfs.squashfs";
pub const BASE_DISK: &str = "disk-base.ext4";

/// Step names passed to [`BuildProgress`], in the order they run (skipped when up to date).
pub const STEP_KERNEL: &str = "kernel";
pub const STEP_INITRD: &str = "initrd";
pub const STEP_ROOTFS: &str = "rootfs (mmdebstrap)";
pub const STEP_SQUASH: &str = "squash";
pub const STEP_BASE_DISK: &str = "base disk";
pub const STEP_MANIFEST: &str = "manifest";

/// Where a build reports what it is doing; the CLI draws progress bars from it.
pub trait BuildProgress {
    /// Step `index` (0-based) of `total` starts: show it as `index + 1`/`total`. Only the steps
    /// this build runs are counted.
    fn step(&self, index: usize, total: usize, name: &str);
    /// A line of activity within the current step (e.g. mmdebstrap's and mksquashfs's output).
    fn detail(&self, text: &str);
    /// Step `name` finished after `secs` seconds.
    fn done(&self, name: &str, secs: f64);
}

/// A [`BuildProgress`] that shows nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl BuildProgress for NoProgress {
    fn step(&self, _index: usize, _total: usize, _name: &str) {}
    fn detail(&self, _text: &str) {}
    fn done(&self, _name: &str, _secs: f64) {}
}

/// What [`build`] builds, and where.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Normally `$CAPSEM_HOME/assets`; the assets go to [`version_dir`] of it.
    pub assets_root: PathBuf,
    /// Normally `$CAPSEM_HOME/cache`: downloaded packages and, during a build, unpacked trees.
    pub cache_dir: PathBuf,
    /// The capsem-agent binary (static, musl) that becomes the initrd's `/init`.
    pub agent_bin: PathBuf,
    /// Debian packages added to the minbase rootfs ([`DEFAULT_PACKAGES`] by default).
    pub packages: Vec<String>,
    /// Rebuild every piece even if it is up to date. Sessions whose qcow2 sits on the old base
    /// disk cannot survive a new one: only force when no session is kept.
    pub force: bool,
    /// Check up-to-date pieces by their digests rather than by size and mtime (~0.1 s per
    /// 100 MB in a release build; debug builds hash ~50x slower).
    pub verify: bool,
    /// Where to look for the host tools; `None` = [`default_search_path`] (`$PATH` + sbin dirs).
    pub tool_path: Option<OsString>,
}

impl BuildOptions {
    /// Options with the default package list, no force, no verify, the default tool path.
    pub fn new(
        assets_root: impl Into<PathBuf>,
        cache_dir: impl Into<PathBuf>,
        agent_bin: impl Into<PathBuf>,
    ) -> BuildOptions {
        BuildOptions {
            assets_root: assets_root.into(),
            cache_dir: cache_dir.into(),
            agent_bin: agent_bin.into(),
            packages: default_packages(),
            force: false,
            verify: false,
            tool_path: None,
        }
    }
}

/// What [`build`] did.
#[derive(Debug, Clone)]
pub struct BuildOutcome {
    /// The assets now in place.
    pub assets: Assets,
    /// File names of the pieces rebuilt ([`KERNEL`], …; `manifest.json` alone when only the
    /// manifest was rewritten). Empty = everything was up to date.
    pub rebuilt: Vec<&'static str>,
    /// Wall time of the whole call.
    pub secs: f64,
}

impl BuildOutcome {
    pub fn up_to_date(&self) -> bool {
        self.rebuilt.is_empty()
    }
}

/// The guest assets of this version, as found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assets {
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub rootfs: PathBuf,
    pub base_disk: PathBuf,
    pub manifest: Manifest,
}

/// `<assets_root>/v<VERSION>`.
pub fn version_dir(assets_root: &Path) -> PathBuf {
    assets_root.join(format!("v{VERSION}"))
}

/// Finds this version's assets: the manifest must parse and be for [`VERSION`], and every file
/// it lists must exist with the recorded size (cheap; [`verify`] checks the digests).
/// [`ImageError::Missing`] when the directory, manifest or a file is absent.
pub fn load(assets_root: &Path) -> Result<Assets, ImageError> {
    let dir = version_dir(assets_root);
    let corrupt = |reason: String| ImageError::Corrupt {
        dir: dir.clone(),
        reason,
    };
    let manifest = match manifest::read(&dir) {
        Ok(manifest) => manifest,
        Err(ImageError::Manifest { source, .. }) => {
            return Err(corrupt(format!("{MANIFEST_FILE} is unreadable: {source}")))
        }
        Err(e) => return Err(e),
    };
    if manifest.version != VERSION {
        return Err(corrupt(format!(
            "{MANIFEST_FILE} is for version {}, not {VERSION}",
            manifest.version
        )));
    }
    for name in [KERNEL, INITRD, ROOTFS, BASE_DISK] {
        let entry = manifest
            .files
            .get(name)
            .ok_or_else(|| corrupt(format!("{MANIFEST_FILE} does not list {name}")))?;
        match fs::metadata(dir.join(name)) {
            Ok(meta) if meta.len() == entry.size => {}
            Ok(meta) => {
                return Err(corrupt(format!(
                    "{name} is {} bytes, the manifest says {}",
                    meta.len(),
                    entry.size
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ImageError::Missing { dir: dir.clone() })
            }
            Err(e) => return Err(error::io_err("inspect", &dir.join(name))(e)),
        }
    }
    Ok(Assets {
        kernel: dir.join(KERNEL),
        initrd: dir.join(INITRD),
        rootfs: dir.join(ROOTFS),
        base_disk: dir.join(BASE_DISK),
        dir,
        manifest,
    })
}

/// Checks every file's digest against the manifest (for `capsem doctor`; ~0.5 s in a release
/// build).
pub fn verify(assets: &Assets) -> Result<(), ImageError> {
    for (name, entry) in &assets.manifest.files {
        let path = assets.dir.join(name);
        let actual = entry
            .digest
            .compute(&path)
            .map_err(error::io_err("hash", &path))?;
        if actual != entry.sha256 {
            return Err(ImageError::Corrupt {
                dir: assets.dir.clone(),
                reason: format!("{name} does not match its digest in {MANIFEST_FILE}"),
            });
        }
    }
    Ok(())
}
