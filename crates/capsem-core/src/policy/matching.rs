//! Domain and path patterns. Domains: `example.com` (exact), `*.example.com` (any subdomain,
//! not the apex), `*` (anything); case-insensitive, trailing dot ignored. Paths: a pattern with
//! `*` is a glob (`*` matches any run of characters, `/` included); without `*` it is a prefix.

use std::borrow::Cow;
use std::fmt;

/// Lowercase and drop a trailing dot (DNS names are case-insensitive; `example.com.` is absolute).
pub fn normalize(domain: &str) -> Cow<'_, str> {
    let d = domain.trim_end_matches('.');
    if d.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(d.to_ascii_lowercase())
    } else {
        Cow::Borrowed(d)
    }
}

/// A request path as the policy judges it: no query or fragment, percent-escapes of unreserved
/// characters and of `/` decoded (`%76` is `v`; many servers route `%2F` as `/`), runs of `/`
/// collapsed, `.` and `..` segments resolved. A server reads `/v1/x`, `//v1/x`, `/%761/x` and
/// `/a/../v1/x` alike, so a path rule must too. Other escapes stay as they are.
pub fn canonical_path(path: &str) -> Cow<'_, str> {
    let path = path.split(['?', '#']).next().unwrap_or("");
    // Most paths already are canonical: judged as they are, without a copy.
    if is_canonical(path) {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(rebuild(path))
    }
}

/// Why servers may read `path` as a different path from the one the policy judges, if they
/// may: a dot segment (`.`, `..`, also escaped as `%2e`, or hidden behind an escaped `/`; and
/// `..;`, which Java servers read as `..`), which the policy resolves but a server that takes
/// paths literally (an object store) does not; or a backslash (also `%5c`), which some
/// servers read as `/` and the policy does not. Such a path is refused rather than judged:
/// clients send neither (they resolve dot segments before sending).
pub fn ambiguous_path(path: &str) -> Option<&'static str> {
    let path = path.split(['?', '#']).next().unwrap_or("");
    // Most paths have no escape, no backslash and no segment starting with a dot: answered
    // without a copy.
    if !path.contains(['%', '\\']) && !path.split('/').any(|s| s.starts_with('.')) {
        return None;
    }
    let lower = path.to_ascii_lowercase();
    if path.contains('\\') || lower.contains("%5c") {
        return Some("a backslash, which some servers read as /");
    }
    let decoded = lower.replace("%2e", ".").replace("%2f", "/");
    let dot = |seg: &str| {
        let seg = seg.split(';').next().unwrap_or(seg);
        seg == "." || seg == ".."
    };
    decoded
        .split('/')
        .any(dot)
        .then_some("a . or .. segment, which servers resolve differently")
}

/// [`canonical_path`] the long way, for a path without its query and fragment.
pub(super) fn rebuild(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                let c = (h * 16 + l) as u8;
                if c.is_ascii_alphanumeric() || b"-._~/".contains(&c) {
                    decoded.push(c);
                    i += 3;
                    continue;
                }
            }
        }
        decoded.push(bytes[i]);
        i += 1;
    }
    let decoded = String::from_utf8_lossy(&decoded);
    let mut segments: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    let mut out = format!("/{}", segments.join("/"));
    if trailing && !segments.is_empty() {
        out.push('/');
    }
    out
}

/// Already what [`canonical_path`] would make of it: rooted, no escapes, no `.` or `..`
/// segment, no empty segment but a trailing one.
fn is_canonical(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    let mut segments = rest.split('/').peekable();
    !path.contains('%')
        && std::iter::from_fn(|| segments.next().map(|s| (s, segments.peek().is_none())))
            .all(|(seg, last)| !matches!(seg, "." | "..") && (last || !seg.is_empty()))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainPattern {
    Any,
    Exact(String),
    /// `*.suffix`: stored as `.suffix`.
    Subdomains(String),
}

impl DomainPattern {
    pub fn parse(p: &str) -> Option<DomainPattern> {
        let p = normalize(p.trim()).into_owned();
        if p == "*" {
            return Some(DomainPattern::Any);
        }
        let (wild, rest) = match p.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, p.as_str()),
        };
        let valid_label = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if rest.is_empty() || rest.len() > 253 || !rest.split('.').all(valid_label) {
            return None;
        }
        Some(if wild {
            DomainPattern::Subdomains(format!(".{rest}"))
        } else {
            DomainPattern::Exact(rest.to_string())
        })
    }

    /// `domain` must already be [`normalize`]d.
    pub fn matches(&self, domain: &str) -> bool {
        match self {
            DomainPattern::Any => true,
            DomainPattern::Exact(d) => d == domain,
            DomainPattern::Subdomains(suffix) => {
                domain.len() > suffix.len() && domain.ends_with(suffix.as_str())
            }
        }
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DomainPattern::Any => f.write_str("*"),
            DomainPattern::Exact(d) => f.write_str(d),
            DomainPattern::Subdomains(s) => write!(f, "*{s}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    Prefix(String),
    Glob(String),
}

impl PathPattern {
    pub fn parse(p: &str) -> Option<PathPattern> {
        if p == "*" {
            return Some(PathPattern::Glob("*".into()));
        }
        if !p.starts_with('/') {
            return None;
        }
        Some(if p.contains('*') {
            PathPattern::Glob(p.to_string())
        } else {
            PathPattern::Prefix(p.to_string())
        })
    }

    /// Match against a request path; a query string is not part of the path.
    pub fn matches(&self, path: &str) -> bool {
        let path = path.split(['?', '#']).next().unwrap_or("");
        match self {
            PathPattern::Prefix(p) => path.starts_with(p.as_str()),
            PathPattern::Glob(g) => glob(g.as_bytes(), path.as_bytes()),
        }
    }
}

/// `*`-only glob, linear time (backtrack to the last star).
fn glob(pat: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        if p < pat.len() && pat[p] == b'*' {
            star = Some((p, i));
            p += 1;
        } else if p < pat.len() && pat[p] == s[i] {
            p += 1;
            i += 1;
        } else if let Some((sp, si)) = star {
            p = sp + 1;
            i = si + 1;
            star = Some((sp, si + 1));
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains() {
        let cases = [
            ("example.com", "example.com", true),
            ("example.com", "EXAMPLE.com.", true),
            ("example.com", "www.example.com", false),
            ("*.example.com", "www.example.com", true),
            ("*.example.com", "a.b.example.com", true),
            ("*.example.com", "example.com", false),
            ("*.example.com", "badexample.com", false),
            ("*", "anything.at.all", true),
        ];
        for (pat, dom, want) in cases {
            let p = DomainPattern::parse(pat).unwrap();
            assert_eq!(p.matches(&normalize(dom)), want, "{pat} vs {dom}");
        }
        for bad in [
            "",
            "exa mple.com",
            "foo*.com",
            "*.-a.com",
            "a..b",
            "-a.com",
            "*.*.com",
            "x/y",
        ] {
            assert!(DomainPattern::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn paths() {
        let cases = [
            ("/v1/", "/v1/messages", true),
            ("/v1/", "/v2/messages", false),
            ("/v1/*", "/v1/messages", true),
            ("/v1/*", "/v1", false),
            ("/v1/*/stream", "/v1/models/x/stream", true),
            ("/v1/*/stream", "/v1/models/x/streamed", false),
            ("*", "/anything", true),
            ("/a*b*c", "/aXXbYYc", true),
            ("/a*b*c", "/aXXbYY", false),
            ("/v1/", "/v1/x?next=/v2/", true),
            ("/admin", "/api?redirect=/admin", false),
        ];
        for (pat, path, want) in cases {
            let p = PathPattern::parse(pat).unwrap();
            assert_eq!(p.matches(path), want, "{pat} vs {path}");
        }
        assert!(PathPattern::parse("v1/").is_none());
    }
}
