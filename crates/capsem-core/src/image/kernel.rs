//! The guest kernel: which Debian package `linux-image-cloud-amd64` points to (from apt metadata),
//! fetching that `.deb` into the cache, unpacking it, running `depmod` on it, and reading
//! `modules.dep` into the load order of the modules the initrd needs. Writes nothing outside the
//! cache; building the initrd itself is `initrd.rs`'s job.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::error::io_err;
use super::manifest::sha256_file;
use super::tools::{self, HostTools};
use super::{BuildProgress, ImageError};

/// The Debian metapackage whose dependency names the kernel we ship.
pub const KERNEL_META_PACKAGE: &str = "linux-image-cloud-amd64";

/// Modules the initrd loads (with all their dependencies): the virtio-mmio transport, the disk and
/// console drivers, the root filesystem (squashfs + overlay) and the air-gap's `dummy0`.
pub const INITRD_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    "squashfs",
    "overlay",
    "dummy",
];

/// apt's binary package cache on a host that keeps one.
const HOST_PKGCACHE: &str = "/var/cache/apt/pkgcache.bin";

/// A versioned kernel image package, e.g. `linux-image-6.1.0-56-cloud-amd64` `6.1.192-2`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelPackage {
    pub name: String,
    pub version: String,
}

impl KernelPackage {
    /// The kernel release (`uname -r`), which Debian puts in the package name.
    pub fn release(&self) -> &str {
        self.name.strip_prefix("linux-image-").unwrap_or(&self.name)
    }

    /// The file name `apt-get download` gives the package (an epoch's ':' becomes "%3a").
    fn deb_file_name(&self) -> String {
        format!(
            "{}_{}_amd64.deb",
            self.name,
            self.version.replace(':', "%3a")
        )
    }
}

/// Asks apt which kernel package the metapackage's candidate version depends on.
///
/// Where the host keeps no binary package cache (Debian's Docker images set
/// `Dir::Cache::pkgcache ""`), every `apt-cache` call re-parses all package lists (~1.3 s here);
/// we then keep apt's cache in `cache_dir` (~40 MB), which apt revalidates against the lists
/// itself, and a no-op build stays fast (~0.3 s).
pub(crate) fn resolve(
    apt_cache: Option<&Path>,
    cache_dir: &Path,
) -> Result<KernelPackage, ImageError> {
    let fail = |reason: String| ImageError::KernelResolve {
        package: KERNEL_META_PACKAGE,
        reason,
    };
    let apt_cache = apt_cache.ok_or_else(|| fail("apt-cache is not installed".into()))?;
    let private_cache = (!Path::new(HOST_PKGCACHE).exists()).then(|| {
        format!(
            "Dir::Cache::pkgcache={}",
            cache_dir.join("apt-pkgcache.bin").display()
        )
    });
    let show = |package: &str| {
        let mut cmd = Command::new(apt_cache);
        if let Some(option) = &private_cache {
            cmd.args(["-o", option]);
        }
        cmd.args(["show", "--no-all-versions", package])
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| fail(format!("cannot run apt-cache: {e}")))
    };
    let out = show(KERNEL_META_PACKAGE)?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || text.trim().is_empty() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(fail(format!("apt-cache show: {}", stderr.trim())));
    }
    let (name, version) = parse_meta_depends(&text)
        .ok_or_else(|| fail("its Depends names no linux-image package".into()))?;
    let version = match version {
        Some(version) => version,
        None => {
            let out = show(&name)?;
            field(&String::from_utf8_lossy(&out.stdout), "Version")
                .ok_or_else(|| fail(format!("apt-cache shows no version of {name}")))?
        }
    };
    Ok(KernelPackage { name, version })
}

/// The first `linux-image-*` package in the `Depends:` field of an `apt-cache show` stanza, with
/// its `(= version)` when pinned.
pub(crate) fn parse_meta_depends(stanza: &str) -> Option<(String, Option<String>)> {
    let depends = field(stanza, "Depends")?;
    depends
        .split([',', '|'])
        .map(str::trim)
        .find(|dep| dep.starts_with("linux-image-"))
        .map(|dep| {
            let (name, rest) = dep.split_once(' ').unwrap_or((dep, ""));
            let version = rest
                .trim()
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .and_then(|r| r.trim().strip_prefix('='))
                .map(|v| v.trim().to_string());
            (name.to_string(), version)
        })
}

/// The value of `Name:` in the first stanza of deb822 text.
fn field(stanza: &str, name: &str) -> Option<String> {
    stanza
        .lines()
        .take_while(|line| !line.trim().is_empty())
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .map(|value| value.trim().to_string())
}

/// Where the package's `.deb` is (or will be) in the cache.
pub(crate) fn deb_path(cache_dir: &Path, pkg: &KernelPackage) -> PathBuf {
    cache_dir.join("debs").join(pkg.deb_file_name())
}

/// SHA-256 of a cached `.deb`, remembered in `<deb>.sha256` beside it (with its size and mtime)
/// so that a no-op build does not rehash 27 MB every time.
pub(crate) fn deb_sha256(deb: &Path) -> Result<String, ImageError> {
    let meta = fs::metadata(deb).map_err(io_err("inspect", deb))?;
    let stamp = format!("{} {}.{}", meta.len(), meta.mtime(), meta.mtime_nsec());
    let mut sidecar = deb.as_os_str().to_owned();
    sidecar.push(".sha256");
    let sidecar = PathBuf::from(sidecar);
    if let Ok(text) = fs::read_to_string(&sidecar) {
        if let Some((sha, rest)) = text.trim().split_once(' ') {
            if rest == stamp && sha.len() == 64 {
                return Ok(sha.to_string());
            }
        }
    }
    let sha = sha256_file(deb).map_err(io_err("hash", deb))?;
    // Only a speed-up: failing to write it is harmless.
    let _ = fs::write(&sidecar, format!("{sha} {stamp}\n"));
    Ok(sha)
}

/// Downloads the package into the cache unless it is already there. The download lands in a
/// private directory first, so a half-downloaded file never sits under its final name.
pub(crate) fn fetch(
    tools: &HostTools,
    cache_dir: &Path,
    pkg: &KernelPackage,
    progress: &dyn BuildProgress,
) -> Result<PathBuf, ImageError> {
    let deb = deb_path(cache_dir, pkg);
    if deb.is_file() {
        progress.detail(&format!("using cached {}", pkg.deb_file_name()));
        return Ok(deb);
    }
    let debs = cache_dir.join("debs");
    let partial = debs.join(format!(".download-{}", std::process::id()));
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir_all(&partial).map_err(io_err("create", &partial))?;
    progress.detail(&format!("downloading {} {}", pkg.name, pkg.version));
    let result = tools::run(
        "kernel",
        tools
            .command("apt-get")
            .arg("download")
            .arg(format!("{}={}", pkg.name, pkg.version))
            .current_dir(&partial),
        progress,
        true,
    )
    .and_then(|_| {
        let got = partial.join(pkg.deb_file_name());
        fs::rename(&got, &deb).map_err(io_err("move the downloaded package", &got))
    });
    let _ = fs::remove_dir_all(&partial);
    result?;
    // Older kernels are dead weight in the cache once a newer one is fetched.
    if let Ok(entries) = fs::read_dir(&debs) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = entry.path() == deb || name == format!("{}.sha256", pkg.deb_file_name());
            if name.starts_with("linux-image-") && !ours {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
    Ok(deb)
}

/// An unpacked kernel package with `depmod` run on it; removed from the cache when dropped.
pub(crate) struct KernelTree {
    root: PathBuf,
    modules_dir: PathBuf,
    release: String,
    package: String,
}

impl KernelTree {
    /// Unpacks `deb` into `<cache>/kernel-<release>` and runs `depmod -b` on it.
    pub(crate) fn unpack(
        tools: &HostTools,
        deb: &Path,
        cache_dir: &Path,
        pkg: &KernelPackage,
        progress: &dyn BuildProgress,
    ) -> Result<KernelTree, ImageError> {
        let release = pkg.release().to_string();
        let root = cache_dir.join(format!("kernel-{release}"));
        if root.exists() {
            fs::remove_dir_all(&root).map_err(io_err("remove", &root))?;
        }
        fs::create_dir_all(&root).map_err(io_err("create", &root))?;
        // From here on, dropping the tree removes the directory, also on error.
        let mut tree = KernelTree {
            modules_dir: PathBuf::new(),
            root,
            release,
            package: pkg.name.clone(),
        };
        progress.detail(&format!("unpacking {}", pkg.name));
        tools::run(
            "kernel",
            tools.command("dpkg-deb").arg("-x").arg(deb).arg(&tree.root),
            progress,
            true,
        )?;
        let layout = |reason: String| ImageError::KernelLayout {
            package: pkg.name.clone(),
            reason,
        };
        if !tree.vmlinuz().is_file() {
            return Err(layout(format!("no boot/vmlinuz-{}", tree.release)));
        }
        tree.modules_dir = ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|dir| tree.root.join(dir).join(&tree.release))
            .find(|dir| dir.is_dir())
            .ok_or_else(|| layout(format!("no lib/modules/{}", tree.release)))?;
        progress.detail(&format!("depmod {}", tree.release));
        tools::run(
            "kernel",
            tools
                .command("depmod")
                .arg("-b")
                .arg(&tree.root)
                .arg(&tree.release),
            progress,
            true,
        )?;
        Ok(tree)
    }

    pub(crate) fn vmlinuz(&self) -> PathBuf {
        self.root
            .join("boot")
            .join(format!("vmlinuz-{}", self.release))
    }

    pub(crate) fn modules_dir(&self) -> &Path {
        &self.modules_dir
    }

    /// The initrd's modules in load order, from this tree's `modules.dep`. The guest loads them
    /// with `finit_module` as they are, so they must be uncompressed (Debian 12's are).
    pub(crate) fn initrd_modules(&self) -> Result<Vec<ModuleFile>, ImageError> {
        let path = self.modules_dir.join("modules.dep");
        let text = fs::read_to_string(&path).map_err(io_err("read", &path))?;
        let modules = load_order(&text, &path, INITRD_MODULES)?;
        if let Some(compressed) = modules.iter().find(|m| !m.file_name.ends_with(".ko")) {
            return Err(ImageError::KernelLayout {
                package: self.package.clone(),
                reason: format!(
                    "module {} is compressed; the initrd needs plain .ko files",
                    compressed.rel_path
                ),
            });
        }
        Ok(modules)
    }
}

impl Drop for KernelTree {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.root) {
            tracing::warn!(path = %self.root.display(), error = %e, "cannot remove unpacked kernel");
        }
    }
}

/// One kernel module to put in the initrd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ModuleFile {
    /// Path relative to the modules directory, as written in `modules.dep`.
    pub rel_path: String,
    /// The file's base name (`virtio_ring.ko`), its name under `/modules` in the initrd.
    pub file_name: String,
}

/// The module name of a `modules.dep` path: base name without `.ko[.xz|.zst|.gz]`, '-' as '_'.
fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    let stem = base.split(".ko").next().unwrap_or(base);
    stem.replace('-', "_")
}

/// Orders `wanted` and everything they depend on so that dependencies come first (a depth-first
/// post-order over `modules.dep`; ties keep the order of `wanted` and of each dependency list).
pub(crate) fn load_order(
    modules_dep: &str,
    path: &Path,
    wanted: &[&str],
) -> Result<Vec<ModuleFile>, ImageError> {
    // module name -> (path, dependency paths)
    let mut graph: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for (index, line) in modules_dep.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let malformed = |reason: &str| ImageError::ModulesDep {
            path: path.to_path_buf(),
            line: index + 1,
            reason: reason.to_string(),
        };
        let (module, deps) = line
            .split_once(':')
            .ok_or_else(|| malformed("no ':' after the module path"))?;
        let module = module.trim();
        if !module.contains(".ko") {
            return Err(malformed("the module path does not end in .ko"));
        }
        let deps = deps.split_whitespace().map(str::to_string).collect();
        graph.insert(module_name(module), (module.to_string(), deps));
    }

    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    struct Walk<'a> {
        graph: &'a HashMap<String, (String, Vec<String>)>,
        marks: HashMap<String, Mark>,
        order: Vec<ModuleFile>,
        path: &'a Path,
    }
    impl Walk<'_> {
        fn visit(&mut self, name: &str) -> Result<(), ImageError> {
            match self.marks.get(name) {
                Some(Mark::Done) => return Ok(()),
                Some(Mark::Visiting) => {
                    return Err(ImageError::ModuleCycle {
                        name: name.to_string(),
                        path: self.path.to_path_buf(),
                    })
                }
                None => {}
            }
            let (rel_path, deps) =
                self.graph
                    .get(name)
                    .ok_or_else(|| ImageError::ModuleNotFound {
                        name: name.to_string(),
                        path: self.path.to_path_buf(),
                    })?;
            self.marks.insert(name.to_string(), Mark::Visiting);
            for dep in deps {
                self.visit(&module_name(dep))?;
            }
            self.marks.insert(name.to_string(), Mark::Done);
            let file_name = rel_path.rsplit('/').next().unwrap_or(rel_path).to_string();
            self.order.push(ModuleFile {
                rel_path: rel_path.clone(),
                file_name,
            });
            Ok(())
        }
    }

    let mut walk = Walk {
        graph: &graph,
        marks: HashMap::new(),
        order: Vec::new(),
        path,
    };
    for name in wanted {
        walk.visit(&name.replace('-', "_"))?;
    }
    Ok(walk.order)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shaped like the Debian 6.1 cloud kernel's modules.dep (trimmed), plus one module with a
    /// dash in its file name.
    const MODULES_DEP: &str = "\
kernel/fs/squashfs/squashfs.ko:
kernel/fs/overlayfs/overlay.ko:
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/net/dummy.ko:
kernel/drivers/md/dm-mod.ko:

kernel/fs/fuse/virtiofs.ko: kernel/fs/fuse/fuse.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/fs/fuse/fuse.ko:
";

    fn names(order: &[ModuleFile]) -> Vec<&str> {
        order.iter().map(|m| m.file_name.as_str()).collect()
    }

    fn order(dep: &str, wanted: &[&str]) -> Result<Vec<ModuleFile>, ImageError> {
        load_order(dep, Path::new("modules.dep"), wanted)
    }

    #[test]
    fn initrd_modules_come_after_their_dependencies() {
        let order = order(MODULES_DEP, INITRD_MODULES).unwrap();
        assert_eq!(
            names(&order),
            [
                "virtio_ring.ko",
                "virtio.ko",
                "virtio_mmio.ko",
                "virtio_blk.ko",
                "virtio_console.ko",
                "squashfs.ko",
                "overlay.ko",
                "dummy.ko"
            ]
        );
        assert_eq!(order[0].rel_path, "kernel/drivers/virtio/virtio_ring.ko");
    }

    #[test]
    fn orders_are_topological_for_every_case() {
        // (modules.dep, wanted, expected load order)
        let cases: &[(&str, &[&str], &[&str])] = &[
            ("a.ko:\n", &["a"], &["a.ko"]),
            ("a.ko: b.ko\nb.ko:\n", &["a"], &["b.ko", "a.ko"]),
            // Transitive chain listed closest-last, as depmod writes it.
            (
                "a.ko: c.ko b.ko\nb.ko: c.ko\nc.ko:\n",
                &["a"],
                &["c.ko", "b.ko", "a.ko"],
            ),
            // Shared dependency appears once.
            (
                "a.ko: s.ko\nb.ko: s.ko\ns.ko:\n",
                &["a", "b"],
                &["s.ko", "a.ko", "b.ko"],
            ),
            // Dashes and underscores name the same module.
            ("x/dm-mod.ko:\n", &["dm_mod"], &["dm-mod.ko"]),
            ("x/y_z.ko:\n", &["y-z"], &["y_z.ko"]),
            // Compressed module names keep their file name.
            (
                "x/a.ko.xz: x/b.ko.xz\nx/b.ko.xz:\n",
                &["a"],
                &["b.ko.xz", "a.ko.xz"],
            ),
        ];
        for (dep, wanted, expected) in cases {
            let got = order(dep, wanted).unwrap_or_else(|e| panic!("{dep:?}: {e}"));
            assert_eq!(names(&got), *expected, "modules.dep {dep:?}");
        }
    }

    #[test]
    fn unknown_module_is_an_error() {
        let err = order(MODULES_DEP, &["vsock"]).unwrap_err();
        assert!(matches!(&err, ImageError::ModuleNotFound { name, .. } if name == "vsock"));
        // A dependency missing from the file is reported too.
        let err = order("a.ko: gone.ko\n", &["a"]).unwrap_err();
        assert!(matches!(&err, ImageError::ModuleNotFound { name, .. } if name == "gone"));
    }

    #[test]
    fn cycles_and_malformed_lines_are_errors() {
        let err = order("a.ko: b.ko\nb.ko: a.ko\n", &["a"]).unwrap_err();
        assert!(matches!(err, ImageError::ModuleCycle { .. }), "{err}");
        let err = order("a.ko:\nthis is not a module line\n", &["a"]).unwrap_err();
        assert!(
            matches!(err, ImageError::ModulesDep { line: 2, .. }),
            "{err}"
        );
        let err = order("a.txt:\n", &["a"]).unwrap_err();
        assert!(
            matches!(err, ImageError::ModulesDep { line: 1, .. }),
            "{err}"
        );
    }

    #[test]
    fn meta_package_depends_is_parsed() {
        let stanza = "Package: linux-image-cloud-amd64\nSource: linux-signed-amd64 (6.1.192+2)\n\
                      Version: 6.1.192-2\nDepends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)\n\
                      Description: Linux for x86-64 cloud\n\nPackage: other\nDepends: linux-image-old\n";
        assert_eq!(
            parse_meta_depends(stanza),
            Some((
                "linux-image-6.1.0-56-cloud-amd64".to_string(),
                Some("6.1.192-2".to_string())
            ))
        );
        let unpinned = "Package: x\nDepends: libc6, linux-image-6.12.9-cloud-amd64 | foo\n";
        assert_eq!(
            parse_meta_depends(unpinned),
            Some(("linux-image-6.12.9-cloud-amd64".to_string(), None))
        );
        assert_eq!(parse_meta_depends("Package: x\nDepends: libc6\n"), None);
        assert_eq!(parse_meta_depends(""), None);
    }

    #[test]
    fn deb_digest_is_remembered_beside_the_package() {
        let dir = tempfile::tempdir().unwrap();
        let deb = dir.path().join("linux-image-x_1_amd64.deb");
        fs::write(&deb, "package").unwrap();
        let sha = deb_sha256(&deb).unwrap();
        assert_eq!(sha, sha256_file(&deb).unwrap());
        let sidecar = dir.path().join("linux-image-x_1_amd64.deb.sha256");
        assert!(fs::read_to_string(&sidecar).unwrap().starts_with(&sha));
        assert_eq!(deb_sha256(&deb).unwrap(), sha);
        // A changed package is rehashed, not trusted.
        fs::write(&deb, "package v2").unwrap();
        assert_eq!(deb_sha256(&deb).unwrap(), sha256_file(&deb).unwrap());
        assert_ne!(deb_sha256(&deb).unwrap(), sha);
    }

    #[test]
    fn package_names_map_to_release_and_file() {
        let pkg = KernelPackage {
            name: "linux-image-6.1.0-56-cloud-amd64".into(),
            version: "1:6.1.192-2".into(),
        };
        assert_eq!(pkg.release(), "6.1.0-56-cloud-amd64");
        assert_eq!(
            deb_path(Path::new("/c"), &pkg),
            Path::new("/c/debs/linux-image-6.1.0-56-cloud-amd64_1%3a6.1.192-2_amd64.deb")
        );
    }
}
