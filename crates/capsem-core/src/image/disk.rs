//! The base disk: an empty, pre-formatted, sparse ext4 image that every session's qcow2 uses as
//! its copy-on-write backing file (the guest's overlay upper and `/root`). Made once per asset
//! version; never written after it is built.

use std::fs::File;
use std::path::Path;

use super::error::io_err;
use super::tools::{self, HostTools};
use super::{BuildProgress, ImageError};

/// Size of the base disk (and so of every session's disk): 16 GiB, sparse.
pub const BASE_DISK_SIZE: u64 = 16 << 30;

/// The ext4 volume label, which the guest can mount by (`LABEL=capsem-disk`).
pub const BASE_DISK_LABEL: &str = "capsem-disk";

/// Creates `out` as a sparse [`BASE_DISK_SIZE`] file (`truncate`) and formats it. The inode
/// tables and journal are initialised now (`lazy_*_init=0`) so the guest's kernel does not spend
/// its first minutes zeroing them in the background, and no blocks are reserved for root.
pub(crate) fn make(
    tools: &HostTools,
    out: &Path,
    progress: &dyn BuildProgress,
) -> Result<(), ImageError> {
    let file = File::create(out).map_err(io_err("create", out))?;
    file.set_len(BASE_DISK_SIZE).map_err(io_err("size", out))?;
    drop(file);
    tools::run(
        "base disk",
        tools
            .command("mkfs.ext4")
            .args(["-q", "-F", "-L", BASE_DISK_LABEL])
            .args(["-E", "lazy_itable_init=0,lazy_journal_init=0", "-m", "0"])
            .arg(out),
        progress,
        true,
    )?;
    File::open(out)
        .and_then(|f| f.sync_all())
        .map_err(io_err("sync", out))
}
