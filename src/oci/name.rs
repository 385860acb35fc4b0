//! Names and what they point at: digests (`sha256:<hex>`), repository
//! paths (registry + name, as the distribution grammar allows them) and
//! references (a tag or a digest).

use std::fmt;

use sha2::{Digest as _, Sha256};

use super::{ErrorCode, RegistryError};

/// The registry that unqualified names (`alpine`, `org/img`) belong to.
pub const DOCKER_HUB: &str = "docker.io";

/// Longest repository name the distribution spec allows.
const MAX_NAME_LEN: usize = 255;

/// A validated `sha256:<64 lowercase hex>` content digest.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    pub fn parse(s: &str) -> Result<Digest, RegistryError> {
        let invalid = |why: &str| RegistryError::new(ErrorCode::DigestInvalid, format!("invalid digest {s:?}: {why}"));
        let Some((alg, hex)) = s.split_once(':') else {
            return Err(invalid("expected <algorithm>:<hex>"));
        };
        let alg_ok = !alg.is_empty()
            && alg.split(['+', '.', '_', '-']).all(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
        if !alg_ok || hex.is_empty() {
            return Err(invalid("malformed"));
        }
        if alg != "sha256" {
            return Err(RegistryError::new(
                ErrorCode::DigestInvalid,
                format!("unsupported digest algorithm {alg:?}: this mirror serves sha256 content only"),
            ));
        }
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(invalid("sha256 needs 64 lowercase hex characters"));
        }
        Ok(Digest(s.to_owned()))
    }

    /// The sha256 digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(format!("sha256:{}", hex::encode(Sha256::digest(bytes))))
    }

    pub fn from_sha256(hash: &[u8]) -> Digest {
        Digest(format!("sha256:{}", hex::encode(hash)))
    }

    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A repository on one upstream registry: `docker.io` + `library/alpine`.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct RepoPath {
    /// Canonical registry name (`docker.io`, `ghcr.io`, `127.0.0.1:5001`).
    pub registry: String,
    /// The repository name on that registry, validated and normalised.
    pub name: String,
}

impl RepoPath {
    /// Resolves the name a client sent to a registry and repository.
    ///
    /// The registry comes from containerd's `?ns=` parameter, else from a first
    /// path segment that looks like a host (contains `.` or `:`, or is
    /// `localhost`), else it is Docker Hub. Single-segment Docker Hub names are
    /// normalised to `library/<name>`.
    pub fn resolve(raw_name: &str, ns: Option<&str>) -> Result<RepoPath, RegistryError> {
        let (registry, name) = match ns {
            Some(ns) if !ns.is_empty() => (canonical_registry(ns)?, raw_name),
            _ => match raw_name.split_once('/') {
                Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => (canonical_registry(first)?, rest),
                _ => (DOCKER_HUB.to_owned(), raw_name),
            },
        };
        validate_name(name)?;
        let name = if registry == DOCKER_HUB && !name.contains('/') { format!("library/{name}") } else { name.to_owned() };
        if name.len() > MAX_NAME_LEN {
            return Err(RegistryError::new(
                ErrorCode::NameInvalid,
                format!("invalid repository name {name:?}: longer than 255 characters"),
            ));
        }
        Ok(RepoPath { registry, name })
    }

    /// The key this repository is cached under: `docker.io/library/alpine`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.registry, self.name)
    }

    /// The repository a stored `key()` names.
    pub fn from_key(key: &str) -> Option<RepoPath> {
        let (registry, name) = key.split_once('/')?;
        Some(RepoPath { registry: registry.to_owned(), name: name.to_owned() })
    }
}

impl fmt::Display for RepoPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.name)
    }
}

/// Docker Hub answers to several host names; they all cache as `docker.io`.
pub fn canonical_registry(host: &str) -> Result<String, RegistryError> {
    let host = host.trim().to_ascii_lowercase();
    let valid = !host.is_empty()
        && host.len() <= 253
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    if !valid {
        return Err(RegistryError::new(ErrorCode::NameInvalid, format!("invalid registry name {host:?}")));
    }
    Ok(match host.as_str() {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => DOCKER_HUB.to_owned(),
        _ => host,
    })
}

/// Validates a repository name against the distribution-spec grammar:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
pub fn validate_name(name: &str) -> Result<(), RegistryError> {
    let invalid = |why: &str| RegistryError::new(ErrorCode::NameInvalid, format!("invalid repository name {name:?}: {why}"));
    if name.is_empty() {
        return Err(invalid("empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(invalid("longer than 255 characters"));
    }
    for component in name.split('/') {
        if !valid_component(component) {
            return Err(invalid("components are lowercase letters and digits separated by '.', '_', '__' or '-'"));
        }
    }
    Ok(())
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or "-"+, always followed by alnum.
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || i >= b.len() || !alnum(b[i]) {
            return false;
        }
    }
    true
}

/// Splits an image reference `name[:tag|@digest]` into the name and the
/// reference (`latest` when none is given). A `:` inside the name (a
/// registry port, `localhost:5000/x`) is not taken for a tag.
pub fn split_image(image: &str) -> (&str, &str) {
    match image.rsplit_once('@') {
        Some((name, digest)) => (name, digest),
        None => match image.rsplit_once(':').filter(|(_, t)| !t.contains('/')) {
            Some((name, tag)) => (name, tag),
            None => (image, "latest"),
        },
    }
}

/// What a manifest request names: a mutable tag or an immutable digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

impl Reference {
    pub fn parse(s: &str) -> Result<Reference, RegistryError> {
        if s.contains(':') {
            return Digest::parse(s).map(Reference::Digest);
        }
        let b = s.as_bytes();
        let word = |x: u8| x.is_ascii_alphanumeric() || x == b'_';
        let ok = !b.is_empty() && b.len() <= 128 && word(b[0]) && b.iter().all(|&x| word(x) || x == b'.' || x == b'-');
        if !ok {
            return Err(RegistryError::new(ErrorCode::TagInvalid, format!("invalid tag {s:?}")));
        }
        Ok(Reference::Tag(s.to_owned()))
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => f.write_str(t),
            Reference::Digest(d) => f.write_str(d.as_str()),
        }
    }
}
