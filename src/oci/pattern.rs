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
/// or `:`, not `localhost`) is a Docker Hub one, and a Docker Hub name of
/// one segment is an official image's: `library/*` means
/// `docker.io/library/*`, `alpine` means `docker.io/library/alpine`. A
/// one-segment Docker Hub name with a wildcard matches both ways, so that
/// it means what it says: `docker.io/*` is every Docker Hub repository
/// (`library/...` and the rest), `redis*` both `library/redis...` and
/// `redis.../...`. `*` alone, or a first segment `*`, matches every registry.
/// Names are lowercase: a pattern with an uppercase letter in its name
/// could never match, and is refused.
#[derive(Clone)]
pub struct RepoPattern(Vec<Glob>);

impl RepoPattern {
    pub fn parse(pattern: &str) -> Result<RepoPattern, String> {
        let p = pattern.trim();
        if p.is_empty() {
            return Err("an empty repository pattern".into());
        }
        let (registry, name) = match p.split_once('/') {
            _ if p == "*" => return Ok(RepoPattern(vec![Glob::new(p)])),
            Some(("*", name)) => ("*".to_owned(), name),
            Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => {
                (canonical_registry(first).unwrap_or_else(|_| first.to_ascii_lowercase()), rest)
            }
            _ => (DOCKER_HUB.to_owned(), p),
        };
        if name.chars().any(|c| c.is_ascii_uppercase()) {
            return Err(format!(
                "repository pattern {pattern:?}: repository names are lowercase, so it would never match (write {:?})",
                p.to_ascii_lowercase()
            ));
        }
        let mut globs = Vec::new();
        if registry == DOCKER_HUB && !name.contains('/') {
            globs.push(Glob::new(&format!("{registry}/library/{name}")));
            if name.contains(['*', '?']) {
                globs.push(Glob::new(&format!("{registry}/{name}")));
            }
        } else {
            globs.push(Glob::new(&format!("{registry}/{name}")));
        }
        Ok(RepoPattern(globs))
    }

    /// Whether the repository key `key` matches.
    pub fn matches(&self, key: &str) -> bool {
        self.0.iter().any(|g| g.matches(key))
    }
}

impl fmt::Display for RepoPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: Vec<String> = self.0.iter().map(Glob::to_string).collect();
        f.write_str(&shown.join(" or "))
    }
}

impl fmt::Debug for RepoPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.to_string())
    }
}
