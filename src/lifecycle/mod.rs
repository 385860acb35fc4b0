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
//!
//! # Layout
//! - `snapshot`: the index as one sweep reads it, the images it holds, and
//!   the inventory `hubcap stats` reports;
//! - `sweep`: deciding and writing, one function per phase.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use serde::Serialize;

use crate::oci::{Glob, RepoPattern};
use crate::storage::{BlobStore, Index, Result};

mod snapshot;
mod sweep;

pub use snapshot::{ImageInfo, Inventory, inventory};

/// Blobs marked `deleting`, then deleted, per batch.
const BATCH: usize = 100;
/// Images listed in the oldest / least recently pulled tables.
const LISTED: usize = 10;

/// A pin: `REPO[:TAG]`, each part a pattern (`*` any run, `?` one
/// character). A pin without a tag keeps everything in the matching
/// repositories.
#[derive(Clone, Debug)]
pub struct Pin {
    repo: RepoPattern,
    tag: Option<Glob>,
}

impl Pin {
    pub fn parse(s: &str) -> Result<Pin, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty pin".into());
        }
        let slash = s.rfind('/').map_or(0, |i| i + 1);
        let (repo, tag) = match s[slash..].rfind(':') {
            Some(i) => (&s[..slash + i], Some(Glob::new(&s[slash + i + 1..]))),
            None => (s, None),
        };
        Ok(Pin { repo: RepoPattern::parse(repo)?, tag })
    }

    pub(crate) fn matches(&self, repo: &str, tag: Option<&str>) -> bool {
        self.repo.matches(repo)
            && match (&self.tag, tag) {
                (None, _) => true,
                (Some(p), Some(t)) => p.matches(t),
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

pub(crate) async fn pause(opts: &GcOptions, step: Step) {
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
    /// Blobs the index called ready that the store did not hold: fetched
    /// again.
    pub lost_blobs: usize,
    /// Unfinished uploads no blob's checkpoint named (a copy that died
    /// without one, or was thrown away): aborted.
    pub aborted_uploads: usize,
    /// Copies that looked lost (`pending` with no fetcher on it, `fetching`
    /// past its lease): queued again.
    pub requeued_blobs: usize,
    pub writes: u64,
    /// The cache as the sweep found it.
    pub before: Inventory,
}

/// Runs one sweep. Errors from the backend stop it (what was done stays
/// done, consistently); conditions that no longer hold are skipped.
pub async fn run(index: &dyn Index, store: &dyn BlobStore, opts: &GcOptions) -> Result<GcReport> {
    let snap = snapshot::read(index).await?;
    let report = GcReport { dry_run: opts.dry_run, before: snap.inventory(), ..GcReport::default() };
    sweep::Sweep::new(index, store, opts, &snap, report).run().await
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
    if r.lost_blobs > 0 {
        let _ = writeln!(out, "{} ready blobs were missing from the store: {}fetched again", r.lost_blobs, would);
    }
    if r.aborted_uploads > 0 {
        let _ = writeln!(out, "{} unfinished uploads no copy will continue {would}aborted", r.aborted_uploads);
    }
    if r.requeued_blobs > 0 {
        let _ = writeln!(out, "{} copies that looked lost {would}queued again", r.requeued_blobs);
    }
    if !r.complete {
        let _ = writeln!(out, "stopped early after {} writes: the next run finishes the sweep", r.writes);
    }
    out
}

/// Parses a duration in humantime's syntax: `30d`, `12h`, `1.5h`, `90m`,
/// `45s`, `2w`, `1h30m` or `0`. A bare number is seconds (`86400`), as the
/// CloudFormation parameters' pattern allows.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let secs: f64 = s.parse().map_err(|_| format!("invalid duration {s:?} (e.g. 30d, 12h, 90m, 45s)"))?;
        return Duration::try_from_secs_f64(secs).map_err(|_| format!("invalid duration {s:?}: too long"));
    }
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e} (e.g. 30d, 12h, 90m, 45s)"))
}

/// Parses a size such as `500G`, `500GiB`, `1.5T` or a byte count. Units
/// are binary whatever the spelling: `500G` = `500GB` = `500GiB` = 500 × 2³⁰.
pub fn parse_size(s: &str) -> Result<u64, String> {
    parse_size::Config::new().with_binary().parse_size(s.trim()).map_err(|e| format!("invalid size {s:?}: {e} (e.g. 500G)"))
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
        assert_eq!(parse_duration("86400").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("3 parsecs").is_err() && parse_duration("-1d").is_err());
        for bad in ["inf", "nan", "1e300", "-5", "", "1.2.3", "99999999999999999999999", "99999999999999999999999d"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.starts_with("invalid duration"), "{bad}: {e}");
        }
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        for (s, n) in
            [("500G", 500u64 << 30), ("500GB", 500 << 30), ("500Gi", 500 << 30), ("1.5T", 3 << 39), ("1K", 1024), (" 2G ", 2 << 30)]
        {
            assert_eq!(parse_size(s).unwrap(), n, "{s}");
        }
        for bad in ["5 apples", "-5", "", "G", "99999999999T"] {
            assert!(parse_size(bad).unwrap_err().starts_with("invalid size"), "{bad}");
        }
    }
}
