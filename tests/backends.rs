//! The storage contract: one body for every index and one for every blob
//! store, the suite a new backend must pass. The index contract runs against
//! SQLite, DynamoDB (on moto_server), and `CachedIndex` over each, which must
//! keep every promise the index it wraps keeps; the blob-store contract
//! against the local files and S3 (on moto_server).
//!
//! Every write's outcome is read back through the index under test. Checks
//! are collected, not stopped at: a failing test lists every broken promise
//! of that backend, each with its line. Time moves with
//! `storage::clock::advance`, never by sleeping.

mod common;
#[path = "common/shared_moto.rs"]
mod shared_moto;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{Debug, Display};
use std::panic::Location;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use hubcap::oci::Digest;
use hubcap::storage::cached::CachedIndex;
use hubcap::storage::local::{BLOB_URL_PREFIX, FsBlobStore, SqliteIndex};
use hubcap::storage::{
    BlobRecord, BlobState, BlobStore, Checkpoint, Entry, Index, ManifestRecord, StoredStats, TagRecord, aws, clock, now,
};

const REPO: &str = "docker.io/library/suite";
const OTHER: &str = "docker.io/library/elsewhere";
/// A repository nothing is linked to.
const STRANGER: &str = "docker.io/x/stranger";
/// Both backends' sweep page (`SCAN_PAGE`): the sweep section writes more.
const SCAN_PAGE: usize = 500;
const LEASE: Duration = Duration::from_secs(600);

// ---------------------------------------------------------------------------
// Checks that are collected rather than stopping at the first.

struct Checks {
    backend: String,
    failed: Mutex<Vec<String>>,
}

impl Checks {
    fn new(backend: &str) -> Checks {
        Checks { backend: backend.to_owned(), failed: Mutex::new(Vec::new()) }
    }

    #[track_caller]
    fn that(&self, ok: bool, what: impl Display) {
        if !ok {
            let at = Location::caller();
            self.failed.lock().unwrap().push(format!("line {}: {what}", at.line()));
        }
    }

    #[track_caller]
    fn eq<T: PartialEq + Debug>(&self, actual: T, expected: T, what: impl Display) {
        if actual != expected {
            let at = Location::caller();
            self.failed.lock().unwrap().push(format!("line {}: {what}: expected {expected:?}, got {actual:?}", at.line()));
        }
    }

    /// `t` lies in `[from, to]` (timestamps are whole seconds of `clock`).
    #[track_caller]
    fn within(&self, t: i64, from: i64, to: i64, what: impl Display) {
        if !(from..=to).contains(&t) {
            let at = Location::caller();
            self.failed.lock().unwrap().push(format!("line {}: {what}: {t} not in [{from}, {to}]", at.line()));
        }
    }

    fn finish(self) {
        let failed = std::mem::take(&mut *self.failed.lock().unwrap());
        if !failed.is_empty() {
            panic!("{} broke the contract in {} check(s):\n  {}", self.backend, failed.len(), failed.join("\n  "));
        }
    }
}

impl Drop for Checks {
    fn drop(&mut self) {
        // A storage error ended the run early: still say what failed before it.
        let failed = self.failed.lock().unwrap();
        if std::thread::panicking() && !failed.is_empty() {
            eprintln!("{}: checks failed before the panic:\n  {}", self.backend, failed.join("\n  "));
        }
    }
}

// ---------------------------------------------------------------------------
// Data.

fn d(name: &str) -> Digest {
    Digest::of(name.as_bytes())
}

fn manifest(body: impl Into<Vec<u8>>) -> ManifestRecord {
    let body = body.into();
    ManifestRecord { digest: Digest::of(&body), media_type: "application/vnd.oci.image.manifest.v1+json".into(), body: Bytes::from(body) }
}

/// An image manifest referencing `blobs` (config first).
fn image(name: &str, blobs: &[Digest]) -> ManifestRecord {
    let layers: Vec<String> = blobs.iter().skip(1).map(|b| format!(r#"{{"digest":"{b}"}}"#)).collect();
    let config = blobs.first().map(|c| format!(r#","config":{{"digest":"{c}"}}"#)).unwrap_or_default();
    manifest(format!(r#"{{"schemaVersion":2,"name":"{name}"{config},"layers":[{}]}}"#, layers.join(",")))
}

fn tag(repo: &str, tag: &str, variant: &str, m: &ManifestRecord, checked_at: i64) -> TagRecord {
    TagRecord {
        repo: repo.into(),
        tag: tag.into(),
        variant: variant.into(),
        digest: m.digest.clone(),
        media_type: m.media_type.clone(),
        checked_at,
        pulled_at: 0,
    }
}

fn set(v: &[Digest]) -> BTreeSet<Digest> {
    v.iter().cloned().collect()
}

async fn record(index: &dyn Index, repo: &str, digest: &Digest) -> Option<BlobRecord> {
    index.blob(repo, digest).await.unwrap().record
}

async fn state(index: &dyn Index, digest: &Digest) -> Option<BlobState> {
    record(index, REPO, digest).await.map(|r| r.state)
}

async fn unfinished(index: &dyn Index) -> BTreeMap<Digest, BlobState> {
    index.unfinished_blobs().await.unwrap().into_iter().map(|b| (b.digest, b.state)).collect()
}

/// Moves the index's clock past every lease of zero seconds taken so far
/// (timestamps are whole seconds: a lease ending "now" has not ended yet).
fn let_zero_leases_expire() {
    clock::advance(Duration::from_secs(2));
}

/// What identifies a sweep entry, to check each is seen once.
fn entry_key(e: &Entry) -> String {
    match e {
        Entry::Tag(t) => format!("tag {} {} {:?}", t.repo, t.tag, t.variant),
        Entry::ManifestLink { repo, digest, .. } => format!("manifest-link {repo} {digest}"),
        Entry::Manifest { record, .. } => format!("manifest {}", record.digest),
        Entry::Blob(b) => format!("blob {}", b.digest),
        Entry::BlobLink { repo, digest } => format!("blob-link {repo} {digest}"),
    }
}

/// A whole sweep: every entry, and how many pages it took.
async fn sweep(index: &dyn Index) -> (Vec<Entry>, usize) {
    let (mut entries, mut pages, mut cursor) = (Vec::new(), 0, None);
    loop {
        let page = index.scan(cursor).await.unwrap();
        pages += 1;
        entries.extend(page.entries);
        match page.next {
            Some(n) => cursor = Some(n),
            None => return (entries, pages),
        }
        assert!(pages < 10_000, "the sweep does not end");
    }
}

/// A blob's stored record, as a sweep reads it (past any cache or copy).
async fn swept_blob(index: &dyn Index, digest: &Digest) -> Option<BlobRecord> {
    sweep(index).await.0.into_iter().find_map(|e| match e {
        Entry::Blob(b) if b.digest == *digest => Some(b),
        _ => None,
    })
}

/// The stored `pulled_at` of `repo`'s link to a manifest, as a sweep reads
/// it (past any cache).
async fn swept_pulled_at(index: &dyn Index, repo: &str, digest: &Digest) -> Option<i64> {
    sweep(index).await.0.into_iter().find_map(|e| match e {
        Entry::ManifestLink { repo: r, digest: dg, pulled_at } if r == repo && dg == *digest => Some(pulled_at),
        _ => None,
    })
}

// ---------------------------------------------------------------------------
// The index contract.

async fn index_contract(index: &dyn Index, backend: &str) {
    let c = Checks::new(backend);
    manifests(index, &c).await;
    tags(index, &c).await;
    blob_states(index, &c).await;
    stale_fetches(index, &c).await;
    manifest_expiry(index, &c).await;
    blob_deletion(index, &c).await;
    sweeps(index, &c).await;
    stats(index, &c).await;
    c.finish();
}

/// `put_manifest`: stored once, linked per repository, its blobs linked and
/// the unknown ones made pending (and returned) exactly once.
async fn manifests(index: &dyn Index, c: &Checks) {
    let (config, layer, extra) = (d("manifests/config"), d("manifests/layer"), d("manifests/extra"));
    let blobs = [config.clone(), layer.clone()];
    let m = image("manifests/m", &blobs);

    let unknown = index.manifest(REPO, &m.digest).await.unwrap();
    c.that(!unknown.linked && unknown.record.is_none(), "manifest(): nothing before put_manifest");

    let before = now();
    let made = index.put_manifest(REPO, &m, &descs(&blobs)).await.unwrap();
    c.eq(set(&made), set(&blobs), "put_manifest: returns the blobs it made pending");
    c.eq(made.len(), blobs.len(), "put_manifest: each pending blob returned once");
    c.eq(index.put_manifest(REPO, &m, &descs(&blobs)).await.unwrap(), vec![], "put_manifest again: makes nothing pending");
    c.eq(index.put_manifest(OTHER, &m, &descs(&blobs)).await.unwrap(), vec![], "put_manifest from another repository: nothing pending");
    let sizes: Vec<Option<u64>> =
        unfinished_records(index).await.into_iter().filter(|b| blobs.contains(&b.digest)).map(|b| b.size).collect();
    c.eq(sizes, vec![Some(7), Some(7)], "put_manifest: pending blobs carry the size the manifest declares");
    let after = now();

    for repo in [REPO, OTHER] {
        let got = index.manifest(repo, &m.digest).await.unwrap();
        c.that(got.linked, format!("manifest({repo}): linked by put_manifest"));
        c.eq(got.record.as_ref(), Some(&m), format!("manifest({repo}): the stored bytes"));
        c.within(got.pulled_at, before, after, format!("manifest({repo}).pulled_at: storing it is a pull"));
        for b in &blobs {
            let view = index.blob(repo, b).await.unwrap();
            c.that(view.linked, format!("blob({repo}, {b}): put_manifest links the manifest's blobs"));
            match view.record {
                Some(r) => {
                    c.eq(r.state, BlobState::Pending, format!("blob({repo}, {b}).state after put_manifest"));
                    c.eq(r.source.as_str(), REPO, format!("blob({b}).source: the repository whose put made it pending"));
                }
                None => c.that(false, format!("blob({repo}, {b}): no record after put_manifest made it pending")),
            }
        }
    }
    let stranger = index.manifest(STRANGER, &m.digest).await.unwrap();
    c.that(!stranger.linked, "manifest(stranger): not linked there");
    c.eq(stranger.record.as_ref(), Some(&m), "manifest(stranger): known, though not linked there");
    c.that(!index.blob(STRANGER, &config).await.unwrap().linked, "blob(stranger): not linked there");
    let queue = unfinished(index).await;
    for b in &blobs {
        c.eq(queue.get(b), Some(&BlobState::Pending), format!("unfinished_blobs(): lists pending {b}"));
    }

    // Sharing a layer with a stored manifest: only the new blob is pending.
    let m2 = image("manifests/m2", &[layer.clone(), extra.clone()]);
    c.eq(
        index.put_manifest(REPO, &m2, &descs(&[layer.clone(), extra.clone()])).await.unwrap(),
        vec![extra.clone()],
        "put_manifest: only unknown blobs",
    );

    // A failed blob referenced again: returned exactly when it was made pending.
    index.set_blob_state(&extra, BlobState::Failed, None, Some("boom")).await.unwrap();
    let m3 = image("manifests/m3", std::slice::from_ref(&extra));
    let made = index.put_manifest(REPO, &m3, &descs(std::slice::from_ref(&extra))).await.unwrap();
    let now_state = state(index, &extra).await;
    c.that(
        (made == [extra.clone()] && now_state == Some(BlobState::Pending)) || (made.is_empty() && now_state == Some(BlobState::Failed)),
        format!("put_manifest over a failed blob: returned {made:?} but its state is {now_state:?}"),
    );

    // Too big for a DynamoDB item: it round-trips too, linked and not.
    let big = manifest(format!("{{\"pad\":\"{}\"}}", "x".repeat(400 * 1024)));
    c.eq(index.put_manifest(REPO, &big, &[]).await.unwrap(), vec![], "put_manifest (no blobs)");
    c.eq(index.manifest(REPO, &big.digest).await.unwrap().record.as_ref(), Some(&big), "manifest(): a 400 KiB manifest");
    c.eq(index.manifest(STRANGER, &big.digest).await.unwrap().record.as_ref(), Some(&big), "manifest(stranger): a 400 KiB manifest");
}

/// Tags: per variant, moved, touched, pulled, deleted, and expired only on
/// the digest and pull time the sweep saw.
async fn tags(index: &dyn Index, c: &Checks) {
    let (m, m2) = (image("tags/m", &[]), image("tags/m2", &[]));
    let big = manifest(format!("{{\"tag-pad\":\"{}\"}}", "y".repeat(400 * 1024)));
    for x in [&m, &m2, &big] {
        index.put_manifest(REPO, x, &[]).await.unwrap();
    }
    c.that(index.tag(REPO, "1", "").await.unwrap().is_none(), "tag(): nothing before put_tag");

    let t = tag(REPO, "1", "", &m, now());
    let before = now();
    index.put_tag(&t, &m).await.unwrap();
    let after = now();
    let got = index.tag(REPO, "1", "").await.unwrap();
    let pulled = got.as_ref().map_or(0, |g| g.pulled_at);
    c.within(pulled, before, after, "put_tag: storing a tag is a pull");
    let t = TagRecord { pulled_at: pulled, ..t };
    c.eq(got.as_ref(), Some(&t), "tag(): what put_tag stored");
    c.eq(index.tag_manifest(REPO, "1", "").await.unwrap(), Some((t.clone(), Some(m.clone()))), "tag_manifest(): the tag and its manifest");
    c.that(index.tag(REPO, "1", "narrow").await.unwrap().is_none(), "tag(): variants are separate");
    c.that(index.tag(OTHER, "1", "").await.unwrap().is_none(), "tag(): repositories are separate");

    // Another variant of the same tag, at another manifest.
    let narrow = tag(REPO, "1", "narrow", &m2, now());
    index.put_tag(&narrow, &m2).await.unwrap();
    c.eq(index.tag(REPO, "1", "narrow").await.unwrap().map(|t| t.digest), Some(m2.digest.clone()), "put_tag: the variant");
    c.eq(index.tag(REPO, "1", "").await.unwrap().map(|t| t.digest), Some(m.digest.clone()), "put_tag of a variant leaves the plain tag");

    // touch_tag sets checked_at and nothing else.
    index.touch_tag(REPO, "1", "", 12_345).await.unwrap();
    c.eq(index.tag(REPO, "1", "").await.unwrap(), Some(TagRecord { checked_at: 12_345, ..t.clone() }), "touch_tag: checked_at only");

    // Moving the tag.
    let moved = tag(REPO, "1", "", &m2, now());
    index.put_tag(&moved, &m2).await.unwrap();
    let got = index.tag_manifest(REPO, "1", "").await.unwrap();
    c.eq(got.as_ref().map(|(t, _)| t.digest.clone()), Some(m2.digest.clone()), "put_tag: moves the tag");
    c.eq(got.and_then(|(_, m)| m), Some(m2.clone()), "tag_manifest(): the manifest the tag moved to");

    // A big manifest behind a tag.
    index.put_tag(&tag(REPO, "big", "", &big, now()), &big).await.unwrap();
    c.eq(index.tag_manifest(REPO, "big", "").await.unwrap().and_then(|(_, m)| m), Some(big.clone()), "tag_manifest(): a 400 KiB manifest");

    // tag_pulled moves pulled_at; on a missing tag it creates nothing.
    let p0 = index.tag(REPO, "1", "").await.unwrap().map_or(0, |t| t.pulled_at);
    clock::advance(Duration::from_secs(2));
    let before = now();
    index.tag_pulled(REPO, "1", "").await.unwrap();
    let after = now();
    let p1 = index.tag(REPO, "1", "").await.unwrap().map_or(0, |t| t.pulled_at);
    c.within(p1, before, after, format!("tag_pulled: pulled_at is now (was {p0})"));
    index.tag_pulled(REPO, "never", "").await.unwrap();
    c.that(index.tag(REPO, "never", "").await.unwrap().is_none(), "tag_pulled on a missing tag creates nothing");

    // expire_tag: refused when the tag moved or was pulled since, taken otherwise.
    c.that(!index.expire_tag(REPO, "1", "", &m.digest, p1 + 1).await.unwrap(), "expire_tag: refused, the tag points elsewhere now");
    c.that(!index.expire_tag(REPO, "1", "", &m2.digest, p1).await.unwrap(), "expire_tag: refused, pulled at pulled_before (not before it)");
    c.eq(
        index.tag(REPO, "1", "").await.unwrap().map(|t| (t.digest, t.pulled_at)),
        Some((m2.digest.clone(), p1)),
        "a refused expire_tag leaves the tag",
    );
    c.that(index.expire_tag(REPO, "1", "", &m2.digest, p1 + 1).await.unwrap(), "expire_tag: taken, same digest, pulled before");
    c.that(index.tag(REPO, "1", "").await.unwrap().is_none(), "tag(): gone after expire_tag");
    c.that(index.tag_manifest(REPO, "1", "").await.unwrap().is_none(), "tag_manifest(): gone after expire_tag");
    c.that(!index.expire_tag(REPO, "1", "", &m2.digest, p1 + 1).await.unwrap(), "expire_tag: a gone tag is not taken twice");
    c.that(index.tag(REPO, "1", "narrow").await.unwrap().is_some(), "expire_tag leaves the other variant");

    // delete_tag, and touching or deleting what is gone.
    index.delete_tag(REPO, "1", "narrow").await.unwrap();
    c.that(index.tag(REPO, "1", "narrow").await.unwrap().is_none(), "tag(): gone after delete_tag");
    c.that(index.tag_manifest(REPO, "1", "narrow").await.unwrap().is_none(), "tag_manifest(): gone after delete_tag");
    index.delete_tag(REPO, "1", "narrow").await.unwrap();
    index.touch_tag(REPO, "1", "narrow", 300).await.unwrap();
    c.that(index.tag(REPO, "1", "narrow").await.unwrap().is_none(), "touch_tag on a deleted tag creates nothing");
}

/// The fetch queue: pending once, claimed by one fetcher under a lease,
/// failed and retried, ready with its size; touch only while ready.
async fn blob_states(index: &dyn Index, c: &Checks) {
    let a = d("states/a");
    let unknown = index.blob(REPO, &a).await.unwrap();
    c.that(!unknown.linked && unknown.record.is_none(), "blob(): nothing before create_pending_blob");
    c.that(!index.touch_blob(&a, None).await.unwrap(), "touch_blob: an unknown blob is not ready");
    index.set_blob_state(&a, BlobState::Ready, Some(5), None).await.unwrap();
    c.eq(record(index, REPO, &a).await, None, "set_blob_state on an unknown blob creates no record");

    let before = now();
    c.that(index.create_pending_blob(&a, OTHER, Some(5)).await.unwrap(), "create_pending_blob: an unknown blob");
    c.that(!index.create_pending_blob(&a, REPO, None).await.unwrap(), "create_pending_blob: already pending");
    let r = record(index, REPO, &a).await;
    c.eq(
        r.as_ref().map(|r| (r.state, r.size, r.source.as_str(), r.attempts)),
        Some((BlobState::Pending, Some(5), OTHER, 0)),
        "blob(): pending as created",
    );
    c.within(r.map_or(0, |r| r.updated_at), before, now(), "blob().updated_at of a new pending blob");
    c.that(!index.blob(REPO, &a).await.unwrap().linked, "create_pending_blob links nothing");
    c.eq(unfinished(index).await.get(&a), Some(&BlobState::Pending), "unfinished_blobs(): a pending blob");
    c.that(!index.touch_blob(&a, None).await.unwrap(), "touch_blob: a pending blob is not ready");

    // One fetcher at a time, under a lease.
    let before = now();
    c.that(index.claim_blob(&a, LEASE).await.unwrap(), "claim_blob: a pending blob");
    let after = now();
    let r = record(index, REPO, &a).await;
    c.eq(r.as_ref().map(|r| (r.state, r.attempts)), Some((BlobState::Fetching, 1)), "blob() after claim_blob");
    c.within(r.map_or(0, |r| r.lease_until), before + 600, after + 600, "claim_blob: lease_until is the lease from now");
    c.that(!index.claim_blob(&a, LEASE).await.unwrap(), "claim_blob: refused while the lease holds");
    c.that(!index.claim_blob(&a, Duration::ZERO).await.unwrap(), "claim_blob: refused while the lease holds, whatever lease is asked");
    c.that(!index.create_pending_blob(&a, REPO, None).await.unwrap(), "create_pending_blob: refused while fetching");
    c.that(!index.requeue_stale_blob(&a, Duration::ZERO).await.unwrap(), "requeue_stale_blob: refused while the fetch lease holds");
    c.eq(state(index, &a).await, Some(BlobState::Fetching), "still fetching after the refusals");
    c.eq(unfinished(index).await.get(&a), Some(&BlobState::Fetching), "unfinished_blobs(): a fetching blob");
    c.that(!index.touch_blob(&a, None).await.unwrap(), "touch_blob: a fetching blob is not ready");

    // The lease holder's checkpoint, kept across failure and release.
    let cp = Checkpoint { upload: "up:load/1".into(), offset: 8 << 20, hash: vec![1, 2, 255] };
    c.eq(index.blob_checkpoint(&a).await.unwrap(), None, "blob_checkpoint(): none at first");
    index.save_checkpoint(&a, Some(&cp)).await.unwrap();
    c.eq(index.blob_checkpoint(&a).await.unwrap(), Some(cp.clone()), "save_checkpoint() then blob_checkpoint(): the same");
    c.eq(unfinished(index).await.get(&a), Some(&BlobState::Fetching), "a checkpoint leaves the blob fetching");
    let listed = index.unfinished_blobs().await.unwrap().into_iter().find(|b| b.digest == a).and_then(|b| b.checkpoint);
    c.eq(listed, Some(cp.clone()), "unfinished_blobs(): the record carries its checkpoint");

    // Failed, then retried.
    index.set_blob_state(&a, BlobState::Failed, None, Some("boom")).await.unwrap();
    c.eq(index.blob_checkpoint(&a).await.unwrap(), Some(cp.clone()), "a failed copy keeps its checkpoint for the retry");
    let other = Checkpoint { offset: 16 << 20, ..cp.clone() };
    index.save_checkpoint(&a, Some(&other)).await.unwrap();
    c.eq(index.blob_checkpoint(&a).await.unwrap(), Some(cp.clone()), "save_checkpoint(): only while fetching (the lease holder's)");
    let r = record(index, REPO, &a).await;
    c.eq(r.as_ref().map(|r| (r.state, r.last_error.as_deref())), Some((BlobState::Failed, Some("boom"))), "set_blob_state(failed)");
    c.eq(unfinished(index).await.get(&a), None, "unfinished_blobs(): not a failed blob");
    c.that(!index.touch_blob(&a, None).await.unwrap(), "touch_blob: a failed blob is not ready");
    c.that(index.claim_blob(&a, LEASE).await.unwrap(), "claim_blob: a failed blob");
    c.eq(record(index, REPO, &a).await.map(|r| (r.state, r.attempts)), Some((BlobState::Fetching, 2)), "claim_blob of a failed blob");

    // Ready, with its size.
    let before = now();
    index.set_blob_state(&a, BlobState::Ready, Some(5), None).await.unwrap();
    let after = now();
    let r = record(index, REPO, &a).await;
    c.eq(
        r.as_ref().map(|r| (r.state, r.size, r.last_error.as_deref(), r.lease_until)),
        Some((BlobState::Ready, Some(5), None, 0)),
        "set_blob_state(ready): ready, sized, no error, no lease",
    );
    c.within(r.map_or(0, |r| r.used_at), before, after, "set_blob_state(ready): a fetched blob counts as used");
    c.eq(index.blob_checkpoint(&a).await.unwrap(), None, "set_blob_state(ready) forgets the checkpoint");
    c.that(!index.create_pending_blob(&a, REPO, None).await.unwrap(), "create_pending_blob: refused for a ready blob");
    c.that(!index.claim_blob(&a, Duration::ZERO).await.unwrap(), "claim_blob: refused for a ready blob");
    c.that(!index.requeue_stale_blob(&a, Duration::ZERO).await.unwrap(), "requeue_stale_blob: never a ready blob");
    c.eq(unfinished(index).await.get(&a), None, "unfinished_blobs(): not a ready blob");
    c.eq(state(index, &a).await, Some(BlobState::Ready), "still ready after the refusals");
    // A copy that ends after another stored the blob (one beside it, from
    // another registry) changes nothing: a ready blob stays ready.
    index.set_blob_state(&a, BlobState::Failed, None, Some("late")).await.unwrap();
    index.set_blob_state(&a, BlobState::Pending, None, None).await.unwrap();
    c.eq(state(index, &a).await, Some(BlobState::Ready), "set_blob_state(failed or pending) leaves a ready blob ready");

    // Links.
    index.link(REPO, &a).await.unwrap();
    index.link(REPO, &a).await.unwrap();
    for _ in 0..2 {
        let view = index.blob(REPO, &a).await.unwrap();
        c.that(view.linked, "blob(): linked by link()");
        c.eq(view.record.map(|r| (r.state, r.size)), Some((BlobState::Ready, Some(5))), "blob(): ready with its size, read twice");
    }
    c.that(!index.blob(OTHER, &a).await.unwrap().linked, "link() links that repository only");

    // touch_blob marks a ready blob used now.
    clock::advance(Duration::from_secs(2));
    let before = now();
    c.that(index.touch_blob(&a, Some(REPO)).await.unwrap(), "touch_blob: a ready blob, through a repository");
    let after = now();
    c.within(record(index, REPO, &a).await.map_or(0, |r| r.used_at), before, after, "touch_blob(via): used_at is now");
    clock::advance(Duration::from_secs(2));
    let before = now();
    c.that(index.touch_blob(&a, None).await.unwrap(), "touch_blob: a ready blob, referenced");
    let after = now();
    c.within(swept_blob(index, &a).await.map_or(0, |r| r.used_at), before, after, "touch_blob(None): the stored used_at is now");
    // A repository's view may be a copy (DynamoDB's link item, the cache)
    // that lags a touch made through no repository: never ahead of it.
    c.within(
        record(index, REPO, &a).await.map_or(0, |r| r.used_at),
        before - 4,
        after,
        "touch_blob(None): blob(repo).used_at, at most as new",
    );

    // A ready blob whose stored bytes are gone goes back to pending, its
    // size kept, and is fetched again; nothing else is ever marked lost.
    c.that(index.mark_blob_lost(&a, &[REPO.into()]).await.unwrap(), "mark_blob_lost: a ready blob");
    let r = record(index, REPO, &a).await;
    c.eq(
        r.as_ref().map(|r| (r.state, r.size, r.last_error.as_deref())),
        Some((BlobState::Pending, Some(5), Some(hubcap::storage::LOST))),
        "mark_blob_lost: pending with its size, in the repository's view",
    );
    c.that(!index.touch_blob(&a, Some(REPO)).await.unwrap(), "touch_blob: a lost blob is not ready");
    c.eq(unfinished(index).await.get(&a), Some(&BlobState::Pending), "unfinished_blobs(): a lost blob");
    c.that(!index.mark_blob_lost(&a, &[REPO.into()]).await.unwrap(), "mark_blob_lost: not a pending blob");
    c.that(!index.mark_blob_lost(&d("never-seen"), &[]).await.unwrap(), "mark_blob_lost: not an unknown blob");
    c.that(index.claim_blob(&a, LEASE).await.unwrap(), "claim_blob: a lost blob");
    c.that(!index.mark_blob_lost(&a, &[REPO.into()]).await.unwrap(), "mark_blob_lost: not a fetching blob");
    index.set_blob_state(&a, BlobState::Ready, Some(5), None).await.unwrap();
    c.eq(state(index, &a).await, Some(BlobState::Ready), "fetched again: ready");
}

/// Fetches that look lost go back in the queue; expired fetch leases are
/// taken over. Leases of zero seconds, then the clock moves.
async fn stale_fetches(index: &dyn Index, c: &Checks) {
    let (waiting, lost, lost2) = (d("stale/waiting"), d("stale/lost"), d("stale/lost2"));
    for b in [&waiting, &lost, &lost2] {
        c.that(index.create_pending_blob(b, REPO, None).await.unwrap(), "create_pending_blob");
    }
    c.that(
        !index.requeue_stale_blob(&waiting, Duration::from_secs(3600)).await.unwrap(),
        "requeue_stale_blob: a fresh pending blob is left",
    );
    let u0 = record(index, REPO, &waiting).await.map_or(0, |r| r.updated_at);
    c.that(index.claim_blob(&lost, Duration::ZERO).await.unwrap(), "claim_blob with a zero lease");
    c.that(index.claim_blob(&lost2, Duration::ZERO).await.unwrap(), "claim_blob with a zero lease");
    let_zero_leases_expire();

    let before = now();
    c.that(
        index.requeue_stale_blob(&waiting, Duration::from_secs(1)).await.unwrap(),
        "requeue_stale_blob: pending, no write for longer than stale",
    );
    let r = record(index, REPO, &waiting).await;
    c.eq(r.as_ref().map(|r| r.state), Some(BlobState::Pending), "re-queued: pending");
    c.within(r.map_or(0, |r| r.updated_at), before.max(u0 + 1), now(), "re-queued: updated_at is now");
    c.that(!index.requeue_stale_blob(&waiting, Duration::from_secs(1)).await.unwrap(), "requeue_stale_blob: just re-queued, fresh again");

    c.that(
        index.requeue_stale_blob(&lost, Duration::from_secs(3600)).await.unwrap(),
        "requeue_stale_blob: fetching under an expired lease (whatever stale says)",
    );
    let r = record(index, REPO, &lost).await;
    c.eq(r.as_ref().map(|r| (r.state, r.lease_until)), Some((BlobState::Pending, 0)), "re-queued from fetching: pending, no lease");
    c.eq(unfinished(index).await.get(&lost), Some(&BlobState::Pending), "unfinished_blobs(): the re-queued blob");
    c.that(index.claim_blob(&lost, LEASE).await.unwrap(), "claim_blob: the re-queued blob");

    let before = now();
    c.that(index.claim_blob(&lost2, LEASE).await.unwrap(), "claim_blob: an expired lease is taken over");
    let r = record(index, REPO, &lost2).await;
    c.eq(r.as_ref().map(|r| (r.state, r.attempts)), Some((BlobState::Fetching, 2)), "taken over: fetching, second attempt");
    c.within(r.map_or(0, |r| r.lease_until), before + 600, now() + 600, "taken over: the new lease");
    c.that(!index.claim_blob(&lost2, LEASE).await.unwrap(), "claim_blob: the new lease holds");
}

/// Pull marks on a repository's manifest, conditional unlinking, deleting a
/// manifest nothing links.
async fn manifest_expiry(index: &dyn Index, c: &Checks) {
    let b = d("expiry/layer");
    let m = image("expiry/m", std::slice::from_ref(&b));
    for repo in [REPO, OTHER] {
        index.put_manifest(repo, &m, &descs(std::slice::from_ref(&b))).await.unwrap();
    }
    let t = tag(REPO, "exp", "", &m, now());
    index.put_tag(&t, &m).await.unwrap();
    let found = index.tag_manifest(REPO, "exp", "").await.unwrap();
    c.eq(found.and_then(|(_, m)| m), Some(m.clone()), "tag_manifest(): the tag's manifest, linked to its repository");

    clock::advance(Duration::from_secs(2));
    let before = now();
    c.that(index.manifest_pulled(REPO, &m.digest).await.unwrap(), "manifest_pulled: linked");
    let after = now();
    c.within(index.manifest(REPO, &m.digest).await.unwrap().pulled_at, before, after, "manifest_pulled: pulled_at is now");
    let stored = swept_pulled_at(index, REPO, &m.digest).await;
    c.that(stored.is_some_and(|p| (before..=after).contains(&p)), format!("manifest_pulled: the stored pulled_at {stored:?} is now"));
    c.that(!index.manifest_pulled(STRANGER, &m.digest).await.unwrap(), "manifest_pulled: false where not linked");
    c.that(!index.manifest(STRANGER, &m.digest).await.unwrap().linked, "manifest_pulled where not linked links nothing");

    // expire_manifest_link: refused when pulled at or after pulled_before.
    let p = stored.unwrap_or(0);
    c.that(!index.expire_manifest_link(REPO, &m.digest, p).await.unwrap(), "expire_manifest_link: refused, pulled at pulled_before");
    c.that(index.manifest(REPO, &m.digest).await.unwrap().linked, "a refused expire_manifest_link leaves the link");
    c.that(index.expire_manifest_link(REPO, &m.digest, p + 1).await.unwrap(), "expire_manifest_link: taken, pulled before");
    let gone = index.manifest(REPO, &m.digest).await.unwrap();
    c.that(!gone.linked, "manifest(): unlinked after expire_manifest_link");
    c.eq(gone.record.as_ref(), Some(&m), "manifest(): still stored while another repository links it");
    c.that(!index.manifest_pulled(REPO, &m.digest).await.unwrap(), "manifest_pulled: false after expire_manifest_link");
    // A tag is itself its repository's link: its manifest comes with it.
    let found = index.tag_manifest(REPO, "exp", "").await.unwrap();
    c.eq(
        found.map(|(t, m)| (t.digest, m.map(|m| m.digest))),
        Some((m.digest.clone(), Some(m.digest.clone()))),
        "tag_manifest(): (tag's digest, manifest's digest): the tag with the manifest it holds",
    );
    c.that(
        !index.expire_manifest_link(REPO, &m.digest, p + 1).await.unwrap(),
        "expire_manifest_link: a link already gone is not taken twice",
    );
    c.that(!index.expire_manifest_link(STRANGER, &m.digest, now() + 1).await.unwrap(), "expire_manifest_link: a repository never linked");
    c.that(index.manifest(OTHER, &m.digest).await.unwrap().linked, "expire_manifest_link leaves other repositories' links");

    // The sweep expires the rest, then deletes the manifest.
    c.that(index.expire_tag(REPO, "exp", "", &m.digest, now() + 1).await.unwrap(), "expire_tag");
    c.that(index.expire_manifest_link(OTHER, &m.digest, now() + 1).await.unwrap(), "expire_manifest_link: the last link");
    c.that(index.delete_manifest(&m.digest).await.unwrap(), "delete_manifest: a manifest nothing links");
    for repo in [REPO, OTHER, STRANGER] {
        let got = index.manifest(repo, &m.digest).await.unwrap();
        c.that(!got.linked && got.record.is_none(), format!("manifest({repo}): gone after delete_manifest"));
    }
    c.that(!index.delete_manifest(&m.digest).await.unwrap(), "delete_manifest: not taken twice");
    c.eq(state(index, &b).await, Some(BlobState::Pending), "delete_manifest leaves its blobs' records");
}

/// The `deleting` protocol: only a blob unused since `used_before`, one
/// sweep at a time, no reader or fetcher from the mark on, and the record
/// and links gone at the end.
async fn blob_deletion(index: &dyn Index, c: &Checks) {
    async fn ready(index: &dyn Index, b: &Digest, size: u64) {
        index.create_pending_blob(b, REPO, None).await.unwrap();
        index.claim_blob(b, LEASE).await.unwrap();
        index.set_blob_state(b, BlobState::Ready, Some(size), None).await.unwrap();
        assert_eq!(state(index, b).await, Some(BlobState::Ready), "setting up a ready blob");
    }
    let b = d("gc/b");
    let t0 = now();
    ready(index, &b, 7).await;
    for repo in [REPO, OTHER] {
        index.link(repo, &b).await.unwrap();
        c.eq(index.blob(repo, &b).await.unwrap().record.map(|r| r.state), Some(BlobState::Ready), "blob(): ready and linked");
    }
    c.that(!index.begin_blob_delete(&b, t0, LEASE).await.unwrap(), "begin_blob_delete: refused, used at or after used_before");
    c.eq(state(index, &b).await, Some(BlobState::Ready), "a refused begin_blob_delete leaves it ready");

    // Unused for a while: taken.
    clock::advance(Duration::from_secs(10));
    let used_before = now() - 5;
    let before = now();
    c.that(index.begin_blob_delete(&b, used_before, LEASE).await.unwrap(), "begin_blob_delete: ready, last used before used_before");
    let after = now();
    // Not servable from here on: the record says `deleting`, or it still
    // says `ready` with a use older than `used_before` (DynamoDB answers from
    // the repository's link item), which a reader must renew with touch_blob
    // before serving it, and that fails (below).
    let not_servable = |r: &Option<BlobRecord>| {
        r.as_ref().is_some_and(|r| r.state == BlobState::Deleting || (r.state == BlobState::Ready && r.used_at < used_before))
    };
    for repo in [REPO, OTHER] {
        let r = record(index, repo, &b).await;
        c.that(
            not_servable(&r),
            format!("blob({repo}) after begin_blob_delete: deleting, or ready with a use before used_before; got {r:?}"),
        );
    }
    c.that(!index.begin_blob_delete(&b, now() + 1, LEASE).await.unwrap(), "begin_blob_delete: one sweep holds it");
    c.that(!index.touch_blob(&b, Some(REPO)).await.unwrap(), "touch_blob(via): a reader loses to the mark");
    c.that(!index.touch_blob(&b, None).await.unwrap(), "touch_blob(None): a deleting blob is not ready");
    let r = record(index, REPO, &b).await;
    c.eq(r.as_ref().map(|r| r.state), Some(BlobState::Deleting), "blob(repo) once its reader lost to the mark");
    c.within(r.map_or(0, |r| r.lease_until), before + 600, after + 600, "blob(repo).lease_until: the delete lease");
    let r = record(index, OTHER, &b).await;
    c.that(not_servable(&r), format!("blob(other repo) while deleting: deleting, or ready with a use before used_before; got {r:?}"));
    let swept = swept_blob(index, &b).await;
    c.eq(swept.as_ref().map(|r| r.state), Some(BlobState::Deleting), "the stored record after begin_blob_delete");
    c.within(swept.map_or(0, |r| r.lease_until), before + 600, after + 600, "the stored lease_until: the delete lease");
    c.that(!index.create_pending_blob(&b, REPO, None).await.unwrap(), "create_pending_blob: not fetched again under the delete lease");
    c.that(!index.claim_blob(&b, Duration::ZERO).await.unwrap(), "claim_blob: a deleting blob");
    c.that(!index.requeue_stale_blob(&b, Duration::ZERO).await.unwrap(), "requeue_stale_blob: a deleting blob");
    index.set_blob_state(&b, BlobState::Ready, Some(1), None).await.unwrap();
    c.eq(state(index, &b).await, Some(BlobState::Deleting), "set_blob_state: a late fetcher cannot revive a deleting blob");
    c.eq(unfinished(index).await.get(&b), None, "unfinished_blobs(): not a deleting blob");

    index.finish_blob_delete(&b, &[REPO.to_owned(), OTHER.to_owned()]).await.unwrap();
    c.that(swept_blob(index, &b).await.is_none(), "finish_blob_delete: the stored record is gone");
    // Through the cache too: a link copy cached while the blob was
    // `deleting` goes with it.
    for repo in [REPO, OTHER] {
        let view = index.blob(repo, &b).await.unwrap();
        c.that(view.record.is_none() && !view.linked, format!("blob({repo}) after finish_blob_delete: record and link gone, got {view:?}"));
    }
    c.that(index.create_pending_blob(&b, REPO, None).await.unwrap(), "create_pending_blob: a later miss fetches it again");
    c.eq(state(index, &b).await, Some(BlobState::Pending), "fetched again: pending");

    // finish_blob_delete removes only a `deleting` record.
    let kept = d("gc/kept");
    ready(index, &kept, 3).await;
    index.link(REPO, &kept).await.unwrap();
    index.finish_blob_delete(&kept, &[REPO.to_owned()]).await.unwrap();
    let view = index.blob(REPO, &kept).await.unwrap();
    c.that(
        view.linked && view.record.is_some_and(|r| r.state == BlobState::Ready),
        "finish_blob_delete leaves a blob that is not deleting",
    );

    // Failed blobs are collected too; pending and fetching ones never.
    let (failed, pending, fetching) = (d("gc/failed"), d("gc/pending"), d("gc/fetching"));
    for x in [&failed, &pending, &fetching] {
        index.create_pending_blob(x, REPO, None).await.unwrap();
    }
    index.claim_blob(&fetching, LEASE).await.unwrap();
    index.claim_blob(&failed, LEASE).await.unwrap();
    index.set_blob_state(&failed, BlobState::Failed, None, Some("gone upstream")).await.unwrap();
    clock::advance(Duration::from_secs(2));
    c.that(!index.begin_blob_delete(&pending, now(), LEASE).await.unwrap(), "begin_blob_delete: never a pending blob");
    c.that(!index.begin_blob_delete(&fetching, now(), LEASE).await.unwrap(), "begin_blob_delete: never a fetching blob");
    c.that(index.begin_blob_delete(&failed, now(), LEASE).await.unwrap(), "begin_blob_delete: a failed blob unused before used_before");
    c.eq(state(index, &failed).await, Some(BlobState::Deleting), "blob() after begin_blob_delete of a failed blob");

    // A sweep that died: after its lease, a miss or another sweep takes over.
    let (revived, retaken) = (d("gc/revived"), d("gc/retaken"));
    for x in [&revived, &retaken] {
        ready(index, x, 1).await;
        c.that(index.begin_blob_delete(x, now() + 1, Duration::ZERO).await.unwrap(), "begin_blob_delete with a zero lease");
    }
    let_zero_leases_expire();
    c.that(index.create_pending_blob(&revived, REPO, None).await.unwrap(), "create_pending_blob: an expired delete lease is taken over");
    c.eq(state(index, &revived).await, Some(BlobState::Pending), "revived: pending");
    let before = now();
    c.that(
        index.begin_blob_delete(&retaken, 0, LEASE).await.unwrap(),
        "begin_blob_delete: deleting under an expired lease (whatever used_before)",
    );
    let r = record(index, REPO, &retaken).await;
    c.eq(r.as_ref().map(|r| r.state), Some(BlobState::Deleting), "retaken: deleting");
    c.within(r.map_or(0, |r| r.lease_until), before + 600, now() + 600, "retaken: the new lease");
}

/// A sweep returns every entry once, over pages, as the index holds it.
async fn sweeps(index: &dyn Index, c: &Checks) {
    let (config, layer) = (d("sweep/config"), d("sweep/layer"));
    let m = image("sweep/m", &[config.clone(), layer.clone()]);
    let before = now();
    for repo in [REPO, OTHER] {
        index.put_manifest(repo, &m, &descs(&[config.clone(), layer.clone()])).await.unwrap();
    }
    let t = tag(REPO, "swept", "v", &m, 4242);
    index.put_tag(&t, &m).await.unwrap();
    // More blobs than one page holds.
    let many: Vec<Digest> = (0..SCAN_PAGE + 20).map(|i| d(&format!("sweep/many/{i}"))).collect();
    let made: Vec<bool> = futures_util::stream::iter(&many)
        .map(|b| index.create_pending_blob(b, OTHER, None))
        .buffer_unordered(16)
        .map(|r| r.unwrap())
        .collect()
        .await;
    c.that(made.iter().all(|m| *m), "create_pending_blob: each of many new blobs");
    let after = now();

    let (entries, pages) = sweep(index).await;
    c.that(pages >= 2, format!("scan(): {} entries fit one page of {SCAN_PAGE}?", entries.len()));
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for e in &entries {
        *seen.entry(entry_key(e)).or_default() += 1;
    }
    let twice: Vec<&String> = seen.iter().filter(|(_, n)| **n > 1).map(|(k, _)| k).collect();
    c.that(twice.is_empty(), format!("scan(): entries seen more than once: {twice:?}"));
    let mut want: Vec<String> = many.iter().map(|b| format!("blob {b}")).collect();
    want.extend(
        [config.clone(), layer.clone()]
            .iter()
            .flat_map(|b| [format!("blob {b}"), format!("blob-link {REPO} {b}"), format!("blob-link {OTHER} {b}")]),
    );
    want.extend([
        format!("manifest {}", m.digest),
        format!("manifest-link {REPO} {}", m.digest),
        format!("manifest-link {OTHER} {}", m.digest),
    ]);
    want.push(format!("tag {REPO} swept \"v\""));
    let missing: Vec<&String> = want.iter().filter(|k| !seen.contains_key(*k)).collect();
    c.that(missing.is_empty(), format!("scan(): {} entries missing, e.g. {:?}", missing.len(), missing.iter().take(5).collect::<Vec<_>>()));

    // What the sweep reads is what the index holds.
    for e in &entries {
        match e {
            Entry::Tag(x) if x.repo == REPO && x.tag == "swept" => {
                c.eq(Some(x), index.tag(REPO, "swept", "v").await.unwrap().as_ref(), "scan(): the tag as tag() reads it");
                c.eq(x.checked_at, 4242, "scan(): the tag's checked_at");
            }
            Entry::ManifestLink { repo, digest, pulled_at } if *digest == m.digest => {
                c.within(*pulled_at, before, after, format!("scan(): {repo}'s link pulled_at"));
            }
            Entry::Manifest { record, created_at } if record.digest == m.digest => {
                c.eq(record, &m, "scan(): the manifest's bytes");
                c.within(*created_at, before, after, "scan(): the manifest's created_at");
            }
            Entry::Blob(x) if x.digest == many[0] => {
                c.eq((x.state, x.source.as_str()), (BlobState::Pending, OTHER), "scan(): a blob's state and source");
            }
            Entry::Blob(x) if x.digest == d("gc/retaken") => {
                c.eq(x.state, BlobState::Deleting, "scan(): a deleting blob");
            }
            _ => {}
        }
    }
}

/// Stored statistics add up across flushes; the rate limit is the last seen.
async fn stats(index: &dyn Index, c: &Checks) {
    c.eq(index.stats().await.unwrap(), StoredStats::default(), "stats(): nothing before add_stats");
    let mut delta = StoredStats::default();
    delta.counters.insert("hit".into(), 3);
    delta.counters.insert("miss".into(), 1);
    index.add_stats(&delta).await.unwrap();
    delta.ratelimit_remaining = Some((42, 1_700_000_000));
    delta.counters.insert("upstream_requests".into(), 5);
    index.add_stats(&delta).await.unwrap();
    let got = index.stats().await.unwrap();
    let want: BTreeMap<String, u64> = [("hit", 6), ("miss", 2), ("upstream_requests", 5)].map(|(k, v)| (k.to_owned(), v)).into();
    c.eq(&got.counters, &want, "stats(): the sums of what was added");
    c.eq(got.ratelimit_remaining, Some((42, 1_700_000_000)), "stats(): the rate limit pair");

    let mut later = StoredStats::default();
    later.counters.insert("hit".into(), 1);
    index.add_stats(&later).await.unwrap();
    c.eq(index.stats().await.unwrap().ratelimit_remaining, Some((42, 1_700_000_000)), "add_stats without a rate limit keeps the last");
    later.ratelimit_remaining = Some((7, 1_700_000_100));
    index.add_stats(&later).await.unwrap();
    let got = index.stats().await.unwrap();
    c.eq(got.ratelimit_remaining, Some((7, 1_700_000_100)), "add_stats: the newest rate limit replaces the last");
    c.eq(got.counters.get("hit").copied(), Some(8), "stats(): hit after four adds");
}

/// Descriptors of `digests`, each declared 7 bytes long.
fn descs(digests: &[Digest]) -> Vec<hubcap::oci::Descriptor> {
    digests.iter().map(|d| hubcap::oci::Descriptor { digest: d.clone(), size: Some(7) }).collect()
}

/// The records `unfinished_blobs()` returns.
async fn unfinished_records(index: &dyn Index) -> Vec<BlobRecord> {
    index.unfinished_blobs().await.unwrap()
}

// ---------------------------------------------------------------------------
// The blob-store contract.

/// Fetches a presigned URL's bytes.
type Fetch<'a> = Box<dyn Fn(String) -> futures_util::future::BoxFuture<'a, Option<Bytes>> + Send + Sync + 'a>;

async fn write(store: &dyn BlobStore, d: &Digest, data: &Bytes) {
    let mut w = store.begin(d, None).await.unwrap();
    for chunk in data.chunks(1024 * 1024) {
        w.write(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    w.commit().await.unwrap();
}

async fn blob_store_contract(store: &dyn BlobStore, fetch: Fetch<'_>, backend: &str) {
    let c = Checks::new(backend);
    // Larger than two S3 parts: a multipart upload.
    let data = Bytes::from(common::images::noise(2 * aws::PART_SIZE + 123, 7));
    let big = Digest::of(&data);
    c.eq(store.size(&big).await.unwrap(), None, "size(): nothing before a write");
    let mut w = store.begin(&big, None).await.unwrap();
    for chunk in data.chunks(1024 * 1024) {
        w.write(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    c.eq(store.size(&big).await.unwrap(), None, "size(): nothing visible before commit");
    w.commit().await.unwrap();
    c.eq(store.size(&big).await.unwrap(), Some(data.len() as u64), "size(): a committed multipart blob");
    let url = store.presigned_get(&big, Duration::from_secs(60)).await.unwrap();
    c.that(fetch(url).await.as_ref() == Some(&data), "presigned_get: the URL serves the committed bytes");

    let small = Bytes::from_static(b"small blob");
    let ds = Digest::of(&small);
    write(store, &ds, &small).await;
    c.eq(store.size(&ds).await.unwrap(), Some(small.len() as u64), "size(): a committed single-part blob");
    write(store, &ds, &small).await;
    c.eq(store.size(&ds).await.unwrap(), Some(small.len() as u64), "committing the same blob twice is harmless");
    let url = store.presigned_get(&ds, Duration::from_secs(60)).await.unwrap();
    c.that(fetch(url).await.as_ref() == Some(&small), "presigned_get: a small blob's bytes");

    // Aborted or dropped writers leave nothing.
    let aborted = d("store/aborted");
    let mut w = store.begin(&aborted, None).await.unwrap();
    w.write(Bytes::from(vec![1u8; aws::PART_SIZE + 1024])).await.unwrap();
    w.abort().await.unwrap();
    c.eq(store.size(&aborted).await.unwrap(), None, "abort(): leaves nothing");
    let dropped = d("store/dropped");
    let mut w = store.begin(&dropped, None).await.unwrap();
    w.write(Bytes::from_static(b"partial")).await.unwrap();
    drop(w);
    c.eq(store.size(&dropped).await.unwrap(), None, "a dropped writer leaves nothing");
    c.that(store.uploads().await.unwrap().iter().all(|u| u.digest != aborted && u.digest != dropped), "uploads(): none left by those");

    // A suspended upload is continued from its durable point.
    let part = aws::PART_SIZE;
    let data = Bytes::from(common::images::noise(3 * part + 77, 8));
    let resumed = Digest::of(&data);
    let mut w = store.begin(&resumed, None).await.unwrap();
    c.eq(w.part_size(), part as u64, "part_size(): 8 MiB on both backends");
    w.write(data.slice(..2 * part + 5)).await.unwrap();
    let durable = w.suspend().await.unwrap().expect("two parts durable");
    c.eq(durable.offset, 2 * part as u64, "suspend(): durable up to the last whole part");
    let listed = store.uploads().await.unwrap();
    c.that(listed.iter().any(|u| u.digest == resumed && u.id == durable.upload), format!("uploads(): the suspended one: {listed:?}"));
    let cp = |offset: u64, upload: &str| Checkpoint { upload: upload.to_owned(), offset, hash: vec![] };
    let w = store.begin(&resumed, Some(&cp(3 * part as u64, &durable.upload))).await.unwrap();
    c.eq(w.offset(), 0, "begin(): a checkpoint past what is stored starts afresh");
    w.abort().await.unwrap();
    let w = store.begin(&resumed, Some(&cp(part as u64, "no-such-upload"))).await.unwrap();
    c.eq(w.offset(), 0, "begin(): an unknown upload starts afresh");
    w.abort().await.unwrap();
    // (The afresh writers above may have discarded the upload on S3; start
    // again to test the continuation.)
    let mut w = store.begin(&resumed, None).await.unwrap();
    w.write(data.slice(..2 * part + 5)).await.unwrap();
    let durable = w.suspend().await.unwrap().expect("two parts durable");
    // The sha256 state over the first `n` bytes, as a checkpoint holds it.
    let state = |n: usize| {
        use sha2::Digest as _;
        use sha2::digest::common::hazmat::SerializableState;
        let mut h = sha2::Sha256::new();
        h.update(&data[..n]);
        h.serialize().to_vec()
    };
    if backend == "FsBlobStore" {
        // Files are not synced per part: a continued file must still hash
        // to its checkpoint, or the copy starts over.
        let wrong = Checkpoint { hash: state(part), ..cp(durable.offset, &durable.upload) };
        let w = store.begin(&resumed, Some(&wrong)).await.unwrap();
        c.eq(w.offset(), 0, "begin(): a file that does not hash to its checkpoint starts afresh");
        w.abort().await.unwrap();
        let mut w = store.begin(&resumed, None).await.unwrap();
        w.write(data.slice(..2 * part + 5)).await.unwrap();
        let again = w.suspend().await.unwrap().expect("two parts durable");
        let mut w = store.begin(&resumed, Some(&Checkpoint { hash: state(2 * part), ..cp(again.offset, &again.upload) })).await.unwrap();
        c.eq(w.offset(), 2 * part as u64, "begin(): continues at the checkpoint");
        w.write(data.slice(2 * part..)).await.unwrap();
        w.commit().await.unwrap();
    } else {
        let mut w =
            store.begin(&resumed, Some(&Checkpoint { hash: state(2 * part), ..cp(durable.offset, &durable.upload) })).await.unwrap();
        c.eq(w.offset(), 2 * part as u64, "begin(): continues at the checkpoint");
        w.write(data.slice(2 * part..)).await.unwrap();
        w.commit().await.unwrap();
    }
    let url = store.presigned_get(&resumed, Duration::from_secs(60)).await.unwrap();
    c.that(fetch(url).await.as_ref() == Some(&data), "a continued upload holds every byte once, in order");
    c.that(store.uploads().await.unwrap().iter().all(|u| u.digest != resumed), "uploads(): a committed one is not listed");
    // Discarding an unfinished upload.
    let mut w = store.begin(&resumed, None).await.unwrap();
    w.write(data.slice(..part + 1)).await.unwrap();
    let durable = w.suspend().await.unwrap().expect("one part durable");
    let upload = store.uploads().await.unwrap().into_iter().find(|u| u.id == durable.upload).expect("listed");
    store.discard_upload(&upload).await.unwrap();
    store.discard_upload(&upload).await.unwrap();
    c.that(store.uploads().await.unwrap().iter().all(|u| u.id != durable.upload), "discard_upload(): gone, twice is fine");
    let w = store.begin(&resumed, Some(&cp(durable.offset, &durable.upload))).await.unwrap();
    c.eq(w.offset(), 0, "begin(): a discarded upload starts afresh");
    w.abort().await.unwrap();

    store.delete(&ds).await.unwrap();
    c.eq(store.size(&ds).await.unwrap(), None, "delete(): gone");
    store.delete(&ds).await.unwrap();
    let other = Bytes::from_static(b"another blob");
    let dother = Digest::of(&other);
    write(store, &dother, &other).await;
    store.delete_many(&[big.clone(), ds.clone(), dother.clone(), d("store/never")]).await.unwrap();
    for x in [&big, &dother] {
        c.eq(store.size(x).await.unwrap(), None, format!("delete_many(): {x} gone, missing ones are fine"));
    }
    c.finish();
}

// ---------------------------------------------------------------------------
// The backends.

fn sqlite(dir: &tempfile::TempDir) -> SqliteIndex {
    SqliteIndex::open(&dir.path().join("index.db")).unwrap()
}

/// A table and bucket of their own in the shared moto, made by aws-setup's code.
async fn aws_storage(name: &str) -> aws::AwsStorage {
    let storage = common::moto::storage_at(shared_moto::url(), &format!("{name}-bucket"), &format!("{name}-table")).await;
    assert!(aws::setup(&storage).await.unwrap().1, "aws-setup creates the table");
    // (S3 in us-east-1, moto too, answers a second CreateBucket of one's own bucket with 200.)
    assert!(!aws::setup(&storage).await.unwrap().1, "aws-setup run twice is harmless: the table is kept");
    storage
}

async fn dynamo(name: &str) -> aws::DynamoIndex {
    aws::connect(&aws_storage(name).await, aws::SdkRole::Serve).await.1
}

/// Caches as a warm instance does; tags stored with a recent `checked_at`
/// are served from it.
fn cached<I: Index>(index: I) -> CachedIndex<I> {
    CachedIndex::new(index, 1000, Duration::from_secs(600))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_keeps_the_index_contract() {
    let dir = tempfile::tempdir().unwrap();
    index_contract(&sqlite(&dir), "SqliteIndex").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_keeps_the_index_contract() {
    index_contract(&dynamo("dynamo").await, "DynamoIndex").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_over_sqlite_keeps_the_index_contract() {
    let dir = tempfile::tempdir().unwrap();
    index_contract(&cached(sqlite(&dir)), "CachedIndex<SqliteIndex>").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_over_dynamodb_keeps_the_index_contract() {
    index_contract(&cached(dynamo("cached-dynamo").await), "CachedIndex<DynamoIndex>").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_files_keep_the_blob_store_contract() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsBlobStore::open(dir.path()).unwrap();
    // The mirror serves these URLs itself: check the signature as its route
    // does, then read the file it names.
    let fetch: Fetch = Box::new(|url: String| {
        let store = &store;
        Box::pin(async move {
            let (path, query) = url.strip_prefix(BLOB_URL_PREFIX)?.split_once('?')?;
            let digest = Digest::parse(&format!("sha256:{path}")).ok()?;
            let q: BTreeMap<&str, &str> = query.split('&').filter_map(|kv| kv.split_once('=')).collect();
            let expires: i64 = q.get("expires")?.parse().ok()?;
            store.verify(&digest, expires, q.get("sig")?).then_some(())?;
            tokio::fs::read(store.path(&digest)).await.ok().map(Bytes::from)
        })
    });
    blob_store_contract(&store, fetch, "FsBlobStore").await;
    assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0, "no temporary files left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_keeps_the_blob_store_contract() {
    let (store, _) = aws::connect(&aws_storage("s3").await, aws::SdkRole::Serve).await;
    let fetch: Fetch = Box::new(|url: String| {
        Box::pin(async move {
            let resp = reqwest::get(&url).await.ok()?;
            resp.status().is_success().then_some(())?;
            resp.bytes().await.ok()
        })
    });
    blob_store_contract(&store, fetch, "S3BlobStore").await;
}

/// `--sse` as the command line and the Lambda variables give it: each
/// object, put whole (PutObject) or in parts (CreateMultipartUpload), is
/// stored with that encryption and KMS key, as S3 reports on HeadObject.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_objects_are_encrypted_as_configured() {
    use aws_sdk_s3::types::ServerSideEncryption::{Aes256, AwsKms};
    let mut storage = aws_storage("sse").await;
    let (s3, _) = aws::clients(storage.sdk.as_ref().unwrap(), aws::SdkRole::Serve);
    let key = "arn:aws:kms:us-east-1:123456789012:key/0a1b2c3d-hubcap-test";
    let cases = [(vec!["--sse", "AES256"], Aes256, None), (vec!["--sse", "aws:kms", "--sse-kms-key-id", key], AwsKms, Some(key))];
    for (seed, (flags, sse, kms_key)) in cases.into_iter().enumerate() {
        let args = [&["hubcap", "--bucket", "b", "--table", "t"][..], &flags].concat();
        let settings = <hubcap::config::LambdaSettings as clap::Parser>::try_parse_from(args).unwrap();
        storage.encryption = settings.aws.storage().unwrap().encryption;
        let (store, _) = aws::connect(&storage, aws::SdkRole::Serve).await;
        for size in [1000usize, aws::PART_SIZE + 1024] {
            let data = Bytes::from(common::images::noise(size, size as u64 + seed as u64));
            let digest = Digest::of(&data);
            write(&store, &digest, &data).await;
            let head = s3.head_object().bucket(&storage.bucket).key(aws::blob_key(&digest)).send().await.unwrap();
            assert_eq!(head.server_side_encryption(), Some(&sse), "{flags:?}, {size} bytes");
            assert_eq!(head.ssekms_key_id(), kms_key, "{flags:?}, {size} bytes");
        }
    }
}
