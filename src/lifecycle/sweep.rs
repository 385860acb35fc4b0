//! One sweep's writes, phase by phase, in the order that is safe at every
//! step (see the module above): evict to fit the size cap (a decision, no
//! writes), expire images, delete the manifests no repository holds, delete
//! the blobs nothing references; then the store against the index: ready
//! blobs the store lost, uploads no copy will continue. Every write is counted against the
//! sweep's budget; a phase that runs out returns `Stop`, leaving the work it
//! did not start whole for the next run.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use super::snapshot::{Root, Snapshot};
use super::{BATCH, GcOptions, GcReport, Step, pause};
use crate::oci::Digest;
use crate::storage::{BlobRecord, BlobState, BlobStore, Index, Result, StorageError, Upload, now};

/// Counts writes against the sweep's deadline and budget.
struct Budget {
    deadline: Option<Instant>,
    max_writes: Option<u64>,
    used: u64,
    dry_run: bool,
}

impl Budget {
    /// Whether `n` more writes fit (counts nothing): a unit of work that
    /// does not fit is left whole to the next run, so every run progresses.
    fn fits(&self, n: u64) -> bool {
        self.dry_run || self.max_writes.is_none_or(|m| self.used + n <= m)
    }

    /// Writes left (for sizing batches).
    fn left(&self) -> u64 {
        match self.max_writes {
            Some(m) if !self.dry_run => m.saturating_sub(self.used),
            _ => u64::MAX,
        }
    }

    /// Whether one more write may be made (and counts it).
    fn take(&mut self) -> bool {
        if self.dry_run {
            return true;
        }
        if self.max_writes.is_some_and(|m| self.used >= m) || self.deadline.is_some_and(|d| Instant::now() >= d) {
            return false;
        }
        self.used += 1;
        true
    }
}

/// The sweep stopped early (budget or deadline): the next run goes on.
struct Stop;

/// `Err(Stop)` unless one more write is allowed.
macro_rules! take {
    ($budget:expr) => {
        if !$budget.take() {
            return Ok(Err(Stop));
        }
    };
}

type Phase<T = ()> = Result<std::result::Result<T, Stop>>;

pub(super) struct Sweep<'a> {
    index: &'a dyn Index,
    store: &'a dyn BlobStore,
    opts: &'a GcOptions,
    snap: &'a Snapshot,
    report: GcReport,
    budget: Budget,
    started: i64,
}

/// What the images phase leaves standing.
#[derive(Default)]
struct Held {
    /// (repository, manifest) pairs kept images reach.
    kept_links: HashSet<(String, Digest)>,
    /// Manifests a kept tag points at.
    kept_tag_targets: HashSet<Digest>,
    /// Repository manifests (pulled by digest) not expired.
    remaining_links: HashSet<(String, Digest)>,
}

/// What the manifests phase did.
#[derive(Default)]
struct Unheld {
    /// Manifests deleted.
    gone: HashSet<Digest>,
    /// Blobs marked used just before their manifest went.
    stamped: HashSet<Digest>,
}

impl<'a> Sweep<'a> {
    pub(super) fn new(index: &'a dyn Index, store: &'a dyn BlobStore, opts: &'a GcOptions, snap: &'a Snapshot, report: GcReport) -> Self {
        let budget = Budget { deadline: opts.deadline, max_writes: opts.max_writes, used: 0, dry_run: opts.dry_run };
        Sweep { index, store, opts, snap, report, budget, started: now() }
    }

    pub(super) async fn run(mut self) -> Result<GcReport> {
        let stopped = self.phases().await?.is_err();
        self.report.complete = !stopped;
        self.report.writes = self.budget.used;
        Ok(self.report)
    }

    async fn phases(&mut self) -> Phase {
        pause(self.opts, Step::Read).await;
        // Listed after the index was read and before this sweep deletes.
        let stored = self.store.stored_digests().await?;
        let cutoff = self.started - self.opts.unused_for.as_secs() as i64;
        let mut roots = self.snap.roots(&self.opts.pins, cutoff);
        if let Some(cap) = self.opts.max_bytes {
            self.evict_to_fit(&mut roots, cap);
        }
        let held = match self.expire_images(&roots).await? {
            Ok(h) => h,
            Err(stop) => return Ok(Err(stop)),
        };
        pause(self.opts, Step::ImagesExpired).await;
        let unheld = match self.delete_unheld_manifests(&held).await? {
            Ok(u) => u,
            Err(stop) => return Ok(Err(stop)),
        };
        pause(self.opts, Step::ManifestsDeleted).await;
        if let Err(stop) = self.delete_unreferenced_blobs(&unheld).await? {
            return Ok(Err(stop));
        }
        if let Err(stop) = self.audit_stored_blobs(&stored).await? {
            return Ok(Err(stop));
        }
        if let Err(stop) = self.abort_orphan_uploads().await? {
            return Ok(Err(stop));
        }
        self.requeue_lost_copies().await
    }

    /// Phase 6: a copy that looks lost is queued again, as a client's next
    /// request for the blob would do, for the blobs no client asks for
    /// again: `pending` and untouched for `STALE_FETCH` (its stream record
    /// never came, or exhausted its retries into the dead-letter queue),
    /// or `fetching` past its lease (the copy died). On AWS the write is a
    /// stream record the fetcher acts on; the write is conditional, so a
    /// copy that moved meanwhile is left alone.
    async fn requeue_lost_copies(&mut self) -> Phase {
        let stale = crate::mirror::STALE_FETCH;
        let cutoff = self.started - stale.as_secs() as i64;
        let mut lost: Vec<&Digest> = self
            .snap
            .blobs
            .values()
            .filter(|b| match b.state {
                BlobState::Pending => b.updated_at < cutoff,
                BlobState::Fetching => b.lease_until < self.started,
                _ => false,
            })
            .map(|b| &b.digest)
            .collect();
        lost.sort();
        for digest in lost {
            if !self.budget.take() {
                return Ok(Err(Stop));
            }
            if self.opts.dry_run {
                self.report.requeued_blobs += 1;
            } else if self.index.requeue_stale_blob(digest, stale).await? {
                tracing::info!(%digest, "a copy that looked lost was queued again");
                self.report.requeued_blobs += 1;
            }
        }
        Ok(Ok(()))
    }

    /// Phase 5: an upload the store holds unfinished that no blob record's
    /// checkpoint names (its copy died before it checkpointed, or the
    /// record went) is aborted, once older than a fetch lease: a copy that
    /// started it and is still running has checkpointed by then (every part
    /// comes well within a lease at the minimum transfer rate). Listed
    /// after the index was read, so a checkpoint naming an older upload was
    /// there to see. The bucket's lifecycle rule stays as a backstop.
    async fn abort_orphan_uploads(&mut self) -> Phase {
        let named: HashSet<&str> = self.snap.blobs.values().filter_map(|b| b.checkpoint.as_ref()).map(|c| c.upload.as_str()).collect();
        let old = self.started - crate::mirror::fetch::FETCH_LEASE.as_secs() as i64;
        let uploads = match self.store.uploads().await {
            Ok(u) => u,
            // The bucket's lifecycle rule still aborts them in time.
            Err(e) => {
                tracing::warn!(error = %e, "could not list unfinished uploads; none aborted this run");
                return Ok(Ok(()));
            }
        };
        let mut orphans: Vec<Upload> = uploads.into_iter().filter(|u| u.started < old && !named.contains(u.id.as_str())).collect();
        orphans.sort_by(|a, b| (&a.digest, &a.id).cmp(&(&b.digest, &b.id)));
        for upload in orphans {
            if !self.budget.take() {
                return Ok(Err(Stop));
            }
            if !self.opts.dry_run {
                self.store.discard_upload(&upload).await?;
                tracing::info!(digest = %upload.digest, upload = %upload.id, "aborted an unfinished upload no copy will continue");
            }
            self.report.aborted_uploads += 1;
        }
        Ok(Ok(()))
    }

    /// Phase 4, the store against the index: a blob the index read as
    /// `ready` that the store does not hold (an object deleted by hand or by
    /// a bucket rule, a lost disk) goes back to `pending`, and is fetched
    /// again (on AWS the write runs the fetcher). The store was listed after
    /// the index was read, so anything `ready` then was stored before.
    async fn audit_stored_blobs(&mut self, stored: &HashSet<Digest>) -> Phase {
        let mut lost: Vec<&Digest> =
            self.snap.blobs.values().filter(|b| b.state == BlobState::Ready && !stored.contains(&b.digest)).map(|b| &b.digest).collect();
        lost.sort();
        for digest in lost {
            if !self.budget.take() {
                return Ok(Err(Stop));
            }
            if self.opts.dry_run {
                self.report.lost_blobs += 1;
            } else if self.index.mark_blob_lost(digest, self.snap.blob_links.get(digest).map_or(&[][..], |r| &r[..])).await? {
                tracing::warn!(%digest, "a ready blob was missing from the store; fetching it again");
                self.report.lost_blobs += 1;
            }
        }
        Ok(Ok(()))
    }

    /// Size cap: un-keeps kept, unpinned images, least recently pulled
    /// first, until what the kept ones reference fits. A tag goes with the
    /// manifests it leads to that were not pulled by digest since.
    fn evict_to_fit(&mut self, roots: &mut [Root], cap: u64) {
        let snap = self.snap;
        let links_at: HashMap<(String, Digest), usize> =
            roots.iter().enumerate().filter(|(_, r)| r.tag.is_none()).map(|(i, r)| ((r.repo.clone(), r.digest.clone()), i)).collect();
        let reached_by_tags: HashSet<(String, Digest)> =
            roots.iter().filter(|r| r.tag.is_some()).flat_map(|r| snap.reach(&r.repo, &r.digest)).collect();
        let mut refcount: HashMap<Digest, usize> = HashMap::new();
        let closures: Vec<HashSet<Digest>> = roots.iter().map(|r| snap.blobs_of(&snap.closure(&r.digest))).collect();
        for (r, blobs) in roots.iter().zip(&closures) {
            if r.keep {
                for b in blobs {
                    *refcount.entry(b.clone()).or_default() += 1;
                }
            }
        }
        let mut bytes: u64 = refcount.keys().map(|b| snap.ready_size(b)).sum();
        let mut order: Vec<usize> = (0..roots.len()).filter(|&i| roots[i].keep && !roots[i].pinned).collect();
        order.sort_by_key(|&i| (roots[i].pulled_at, roots[i].name()));
        let mut evict = |i: usize, roots: &mut [Root], bytes: &mut u64| {
            if !roots[i].keep {
                return;
            }
            roots[i].keep = false;
            for b in &closures[i] {
                let c = refcount.get_mut(b).expect("counted");
                *c -= 1;
                if *c == 0 {
                    *bytes -= snap.ready_size(b);
                }
            }
        };
        for i in order {
            if bytes <= cap {
                break;
            }
            if !roots[i].keep {
                continue;
            }
            evict(i, roots, &mut bytes);
            if roots[i].tag.is_some() {
                self.report.evicted += 1;
                for m in snap.closure(&roots[i].digest) {
                    if let Some(&j) = links_at.get(&(roots[i].repo.clone(), m))
                        && !roots[j].pinned
                        && roots[j].pulled_at <= roots[i].pulled_at
                    {
                        evict(j, roots, &mut bytes);
                    }
                }
            } else if !reached_by_tags.contains(&(roots[i].repo.clone(), roots[i].digest.clone())) {
                self.report.evicted += 1;
            }
        }
    }

    /// Phase 1, images: tags and repository manifests not kept are deleted, each
    /// only if not pulled since the sweep read it (a tag moved or pulled
    /// meanwhile stays, with what it leads to now).
    async fn expire_images(&mut self, roots: &[Root]) -> Phase<Held> {
        let (snap, index, dry_run) = (self.snap, self.index, self.opts.dry_run);
        let mut held = Held::default();
        for r in roots.iter().filter(|r| r.keep) {
            held.kept_links.extend(snap.reach(&r.repo, &r.digest));
            if r.tag.is_some() {
                held.kept_tag_targets.insert(r.digest.clone());
            }
        }
        // Unknown pull times are stamped now (records from before they were kept).
        for r in roots.iter().filter(|r| r.pulled_at == 0 && !dry_run) {
            take!(self.budget);
            match &r.tag {
                Some((t, v)) => index.tag_pulled(&r.repo, t, v).await?,
                None => {
                    index.manifest_pulled(&r.repo, &r.digest).await?;
                }
            }
        }
        // What expired tags led to is part of those images, not listed apart.
        let mut expired_reach: HashSet<(String, Digest)> = HashSet::new();
        for r in roots.iter().filter(|r| !r.keep && r.tag.is_some()) {
            let (t, v) = r.tag.as_ref().expect("a tag");
            take!(self.budget);
            if dry_run || index.expire_tag(&r.repo, t, v, &r.digest, r.pulled_at + 1).await? {
                self.report.expired.push(r.name());
                expired_reach.extend(snap.reach(&r.repo, &r.digest));
            } else {
                let digest = index.tag(&r.repo, t, v).await?.map_or_else(|| r.digest.clone(), |now| now.digest);
                held.kept_links.extend(snap.reach(&r.repo, &digest));
                held.kept_tag_targets.insert(digest);
            }
        }
        for r in roots.iter().filter(|r| r.tag.is_none()) {
            let key = (r.repo.clone(), r.digest.clone());
            if held.kept_links.contains(&key) {
                held.remaining_links.insert(key);
                continue;
            }
            take!(self.budget);
            if dry_run || index.expire_manifest_link(&r.repo, &r.digest, r.pulled_at + 1).await? {
                if !expired_reach.contains(&key) {
                    self.report.expired.push(r.name());
                }
            } else {
                held.remaining_links.insert(key);
            }
        }
        Ok(Ok(held))
    }

    /// Phase 2, manifests no repository holds any more: their ready blobs are
    /// marked used first, so a client that got the manifest just before has
    /// the grace period to fetch them.
    async fn delete_unheld_manifests(&mut self, held: &Held) -> Phase<Unheld> {
        let (snap, index, dry_run) = (self.snap, self.index, self.opts.dry_run);
        let holding: HashSet<&Digest> = held.remaining_links.iter().map(|(_, d)| d).chain(held.kept_tag_targets.iter()).collect();
        let mut out = Unheld::default();
        for (digest, refs) in &snap.manifests {
            if holding.contains(digest) {
                continue;
            }
            let ready: Vec<&Digest> =
                refs.blobs.iter().filter(|b| snap.blobs.get(*b).is_some_and(|r| r.state == BlobState::Ready)).collect();
            if !self.budget.fits(ready.len() as u64 + 1) {
                return Ok(Err(Stop));
            }
            // With no grace period there is nobody to give time to: a blob
            // unreferenced now goes in this very sweep.
            let stamp = !self.opts.grace.is_zero();
            if !dry_run && stamp {
                for b in ready {
                    take!(self.budget);
                    index.touch_blob(b, None).await?;
                    out.stamped.insert(b.clone());
                }
            } else if stamp {
                out.stamped.extend(refs.blobs.iter().cloned());
            }
            take!(self.budget);
            if dry_run || index.delete_manifest(digest).await? {
                self.report.deleted_manifests += 1;
                out.gone.insert(digest.clone());
            }
        }
        Ok(Ok(out))
    }

    /// Phase 3, blobs nothing references, unused for the grace period: marked
    /// `deleting` (a reader that marked one used first wins), then their
    /// bytes go, then their records.
    async fn delete_unreferenced_blobs(&mut self, unheld: &Unheld) -> Phase {
        let snap = self.snap;
        let referenced: HashSet<&Digest> =
            snap.manifests.iter().filter(|(d, _)| !unheld.gone.contains(*d)).flat_map(|(_, r)| r.blobs.iter()).collect();
        // No grace: anything used before the next second is due (timestamps
        // are whole seconds, and this sweep's own second counts).
        let used_before = match self.opts.grace.as_secs() {
            0 => self.started + 1,
            g => self.started - g as i64,
        };
        let mut doomed: Vec<&BlobRecord> = Vec::new();
        for b in snap.blobs.values().filter(|b| !referenced.contains(&b.digest)) {
            let due = match b.state {
                BlobState::Ready | BlobState::Failed => !unheld.stamped.contains(&b.digest) && b.last_used() < used_before,
                BlobState::Deleting => b.lease_until < self.started,
                BlobState::Pending | BlobState::Fetching => false,
            };
            if due {
                doomed.push(b);
            } else if matches!(b.state, BlobState::Ready) {
                self.report.grace_blobs += 1;
                self.report.grace_bytes += b.size.unwrap_or(0);
            }
        }
        doomed.sort_by(|a, b| a.digest.as_str().cmp(b.digest.as_str()));
        let mut rest = &doomed[..];
        while !rest.is_empty() {
            // Each blob costs a mark and a finish, the batch one delete call.
            let n = (BATCH as u64).min(self.budget.left().saturating_sub(1) / 2) as usize;
            if n == 0 {
                return Ok(Err(Stop));
            }
            let (batch, after) = rest.split_at(n.min(rest.len()));
            rest = after;
            if let Err(stop) = self.delete_batch(batch, used_before).await? {
                return Ok(Err(stop));
            }
        }
        Ok(Ok(()))
    }

    /// One batch of phase 3.
    async fn delete_batch(&mut self, batch: &[&BlobRecord], used_before: i64) -> Phase {
        let (index, opts) = (self.index, self.opts);
        // A failed blob's partial bytes are not counted as reclaimed.
        let counted = |b: &BlobRecord| b.state != BlobState::Failed;
        if opts.dry_run {
            self.report.deleted_blobs += batch.len();
            self.report.reclaimed_bytes += batch.iter().filter(|b| counted(b)).filter_map(|b| b.size).sum::<u64>();
            return Ok(Ok(()));
        }
        let (marked_at, marked_secs) = (Instant::now(), now());
        let mut taken = Vec::new();
        for b in batch {
            take!(self.budget);
            if index.begin_blob_delete(&b.digest, used_before, opts.delete_lease).await? {
                taken.push(*b);
            }
        }
        if taken.is_empty() {
            return Ok(Ok(()));
        }
        pause(opts, Step::BlobsMarked).await;
        // The lease is ours for `delete_lease`; never delete bytes once it
        // may have passed to a reader who fetched the blob again. Counted in
        // real time, and on the index's clock, which the lease itself is
        // kept on (whole seconds: one is taken off for the rounding).
        let lease_secs = opts.delete_lease.as_secs() as i64;
        if marked_at.elapsed() >= opts.delete_lease / 2 || 2 * (now() - marked_secs - 1) >= lease_secs {
            return Err(StorageError::Unavailable("GC marked blobs too slowly to delete them safely; the next run retries".into()));
        }
        take!(self.budget);
        let digests: Vec<Digest> = taken.iter().map(|b| b.digest.clone()).collect();
        self.store.delete_many(&digests).await?;
        for b in taken {
            take!(self.budget);
            let repos = self.snap.blob_links.get(&b.digest).cloned().unwrap_or_default();
            index.finish_blob_delete(&b.digest, &repos).await?;
            self.report.deleted_blobs += 1;
            if counted(b) {
                self.report.reclaimed_bytes += b.size.unwrap_or(0);
            }
        }
        Ok(Ok(()))
    }
}
