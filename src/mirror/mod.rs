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

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

pub mod fetch;
pub mod upstream;

use self::fetch::{FetchJob, FetchQueue, WaitOutcome};
use self::upstream::{Retry, TagsPage, Upstream, UpstreamError, Upstreams};
use crate::observe::{CacheStatus, Counters, Report, RequestStats};
use crate::oci::{Accept, Digest, ErrorCode, ManifestInfo, Reference, RegistryError, RepoPath, parse_manifest};
use crate::storage::{BlobRecord, BlobState, BlobStore, Index, ManifestRecord, StorageError, TagRecord, now};

/// A blob `pending` this long without a fetcher taking it is re-queued.
const STALE_FETCH: Duration = Duration::from_secs(60);

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
#[derive(Debug)]
pub enum BlobAnswer {
    /// A short-lived URL to the stored blob.
    Ready(String),
    /// Still being fetched after the bounded wait.
    Pending,
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
}

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
        UpstreamError::Status(_) | UpstreamError::Transport(_) => {
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
        Mirror { index, store, queue, upstreams, cfg, flights: Flights::default(), stats: RequestStats::default() }
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
        if !self.stale_mark(r.used_at) {
            return Ok(true);
        }
        Ok(self.index.touch_blob(&r.digest, Some(repo)).await?)
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

    pub async fn manifest(
        &self,
        repo: &RepoPath,
        reference: &Reference,
        accept: &Accept,
    ) -> Result<(ManifestRecord, CacheStatus), RegistryError> {
        match reference {
            Reference::Digest(d) => self.manifest_by_digest(repo, d, accept).await,
            Reference::Tag(t) => {
                // The primary answer is what upstream gives a client that
                // accepts every type; a narrower client gets its own variant.
                let (m, status) = self.resolve_tag(repo, t, &Accept::all()).await?;
                if accept.accepts(&m.media_type) {
                    return Ok((m, status));
                }
                let (m, status) = self.resolve_tag(repo, t, accept).await?;
                if !accept.accepts(&m.media_type) {
                    return Err(not_acceptable(&m));
                }
                Ok((m, status))
            }
        }
    }

    async fn manifest_by_digest(
        &self,
        repo: &RepoPath,
        digest: &Digest,
        accept: &Accept,
    ) -> Result<(ManifestRecord, CacheStatus), RegistryError> {
        let key = repo.key();
        let found = self.index.manifest(&key, digest).await?;
        let (m, status) = match found.record {
            Some(m) if found.linked => {
                if self.stale_mark(found.pulled_at)
                    && let Err(e) = self.index.manifest_pulled(&key, digest).await
                {
                    tracing::warn!(repo = %repo, %digest, error = %e, "could not record a pull");
                }
                (m, CacheStatus::Hit)
            }
            _ => {
                let _flight = self.flights.lock(format!("m {key}@{digest}")).await;
                let found = self.index.manifest(&key, digest).await?;
                match found.record {
                    Some(m) if found.linked => (m, CacheStatus::Hit),
                    Some(m) => {
                        // Cached from another repository: confirm this one
                        // has it, then store it as this repository's too.
                        let upstream = self.upstreams.get(&repo.registry)?;
                        match upstream.head_manifest(repo, digest.as_str(), &Accept::all().upstream_types(), Retry::FETCH).await {
                            Ok(Some(_)) => {
                                let info = parse_manifest(&m.body, Some(&m.media_type))?;
                                self.store_manifest(repo, &m, &info).await?;
                            }
                            Ok(None) => return Err(RegistryError::code(ErrorCode::ManifestUnknown)),
                            Err(e) => return Err(upstream_error(e, repo, ErrorCode::ManifestUnknown)),
                        }
                        (m, CacheStatus::Miss)
                    }
                    None => {
                        let upstream = self.upstreams.get(&repo.registry)?;
                        (self.fetch_manifest(upstream, repo, digest.as_str(), &Accept::all(), Some(digest)).await?, CacheStatus::Miss)
                    }
                }
            }
        };
        if !accept.accepts(&m.media_type) {
            return Err(not_acceptable(&m));
        }
        Ok((m, status))
    }

    fn tag_is_fresh(&self, t: &TagRecord) -> bool {
        now() - t.checked_at < self.cfg.tag_ttl.as_secs() as i64
    }

    /// Answers a tag for one Accept variant: cached while fresh, re-validated
    /// after its TTL, stale when upstream fails, fetched on a miss.
    async fn resolve_tag(&self, repo: &RepoPath, tag: &str, accept: &Accept) -> Result<(ManifestRecord, CacheStatus), RegistryError> {
        let key = repo.key();
        let variant = accept.key();
        if let Some((t, Some(m))) = self.index.tag_manifest(&key, tag, &variant).await?
            && self.tag_is_fresh(&t)
        {
            self.tag_pulled(&t).await;
            return Ok((m, CacheStatus::Hit));
        }
        let _flight = self.flights.lock(format!("t {key}:{tag}#{variant}")).await;
        let cached = match self.index.tag_manifest(&key, tag, &variant).await? {
            Some((t, Some(m))) => Some((t, m)),
            _ => None,
        };
        let upstream = self.upstreams.get(&repo.registry)?;
        let types = accept.upstream_types();
        if let Some((t, m)) = cached {
            self.tag_pulled(&t).await;
            if self.tag_is_fresh(&t) {
                // Re-validated by the request we waited for.
                return Ok((m, CacheStatus::Hit));
            }
            if self.upstreams.backing_off(&repo.registry) {
                return Ok((m, CacheStatus::Stale));
            }
            let head = tokio::time::timeout(self.cfg.revalidate_timeout, upstream.head_manifest(repo, tag, &types, Retry::ONCE)).await;
            let failure = match head {
                Ok(Ok(Some((digest, _)))) if digest == t.digest => {
                    self.index.touch_tag(&key, tag, &variant, now()).await?;
                    return Ok((m, CacheStatus::Revalidated));
                }
                Ok(Ok(Some((digest, _)))) => {
                    // The tag moved: take the new manifest by digest (it may
                    // already be cached), then move the tag.
                    match self.manifest_by_digest(repo, &digest, &Accept::all()).await {
                        Ok((new, _)) => {
                            self.put_tag(repo, tag, &variant, &new).await?;
                            return Ok((new, CacheStatus::Revalidated));
                        }
                        Err(e) => e.to_string(),
                    }
                }
                Ok(Ok(None)) => {
                    self.index.delete_tag(&key, tag, &variant).await?;
                    return Err(RegistryError::new(ErrorCode::ManifestUnknown, format!("tag {tag} no longer exists upstream")));
                }
                Ok(Err(e)) => {
                    let pause = match &e {
                        UpstreamError::RateLimited { retry_after: Some(s) } => Duration::from_secs((*s).clamp(1, 300)),
                        _ => self.cfg.upstream_backoff,
                    };
                    self.upstreams.back_off(&repo.registry, pause);
                    e.to_string()
                }
                Err(_) => {
                    self.upstreams.back_off(&repo.registry, self.cfg.upstream_backoff);
                    format!("no answer within {:?}", self.cfg.revalidate_timeout)
                }
            };
            tracing::warn!(repo = %repo, tag, error = %failure, "tag re-validation failed; serving the cached manifest");
            return Ok((m, CacheStatus::Stale));
        }
        let m = self.fetch_manifest(upstream, repo, tag, accept, None).await?;
        self.put_tag(repo, tag, &variant, &m).await?;
        Ok((m, CacheStatus::Miss))
    }

    async fn put_tag(&self, repo: &RepoPath, tag: &str, variant: &str, m: &ManifestRecord) -> Result<(), RegistryError> {
        let record = TagRecord {
            repo: repo.key(),
            tag: tag.to_owned(),
            variant: variant.to_owned(),
            digest: m.digest.clone(),
            media_type: m.media_type.clone(),
            checked_at: now(),
            pulled_at: now(),
        };
        Ok(self.index.put_tag(&record, m).await?)
    }

    /// GETs a manifest upstream, verifies its digest, stores it (linking and
    /// enqueueing what it references).
    async fn fetch_manifest(
        &self,
        upstream: &Upstream,
        repo: &RepoPath,
        reference: &str,
        accept: &Accept,
        expect: Option<&Digest>,
    ) -> Result<ManifestRecord, RegistryError> {
        let got = upstream
            .get_manifest(repo, reference, &accept.upstream_types(), Retry::FETCH)
            .await
            .map_err(|e| upstream_error(e, repo, ErrorCode::ManifestUnknown))?;
        let digest = Digest::of(&got.body);
        let lie = |what: String| {
            RegistryError::new(ErrorCode::ManifestInvalid, format!("upstream {} sent a bad manifest: {what}", repo.registry))
        };
        if let Some(claimed) = &got.digest
            && *claimed != digest
        {
            return Err(lie(format!("its bytes hash to {digest}, not the {claimed} it claimed")));
        }
        if let Some(want) = expect
            && *want != digest
        {
            return Err(lie(format!("asked for {want}, got {digest}")));
        }
        let info = parse_manifest(&got.body, got.content_type.as_deref())?;
        let record = ManifestRecord { digest, media_type: info.media_type.clone(), body: got.body };
        self.store_manifest(repo, &record, &info).await?;
        Ok(record)
    }

    async fn store_manifest(&self, repo: &RepoPath, m: &ManifestRecord, info: &ManifestInfo) -> Result<(), RegistryError> {
        let digests: Vec<Digest> = info.blobs.iter().map(|b| b.digest.clone()).collect();
        let pending = self.index.put_manifest(&repo.key(), m, &digests).await?;
        // Prefetch: by the time the client asks for the layers, they are on
        // their way into the store.
        for d in pending {
            let size = info.blobs.iter().find(|b| b.digest == d).and_then(|b| b.size);
            self.queue.enqueue(FetchJob { digest: d, source: repo.clone(), size });
        }
        Ok(())
    }

    // -- blobs --------------------------------------------------------------

    /// Confirms upstream that `repo` contains `digest`, and records it.
    async fn confirm_link(&self, repo: &RepoPath, digest: &Digest) -> Result<u64, RegistryError> {
        let upstream = self.upstreams.get(&repo.registry)?;
        match upstream.head_blob(repo, digest, Retry::FETCH).await {
            Ok(Some(size)) => {
                self.index.link(&repo.key(), digest).await?;
                Ok(size)
            }
            Ok(None) => Err(RegistryError::code(ErrorCode::BlobUnknown)),
            Err(e) => Err(upstream_error(e, repo, ErrorCode::BlobUnknown)),
        }
    }

    fn start_fetch(&self, repo: &RepoPath, digest: &Digest, size: Option<u64>) {
        self.queue.enqueue(FetchJob { digest: digest.clone(), source: repo.clone(), size });
    }

    /// A blob `GET`: a URL to the stored blob, fetching it first (bounded
    /// wait) when it is not stored yet.
    pub async fn blob(&self, repo: &RepoPath, digest: &Digest) -> Result<(BlobAnswer, CacheStatus), RegistryError> {
        let key = repo.key();
        let view = self.index.blob(&key, digest).await?;
        let mut size = view.record.as_ref().and_then(|r| r.size);
        if !view.linked {
            size = Some(self.confirm_link(repo, digest).await?);
        }
        if let Some(r) = &view.record
            && self.still_ready(&key, r).await?
        {
            return Ok((BlobAnswer::Ready(self.store.presigned_get(digest, self.cfg.url_ttl).await?), CacheStatus::Hit));
        }
        // Someone else's fetch that looks lost (a stream record that never
        // arrived, a fetcher that died) is queued again. Only a record last
        // touched before the cut-off can be: a fresh one costs no write.
        let looks_lost = view.record.as_ref().is_some_and(|r| now() - r.updated_at >= STALE_FETCH.as_secs() as i64);
        if !self.index.create_pending_blob(digest, &key, size).await? && looks_lost {
            self.index.requeue_stale_blob(digest, STALE_FETCH).await?;
        }
        self.start_fetch(repo, digest, size);
        // Wait, bounded, for the copy: on the in-process queue directly; when
        // the fetch runs elsewhere (another instance, the fetcher Lambda), by
        // polling the index.
        let deadline = Instant::now() + self.cfg.blob_wait;
        let mut poll = Duration::from_millis(50);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if self.queue.wait(digest, left).await == WaitOutcome::TimedOut {
                return Ok((BlobAnswer::Pending, CacheStatus::Miss));
            }
            let record = self.index.blob(&key, digest).await?.record;
            match record {
                Some(r) if r.state == BlobState::Ready => {
                    return Ok((BlobAnswer::Ready(self.store.presigned_get(digest, self.cfg.url_ttl).await?), CacheStatus::Miss));
                }
                Some(r) if r.state == BlobState::Failed => {
                    let why = r.last_error.unwrap_or_default();
                    let code = if why.contains("not found upstream") { ErrorCode::BlobUnknown } else { ErrorCode::Unavailable };
                    return Err(RegistryError::new(code, format!("fetching {digest} from {} failed", repo.registry)).with_internal(why));
                }
                // GC deleted it meanwhile (or is deleting it): fetch it again
                // once the record is gone or GC's lease has run out.
                None | Some(BlobRecord { state: BlobState::Deleting, .. })
                    if self.index.create_pending_blob(digest, &key, size).await? =>
                {
                    self.start_fetch(repo, digest, size);
                }
                _ if Instant::now() + poll >= deadline => return Ok((BlobAnswer::Pending, CacheStatus::Miss)),
                _ => {
                    tokio::time::sleep(poll).await;
                    poll = (poll * 2).min(Duration::from_millis(500));
                }
            }
        }
    }

    /// A blob `HEAD`: its size, answered directly. A miss starts the fetch,
    /// since a GET usually follows.
    pub async fn blob_size(&self, repo: &RepoPath, digest: &Digest) -> Result<(u64, CacheStatus), RegistryError> {
        let key = repo.key();
        let view = self.index.blob(&key, digest).await?;
        let ready = match &view.record {
            Some(r) if self.still_ready(&key, r).await? => r.size,
            _ => None,
        };
        if let (true, Some(size)) = (view.linked, ready) {
            return Ok((size, CacheStatus::Hit));
        }
        let size = match (view.linked, view.record.as_ref().and_then(|r| r.size)) {
            (true, Some(size)) => size,
            _ => self.confirm_link(repo, digest).await?,
        };
        if let Some(size) = ready {
            return Ok((size, CacheStatus::Hit));
        }
        self.index.create_pending_blob(digest, &key, Some(size)).await?;
        self.start_fetch(repo, digest, Some(size));
        Ok((size, CacheStatus::Miss))
    }

    // -- tags ---------------------------------------------------------------

    /// A page of the repository's tags, relayed from upstream.
    pub async fn tags(&self, repo: &RepoPath, n: Option<u32>, last: Option<&str>) -> Result<TagsPage, RegistryError> {
        let upstream = self.upstreams.get(&repo.registry)?;
        upstream.tags(repo, n, last, Retry::FETCH).await.map_err(|e| upstream_error(e, repo, ErrorCode::NameUnknown))
    }
}
