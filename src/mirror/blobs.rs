//! The blob path: a blob is served for a repository once linked to it; a
//! ready one is a short-lived URL, a missing one is queued for the fetcher
//! and waited for (bounded), and a `HEAD` answers its size without a fetch.

use super::*;

impl Mirror {
    /// Confirms upstream that `repo` contains `digest`, and records it.
    /// Returns the size upstream declared, if it did. A registry's word
    /// (`HEAD`) is taken for its own content; content the cache holds from
    /// another registry (`known`'s source) must be proved: that registry
    /// serves the bytes and they hash to the digest. Otherwise a hostile
    /// registry, answering `HEAD 200` for any digest, would read what
    /// others put in the cache, around `--deny-repo`.
    async fn confirm_link(&self, repo: &RepoPath, digest: &Digest, known: Option<&BlobRecord>) -> Result<Option<u64>, RegistryError> {
        let upstream = self.upstreams.get(&repo.registry)?;
        // Only stored content can leak; a copy still under way from another
        // registry is confirmed as any unknown blob is.
        let stored_from_elsewhere = known.filter(|r| r.state == BlobState::Ready).is_some_and(|r| from_elsewhere(r, repo));
        if stored_from_elsewhere {
            let size = self.prove_blob(upstream, repo, digest).await?;
            self.index.link(&repo.key(), digest).await?;
            return Ok(Some(size));
        }
        match upstream.head_blob(repo, digest, Retry::FETCH).await {
            Ok(Some(size)) => {
                self.index.link(&repo.key(), digest).await?;
                Ok(size)
            }
            Ok(None) => Err(RegistryError::code(ErrorCode::BlobUnknown)),
            Err(e) => Err(upstream_error(e, repo, ErrorCode::BlobUnknown)),
        }
    }

    /// Reads the blob from `repo`'s registry to its end, hashing it, within
    /// the upstream's limits: its size when the bytes are the digest's.
    async fn prove_blob(&self, upstream: &Upstream, repo: &RepoPath, digest: &Digest) -> Result<u64, RegistryError> {
        let not_proved = |why: String| {
            RegistryError::new(ErrorCode::BlobUnknown, format!("upstream {} did not prove it has {digest}: {why}", repo.registry))
        };
        let resp = upstream.get_blob(repo, digest, Retry::FETCH).await.map_err(|e| upstream_error(e, repo, ErrorCode::BlobUnknown))?;
        let limits = upstream.limits();
        let mut body = transfer::Body::stream(resp, limits);
        let (mut hasher, mut size, mut stalled) = (sha2::Sha256::default(), 0u64, false);
        while let Some(chunk) = body.next(&mut stalled).await.map_err(|e| not_proved(e.to_string()))? {
            size += chunk.len() as u64;
            if size > limits.max_blob {
                return Err(not_proved(format!("more than {} bytes", limits.max_blob)));
            }
            sha2::Digest::update(&mut hasher, &chunk);
        }
        let got = Digest::from_sha256(&sha2::Digest::finalize(hasher));
        if got != *digest {
            return Err(not_proved(format!("its bytes hash to {got}")));
        }
        tracing::info!(%digest, repo = %repo, size, "a registry proved it holds a blob cached from another");
        Ok(size)
    }

    fn start_fetch(&self, repo: &RepoPath, digest: &Digest, size: Option<u64>) {
        self.queue.enqueue(FetchJob { digest: digest.clone(), source: repo.clone(), size });
    }

    /// A blob `GET`: a URL to the stored blob, fetching it first (bounded
    /// wait) when it is not stored yet.
    pub async fn blob(&self, repo: &RepoPath, digest: &Digest) -> Result<(BlobAnswer, CacheStatus), RegistryError> {
        self.blob_for(repo, digest, false).await
    }

    /// `blob`, for a client that tries a layer again after a failure
    /// (`retries`: Docker's daemon): only such a client may be told to come
    /// back later (`BlobWaitMode::Retry`). podman and containerd try a
    /// layer once, then fail over to the next endpoint (measured:
    /// `tests/docker.rs`), so they are always held.
    pub async fn blob_for(&self, repo: &RepoPath, digest: &Digest, retries: bool) -> Result<(BlobAnswer, CacheStatus), RegistryError> {
        let key = repo.key();
        let mode = if retries { self.cfg.blob_wait_mode } else { BlobWaitMode::Hold };
        if let Some(secs) = self.recent_later(&key, digest).filter(|_| mode == BlobWaitMode::Retry) {
            return Ok((BlobAnswer::Later(secs), CacheStatus::Miss));
        }
        let view = self.index.blob(&key, digest).await?;
        // The size another registry claimed for a copy still under way is its
        // word, not this registry's: this one is asked.
        let mut size = view.record.as_ref().filter(|r| !from_elsewhere(r, repo) || r.state == BlobState::Ready).and_then(|r| r.size);
        if !view.linked || size.is_none() && view.record.as_ref().is_some_and(|r| r.size.is_some()) {
            size = self.confirm_link(repo, digest, view.record.as_ref()).await?;
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
        // A copy under way from another registry says nothing of this one's.
        let own = view.record.as_ref().filter(|r| !from_elsewhere(r, repo));
        // Where that copy cannot be copied beside (the index is the queue:
        // one copy per digest), its source must not hold this registry's
        // client hostage: the client goes to its own registry's blob
        // location, whatever the size.
        let held_elsewhere = own.is_none()
            && view.record.as_ref().is_some_and(|r| matches!(r.state, BlobState::Pending | BlobState::Fetching))
            && !self.queue.copies_beside();
        if self.cfg.cold_blobs == ColdBlobs::Upstream
            && (held_elsewhere || size.or(own.and_then(|r| r.size)).is_some_and(|s| s >= LARGE_BLOB))
            && let Some(url) = self.upstream_location(repo, digest).await
        {
            return Ok((BlobAnswer::Elsewhere(url), CacheStatus::Miss));
        }
        let (hold, mut poll) = match how_to_wait(mode, own, size, self.cfg.blob_wait, now()) {
            Wait::Later(secs) => {
                self.remember_later(&key, digest, secs);
                return Ok((BlobAnswer::Later(secs), CacheStatus::Miss));
            }
            Wait::Hold(hold) => (hold, Duration::from_millis(50)),
            // Near the copy's end: the first look when it should be done.
            Wait::HoldFor(hold, first) => (hold, first),
        };
        // Wait, bounded, for the copy: on the in-process queue directly; when
        // the fetch runs elsewhere (another instance, the fetcher Lambda), by
        // polling the index.
        // Never past the request's own deadline (a Lambda front end's limit).
        let deadline = deadline::by(hold);
        // A copy in this process into a store it can read back is followed
        // once it has run a moment (a short one keeps its 307): the client
        // gets the bytes as they come, whatever the copy takes.
        let follow_from = Instant::now() + FOLLOW_AFTER;
        let mut retaken = false;
        loop {
            let now = Instant::now();
            let left = deadline.saturating_duration_since(now);
            let step = if self.queue.follows() { left.min(follow_from.saturating_duration_since(now).max(FOLLOW_POLL)) } else { left };
            if self.queue.wait(digest, &repo.registry, step).await == WaitOutcome::TimedOut {
                // Only a copy that is bringing bytes: one failing before
                // its first byte is answered as before (a 503, not a cut).
                let follow =
                    self.queue.follow(digest, &repo.registry).filter(|f| f.partial.borrow().as_ref().is_some_and(|p| p.readable() > 0));
                if let Some(f) = follow.filter(|_| Instant::now() >= follow_from) {
                    return Ok((BlobAnswer::Follow(f), CacheStatus::Miss));
                }
                if Instant::now() >= deadline {
                    return Ok((BlobAnswer::Pending, CacheStatus::Miss));
                }
                continue;
            }
            let record = self.index.blob_record(digest).await?;
            match record {
                Some(r) if r.state == BlobState::Ready => {
                    return Ok((BlobAnswer::Ready(self.store.presigned_get(digest, self.cfg.url_ttl).await?), CacheStatus::Miss));
                }
                // The copy from another registry failed: this registry's
                // request is not answered with its failure, but copied from
                // this registry (once).
                Some(r) if r.state == BlobState::Failed && from_elsewhere(&r, repo) && !retaken => {
                    retaken = true;
                    if self.index.create_pending_blob(digest, &key, size).await? {
                        self.start_fetch(repo, digest, size);
                    }
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
                    poll = (poll * 2).clamp(Duration::from_millis(100), Duration::from_millis(500));
                }
            }
        }
    }

    /// Where `repo`'s registry sends clients for `digest` (its CDN), from
    /// what it said within `ELSEWHERE_FOR`, else asked now. `None` when it
    /// serves blobs itself, or cannot be asked.
    async fn upstream_location(&self, repo: &RepoPath, digest: &Digest) -> Option<String> {
        let key = (repo.registry.clone(), digest.clone());
        if let Some((at, url)) = self.elsewhere.lock().unwrap_or_else(|p| p.into_inner()).get(&key)
            && at.elapsed() < ELSEWHERE_FOR
        {
            return Some(url.clone());
        }
        let upstream = self.upstreams.get(&repo.registry).ok()?;
        match upstream.blob_location(repo, digest).await {
            Ok(Some(url)) => {
                let mut known = self.elsewhere.lock().unwrap_or_else(|p| p.into_inner());
                if known.len() >= 1024 {
                    known.retain(|_, (at, _)| at.elapsed() < ELSEWHERE_FOR);
                }
                known.insert(key, (Instant::now(), url.clone()));
                Some(url)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(%digest, repo = %repo, error = %e, "could not ask upstream where it serves a cold blob; the client waits");
                None
            }
        }
    }

    /// The "later" answer given for this blob in this repository within
    /// `LATER_FOR`, if any.
    fn recent_later(&self, repo: &str, digest: &Digest) -> Option<u64> {
        let later = self.later.lock().unwrap_or_else(|p| p.into_inner());
        later.get(&(repo.to_owned(), digest.clone())).filter(|(at, _)| at.elapsed() < LATER_FOR).map(|(_, secs)| *secs)
    }

    fn remember_later(&self, repo: &str, digest: &Digest, secs: u64) {
        let mut later = self.later.lock().unwrap_or_else(|p| p.into_inner());
        if later.len() >= 1024 {
            later.retain(|_, (at, _)| at.elapsed() < LATER_FOR);
        }
        later.insert((repo.to_owned(), digest.clone()), (Instant::now(), secs));
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
        // The size another registry claimed for a copy still under way is its
        // word, not this registry's: this one is asked.
        let size = match view.record.as_ref().filter(|r| !from_elsewhere(r, repo)).and_then(|r| r.size) {
            Some(size) if view.linked => Some(size),
            _ => self.confirm_link(repo, digest, view.record.as_ref()).await?,
        };
        if let Some(size) = ready {
            return Ok((size, CacheStatus::Hit));
        }
        if let Some(size) = size {
            self.index.create_pending_blob(digest, &key, Some(size)).await?;
            self.start_fetch(repo, digest, Some(size));
            return Ok((size, CacheStatus::Miss));
        }
        // Upstream did not say how large it is (unknown is not zero): the
        // verified copy will, within the same bounded wait as a GET.
        if let (BlobAnswer::Ready(_), _) = self.blob(repo, digest).await?
            && let Some(size) = self.index.blob(&key, digest).await?.record.and_then(|r| r.size)
        {
            return Ok((size, CacheStatus::Miss));
        }
        Err(RegistryError::new(ErrorCode::Unavailable, format!("{digest} is still being fetched; its size is not known yet"))
            .with_retry_after(Some(1)))
    }

    // -- tags ---------------------------------------------------------------
}

/// Whether a blob record came from another registry than `repo`'s.
fn from_elsewhere(r: &BlobRecord, repo: &RepoPath) -> bool {
    RepoPath::from_key(&r.source).is_some_and(|from| from.registry != repo.registry)
}

/// How long an upstream's blob location is handed out: well within the
/// life of Docker Hub's signed CDN URLs.
const ELSEWHERE_FOR: Duration = Duration::from_secs(60);

/// How long a request waits for a copy in this process before following it.
const FOLLOW_AFTER: Duration = Duration::from_secs(1);
/// How often a request waiting to follow a copy looks for its bytes.
const FOLLOW_POLL: Duration = Duration::from_millis(100);

/// Blobs at least this large get checkpoints, so their copy's progress is
/// in the index; smaller ones are always held for.
pub const LARGE_BLOB: u64 = 8 << 20;
/// A copy expected to end within this is waited for inside the request.
const HOLD_NEAR_END: u64 = 2;
/// What a Docker client's retries of a layer cover after its first try:
/// pauses of 5, 10, 15, 20 and 25 s (measured: `tests/docker.rs`,
/// `how_long_docker_waits_on_a_mirror_for_a_layer`).
const CLIENT_COVER: i64 = 75;
/// Slack for a copy that runs slower than its estimate, and for the time
/// between the blob's first request and the fetcher's claim.
const COVER_MARGIN: i64 = 15;
/// Of the client's retries, what a copy with no progress to go by yet may
/// use: half, since its length is unknown (the other half is left for the
/// copy once its rate shows).
const COVER_UNKNOWN: i64 = CLIENT_COVER / 2;

/// How a blob request waits for a copy in progress.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Wait {
    /// Inside the request, at most this long.
    Hold(Duration),
    /// Inside the request, at most this long, first looking after the
    /// second (when the copy should have ended): fewer reads of the hot item.
    HoldFor(Duration, Duration),
    /// Not here: answered at once, "ask again in this many seconds".
    Later(u64),
}

/// Decides how a request for a blob still being copied waits. In `Retry`
/// mode a large blob's request is answered at once while the client's own
/// retry pauses are sure to outlast the copy. A client on its k-th try has
/// been asking since at least the copy began, so at copy age `A` every
/// waiting client still has at least `CLIENT_COVER - A` seconds of retries
/// left: the request is answered at once only when the copy's age plus its
/// expected remaining time (from its checkpoint) and a margin stays within
/// that; held when the copy is about to end (the client then gets the blob
/// without another pause), and held as in `Hold` mode otherwise (a copy
/// too long for the retries, one handed over from another fetcher, or with
/// no progress to go by).
pub(super) fn how_to_wait(mode: BlobWaitMode, record: Option<&BlobRecord>, size: Option<u64>, blob_wait: Duration, now: i64) -> Wait {
    let held = Wait::Hold(blob_wait);
    let size = size.or(record.and_then(|r| r.size));
    if mode == BlobWaitMode::Hold || size.is_none_or(|s| s < LARGE_BLOB) {
        return held;
    }
    let size = size.unwrap_or(0);
    let (age, offset) = match record {
        // Made pending by this request.
        None => (0, 0),
        Some(r) if r.attempts <= 1 && matches!(r.state, BlobState::Pending | BlobState::Fetching) => {
            let offset = if r.state == BlobState::Fetching { r.checkpoint.as_ref().map_or(0, |c| c.offset) } else { 0 };
            ((now - r.updated_at).max(0), offset)
        }
        _ => return held,
    };
    if offset == 0 || age == 0 {
        // No progress to go by yet: early on, the retries cover it.
        return if age + COVER_MARGIN + 5 <= COVER_UNKNOWN { Wait::Later(5) } else { held };
    }
    let left = (size.saturating_sub(offset) as f64 * age as f64 / offset as f64).ceil() as u64;
    if left <= HOLD_NEAR_END {
        let within = blob_wait.min(Duration::from_secs(left + HOLD_NEAR_END));
        return Wait::HoldFor(within, Duration::from_secs(left).clamp(Duration::from_millis(250), within));
    }
    if age + left as i64 + COVER_MARGIN <= CLIENT_COVER { Wait::Later(left.min(25)) } else { held }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Checkpoint;

    const MIB: u64 = 1 << 20;

    fn fetching(updated_at: i64, offset: u64, attempts: u32) -> BlobRecord {
        BlobRecord {
            digest: Digest::parse(&format!("sha256:{}", "a".repeat(64))).unwrap(),
            state: BlobState::Fetching,
            size: Some(200 * MIB),
            source: "docker.io/library/x".into(),
            attempts,
            last_error: None,
            updated_at,
            used_at: 0,
            lease_until: 0,
            checkpoint: (offset > 0).then(|| Checkpoint { upload: "u".into(), offset, hash: vec![] }),
        }
    }

    #[test]
    fn large_copies_are_waited_for_outside_while_the_clients_retries_outlast_them() {
        let (wait, now) = (Duration::from_secs(20), 1_000);
        let retry = BlobWaitMode::Retry;
        // Hold mode, and small blobs in any mode: held.
        assert_eq!(how_to_wait(BlobWaitMode::Hold, None, Some(200 * MIB), wait, now), Wait::Hold(wait));
        assert_eq!(how_to_wait(retry, None, Some(MIB), wait, now), Wait::Hold(wait));
        assert_eq!(how_to_wait(retry, None, None, wait, now), Wait::Hold(wait), "size unknown");
        // Just made pending, or claimed with no part done: ask again in 5 s.
        assert_eq!(how_to_wait(retry, None, Some(200 * MIB), wait, now), Wait::Later(5));
        assert_eq!(how_to_wait(retry, Some(&fetching(now - 3, 0, 1)), None, wait, now), Wait::Later(5));
        // 40 of 200 MiB in 4 s: 16 s left, 20 s in all: answered at once.
        assert_eq!(how_to_wait(retry, Some(&fetching(now - 4, 40 * MIB, 1)), None, wait, now), Wait::Later(16));
        // 196 of 200 MiB in 19.6 s: under 2 s left, held that long and a bit.
        assert_eq!(
            how_to_wait(retry, Some(&fetching(now - 20, 196 * MIB, 1)), None, wait, now),
            Wait::HoldFor(Duration::from_secs(3), Duration::from_secs(1))
        );
        // 40 of 200 MiB in 20 s: 80 s left, past what the retries cover: held.
        assert_eq!(how_to_wait(retry, Some(&fetching(now - 20, 40 * MIB, 1)), None, wait, now), Wait::Hold(wait));
        // A copy another fetcher handed over: its age says nothing of the clients'.
        assert_eq!(how_to_wait(retry, Some(&fetching(now - 4, 40 * MIB, 2)), None, wait, now), Wait::Hold(wait));
    }
}
