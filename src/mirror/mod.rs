//! The pull-through service. Every method reads the same way: try the index
//! and the store, then upstream; write through; answer. It knows the storage
//! traits and the upstream client, never HTTP routes nor a backend's SDK.
//!
//! Rules it keeps:
//! - a manifest by digest, once cached, is served without asking upstream;
//! - a tag is trusted for `tag_ttl`, then re-validated with a `HEAD`
//!   (uncounted by Docker Hub); when upstream fails, the cached answer is
//!   served (stale-if-error);
//! - content is served for a repository only once that repository is known
//!   to contain it (a link), so nothing cached for one leaks into another;
//! - concurrent misses of the same thing make one upstream request;
//! - what is served is marked pulled (tags, manifests) or used (blobs) in
//!   the index, at most once per `touch_every`, for GC; a blob whose mark
//!   fails is being deleted by GC and is fetched again instead of served.
//!
//! # Layout
//! - `manifests`: the manifest path; `blobs`: the blob path;
//! - `fetch`: the verified copy and the queues that run it; `follow`:
//!   clients reading a copy's bytes as they come; `transfer`: a
//!   blob's bytes read in order, in one stream or in parallel ranges;
//! - `upstream`: the registry client, the configured registries, credentials;
//! - `deadline`: the request's deadline every wait on its path is cut to.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

mod blobs;
pub mod deadline;
pub mod fetch;
pub mod follow;
mod manifests;
pub mod queue;
mod transfer;
pub use manifests::MAX_REFERENCES;
pub mod upstream;

use self::fetch::FetchJob;
use self::queue::{FetchQueue, WaitOutcome};
use self::upstream::{Retry, TagsPage, Upstream, UpstreamError, Upstreams};
use crate::observe::{CacheStatus, Counters, Report, RequestStats};
use crate::oci::{Accept, Digest, ErrorCode, ManifestInfo, Reference, RegistryError, RepoPath, parse_manifest};
use crate::storage::{BlobRecord, BlobState, BlobStore, Index, ManifestRecord, StorageError, TagRecord, now};

/// A blob `pending` this long without a fetcher taking it is re-queued.
pub(crate) const STALE_FETCH: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct MirrorConfig {
    /// How long a tag is trusted before it is re-validated upstream.
    pub tag_ttl: Duration,
    /// How long a blob request waits for an in-flight fetch.
    pub blob_wait: Duration,
    /// Lifetime of the signed blob URLs handed to clients.
    pub url_ttl: Duration,
    /// Longest a tag re-validation may take before the cached tag is served.
    pub revalidate_timeout: Duration,
    /// How long the mirror stops asking an upstream that just failed a
    /// re-validation; meanwhile cached tags are served at once.
    pub upstream_backoff: Duration,
    /// Pulls and blob use are written to the index at most this often per
    /// item. GC's grace must exceed it plus `url_ttl`.
    pub touch_every: Duration,
    /// How a request for a large blob still being copied waits.
    pub blob_wait_mode: BlobWaitMode,
    /// Where a client is sent for a large blob not stored yet.
    pub cold_blobs: ColdBlobs,
}

/// Where a client asking for a large blob (8 MiB or more) that is not
/// stored yet is sent, while the fetcher copies it (the api Lambda, which
/// cannot stream a body of gigabytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ColdBlobs {
    /// Held as `BlobWaitMode` says (`hubcap serve` streams it instead):
    /// for fleets that cannot reach the upstream (private subnets with no
    /// NAT).
    #[default]
    Wait,
    /// To where the upstream itself sends clients for it (Docker Hub: a
    /// redirect to its CDN), at once: the first clients of a cold layer get
    /// it straight from the upstream's CDN while the mirror copies it. Blob
    /// downloads do not count against Docker Hub's pull limit (manifest
    /// requests do). Where the upstream answers with the bytes itself,
    /// clients wait as `Wait`.
    Upstream,
}

/// How a request for a large blob still being copied waits (SCALING.md).
/// Small blobs (under `LARGE_BLOB`: configs, most layers) are always held:
/// their copies are short, and Docker fetches an image's config once, with
/// no retry, before failing over to the next endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BlobWaitMode {
    /// Inside the request, up to `blob_wait`, then a redirect back to itself
    /// (at most 5): cheap in one process, where waiting costs nothing.
    #[default]
    Hold,
    /// Answered at once (`503` + `Retry-After`: the client waits outside)
    /// unless the copy's progress says it ends within `HOLD_NEAR_END`, or
    /// says it takes longer than a client's retries cover; then held. On
    /// Lambda a waiting request holds a whole execution.
    Retry,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        MirrorConfig {
            tag_ttl: Duration::from_secs(600),
            blob_wait: Duration::from_secs(20),
            url_ttl: Duration::from_secs(900),
            revalidate_timeout: Duration::from_secs(3),
            upstream_backoff: Duration::from_secs(10),
            touch_every: Duration::from_secs(600),
            blob_wait_mode: BlobWaitMode::Hold,
            cold_blobs: ColdBlobs::Wait,
        }
    }
}

/// One lock per in-flight key, so concurrent misses wait for the first
/// instead of each asking upstream.
#[derive(Default)]
struct Flights {
    locks: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
}

impl Flights {
    async fn lock(&self, key: String) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            if locks.len() > 1024 {
                locks.retain(|_, w| w.strong_count() > 0);
            }
            match locks.get(&key).and_then(Weak::upgrade) {
                Some(l) => l,
                None => {
                    let l = Arc::new(tokio::sync::Mutex::new(()));
                    locks.insert(key, Arc::downgrade(&l));
                    l
                }
            }
        };
        lock.lock_owned().await
    }
}

/// Where a client gets a blob's bytes.
pub enum BlobAnswer {
    /// A short-lived URL to the stored blob.
    Ready(String),
    /// Still being fetched after the bounded wait.
    Pending,
    /// Still being fetched: ask again in about this many seconds
    /// (`BlobWaitMode::Retry`).
    Later(u64),
    /// Being fetched by this process into a store it can read back: the
    /// bytes as they come (`follow`).
    Follow(fetch::Follow),
    /// Not stored yet: where the upstream serves it (`ColdBlobs::Upstream`),
    /// while the fetcher copies it.
    Elsewhere(String),
}

pub struct Mirror {
    index: Arc<dyn Index>,
    store: Arc<dyn BlobStore>,
    queue: Arc<dyn FetchQueue>,
    upstreams: Arc<Upstreams>,
    cfg: MirrorConfig,
    flights: Flights,
    /// How requests were answered, and what of it is stored.
    stats: RequestStats,
    /// Recent "ask again later" answers by (repository, digest): repeated
    /// within `LATER_FOR`, with no index read (a herd retrying in step reads
    /// the blob's item once per instance per second at most).
    later: Mutex<HashMap<(String, Digest), (Instant, u64)>>,
    /// Where upstreams send clients for blobs being copied, by (registry,
    /// digest), kept `ELSEWHERE_FOR`: one upstream request per wave.
    elsewhere: Mutex<HashMap<(String, Digest), (Instant, String)>>,
}

/// How long a "later" answer is repeated without reading the index.
const LATER_FOR: Duration = Duration::from_secs(1);

impl From<StorageError> for RegistryError {
    fn from(e: StorageError) -> Self {
        RegistryError::new(ErrorCode::Unavailable, "the mirror's storage is unavailable").with_internal(e)
    }
}

/// Maps an upstream failure to what the client is told.
fn upstream_error(e: UpstreamError, repo: &RepoPath, not_found: ErrorCode) -> RegistryError {
    let base = match &e {
        UpstreamError::NotFound => RegistryError::code(not_found),
        UpstreamError::RateLimited { retry_after } => {
            RegistryError::new(ErrorCode::TooManyRequests, format!("upstream {} is rate limiting the mirror", repo.registry))
                .with_retry_after(*retry_after)
        }
        UpstreamError::Denied(_) => RegistryError::new(
            ErrorCode::NameUnknown,
            format!("upstream {} refused {}: it does not exist or needs credentials", repo.registry, repo.name),
        ),
        UpstreamError::Invalid(why) => RegistryError::new(ErrorCode::Unavailable, format!("upstream {} misbehaved: {why}", repo.registry)),
        UpstreamError::Status(_) | UpstreamError::Transport(_) | UpstreamError::Redirected(_) => {
            RegistryError::new(ErrorCode::Unavailable, format!("upstream {} is unavailable", repo.registry))
        }
    };
    base.with_internal(e)
}

fn not_acceptable(m: &ManifestRecord) -> RegistryError {
    RegistryError::new(ErrorCode::ManifestUnknown, format!("manifest {} is {}, which the client does not accept", m.digest, m.media_type))
}

impl Mirror {
    pub fn new(
        index: Arc<dyn Index>,
        store: Arc<dyn BlobStore>,
        queue: Arc<dyn FetchQueue>,
        upstreams: Arc<Upstreams>,
        cfg: MirrorConfig,
    ) -> Mirror {
        Mirror {
            index,
            store,
            queue,
            upstreams,
            cfg,
            flights: Flights::default(),
            stats: RequestStats::default(),
            later: Mutex::default(),
            elsewhere: Mutex::default(),
        }
    }

    pub fn index(&self) -> &Arc<dyn Index> {
        &self.index
    }

    pub fn store(&self) -> &Arc<dyn BlobStore> {
        &self.store
    }

    /// What the cache holds and how it served, for `/_hubcap/stats`.
    pub async fn report(&self) -> Result<Report, StorageError> {
        self.stats.report(self.index.as_ref(), &self.upstreams.tally()).await
    }

    /// Adds what was counted since the last flush to the stored statistics.
    pub async fn flush_stats(&self) -> Result<(), StorageError> {
        self.stats.flush(self.index.as_ref(), &self.upstreams.tally()).await
    }

    /// `flush_stats`, when the last flush is at least `every` old.
    pub async fn flush_stats_every(&self, every: Duration) {
        self.stats.flush_every(self.index.as_ref(), &self.upstreams.tally(), every).await
    }

    fn stale_mark(&self, at: i64) -> bool {
        now() - at >= self.cfg.touch_every.as_secs() as i64
    }

    /// Records a pull of a tag, at most once per `touch_every`. A failure to
    /// record it never fails the pull.
    async fn tag_pulled(&self, t: &TagRecord) {
        if self.stale_mark(t.pulled_at)
            && let Err(e) = self.index.tag_pulled(&t.repo, &t.tag, &t.variant).await
        {
            tracing::warn!(repo = %t.repo, tag = %t.tag, error = %e, "could not record a pull");
        }
    }

    /// Whether a blob the index says is ready may be served: it may when it
    /// was marked used within `touch_every`, or when marking it now works
    /// (it fails once GC has started deleting it).
    async fn still_ready(&self, repo: &str, r: &BlobRecord) -> Result<bool, RegistryError> {
        if r.state != BlobState::Ready {
            return Ok(false);
        }
        if self.store.stored_here(&r.digest).await == Some(false) {
            self.blob_lost(&r.digest, Some(repo)).await?;
            return Ok(false);
        }
        if !self.stale_mark(r.used_at) {
            return Ok(true);
        }
        Ok(self.index.touch_blob(&r.digest, Some(repo)).await?)
    }

    /// A blob the index calls `ready` is not in the store (removed by hand,
    /// lost with a disk): it goes back to `pending`, to be fetched again.
    pub async fn blob_lost(&self, digest: &Digest, repo: Option<&str>) -> Result<(), RegistryError> {
        let repos: Vec<String> = repo.map(str::to_owned).into_iter().collect();
        if self.index.mark_blob_lost(digest, &repos).await? {
            tracing::warn!(%digest, "a ready blob was missing from the store; fetching it again");
        }
        Ok(())
    }

    pub fn upstreams(&self) -> &Upstreams {
        &self.upstreams
    }

    /// How requests were answered since start-up.
    pub fn counters(&self) -> &Counters {
        self.stats.counters()
    }

    /// Re-queues fetches a previous run left unfinished.
    pub async fn resume_fetches(&self) -> Result<usize, RegistryError> {
        let unfinished = self.index.unfinished_blobs().await?;
        let n = unfinished.len();
        for b in unfinished {
            if let Some(source) = RepoPath::from_key(&b.source) {
                self.queue.enqueue(FetchJob { digest: b.digest, source, size: b.size });
            }
        }
        Ok(n)
    }

    // -- manifests ----------------------------------------------------------

    /// A page of the repository's tags, relayed from upstream.
    pub async fn tags(&self, repo: &RepoPath, n: Option<u32>, last: Option<&str>) -> Result<TagsPage, RegistryError> {
        let upstream = self.upstreams.get(&repo.registry)?;
        upstream.tags(repo, n, last, Retry::FETCH).await.map_err(|e| upstream_error(e, repo, ErrorCode::NameUnknown))
    }
}
