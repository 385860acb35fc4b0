//! Repository and tag patterns, as `--allow-repo`, `--deny-repo` and `--pin`
//! take them, compiled once when the policy or pin is parsed.
//!
//! Matching is wildmatch's: `*` matches any run of characters (`/`
//! included), `?` any one character, nothing else is special; the whole
//! string must match, case-sensitively.

use std::fmt;

use wildmatch::WildMatch;

use super::{DOCKER_HUB, canonical_registry};

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

/// A glob on repository keys (`RepoPath::key`, `registry/name`), written
/// the way names are and normalised exactly as `RepoPath::resolve`
/// normalises them: a pattern without a registry (first segment with no `.`
/// or `:`, not `localhost`) is a Docker Hub one, and a Docker Hub pattern of
/// one segment is an official image's: `library/*` means
/// `docker.io/library/*`, `alpine` means `docker.io/library/alpine`. `*`
/// alone, or a first segment `*`, matches every registry.
#[derive(Clone)]
pub struct RepoPattern(Glob);

impl RepoPattern {
    pub fn new(pattern: &str) -> RepoPattern {
        let p = pattern.trim();
        let (registry, name) = match p.split_once('/') {
            _ if p == "*" => return RepoPattern(Glob::new(p)),
            Some(("*", _)) => return RepoPattern(Glob::new(p)),
            Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => {
                (canonical_registry(first).unwrap_or_else(|_| first.to_ascii_lowercase()), rest)
            }
            _ => (DOCKER_HUB.to_owned(), p),
        };
        let name = if registry == DOCKER_HUB && !name.contains('/') { format!("library/{name}") } else { name.to_owned() };
        RepoPattern(Glob::new(&format!("{registry}/{name}")))
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
