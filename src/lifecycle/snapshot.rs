//! The index as one sweep reads it (page by page), the images it holds
//! (tags, and manifests pulled by digest), what each image reaches, and the
//! inventory built from it.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use super::{LISTED, Pin};
use crate::oci::{Digest, parse_manifest};
use crate::storage::{BlobRecord, BlobState, Entry, Index, Result, TagRecord};

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

/// The index as one sweep read it.
#[derive(Default)]
pub(super) struct Snapshot {
    pub(super) tags: Vec<TagRecord>,
    /// (repository, manifest) -> last pulled
    pub(super) links: BTreeMap<(String, Digest), i64>,
    pub(super) manifests: HashMap<Digest, Refs>,
    pub(super) blobs: HashMap<Digest, BlobRecord>,
    pub(super) blob_links: HashMap<Digest, Vec<String>>,
}

/// What one stored manifest references.
#[derive(Default, Clone)]
pub(super) struct Refs {
    pub(super) created_at: i64,
    pub(super) blobs: Vec<Digest>,
    pub(super) children: Vec<Digest>,
}

pub(super) async fn read(index: &dyn Index) -> Result<Snapshot> {
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
pub(super) struct Root {
    pub(super) repo: String,
    /// Some for a tag: (tag, variant).
    pub(super) tag: Option<(String, String)>,
    pub(super) digest: Digest,
    pub(super) pulled_at: i64,
    pub(super) pinned: bool,
    pub(super) keep: bool,
}

impl Root {
    pub(super) fn name(&self) -> String {
        match &self.tag {
            Some((t, _)) => format!("{}:{t}", self.repo),
            None => format!("{}@{}", self.repo, self.digest),
        }
    }
}

impl Snapshot {
    /// `closure`, as (repository, manifest) pairs.
    pub(super) fn reach<'a>(&self, repo: &'a str, digest: &Digest) -> impl Iterator<Item = (String, Digest)> + 'a {
        self.closure(digest).into_iter().map(move |m| (repo.to_owned(), m))
    }

    /// The manifests an image holds in its repository: its own, and an
    /// index's platform manifests.
    pub(super) fn closure(&self, digest: &Digest) -> Vec<Digest> {
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

    pub(super) fn blobs_of(&self, manifests: &[Digest]) -> HashSet<Digest> {
        manifests.iter().filter_map(|m| self.manifests.get(m)).flat_map(|r| r.blobs.iter().cloned()).collect()
    }

    pub(super) fn ready_size(&self, d: &Digest) -> u64 {
        self.blobs.get(d).filter(|b| b.state == BlobState::Ready).and_then(|b| b.size).unwrap_or(0)
    }

    pub(super) fn roots(&self, pins: &[Pin], cutoff: i64) -> Vec<Root> {
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
    pub(super) fn inventory(&self) -> Inventory {
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
