//! Registry vocabulary: repository names, references, digests, manifest media
//! types and content negotiation, and the one table of OCI error codes.
//!
//! Everything here is pure: no I/O, no HTTP framework, no storage. The router
//! parses requests into these types; the service and the backends pass them on.

use std::borrow::Cow;
use std::fmt;

use sha2::{Digest as _, Sha256};

/// The registry that unqualified names (`alpine`, `org/img`) belong to.
pub const DOCKER_HUB: &str = "docker.io";

/// Longest repository name the distribution spec allows.
const MAX_NAME_LEN: usize = 255;

// ---------------------------------------------------------------------------
// Error codes
// ---------------------------------------------------------------------------

macro_rules! error_codes {
    ($($variant:ident => ($code:literal, $status:literal, $message:literal)),+ $(,)?) => {
        /// Every OCI / distribution error code the mirror answers with,
        /// registered once with its HTTP status and default message.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum ErrorCode { $($variant),+ }

        impl ErrorCode {
            pub fn as_str(self) -> &'static str {
                match self { $(ErrorCode::$variant => $code),+ }
            }
            pub fn status(self) -> u16 {
                match self { $(ErrorCode::$variant => $status),+ }
            }
            pub fn message(self) -> &'static str {
                match self { $(ErrorCode::$variant => $message),+ }
            }
        }
    };
}

error_codes! {
    BlobUnknown => ("BLOB_UNKNOWN", 404, "blob unknown to registry"),
    DigestInvalid => ("DIGEST_INVALID", 400, "provided digest did not match uploaded content"),
    ManifestUnknown => ("MANIFEST_UNKNOWN", 404, "manifest unknown"),
    ManifestInvalid => ("MANIFEST_INVALID", 502, "manifest invalid"),
    NameInvalid => ("NAME_INVALID", 400, "invalid repository name"),
    NameUnknown => ("NAME_UNKNOWN", 404, "repository name not known to registry"),
    TagInvalid => ("TAG_INVALID", 400, "manifest tag did not match URI"),
    PaginationNumberInvalid => ("PAGINATION_NUMBER_INVALID", 400, "invalid number of results requested"),
    Unauthorized => ("UNAUTHORIZED", 401, "authentication required"),
    Denied => ("DENIED", 403, "requested access to the resource is denied"),
    Unsupported => ("UNSUPPORTED", 405, "the operation is unsupported"),
    TooManyRequests => ("TOOMANYREQUESTS", 429, "too many requests"),
    Unavailable => ("UNAVAILABLE", 503, "service unavailable"),
    Unknown => ("UNKNOWN", 500, "unknown error"),
}

/// An error the client will see: an OCI code plus a human message. `internal`
/// carries the cause for the server log (never sent to the client).
#[derive(Debug, Clone)]
pub struct RegistryError {
    pub code: ErrorCode,
    pub message: Cow<'static, str>,
    pub internal: Option<String>,
    /// Seconds the client should wait before retrying (429/503).
    pub retry_after: Option<u64>,
}

impl RegistryError {
    pub fn new(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        RegistryError { code, message: message.into(), internal: None, retry_after: None }
    }
    pub fn code(code: ErrorCode) -> Self {
        RegistryError::new(code, code.message())
    }
    pub fn with_internal(mut self, cause: impl fmt::Display) -> Self {
        self.internal = Some(cause.to_string());
        self
    }
    pub fn with_retry_after(mut self, secs: Option<u64>) -> Self {
        self.retry_after = secs;
        self
    }
    /// The OCI error body: `{"errors":[{"code","message","detail"}]}`.
    pub fn body(&self) -> String {
        serde_json::json!({
            "errors": [{ "code": self.code.as_str(), "message": self.message, "detail": null }]
        })
        .to_string()
    }
}

impl fmt::Display for RegistryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)?;
        if let Some(i) = &self.internal {
            write!(f, " ({i})")?;
        }
        Ok(())
    }
}

impl std::error::Error for RegistryError {}

// ---------------------------------------------------------------------------
// Digests
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Names and references
// ---------------------------------------------------------------------------

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
        Ok(RepoPath { registry, name })
    }

    /// The key this repository is cached under: `docker.io/library/alpine`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.registry, self.name)
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

// ---------------------------------------------------------------------------
// Manifests and content negotiation
// ---------------------------------------------------------------------------

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// The manifest media types the mirror caches, most preferred first.
pub const MANIFEST_TYPES: [&str; 4] = [OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST];

/// Largest manifest accepted from upstream (distribution's own limit).
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

/// The manifest media types a client accepts, from its `Accept` headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accept {
    /// Supported manifest types the client listed, in canonical order.
    types: Vec<&'static str>,
    /// The client sent no Accept header, or a wildcard: anything goes.
    any: bool,
}

impl Accept {
    /// Parses every `Accept` header value (comma-separated, `;q=0` excluded).
    pub fn parse<'a>(values: impl IntoIterator<Item = &'a str>) -> Accept {
        let mut listed = Vec::new();
        let mut any = false;
        let mut seen_header = false;
        for value in values {
            seen_header = true;
            for item in value.split(',') {
                let mut parts = item.split(';');
                let mt = parts.next().unwrap_or("").trim().to_ascii_lowercase();
                let refused = parts.any(|p| {
                    let p = p.trim();
                    p.strip_prefix("q=").is_some_and(|q| q.trim().parse::<f32>().is_ok_and(|q| q <= 0.0))
                });
                if refused || mt.is_empty() {
                    continue;
                }
                if mt == "*/*" || mt == "application/*" {
                    any = true;
                }
                listed.push(mt);
            }
        }
        let types = MANIFEST_TYPES.iter().copied().filter(|t| listed.iter().any(|l| l == t)).collect();
        Accept { types, any: any || !seen_header }
    }

    /// A client that takes every manifest type the mirror caches.
    pub fn all() -> Accept {
        Accept { types: MANIFEST_TYPES.to_vec(), any: true }
    }

    pub fn accepts(&self, media_type: &str) -> bool {
        self.any || self.types.contains(&media_type)
    }

    /// True when the client accepts every cached type, so the tag's primary
    /// (upstream's answer to the widest Accept) is what it would get upstream.
    pub fn is_all(&self) -> bool {
        self.any || self.types.len() == MANIFEST_TYPES.len()
    }

    /// The media types to send upstream on the client's behalf.
    pub fn upstream_types(&self) -> Vec<&'static str> {
        if self.any || self.types.is_empty() { MANIFEST_TYPES.to_vec() } else { self.types.clone() }
    }

    /// A stable key for this set of types (tag variants are cached per key).
    pub fn key(&self) -> String {
        if self.is_all() { String::new() } else { self.types.join(",") }
    }
}

/// A blob a manifest references, with the size it declares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub digest: Digest,
    pub size: Option<u64>,
}

/// What the mirror needs to know about a manifest's content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestInfo {
    pub media_type: String,
    /// Config and layers of an image manifest (prefetched on store).
    pub blobs: Vec<Descriptor>,
    /// Child manifests of an index.
    pub manifests: Vec<Digest>,
}

impl ManifestInfo {
    pub fn is_index(&self) -> bool {
        self.media_type == OCI_INDEX || self.media_type == DOCKER_MANIFEST_LIST
    }
}

/// Parses a manifest body. `content_type` is what upstream declared; the
/// body's own `mediaType` wins when the header is missing or generic.
pub fn parse_manifest(body: &[u8], content_type: Option<&str>) -> Result<ManifestInfo, RegistryError> {
    let invalid = |why: String| RegistryError::new(ErrorCode::ManifestInvalid, format!("upstream sent an invalid manifest: {why}"));
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| invalid(format!("not JSON ({e})")))?;
    let declared = content_type.map(|c| c.split(';').next().unwrap_or("").trim().to_ascii_lowercase());
    let in_body = v.get("mediaType").and_then(|m| m.as_str()).map(str::to_owned);
    let media_type = match (declared, in_body) {
        (Some(d), _) if MANIFEST_TYPES.contains(&d.as_str()) => d,
        (_, Some(b)) if MANIFEST_TYPES.contains(&b.as_str()) => b,
        (_, None) if v.get("manifests").is_some() => OCI_INDEX.to_owned(),
        (_, None) if v.get("layers").is_some() && v.get("config").is_some() => OCI_MANIFEST.to_owned(),
        (d, b) => return Err(invalid(format!("unsupported media type {:?}", d.or(b).unwrap_or_default()))),
    };
    let descriptor = |item: &serde_json::Value, field: &str| -> Result<Descriptor, RegistryError> {
        let d = item.get("digest").and_then(|d| d.as_str()).ok_or_else(|| invalid(format!("{field} entry without digest")))?;
        let digest = Digest::parse(d).map_err(|e| invalid(e.message.into_owned()))?;
        Ok(Descriptor { digest, size: item.get("size").and_then(|s| s.as_u64()) })
    };
    let descriptors = |field: &str| -> Result<Vec<Descriptor>, RegistryError> {
        match v.get(field) {
            None => Ok(Vec::new()),
            Some(items) => {
                let items = items.as_array().ok_or_else(|| invalid(format!("{field} is not a list")))?;
                items.iter().map(|i| descriptor(i, field)).collect()
            }
        }
    };
    let mut info = ManifestInfo { media_type, blobs: Vec::new(), manifests: Vec::new() };
    if info.is_index() {
        info.manifests = descriptors("manifests")?.into_iter().map(|d| d.digest).collect();
    } else {
        let config = v.get("config").ok_or_else(|| invalid("image manifest without config".into()))?;
        info.blobs.push(descriptor(config, "config")?);
        info.blobs.extend(descriptors("layers")?);
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_distribution_grammar() {
        for ok in ["alpine", "library/alpine", "a/b/c/d", "my-org/my_img", "a__b", "a.b", "a---b", "0/1"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Alpine", "a//b", "/a", "a/", "-a", "a-", "a___b", "a..b", "a/b c", "a_.b", &"a".repeat(256)] {
            assert_eq!(validate_name(bad).unwrap_err().code, ErrorCode::NameInvalid, "{bad}");
        }
    }

    #[test]
    fn registries_come_from_ns_or_a_host_like_first_segment() {
        let r = RepoPath::resolve("alpine", None).unwrap();
        assert_eq!(r.key(), "docker.io/library/alpine");
        let r = RepoPath::resolve("ghcr.io/org/img", None).unwrap();
        assert_eq!((r.registry.as_str(), r.name.as_str()), ("ghcr.io", "org/img"));
        let r = RepoPath::resolve("localhost:5000/x", None).unwrap();
        assert_eq!(r.registry, "localhost:5000");
        let r = RepoPath::resolve("alpine", Some("docker.io")).unwrap();
        assert_eq!(r.key(), "docker.io/library/alpine");
        let r = RepoPath::resolve("org/img", Some("quay.io")).unwrap();
        assert_eq!(r.key(), "quay.io/org/img");
        let r = RepoPath::resolve("index.docker.io/org/img", None).unwrap();
        assert_eq!(r.key(), "docker.io/org/img");
    }

    #[test]
    fn digests_are_sha256_lowercase_hex() {
        let good = format!("sha256:{}", "a".repeat(64));
        assert_eq!(Digest::parse(&good).unwrap().hex(), "a".repeat(64));
        for bad in ["sha256:abc", "sha256", &format!("sha256:{}", "A".repeat(64)), "SHA256:00", ":00"] {
            assert_eq!(Digest::parse(bad).unwrap_err().code, ErrorCode::DigestInvalid, "{bad}");
        }
        let e = Digest::parse(&format!("sha512:{}", "a".repeat(128))).unwrap_err();
        assert!(e.message.contains("unsupported digest algorithm"));
    }

    #[test]
    fn image_references_split_into_name_and_reference() {
        assert_eq!(split_image("alpine"), ("alpine", "latest"));
        assert_eq!(split_image("library/alpine:3.20"), ("library/alpine", "3.20"));
        assert_eq!(split_image("localhost:5000/x"), ("localhost:5000/x", "latest"));
        assert_eq!(split_image("localhost:5000/x:1"), ("localhost:5000/x", "1"));
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(split_image(&format!("ghcr.io/o/i@{d}")), ("ghcr.io/o/i", d.as_str()));
    }

    #[test]
    fn tags_and_digests_are_told_apart() {
        assert_eq!(Reference::parse("v1.2-rc_3").unwrap(), Reference::Tag("v1.2-rc_3".into()));
        assert!(matches!(Reference::parse(&format!("sha256:{}", "0".repeat(64))).unwrap(), Reference::Digest(_)));
        assert_eq!(Reference::parse(".hidden").unwrap_err().code, ErrorCode::TagInvalid);
        assert_eq!(Reference::parse(&"t".repeat(129)).unwrap_err().code, ErrorCode::TagInvalid);
    }

    #[test]
    fn accept_headers_are_negotiated() {
        let a = Accept::parse([format!("{DOCKER_MANIFEST}, {OCI_MANIFEST};q=0.5").as_str()]);
        assert!(a.accepts(DOCKER_MANIFEST) && a.accepts(OCI_MANIFEST));
        assert!(!a.accepts(OCI_INDEX));
        assert!(!a.is_all());
        assert_eq!(a.key(), format!("{OCI_MANIFEST},{DOCKER_MANIFEST}"));
        let refused = Accept::parse([format!("{OCI_INDEX};q=0, {OCI_MANIFEST}").as_str()]);
        assert!(!refused.accepts(OCI_INDEX));
        assert!(Accept::parse([]).accepts(OCI_INDEX));
        assert!(Accept::parse(["*/*"]).is_all());
        let all = Accept::parse(MANIFEST_TYPES);
        assert!(all.is_all());
        assert_eq!(all.key(), "");
    }

    #[test]
    fn manifests_list_what_they_reference() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"digest":"{}"}},"layers":[{{"digest":"{}"}}]}}"#,
            d('a'),
            d('b')
        );
        let info = parse_manifest(body.as_bytes(), Some("application/octet-stream")).unwrap();
        assert_eq!(info.media_type, DOCKER_MANIFEST);
        assert_eq!(info.blobs.len(), 2);
        let index = format!(r#"{{"schemaVersion":2,"manifests":[{{"digest":"{}"}}]}}"#, d('c'));
        let info = parse_manifest(index.as_bytes(), Some(OCI_INDEX)).unwrap();
        assert!(info.is_index());
        assert_eq!(info.manifests.len(), 1);
        assert!(parse_manifest(b"not json", None).is_err());
        assert!(parse_manifest(br#"{"mediaType":"text/plain"}"#, None).is_err());
    }
}
