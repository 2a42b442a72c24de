//! Session ids and names: generation, validation, and lookup by name, id or unique id prefix.

use rand::Rng;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum NameError {
    #[error("invalid {kind} name {name:?}: use 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit")]
    Invalid { kind: &'static str, name: String },
    #[error("invalid {kind} name {name:?}: it looks like a session id; pick a name that is not 12 hex digits")]
    LooksLikeId { kind: &'static str, name: String },
}

/// A fresh 12-hex-digit id.
pub fn new_id() -> String {
    let n: u64 = rand::thread_rng().gen::<u64>() & 0xffff_ffff_ffff;
    format!("{n:012x}")
}

pub fn is_id(s: &str) -> bool {
    s.len() == 12
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// A session's name: see [`NameError`] for the rules.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    validate("session", name)
}

/// An image's name: the same rules as a session's (`create --from` takes either).
pub fn validate_image_name(name: &str) -> Result<(), NameError> {
    validate("image", name)
}

fn validate(kind: &'static str, name: &str) -> Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !ok {
        return Err(NameError::Invalid {
            kind,
            name: name.to_string(),
        });
    }
    if is_id(name) {
        return Err(NameError::LooksLikeId {
            kind,
            name: name.to_string(),
        });
    }
    Ok(())
}

/// What a lookup found.
#[derive(Debug, PartialEq)]
pub enum Lookup<'a> {
    Found(&'a str),
    NotFound,
    Ambiguous(Vec<&'a str>),
}

/// Resolve `query` against `(id, name)` pairs: exact name, then exact id, then unique id prefix.
pub fn resolve<'a, I>(query: &str, sessions: I) -> Lookup<'a>
where
    I: IntoIterator<Item = (&'a str, Option<&'a str>)> + Clone,
{
    if let Some((id, _)) = sessions
        .clone()
        .into_iter()
        .find(|(_, n)| *n == Some(query))
    {
        return Lookup::Found(id);
    }
    if let Some((id, _)) = sessions.clone().into_iter().find(|(id, _)| *id == query) {
        return Lookup::Found(id);
    }
    if query.is_empty() {
        return Lookup::NotFound;
    }
    let hits: Vec<&str> = sessions
        .into_iter()
        .filter(|(id, _)| id.starts_with(query))
        .map(|(id, _)| id)
        .collect();
    match hits.len() {
        0 => Lookup::NotFound,
        1 => Lookup::Found(hits[0]),
        _ => Lookup::Ambiguous(hits),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "mybox", "my-box_1.2", "X9"] {
            assert_eq!(validate_name(good), Ok(()), "{good}");
        }
        for bad in ["", "-x", ".x", "a b", "a/b", "ä", &"a".repeat(64), "x;rm"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            validate_name("0123456789ab"),
            Err(NameError::LooksLikeId { .. })
        ));
        assert!(validate_image_name("a b")
            .unwrap_err()
            .to_string()
            .starts_with("invalid image name"));
    }

    #[test]
    fn ids_are_ids() {
        for _ in 0..100 {
            assert!(is_id(&new_id()));
        }
    }

    #[test]
    fn lookup_order() {
        let s = [
            ("abc123000000", Some("web")),
            ("abd000000000", None),
            ("ffff00000000", Some("abc123000000x")),
        ];
        let it = s.iter().map(|(i, n)| (*i, *n));
        assert_eq!(resolve("web", it.clone()), Lookup::Found("abc123000000"));
        assert_eq!(
            resolve("abd000000000", it.clone()),
            Lookup::Found("abd000000000")
        );
        assert_eq!(resolve("abc", it.clone()), Lookup::Found("abc123000000"));
        assert!(matches!(resolve("ab", it.clone()), Lookup::Ambiguous(v) if v.len() == 2));
        assert_eq!(resolve("zzz", it.clone()), Lookup::NotFound);
        assert_eq!(resolve("", it), Lookup::NotFound);
    }
}
