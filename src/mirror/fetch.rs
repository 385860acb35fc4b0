//! The blob fetcher: one function (`Fetcher::fetch`) that copies a blob from
//! upstream into the `BlobStore`, hashing as it streams, and commits it only
//! when its sha256 and size match; and the in-process `LocalQueue` that runs
//! it with bounded concurrency and one fetch per digest.
//!
//! A copy must keep up the upstream's minimum rate in every window or it is
//! cut off; one that falls below it for a quarter window gives its fetch
//! slot back, so stuck transfers never keep healthy ones from starting (at
//! most `STRAGGLERS` × slots run in all).
//!
//! The AWS fetcher Lambda calls the same `Fetcher::fetch` from stream records.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sha2::{Digest as _, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use super::transfer::{Body, Parts};
use super::upstream::{Retry, UpstreamError, Upstreams};
use crate::oci::{Digest, RepoPath};
use crate::storage::{BlobState, BlobStore, BlobWriter, FetchIndex, StorageError};

/// Copies of one blob tried before it is marked `failed`.
const ATTEMPTS: u32 = 3;

/// How long a claimed fetch is exclusive; after it, another fetcher may take
/// over a copy whose fetcher died. Longer than a Lambda can run.
pub const FETCH_LEASE: Duration = Duration::from_secs(16 * 60);

/// One blob to copy into the store, and where to copy it from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchJob {
    pub digest: Digest,
    pub source: RepoPath,
    /// The size the manifest declared, when known: checked too.
    pub size: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{0}")]
    Rejected(String),
    /// Upstream answered a `Range` with other bytes: the next try reads
    /// the blob as one stream.
    #[error("{0}")]
    BadRange(String),
}

impl FetchError {
    fn is_permanent(&self) -> bool {
        matches!(self, FetchError::Upstream(UpstreamError::NotFound | UpstreamError::Denied(_)) | FetchError::Storage(_))
    }
}

pub struct Fetcher {
    index: Arc<dyn FetchIndex>,
    store: Arc<dyn BlobStore>,
    upstreams: Arc<Upstreams>,
}

impl Fetcher {
    pub fn new(index: Arc<dyn FetchIndex>, store: Arc<dyn BlobStore>, upstreams: Arc<Upstreams>) -> Fetcher {
        Fetcher { index, store, upstreams }
    }

    pub fn upstreams(&self) -> &Upstreams {
        &self.upstreams
    }

    /// Brings the blob into the store (or finds it there) and marks it
    /// `ready`; on failure marks it `failed` with the error. Returns its
    /// size, or `None` when another fetcher holds it (and will finish it).
    pub async fn fetch(&self, job: &FetchJob) -> Result<Option<u64>, FetchError> {
        self.fetch_in(job, &mut Slot(None)).await
    }

    /// `fetch`, holding a fetch slot it gives back if the copy stalls.
    pub async fn fetch_in(&self, job: &FetchJob, slot: &mut Slot) -> Result<Option<u64>, FetchError> {
        if let Some(size) = self.store.size(&job.digest).await? {
            // Only verified blobs are ever committed, so a stored one is good.
            self.index.set_blob_state(&job.digest, BlobState::Ready, Some(size), None).await?;
            return Ok(Some(size));
        }
        if !self.index.claim_blob(&job.digest, FETCH_LEASE).await? {
            return Ok(None);
        }
        let (mut attempt, mut ranges) = (0, true);
        let err = loop {
            attempt += 1;
            match self.copy(job, slot, ranges).await {
                Ok(size) => {
                    self.index.set_blob_state(&job.digest, BlobState::Ready, Some(size), None).await?;
                    tracing::debug!(digest = %job.digest, size, source = %job.source, "blob stored");
                    return Ok(Some(size));
                }
                Err(e) if e.is_permanent() || attempt >= ATTEMPTS => break e,
                Err(FetchError::BadRange(why)) => {
                    tracing::warn!(digest = %job.digest, source = %job.source, error = %why, "upstream answered a range wrongly; reading the blob whole");
                    ranges = false;
                }
                Err(e) => {
                    tracing::warn!(digest = %job.digest, source = %job.source, attempt, error = %e, "blob copy failed, retrying");
                    tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
                }
            }
        };
        tracing::warn!(digest = %job.digest, source = %job.source, error = %err, "blob fetch failed");
        self.index.set_blob_state(&job.digest, BlobState::Failed, None, Some(&err.to_string())).await?;
        Err(err)
    }

    /// Gives up a claimed copy that was cut off (the fetcher Lambda's
    /// deadline): the blob goes back to `pending` with no lease, so the next
    /// delivery, or the stream record this write emits, copies it at once.
    pub async fn release(&self, digest: &Digest) -> Result<(), FetchError> {
        Ok(self.index.set_blob_state(digest, BlobState::Pending, None, None).await?)
    }

    /// One copy attempt: read in order (one stream, or parallel ranges),
    /// hash, write; commit only a verified blob.
    async fn copy(&self, job: &FetchJob, slot: &mut Slot, ranges: bool) -> Result<u64, FetchError> {
        let upstream = self.upstreams.get(&job.source.registry).map_err(|e| FetchError::Rejected(e.message.into_owned()))?;
        let limits = upstream.limits();
        let too_large =
            |n: u64| FetchError::Rejected(format!("{n} bytes is more than the largest blob copied ({} bytes)", limits.max_blob));
        if let Some(size) = job.size.filter(|s| *s > limits.max_blob) {
            return Err(too_large(size));
        }
        let (mut body, declared) = match job.size {
            Some(size) if ranges && size >= limits.ranged_from && limits.parallel_ranges > 1 => {
                (Parts::start(upstream, &job.source, &job.digest, size).await?, None)
            }
            _ => {
                let resp = upstream.get_blob(&job.source, &job.digest, Retry::FETCH).await?;
                let declared = resp.content_length();
                if let (Some(want), Some(got)) = (job.size, declared)
                    && want != got
                {
                    return Err(FetchError::Rejected(format!("upstream declared {got} bytes, the manifest {want}")));
                }
                if let Some(size) = declared.filter(|s| *s > limits.max_blob) {
                    return Err(too_large(size));
                }
                (Body::stream(resp, limits), declared)
            }
        };
        let limit = job.size.or(declared);
        let mut writer = self.store.begin(&job.digest).await?;
        match read_into(&mut body, writer.as_mut(), limit, limits.max_blob, slot).await {
            Ok((hash, size)) => {
                let actual = Digest::from_sha256(&hash);
                let size_ok = limit.is_none_or(|l| l == size);
                if actual != job.digest || !size_ok {
                    writer.abort().await?;
                    return Err(FetchError::Rejected(format!(
                        "upstream sent {size} bytes hashing to {actual}, expected {} ({})",
                        job.digest,
                        limit.map_or("size unknown".to_owned(), |l| format!("{l} bytes"))
                    )));
                }
                writer.commit().await?;
                if body.parts() > 1 {
                    tracing::debug!(digest = %job.digest, parts = body.parts(), "blob copied in parallel ranges");
                }
                Ok(size)
            }
            Err(e) => {
                writer.abort().await?;
                Err(e)
            }
        }
    }
}

/// A fetch slot, held while a copy makes progress.
pub struct Slot(Option<OwnedSemaphorePermit>);

impl Slot {
    fn release(&mut self) {
        if self.0.take().is_some() {
            tracing::debug!("a stalled blob copy gave its fetch slot back");
        }
    }
}

/// Reads `body` into `writer`, hashing it in order. Ends with an error when
/// more than `limit` bytes (or `max_blob` when none is declared) arrive, or
/// when the body keeps under the minimum rate; a stalled copy gives its slot
/// back.
async fn read_into(
    body: &mut Body,
    writer: &mut dyn BlobWriter,
    limit: Option<u64>,
    max_blob: u64,
    slot: &mut Slot,
) -> Result<(Vec<u8>, u64), FetchError> {
    let cap = limit.unwrap_or(max_blob);
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut stalled = false;
    while let Some(chunk) = body.next(&mut stalled).await? {
        if stalled {
            slot.release();
        }
        if chunk.is_empty() {
            continue;
        }
        size += chunk.len() as u64;
        if size > cap {
            return Err(FetchError::Rejected(match limit {
                Some(l) => format!("upstream sent more than the {l} bytes declared"),
                None => format!("upstream sent more than {cap} bytes, the largest blob copied"),
            }));
        }
        hasher.update(&chunk);
        writer.write(chunk).await?;
    }
    Ok((hasher.finalize().to_vec(), size))
}

/// What a wait for a blob's fetch came to.
#[derive(Debug, PartialEq, Eq)]
pub enum WaitOutcome {
    /// The fetch finished (ready or failed: the index says which), or none
    /// was running.
    Done,
    TimedOut,
}

/// Where fetch jobs go. Locally an in-process queue; on AWS the index write
/// itself is the enqueue (a DynamoDB Stream triggers the fetcher).
#[async_trait]
pub trait FetchQueue: Send + Sync {
    /// Starts a fetch unless one for this digest is already running.
    fn enqueue(&self, job: FetchJob);
    /// Waits for the running fetch of `digest` to finish, at most `timeout`.
    async fn wait(&self, digest: &Digest, timeout: Duration) -> WaitOutcome;
}

/// Copies (stalled ones included) allowed per fetch slot.
const STRAGGLERS: usize = 4;

/// In-process fetch queue: at most `concurrency` copies making progress at
/// once (`STRAGGLERS` times that counting stalled ones), and at most one per
/// digest.
pub struct LocalQueue {
    fetcher: Arc<Fetcher>,
    slots: Arc<Semaphore>,
    /// Copies running, with or without a slot.
    copies: Arc<Semaphore>,
    /// Running fetches; the receiver turns `true` when the fetch ends.
    running: Arc<Mutex<HashMap<Digest, watch::Receiver<bool>>>>,
}

impl LocalQueue {
    pub fn new(fetcher: Arc<Fetcher>, concurrency: usize) -> LocalQueue {
        let n = concurrency.max(1);
        LocalQueue {
            fetcher,
            slots: Arc::new(Semaphore::new(n)),
            copies: Arc::new(Semaphore::new(n * STRAGGLERS)),
            running: Arc::default(),
        }
    }
}

#[async_trait]
impl FetchQueue for LocalQueue {
    fn enqueue(&self, job: FetchJob) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if running.contains_key(&job.digest) {
            return;
        }
        let (done, rx) = watch::channel(false);
        running.insert(job.digest.clone(), rx);
        let (fetcher, slots, copies, registry) = (self.fetcher.clone(), self.slots.clone(), self.copies.clone(), self.running.clone());
        tokio::spawn(async move {
            let copy = copies.acquire_owned().await;
            let mut slot = Slot(slots.acquire_owned().await.ok());
            let _ = fetcher.fetch_in(&job, &mut slot).await;
            drop((slot, copy));
            registry.lock().unwrap_or_else(|p| p.into_inner()).remove(&job.digest);
            let _ = done.send(true);
        });
    }

    async fn wait(&self, digest: &Digest, timeout: Duration) -> WaitOutcome {
        let rx = self.running.lock().unwrap_or_else(|p| p.into_inner()).get(digest).cloned();
        let Some(mut rx) = rx else { return WaitOutcome::Done };
        match tokio::time::timeout(timeout, rx.wait_for(|done| *done)).await {
            Ok(_) => WaitOutcome::Done,
            Err(_) => WaitOutcome::TimedOut,
        }
    }
}

/// The queue when the index itself is the queue (AWS): writing a `pending`
/// blob item emits the stream record that runs the fetcher Lambda, so there
/// is nothing to enqueue here, and waiting means polling the index.
pub struct IndexQueue;

#[async_trait]
impl FetchQueue for IndexQueue {
    fn enqueue(&self, _job: FetchJob) {}

    async fn wait(&self, _digest: &Digest, _timeout: Duration) -> WaitOutcome {
        WaitOutcome::Done
    }
}
