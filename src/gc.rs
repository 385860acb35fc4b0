//! Lifecycle: which cached images go, and the sweep that removes them.
//!
//! An image is a tag, or a manifest pulled by digest, in one repository. It
//! is kept while it was pulled within `unused_for`, or while a pin matches
//! it; with a size cap, kept images are evicted least recently pulled first
//! until what they reference fits. A kept image keeps its manifest, the
//! platform manifests of an index, and every blob those reference.
//!
//! The sweep reads the whole index page by page, decides, then writes in an
//! order that is safe at every step, so a sweep cut off anywhere (a Lambda
//! timeout, a crash, `max_writes`) leaves a consistent cache and the next
//! run finishes the job:
//! 1. tags and repository manifests, each deleted only if not pulled since
//!    the sweep read it (a conditional write);
//! 2. manifests no repository holds any more: their blobs are marked used
//!    first, so a client that got the manifest just before has the grace
//!    period to fetch them;
//! 3. blobs no remaining manifest references and unused for `grace`:
//!    `deleting` (from then on no reader serves them; a reader that marks a
//!    blob used first wins and the blob stays), then the bytes, then the
//!    record.
//!
//! Knows the storage traits and OCI manifests, not a backend.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;

use serde::Serialize;

use crate::access::{glob, normalise_pattern};
use crate::oci::{Digest, parse_manifest};
use crate::storage::{BlobRecord, BlobState, BlobStore, Entry, Index, Result, StorageError, TagRecord, now};

/// Blobs marked `deleting`, then deleted, per batch.
const BATCH: usize = 100;
/// Images listed in the oldest / least recently pulled tables.
const LISTED: usize = 10;

/// A pin: `REPO[:TAG]`, each part a pattern with `*`. A pin without a tag
/// keeps everything in the matching repositories.
#[derive(Clone, Debug)]
pub struct Pin {
    repo: String,
    tag: Option<String>,
}

impl Pin {
    pub fn parse(s: &str) -> Result<Pin, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty pin".into());
        }
        let slash = s.rfind('/').map_or(0, |i| i + 1);
        let (repo, tag) = match s[slash..].rfind(':') {
            Some(i) => (&s[..slash + i], Some(s[slash + i + 1..].to_owned())),
            None => (s, None),
        };
        Ok(Pin { repo: normalise_pattern(repo), tag })
    }

    fn matches(&self, repo: &str, tag: Option<&str>) -> bool {
        glob(&self.repo, repo)
            && match (&self.tag, tag) {
                (None, _) => true,
                (Some(p), Some(t)) => glob(p, t),
                (Some(_), None) => false,
            }
    }
}

/// The points between a sweep's phases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The index is read; nothing written yet.
    Read,
    /// Images expired.
    ImagesExpired,
    /// Unheld manifests deleted (their blobs marked used first).
    ManifestsDeleted,
    /// A batch of blobs marked `deleting`; their bytes are still there.
    BlobsMarked,
}

/// Awaited at every `Step`: lets a test interleave pulls with a sweep at
/// exact points (a production sweep has none).
#[derive(Clone)]
pub struct Pause(pub Arc<dyn Fn(Step) -> BoxFuture<'static, ()> + Send + Sync>);

impl std::fmt::Debug for Pause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pause")
    }
}

async fn pause(opts: &GcOptions, step: Step) {
    if let Some(p) = &opts.pause {
        (p.0)(step).await;
    }
}

#[derive(Clone, Debug)]
pub struct GcOptions {
    /// Images not pulled for this long expire.
    pub unused_for: Duration,
    /// Unreferenced blobs are deleted once unused for this long.
    pub grace: Duration,
    pub pins: Vec<Pin>,
    /// Evict least recently pulled images until the kept ones reference at
    /// most this many bytes.
    pub max_bytes: Option<u64>,
    /// Decide and report; write nothing.
    pub dry_run: bool,
    /// How long a blob marked `deleting` is this sweep's alone.
    pub delete_lease: Duration,
    /// Stop (cleanly, to be finished by the next run) at this instant...
    pub deadline: Option<Instant>,
    /// ...or after this many writes.
    pub max_writes: Option<u64>,
    pub pause: Option<Pause>,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            unused_for: Duration::from_secs(30 * 86400),
            grace: Duration::from_secs(86400),
            pins: Vec::new(),
            max_bytes: None,
            dry_run: false,
            delete_lease: Duration::from_secs(15 * 60),
            deadline: None,
            max_writes: None,
            pause: None,
        }
    }
}

/// One image, as the statistics list it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ImageInfo {
    /// `registry/name:tag` or `registry/name@digest`.
    pub image: String,
    /// When it was first cached (its manifest stored).
    pub cached_at: i64,
    /// When a client last pulled it.
    pub pulled_at: i64,
    /// Bytes of the blobs it references.
    pub bytes: u64,
}

/// What the cache holds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Inventory {
    pub images: usize,
    pub manifests: usize,
    pub blobs: usize,
    pub bytes: u64,
    /// Cached longest first.
    pub oldest: Vec<ImageInfo>,
    /// Pulled least recently first.
    pub least_recently_pulled: Vec<ImageInfo>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    /// False when the sweep stopped early (deadline or write budget); the
    /// next run finishes it.
    pub complete: bool,
    /// Images expired (or, in a dry run, that would be).
    pub expired: Vec<String>,
    /// Images evicted to fit the size cap (included in `expired`).
    pub evicted: usize,
    pub deleted_manifests: usize,
    pub deleted_blobs: usize,
    pub reclaimed_bytes: u64,
    /// Blobs nothing references any more, still inside the grace period:
    /// a later run deletes them.
    pub grace_blobs: usize,
    pub grace_bytes: u64,
    pub writes: u64,
    /// The cache as the sweep found it.
    pub before: Inventory,
}

/// The index as one sweep read it.
#[derive(Default)]
struct Snapshot {
    tags: Vec<TagRecord>,
    /// (repository, manifest) -> last pulled
    links: BTreeMap<(String, Digest), i64>,
    manifests: HashMap<Digest, Refs>,
    blobs: HashMap<Digest, BlobRecord>,
    blob_links: HashMap<Digest, Vec<String>>,
}

/// What one stored manifest references.
#[derive(Default, Clone)]
struct Refs {
    created_at: i64,
    blobs: Vec<Digest>,
    children: Vec<Digest>,
}

async fn read(index: &dyn Index) -> Result<Snapshot> {
    let mut snap = Snapshot::default();
    let mut cursor = None;
    loop {
        let page = index.scan(cursor).await?;
        for entry in page.entries {
            match entry {
                Entry::Tag(t) => snap.tags.push(t),
                Entry::ManifestLink { repo, digest, pulled_at } => {
                    snap.links.insert((repo, digest), pulled_at);
                }
                Entry::Manifest { record, created_at } => {
                    let refs = refs_of(&record, created_at);
                    snap.manifests.insert(record.digest, refs);
                }
                Entry::Blob(b) => {
                    snap.blobs.insert(b.digest.clone(), b);
                }
                Entry::BlobLink { repo, digest } => snap.blob_links.entry(digest).or_default().push(repo),
            }
        }
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    // A repository's copy can outlive the stored manifest (a sweep deleted
    // it while a pull stored it again): what it references still counts.
    // (Rare: one read per such copy.)
    let missing: Vec<(String, Digest)> = snap.links.keys().filter(|(_, d)| !snap.manifests.contains_key(d)).cloned().collect();
    for (repo, digest) in missing {
        if snap.manifests.contains_key(&digest) {
            continue;
        }
        if let Some(record) = index.manifest(&repo, &digest).await?.record {
            snap.manifests.insert(digest, refs_of(&record, 0));
        }
    }
    // So can a tag's (DynamoDB tags carry a copy).
    let missing: Vec<TagRecord> = snap.tags.iter().filter(|t| !snap.manifests.contains_key(&t.digest)).cloned().collect();
    for t in missing {
        if snap.manifests.contains_key(&t.digest) {
            continue;
        }
        if let Some((_, Some(record))) = index.tag_manifest(&t.repo, &t.tag, &t.variant).await? {
            snap.manifests.insert(t.digest.clone(), refs_of(&record, 0));
        }
    }
    Ok(snap)
}

fn refs_of(record: &crate::storage::ManifestRecord, created_at: i64) -> Refs {
    match parse_manifest(&record.body, Some(&record.media_type)) {
        Ok(info) => Refs { created_at, blobs: info.blobs.into_iter().map(|b| b.digest).collect(), children: info.manifests },
        Err(e) => {
            // Unreadable: nothing known to reference, so nothing is kept for it.
            tracing::warn!(digest = %record.digest, error = %e.message, "stored manifest unreadable");
            Refs { created_at, ..Refs::default() }
        }
    }
}

/// An image: a tag, or a manifest in a repository pulled by digest.
struct Root {
    repo: String,
    /// Some for a tag: (tag, variant).
    tag: Option<(String, String)>,
    digest: Digest,
    pulled_at: i64,
    pinned: bool,
    keep: bool,
}

impl Root {
    fn name(&self) -> String {
        match &self.tag {
            Some((t, _)) => format!("{}:{t}", self.repo),
            None => format!("{}@{}", self.repo, self.digest),
        }
    }
}

impl Snapshot {
    /// `closure`, as (repository, manifest) pairs.
    fn reach<'a>(&self, repo: &'a str, digest: &Digest) -> impl Iterator<Item = (String, Digest)> + 'a {
        self.closure(digest).into_iter().map(move |m| (repo.to_owned(), m))
    }

    /// The manifests an image holds in its repository: its own, and an
    /// index's platform manifests.
    fn closure(&self, digest: &Digest) -> Vec<Digest> {
        let mut out = vec![digest.clone()];
        let mut i = 0;
        while i < out.len() {
            if let Some(r) = self.manifests.get(&out[i]) {
                for c in &r.children {
                    if !out.contains(c) {
                        out.push(c.clone());
                    }
                }
            }
            i += 1;
        }
        out
    }

    fn blobs_of(&self, manifests: &[Digest]) -> HashSet<Digest> {
        manifests.iter().filter_map(|m| self.manifests.get(m)).flat_map(|r| r.blobs.iter().cloned()).collect()
    }

    fn ready_size(&self, d: &Digest) -> u64 {
        self.blobs.get(d).filter(|b| b.state == BlobState::Ready).and_then(|b| b.size).unwrap_or(0)
    }

    fn roots(&self, pins: &[Pin], cutoff: i64) -> Vec<Root> {
        let mut roots = Vec::new();
        for t in &self.tags {
            let pinned = pins.iter().any(|p| p.matches(&t.repo, Some(&t.tag)));
            // Unknown pull times (records older than them) count as now.
            let keep = pinned || t.pulled_at == 0 || t.pulled_at >= cutoff;
            let tag = Some((t.tag.clone(), t.variant.clone()));
            roots.push(Root { repo: t.repo.clone(), tag, digest: t.digest.clone(), pulled_at: t.pulled_at, pinned, keep });
        }
        for ((repo, digest), pulled_at) in &self.links {
            let pinned = pins.iter().any(|p| p.matches(repo, None));
            let keep = pinned || *pulled_at == 0 || *pulled_at >= cutoff;
            roots.push(Root { repo: repo.clone(), tag: None, digest: digest.clone(), pulled_at: *pulled_at, pinned, keep });
        }
        roots
    }

    /// Images as users think of them: tags (their Accept variants counted
    /// once), and manifests pulled by digest that no tag or index in their
    /// repository leads to.
    fn inventory(&self) -> Inventory {
        let mut reached: HashSet<(String, Digest)> = HashSet::new();
        let mut images: BTreeMap<String, ImageInfo> = BTreeMap::new();
        let info = |name: String, digest: &Digest, pulled_at: i64| {
            let closure = self.closure(digest);
            ImageInfo {
                image: name,
                cached_at: self.manifests.get(digest).map_or(0, |r| r.created_at),
                pulled_at,
                bytes: self.blobs_of(&closure).iter().map(|b| self.ready_size(b)).sum(),
            }
        };
        for t in &self.tags {
            reached.extend(self.reach(&t.repo, &t.digest));
            let name = format!("{}:{}", t.repo, t.tag);
            let entry = images.entry(name.clone()).or_insert_with(|| info(name, &t.digest, t.pulled_at));
            entry.pulled_at = entry.pulled_at.max(t.pulled_at);
        }
        for (repo, d) in self.links.keys() {
            if let Some(r) = self.manifests.get(d) {
                for c in &r.children {
                    reached.insert((repo.clone(), c.clone()));
                }
            }
        }
        for ((repo, d), pulled_at) in &self.links {
            if !reached.contains(&(repo.clone(), d.clone())) {
                let name = format!("{repo}@{d}");
                images.insert(name.clone(), info(name, d, *pulled_at));
            }
        }
        let ready: Vec<&BlobRecord> = self.blobs.values().filter(|b| b.state == BlobState::Ready).collect();
        let mut list: Vec<ImageInfo> = images.into_values().collect();
        let count = list.len();
        list.sort_by(|a, b| (a.pulled_at, &a.image).cmp(&(b.pulled_at, &b.image)));
        let least_recently_pulled = list.iter().take(LISTED).cloned().collect();
        list.sort_by(|a, b| (a.cached_at, &a.image).cmp(&(b.cached_at, &b.image)));
        Inventory {
            images: count,
            manifests: self.manifests.len(),
            blobs: ready.len(),
            bytes: ready.iter().filter_map(|b| b.size).sum(),
            oldest: list.into_iter().take(LISTED).collect(),
            least_recently_pulled,
        }
    }
}

/// What the cache holds, read from the index (for `hubcap stats`).
pub async fn inventory(index: &dyn Index) -> Result<Inventory> {
    Ok(read(index).await?.inventory())
}

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

/// Runs one sweep. Errors from the backend stop it (what was done stays
/// done, consistently); conditions that no longer hold are skipped.
pub async fn run(index: &dyn Index, store: &dyn BlobStore, opts: &GcOptions) -> Result<GcReport> {
    let snap = read(index).await?;
    let mut report = GcReport { dry_run: opts.dry_run, before: snap.inventory(), ..GcReport::default() };
    let mut budget = Budget { deadline: opts.deadline, max_writes: opts.max_writes, used: 0, dry_run: opts.dry_run };
    let stopped = sweep(index, store, opts, &snap, &mut report, &mut budget).await?;
    report.complete = !stopped;
    report.writes = budget.used;
    Ok(report)
}

/// True when it stopped early.
async fn sweep(
    index: &dyn Index,
    store: &dyn BlobStore,
    opts: &GcOptions,
    snap: &Snapshot,
    report: &mut GcReport,
    budget: &mut Budget,
) -> Result<bool> {
    let started = now();
    pause(opts, Step::Read).await;
    let cutoff = started - opts.unused_for.as_secs() as i64;
    let mut roots = snap.roots(&opts.pins, cutoff);

    // Size cap: evict kept, unpinned images, least recently pulled first.
    // A tag goes with the manifests it leads to that were not pulled by
    // digest since.
    let links_at: HashMap<(String, Digest), usize> =
        roots.iter().enumerate().filter(|(_, r)| r.tag.is_none()).map(|(i, r)| ((r.repo.clone(), r.digest.clone()), i)).collect();
    let reached_by_tags: HashSet<(String, Digest)> =
        roots.iter().filter(|r| r.tag.is_some()).flat_map(|r| snap.reach(&r.repo, &r.digest)).collect();
    if let Some(cap) = opts.max_bytes {
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
        let mut evict = |i: usize, roots: &mut Vec<Root>, bytes: &mut u64| {
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
            evict(i, &mut roots, &mut bytes);
            if roots[i].tag.is_some() {
                report.evicted += 1;
                for m in snap.closure(&roots[i].digest) {
                    if let Some(&j) = links_at.get(&(roots[i].repo.clone(), m))
                        && !roots[j].pinned
                        && roots[j].pulled_at <= roots[i].pulled_at
                    {
                        evict(j, &mut roots, &mut bytes);
                    }
                }
            } else if !reached_by_tags.contains(&(roots[i].repo.clone(), roots[i].digest.clone())) {
                report.evicted += 1;
            }
        }
    }

    // 1. Images.
    let mut kept_links: HashSet<(String, Digest)> = HashSet::new();
    let mut kept_tag_targets: HashSet<Digest> = HashSet::new();
    for r in roots.iter().filter(|r| r.keep) {
        kept_links.extend(snap.reach(&r.repo, &r.digest));
        if r.tag.is_some() {
            kept_tag_targets.insert(r.digest.clone());
        }
    }
    // Unknown pull times are stamped now (records from before they were kept).
    for r in roots.iter().filter(|r| r.pulled_at == 0 && !opts.dry_run) {
        if !budget.take() {
            return Ok(true);
        }
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
        if !budget.take() {
            return Ok(true);
        }
        if opts.dry_run || index.expire_tag(&r.repo, t, v, &r.digest, r.pulled_at + 1).await? {
            report.expired.push(r.name());
            expired_reach.extend(snap.reach(&r.repo, &r.digest));
        } else {
            // Pulled, or moved, meanwhile: it stays, with what it leads to now.
            let digest = index.tag(&r.repo, t, v).await?.map_or_else(|| r.digest.clone(), |now| now.digest);
            kept_links.extend(snap.reach(&r.repo, &digest));
            kept_tag_targets.insert(digest);
        }
    }
    let mut remaining_links: HashSet<(String, Digest)> = HashSet::new();
    for r in roots.iter().filter(|r| r.tag.is_none()) {
        let key = (r.repo.clone(), r.digest.clone());
        if kept_links.contains(&key) {
            remaining_links.insert(key);
            continue;
        }
        if !budget.take() {
            return Ok(true);
        }
        if opts.dry_run || index.expire_manifest_link(&r.repo, &r.digest, r.pulled_at + 1).await? {
            if !expired_reach.contains(&key) {
                report.expired.push(r.name());
            }
        } else {
            remaining_links.insert(key);
        }
    }

    pause(opts, Step::ImagesExpired).await;

    // 2. Manifests no repository holds any more.
    let held: HashSet<&Digest> = remaining_links.iter().map(|(_, d)| d).chain(kept_tag_targets.iter()).collect();
    let mut gone: HashSet<Digest> = HashSet::new();
    let mut stamped: HashSet<Digest> = HashSet::new();
    for (digest, refs) in &snap.manifests {
        if held.contains(digest) {
            continue;
        }
        let ready: Vec<&Digest> = refs.blobs.iter().filter(|b| snap.blobs.get(*b).is_some_and(|r| r.state == BlobState::Ready)).collect();
        if !budget.fits(ready.len() as u64 + 1) {
            return Ok(true);
        }
        if !opts.dry_run {
            for b in ready {
                if !budget.take() {
                    return Ok(true);
                }
                index.touch_blob(b, None).await?;
                stamped.insert(b.clone());
            }
        } else {
            stamped.extend(refs.blobs.iter().cloned());
        }
        if !budget.take() {
            return Ok(true);
        }
        if opts.dry_run || index.delete_manifest(digest).await? {
            report.deleted_manifests += 1;
            gone.insert(digest.clone());
        }
    }

    pause(opts, Step::ManifestsDeleted).await;

    // 3. Blobs nothing references, unused for the grace period.
    let referenced: HashSet<&Digest> =
        snap.manifests.iter().filter(|(d, _)| !gone.contains(*d)).flat_map(|(_, r)| r.blobs.iter()).collect();
    let used_before = started - opts.grace.as_secs() as i64;
    let mut doomed: Vec<&BlobRecord> = Vec::new();
    for b in snap.blobs.values().filter(|b| !referenced.contains(&b.digest)) {
        let due = match b.state {
            BlobState::Ready | BlobState::Failed => !stamped.contains(&b.digest) && b.last_used() < used_before,
            BlobState::Deleting => b.lease_until < started,
            BlobState::Pending | BlobState::Fetching => false,
        };
        if due {
            doomed.push(b);
        } else if matches!(b.state, BlobState::Ready) {
            report.grace_blobs += 1;
            report.grace_bytes += b.size.unwrap_or(0);
        }
    }
    doomed.sort_by(|a, b| a.digest.as_str().cmp(b.digest.as_str()));
    let mut rest = &doomed[..];
    while !rest.is_empty() {
        // Each blob costs a mark and a finish, the batch one delete call.
        let n = (BATCH as u64).min(budget.left().saturating_sub(1) / 2) as usize;
        if n == 0 {
            return Ok(true);
        }
        let (batch, after) = rest.split_at(n.min(rest.len()));
        rest = after;
        if opts.dry_run {
            report.deleted_blobs += batch.len();
            report.reclaimed_bytes += batch.iter().filter(|b| b.state != BlobState::Failed).filter_map(|b| b.size).sum::<u64>();
            continue;
        }
        let marked_at = Instant::now();
        let mut taken = Vec::new();
        for b in batch {
            if !budget.take() {
                return Ok(true);
            }
            if index.begin_blob_delete(&b.digest, used_before, opts.delete_lease).await? {
                taken.push(*b);
            }
        }
        if taken.is_empty() {
            continue;
        }
        pause(opts, Step::BlobsMarked).await;
        // The lease is ours for `delete_lease`; never delete bytes once it
        // may have passed to a reader who fetched the blob again.
        if marked_at.elapsed() >= opts.delete_lease / 2 {
            return Err(StorageError::Unavailable("GC marked blobs too slowly to delete them safely; the next run retries".into()));
        }
        if !budget.take() {
            return Ok(true);
        }
        let digests: Vec<Digest> = taken.iter().map(|b| b.digest.clone()).collect();
        store.delete_many(&digests).await?;
        for b in taken {
            if !budget.take() {
                return Ok(true);
            }
            let repos = snap.blob_links.get(&b.digest).cloned().unwrap_or_default();
            index.finish_blob_delete(&b.digest, &repos).await?;
            report.deleted_blobs += 1;
            if b.state != BlobState::Failed {
                report.reclaimed_bytes += b.size.unwrap_or(0);
            }
        }
    }
    Ok(false)
}

/// The report as text for a terminal.
pub fn render(r: &GcReport) -> String {
    use std::fmt::Write as _;
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / 1048576.0);
    let (would, verb) = if r.dry_run { ("would be ", "would reclaim") } else { ("", "reclaimed") };
    let mut out = String::new();
    if r.dry_run {
        out.push_str("dry run: nothing was changed\n");
    }
    let _ = writeln!(out, "cache before: {} images, {} blobs, {}", r.before.images, r.before.blobs, mib(r.before.bytes));
    let _ = writeln!(out, "{} images {would}expired ({} to fit the size cap):", r.expired.len(), r.evicted);
    for name in &r.expired {
        let _ = writeln!(out, "  {name}");
    }
    let _ =
        writeln!(out, "{} manifests and {} blobs {would}deleted: {verb} {}", r.deleted_manifests, r.deleted_blobs, mib(r.reclaimed_bytes));
    let _ = writeln!(out, "{} blobs ({}) unreferenced, deleted once the grace period has passed", r.grace_blobs, mib(r.grace_bytes));
    if !r.complete {
        let _ = writeln!(out, "stopped early after {} writes: the next run finishes the sweep", r.writes);
    }
    out
}

/// Parses a duration such as `30d`, `12h`, `90m`, `45s` or `0`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("invalid duration {s:?} (e.g. 30d, 12h, 90m, 45s)"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        "w" => n * 7.0 * 86400.0,
        _ => return Err(format!("invalid duration unit in {s:?} (s, m, h, d or w)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("invalid duration {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses a size such as `500G`, `2T`, `750M` or a byte count.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("invalid size {s:?} (e.g. 500G)"))?;
    let mult: f64 = match unit.trim_end_matches(['i', 'B']).to_ascii_uppercase().as_str() {
        "" => 1.0,
        "K" => 1024.0,
        "M" => 1024.0 * 1024.0,
        "G" => 1024.0 * 1024.0 * 1024.0,
        "T" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(format!("invalid size unit in {s:?} (K, M, G or T)")),
    };
    Ok((n * mult) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_match_repositories_and_tags() {
        let p = Pin::parse("library/alpine:3.*").unwrap();
        assert!(p.matches("docker.io/library/alpine", Some("3.20")));
        assert!(!p.matches("docker.io/library/alpine", Some("edge")));
        assert!(!p.matches("docker.io/library/alpine", None), "a tag pin does not keep digest pulls");
        let all = Pin::parse("ghcr.io/acme/*").unwrap();
        assert!(all.matches("ghcr.io/acme/tool", Some("v1")) && all.matches("ghcr.io/acme/tool", None));
        let port = Pin::parse("localhost:5000/team/app").unwrap();
        assert!(port.matches("localhost:5000/team/app", Some("x")));
        assert!(Pin::parse(" ").is_err());
    }

    #[test]
    fn durations_and_sizes_parse() {
        assert_eq!(parse_duration("30d").unwrap(), Duration::from_secs(30 * 86400));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("3 parsecs").is_err() && parse_duration("-1d").is_err());
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("5 apples").is_err());
    }
}
