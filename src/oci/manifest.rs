//! Manifests: the media types the mirror serves, content negotiation from a
//! client's `Accept` headers, and what the mirror reads out of a manifest
//! (its kind and the blobs or child manifests it references). The bytes
//! served are always upstream's own; this reads them, never rewrites them.
//!
//! Read with serde_json, not the oci-spec crate: a mirror must take whatever
//! an upstream serves (Docker schema 2 and manifest lists as well as OCI;
//! descriptors without `mediaType` or `size`; no `schemaVersion`) and needs
//! only the media type, digests and sizes. oci-spec rejects such manifests
//! and would add 17 crates (derive_builder, a second darling, getset, strum,
//! regex) to the build.

use super::{Digest, ErrorCode, RegistryError};

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
