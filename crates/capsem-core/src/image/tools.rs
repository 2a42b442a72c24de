//! Host tools the image build shells out to: finding them on a search PATH up front (one error
//! naming every missing tool and the apt packages that provide them), and running them with their
//! output streamed line by line to the progress sink. Decides nothing about what to build.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;

use super::{BuildProgress, ImageError};

/// Every host program the build runs, with the Debian package that provides it.
pub const HOST_TOOLS: &[(&str, &str)] = &[
    ("mmdebstrap", "mmdebstrap"),
    ("mksquashfs", "squashfs-tools"),
    ("mkfs.ext4", "e2fsprogs"),
    ("depmod", "kmod"),
    ("apt-get", "apt"),
    ("apt-cache", "apt"),
    ("dpkg-deb", "dpkg"),
];

/// Directories searched after `$PATH`: `mkfs.ext4` and `depmod` live in sbin, which a non-root
/// user's `$PATH` often lacks.
const SBIN_DIRS: &str = "/usr/local/sbin:/usr/sbin:/sbin";

/// The search path used when the caller gives none: `$PATH` followed by the sbin directories.
pub fn default_search_path() -> OsString {
    let mut path = std::env::var_os("PATH").unwrap_or_default();
    if !path.is_empty() {
        path.push(":");
    }
    path.push(SBIN_DIRS);
    path
}

/// The first executable file called `name` in `search_path` (colon-separated directories).
pub fn find_tool(name: &str, search_path: &OsStr) -> Option<PathBuf> {
    std::env::split_paths(search_path)
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join(name))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Absolute paths of every tool in [`HOST_TOOLS`], found by [`HostTools::find`].
#[derive(Debug, Clone)]
pub struct HostTools {
    paths: Vec<(&'static str, PathBuf)>,
}

impl HostTools {
    /// Looks every tool up in `search_path`; if any is missing, one [`ImageError::MissingTools`]
    /// names all of them and the packages to install.
    pub fn find(search_path: &OsStr) -> Result<HostTools, ImageError> {
        let mut paths = Vec::new();
        let mut missing = Vec::new();
        let mut packages = Vec::new();
        for &(tool, package) in HOST_TOOLS {
            match find_tool(tool, search_path) {
                Some(path) => paths.push((tool, path)),
                None => {
                    missing.push(tool);
                    if !packages.contains(&package) {
                        packages.push(package);
                    }
                }
            }
        }
        if missing.is_empty() {
            Ok(HostTools { paths })
        } else {
            Err(ImageError::MissingTools {
                tools: missing,
                packages,
            })
        }
    }

    /// The path of one of the [`HOST_TOOLS`]; a name outside that list is returned as is.
    pub fn get<'a>(&'a self, name: &'a str) -> &'a Path {
        self.paths
            .iter()
            .find(|(tool, _)| *tool == name)
            .map(|(_, path)| path.as_path())
            .unwrap_or_else(|| Path::new(name))
    }

    /// A `Command` for one of the tools, with stdin closed.
    pub(crate) fn command(&self, name: &str) -> Command {
        let mut cmd = Command::new(self.get(name));
        cmd.stdin(Stdio::null());
        cmd
    }
}

/// How many of a failed command's last output lines go into its error.
const TAIL_LINES: usize = 20;
/// How much of a command's stdout [`run`] keeps for its caller.
const STDOUT_LIMIT: usize = 4 << 20;

enum Line {
    Out(String),
    /// A stderr line, and whether it ended in '\r' (a progress bar about to be redrawn).
    Err(String, bool),
}

/// Runs `cmd` to completion. Every stderr line (and stdout line, when `stream_stdout`) is passed
/// to `progress.detail`; stdout is returned (up to 4 MiB). A non-zero exit becomes
/// [`ImageError::CommandFailed`] carrying the last lines of output.
pub(crate) fn run(
    step: &'static str,
    cmd: &mut Command,
    progress: &dyn BuildProgress,
    stream_stdout: bool,
) -> Result<String, ImageError> {
    let command = describe(cmd);
    tracing::debug!(step, command = %command, "running host tool");
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| ImageError::Spawn {
        program: cmd.get_program().to_string_lossy().into_owned(),
        source,
    })?;

    let (tx, rx) = mpsc::channel();
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        let tx = tx.clone();
        readers.push(thread::spawn(move || {
            forward_lines(out, &tx, |t, _| Line::Out(t))
        }));
    }
    if let Some(err) = child.stderr.take() {
        let tx = tx.clone();
        readers.push(thread::spawn(move || forward_lines(err, &tx, Line::Err)));
    }
    drop(tx);

    let mut stdout = String::new();
    let mut tail: VecDeque<String> = VecDeque::with_capacity(TAIL_LINES);
    for line in rx {
        let (text, show, redraw) = match line {
            Line::Out(text) => {
                if stdout.len() + text.len() < STDOUT_LIMIT {
                    stdout.push_str(&text);
                    stdout.push('\n');
                }
                (text, stream_stdout, false)
            }
            Line::Err(text, redraw) => (text, true, redraw),
        };
        let trimmed = text.trim_end();
        if trimmed.is_empty() {
            continue;
        }
        if show {
            progress.detail(trimmed);
        }
        if redraw {
            continue;
        }
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(trimmed.to_string());
    }
    for reader in readers {
        let _ = reader.join();
    }
    let status = child.wait().map_err(|source| ImageError::Spawn {
        program: command.clone(),
        source,
    })?;
    if status.success() {
        Ok(stdout)
    } else {
        Err(ImageError::CommandFailed {
            step,
            command,
            status: status.to_string(),
            output_tail: Vec::from(tail).join("\n"),
        })
    }
}

/// Longest line forwarded in one piece.
const MAX_LINE: usize = 64 << 10;

/// Sends each line of `stream` (split at '\n', and at '\r' so that a redrawn progress bar
/// arrives as it advances) until the stream ends.
fn forward_lines(stream: impl Read, tx: &mpsc::Sender<Line>, wrap: fn(String, bool) -> Line) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        let buf = match reader.fill_buf() {
            Ok([]) | Err(_) => break,
            Ok(buf) => buf,
        };
        let (taken, ended, redraw) = match buf.iter().position(|&b| b == b'\n' || b == b'\r') {
            Some(end) => {
                line.extend_from_slice(&buf[..end]);
                (end + 1, true, buf[end] == b'\r')
            }
            None => {
                line.extend_from_slice(buf);
                (buf.len(), false, false)
            }
        };
        reader.consume(taken);
        if ended || line.len() >= MAX_LINE {
            if tx
                .send(wrap(String::from_utf8_lossy(&line).into_owned(), redraw))
                .is_err()
            {
                return;
            }
            line.clear();
        }
    }
    if !line.is_empty() {
        let _ = tx.send(wrap(String::from_utf8_lossy(&line).into_owned(), false));
    }
}

/// `program arg arg…` for messages (program by file name, to keep it short).
fn describe(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program());
    let mut text = program
        .file_name()
        .unwrap_or(program.as_os_str())
        .to_string_lossy()
        .into_owned();
    for arg in cmd.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::NoProgress;
    use std::cell::RefCell;

    #[test]
    fn empty_path_reports_every_tool_and_package_once() {
        let empty = tempfile::tempdir().unwrap();
        let err = HostTools::find(empty.path().as_os_str()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "missing host tools: mmdebstrap, mksquashfs, mkfs.ext4, depmod, apt-get, apt-cache, \
             dpkg-deb — install them with: sudo apt-get install mmdebstrap squashfs-tools \
             e2fsprogs kmod apt dpkg"
        );
    }

    #[test]
    fn only_missing_tools_are_named() {
        let dir = tempfile::tempdir().unwrap();
        for &(tool, _) in HOST_TOOLS {
            if tool == "mmdebstrap" || tool == "mksquashfs" {
                continue;
            }
            let path = dir.path().join(tool);
            std::fs::write(&path, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        // A non-executable file does not count.
        std::fs::write(dir.path().join("mksquashfs"), "").unwrap();
        let err = HostTools::find(dir.path().as_os_str()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "missing host tools: mmdebstrap, mksquashfs — install them with: sudo apt-get install \
             mmdebstrap squashfs-tools"
        );
    }

    #[test]
    fn tools_found_resolve_to_absolute_paths() {
        let dir = tempfile::tempdir().unwrap();
        for &(tool, _) in HOST_TOOLS {
            let path = dir.path().join(tool);
            std::fs::write(&path, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let mut search = OsString::from("/nonexistent:");
        search.push(dir.path());
        let tools = HostTools::find(&search).unwrap();
        assert_eq!(tools.get("depmod"), dir.path().join("depmod"));
    }

    struct Recorder(RefCell<Vec<String>>);
    impl BuildProgress for Recorder {
        fn step(&self, _: usize, _: usize, _: &str) {}
        fn detail(&self, text: &str) {
            self.0.borrow_mut().push(text.to_string());
        }
        fn done(&self, _: &str, _: f64) {}
    }

    #[test]
    fn run_streams_stderr_and_returns_stdout() {
        let rec = Recorder(RefCell::new(Vec::new()));
        let out = run(
            "test",
            Command::new("sh").args(["-c", "echo out; echo err1 >&2; printf 'a\\rb\\n' >&2"]),
            &rec,
            false,
        )
        .unwrap();
        assert_eq!(out, "out\n");
        assert_eq!(*rec.0.borrow(), ["err1", "a", "b"]);
    }

    #[test]
    fn run_failure_carries_the_output_tail() {
        let err = run(
            "test step",
            Command::new("sh").args(["-c", "printf '10%%\\r20%%\\r' >&2; echo boom >&2; exit 3"]),
            &NoProgress,
            false,
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("test step: `sh -c printf"), "{text}");
        assert!(text.contains("failed (exit status: 3)"), "{text}");
        assert!(text.ends_with(":\nboom"), "{text}");
    }

    #[test]
    fn run_reports_a_program_that_cannot_start() {
        let err = run(
            "test",
            &mut Command::new("/nonexistent/capsem-tool"),
            &NoProgress,
            false,
        )
        .unwrap_err();
        assert!(matches!(err, ImageError::Spawn { .. }), "{err}");
    }
}
