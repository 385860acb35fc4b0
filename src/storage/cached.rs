//! A bounded in-memory cache in front of any `Index`, for a warm instance
//! (a Lambda between invocations, a long-running `serve`): facts about
//! digests (a manifest linked to a repository, a ready blob linked to a
//! repository) are kept in an LRU, so a repeated digest costs no backend
//! call at all. Tags are mutable and kept only while their TTL says they
//! may be trusted without asking upstream anyway.
//!
//! Memory is bounded by bytes, not only entries: a manifest's body is kept
//! once per digest, shared by every repository and tag that names it, up to
//! `BODY_BYTES` in all, and a body over `MAX_BODY` is not kept at all (it is
//! read from the index each time).
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
    BlobRecord, BlobState, Checkpoint, FetchIndex, Index, Linked, ManifestRecord, Result, ScanPage, ServeIndex, StatsIndex, StoredStats,
    SweepIndex, TagRecord, now,
};
use crate::oci::{Descriptor, Digest};

/// (repository, tag, Accept variant)
type TagKey = (String, String, String);

/// Manifest bytes kept in all.
pub const BODY_BYTES: usize = 32 << 20;
/// Largest manifest body kept (a real image manifest or index is a few KiB).
pub const MAX_BODY: usize = 256 << 10;

/// Manifests by digest, least recently used first out, bounded by bytes.
struct Bodies {
    lru: LruCache<Digest, ManifestRecord>,
    bytes: usize,
    budget: usize,
}

fn weight(m: &ManifestRecord) -> usize {
    m.body.len() + m.media_type.len() + 128
}

impl Bodies {
    fn get(&mut self, digest: &Digest) -> Option<ManifestRecord> {
        self.lru.get(digest).cloned()
    }

    /// Keeps `m` (if small enough) and returns the copy to hand out: the
    /// kept one when there is one, so every holder shares its bytes.
    fn keep(&mut self, m: ManifestRecord) -> ManifestRecord {
        if let Some(kept) = self.lru.get(&m.digest) {
            return kept.clone();
        }
        let w = weight(&m);
        if m.body.len() > MAX_BODY || w > self.budget {
            return m;
        }
        self.bytes += w;
        self.lru.put(m.digest.clone(), m.clone());
        while self.bytes > self.budget {
            match self.lru.pop_lru() {
                Some((_, old)) => self.bytes -= weight(&old),
                None => break,
            }
        }
        m
    }

    fn forget(&mut self, digest: &Digest) {
        if let Some(old) = self.lru.pop(digest) {
            self.bytes -= weight(&old);
        }
    }
}

pub struct CachedIndex<I> {
    inner: I,
    bodies: Mutex<Bodies>,
    /// Manifests linked to a repository: when last pulled there.
    manifests: Mutex<LruCache<(String, Digest), i64>>,
    blobs: Mutex<LruCache<(String, Digest), BlobRecord>>,
    tags: Mutex<LruCache<TagKey, TagRecord>>,
    tag_ttl: Duration,
}

impl<I: Index> CachedIndex<I> {
    /// Keeps up to `entries` of each kind of fact; tags for at most `tag_ttl`.
    pub fn new(inner: I, entries: usize, tag_ttl: Duration) -> CachedIndex<I> {
        let cap = NonZeroUsize::new(entries.max(1)).expect("non-zero");
        CachedIndex {
            inner,
            bodies: Mutex::new(Bodies { lru: LruCache::unbounded(), bytes: 0, budget: BODY_BYTES }),
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

    fn body(&self, digest: &Digest) -> Option<ManifestRecord> {
        lock(&self.bodies).get(digest)
    }

    fn keep_body(&self, m: ManifestRecord) -> ManifestRecord {
        lock(&self.bodies).keep(m)
    }

    /// Manifest bytes kept now.
    pub fn body_bytes(&self) -> usize {
        lock(&self.bodies).bytes
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
        let cached = lock(&self.tags).get(&key).cloned();
        if let Some(t) = cached
            && self.fresh(&t)
            && let Some(m) = self.body(&t.digest)
        {
            return Ok(Some((t, Some(m))));
        }
        Ok(match self.inner.tag_manifest(repo, tag, variant).await? {
            Some((t, Some(m))) => {
                let m = self.keep_body(m);
                if self.fresh(&t) {
                    lock(&self.tags).put(key, t.clone());
                }
                Some((t, Some(m)))
            }
            other => other,
        })
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
        let cached = lock(&self.manifests).get(&key).copied();
        if let Some(pulled_at) = cached
            && let Some(m) = self.body(digest)
        {
            return Ok(Linked { linked: true, record: Some(m), pulled_at });
        }
        let mut found = self.inner.manifest(repo, digest).await?;
        found.record = found.record.map(|m| self.keep_body(m));
        if found.linked && found.record.is_some() {
            lock(&self.manifests).put(key, found.pulled_at);
        }
        Ok(found)
    }

    async fn put_manifest(&self, repo: &str, manifest: &ManifestRecord, blobs: &[Descriptor]) -> Result<Vec<Digest>> {
        self.inner.put_manifest(repo, manifest, blobs).await
    }

    async fn link(&self, repo: &str, digest: &Digest) -> Result<()> {
        self.inner.link(repo, digest).await
    }

    async fn blob_record(&self, digest: &Digest) -> Result<Option<BlobRecord>> {
        self.inner.blob_record(digest).await
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
            Some(pulled_at) if pulled => *pulled_at = now(),
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

    async fn mark_blob_lost(&self, digest: &Digest, repos: &[String]) -> Result<bool> {
        lock(&self.blobs).retain(|(_, d), _| d != digest);
        self.inner.mark_blob_lost(digest, repos).await
    }

    async fn blob_checkpoint(&self, digest: &Digest) -> Result<Option<Checkpoint>> {
        self.inner.blob_checkpoint(digest).await
    }

    async fn save_checkpoint(&self, digest: &Digest, checkpoint: Option<&Checkpoint>) -> Result<()> {
        self.inner.save_checkpoint(digest, checkpoint).await
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
        // Whatever the answer: `false` can mean another sweep (another
        // instance) deleted it first, and a link or body kept here from
        // before would then be served as if it were still stored.
        lock(&self.manifests).retain(|(_, d), _| d != digest);
        lock(&self.bodies).forget(digest);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::local::SqliteIndex;
    use bytes::Bytes;

    fn record(seed: usize, len: usize) -> ManifestRecord {
        let body = Bytes::from(vec![seed as u8; len]);
        let mut body = body.to_vec();
        body.extend_from_slice(seed.to_string().as_bytes());
        let body = Bytes::from(body);
        ManifestRecord { digest: Digest::of(&body), media_type: "application/vnd.oci.image.manifest.v1+json".into(), body }
    }

    #[test]
    fn bodies_are_bounded_by_bytes_shared_by_digest_and_large_ones_not_kept() {
        let mut b = Bodies { lru: LruCache::unbounded(), bytes: 0, budget: BODY_BYTES };
        for i in 0..1000 {
            b.keep(record(i, 200 << 10));
            assert!(b.bytes <= BODY_BYTES);
        }
        assert!(b.lru.len() < 200, "{} bodies of 200 KiB kept", b.lru.len());
        assert_eq!(b.bytes, b.lru.iter().map(|(_, m)| weight(m)).sum::<usize>(), "the count is exact");

        let big = record(7, MAX_BODY + 1);
        b.keep(big.clone());
        assert!(b.get(&big.digest).is_none(), "a large body is not kept");

        let m = record(9, 1000);
        let first = b.keep(m.clone());
        let again = b.keep(record(9, 1000));
        assert_eq!(first.body.as_ptr(), again.body.as_ptr(), "one copy per digest");
        b.forget(&m.digest);
        assert!(b.get(&m.digest).is_none());
        assert_eq!(b.bytes, b.lru.iter().map(|(_, m)| weight(m)).sum::<usize>());
    }

    /// What this cache held for a manifest must not outlive the manifest,
    /// whoever deleted it: a sweep on this instance, or another sweep first
    /// (then this one's delete finds nothing and answers `false`).
    #[tokio::test]
    async fn a_deleted_manifest_is_not_served_from_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let cached = CachedIndex::new(SqliteIndex::open(&dir.path().join("index.db")).unwrap(), 100, Duration::from_secs(600));
        let repo = "docker.io/library/a";
        for (seed, another_sweep_first) in [(1, false), (2, true)] {
            let m = record(seed, 40);
            cached.put_manifest(repo, &m, &[]).await.unwrap();
            let tag = TagRecord {
                repo: repo.into(),
                tag: format!("t{seed}"),
                variant: String::new(),
                digest: m.digest.clone(),
                media_type: m.media_type.clone(),
                checked_at: now(),
                pulled_at: now(),
            };
            cached.put_tag(&tag, &m).await.unwrap();
            // Read once: the link, the tag and the body are kept here now.
            assert!(cached.manifest(repo, &m.digest).await.unwrap().linked);
            assert!(cached.tag_manifest(repo, &tag.tag, "").await.unwrap().is_some());
            // Expired elsewhere (a sweep on another instance reads and
            // writes the index directly).
            assert!(cached.inner.expire_tag(repo, &tag.tag, "", &m.digest, i64::MAX).await.unwrap());
            assert!(cached.inner.expire_manifest_link(repo, &m.digest, i64::MAX).await.unwrap());
            if another_sweep_first {
                assert!(cached.inner.delete_manifest(&m.digest).await.unwrap());
                assert!(!cached.delete_manifest(&m.digest).await.unwrap(), "already gone");
            } else {
                assert!(cached.delete_manifest(&m.digest).await.unwrap());
            }
            let found = cached.manifest(repo, &m.digest).await.unwrap();
            assert!(!found.linked && found.record.is_none(), "another sweep first: {another_sweep_first}");
            // The tag kept here is still within its TTL, but its manifest's
            // body is gone with the manifest: read through, the tag is gone.
            assert_eq!(cached.tag_manifest(repo, &tag.tag, "").await.unwrap(), None, "another sweep first: {another_sweep_first}");
        }
    }
}
