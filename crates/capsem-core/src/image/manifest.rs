//! `manifest.json`: what an asset directory holds and what it was built from. Owns the file
//! digests, the per-piece input digests and the decision of which pieces are stale. Runs no
//! build step.
//!
//! Each piece (kernel, initrd, rootfs, base disk) records the digest of its own inputs, so a
//! change to one input rebuilds only what depends on it: a new agent binary rebuilds the initrd
//! alone; a new kernel package the kernel and the initrd (its modules); a new package list the
//! rootfs alone.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::disk::{BASE_DISK_LABEL, BASE_DISK_SIZE};
use super::error::io_err;
use super::kernel::{KernelPackage, INITRD_MODULES};
use super::rootfs::{GUEST_HOSTNAME, RESOLV_CONF_PLACEHOLDER, SUITE};
use super::{ImageError, VERSION};

/// The manifest's file name in the version directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Bump when the builder makes different output from the same inputs: every piece goes stale.
pub const BUILDER_FORMAT: u32 = 1;

/// How the kernel piece is made from the package's bzImage (see `pvh.rs`); a change rebuilds
/// only the kernel and the initrd.
const KERNEL_FORMAT: &str = "pvh-elf-if-lz4";

/// How the initrd's modules are stored (see `initrd::strip_signature`); a change rebuilds the
/// initrd only.
const INITRD_FORMAT: &str = "modules-without-signatures";

/// The contents of `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// capsem-core's version (the `v<VERSION>` directory).
    pub version: String,
    /// [`BUILDER_FORMAT`] of the builder that wrote it.
    pub format: u32,
    /// `uname -r` of the guest kernel, e.g. `6.1.0-56-cloud-amd64`.
    pub kernel_release: String,
    /// The Debian package the kernel and modules came from.
    pub kernel_package: String,
    pub kernel_package_version: String,
    /// SHA-256 of that package's `.deb`.
    pub kernel_deb_sha256: String,
    /// The initrd's modules in load order (the contents of `/modules/order`).
    pub modules: Vec<String>,
    /// Debian suite and the packages added to minbase (sorted).
    pub suite: String,
    pub packages: Vec<String>,
    /// When this manifest was written, RFC 3339 UTC.
    pub built_at: String,
    /// Digest of all inputs (version, builder format, each piece's inputs).
    pub inputs_digest: String,
    /// Every asset file by name.
    pub files: BTreeMap<String, FileEntry>,
}

/// One asset file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// The file's digest, of the kind given by `digest`.
    pub sha256: String,
    pub size: u64,
    /// How `sha256` was computed.
    #[serde(default)]
    pub digest: DigestKind,
    /// Modification time when built (ns since the epoch); with `size`, the cheap up-to-date check.
    #[serde(default)]
    pub mtime_ns: u64,
    /// Digest of the inputs this file was built from.
    pub inputs_digest: String,
}

/// How a [`FileEntry::sha256`] is computed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DigestKind {
    /// SHA-256 of the bytes, as `sha256sum` prints it.
    #[default]
    Sha256,
    /// For the sparse base disk: SHA-256 over a header (a tag and the file size) followed by the
    /// offset (u64 LE) and contents of every 4 KiB block that is not all zeros. It depends only
    /// on the file's contents, not its layout on disk, and reads only allocated data: hashing the
    /// 16 GiB of zeros instead takes ~10 s in a release build and minutes in a debug one.
    SparseBlocksSha256,
}

impl DigestKind {
    pub fn compute(self, path: &Path) -> io::Result<String> {
        match self {
            DigestKind::Sha256 => sha256_file(path),
            DigestKind::SparseBlocksSha256 => sparse_blocks_sha256(path),
        }
    }
}

impl FileEntry {
    /// Digests `path` as it is now.
    pub(crate) fn of(
        path: &Path,
        digest: DigestKind,
        inputs_digest: &str,
    ) -> Result<FileEntry, ImageError> {
        let meta = fs::metadata(path).map_err(io_err("inspect", path))?;
        let sha256 = digest.compute(path).map_err(io_err("hash", path))?;
        Ok(FileEntry {
            sha256,
            size: meta.len(),
            digest,
            mtime_ns: mtime_ns(&meta),
            inputs_digest: inputs_digest.to_string(),
        })
    }

    /// Whether `path` is still this file: same size, and same mtime or (when the mtime differs,
    /// or `verify` asks for it) same digest.
    pub(crate) fn matches(&self, path: &Path, verify: bool) -> bool {
        let Ok(meta) = fs::metadata(path) else {
            return false;
        };
        if !meta.is_file() || meta.len() != self.size {
            return false;
        }
        if !verify && self.mtime_ns != 0 && mtime_ns(&meta) == self.mtime_ns {
            return true;
        }
        self.digest
            .compute(path)
            .map(|sha| sha == self.sha256)
            .unwrap_or(false)
    }
}

fn mtime_ns(meta: &fs::Metadata) -> u64 {
    (meta.mtime() as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(meta.mtime_nsec() as u64)
}

/// Reads `<dir>/manifest.json`. Absent → [`ImageError::Missing`]; unreadable JSON →
/// [`ImageError::Manifest`].
pub fn read(dir: &Path) -> Result<Manifest, ImageError> {
    let path = dir.join(MANIFEST_FILE);
    let text = match fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ImageError::Missing {
                dir: dir.to_path_buf(),
            })
        }
        Err(e) => return Err(io_err("read", &path)(e)),
    };
    serde_json::from_slice(&text).map_err(|source| ImageError::Manifest {
        action: "parse",
        path,
        source,
    })
}

/// Writes `<dir>/manifest.json` (pretty, trailing newline) and syncs it.
pub(crate) fn write(dir: &Path, manifest: &Manifest) -> Result<(), ImageError> {
    let path = dir.join(MANIFEST_FILE);
    let mut text = serde_json::to_vec_pretty(manifest).map_err(|source| ImageError::Manifest {
        action: "encode",
        path: path.clone(),
        source,
    })?;
    text.push(b'\n');
    fs::write(&path, text)
        .and_then(|()| File::open(&path)?.sync_all())
        .map_err(io_err("write", &path))
}

/// The asset pieces, each one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Piece {
    Kernel,
    Initrd,
    Rootfs,
    Disk,
}

impl Piece {
    pub(crate) const ALL: [Piece; 4] = [Piece::Kernel, Piece::Initrd, Piece::Rootfs, Piece::Disk];

    pub(crate) fn file(self) -> &'static str {
        match self {
            Piece::Kernel => super::KERNEL,
            Piece::Initrd => super::INITRD,
            Piece::Rootfs => super::ROOTFS,
            Piece::Disk => super::BASE_DISK,
        }
    }

    pub(crate) fn digest_kind(self) -> DigestKind {
        match self {
            Piece::Disk => DigestKind::SparseBlocksSha256,
            _ => DigestKind::Sha256,
        }
    }
}

/// The input digests of each piece and of the whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Inputs {
    pub kernel: String,
    pub initrd: String,
    pub rootfs: String,
    pub disk: String,
    pub all: String,
}

impl Inputs {
    /// `deb_sha256` is `None` when the kernel `.deb` is neither cached nor recorded: the kernel is
    /// then stale by construction (no recorded digest was made from "unknown").
    pub(crate) fn compute(
        agent_sha256: &str,
        kernel: &KernelPackage,
        deb_sha256: Option<&str>,
        packages: &[String],
    ) -> Inputs {
        let format = BUILDER_FORMAT.to_string();
        let kernel = digest(&[
            "kernel",
            &format,
            KERNEL_FORMAT,
            &kernel.name,
            &kernel.version,
            deb_sha256.unwrap_or("unknown"),
        ]);
        let initrd = digest(&[
            "initrd",
            &format,
            INITRD_FORMAT,
            &kernel,
            agent_sha256,
            &INITRD_MODULES.join(","),
        ]);
        let rootfs = digest(&[
            "rootfs",
            &format,
            SUITE,
            &packages.join(","),
            GUEST_HOSTNAME,
            RESOLV_CONF_PLACEHOLDER,
            &super::rootfs::SQUASHFS_COMPRESSION.join(" "),
        ]);
        let disk = digest(&[
            "disk",
            &format,
            &BASE_DISK_SIZE.to_string(),
            BASE_DISK_LABEL,
        ]);
        let all = digest(&[
            "capsem-image",
            VERSION,
            &format,
            &kernel,
            &initrd,
            &rootfs,
            &disk,
        ]);
        Inputs {
            kernel,
            initrd,
            rootfs,
            disk,
            all,
        }
    }

    pub(crate) fn of(&self, piece: Piece) -> &str {
        match piece {
            Piece::Kernel => &self.kernel,
            Piece::Initrd => &self.initrd,
            Piece::Rootfs => &self.rootfs,
            Piece::Disk => &self.disk,
        }
    }
}

/// The pieces of `dir` that must be rebuilt for `inputs`: those the manifest does not list with
/// these inputs, and those whose file no longer [`FileEntry::matches`]. A stale kernel makes the
/// initrd stale too (its modules come from the kernel).
pub(crate) fn stale_pieces(
    dir: &Path,
    existing: Option<&Manifest>,
    inputs: &Inputs,
    verify: bool,
) -> Vec<Piece> {
    let Some(manifest) = existing.filter(|m| m.version == VERSION && m.format == BUILDER_FORMAT)
    else {
        return Piece::ALL.to_vec();
    };
    let mut stale: Vec<Piece> = Piece::ALL
        .into_iter()
        .filter(|&piece| {
            !manifest.files.get(piece.file()).is_some_and(|entry| {
                entry.inputs_digest == inputs.of(piece)
                    && entry.digest == piece.digest_kind()
                    && entry.matches(&dir.join(piece.file()), verify)
            })
        })
        .collect();
    if stale.contains(&Piece::Kernel) && !stale.contains(&Piece::Initrd) {
        stale.push(Piece::Initrd);
        stale.sort();
    }
    stale
}

/// SHA-256 over length-prefixed parts (so `["ab","c"]` and `["a","bc"]` differ).
pub(crate) fn digest(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    hex::encode(hasher.finalize())
}

/// SHA-256 of a file's bytes.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

const BLOCK: u64 = 4096;

/// [`DigestKind::SparseBlocksSha256`] of a file: walks its data extents with
/// `SEEK_DATA`/`SEEK_HOLE` (the whole file where those are unsupported) and hashes every
/// non-zero 4 KiB block with its offset.
pub fn sparse_blocks_sha256(path: &Path) -> io::Result<String> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut hasher = Sha256::new();
    hasher.update(b"capsem-sparse-blocks-sha256-v1\0");
    hasher.update(size.to_le_bytes());
    let mut buf = vec![0u8; 1 << 20];
    let mut next_block = 0u64; // first block index not yet hashed
    let mut pos = 0u64;
    while pos < size {
        let (start, end) = match data_extent(&file, pos, size) {
            Some(extent) => extent,
            None => break,
        };
        let mut block = (start / BLOCK).max(next_block);
        let last = end.div_ceil(BLOCK);
        while block < last {
            let offset = block * BLOCK;
            let want = ((last - block) * BLOCK)
                .min(buf.len() as u64)
                .min(size - offset) as usize;
            let got = read_at_full(&file, &mut buf[..want], offset)?;
            for (i, chunk) in buf[..got].chunks(BLOCK as usize).enumerate() {
                if chunk.iter().any(|&b| b != 0) {
                    hasher.update((offset + i as u64 * BLOCK).to_le_bytes());
                    hasher.update(chunk);
                }
            }
            if got < want {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "file shrank while hashing",
                ));
            }
            block += (got as u64).div_ceil(BLOCK);
        }
        next_block = last;
        pos = end;
    }
    Ok(hex::encode(hasher.finalize()))
}

/// The next data extent at or after `pos`, or `None` when only a hole remains.
fn data_extent(file: &File, pos: u64, size: u64) -> Option<(u64, u64)> {
    let fd = file.as_raw_fd();
    let seek = |whence| nix::unistd::lseek(fd, pos as libc::off_t, whence).map(|o| o as u64);
    let start = match seek(nix::unistd::Whence::SeekData) {
        Ok(start) => start,
        Err(nix::errno::Errno::ENXIO) => return None,
        // No SEEK_DATA here: treat the rest as data.
        Err(_) => return Some((pos, size)),
    };
    let fd_end = nix::unistd::lseek(fd, start as libc::off_t, nix::unistd::Whence::SeekHole)
        .map(|o| o as u64)
        .unwrap_or(size);
    Some((start, fd_end.min(size)))
}

fn read_at_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// `time` as RFC 3339 UTC (`2025-01-31T12:00:00Z`).
pub(crate) fn rfc3339_utc(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
