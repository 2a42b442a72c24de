//! `sessions/<id>/session.json`: what a session is (its identity and resources), written once at
//! create and read back when the service starts. Runtime status is not stored here.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::paths;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub id: String,
    pub name: Option<String>,
    pub persistent: bool,
    pub ram_mb: u32,
    pub cpus: u32,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Unix seconds.
    pub created_at: u64,
    /// The guest asset version this session's disk was made for.
    pub asset_version: String,
    /// The fork image it was created from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_image: Option<String>,
}

impl SessionRecord {
    pub const FILE: &'static str = "session.json";

    /// The name if it has one, else the id.
    pub fn display_name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.id)
    }

    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).expect("record serializes");
        paths::write_private(&dir.join(Self::FILE), &json)
    }

    pub fn load(dir: &Path) -> std::io::Result<Self> {
        let data = std::fs::read(dir.join(Self::FILE))?;
        serde_json::from_slice(&data)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let t = tempfile::tempdir().unwrap();
        let r = SessionRecord {
            id: "0123456789ab".into(),
            name: Some("box".into()),
            persistent: true,
            ram_mb: 1024,
            cpus: 2,
            env: vec![("A".into(), "b".into())],
            created_at: 1,
            asset_version: "0.1.0".into(),
            from_image: Some("tmpl".into()),
        };
        r.save(t.path()).unwrap();
        assert_eq!(SessionRecord::load(t.path()).unwrap(), r);
    }
}
