//! `hubcap warm IMAGE...`: caches images ahead of time through the same code
//! path as a pull (the `Mirror` service): the manifest, the platform
//! manifests of an index (all, or those named by `--platform os/arch`), and
//! every config and layer, each verified on the way in.

use crate::mirror::{BlobAnswer, Mirror};
use crate::oci::{Accept, Digest, ErrorCode, Reference, RegistryError, RepoPath, split_image};

/// What warming one image brought into the cache.
#[derive(Debug, Default)]
pub struct Warmed {
    pub manifests: usize,
    pub blobs: usize,
    pub bytes: u64,
}

/// Splits `[registry/]name[:tag|@digest]` (tag `latest` when absent).
pub fn parse_image(image: &str) -> Result<(RepoPath, Reference), RegistryError> {
    let (name, reference) = split_image(image);
    Ok((RepoPath::resolve(name, None)?, Reference::parse(reference)?))
}

/// Whether an index entry's platform is wanted (`os/arch[/variant]`).
fn wanted(entry: &serde_json::Value, platforms: &[String]) -> bool {
    if platforms.is_empty() {
        return true;
    }
    let p = &entry["platform"];
    let (os, arch, variant) = (p["os"].as_str().unwrap_or(""), p["architecture"].as_str().unwrap_or(""), p["variant"].as_str());
    platforms.iter().any(|want| {
        let mut parts = want.split('/');
        let (wos, warch, wvar) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next());
        wos == os && warch == arch && (wvar.is_none() || wvar == variant)
    })
}

pub async fn warm(mirror: &Mirror, image: &str, platforms: &[String]) -> Result<Warmed, RegistryError> {
    let (repo, reference) = parse_image(image)?;
    let mut out = Warmed::default();
    let (top, _) = mirror.manifest(&repo, &reference, &Accept::all()).await?;
    out.manifests += 1;
    let top_json: serde_json::Value = serde_json::from_slice(&top.body).unwrap_or_default();
    let images = match top_json.get("manifests").and_then(|m| m.as_array()) {
        Some(entries) => {
            let mut picked = Vec::new();
            for e in entries.iter().filter(|e| wanted(e, platforms)) {
                let d = Digest::parse(e["digest"].as_str().unwrap_or(""))?;
                let (m, _) = mirror.manifest(&repo, &Reference::Digest(d), &Accept::all()).await?;
                out.manifests += 1;
                picked.push(serde_json::from_slice::<serde_json::Value>(&m.body).unwrap_or_default());
            }
            if picked.is_empty() {
                return Err(RegistryError::new(ErrorCode::ManifestUnknown, format!("{image} has no manifest for {platforms:?}")));
            }
            picked
        }
        None => vec![top_json],
    };
    for m in images {
        let digests = std::iter::once(&m["config"]).chain(m["layers"].as_array().into_iter().flatten());
        for desc in digests {
            let d = Digest::parse(desc["digest"].as_str().unwrap_or(""))?;
            // The same path as a client's GET: fetch, verify, store; a blob
            // still in flight after the bounded wait is simply asked again.
            loop {
                match mirror.blob(&repo, &d).await?.0 {
                    BlobAnswer::Ready(_) => break,
                    BlobAnswer::Pending => continue,
                    // Served by upstream meanwhile: the copy goes on here.
                    BlobAnswer::Elsewhere(_) => tokio::time::sleep(std::time::Duration::from_secs(1)).await,
                    BlobAnswer::Later(secs) => tokio::time::sleep(std::time::Duration::from_secs(secs.clamp(1, 5))).await,
                    // Copied here: wait for it to end, then look again.
                    BlobAnswer::Follow(mut f) => {
                        let _ = f.outcome.wait_for(Option::is_some).await;
                    }
                }
            }
            out.blobs += 1;
            out.bytes += desc["size"].as_u64().unwrap_or(0);
        }
    }
    Ok(out)
}
