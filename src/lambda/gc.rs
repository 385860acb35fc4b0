//! The `gc` function: a lifecycle sweep on its schedule, stopping 30 s
//! before the function's timeout, or the warm list on `{"action": "warm"}`.

use std::time::Duration;

use crate::assemble::{self, Assembled, Backend, BoxError, Fetching};
use crate::config::LambdaSettings;
use crate::http::access::AccessPolicy;
use crate::observe::emf::emf_line;

/// What the `gc` function does with one event: `{"action": "warm"}` caches
/// `HUBCAP_WARM_IMAGES`; anything else (the schedule's own event) runs a
/// GC sweep that stops 30 s before `remaining` runs out.
pub async fn maintenance(
    settings: &LambdaSettings,
    event: &serde_json::Value,
    remaining: std::time::Duration,
) -> Result<serde_json::Value, BoxError> {
    maintenance_on(settings.backend()?, settings, event, remaining).await
}

/// `maintenance` on a given backend.
pub async fn maintenance_on(
    backend: Backend,
    settings: &LambdaSettings,
    event: &serde_json::Value,
    remaining: std::time::Duration,
) -> Result<serde_json::Value, BoxError> {
    if event.get("action").and_then(|a| a.as_str()) == Some("warm") {
        let opts = settings.mirror.options(backend, AccessPolicy::default());
        let Assembled { mirror, .. } = assemble::mirror(&opts, Fetching::InProcess).await?;
        let mut warmed = Vec::new();
        let mut failed = Vec::new();
        for image in settings.warm_images.iter().filter(|i| !i.trim().is_empty()) {
            match crate::warm::warm(&mirror, image.trim(), &settings.warm_platforms).await {
                Ok(w) => {
                    tracing::info!(image, manifests = w.manifests, blobs = w.blobs, bytes = w.bytes, "warmed");
                    warmed.push(image.clone());
                }
                Err(e) => {
                    tracing::warn!(image, error = %e, "warm failed");
                    failed.push(image.clone());
                }
            }
        }
        mirror.flush_stats().await?;
        return Ok(serde_json::json!({ "warmed": warmed, "failed": failed }));
    }
    let mut opts = settings.gc.options()?;
    opts.deadline = Some(std::time::Instant::now() + remaining.saturating_sub(std::time::Duration::from_secs(30)));
    let storage = assemble::open(&backend, Duration::ZERO, assemble::MEMORY_CACHE_ENTRIES).await?;
    let report = crate::lifecycle::run(storage.index.as_ref(), storage.store.as_ref(), &opts).await?;
    tracing::info!(
        expired = report.expired.len(),
        deleted_manifests = report.deleted_manifests,
        deleted_blobs = report.deleted_blobs,
        reclaimed_bytes = report.reclaimed_bytes,
        complete = report.complete,
        "gc"
    );
    let m = [
        ("ImagesExpired", report.expired.len() as f64, "Count"),
        ("BlobsDeleted", report.deleted_blobs as f64, "Count"),
        ("BytesReclaimed", report.reclaimed_bytes as f64, "Bytes"),
        ("CachedBytes", report.before.bytes as f64, "Bytes"),
        ("CachedImages", report.before.images as f64, "Count"),
    ];
    println!("{}", emf_line("gc", &m));
    Ok(serde_json::to_value(&report)?)
}
