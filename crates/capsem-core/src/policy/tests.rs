//! Policy decisions, data-driven, and the corp/user layering in both directions.

use super::*;

fn settings(toml: &str) -> NetworkSettings {
    NetworkSettings::parse(toml, "test.toml").unwrap()
}

fn policy(user: &str, corp: &str) -> Policy {
    Policy::layered(&settings(user), &settings(corp)).unwrap()
}

const USER: &str = r#"
[network]
default = "deny"
allow = ["*.pypi.org", "pypi.org", "api.example.com"]
block = ["evil.pypi.org"]

[[network.rules]]
domain = "api.example.com"
method = "POST"
path = "/v1/*"
action = "deny"

[[network.rules]]
domain = "uploads.example.com"
method = "PUT"
path = "/public/"
action = "allow"

[network.upstream_override]
"api.example.com" = "127.0.0.1:8443"
"#;

#[test]
fn decisions() {
    let p = policy(USER, "");
    let cases = [
        (
            "pypi.org",
            "GET",
            "/simple/",
            Action::Allow,
            "allow pypi.org",
        ),
        (
            "files.pypi.org",
            "GET",
            "/x",
            Action::Allow,
            "allow *.pypi.org",
        ),
        (
            "evil.pypi.org",
            "GET",
            "/",
            Action::Deny,
            "block evil.pypi.org",
        ),
        (
            "api.example.com",
            "GET",
            "/v1/models",
            Action::Allow,
            "allow api.example.com",
        ),
        (
            "api.example.com",
            "post",
            "/v1/messages",
            Action::Deny,
            "rule 1",
        ),
        (
            "api.example.com",
            "POST",
            "/v2/messages",
            Action::Allow,
            "allow api.example.com",
        ),
        (
            "uploads.example.com",
            "PUT",
            "/public/a",
            Action::Allow,
            "rule 2",
        ),
        (
            "uploads.example.com",
            "PUT",
            "/private/a",
            Action::Deny,
            "default deny",
        ),
        ("other.com", "GET", "/", Action::Deny, "default deny"),
    ];
    for (domain, method, path, action, rule) in cases {
        let d = p.decide(domain, method, path);
        assert_eq!(d.action, action, "{method} {domain}{path}: {d:?}");
        assert!(d.rule.starts_with(rule), "{method} {domain}{path}: {d:?}");
    }
}

#[test]
fn dns_follows_the_request_rules() {
    let p = policy(USER, "");
    assert_eq!(p.decide_domain("files.pypi.org").action, Action::Allow);
    assert_eq!(p.decide_domain("evil.pypi.org").action, Action::Deny);
    // Only some requests allowed, but the name must resolve for them.
    assert_eq!(p.decide_domain("uploads.example.com").action, Action::Allow);
    assert_eq!(p.decide_domain("nowhere.com").action, Action::Deny);
}

#[test]
fn upstream_override_and_defaults() {
    let p = policy(USER, "");
    assert_eq!(p.upstream_for("API.example.com."), Some("127.0.0.1:8443"));
    assert_eq!(p.upstream_for("pypi.org"), None);
    // Nothing configured: deny by default.
    let empty = policy("", "");
    assert_eq!(empty.decide("example.com", "GET", "/").rule, "default deny");
}

#[test]
fn corp_wins_and_locks_what_it_sets() {
    // Corp sets the default: the user's "allow" is ignored and the key is locked.
    let p = policy(
        "[network]\ndefault = \"allow\"\n",
        "[network]\ndefault = \"deny\"\n",
    );
    assert_eq!(p.decide("x.com", "GET", "/").action, Action::Deny);
    assert!(p.locked().contains("default"));

    // The other direction: corp allows by default, the user cannot tighten a locked key…
    let p = policy(
        "[network]\ndefault = \"deny\"\n",
        "[network]\ndefault = \"allow\"\n",
    );
    assert_eq!(p.decide("x.com", "GET", "/").action, Action::Allow);

    // …but keys the corp file leaves alone stay the user's.
    let p = policy(
        "[network]\nallow = [\"pypi.org\"]\n",
        "[network]\nblock = [\"*.evil.com\"]\n",
    );
    assert_eq!(p.decide("pypi.org", "GET", "/").action, Action::Allow);
    assert_eq!(p.decide("a.evil.com", "GET", "/").action, Action::Deny);
    assert!(p.locked().contains("block") && !p.locked().contains("allow"));

    // A corp block list replaces the user's.
    let p = policy(
        "[network]\ndefault = \"allow\"\nblock = [\"a.com\"]\n",
        "[network]\nblock = [\"b.com\"]\n",
    );
    assert_eq!(p.decide("a.com", "GET", "/").action, Action::Allow);
    assert_eq!(p.decide("b.com", "GET", "/").action, Action::Deny);
}

#[test]
fn presets() {
    let high = policy("[network]\npreset = \"high\"\n", "");
    assert_eq!(
        high.decide("api.anthropic.com", "POST", "/v1/messages")
            .action,
        Action::Allow
    );
    assert_eq!(high.decide("pypi.org", "GET", "/").action, Action::Deny);
    let medium = policy("[network]\npreset = \"medium\"\n", "");
    assert_eq!(medium.decide("pypi.org", "GET", "/").action, Action::Allow);
    assert_eq!(
        medium
            .decide("raw.githubusercontent.com", "GET", "/")
            .action,
        Action::Allow
    );
    assert_eq!(
        medium.decide("example.com", "GET", "/").action,
        Action::Deny
    );
    // The corp preset wins over the user's, and user keys still refine it.
    let p = policy(
        "[network]\npreset = \"medium\"\nblock = [\"api.openai.com\"]\n",
        "[network]\npreset = \"high\"\n",
    );
    assert_eq!(p.decide("pypi.org", "GET", "/").action, Action::Deny);
    assert_eq!(p.decide("api.openai.com", "GET", "/").action, Action::Deny);
    assert_eq!(
        p.decide("api.anthropic.com", "GET", "/").action,
        Action::Allow
    );
}

#[test]
fn bad_files_name_the_problem() {
    let err = |t: &str| {
        let s = NetworkSettings::parse(t, "user.toml");
        match s {
            Err(e) => e.to_string(),
            Ok(s) => Policy::layered(&s, &NetworkSettings::default())
                .unwrap_err()
                .to_string(),
        }
    };
    assert!(err("[network]\ndefault = \"maybe\"\n").contains("user.toml"));
    assert!(err("[network]\nallow = [\"foo*.com\"]\n").contains("invalid domain pattern"));
    assert!(err("[network]\nbogus = 1\n").contains("bogus"));
    let rule = |m: &str, p: &str| {
        format!("[[network.rules]]\ndomain = \"a.com\"\nmethod = \"{m}\"\npath = \"{p}\"\naction = \"deny\"\n")
    };
    assert!(err(&rule("PO ST", "/x")).contains("invalid method"));
    assert!(err(&rule("POST", "x")).contains("invalid path pattern"));
    assert!(err("[network.upstream_override]\n\"a.com\" = \"nohost\"\n").contains("host:port"));
}

#[test]
fn load_treats_missing_files_as_empty() {
    let t = tempfile::tempdir().unwrap();
    let user = t.path().join("user.toml");
    std::fs::write(&user, USER).unwrap();
    let p = Policy::load(&user, &t.path().join("missing-corp.toml")).unwrap();
    assert_eq!(p.decide("pypi.org", "GET", "/").action, Action::Allow);
    assert!(p.locked().is_empty());
}

#[test]
fn write_preset_keeps_other_keys_and_takes_effect() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let user = dir.path().join("user.toml");
    let corp = dir.path().join("corp.toml");
    // Absent file: created private, with only the preset.
    write_preset(&user, Preset::High).unwrap();
    assert_eq!(
        std::fs::metadata(&user).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let p = Policy::load(&user, &corp).unwrap();
    assert_eq!(
        p.decide("api.anthropic.com", "POST", "/v1/messages").action,
        Action::Allow
    );
    assert_eq!(p.decide("pypi.org", "GET", "/simple/").action, Action::Deny);
    // Existing keys survive a preset change.
    std::fs::write(
        &user,
        "[network]\npreset = \"high\"\nblock = [\"github.com\"]\n",
    )
    .unwrap();
    write_preset(&user, Preset::Medium).unwrap();
    let p = Policy::load(&user, &corp).unwrap();
    assert_eq!(
        p.decide("pypi.org", "GET", "/simple/").action,
        Action::Allow
    );
    assert_eq!(p.decide("github.com", "GET", "/").action, Action::Deny);
    // A broken file is reported, not overwritten.
    std::fs::write(&user, "[network\n").unwrap();
    assert!(write_preset(&user, Preset::High).is_err());
    assert_eq!(std::fs::read_to_string(&user).unwrap(), "[network\n");
}

#[test]
fn a_path_rule_sees_through_spellings_of_the_same_path() {
    let p = policy(USER, "");
    for path in [
        "/v1/messages",
        "//v1/messages",
        "/v1//messages",
        "/%761/messages",
        "/%76%31/messages",
        "/./v1/messages",
        "/x/../v1/messages",
        "/%2e/v1/messages",
        "/x/%2E%2E/v1/messages",
        "/v1/messages?x=/v2/",
        "/v1%2Fmessages",
        "/x%2F..%2Fv1/messages",
    ] {
        let d = p.decide("api.example.com", "POST", path);
        assert_eq!(d.action, Action::Deny, "{path}");
    }
    // Other paths are not that path.
    for path in ["/v2/messages", "/v1%3Fmessages", "/../v2/x"] {
        let d = p.decide("api.example.com", "POST", path);
        assert_eq!(d.action, Action::Allow, "{path}");
    }
    use super::matching::canonical_path as c;
    assert_eq!(c("/"), "/");
    assert_eq!(c(""), "/");
    assert_eq!(c("/a/b/"), "/a/b/");
    assert_eq!(c("/a/b/.."), "/a/");
    assert_eq!(c("/a/%7Eu/%zz"), "/a/~u/%zz");
    assert_eq!(c("/%"), "/%");
    assert_eq!(c("//a"), "/a");
    assert_eq!(c("/a//"), "/a/");
    assert_eq!(c("/a/./b"), "/a/b");
    assert_eq!(c("/./"), "/");
    assert_eq!(c("/a?x=/../b"), "/a");
    // The short cut agrees with the long way on every path of up to six of these characters.
    let alphabet = ['/', '.', 'a', '%', '7', '6'];
    let mut paths = vec![String::new()];
    for _ in 0..6 {
        let longer: Vec<String> = paths
            .iter()
            .flat_map(|p| alphabet.iter().map(move |ch| format!("{p}{ch}")))
            .collect();
        for path in &longer {
            assert_eq!(c(path), super::matching::rebuild(path), "{path:?}");
        }
        paths = longer;
    }
    // Paths that already are canonical come back as they are, without a copy.
    for path in ["/", "/a", "/a/b/", "/v1/messages", "/a.b/..c/.d"] {
        assert!(matches!(c(path), std::borrow::Cow::Borrowed(_)), "{path}");
        assert_eq!(c(path), path);
    }
}

#[test]
fn paths_servers_may_read_otherwise_are_ambiguous() {
    for path in [
        "/a/../b",
        "/a/..",
        "/./a",
        "/a/%2e%2e/b",
        "/a/%2E./b",
        "/a%2f..%2fb",
        "/a/..;/b",
        "/a/.;x/b",
        "/a\\b",
        "/a%5Cb",
    ] {
        assert!(ambiguous_path(path).is_some(), "{path}");
    }
    for path in [
        "/",
        "/v1/messages",
        "/a.b/..c/.d/...",
        "/a;b/c",
        "/v1%2Fx",
        "//v1/x",
        "/a?x=/../b",
        "/a?x=\\",
    ] {
        assert_eq!(ambiguous_path(path), None, "{path}");
    }
}
