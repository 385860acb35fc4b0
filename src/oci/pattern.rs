//! Repository and tag patterns, as `--allow-repo`, `--deny-repo` and `--pin`
//! take them, compiled once when the policy or pin is parsed.
//!
//! Matching is wildmatch's: `*` matches any run of characters (`/`
//! included), `?` any one character, nothing else is special; the whole
//! string must match, case-sensitively.

use std::fmt;

use wildmatch::WildMatch;

use super::DOCKER_HUB;

/// A glob on a tag (or any string): `3.*`, `v1.?`. Shown (`Debug`,
/// `Display`) as its pattern text.
#[derive(Clone)]
pub struct Glob(WildMatch);

impl Glob {
    pub fn new(pattern: &str) -> Glob {
        Glob(WildMatch::new(pattern))
    }

    pub fn matches(&self, text: &str) -> bool {
        self.0.matches(text)
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0.to_string())
    }
}

/// A glob on repository keys (`RepoPath::key`, `registry/name`). A pattern
/// without a registry (first segment with no `.` or `:`) is a Docker Hub
/// one: `library/*` means `docker.io/library/*`; `*` alone is every
/// repository.
#[derive(Clone)]
pub struct RepoPattern(Glob);

impl RepoPattern {
    pub fn new(pattern: &str) -> RepoPattern {
        let p = pattern.trim();
        RepoPattern(Glob::new(&match p.split_once('/') {
            Some((first, _)) if first.contains(['.', ':']) || first == "*" => p.to_owned(),
            _ if p == "*" => p.to_owned(),
            _ => format!("{DOCKER_HUB}/{p}"),
        }))
    }

    /// Whether the repository key `key` matches.
    pub fn matches(&self, key: &str) -> bool {
        self.0.matches(key)
    }
}

impl fmt::Display for RepoPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for RepoPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}
