//! Fork images: `images/<name>/` holds `image.json` ([`ImageRecord`]) and hard links to the
//! frozen disk layers of the session it was forked from (see [`crate::disk`]). An image depends
//! only on its asset version's base disk; sessions cloned from it hard-link its layers in turn,
//! so deleting an image never takes data from a session.

use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::paths::{self, Home};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Name (or id) of the session it was forked from.
    pub source: String,
    /// Unix seconds.
    pub created_at: u64,
    /// The guest asset version its disk was made for.
    pub asset_version: String,
    /// Defaults for sessions made from it.
    pub ram_mb: u32,
    pub cpus: u32,
}

impl ImageRecord {
    pub const FILE: &'static str = "image.json";

    pub fn save(&self, dir: &Path) -> io::Result<()> {
        let json = serde_json::to_vec_pretty(self).expect("record serializes");
        paths::write_private(&dir.join(Self::FILE), &json)
    }

    pub fn load(dir: &Path) -> io::Result<Self> {
        let data = std::fs::read(dir.join(Self::FILE))?;
        serde_json::from_slice(&data).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

/// Whether an image named `name` exists (never for a string that is not a valid name, so no
/// lookup leaves `images/`).
pub fn exists(home: &Home, name: &str) -> bool {
    crate::names::validate_image_name(name).is_ok()
        && home.image_dir(name).join(ImageRecord::FILE).is_file()
}

/// Every readable image, by name.
pub fn list(home: &Home) -> Vec<ImageRecord> {
    let mut v: Vec<ImageRecord> = std::fs::read_dir(home.images_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter(|d| !d.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|d| ImageRecord::load(&d.path()).ok())
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// Publish an image: `fill` populates a private staging directory, which is then renamed into
/// place, so a half-made image is never listed. Fails with `AlreadyExists` if the name is taken.
pub fn publish(
    home: &Home,
    record: &ImageRecord,
    fill: impl FnOnce(&Path) -> io::Result<()>,
) -> io::Result<()> {
    let staging = home
        .images_dir()
        .join(format!(".{}.{}", record.name, crate::names::new_id()));
    let made = (|| {
        paths::private_dir(&staging)?;
        fill(&staging)?;
        record.save(&staging)?;
        let target = home.image_dir(&record.name);
        let taken = || {
            io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("image {:?} exists", record.name),
            )
        };
        if target.exists() {
            return Err(taken());
        }
        // A racing publish of the same name may have won since: rename onto its non-empty
        // directory fails with ENOTEMPTY (or EEXIST).
        std::fs::rename(&staging, &target).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOTEMPTY) | Some(libc::EEXIST) => taken(),
            _ => e,
        })
    })();
    if made.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    made
}

/// Remove leftovers of publishes interrupted by a crash.
pub fn clean_staging(home: &Home) {
    for d in std::fs::read_dir(home.images_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        if d.file_name().to_string_lossy().starts_with('.') {
            let _ = std::fs::remove_dir_all(d.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str) -> ImageRecord {
        ImageRecord {
            name: name.into(),
            description: "d".into(),
            source: "box".into(),
            created_at: 1,
            asset_version: "0.1.0".into(),
            ram_mb: 1024,
            cpus: 1,
        }
    }

    #[test]
    fn publish_is_all_or_nothing() {
        let t = tempfile::tempdir().unwrap();
        let home = Home::new(t.path());
        home.ensure().unwrap();
        publish(&home, &record("a"), |d| {
            std::fs::write(d.join("disk.qcow2"), "x")
        })
        .unwrap();
        assert!(exists(&home, "a"));
        assert!(home.image_dir("a").join("disk.qcow2").is_file());
        // A failing fill leaves nothing behind; a taken name is refused.
        let e = publish(&home, &record("b"), |_| Err(io::Error::other("no"))).unwrap_err();
        assert_eq!(e.to_string(), "no");
        let e = publish(&home, &record("a"), |_| Ok(())).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(list(&home), vec![record("a")]);
        // Only valid names are looked up: nothing outside `images/` is ever an image.
        std::fs::write(t.path().join(ImageRecord::FILE), "{}").unwrap();
        for bad in ["..", "../", "/", "a/../a", ""] {
            assert!(!exists(&home, bad), "{bad}");
        }
        assert_eq!(std::fs::read_dir(home.images_dir()).unwrap().count(), 1);
    }
}
