//! Security presets selectable with `capsem setup --preset`: `medium` lets agents reach package
//! registries, GitHub and the AI APIs; `high` only the AI APIs. Both deny everything else.

use serde::{Deserialize, Serialize};

use super::{Action, NetworkSettings};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    Medium,
    High,
}

/// Model provider APIs (both presets).
pub const AI_APIS: &[&str] = &[
    "api.anthropic.com",
    "api.openai.com",
    "generativelanguage.googleapis.com",
];

/// Package registries and source hosting (`medium` only).
pub const DEV_HOSTS: &[&str] = &[
    "pypi.org",
    "files.pythonhosted.org",
    "registry.npmjs.org",
    "crates.io",
    "index.crates.io",
    "static.crates.io",
    "deb.debian.org",
    "security.debian.org",
    "github.com",
    "*.github.com",
    "*.githubusercontent.com",
    "codeload.github.com",
];

impl Preset {
    pub fn as_str(self) -> &'static str {
        match self {
            Preset::Medium => "medium",
            Preset::High => "high",
        }
    }

    pub fn parse(s: &str) -> Option<Preset> {
        match s {
            "medium" => Some(Preset::Medium),
            "high" => Some(Preset::High),
            _ => None,
        }
    }

    /// The settings the preset stands for (a base that user and corp files override).
    pub fn settings(self) -> NetworkSettings {
        let mut allow: Vec<String> = AI_APIS.iter().map(|s| s.to_string()).collect();
        if self == Preset::Medium {
            allow.extend(DEV_HOSTS.iter().map(|s| s.to_string()));
        }
        NetworkSettings {
            default: Some(Action::Deny),
            allow: Some(allow),
            ..Default::default()
        }
    }
}
