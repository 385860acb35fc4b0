//! The blob fetcher: one function (`Fetcher::fetch`) that copies a blob from
//! upstream into the `BlobStore`, hashing as it streams, and commits it only
//! when its sha256 and size match. `queue` runs it in-process.
//!
//! A copy must keep up the upstream's minimum rate in every window or it is
//! cut off; one that falls below it for a quarter window gives its fetch
//! slot back, so stuck transfers never keep healthy ones from starting (at
//! most `queue::STRAGGLERS` × slots run in all).
//!
//! The AWS fetcher Lambda calls the same `Fetcher::fetch` from stream records.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use sha2::digest::common::hazmat::{SerializableState, SerializedState};
use sha2::{Digest as _, Sha256};
use tokio::sync::{OwnedSemaphorePermit, watch};
use tokio::time::Instant;

pub use super::follow::Follow;
use super::follow::Following;
pub use super::transfer::FetchError;
use super::transfer::{Body, Parts};
use super::upstream::{Retry, UpstreamError, Upstreams};
use crate::oci::{Digest, RepoPath};
use crate::storage::{BlobState, BlobStore, BlobWriter, Checkpoint, Durable, FetchIndex, PartialBlob, Upload};

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

pub struct Fetcher {
    index: Arc<dyn FetchIndex>,
    store: Arc<dyn BlobStore>,
    upstreams: Arc<Upstreams>,
    following: Following,
}

impl Fetcher {
    pub fn new(index: Arc<dyn FetchIndex>, store: Arc<dyn BlobStore>, upstreams: Arc<Upstreams>) -> Fetcher {
        Fetcher { index, store, upstreams, following: Following::default() }
    }

    /// The copy of `digest` from `registry` under way in this process, if
    /// any, to follow.
    pub fn follow(&self, digest: &Digest, registry: &str) -> Option<Follow> {
        self.following.get(digest, registry)
    }

    pub fn upstreams(&self) -> &Upstreams {
        &self.upstreams
    }

    /// Brings the blob into the store (or finds it there) and marks it
    /// `ready`; on failure marks it `failed` with the error. Returns its
    /// size, or `None` when another fetcher holds it (and will finish it).
    pub async fn fetch(&self, job: &FetchJob) -> Result<Option<u64>, FetchError> {
        self.fetch_in(job, &mut Slot(None), None).await
    }

    /// `fetch`, stopping at a checkpoint before `deadline` when the copy
    /// would not finish by then (`FetchError::Suspended`: the blob is
    /// `pending` again, and the next fetch continues from there).
    pub async fn fetch_until(&self, job: &FetchJob, deadline: Option<Instant>) -> Result<Option<u64>, FetchError> {
        self.fetch_in(job, &mut Slot(None), deadline).await
    }

    /// `fetch_until`, holding a fetch slot it gives back if the copy stalls.
    pub async fn fetch_in(&self, job: &FetchJob, slot: &mut Slot, deadline: Option<Instant>) -> Result<Option<u64>, FetchError> {
        if let Some(size) = self.store.size(&job.digest).await? {
            // Only verified blobs are ever committed, so a stored one is good.
            self.index.set_blob_state(&job.digest, BlobState::Ready, Some(size), None).await?;
            return Ok(Some(size));
        }
        if !self.index.claim_blob(&job.digest, FETCH_LEASE).await? {
            return Ok(None);
        }
        let followed = self.following.start(&job.digest, &job.source.registry, job.size);
        let (mut attempt, mut ranges) = (0, true);
        let err = loop {
            attempt += 1;
            match self.copy(job, slot, ranges, deadline, &followed.partial, true).await {
                Ok(size) => {
                    self.index.set_blob_state(&job.digest, BlobState::Ready, Some(size), None).await?;
                    followed.ended(true);
                    tracing::debug!(digest = %job.digest, size, source = %job.source, "blob stored");
                    return Ok(Some(size));
                }
                Err(FetchError::Suspended(at)) => {
                    tracing::info!(digest = %job.digest, at, "copy suspended at a checkpoint before the deadline; queued again");
                    self.release(&job.digest).await?;
                    return Err(FetchError::Suspended(at));
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
        // What the failed copies kept for a retry goes now (this copy holds
        // the blob's lease: no other copy of it runs): a failed blob holds no
        // space, and the next request starts it afresh.
        if let Some(cp) = self.index.blob_checkpoint(&job.digest).await? {
            self.store.discard_upload(&Upload { digest: job.digest.clone(), id: cp.upload, started: 0 }).await?;
            self.index.save_checkpoint(&job.digest, None).await?;
        }
        self.index.set_blob_state(&job.digest, BlobState::Failed, None, Some(&err.to_string())).await?;
        Err(err)
    }

    /// A second copy of a blob whose copy runs from another registry, for
    /// the requests that name this one (`LocalQueue`): a copy's source
    /// must not hold another registry's clients hostage (a hostile upstream
    /// trickling a blob it claims to hold). No lease, no checkpoint, nothing
    /// written to the index but `ready` once it is stored, verified; the
    /// first copy to be stored wins, and a ready blob stays ready.
    pub async fn fetch_beside(&self, job: &FetchJob, slot: &mut Slot) -> Result<Option<u64>, FetchError> {
        if let Some(size) = self.store.size(&job.digest).await? {
            self.index.set_blob_state(&job.digest, BlobState::Ready, Some(size), None).await?;
            return Ok(Some(size));
        }
        let followed = self.following.start(&job.digest, &job.source.registry, job.size);
        let (mut attempt, mut ranges) = (0, true);
        loop {
            attempt += 1;
            match self.copy(job, slot, ranges, None, &followed.partial, false).await {
                Ok(size) => {
                    self.index.set_blob_state(&job.digest, BlobState::Ready, Some(size), None).await?;
                    followed.ended(true);
                    return Ok(Some(size));
                }
                Err(e) if e.is_permanent() || attempt >= ATTEMPTS => {
                    tracing::warn!(digest = %job.digest, source = %job.source, error = %e, "second copy of a blob failed");
                    return Err(e);
                }
                Err(FetchError::BadRange(_)) => ranges = false,
                Err(_) => tokio::time::sleep(Duration::from_millis(250 << attempt)).await,
            }
        }
    }

    /// Gives up a claimed copy that was cut off (the fetcher Lambda's
    /// deadline): the blob goes back to `pending` with no lease, so the next
    /// delivery, or the stream record this write emits, copies it at once.
    pub async fn release(&self, digest: &Digest) -> Result<(), FetchError> {
        Ok(self.index.set_blob_state(digest, BlobState::Pending, None, None).await?)
    }

    /// One copy attempt: continue the last checkpoint or start afresh, read
    /// in order (one stream, or parallel ranges), hash, write, checkpoint;
    /// commit only a verified blob. A copy cut off keeps its durable part
    /// (checkpointed) for the next attempt; one that read wrong bytes
    /// throws its upload away.
    /// `leased`: this copy holds the blob's lease, and keeps its progress
    /// in checkpoints; a copy beside it (`fetch_beside`) keeps none.
    async fn copy(
        &self,
        job: &FetchJob,
        slot: &mut Slot,
        ranges: bool,
        deadline: Option<Instant>,
        follow: &watch::Sender<Option<Arc<dyn PartialBlob>>>,
        leased: bool,
    ) -> Result<u64, FetchError> {
        let upstream = self.upstreams.get(&job.source.registry).map_err(|e| FetchError::Rejected(e.message.into_owned()))?;
        let limits = upstream.limits();
        if let Some(size) = job.size.filter(|s| *s > limits.max_blob) {
            return Err(too_large(size, limits.max_blob));
        }
        // Only a copy of known size can continue: it asks for the rest.
        let saved = match job.size {
            Some(_) if leased => self.index.blob_checkpoint(&job.digest).await?,
            _ => None,
        };
        let mut writer = self.store.begin(&job.digest, saved.as_ref()).await?;
        let mut progress = match saved.as_ref().filter(|cp| cp.offset == writer.offset() && cp.offset > 0).and_then(Progress::resume) {
            Some(p) => p,
            None if writer.offset() > 0 => {
                // A checkpoint whose hash state cannot be read: start over.
                writer.abort().await?;
                writer = self.store.begin(&job.digest, None).await?;
                Progress::new(0)
            }
            None => Progress::new(0),
        };
        let from = progress.at;
        let opened = match job.size {
            Some(size) if ranges && size - from >= limits.ranged_from && limits.parallel_ranges > 1 => {
                let sink = writer.at_offsets();
                Parts::start(upstream, &job.source, &job.digest, size, from, sink).await.map(|(b, at)| (b, at, None))
            }
            Some(size) if from > 0 => Body::rest(upstream, &job.source, &job.digest, size, from).await.map(|(b, at)| (b, at, None)),
            _ => self.whole(upstream, job).await.map(|(b, declared)| (b, 0, declared)),
        };
        let (mut body, starts_at, declared) = match opened {
            Ok(o) => o,
            Err(e) => return Err(self.stop(&job.digest, writer, progress, e, leased).await),
        };
        if starts_at != from {
            // Upstream ignored the range: its answer is the whole blob.
            tracing::info!(digest = %job.digest, from, "upstream sent the whole blob instead of the rest; copying from the start");
            writer.abort().await?;
            if leased {
                self.index.save_checkpoint(&job.digest, None).await?;
            }
            writer = self.store.begin(&job.digest, None).await?;
            progress = Progress::new(0);
        }
        if from > 0 && starts_at == from {
            tracing::info!(digest = %job.digest, from, "continuing an interrupted copy from its checkpoint");
        }
        let limit = job.size.or(declared);
        // Clients waiting for the blob follow this attempt's bytes now.
        follow.send_replace(writer.partial());
        let read = read_into(
            &mut body,
            writer.as_mut(),
            &mut progress,
            limit,
            limits.max_blob,
            slot,
            deadline,
            leased.then_some(&*self.index),
            &job.digest,
        )
        .await;
        match read {
            Ok(Read::Done(hash, size)) => {
                let actual = Digest::from_sha256(&hash);
                let size_ok = limit.is_none_or(|l| l == size);
                if actual != job.digest || !size_ok {
                    writer.abort().await?;
                    if leased {
                        self.index.save_checkpoint(&job.digest, None).await?;
                    }
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
            Ok(Read::Suspended) => {
                let at = self.keep(&job.digest, writer, &mut progress).await?;
                Err(FetchError::Suspended(at))
            }
            Err(e) => Err(self.stop(&job.digest, writer, progress, e, leased).await),
        }
    }

    /// Opens the blob as one stream from its start: the body and the size
    /// upstream declared.
    async fn whole(&self, upstream: &std::sync::Arc<super::upstream::Upstream>, job: &FetchJob) -> Result<(Body, Option<u64>), FetchError> {
        let limits = upstream.limits();
        let resp = upstream.get_blob(&job.source, &job.digest, Retry::FETCH).await?;
        let declared = resp.content_length();
        if let (Some(want), Some(got)) = (job.size, declared)
            && want != got
        {
            return Err(FetchError::Rejected(format!("upstream declared {got} bytes, the manifest {want}")));
        }
        if let Some(size) = declared.filter(|s| *s > limits.max_blob) {
            return Err(too_large(size, limits.max_blob));
        }
        Ok((Body::stream(resp, limits), declared))
    }

    /// Ends a failed attempt: wrong bytes, a refusal or a blob gone
    /// upstream throw the upload away; any other failure (transport, rate
    /// limit, 5xx, storage) keeps its durable part for the next attempt.
    async fn stop(&self, digest: &Digest, writer: Box<dyn BlobWriter>, mut progress: Progress, e: FetchError, leased: bool) -> FetchError {
        if !leased {
            // A copy beside the leased one keeps nothing.
            if let Err(store) = writer.abort().await {
                tracing::warn!(%digest, error = %store, "could not discard an interrupted upload");
            }
            return e;
        }
        let wrong = matches!(
            &e,
            FetchError::Rejected(_)
                | FetchError::BadRange(_)
                | FetchError::Upstream(UpstreamError::Invalid(_) | UpstreamError::NotFound | UpstreamError::Denied(_))
        );
        let kept = if wrong {
            match writer.abort().await {
                Ok(()) => self.index.save_checkpoint(digest, None).await.map_err(FetchError::from),
                Err(e) => Err(e.into()),
            }
        } else {
            self.keep(digest, writer, &mut progress).await.map(|_| ())
        };
        if let Err(store) = kept {
            tracing::warn!(%digest, error = %store, "could not keep or discard the interrupted upload");
        }
        e
    }

    /// Suspends the writer and checkpoints its final durable point:
    /// returns the offset the next copy continues from.
    async fn keep(&self, digest: &Digest, writer: Box<dyn BlobWriter>, progress: &mut Progress) -> Result<u64, FetchError> {
        let durable = writer.suspend().await?;
        match durable.and_then(|d| progress.checkpoint(&d)) {
            Some(cp) => {
                self.index.save_checkpoint(digest, Some(&cp)).await?;
                Ok(cp.offset)
            }
            // Nothing past the last checkpoint: that one stands.
            None => Ok(progress.saved),
        }
    }
}

/// The refusal of a blob of `size` bytes, over `max_blob`.
fn too_large(size: u64, max_blob: u64) -> FetchError {
    FetchError::Rejected(format!("{size} bytes is more than the largest blob copied ({max_blob} bytes)"))
}

/// The hash over the bytes copied so far, and its state at each part
/// boundary the writer has not yet made durable (so a checkpoint can name
/// the state at exactly its durable point).
struct Progress {
    hasher: Sha256,
    /// Bytes hashed, from the blob's start.
    at: u64,
    /// (offset, serialised state) at part boundaries, oldest first.
    states: VecDeque<(u64, Vec<u8>)>,
    /// The last offset checkpointed.
    saved: u64,
}

impl Progress {
    fn new(at: u64) -> Progress {
        Progress { hasher: Sha256::new(), at, states: VecDeque::new(), saved: at }
    }

    /// The hash as a checkpoint left it.
    fn resume(cp: &Checkpoint) -> Option<Progress> {
        let state = SerializedState::<Sha256>::try_from(&cp.hash[..]).ok()?;
        let hasher = Sha256::deserialize(&state).ok()?;
        Some(Progress { hasher, at: cp.offset, states: VecDeque::new(), saved: cp.offset })
    }

    /// Hashes `chunk`, noting the state at every multiple of `part`.
    fn update(&mut self, mut chunk: &[u8], part: u64) {
        while !chunk.is_empty() {
            let to_boundary = part - self.at % part;
            let n = (to_boundary as usize).min(chunk.len());
            self.hasher.update(&chunk[..n]);
            self.at += n as u64;
            chunk = &chunk[n..];
            if self.at.is_multiple_of(part) {
                self.states.push_back((self.at, self.hasher.serialize().to_vec()));
            }
        }
    }

    /// The checkpoint for `durable`, when it is past the last one saved.
    fn checkpoint(&mut self, durable: &Durable) -> Option<Checkpoint> {
        if durable.offset <= self.saved {
            return None;
        }
        while self.states.front().is_some_and(|(at, _)| *at < durable.offset) {
            self.states.pop_front();
        }
        let (at, hash) = self.states.front().filter(|(at, _)| *at == durable.offset)?.clone();
        self.saved = at;
        Some(Checkpoint { upload: durable.upload.clone(), offset: at, hash })
    }
}

/// How a read ended.
enum Read {
    /// Every byte: the hash and the size.
    Done(Vec<u8>, u64),
    /// Stopped at a durable point before the deadline.
    Suspended,
}

/// Leaves time to make the last part durable and save the checkpoint.
const SUSPEND_MARGIN: Duration = Duration::from_secs(2);

/// Parts read before a copy's rate is trusted to plan its stop.
const RATE_AFTER_PARTS: u64 = 4;

/// A fetch slot, held while a copy makes progress.
pub struct Slot(pub(super) Option<OwnedSemaphorePermit>);

impl Slot {
    fn release(&mut self) {
        if self.0.take().is_some() {
            tracing::debug!("a stalled blob copy gave its fetch slot back");
        }
    }
}

/// Reads `body` into `writer`, hashing it in order and checkpointing each
/// durable point (with an `index`: a copy beside the leased one keeps
/// none). Ends with an error when more than `limit` bytes (or
/// `max_blob` when none is declared) arrive, or when the body keeps under
/// the minimum rate; a stalled copy gives its slot back. Stops early
/// (`Read::Suspended`) at a durable point when the next ones would not
/// come before `deadline`.
#[allow(clippy::too_many_arguments)]
async fn read_into(
    body: &mut Body,
    writer: &mut dyn BlobWriter,
    progress: &mut Progress,
    limit: Option<u64>,
    max_blob: u64,
    slot: &mut Slot,
    deadline: Option<Instant>,
    index: Option<&dyn FetchIndex>,
    digest: &Digest,
) -> Result<Read, FetchError> {
    let cap = limit.unwrap_or(max_blob);
    let part = writer.part_size();
    let mut stalled = false;
    let (started, first_byte) = (Instant::now(), progress.at);
    let mut winding_down = false;
    while let Some(chunk) = body.next(&mut stalled).await? {
        if stalled {
            slot.release();
        }
        if chunk.is_empty() {
            continue;
        }
        if progress.at + chunk.len() as u64 > cap {
            return Err(FetchError::Rejected(match limit {
                Some(l) => format!("upstream sent more than the {l} bytes declared"),
                None => format!("upstream sent more than {cap} bytes, the largest blob copied"),
            }));
        }
        let crossed = (progress.at + chunk.len() as u64) / part > progress.at / part;
        progress.update(&chunk, part);
        match body.placed() {
            true => writer.placed(chunk.len() as u64).await?,
            false => writer.write(chunk).await?,
        }
        if !crossed {
            continue;
        }
        if let Some(index) = index
            && let Some(cp) = writer.durable()?.and_then(|d| progress.checkpoint(&d))
        {
            index.save_checkpoint(digest, Some(&cp)).await?;
        }
        // Before the deadline there must be time for the parts in flight
        // and two more (the last ones made durable), at the copy's average
        // rate so far, and for the checkpoint.
        let now = Instant::now();
        // Parallel parts arrive in bursts: the rate is trusted once a few
        // parts came; before that only the margin counts.
        let read = progress.at - first_byte;
        let rate = read as f64 / (now - started).as_secs_f64().max(0.001);
        let needed = match read >= RATE_AFTER_PARTS * part {
            true => Duration::from_secs_f64((body.in_flight() as u64 + 2) as f64 * part as f64 / rate.max(1.0)) + SUSPEND_MARGIN,
            false => SUSPEND_MARGIN * 2,
        };
        if !winding_down && deadline.is_some_and(|d| now + needed >= d) && limit.is_none_or(|l| progress.at < l) {
            // Ranged parts already asked for are read to the end (their
            // bytes are not wasted); a stream stops here.
            if !body.wind_down() {
                return Ok(Read::Suspended);
            }
            winding_down = true;
        }
    }
    if winding_down && limit.is_none_or(|l| progress.at < l) {
        return Ok(Read::Suspended);
    }
    Ok(Read::Done(progress.hasher.clone().finalize().to_vec(), progress.at))
}
