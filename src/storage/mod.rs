//! The two storage contracts of the mirror, `BlobStore` (content-addressed
//! bytes) and `Index` (tags, manifests, repository links and blob states),
//! plus the records they hold. The shapes fit both backends: the embedded one
//! (files + SQLite, `local`) and the AWS one (S3 presigned URLs and multipart
//! uploads, DynamoDB conditional writes).
//!
//! Lifecycle rests on three timestamps the mirror keeps: a tag's and a
//! repository's manifest's `pulled_at` (last served), and a blob's `used_at`
//! (last served, or referenced by a manifest being stored or expired). GC
//! expires what was not pulled and deletes a blob only through the
//! `deleting` state, so no reader is ever sent to bytes that are gone.
//!
//! Nothing here knows HTTP or upstream registries.

pub mod aws;
pub mod cached;
pub mod clock;
pub mod local;

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::oci::{Descriptor, Digest};

/// The `last_error` of a blob found `ready` whose stored bytes were gone.
pub const LOST: &str = "the stored blob was missing; fetching it again";

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("index: {0}")]
    Index(String),
    #[error("storage backend unavailable: {0}")]
    Unavailable(String),
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// Seconds since the Unix epoch: the clock every record uses (`clock`).
pub fn now() -> i64 {
    clock::now()
}

/// A tag as last seen upstream. `variant` is empty for the manifest upstream
/// returns to a client accepting every type; otherwise it is the key of the
/// narrower Accept set that produced it (see `oci::Accept::key`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagRecord {
    pub repo: String,
    pub tag: String,
    pub variant: String,
    pub digest: Digest,
    pub media_type: String,
    /// When upstream last confirmed this digest for the tag.
    pub checked_at: i64,
    /// When a client last pulled it (0: unknown).
    pub pulled_at: i64,
}

/// A manifest exactly as upstream sent it; its digest is of these bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestRecord {
    pub digest: Digest,
    pub media_type: String,
    pub body: Bytes,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobState {
    /// Known and wanted; the fetcher has not claimed it yet.
    Pending,
    /// Being copied from upstream.
    Fetching,
    /// Stored, verified, servable.
    Ready,
    /// The last copy failed; a later request may retry it.
    Failed,
    /// GC is deleting it: not servable, not fetchable until GC is done or
    /// its lease (`lease_until`) has run out.
    Deleting,
}

impl BlobState {
    pub fn as_str(self) -> &'static str {
        match self {
            BlobState::Pending => "pending",
            BlobState::Fetching => "fetching",
            BlobState::Ready => "ready",
            BlobState::Failed => "failed",
            BlobState::Deleting => "deleting",
        }
    }
    pub fn parse(s: &str) -> Option<BlobState> {
        Some(match s {
            "pending" => BlobState::Pending,
            "fetching" => BlobState::Fetching,
            "ready" => BlobState::Ready,
            "failed" => BlobState::Failed,
            "deleting" => BlobState::Deleting,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobRecord {
    pub digest: Digest,
    pub state: BlobState,
    pub size: Option<u64>,
    /// The repository (`registry/name`) the fetcher copies it from.
    pub source: String,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub updated_at: i64,
    /// When it was last served or referenced (0: unknown, see `updated_at`).
    pub used_at: i64,
    /// End of the current fetch or delete lease (0: none).
    pub lease_until: i64,
    /// Where an interrupted copy stands, for the next one to continue.
    pub checkpoint: Option<Checkpoint>,
}

/// How far an interrupted copy got: the store's upload it wrote to, the
/// bytes from the blob's start that upload holds durably, and the sha256
/// state over exactly those bytes. The fetcher holding the blob's lease
/// saves it; the next holder continues from it instead of byte 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub upload: String,
    pub offset: u64,
    /// The serialised sha256 state (`sha2`'s `SerializableState`).
    pub hash: Vec<u8>,
}

impl Checkpoint {
    /// One string for an index attribute: `offset:hexstate:upload` (the
    /// upload id last: it may hold any character).
    pub fn encode(&self) -> String {
        format!("{}:{}:{}", self.offset, hex::encode(&self.hash), self.upload)
    }

    pub fn decode(s: &str) -> Option<Checkpoint> {
        let mut it = s.splitn(3, ':');
        let offset = it.next()?.parse().ok()?;
        let hash = hex::decode(it.next()?).ok()?;
        let upload = it.next().filter(|u| !u.is_empty())?.to_owned();
        Some(Checkpoint { upload, offset, hash })
    }
}

/// An upload the store holds that was never completed, for GC to abort
/// when no blob record's checkpoint names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upload {
    pub digest: Digest,
    pub id: String,
    /// When it was started (or, on files, last written): Unix seconds.
    pub started: i64,
}

impl BlobRecord {
    /// When it was last of use, as GC judges it.
    pub fn last_used(&self) -> i64 {
        if self.used_at > 0 { self.used_at } else { self.updated_at }
    }
}

/// What the index knows of one digest as seen from one repository.
#[derive(Clone, Debug, Default)]
pub struct Linked<T> {
    /// The repository is known to contain the digest.
    pub linked: bool,
    pub record: Option<T>,
    /// For a manifest linked to the repository: when a client last pulled
    /// it there (0: unknown).
    pub pulled_at: i64,
}

/// One item of the index, as a GC or statistics sweep reads it.
#[derive(Clone, Debug)]
pub enum Entry {
    Tag(TagRecord),
    /// A repository's manifest.
    ManifestLink {
        repo: String,
        digest: Digest,
        pulled_at: i64,
    },
    /// A stored manifest, and when it was first stored.
    Manifest {
        record: ManifestRecord,
        created_at: i64,
    },
    Blob(BlobRecord),
    /// A repository's blob.
    BlobLink {
        repo: String,
        digest: Digest,
    },
}

/// One page of a sweep; `next` resumes it.
#[derive(Debug, Default)]
pub struct ScanPage {
    pub entries: Vec<Entry>,
    pub next: Option<String>,
}

/// Request counters kept in the index across restarts and instances.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoredStats {
    /// Requests by cache result (`hit`, `miss`, `stale`, ...), and
    /// `upstream_requests`, `upstream_rate_limited`.
    pub counters: std::collections::BTreeMap<String, u64>,
    /// The last `ratelimit-remaining` an upstream reported, and when.
    pub ratelimit_remaining: Option<(i64, i64)>,
}

/// The index: tags, manifests, repository links, blob states, pull marks
/// and request counters, as four roles so each caller sees only what it
/// uses (the `Mirror` serves and queues fetches, a `Fetcher` moves blob
/// states, the lifecycle sweep reads and deletes, statistics add up).
/// `Index` is all four, which every backend implements.
///
/// Writes that decide who does work are conditional (`create_pending_blob`,
/// `claim_blob`, the lifecycle's expiry and delete steps): only the first
/// caller wins, so any number of concurrent misses enqueue one fetch.
/// Timestamps are Unix seconds (`now()`).
pub trait Index: ServeIndex + FetchIndex + SweepIndex + StatsIndex {}

impl<T: ServeIndex + FetchIndex + SweepIndex + StatsIndex + ?Sized> Index for T {}

/// What serving reads and writes: tags, manifests, links, blob records,
/// and the pull and use marks a pull leaves for lifecycle.
#[async_trait]
pub trait ServeIndex: Send + Sync {
    async fn tag(&self, repo: &str, tag: &str, variant: &str) -> Result<Option<TagRecord>>;

    /// The tag and the manifest it leads to, in as few reads as the backend
    /// allows. A tag is itself its repository's link to that manifest: the
    /// manifest comes with it even after a sweep expired the repository's
    /// by-digest link (DynamoDB's tag items carry a copy).
    async fn tag_manifest(&self, repo: &str, tag: &str, variant: &str) -> Result<Option<(TagRecord, Option<ManifestRecord>)>> {
        let Some(t) = self.tag(repo, tag, variant).await? else { return Ok(None) };
        let m = self.manifest(repo, &t.digest).await?;
        Ok(Some((t, m.record)))
    }

    /// Points the tag at `manifest` (already stored with `put_manifest`).
    async fn put_tag(&self, tag: &TagRecord, manifest: &ManifestRecord) -> Result<()>;
    async fn touch_tag(&self, repo: &str, tag: &str, variant: &str, checked_at: i64) -> Result<()>;
    async fn delete_tag(&self, repo: &str, tag: &str, variant: &str) -> Result<()>;

    /// The manifest with this digest, and whether `repo` is linked to it.
    async fn manifest(&self, repo: &str, digest: &Digest) -> Result<Linked<ManifestRecord>>;

    /// Stores a manifest and links it to `repo`. For an image manifest, also
    /// links its config and layers to `repo` and records each blob not yet
    /// known as `pending` (sourced from `repo`, with the size the manifest
    /// declares: the fetcher checks it, reads large blobs in ranges and can
    /// continue a copy cut off). Returns the blobs this call made pending:
    /// exactly the ones the caller must enqueue.
    ///
    /// SQLite does it in one transaction. DynamoDB does it as ordered writes
    /// (each blob's link and conditional pending write, then the manifest
    /// item, then `repo`'s copy): a crash part-way leaves blobs known (and
    /// maybe pending) without the manifest, never a manifest whose blobs are
    /// unknown, and the next miss of the manifest finishes the job.
    async fn put_manifest(&self, repo: &str, manifest: &ManifestRecord, blobs: &[Descriptor]) -> Result<Vec<Digest>>;

    /// Records that `repo` contains `digest` (checked upstream).
    async fn link(&self, repo: &str, digest: &Digest) -> Result<()>;

    /// The blob's record, and whether `repo` is linked to it.
    async fn blob(&self, repo: &str, digest: &Digest) -> Result<Linked<BlobRecord>>;

    /// The blob's record alone, read from the index (no cache): what a
    /// request waiting on a copy polls, one read each time.
    async fn blob_record(&self, digest: &Digest) -> Result<Option<BlobRecord>> {
        Ok(self.blob("", digest).await?.record)
    }

    /// Records a pull of the tag (if it still exists).
    async fn tag_pulled(&self, repo: &str, tag: &str, variant: &str) -> Result<()>;

    /// Records a pull of the manifest in `repo`. False when it is no longer
    /// linked there (GC expired it).
    async fn manifest_pulled(&self, repo: &str, digest: &Digest) -> Result<bool>;

    /// Marks a `ready` blob used now (served through `via`, or referenced).
    /// False when it is not ready any more: GC is deleting it or did. A
    /// reader that gets false must not hand out the blob's URL.
    async fn touch_blob(&self, digest: &Digest, via: Option<&str>) -> Result<bool>;
}

/// The fetch queue's states: `pending` (queued), `fetching` (claimed under
/// a lease), `ready`, `failed`.
#[async_trait]
pub trait FetchIndex: Send + Sync {
    /// Makes the blob `pending` if it is unknown, `failed`, or `deleting`
    /// under an expired lease (a sweep that died). True when this call did
    /// so (the caller then enqueues it).
    async fn create_pending_blob(&self, digest: &Digest, source: &str, size: Option<u64>) -> Result<bool>;

    /// Takes the fetch of a blob: succeeds when it is `pending` or `failed`,
    /// or `fetching` under an expired lease; the blob is then `fetching`
    /// under a lease that ends `lease` from now (`lease_until`, on both
    /// backends). At most one fetcher holds a blob at a time.
    async fn claim_blob(&self, digest: &Digest, lease: Duration) -> Result<bool>;

    /// Moves a known blob to `state` (never over `deleting`; a `ready` blob
    /// only to `ready`: its bytes are stored, verified, and a copy that ends
    /// later, failed or not, changes nothing).
    async fn set_blob_state(&self, digest: &Digest, state: BlobState, size: Option<u64>, error: Option<&str>) -> Result<()>;

    /// Blobs left `pending` or `fetching` (for example by a restart).
    async fn unfinished_blobs(&self) -> Result<Vec<BlobRecord>>;

    /// Puts a blob whose fetch seems lost back in the queue: `pending` with
    /// no write for longer than `stale` (`updated_at`), or `fetching` under
    /// an expired lease (`lease_until`), on both backends. The write
    /// itself re-triggers the fetcher where the index is the queue. True when
    /// this call re-queued it.
    async fn requeue_stale_blob(&self, digest: &Digest, stale: Duration) -> Result<bool>;

    /// A `ready` blob whose stored bytes are gone goes back to `pending`
    /// (its size kept), to be fetched again; where the index is the queue,
    /// the write itself runs the fetcher. `repos` are those known to link it
    /// (an index that copies readiness onto links clears it there). True
    /// when this call did so (never over a GC delete in progress).
    async fn mark_blob_lost(&self, digest: &Digest, repos: &[String]) -> Result<bool>;

    /// The checkpoint the blob's last interrupted copy left, if any.
    async fn blob_checkpoint(&self, digest: &Digest) -> Result<Option<Checkpoint>>;

    /// Saves the copy's progress (`Some`), only while the blob is
    /// `fetching` (its lease holder's); `None` forgets it. Storing the blob
    /// `ready` forgets it too.
    async fn save_checkpoint(&self, digest: &Digest, checkpoint: Option<&Checkpoint>) -> Result<()>;
}

/// What a lifecycle sweep reads and deletes, each step conditional on what
/// the sweep read (see `lifecycle`).
#[async_trait]
pub trait SweepIndex: Send + Sync {
    /// One page of everything the index holds, from `cursor` (None: start).
    async fn scan(&self, cursor: Option<String>) -> Result<ScanPage>;

    /// Deletes the tag if it still points at `digest` and was last pulled
    /// before `pulled_before`.
    async fn expire_tag(&self, repo: &str, tag: &str, variant: &str, digest: &Digest, pulled_before: i64) -> Result<bool>;

    /// Unlinks the manifest from `repo` if it was last pulled there before
    /// `pulled_before`.
    async fn expire_manifest_link(&self, repo: &str, digest: &Digest, pulled_before: i64) -> Result<bool>;

    /// Deletes a stored manifest that no repository links any more. The
    /// caller has touched its blobs first, so they outlive it by GC's grace.
    async fn delete_manifest(&self, digest: &Digest) -> Result<bool>;

    /// First step of deleting a blob: `ready` or `failed` and last used
    /// before `used_before` (or `deleting` under an expired lease) becomes
    /// `deleting` under a lease of `lease`. From then on no reader serves
    /// it. True when this call took it.
    async fn begin_blob_delete(&self, digest: &Digest, used_before: i64, lease: Duration) -> Result<bool>;

    /// Last step, once the bytes are gone: removes the `deleting` record and
    /// the blob's links (`repos`: the repositories the sweep saw linking it).
    async fn finish_blob_delete(&self, digest: &Digest, repos: &[String]) -> Result<()>;
}

/// Request counters every instance adds to.
#[async_trait]
pub trait StatsIndex: Send + Sync {
    /// Adds to the stored request counters and records the last
    /// `ratelimit-remaining` seen.
    async fn add_stats(&self, delta: &StoredStats) -> Result<()>;
    async fn stats(&self) -> Result<StoredStats>;
}

/// Content-addressed blob bytes.
#[async_trait]
pub trait BlobStore: Send + Sync {
    /// Size of the stored blob, if it is stored.
    async fn size(&self, digest: &Digest) -> Result<Option<u64>>;

    /// A URL from which a client can GET the blob for `ttl`, made without a
    /// network call. May be relative to the mirror's own origin.
    async fn presigned_get(&self, digest: &Digest, ttl: Duration) -> Result<String>;

    /// Starts writing a blob, or continues the upload a checkpoint names
    /// (`resume`) when the store still holds it whole up to its offset (the
    /// writer's `offset` says where it continues from: 0 when it could
    /// not). Nothing is visible until `commit`; an aborted writer leaves
    /// nothing behind, a suspended one its durable part.
    async fn begin(&self, digest: &Digest, resume: Option<&Checkpoint>) -> Result<Box<dyn BlobWriter>>;

    /// Uploads started and never completed or aborted.
    async fn uploads(&self) -> Result<Vec<Upload>>;

    /// Aborts an unfinished upload (gone already is fine).
    async fn discard_upload(&self, upload: &Upload) -> Result<()>;

    async fn delete(&self, digest: &Digest) -> Result<()>;

    /// Whether the blob is stored, when the backend can tell without a
    /// network call (a local file); `None` when it cannot (S3: GC's audit
    /// lists the bucket instead).
    async fn stored_here(&self, _digest: &Digest) -> Option<bool> {
        None
    }

    /// Every stored blob, for GC's audit of `ready` records.
    async fn stored_digests(&self) -> Result<std::collections::HashSet<Digest>>;

    /// Deletes many blobs (missing ones are fine), in as few calls as the
    /// backend allows.
    async fn delete_many(&self, digests: &[Digest]) -> Result<()> {
        for d in digests {
            self.delete(d).await?;
        }
        Ok(())
    }
}

/// How much of an upload is durable: the upload's id and the bytes from
/// the blob's start it holds, a multiple of the writer's `part_size`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Durable {
    pub upload: String,
    pub offset: u64,
}

/// An in-progress blob upload. The caller verifies the bytes (digest and
/// size) before it calls `commit`.
#[async_trait]
pub trait BlobWriter: Send {
    /// Where this writer continues from: 0, or a resumed checkpoint's offset.
    fn offset(&self) -> u64;
    /// Progress becomes durable only at multiples of this many bytes.
    fn part_size(&self) -> u64;
    async fn write(&mut self, chunk: Bytes) -> Result<()>;
    /// Where parts may be written at their offsets as they arrive, in any
    /// order, when this store can (a file; not S3's numbered parts).
    fn at_offsets(&self) -> Option<std::sync::Arc<dyn OffsetWriter>> {
        None
    }
    /// The next `len` bytes in order were written through `at_offsets`
    /// (all of them, and already hashed by the caller): counted as written.
    async fn placed(&mut self, len: u64) -> Result<()> {
        let _ = len;
        Err(StorageError::Index("this store writes in order only".into()))
    }
    /// The furthest durable point so far (`None`: none yet). Errors of
    /// work the writer runs in the background surface here or at `write`.
    fn durable(&mut self) -> Result<Option<Durable>>;
    async fn commit(self: Box<Self>) -> Result<()>;
    async fn abort(self: Box<Self>) -> Result<()>;
    /// Stops without completing, keeping the durable part for a later
    /// `begin` to continue: waits for what is in flight and returns the
    /// final durable point.
    async fn suspend(self: Box<Self>) -> Result<Option<Durable>>;
    /// The bytes this upload has in the store so far, readable while it
    /// runs and after it ends, when the store can (a file; not S3's parts):
    /// what lets clients waiting for a cold blob get its bytes as they come.
    fn partial(&self) -> Option<std::sync::Arc<dyn PartialBlob>> {
        None
    }
}

/// An upload in progress, read from its start while it is written
/// (`BlobWriter::partial`). What it hands out is not verified yet: the
/// caller holds back the end until the copy commits.
#[async_trait]
pub trait PartialBlob: Send + Sync {
    /// Bytes from the blob's start that are in the store, in order.
    fn readable(&self) -> u64;
    /// Resolves once `readable` has grown past `seen`, or the upload ended
    /// (then it may not grow any more).
    async fn grown(&self, seen: u64);
    /// Up to `len` bytes at `offset` (below `readable`).
    async fn read_at(&self, offset: u64, len: usize) -> Result<bytes::Bytes>;
}

/// Writes an upload's bytes at their offsets (`BlobWriter::at_offsets`).
/// Once the writer is committed, aborted or suspended, writes fail and
/// change nothing: a part still running then cannot touch the file the
/// next copy continues.
#[async_trait]
pub trait OffsetWriter: Send + Sync {
    /// Writes `bytes` from `offset`.
    async fn write_at(&self, offset: u64, bytes: Bytes) -> Result<()>;
}
