//! Egress policy: what a guest may reach. Parses the `[network]` table of `user.toml` and
//! `/etc/capsem/corp.toml`, layers them (preset → user → corp; every key the corp file sets wins
//! and is locked), and decides per request. Pure logic: no I/O beyond reading the two files, no
//! knowledge of the proxy that asks.
//!
//! Decision order for an HTTP request (first match wins):
//! ```text
//!   block list ─▶ per-domain rules, in file order (method + path) ─▶ allow list ─▶ default
//! ```
//! Every decision names the rule that made it, so a denied agent can be told why.

mod matching;
pub mod presets;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use matching::{ambiguous_path, canonical_path, DomainPattern, PathPattern};
pub use presets::Preset;

/// Where the corp lockdown file lives.
pub const CORP_FILE: &str = "/etc/capsem/corp.toml";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin} is not valid: {message}")]
    Parse { origin: String, message: String },
    #[error("{origin}: invalid domain pattern {pattern:?}: use a name like example.com, *.example.com or *")]
    Domain { origin: String, pattern: String },
    #[error(
        "{origin}: invalid path pattern {pattern:?}: start it with '/' (a '*' matches anything)"
    )]
    PathPattern { origin: String, pattern: String },
    #[error("{origin}: invalid method {method:?}: use an HTTP method such as GET or POST, or *")]
    Method { origin: String, method: String },
    #[error("{origin}: invalid upstream override {domain:?} = {target:?}: use \"host:port\"")]
    Upstream {
        origin: String,
        domain: String,
        target: String,
    },
}

/// A per-domain rule as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub domain: String,
    /// `GET`, `POST`, … or `*` (the default).
    #[serde(default)]
    pub method: Option<String>,
    /// `/v1/*` (glob) or `/v1/` (prefix); every path when absent.
    #[serde(default)]
    pub path: Option<String>,
    pub action: Action,
}

/// The `[network]` table of one file, as written: every key optional so that layering can tell
/// "set here" from "not set".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSettings {
    pub preset: Option<Preset>,
    pub default: Option<Action>,
    pub allow: Option<Vec<String>>,
    pub block: Option<Vec<String>>,
    pub rules: Option<Vec<RuleSpec>>,
    pub upstream_override: Option<BTreeMap<String, String>>,
    /// Extra PEM bundle trusted for upstream TLS (besides the system roots).
    pub extra_ca_bundle: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
struct SettingsFile {
    #[serde(default)]
    network: NetworkSettings,
}

impl NetworkSettings {
    /// Parse the `[network]` table of a settings file; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, PolicyError> {
        let file: SettingsFile = toml::from_str(text).map_err(|e| PolicyError::Parse {
            origin: origin.to_string(),
            message: e.message().to_string(),
        })?;
        Ok(file.network)
    }

    /// Read and parse `path`; a missing file is an empty one.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, &path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(PolicyError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Names of the keys this file sets.
    fn keys(&self) -> BTreeSet<&'static str> {
        let mut k = BTreeSet::new();
        let mut add = |set: bool, name| {
            if set {
                k.insert(name);
            }
        };
        add(self.preset.is_some(), "preset");
        add(self.default.is_some(), "default");
        add(self.allow.is_some(), "allow");
        add(self.block.is_some(), "block");
        add(self.rules.is_some(), "rules");
        add(self.upstream_override.is_some(), "upstream_override");
        add(self.extra_ca_bundle.is_some(), "extra_ca_bundle");
        k
    }

    /// `self` with every key `over` sets replaced by `over`'s value.
    fn overlay(mut self, over: &NetworkSettings) -> Self {
        macro_rules! take {
            ($($f:ident),*) => { $( if over.$f.is_some() { self.$f = over.$f.clone(); } )* };
        }
        take!(
            preset,
            default,
            allow,
            block,
            rules,
            upstream_override,
            extra_ca_bundle
        );
        self
    }
}

#[derive(Debug, Clone)]
struct Rule {
    domain: DomainPattern,
    method: Option<String>,
    path: Option<PathPattern>,
    action: Action,
    label: String,
}

/// Why a request was allowed or denied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub action: Action,
    /// The rule that decided, e.g. `block *.evil.com` or `default deny`.
    pub rule: String,
}

/// The effective policy of one session.
#[derive(Debug, Clone)]
pub struct Policy {
    default: Action,
    allow: Vec<DomainPattern>,
    block: Vec<DomainPattern>,
    rules: Vec<Rule>,
    upstream_override: BTreeMap<String, String>,
    extra_ca_bundle: Option<PathBuf>,
    /// Keys set by the corp file: users cannot change them.
    locked: BTreeSet<&'static str>,
}

impl Policy {
    /// Layer the preset (corp's if it names one, else the user's), the user file and the corp
    /// file; every key the corp file sets wins and is locked.
    pub fn layered(user: &NetworkSettings, corp: &NetworkSettings) -> Result<Policy, PolicyError> {
        let preset = corp.preset.or(user.preset);
        let base = preset.map(Preset::settings).unwrap_or_default();
        let merged = base.overlay(user).overlay(corp);
        let mut policy = Policy::build(&merged, "settings")?;
        policy.locked = corp.keys();
        Ok(policy)
    }

    /// Read `user.toml` and the corp file (missing files count as empty) and layer them.
    pub fn load(user_file: &Path, corp_file: &Path) -> Result<Policy, PolicyError> {
        let user = NetworkSettings::load(user_file)?;
        let corp = NetworkSettings::load(corp_file)?;
        Policy::layered(&user, &corp)
    }

    fn build(s: &NetworkSettings, origin: &str) -> Result<Policy, PolicyError> {
        let domains = |list: &Option<Vec<String>>| -> Result<Vec<DomainPattern>, PolicyError> {
            list.iter()
                .flatten()
                .map(|p| {
                    DomainPattern::parse(p).ok_or_else(|| PolicyError::Domain {
                        origin: origin.to_string(),
                        pattern: p.clone(),
                    })
                })
                .collect()
        };
        let mut rules = Vec::new();
        for (i, r) in s.rules.iter().flatten().enumerate() {
            let domain = DomainPattern::parse(&r.domain).ok_or_else(|| PolicyError::Domain {
                origin: origin.to_string(),
                pattern: r.domain.clone(),
            })?;
            let method = match r.method.as_deref() {
                None | Some("*") => None,
                Some(m) if !m.is_empty() && m.bytes().all(|b| b.is_ascii_alphabetic()) => {
                    Some(m.to_ascii_uppercase())
                }
                Some(m) => {
                    return Err(PolicyError::Method {
                        origin: origin.to_string(),
                        method: m.to_string(),
                    })
                }
            };
            let path = match r.path.as_deref() {
                None => None,
                Some(p) => Some(
                    PathPattern::parse(p).ok_or_else(|| PolicyError::PathPattern {
                        origin: origin.to_string(),
                        pattern: p.to_string(),
                    })?,
                ),
            };
            let label = format!(
                "rule {} ({} {} {}{})",
                i + 1,
                r.action.as_str(),
                method.as_deref().unwrap_or("*"),
                r.domain,
                r.path.as_deref().unwrap_or("")
            );
            rules.push(Rule {
                domain,
                method,
                path,
                action: r.action,
                label,
            });
        }
        let mut upstream_override = BTreeMap::new();
        for (domain, target) in s.upstream_override.iter().flatten() {
            let ok = target
                .rsplit_once(':')
                .map(|(h, p)| !h.is_empty() && p.parse::<u16>().map(|p| p > 0).unwrap_or(false))
                .unwrap_or(false);
            if !ok || DomainPattern::parse(domain).is_none() {
                return Err(PolicyError::Upstream {
                    origin: origin.to_string(),
                    domain: domain.clone(),
                    target: target.clone(),
                });
            }
            upstream_override.insert(matching::normalize(domain).into_owned(), target.clone());
        }
        Ok(Policy {
            default: s.default.unwrap_or(Action::Deny),
            allow: domains(&s.allow)?,
            block: domains(&s.block)?,
            rules,
            upstream_override,
            extra_ca_bundle: s.extra_ca_bundle.clone(),
            locked: BTreeSet::new(),
        })
    }

    /// Decide one HTTP request.
    pub fn decide(&self, domain: &str, method: &str, path: &str) -> Decision {
        let domain = matching::normalize(domain);
        let path = matching::canonical_path(path);
        let path = &*path;
        if let Some(p) = self.block.iter().find(|p| p.matches(&domain)) {
            return deny(format!("block {p}"));
        }
        for r in &self.rules {
            if r.domain.matches(&domain)
                && r.method
                    .as_deref()
                    .is_none_or(|m| m.eq_ignore_ascii_case(method))
                && r.path.as_ref().is_none_or(|p| p.matches(path))
            {
                return Decision {
                    action: r.action,
                    rule: r.label.clone(),
                };
            }
        }
        if let Some(p) = self.allow.iter().find(|p| p.matches(&domain)) {
            return allow(format!("allow {p}"));
        }
        Decision {
            action: self.default,
            rule: format!("default {}", self.default.as_str()),
        }
    }

    /// Decide a name lookup: allowed when some request to the domain could be allowed.
    pub fn decide_domain(&self, domain: &str) -> Decision {
        let domain = matching::normalize(domain);
        if let Some(p) = self.block.iter().find(|p| p.matches(&domain)) {
            return deny(format!("block {p}"));
        }
        if let Some(p) = self.allow.iter().find(|p| p.matches(&domain)) {
            return allow(format!("allow {p}"));
        }
        if let Some(r) = self
            .rules
            .iter()
            .find(|r| r.action == Action::Allow && r.domain.matches(&domain))
        {
            return allow(r.label.clone());
        }
        Decision {
            action: self.default,
            rule: format!("default {}", self.default.as_str()),
        }
    }

    /// Where to connect for `domain` instead of its real address (mirrors, test stand-ins).
    pub fn upstream_for(&self, domain: &str) -> Option<&str> {
        self.upstream_override
            .get(&*matching::normalize(domain))
            .map(String::as_str)
    }

    pub fn extra_ca_bundle(&self) -> Option<&Path> {
        self.extra_ca_bundle.as_deref()
    }

    /// Keys the corp file sets (users' values for them are ignored).
    pub fn locked(&self) -> &BTreeSet<&'static str> {
        &self.locked
    }
}

/// Set `[network] preset` in the settings file at `path` (created 0600 if absent), keeping
/// every other key. Running sessions pick the change up on their next request.
pub fn write_preset(path: &Path, preset: Preset) -> Result<(), PolicyError> {
    let origin = path.display().to_string();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(PolicyError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let mut doc: toml::Table = toml::from_str(&text).map_err(|e| PolicyError::Parse {
        origin: origin.clone(),
        message: e.message().to_string(),
    })?;
    let network = doc
        .entry("network")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let Some(table) = network.as_table_mut() else {
        return Err(PolicyError::Parse {
            origin,
            message: "`network` is not a table".into(),
        });
    };
    table.insert("preset".into(), toml::Value::String(preset.as_str().into()));
    let out = toml::to_string(&doc).map_err(|e| PolicyError::Parse {
        origin,
        message: e.to_string(),
    })?;
    crate::paths::write_private(path, out.as_bytes()).map_err(|source| PolicyError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn allow(rule: String) -> Decision {
    Decision {
        action: Action::Allow,
        rule,
    }
}

fn deny(rule: String) -> Decision {
    Decision {
        action: Action::Deny,
        rule,
    }
}

#[cfg(test)]
mod tests;
