//! [`build`]: decides which pieces are stale, runs their steps in a staging directory beside the
//! version directory, and swaps the staging directory in atomically at the end. Owns the build
//! lock and the staging directory's life; the steps themselves live in their own files.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use super::error::io_err;
use super::kernel::{self, KernelPackage, KernelTree};
use super::manifest::{self, FileEntry, Inputs, Manifest, Piece, BUILDER_FORMAT};
use super::tools::{self, HostTools};
use super::{disk, initrd, load, rootfs, version_dir, BuildOptions, BuildOutcome};
use super::{BuildProgress, ImageError, MANIFEST_FILE, VERSION};
use super::{STEP_BASE_DISK, STEP_INITRD, STEP_KERNEL, STEP_MANIFEST, STEP_ROOTFS, STEP_SQUASH};

/// Builds whatever is stale in `<assets_root>/v<VERSION>` (everything with `force`) and returns
/// the assets. Blocking; a full build takes about two minutes, a no-op well under a second.
/// Concurrent builds of the same `assets_root` wait for each other.
pub fn build(
    opts: &BuildOptions,
    progress: &dyn BuildProgress,
) -> Result<BuildOutcome, ImageError> {
    let started = Instant::now();
    let packages = rootfs::normalize_packages(&opts.packages)?;
    let search_path = opts
        .tool_path
        .clone()
        .unwrap_or_else(tools::default_search_path);
    let agent_sha256 = agent_digest(&opts.agent_bin)?;
    for dir in [&opts.assets_root, &opts.cache_dir] {
        fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    }
    let _lock = build_lock(&opts.assets_root, progress)?;
    remove_leftovers(&opts.assets_root, &opts.cache_dir);

    let final_dir = version_dir(&opts.assets_root);
    let existing = match manifest::read(&final_dir) {
        Ok(manifest) => Some(manifest),
        Err(ImageError::Missing { .. }) => None,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring the existing manifest; rebuilding everything");
            None
        }
    };
    let kernel_pkg = resolve_kernel(&search_path, &opts.cache_dir, existing.as_ref(), progress)?;
    let mut deb_sha256 = known_deb_sha256(&opts.cache_dir, &kernel_pkg, existing.as_ref())?;
    let mut inputs = Inputs::compute(&agent_sha256, &kernel_pkg, deb_sha256.as_deref(), &packages);
    let mut stale = if opts.force {
        Piece::ALL.to_vec()
    } else {
        manifest::stale_pieces(&final_dir, existing.as_ref(), &inputs, opts.verify)
    };
    let manifest_current = existing
        .as_ref()
        .is_some_and(|m| m.inputs_digest == inputs.all);
    if stale.is_empty() && manifest_current {
        progress.detail("guest assets are up to date");
        return Ok(BuildOutcome {
            assets: load(&opts.assets_root)?,
            rebuilt: Vec::new(),
            secs: started.elapsed().as_secs_f64(),
        });
    }

    let tools = HostTools::find(&search_path)?;
    if stale.contains(&Piece::Rootfs) && !nix::unistd::geteuid().is_root() {
        return Err(ImageError::NotRoot);
    }
    tracing::info!(?stale, force = opts.force, "building guest assets");

    let staging = Staging::create(&opts.assets_root)?;
    let mut files: BTreeMap<String, FileEntry> = BTreeMap::new();
    for piece in Piece::ALL {
        if stale.contains(&piece) {
            continue;
        }
        let (Some(entry), Ok(())) = (
            existing.as_ref().and_then(|m| m.files.get(piece.file())),
            fs::hard_link(
                final_dir.join(piece.file()),
                staging.path.join(piece.file()),
            ),
        ) else {
            stale.push(piece);
            continue;
        };
        files.insert(piece.file().to_string(), entry.clone());
    }
    stale.sort();
    stale.dedup();

    let needs_kernel_tree = stale.contains(&Piece::Kernel) || stale.contains(&Piece::Initrd);
    let mut steps = Steps::new(progress);
    if needs_kernel_tree {
        steps.plan(STEP_KERNEL);
    }
    if stale.contains(&Piece::Initrd) {
        steps.plan(STEP_INITRD);
    }
    if stale.contains(&Piece::Rootfs) {
        steps.plan(STEP_ROOTFS);
        steps.plan(STEP_SQUASH);
    }
    if stale.contains(&Piece::Disk) {
        steps.plan(STEP_BASE_DISK);
    }
    steps.plan(STEP_MANIFEST);

    let mut modules = existing
        .as_ref()
        .map(|m| m.modules.clone())
        .unwrap_or_default();
    if needs_kernel_tree {
        steps.begin(STEP_KERNEL);
        let deb = kernel::fetch(&tools, &opts.cache_dir, &kernel_pkg, progress)?;
        let actual = kernel::deb_sha256(&deb)?;
        if deb_sha256.as_deref() != Some(actual.as_str()) {
            // Not the package the kept vmlinuz came from: rebuild it with the modules.
            deb_sha256 = Some(actual);
            inputs = Inputs::compute(&agent_sha256, &kernel_pkg, deb_sha256.as_deref(), &packages);
            if !stale.contains(&Piece::Kernel) {
                stale.push(Piece::Kernel);
                stale.sort();
            }
        }
        let tree = KernelTree::unpack(&tools, &deb, &opts.cache_dir, &kernel_pkg, progress)?;
        if stale.contains(&Piece::Kernel) {
            let out = staging.fresh(Piece::Kernel)?;
            let bzimage = fs::read(tree.vmlinuz()).map_err(io_err("read", &tree.vmlinuz()))?;
            let kernel = match super::pvh::vmlinux(&bzimage) {
                Ok(elf) => {
                    progress.detail("unpacked to an ELF that boots via PVH");
                    elf
                }
                Err(why) => {
                    progress.detail(&format!("booting the compressed bzImage: {why}"));
                    bzimage
                }
            };
            fs::write(&out, kernel).map_err(io_err("write the kernel to", &out))?;
            File::open(&out)
                .and_then(|f| f.sync_all())
                .map_err(io_err("sync", &out))?;
            staging.record(&mut files, Piece::Kernel, &inputs)?;
        }
        steps.end();

        if stale.contains(&Piece::Initrd) {
            steps.begin(STEP_INITRD);
            let order = tree.initrd_modules()?;
            progress.detail(&format!(
                "{} modules, agent {}",
                order.len(),
                opts.agent_bin.display()
            ));
            let out = staging.fresh(Piece::Initrd)?;
            initrd::write(&out, &opts.agent_bin, tree.modules_dir(), &order)?;
            modules = order.into_iter().map(|m| m.file_name).collect();
            staging.record(&mut files, Piece::Initrd, &inputs)?;
            steps.end();
        }
    }

    if stale.contains(&Piece::Rootfs) {
        steps.begin(STEP_ROOTFS);
        let tree = rootfs::bootstrap(&tools, &opts.cache_dir, &packages, progress)?;
        rootfs::customize(tree.path())?;
        steps.end();

        steps.begin(STEP_SQUASH);
        let out = staging.fresh(Piece::Rootfs)?;
        rootfs::squash(&tools, tree.path(), &out, progress)?;
        progress.detail("removing the unpacked tree");
        drop(tree);
        progress.detail("syncing and hashing rootfs.squashfs");
        File::open(&out)
            .and_then(|f| f.sync_all())
            .map_err(io_err("sync", &out))?;
        staging.record(&mut files, Piece::Rootfs, &inputs)?;
        steps.end();
    }

    if stale.contains(&Piece::Disk) {
        steps.begin(STEP_BASE_DISK);
        let out = staging.fresh(Piece::Disk)?;
        disk::make(&tools, &out, progress)?;
        staging.record(&mut files, Piece::Disk, &inputs)?;
        steps.end();
    }

    steps.begin(STEP_MANIFEST);
    let manifest = Manifest {
        version: VERSION.to_string(),
        format: BUILDER_FORMAT,
        kernel_release: kernel_pkg.release().to_string(),
        kernel_package: kernel_pkg.name.clone(),
        kernel_package_version: kernel_pkg.version.clone(),
        kernel_deb_sha256: deb_sha256.unwrap_or_default(),
        modules,
        suite: rootfs::SUITE.to_string(),
        packages,
        built_at: manifest::rfc3339_utc(SystemTime::now()),
        inputs_digest: inputs.all.clone(),
        files,
    };
    manifest::write(&staging.path, &manifest)?;
    staging.commit(&final_dir)?;
    steps.end();

    let mut rebuilt: Vec<&'static str> = stale.iter().map(|p| p.file()).collect();
    if rebuilt.is_empty() {
        rebuilt.push(MANIFEST_FILE);
    }
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(?rebuilt, secs, "guest assets built");
    Ok(BuildOutcome {
        assets: load(&opts.assets_root)?,
        rebuilt,
        secs,
    })
}

fn agent_digest(agent: &Path) -> Result<String, ImageError> {
    let agent_err = |source| ImageError::Agent {
        path: agent.to_path_buf(),
        source,
    };
    let meta = fs::metadata(agent).map_err(agent_err)?;
    if !meta.is_file() {
        return Err(agent_err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    manifest::sha256_file(agent).map_err(agent_err)
}

/// The kernel apt points to now; the recorded one when apt cannot say (offline, no lists).
fn resolve_kernel(
    search_path: &std::ffi::OsStr,
    cache_dir: &Path,
    existing: Option<&Manifest>,
    progress: &dyn BuildProgress,
) -> Result<KernelPackage, ImageError> {
    let apt_cache = tools::find_tool("apt-cache", search_path);
    match kernel::resolve(apt_cache.as_deref(), cache_dir) {
        Ok(pkg) => Ok(pkg),
        Err(e) => match existing.filter(|m| !m.kernel_package.is_empty()) {
            Some(m) => {
                tracing::warn!(error = %e, "keeping the kernel recorded in the manifest");
                progress.detail(&format!(
                    "apt metadata unavailable; keeping kernel {} {}",
                    m.kernel_package, m.kernel_package_version
                ));
                Ok(KernelPackage {
                    name: m.kernel_package.clone(),
                    version: m.kernel_package_version.clone(),
                })
            }
            None => {
                // No apt-cache at all is better explained by the missing-tools error.
                HostTools::find(search_path)?;
                Err(e)
            }
        },
    }
}

/// The kernel `.deb`'s digest if we know it without downloading: from the cache, else from a
/// manifest built from the same package version.
fn known_deb_sha256(
    cache_dir: &Path,
    pkg: &KernelPackage,
    existing: Option<&Manifest>,
) -> Result<Option<String>, ImageError> {
    let deb = kernel::deb_path(cache_dir, pkg);
    if deb.is_file() {
        return kernel::deb_sha256(&deb).map(Some);
    }
    Ok(existing
        .filter(|m| m.kernel_package == pkg.name && m.kernel_package_version == pkg.version)
        .map(|m| m.kernel_deb_sha256.clone())
        .filter(|sha| !sha.is_empty()))
}

/// Numbers the steps of this build and reports them.
struct Steps<'a> {
    progress: &'a dyn BuildProgress,
    planned: Vec<&'static str>,
    index: usize,
    current: Option<(&'static str, Instant)>,
}

impl<'a> Steps<'a> {
    fn new(progress: &'a dyn BuildProgress) -> Steps<'a> {
        Steps {
            progress,
            planned: Vec::new(),
            index: 0,
            current: None,
        }
    }

    fn plan(&mut self, name: &'static str) {
        self.planned.push(name);
    }

    fn begin(&mut self, name: &'static str) {
        tracing::info!(step = name, "image build step");
        self.progress.step(self.index, self.planned.len(), name);
        self.index += 1;
        self.current = Some((name, Instant::now()));
    }

    fn end(&mut self) {
        if let Some((name, started)) = self.current.take() {
            self.progress.done(name, started.elapsed().as_secs_f64());
        }
    }
}

/// Held for the whole build: the lock on `<assets_root>/.build.lock`.
fn build_lock(
    assets_root: &Path,
    progress: &dyn BuildProgress,
) -> Result<crate::paths::Lock, ImageError> {
    let path = assets_root.join(".build.lock");
    match crate::paths::try_lock(&path) {
        Ok(Some(lock)) => Ok(lock),
        Ok(None) => {
            progress.detail("waiting for another image build to finish");
            crate::paths::lock(&path).map_err(io_err("lock", &path))
        }
        Err(e) => Err(io_err("lock", &path)(e)),
    }
}

/// Staging directories are `.v<VERSION>.build-<pid>`; replaced ones become `.v<VERSION>.old-<pid>`.
fn staging_name(kind: &str) -> String {
    format!(".v{VERSION}.{kind}-{}", std::process::id())
}

/// Removes what interrupted builds left: staging and replaced directories beside the version
/// directory, and unpacked trees and partial downloads in the cache (we hold the lock, so none
/// of them is in use).
fn remove_leftovers(assets_root: &Path, cache_dir: &Path) {
    let leftovers = |dir: &Path, is_leftover: &dyn Fn(&str) -> bool| -> Vec<PathBuf> {
        fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| is_leftover(&e.file_name().to_string_lossy()))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut dirs = leftovers(assets_root, &|name| {
        name.starts_with(".v") && (name.contains(".build-") || name.contains(".old-"))
    });
    dirs.extend(leftovers(cache_dir, &|name| name.starts_with("kernel-")));
    dirs.extend(leftovers(&cache_dir.join("debs"), &|name| {
        name.starts_with(".download-")
    }));
    for dir in dirs {
        tracing::info!(dir = %dir.display(), "removing a leftover of an interrupted build");
        let _ = fs::remove_dir_all(dir);
    }
    // The rootfs tree may still have mmdebstrap's mounts in it: remove_tree detaches them first.
    if let Err(e) = rootfs::remove_tree(&cache_dir.join(rootfs::TREE_DIR)) {
        tracing::warn!(error = %e, "cannot remove a leftover root filesystem tree");
    }
}

/// The directory a build writes into; removed on drop unless committed.
struct Staging {
    path: PathBuf,
    committed: bool,
}

impl Staging {
    fn create(assets_root: &Path) -> Result<Staging, ImageError> {
        let path = assets_root.join(staging_name("build"));
        fs::create_dir(&path).map_err(io_err("create", &path))?;
        Ok(Staging {
            path,
            committed: false,
        })
    }

    /// The piece's path in staging, with whatever was there removed first: it may be a hard link
    /// to the live asset, which must never be written through.
    fn fresh(&self, piece: Piece) -> Result<PathBuf, ImageError> {
        let path = self.path.join(piece.file());
        match fs::remove_file(&path) {
            Ok(()) => Ok(path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(path),
            Err(e) => Err(io_err("remove", &path)(e)),
        }
    }

    fn record(
        &self,
        files: &mut BTreeMap<String, FileEntry>,
        piece: Piece,
        inputs: &Inputs,
    ) -> Result<(), ImageError> {
        let entry = FileEntry::of(
            &self.path.join(piece.file()),
            piece.digest_kind(),
            inputs.of(piece),
        )?;
        files.insert(piece.file().to_string(), entry);
        Ok(())
    }

    /// Puts the staging directory at `final_dir`: an atomic exchange when `final_dir` exists
    /// (the old contents are then removed with the staging path), a rename when it does not.
    fn commit(mut self, final_dir: &Path) -> Result<(), ImageError> {
        let exists = fs::symlink_metadata(final_dir).is_ok();
        if !exists {
            fs::rename(&self.path, final_dir)
                .map_err(io_err("move the new assets to", final_dir))?;
            self.committed = true;
        } else if exchange(&self.path, final_dir).is_err() {
            // No RENAME_EXCHANGE on this filesystem: two renames, with a moment without assets.
            let old = final_dir.with_file_name(staging_name("old"));
            fs::rename(final_dir, &old).map_err(io_err("move the old assets aside to", &old))?;
            if let Err(e) = fs::rename(&self.path, final_dir) {
                let _ = fs::rename(&old, final_dir);
                return Err(io_err("move the new assets to", final_dir)(e));
            }
            self.path = old;
        }
        if let Some(parent) = final_dir.parent() {
            let _ = File::open(parent).and_then(|d| d.sync_all());
        }
        Ok(())
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn exchange(a: &Path, b: &Path) -> nix::Result<()> {
    nix::fcntl::renameat2(None, a, None, b, nix::fcntl::RenameFlags::RENAME_EXCHANGE)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn exchange(_a: &Path, _b: &Path) -> nix::Result<()> {
    Err(nix::errno::Errno::ENOSYS)
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed && fs::symlink_metadata(&self.path).is_ok() {
            if let Err(e) = fs::remove_dir_all(&self.path) {
                tracing::warn!(dir = %self.path.display(), error = %e, "cannot remove staging directory");
            }
        }
    }
}
