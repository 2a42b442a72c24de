//! A session's (or fork image's) disk as a chain of qcow2 layers in one directory:
//! `disk.qcow2` (over the asset's empty ext4 base), then `disk.1.qcow2`, `disk.2.qcow2`, … each
//! over the one before it, named relative to the directory. The highest layer is the writable
//! top; every layer below it is frozen (never written again), so it can be hard-linked into a
//! fork image or another session's directory: an O(1) point-in-time copy whose only outside
//! dependency is the asset version's base disk.

use std::io;
use std::path::{Path, PathBuf};

/// The bottom layer's file name.
pub const FIRST: &str = "disk.qcow2";

/// File name of layer `n` (0 is [`FIRST`]).
pub fn layer_name(n: u32) -> String {
    if n == 0 {
        FIRST.to_string()
    } else {
        format!("disk.{n}.qcow2")
    }
}

/// The layer number of a file name, if it is one.
fn layer_number(name: &str) -> Option<u32> {
    if name == FIRST {
        return Some(0);
    }
    let n = name.strip_prefix("disk.")?.strip_suffix(".qcow2")?;
    if n.is_empty() || n.starts_with('0') || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// The layers in `dir`, bottom first.
pub fn layers(dir: &Path) -> io::Result<Vec<u32>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir)? {
        if let Some(n) = e?.file_name().to_str().and_then(layer_number) {
            v.push(n);
        }
    }
    v.sort_unstable();
    Ok(v)
}

/// The writable top layer of `dir`, if it has a disk.
pub fn top(dir: &Path) -> io::Result<Option<u32>> {
    Ok(layers(dir)?.last().copied())
}

/// Path of the top layer (the file the VM opens), if `dir` has a disk.
pub fn top_path(dir: &Path) -> io::Result<Option<PathBuf>> {
    Ok(top(dir)?.map(|n| dir.join(layer_name(n))))
}

/// Hard-link layers `0..=upto` of `from` into `to` (same names, so their relative backing
/// references resolve inside `to`). `to` must be on the same filesystem; both live in
/// `CAPSEM_HOME`.
pub fn link_layers(from: &Path, to: &Path, upto: u32) -> io::Result<()> {
    for n in layers(from)?.into_iter().filter(|&n| n <= upto) {
        let name = layer_name(n);
        std::fs::hard_link(from.join(&name), to.join(&name))?;
    }
    Ok(())
}

/// Marks a top layer that was added by an offline freeze and has not been booted since: it is
/// still empty, so the layer below it is still the point-in-time copy and the next freeze can
/// hand that out again instead of growing the chain (`disk.fresh`, holding the layer number).
const FRESH: &str = "disk.fresh";

/// Record that layer `n` of `dir` is a fresh, never-booted top.
pub fn mark_fresh(dir: &Path, n: u32) -> io::Result<()> {
    crate::paths::write_private(&dir.join(FRESH), n.to_string().as_bytes())
}

/// Whether layer `n` of `dir` is a fresh top (see [`mark_fresh`]).
pub fn is_fresh(dir: &Path, n: u32) -> bool {
    n > 0 && std::fs::read_to_string(dir.join(FRESH)).is_ok_and(|t| t.trim() == n.to_string())
}

/// Forget the fresh mark: the VM is about to write the top.
pub fn clear_fresh(dir: &Path) -> io::Result<()> {
    match std::fs::remove_file(dir.join(FRESH)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Bytes the layers of `dir` take on disk (shared, hard-linked layers are counted in full).
pub fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    layers(dir)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|n| std::fs::metadata(dir.join(layer_name(n))).ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for n in [0, 1, 2, 10, 123] {
            assert_eq!(layer_number(&layer_name(n)), Some(n));
        }
        for bad in [
            "disk.0.qcow2",
            "disk..qcow2",
            "disk.01.qcow2",
            "disk.x.qcow2",
            "disk.qcow2.bad",
            "other.qcow2",
        ] {
            assert_eq!(layer_number(bad), None, "{bad}");
        }
    }

    #[test]
    fn top_is_the_highest_layer_and_links_share_inodes() {
        use std::os::unix::fs::MetadataExt;
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        assert_eq!(top(&a).unwrap(), None);
        for n in [0, 2, 1, 10] {
            std::fs::write(a.join(layer_name(n)), n.to_string()).unwrap();
        }
        std::fs::write(a.join("session.json"), "{}").unwrap();
        assert_eq!(layers(&a).unwrap(), vec![0, 1, 2, 10]);
        assert_eq!(top_path(&a).unwrap(), Some(a.join("disk.10.qcow2")));
        link_layers(&a, &b, 2).unwrap();
        assert_eq!(layers(&b).unwrap(), vec![0, 1, 2]);
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        assert_eq!(ino(&a.join("disk.1.qcow2")), ino(&b.join("disk.1.qcow2")));
        // The fresh mark names one layer, is not a layer itself, and goes away.
        mark_fresh(&a, 10).unwrap();
        assert!(is_fresh(&a, 10) && !is_fresh(&a, 2));
        assert_eq!(layers(&a).unwrap(), vec![0, 1, 2, 10]);
        clear_fresh(&a).unwrap();
        clear_fresh(&a).unwrap();
        assert!(!is_fresh(&a, 10));
    }
}
