//! The blob path: a blob is served for a repository once linked to it; a
//! ready one is a short-lived URL, a missing one is queued for the fetcher
//! and waited for (bounded), and a `HEAD` answers its size without a fetch.

use super::*;

impl Mirror {
    /// Confirms upstream that `repo` contains `digest`, and records it.
    /// Returns the size upstream declared, if it did.
    async fn confirm_link(&self, repo: &RepoPath, digest: &Digest) -> Result<Option<u64>, RegistryError> {
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
            size = self.confirm_link(repo, digest).await?;
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
            (true, Some(size)) => Some(size),
            _ => self.confirm_link(repo, digest).await?,
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
