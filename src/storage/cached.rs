//! A bounded in-memory cache in front of any `Index`, for a warm instance
//! (a Lambda between invocations, a long-running `serve`): facts about
//! digests (a manifest linked to a repository, a ready blob linked to a
//! repository) are kept in an LRU, so a repeated digest costs no backend
//! call at all. Tags are mutable and kept only while their TTL says they
//! may be trusted without asking upstream anyway.
//!
//! GC can remove what is cached here. The records carry their `pulled_at` /
//! `used_at`, which the mirror refreshes through the index once they are
//! older than its touch interval; a refresh that finds the fact gone drops
//! it here too. So a cached fact is never trusted longer than that
//! interval, well inside GC's grace period.

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use lru::LruCache;

use super::{
    BlobRecord, BlobState, FetchIndex, Index, Linked, ManifestRecord, Result, ScanPage, ServeIndex, StatsIndex, StoredStats, SweepIndex,
    TagRecord, now,
};
use crate::oci::Digest;

/// (repository, tag, Accept variant)
type TagKey = (String, String, String);

pub struct CachedIndex<I> {
    inner: I,
    /// (manifest, when last pulled in that repository)
    manifests: Mutex<LruCache<(String, Digest), (ManifestRecord, i64)>>,
    blobs: Mutex<LruCache<(String, Digest), BlobRecord>>,
    tags: Mutex<LruCache<TagKey, (TagRecord, ManifestRecord)>>,
    tag_ttl: Duration,
}

impl<I: Index> CachedIndex<I> {
    /// Keeps up to `entries` of each kind of fact; tags for at most `tag_ttl`.
    pub fn new(inner: I, entries: usize, tag_ttl: Duration) -> CachedIndex<I> {
        let cap = NonZeroUsize::new(entries.max(1)).expect("non-zero");
        CachedIndex {
            inner,
            manifests: Mutex::new(LruCache::new(cap)),
            blobs: Mutex::new(LruCache::new(cap)),
            tags: Mutex::new(LruCache::new(cap)),
            tag_ttl,
        }
    }

    fn fresh(&self, t: &TagRecord) -> bool {
        now() - t.checked_at < self.tag_ttl.as_secs() as i64
    }

    fn forget_tag(&self, repo: &str, tag: &str, variant: &str) {
        lock(&self.tags).pop(&(repo.to_owned(), tag.to_owned(), variant.to_owned()));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[async_trait]
impl<I: Index> ServeIndex for CachedIndex<I> {
    async fn tag(&self, repo: &str, tag: &str, variant: &str) -> Result<Option<TagRecord>> {
        Ok(self.tag_manifest(repo, tag, variant).await?.map(|(t, _)| t))
    }

    async fn tag_manifest(&self, repo: &str, tag: &str, variant: &str) -> Result<Option<(TagRecord, Option<ManifestRecord>)>> {
        let key = (repo.to_owned(), tag.to_owned(), variant.to_owned());
        if let Some((t, m)) = lock(&self.tags).get(&key).cloned()
            && self.fresh(&t)
        {
            return Ok(Some((t, Some(m))));
        }
        let found = self.inner.tag_manifest(repo, tag, variant).await?;
        if let Some((t, Some(m))) = &found
            && self.fresh(t)
        {
            lock(&self.tags).put(key, (t.clone(), m.clone()));
        }
        Ok(found)
    }

    async fn put_tag(&self, tag: &TagRecord, manifest: &ManifestRecord) -> Result<()> {
        self.forget_tag(&tag.repo, &tag.tag, &tag.variant);
        self.inner.put_tag(tag, manifest).await
    }

    async fn touch_tag(&self, repo: &str, tag: &str, variant: &str, checked_at: i64) -> Result<()> {
        self.forget_tag(repo, tag, variant);
        self.inner.touch_tag(repo, tag, variant, checked_at).await
    }

    async fn delete_tag(&self, repo: &str, tag: &str, variant: &str) -> Result<()> {
        self.forget_tag(repo, tag, variant);
        self.inner.delete_tag(repo, tag, variant).await
    }

    async fn manifest(&self, repo: &str, digest: &Digest) -> Result<Linked<ManifestRecord>> {
        let key = (repo.to_owned(), digest.clone());
        if let Some((m, pulled_at)) = lock(&self.manifests).get(&key).cloned() {
            return Ok(Linked { linked: true, record: Some(m), pulled_at });
        }
        let found = self.inner.manifest(repo, digest).await?;
        if let (true, Some(m)) = (found.linked, &found.record) {
            lock(&self.manifests).put(key, (m.clone(), found.pulled_at));
        }
        Ok(found)
    }

    async fn put_manifest(&self, repo: &str, manifest: &ManifestRecord, blobs: &[Digest]) -> Result<Vec<Digest>> {
        self.inner.put_manifest(repo, manifest, blobs).await
    }

    async fn link(&self, repo: &str, digest: &Digest) -> Result<()> {
        self.inner.link(repo, digest).await
    }

    async fn blob(&self, repo: &str, digest: &Digest) -> Result<Linked<BlobRecord>> {
        let key = (repo.to_owned(), digest.clone());
        if let Some(b) = lock(&self.blobs).get(&key).cloned() {
            return Ok(Linked { linked: true, record: Some(b), pulled_at: 0 });
        }
        let found = self.inner.blob(repo, digest).await?;
        if let (true, Some(b)) = (found.linked, &found.record)
            && b.state == BlobState::Ready
        {
            lock(&self.blobs).put(key, b.clone());
        }
        Ok(found)
    }

    async fn tag_pulled(&self, repo: &str, tag: &str, variant: &str) -> Result<()> {
        self.forget_tag(repo, tag, variant);
        self.inner.tag_pulled(repo, tag, variant).await
    }

    async fn manifest_pulled(&self, repo: &str, digest: &Digest) -> Result<bool> {
        let pulled = self.inner.manifest_pulled(repo, digest).await?;
        let key = (repo.to_owned(), digest.clone());
        let mut cache = lock(&self.manifests);
        match cache.get_mut(&key) {
            Some(entry) if pulled => entry.1 = now(),
            Some(_) => {
                cache.pop(&key);
            }
            None => {}
        }
        Ok(pulled)
    }

    async fn touch_blob(&self, digest: &Digest, via: Option<&str>) -> Result<bool> {
        let touched = self.inner.touch_blob(digest, via).await?;
        if let Some(repo) = via {
            let key = (repo.to_owned(), digest.clone());
            let mut cache = lock(&self.blobs);
            match cache.get_mut(&key) {
                Some(b) if touched => b.used_at = now(),
                Some(_) => {
                    cache.pop(&key);
                }
                None => {}
            }
        }
        Ok(touched)
    }
}

#[async_trait]
impl<I: Index> FetchIndex for CachedIndex<I> {
    async fn create_pending_blob(&self, digest: &Digest, source: &str, size: Option<u64>) -> Result<bool> {
        self.inner.create_pending_blob(digest, source, size).await
    }

    async fn claim_blob(&self, digest: &Digest, lease: Duration) -> Result<bool> {
        self.inner.claim_blob(digest, lease).await
    }

    async fn set_blob_state(&self, digest: &Digest, state: BlobState, size: Option<u64>, error: Option<&str>) -> Result<()> {
        self.inner.set_blob_state(digest, state, size, error).await
    }

    async fn unfinished_blobs(&self) -> Result<Vec<BlobRecord>> {
        self.inner.unfinished_blobs().await
    }

    async fn requeue_stale_blob(&self, digest: &Digest, stale: Duration) -> Result<bool> {
        self.inner.requeue_stale_blob(digest, stale).await
    }
}

#[async_trait]
impl<I: Index> SweepIndex for CachedIndex<I> {
    async fn scan(&self, cursor: Option<String>) -> Result<ScanPage> {
        self.inner.scan(cursor).await
    }

    async fn expire_tag(&self, repo: &str, tag: &str, variant: &str, digest: &Digest, pulled_before: i64) -> Result<bool> {
        self.forget_tag(repo, tag, variant);
        self.inner.expire_tag(repo, tag, variant, digest, pulled_before).await
    }

    async fn expire_manifest_link(&self, repo: &str, digest: &Digest, pulled_before: i64) -> Result<bool> {
        lock(&self.manifests).pop(&(repo.to_owned(), digest.clone()));
        self.inner.expire_manifest_link(repo, digest, pulled_before).await
    }

    async fn delete_manifest(&self, digest: &Digest) -> Result<bool> {
        let deleted = self.inner.delete_manifest(digest).await?;
        if deleted {
            lock(&self.manifests).retain(|(_, d), _| d != digest);
        }
        Ok(deleted)
    }

    async fn begin_blob_delete(&self, digest: &Digest, used_before: i64, lease: Duration) -> Result<bool> {
        let taken = self.inner.begin_blob_delete(digest, used_before, lease).await?;
        if taken {
            lock(&self.blobs).retain(|(_, d), _| d != digest);
        }
        Ok(taken)
    }

    async fn finish_blob_delete(&self, digest: &Digest, repos: &[String]) -> Result<()> {
        self.inner.finish_blob_delete(digest, repos).await?;
        // A reader may have cached a link copy that still said `ready`
        // while the blob was `deleting`: it is gone now.
        lock(&self.blobs).retain(|(_, d), _| d != digest);
        Ok(())
    }
}

#[async_trait]
impl<I: Index> StatsIndex for CachedIndex<I> {
    async fn add_stats(&self, delta: &StoredStats) -> Result<()> {
        self.inner.add_stats(delta).await
    }

    async fn stats(&self) -> Result<StoredStats> {
        self.inner.stats().await
    }
}
