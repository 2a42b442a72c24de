//! The layout of `CAPSEM_HOME` (DESIGN.md "On disk") and the permissions it must keep: every
//! directory 0700, every file 0600. Nothing else in capsem builds these paths by hand.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Environment variable that selects another home (every test sets its own).
pub const HOME_ENV: &str = "CAPSEM_HOME";

#[derive(Debug, Clone)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Home { root: root.into() }
    }

    /// `$CAPSEM_HOME`, else `~/.capsem`.
    pub fn from_env() -> io::Result<Self> {
        if let Some(h) = std::env::var_os(HOME_ENV).filter(|v| !v.is_empty()) {
            return Ok(Home::new(std::path::absolute(Path::new(&h))?));
        }
        let home = std::env::var_os("HOME").ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "neither CAPSEM_HOME nor HOME is set",
            )
        })?;
        Ok(Home::new(std::path::absolute(
            PathBuf::from(home).join(".capsem"),
        )?))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn assets_root(&self) -> PathBuf {
        self.root.join("assets")
    }
    pub fn cache_dir(&self) -> PathBuf {
        self.root.join("cache")
    }
    pub fn sessions_dir(&self) -> PathBuf {
        self.root.join("sessions")
    }
    pub fn session_dir(&self, id: &str) -> PathBuf {
        self.sessions_dir().join(id)
    }
    /// Fork images (`images/<name>/{image.json,disk*.qcow2}`).
    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }
    pub fn image_dir(&self, name: &str) -> PathBuf {
        self.images_dir().join(name)
    }
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }
    pub fn instances_dir(&self) -> PathBuf {
        self.run_dir().join("instances")
    }
    pub fn instance_socket(&self, id: &str) -> PathBuf {
        self.instances_dir().join(format!("{id}.sock"))
    }
    pub fn service_socket(&self) -> PathBuf {
        self.run_dir().join("service.sock")
    }
    pub fn service_pid(&self) -> PathBuf {
        self.run_dir().join("service.pid")
    }
    pub fn service_log(&self) -> PathBuf {
        self.run_dir().join("service.log")
    }
    /// The per-install CA (`ca.key` 0600, `ca.crt`).
    pub fn ca_dir(&self) -> PathBuf {
        self.root.join("ca")
    }
    /// The user's settings (`[network]` policy and others).
    pub fn user_settings(&self) -> PathBuf {
        self.root.join("user.toml")
    }
    pub fn accel_cache(&self) -> PathBuf {
        self.run_dir().join("accel.json")
    }

    /// Create the directory tree with private permissions (and tighten an existing root).
    pub fn ensure(&self) -> io::Result<()> {
        for dir in [
            self.root.clone(),
            self.sessions_dir(),
            self.images_dir(),
            self.run_dir(),
            self.instances_dir(),
        ] {
            private_dir(&dir)?;
        }
        Ok(())
    }
}

/// Make `dir` (and parents) and set it to 0700.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

/// Write a file atomically (temp + rename) with mode 0600. The temporary file's name is this
/// writer's own (file name, process, call), so writers of different files in one directory, or
/// of one file at once, never share it.
pub fn write_private(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::atomic::{AtomicU64, Ordering};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        CALLS.fetch_add(1, Ordering::Relaxed)
    ));
    let written = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(data)?;
            f.sync_all()
        })
        .and_then(|()| fs::rename(&tmp, path));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// Make a whole tree private: directories 0700, files 0600 (symlinks are left alone).
pub fn make_private_tree(root: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(root)?;
    if meta.is_dir() {
        fs::set_permissions(root, fs::Permissions::from_mode(0o700))?;
        for entry in fs::read_dir(root)? {
            make_private_tree(&entry?.path())?;
        }
    } else if meta.is_file() {
        fs::set_permissions(root, fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// An exclusive `flock` on a file, held until dropped.
pub type Lock = nix::fcntl::Flock<fs::File>;

/// Take the exclusive lock on `path` (created 0600), or `None` when another holder has it.
pub fn try_lock(path: &Path) -> io::Result<Option<Lock>> {
    use nix::fcntl::{Flock, FlockArg};
    match Flock::lock(private_log(path)?, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, errno)) => Err(io::Error::from(errno)),
    }
}

/// Take the exclusive lock on `path` (created 0600), waiting for another holder to let go.
pub fn lock(path: &Path) -> io::Result<Lock> {
    use nix::fcntl::{Flock, FlockArg};
    Flock::lock(private_log(path)?, FlockArg::LockExclusive)
        .map_err(|(_, errno)| io::Error::from(errno))
}

/// `name` in the directory open as `dir`, reached through the descriptor
/// (`/proc/self/fd/N/<name>`): whatever is renamed over the directory's path meanwhile, and
/// however deep that path is.
pub fn via_fd(dir: &impl std::os::fd::AsRawFd, name: impl AsRef<Path>) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name)
}

/// Open a log file for appending, creating it with mode 0600.
pub fn private_log(path: &Path) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// At most `max` bytes of the file at `path`, from byte `from` (`None`: the last `max` bytes),
/// and where they start. For files a guest writes without limit (its console): a reader never
/// holds more than it asked for. Nothing (at 0) when the file cannot be read.
pub fn read_window(path: &Path, from: Option<u64>, max: u64) -> (Vec<u8>, u64) {
    use std::io::{Read, Seek};
    let mut buf = Vec::new();
    let start = fs::File::open(path).and_then(|mut f| {
        let start = match from {
            Some(s) => s,
            None => f.metadata()?.len().saturating_sub(max),
        };
        f.seek(io::SeekFrom::Start(start))?;
        f.take(max).read_to_end(&mut buf)?;
        Ok(start)
    });
    match start {
        Ok(s) => (buf, s),
        Err(_) => (Vec::new(), 0),
    }
}

/// Last `n` non-empty lines of a text file (of its last 64 KiB), joined with " | " (for
/// one-line error messages); empty when the file cannot be read.
pub fn tail_of(path: &Path, n: usize) -> String {
    let (end, _) = read_window(path, None, 64 << 10);
    let text = String::from_utf8_lossy(&end);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_window_keeps_the_end_or_reads_from_a_mark() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("serial.log");
        assert_eq!(read_window(&f, None, 4), (Vec::new(), 0));
        std::fs::write(&f, b"0123456789").unwrap();
        assert_eq!(read_window(&f, None, 4), (b"6789".to_vec(), 6));
        assert_eq!(read_window(&f, None, 64), (b"0123456789".to_vec(), 0));
        assert_eq!(read_window(&f, Some(3), 4), (b"3456".to_vec(), 3));
        assert_eq!(read_window(&f, Some(20), 4), (Vec::new(), 20));
    }

    #[test]
    fn ensure_makes_private_tree() {
        let t = tempfile::tempdir().unwrap();
        let home = Home::new(t.path().join("h"));
        home.ensure().unwrap();
        for d in [
            home.root().to_path_buf(),
            home.run_dir(),
            home.sessions_dir(),
        ] {
            let mode = fs::metadata(&d).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", d.display());
        }
        let f = home.run_dir().join("x.json");
        write_private(&f, b"{}").unwrap();
        assert_eq!(
            fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
