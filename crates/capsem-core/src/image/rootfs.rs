//! The guest root filesystem: `mmdebstrap` of Debian bookworm (minbase + the package list) into a
//! directory in the cache, a few edits (hostname, resolv.conf placeholder, `/root`, apt caches
//! removed), then `mksquashfs` into `rootfs.squashfs`. The unpacked tree is removed afterwards,
//! also on failure. Never writes through a symlink out of the tree, and never deletes a tree that
//! still has something mounted under it.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::error::io_err;
use super::tools::{self, HostTools};
use super::{BuildProgress, ImageError};

/// The Debian release the guest runs.
pub const SUITE: &str = "bookworm";

/// Packages added to the minbase variant unless the caller gives its own list.
pub const DEFAULT_PACKAGES: &[&str] = &[
    "python3",
    "python3-pip",
    "python3-requests",
    "git",
    "curl",
    "ca-certificates",
    "procps",
    "nodejs",
    "npm",
    "bash",
    "iproute2",
    "iputils-ping",
    "less",
];

/// The guest's `/etc/hostname`.
pub const GUEST_HOSTNAME: &str = "capsem";

/// The guest's `/etc/resolv.conf` as shipped; the agent, which answers the guest's DNS, writes the
/// real one at boot (the rootfs is read-only, the overlay upper is not).
pub const RESOLV_CONF_PLACEHOLDER: &str =
    "# capsem: placeholder; capsem-agent serves DNS and rewrites this file at boot\n";

/// [`DEFAULT_PACKAGES`] as owned strings, for [`super::BuildOptions`].
pub fn default_packages() -> Vec<String> {
    DEFAULT_PACKAGES.iter().map(|p| p.to_string()).collect()
}

/// Checks every name is a Debian package name (policy §5.6.1) and returns them sorted and
/// deduplicated, so that the order the caller lists them in does not make the rootfs stale.
pub(crate) fn normalize_packages(packages: &[String]) -> Result<Vec<String>, ImageError> {
    let mut out = Vec::with_capacity(packages.len());
    for name in packages {
        let name = name.trim();
        let valid = name.len() >= 2
            && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
        if !valid {
            return Err(ImageError::InvalidPackage {
                name: name.to_string(),
            });
        }
        out.push(name.to_string());
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// Where mmdebstrap unpacks the root filesystem, under the cache directory.
pub(crate) const TREE_DIR: &str = "rootfs-tree";

/// The unpacked root filesystem in the cache; removed (safely) when dropped.
pub(crate) struct RootTree {
    path: PathBuf,
}

impl RootTree {
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RootTree {
    fn drop(&mut self) {
        if let Err(e) = remove_tree(&self.path) {
            tracing::warn!(error = %e, "cannot remove the unpacked root filesystem");
        }
    }
}

/// Runs mmdebstrap into `<cache>/rootfs-tree` (removing a leftover one first), streaming its log.
pub(crate) fn bootstrap(
    tools: &HostTools,
    cache_dir: &Path,
    packages: &[String],
    progress: &dyn BuildProgress,
) -> Result<RootTree, ImageError> {
    let path = cache_dir.join(TREE_DIR);
    remove_tree(&path)?;
    let tree = RootTree { path };
    let mut cmd = tools.command("mmdebstrap");
    cmd.args(["--mode=root", "--format=directory", "--variant=minbase"])
        .arg("--aptopt=Acquire::Retries \"3\"");
    if !packages.is_empty() {
        cmd.arg(format!("--include={}", packages.join(",")));
    }
    cmd.arg(SUITE).arg(&tree.path);
    tools::run("rootfs", &mut cmd, progress, true)?;
    Ok(tree)
}

/// Sets hostname, hosts and the resolv.conf placeholder, makes `/root`, and drops apt's caches and
/// package lists (the guest reaches the archive only through the proxy, and `apt-get update`
/// refetches them).
pub(crate) fn customize(tree: &Path) -> Result<(), ImageError> {
    let etc = real_dir(tree, "etc")?;
    replace_file(
        &etc.join("hostname"),
        format!("{GUEST_HOSTNAME}\n").as_bytes(),
    )?;
    replace_file(
        &etc.join("hosts"),
        format!("127.0.0.1\tlocalhost\n127.0.1.1\t{GUEST_HOSTNAME}\n").as_bytes(),
    )?;
    replace_file(&etc.join("resolv.conf"), RESOLV_CONF_PLACEHOLDER.as_bytes())?;

    let root = tree.join("root");
    match fs::symlink_metadata(&root) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => fs::remove_file(&root).map_err(io_err("remove", &root))?,
        Err(_) => {}
    }
    fs::create_dir_all(&root).map_err(io_err("create", &root))?;
    fs::set_permissions(&root, fs::Permissions::from_mode(0o700))
        .map_err(io_err("set permissions of", &root))?;

    for (dir, keep) in [
        ("var/cache/apt/archives", &["partial", "lock"][..]),
        ("var/cache/apt/archives/partial", &[][..]),
        ("var/cache/apt", &["archives"][..]),
        ("var/lib/apt/lists", &["partial", "lock"][..]),
        ("var/lib/apt/lists/partial", &[][..]),
    ] {
        if let Ok(dir) = real_dir(tree, dir) {
            clear_dir(&dir, keep)?;
        }
    }
    Ok(())
}

/// Compression of the root filesystem. lz4 (high-compression mode) rather than zstd: the image
/// is larger, but under TCG the guest decompresses lz4 several times faster, which shows in the
/// first exec of every session (sh and libc are read cold).
pub const SQUASHFS_COMPRESSION: &[&str] = &["-comp", "lz4", "-Xhc"];

/// `mksquashfs <tree> <out> <SQUASHFS_COMPRESSION> -noappend -quiet -processors 2`.
pub(crate) fn squash(
    tools: &HostTools,
    tree: &Path,
    out: &Path,
    progress: &dyn BuildProgress,
) -> Result<(), ImageError> {
    tools::run(
        "squash",
        tools
            .command("mksquashfs")
            .arg(tree)
            .arg(out)
            .args(SQUASHFS_COMPRESSION)
            .args(["-noappend", "-quiet", "-processors", "2"]),
        progress,
        true,
    )?;
    Ok(())
}

/// `tree/rel` if every component of `rel` is a real directory (no symlink out of the tree).
fn real_dir(tree: &Path, rel: &str) -> Result<PathBuf, ImageError> {
    let mut path = tree.to_path_buf();
    for part in rel.split('/') {
        path.push(part);
        let meta = fs::symlink_metadata(&path).map_err(io_err("inspect", &path))?;
        if !meta.is_dir() {
            return Err(ImageError::Io {
                action: "use as a directory",
                path,
                source: io::Error::new(io::ErrorKind::InvalidData, "not a plain directory"),
            });
        }
    }
    Ok(path)
}

/// Writes `path` afresh; an existing file or symlink there is removed first, so nothing is
/// written through a link.
fn replace_file(path: &Path, contents: &[u8]) -> Result<(), ImageError> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("remove", path)(e)),
    }
    fs::write(path, contents).map_err(io_err("write", path))
}

/// Removes every entry of `dir` whose name is not in `keep`.
fn clear_dir(dir: &Path, keep: &[&str]) -> Result<(), ImageError> {
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        if keep.iter().any(|k| entry.file_name() == **k) {
            continue;
        }
        let path = entry.path();
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        let removed = if is_dir {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        removed.map_err(io_err("remove", &path))?;
    }
    Ok(())
}

/// Removes `path` recursively. mmdebstrap mounts /proc, /sys and /dev inside the tree while it
/// runs; if it was killed, those mounts may remain, and deleting through them would touch the
/// host. So: detach whatever is mounted under `path` first, and refuse to delete if that fails.
pub(crate) fn remove_tree(path: &Path) -> Result<(), ImageError> {
    if fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    let mut mounts = mounts_under(path);
    mounts.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
    for mount in &mounts {
        let _ = nix::mount::umount2(mount.as_path(), nix::mount::MntFlags::MNT_DETACH);
    }
    if let Some(still) = mounts_under(path).into_iter().next() {
        return Err(ImageError::Io {
            action: "remove the old root filesystem tree, because something is still mounted on",
            path: still,
            source: io::Error::new(io::ErrorKind::ResourceBusy, "unmount it and retry"),
        });
    }
    fs::remove_dir_all(path).map_err(io_err("remove", path))
}

/// Mount points at or below `path`, from /proc/self/mountinfo.
fn mounts_under(path: &Path) -> Vec<PathBuf> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let base = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mountinfo(field)))
        .filter(|mount| mount.starts_with(&base))
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        if let (b'\\', Some(digits)) = (bytes[i], octal) {
            let code = digits
                .iter()
                .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
            out.push(code as u8);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn package_lists_are_validated_sorted_and_deduplicated() {
        assert_eq!(
            normalize_packages(&owned(&["git", "python3", "g++", "git", "libc6.1-dev"])).unwrap(),
            owned(&["g++", "git", "libc6.1-dev", "python3"])
        );
        for bad in [
            "",
            "x",
            "Git",
            "git,curl",
            "curl wget",
            "-x",
            "../x",
            "pkg=1.0",
        ] {
            let err = normalize_packages(&owned(&[bad])).unwrap_err();
            assert!(matches!(err, ImageError::InvalidPackage { .. }), "{bad:?}");
        }
        assert!(normalize_packages(&default_packages()).is_ok());
    }

    #[test]
    fn customize_writes_config_and_drops_apt_caches() {
        let tree = tempfile::tempdir().unwrap();
        let t = tree.path();
        for dir in [
            "etc",
            "var/cache/apt/archives/partial",
            "var/lib/apt/lists/partial",
        ] {
            fs::create_dir_all(t.join(dir)).unwrap();
        }
        fs::write(t.join("var/cache/apt/pkgcache.bin"), "x").unwrap();
        fs::write(t.join("var/cache/apt/archives/git_1_amd64.deb"), "x").unwrap();
        fs::write(t.join("var/lib/apt/lists/deb.debian.org_Packages"), "x").unwrap();
        fs::write(t.join("var/lib/apt/lists/lock"), "").unwrap();
        // A symlink pointing out of the tree must be replaced, not written through.
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::os::unix::fs::symlink(outside.path(), t.join("etc/resolv.conf")).unwrap();

        customize(t).unwrap();

        assert_eq!(
            fs::read_to_string(t.join("etc/hostname")).unwrap(),
            "capsem\n"
        );
        assert_eq!(
            fs::read_to_string(t.join("etc/resolv.conf")).unwrap(),
            RESOLV_CONF_PLACEHOLDER
        );
        assert!(!fs::symlink_metadata(t.join("etc/resolv.conf"))
            .unwrap()
            .is_symlink());
        assert_eq!(fs::read_to_string(outside.path()).unwrap(), "");
        assert!(t.join("root").is_dir());
        assert!(!t.join("var/cache/apt/pkgcache.bin").exists());
        assert!(!t.join("var/cache/apt/archives/git_1_amd64.deb").exists());
        assert!(t.join("var/cache/apt/archives/partial").is_dir());
        assert!(!t.join("var/lib/apt/lists/deb.debian.org_Packages").exists());
        assert!(t.join("var/lib/apt/lists/partial").is_dir());
        assert!(t.join("var/lib/apt/lists/lock").exists());
    }

    #[test]
    fn customize_refuses_an_etc_symlink() {
        let tree = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), tree.path().join("etc")).unwrap();
        assert!(customize(tree.path()).is_err());
        assert!(!elsewhere.path().join("hostname").exists());
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/end\\"), "/end\\");
    }

    #[test]
    fn remove_tree_removes_plain_trees_and_tolerates_absence() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("t");
        fs::create_dir_all(tree.join("a/b")).unwrap();
        fs::write(tree.join("a/b/f"), "x").unwrap();
        remove_tree(&tree).unwrap();
        assert!(!tree.exists());
        remove_tree(&tree).unwrap();
    }
}
