//! UNIX socket paths of any length. A socket address holds at most 107 bytes of path, and a
//! capsem home may sit deeper than that (a CI checkout, a home directory on a long mount). A
//! longer path is reached through its directory's descriptor, `/proc/self/fd/N/<name>`, so
//! every socket capsem binds or dials works wherever the home is.

use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Room in `sockaddr_un.sun_path`, less its terminating NUL.
const SUN_PATH_MAX: usize = 107;

/// A path short enough for a socket address, and the directory handle it goes through: keep
/// the `Short` alive until the bind or connect has happened, or the descriptor number may
/// already name another file.
struct Short {
    path: PathBuf,
    dir: Option<File>,
}

impl Short {
    /// Explain a failure of the `/proc` route itself (no `/proc` in this sandbox); any other
    /// error (no socket there, nobody listening) is returned as it is.
    fn explain(&self, real: &Path, e: io::Error) -> io::Error {
        let route_works = self.path.parent().is_some_and(Path::is_dir);
        if self.dir.is_none() || route_works {
            return e;
        }
        io::Error::new(
            e.kind(),
            format!(
                "cannot reach the socket {} through {} ({e}); is /proc mounted? Otherwise use a \
                 shorter CAPSEM_HOME or --uds-path",
                real.display(),
                self.path.display()
            ),
        )
    }
}

/// Whether `path` fits a socket address as it is. One that does not is still reached by capsem
/// (through its directory), but not by other clients such as `curl --unix-socket`.
pub fn fits_address(path: &Path) -> bool {
    path.as_os_str().len() <= SUN_PATH_MAX
}

fn short(path: &Path) -> io::Result<Short> {
    if fits_address(path) {
        return Ok(Short {
            path: path.to_path_buf(),
            dir: None,
        });
    }
    let too_long = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "socket path {} is too long even through its directory; use a shorter CAPSEM_HOME or --uds-path",
                path.display()
            ),
        )
    };
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(too_long());
    };
    let dir = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(parent)?
    };
    let via = crate::paths::via_fd(&dir, name);
    if via.as_os_str().as_bytes().len() > SUN_PATH_MAX {
        return Err(too_long());
    }
    Ok(Short {
        path: via,
        dir: Some(dir),
    })
}

/// Bind a UNIX socket at `path` (replacing a stale one) with mode 0600.
pub fn bind_private(path: &Path) -> io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    let via = short(path)?;
    let l = tokio::net::UnixListener::bind(&via.path).map_err(|e| via.explain(path, e))?;
    drop(via);
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Connect to the UNIX socket at `path`.
pub async fn connect(path: &Path) -> io::Result<tokio::net::UnixStream> {
    let via = short(path)?;
    tokio::net::UnixStream::connect(&via.path)
        .await
        .map_err(|e| via.explain(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_socket_deeper_than_an_address_holds_binds_and_connects() {
        let tmp = tempfile::tempdir().unwrap();
        let deep = tmp.path().join("d".repeat(60)).join("e".repeat(60));
        std::fs::create_dir_all(&deep).unwrap();
        let path = deep.join("channel.sock");
        assert!(path.as_os_str().len() > 120);
        // As it is, the path does not fit.
        assert!(std::os::unix::net::UnixListener::bind(&path).is_err());

        let l = bind_private(&path).unwrap();
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.file_type().is_socket(), "bound at the real path");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);

        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            s.write_all(b"hello").await.unwrap();
        });
        let mut c = connect(&path).await.unwrap();
        let mut got = String::new();
        c.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "hello");
        server.await.unwrap();

        // A stale socket is replaced.
        drop(bind_private(&path).unwrap());
        // Nobody there: the error is the plain one, which callers (the service's starter) act on.
        let e = connect(&deep.join("none.sock")).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(!e.to_string().contains("/proc"), "{e}");
    }

    #[test]
    fn a_short_path_is_used_as_it_is_and_an_overlong_name_is_refused() {
        let s = short(Path::new("/run/x.sock")).unwrap();
        assert_eq!(s.path, Path::new("/run/x.sock"));
        let tmp = tempfile::tempdir().unwrap();
        let deep = tmp.path().join("d".repeat(100));
        std::fs::create_dir_all(&deep).unwrap();
        let e = match short(&deep.join("n".repeat(100))) {
            Err(e) => e,
            Ok(_) => panic!("an overlong name cannot fit"),
        };
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("shorter CAPSEM_HOME"), "{e}");
    }
}
