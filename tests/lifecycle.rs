//! Lifecycle end to end, on both backends (files + SQLite, and S3 +
//! DynamoDB on moto_server): retention, pins, the size cap, a dry run
//! compared entry by entry, GC racing pulls (one sequence test per race,
//! and a loop), the races under production settings (the mirror answering
//! from its cached facts, two sweeps at once, a sweep that marked too
//! slowly), sweeps cut off and resumed, and the `gc` / `stats` commands.
//!
//! GC runs on its own index and store instances, as `hubcap gc` or the gc
//! Lambda would next to a serving mirror; pulls go over HTTP and check
//! every byte, and the checks read the index itself, behind no cache.
//! The index keeps Unix seconds, and the scenarios move its
//! clock (`storage::clock::advance`) instead of waiting, by steps far larger
//! than the real seconds a step takes; only the tests of the `hubcap`
//! binaries wait real seconds.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::fakehub::{FakeHub, Fault};
use common::images::{self, Format, Published};
use common::{Hubcap, client, get_blob, get_manifest, pull};
use hubcap::assemble::Backend;
use hubcap::lifecycle::{GcOptions, GcReport, Pause, Pin, Step};
use hubcap::mirror::MirrorConfig;
use hubcap::oci::Digest;
use hubcap::storage::{BlobRecord, BlobState, BlobStore, Entry, Index};
use tokio::sync::{mpsc, oneshot};

#[derive(Clone, Copy, Debug)]
enum Kind {
    Embedded,
    Aws,
}

struct Env {
    hub: FakeHub,
    mirror: Hubcap,
    backend: Backend,
    /// GC's own view of the storage (another process's, in production).
    index: Arc<dyn Index>,
    store: Arc<dyn BlobStore>,
    /// The index itself, behind no cache: what the checks read.
    raw: Arc<dyn Index>,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
    _moto: Option<common::moto::Moto>,
}

/// A mirror that records every pull (no throttling of pull marks), so
/// retention can be observed within seconds.
fn cfg() -> MirrorConfig {
    MirrorConfig { touch_every: Duration::ZERO, ..common::config() }
}

/// The mirror as deployed: pull and use marks written at most every 10
/// minutes (`touch_every`), tags trusted for 10 minutes, blob URLs valid for
/// 15; in between it answers from the facts its in-memory cache holds, so
/// the marks GC reads are up to 10 minutes old. (A blob request waits half
/// a second for a copy instead of 20, so that a blob being deleted is
/// answered with the wait at once.)
fn production() -> MirrorConfig {
    let c = MirrorConfig { blob_wait: Duration::from_millis(500), ..common::config() };
    assert_eq!((c.touch_every, c.tag_ttl, c.url_ttl), (secs(600), secs(600), secs(900)));
    c
}

/// GC as it must run beside such a mirror: a grace period above
/// `touch_every` + `url_ttl` (the 30 minutes the README asks for), images
/// not pulled for an hour expire, the default 15-minute delete lease.
fn production_gc() -> GcOptions {
    GcOptions { unused_for: secs(3600), grace: secs(1800), ..GcOptions::default() }
}

async fn env(kind: Kind, mirror: MirrorConfig) -> Env {
    let hub = FakeHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (backend, moto) = match kind {
        Kind::Embedded => (Backend::Local(dir.path().join("data")), None),
        Kind::Aws => {
            let moto = common::moto::Moto::start().await;
            let storage = moto.setup("lifecycle", "lifecycle").await;
            (Backend::Aws(Box::new(storage)), Some(moto))
        }
    };
    let mirror = Hubcap::start_opts(common::options(backend.clone(), vec![format!("docker.io={}", hub.url)], mirror)).await;
    let hubcap::assemble::Storage { index, store, .. } =
        hubcap::assemble::open(&backend, Duration::ZERO, hubcap::assemble::MEMORY_CACHE_ENTRIES).await.unwrap();
    let raw: Arc<dyn Index> = match &backend {
        Backend::Local(data) => Arc::new(hubcap::storage::local::SqliteIndex::open(&data.join("index.db")).unwrap()),
        Backend::Aws(storage) => Arc::new(hubcap::storage::aws::connect(storage, hubcap::storage::aws::SdkRole::Serve).await.1),
    };
    Env { hub, mirror, backend, index, store, raw, http: client(), _dir: dir, _moto: moto }
}

/// Generates one test per backend from a scenario.
macro_rules! both {
    ($scenario:ident, $embedded:ident, $aws:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $embedded() {
            $scenario(Kind::Embedded).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $aws() {
            $scenario(Kind::Aws).await;
        }
    };
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn opts(unused_for: u64, grace: u64) -> GcOptions {
    GcOptions { unused_for: secs(unused_for), grace: secs(grace), delete_lease: secs(5), ..GcOptions::default() }
}

impl Env {
    async fn gc(&self, opts: &GcOptions) -> GcReport {
        hubcap::lifecycle::run(self.index.as_ref(), self.store.as_ref(), opts).await.unwrap()
    }

    /// Starts a sweep and returns once it reached `step`, with the sweep and
    /// the switch that lets it go on.
    async fn sweep_paused_at(&self, step: Step, o: GcOptions) -> (tokio::task::JoinHandle<GcReport>, oneshot::Sender<()>) {
        let (sweep, go) = sweep_held_at(&self.gc_storage(), step, o).await;
        (tokio::spawn(async move { sweep.await.unwrap().unwrap() }), go)
    }

    /// GC's storage, as `sweep` takes it.
    fn gc_storage(&self) -> Sweeper {
        (self.index.clone(), self.store.clone())
    }

    /// The storage of another GC instance, with a cache of its own (a
    /// second gc Lambda, `hubcap gc` beside `serve --gc-interval`).
    async fn another_gc(&self) -> Sweeper {
        let s = hubcap::assemble::open(&self.backend, Duration::ZERO, hubcap::assemble::MEMORY_CACHE_ENTRIES).await.unwrap();
        (s.index, s.store)
    }

    /// A blob's own record, as the index holds it.
    async fn blob_record(&self, digest: &str) -> Option<BlobRecord> {
        self.entries().await.into_iter().find_map(|e| match e {
            Entry::Blob(b) if b.digest.as_str() == digest => Some(b),
            _ => None,
        })
    }

    /// Every entry of the index, page by page, read behind no cache.
    async fn entries(&self) -> Vec<Entry> {
        let mut all = Vec::new();
        let mut cursor = None;
        loop {
            let page = self.raw.scan(cursor).await.unwrap();
            all.extend(page.entries);
            match page.next {
                Some(n) => cursor = Some(n),
                None => return all,
            }
        }
    }

    /// What the cache holds, all of it: every index entry (in a stable
    /// order) and every stored blob.
    async fn contents(&self) -> (Vec<String>, Vec<String>) {
        let mut entries: Vec<String> = self.entries().await.iter().map(|e| format!("{e:?}")).collect();
        entries.sort();
        let mut stored: Vec<String> = self.store.stored_digests().await.unwrap().iter().map(|d| d.to_string()).collect();
        stored.sort();
        (entries, stored)
    }

    /// A blob request answered with the mirror's wait (a redirect back to
    /// itself), not a URL to the bytes.
    async fn assert_blob_withheld(&self, name: &str, digest: &str) {
        let resp = self.http.get(format!("{}/v2/{name}/blobs/{digest}", self.mirror.url)).send().await.unwrap();
        assert_eq!(resp.status(), 307);
        let location = resp.headers()["location"].to_str().unwrap();
        assert_eq!(location, format!("/v2/{name}/blobs/{digest}?hubcap-wait=1"), "no URL to a blob being deleted");
    }

    async fn stored(&self, digest: &str) -> bool {
        self.store.size(&Digest::parse(digest).unwrap()).await.unwrap().is_some()
    }

    async fn pull(&self, name: &str, reference: &str) -> common::Pulled {
        pull(&self.http, &self.mirror.url, name, reference).await
    }

    /// A blob as a patient client gets it: asked again while the mirror
    /// answers with its wait (a redirect back: still being copied), for up
    /// to a minute; then its bytes, checked.
    async fn get_blob_patiently(&self, name: &str, digest: &str) -> Bytes {
        let started = std::time::Instant::now();
        loop {
            let resp = self.http.get(format!("{}/v2/{name}/blobs/{digest}", self.mirror.url)).send().await.unwrap();
            let waiting = resp.headers().get("location").is_some_and(|l| l.to_str().unwrap().contains("hubcap-wait="));
            if !waiting {
                return get_blob(&self.http, &self.mirror.url, name, digest).await;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "{digest} was not copied within a minute");
        }
    }

    /// The cache's own invariant, read from the index itself (not through
    /// GC's cache, which could hide what the sweep did): every blob the
    /// index calls ready is stored whole, every tag and repository manifest
    /// leads to a stored manifest, and every blob such a manifest references
    /// is known (in whatever state: a request fetches it).
    async fn assert_consistent(&self) {
        for e in self.entries().await {
            let (repo, digest, what) = match e {
                Entry::Blob(b) if b.state == BlobState::Ready => {
                    assert_eq!(self.store.size(&b.digest).await.unwrap(), b.size, "ready blob {} is stored whole", b.digest);
                    continue;
                }
                Entry::Tag(t) => (t.repo.clone(), t.digest, format!("tag {}:{}", t.repo, t.tag)),
                Entry::ManifestLink { repo, digest, .. } => (repo.clone(), digest.clone(), format!("{repo}@{digest}")),
                _ => continue,
            };
            let m = self.raw.manifest(&repo, &digest).await.unwrap().record;
            let m = m.unwrap_or_else(|| panic!("{what} leads to a stored manifest"));
            for b in hubcap::oci::parse_manifest(&m.body, Some(&m.media_type)).unwrap().blobs {
                assert!(self.raw.blob(&repo, &b.digest).await.unwrap().record.is_some(), "{what} references {}, known", b.digest);
            }
        }
    }
}

/// What differs between two `Env::contents`, for a failure message.
fn changes(before: &(Vec<String>, Vec<String>), after: &(Vec<String>, Vec<String>)) -> String {
    let diff = |a: &[String], b: &[String]| a.iter().filter(|x| !b.contains(x)).cloned().collect::<Vec<_>>();
    format!(
        "entries gone {:?}, new {:?}; blobs gone {:?}, new {:?}",
        diff(&before.0, &after.0),
        diff(&after.0, &before.0),
        diff(&before.1, &after.1),
        diff(&after.1, &before.1)
    )
}

/// A GC instance's index and store.
type Sweeper = (Arc<dyn Index>, Arc<dyn BlobStore>);

/// A sweep on `on`, started and held once it reached `step`: the sweep,
/// and the switch that lets it go on.
async fn sweep_held_at(
    on: &Sweeper,
    step: Step,
    o: GcOptions,
) -> (tokio::task::JoinHandle<hubcap::storage::Result<GcReport>>, oneshot::Sender<()>) {
    let (pause, mut at) = gate(step);
    let (index, store) = on.clone();
    let o = GcOptions { pause: Some(pause), ..o };
    let sweep = tokio::spawn(async move { hubcap::lifecycle::run(index.as_ref(), store.as_ref(), &o).await });
    (sweep, at.recv().await.unwrap_or_else(|| panic!("the sweep never reached {step:?}")))
}

async fn sweep(on: &Sweeper, o: &GcOptions) -> GcReport {
    hubcap::lifecycle::run(on.0.as_ref(), on.1.as_ref(), o).await.unwrap()
}

/// An image whose first layer (`base`) it shares with every image made
/// with the same `base`, and whose second layer is its own.
fn layered(base: u64, own: u64, own_len: usize) -> Published {
    Published::Image(images::image(
        Format::Docker,
        "amd64",
        vec![vec![("base/os.bin".into(), images::noise(40_000, base))], vec![(format!("app/{own}.bin"), images::noise(own_len, own))]],
    ))
}

fn own_blobs(p: &Published) -> Vec<(String, Bytes)> {
    let i = &p.images()[0];
    vec![i.config.clone(), i.layers[1].clone()]
}

fn bytes_of(blobs: &[(String, Bytes)]) -> u64 {
    blobs.iter().map(|(_, b)| b.len() as u64).sum()
}

/// A pause at one step of a sweep: the test learns the sweep got there,
/// acts, then lets it go on.
fn gate(at: Step) -> (Pause, mpsc::UnboundedReceiver<oneshot::Sender<()>>) {
    let (tx, rx) = mpsc::unbounded_channel::<oneshot::Sender<()>>();
    let once = Arc::new(std::sync::Mutex::new(Some(tx)));
    let pause = Pause(Arc::new(move |step| {
        let once = once.clone();
        Box::pin(async move {
            if step != at {
                return;
            }
            let Some(tx) = once.lock().unwrap().take() else { return };
            let (go, wait) = oneshot::channel();
            let _ = tx.send(go);
            let _ = wait.await;
        })
    }));
    (pause, rx)
}

/// Moves the clock `n` seconds on (records keep Unix seconds): no waiting.
async fn tick(n: u64) {
    hubcap::storage::clock::advance(Duration::from_secs(n));
}

/// Real seconds, for the `hubcap` binaries, whose clocks a test cannot move.
async fn sleep_secs(n: u64) {
    tokio::time::sleep(Duration::from_millis(n * 1000 + 100)).await;
}

// ---------------------------------------------------------------------------
// Retention
// ---------------------------------------------------------------------------

both!(retention, retention_embedded, retention_aws);

async fn retention(kind: Kind) {
    let e = env(kind, cfg()).await;
    let (a, b, c) = (layered(1, 2, 30_000), layered(1, 3, 30_000), Published::Image(images::small_image(Format::Oci, "amd64", 4, 2)));
    e.hub.publish("library/a", "1", &a);
    e.hub.publish("library/b", "1", &b);
    e.hub.publish("team/c", "1", &c);
    e.pull("library/a", "1").await;
    e.pull("library/b", "1").await;
    e.pull("team/c", "1").await;
    tick(40).await;
    e.pull("library/b", "1").await;
    // Not pulled for 30 s expires: a and c, but c is pinned.
    let keep = GcOptions { pins: vec![Pin::parse("team/*").unwrap()], ..opts(30, 3600) };

    // A dry run says what would go, and changes nothing.
    let dry = e.gc(&GcOptions { dry_run: true, ..keep.clone() }).await;
    assert_eq!(dry.expired, ["docker.io/library/a:1"], "only the image nobody pulled since, not the pinned one: {dry:?}");
    assert_eq!((dry.deleted_manifests, dry.deleted_blobs, dry.writes), (1, 0, 0));
    assert_eq!((dry.grace_blobs, dry.grace_bytes), (2, bytes_of(&own_blobs(&a))), "a's own blobs go after the grace period");
    assert_eq!(dry.before.images, 3);
    assert!(e.index.tag("docker.io/library/a", "1", "").await.unwrap().is_some(), "a dry run changes nothing");

    let real = e.gc(&keep).await;
    assert_eq!(real.expired, dry.expired);
    assert_eq!((real.deleted_manifests, real.deleted_blobs, real.grace_blobs), (1, 0, 2));
    assert!(real.complete);
    assert!(e.index.tag("docker.io/library/a", "1", "").await.unwrap().is_none());
    for (d, _) in own_blobs(&a) {
        assert!(e.stored(&d).await, "inside the grace period a's blobs stay");
    }
    e.assert_consistent().await;

    // Past the grace period, a's own blobs go; the shared base stays for b.
    tick(1).await;
    let swept = e.gc(&opts(3600, 0)).await;
    assert_eq!((swept.expired.len(), swept.deleted_blobs, swept.reclaimed_bytes), (0, 2, bytes_of(&own_blobs(&a))));
    for (d, _) in own_blobs(&a) {
        assert!(!e.stored(&d).await, "{d} deleted");
    }
    assert!(e.stored(&a.images()[0].layers[0].0).await, "the base layer b references stays");
    e.assert_consistent().await;

    // What stayed is served from the cache alone; what went comes back.
    e.hub.set_fault(Fault::ServerError);
    e.pull("library/b", "1").await;
    e.pull("team/c", "1").await;
    e.hub.set_fault(Fault::None);
    let gets = e.hub.count(|c| &c.blob_get);
    let again = e.pull("library/a", "1").await;
    assert_eq!(again.digest, a.digest());
    assert_eq!(e.hub.count(|c| &c.blob_get) - gets, 2, "a's own blobs fetched again, the base served from the cache");
    e.mirror.stop().await;
}

both!(a_dry_run_writes_nothing, dry_run_embedded, dry_run_aws);

/// A dry run decides all that a real run would (an image expired, its
/// manifest and own blobs deleted, a blob lost from the store fetched
/// again) and writes nothing: every index entry and every stored blob are
/// the same after it. The same run for real changes both.
async fn a_dry_run_writes_nothing(kind: Kind) {
    let e = env(kind, cfg()).await;
    let (a, b) = (layered(101, 102, 20_000), layered(101, 103, 20_000));
    e.hub.publish("library/a", "1", &a);
    e.hub.publish("library/b", "1", &b);
    e.pull("library/a", "1").await;
    e.pull("library/b", "1").await;
    tick(40).await;
    e.pull("library/b", "1").await;
    // One of b's blobs removed from the store by hand: the audit's to find.
    let lost = Digest::parse(&b.images()[0].layers[1].0).unwrap();
    e.store.delete(&lost).await.unwrap();
    // Any pull or use mark written from here on differs from those there.
    tick(2).await;
    let o = opts(30, 0);
    let before = e.contents().await;
    let dry = e.gc(&GcOptions { dry_run: true, ..o.clone() }).await;
    assert_eq!(dry.expired, ["docker.io/library/a:1"], "{dry:?}");
    let decided = |r: &GcReport| (r.deleted_manifests, r.deleted_blobs, r.reclaimed_bytes, r.lost_blobs);
    assert_eq!(decided(&dry), (1, 2, bytes_of(&own_blobs(&a)), 1), "a's manifest and own blobs, b's lost blob: {dry:?}");
    assert_eq!(dry.writes, 0);
    let after = e.contents().await;
    assert!(after == before, "a dry run writes nothing, to the index or the store: {}", changes(&before, &after));

    let real = e.gc(&o).await;
    assert_eq!((&real.expired, decided(&real)), (&dry.expired, decided(&dry)), "the dry run said what this run did: {real:?}");
    let after = e.contents().await;
    assert!(after.0 != before.0 && after.1 != before.1, "the real run changed both");
    e.assert_consistent().await;
    e.mirror.stop().await;
}

both!(zero_grace_reclaims_in_one_run, zero_grace_embedded, zero_grace_aws);

/// `hubcap gc --unused-for 0s --grace 0s`: what nobody pulled goes, bytes
/// included, in one run (it used to leave the blobs to a second run).
async fn zero_grace_reclaims_in_one_run(kind: Kind) {
    let e = env(kind, cfg()).await;
    let a = layered(41, 42, 20_000);
    e.hub.publish("library/a", "1", &a);
    e.pull("library/a", "1").await;
    tick(1).await;
    let r = e.gc(&opts(0, 0)).await;
    assert_eq!(r.expired, ["docker.io/library/a:1"], "{r:?}");
    let all = a.all_blobs();
    assert_eq!((r.deleted_blobs, r.reclaimed_bytes, r.grace_blobs), (all.len(), bytes_of(&all), 0), "{r:?}");
    for (d, _) in &all {
        assert!(!e.stored(d).await, "{d} deleted in the same run");
    }
    e.assert_consistent().await;
    e.mirror.stop().await;
}

both!(size_cap, size_cap_embedded, size_cap_aws);

async fn size_cap(kind: Kind) {
    let e = env(kind, cfg()).await;
    let imgs: Vec<Published> = (0..3).map(|i| layered(100, 200 + i, 150_000)).collect();
    let size = |p: &Published| bytes_of(&p.all_blobs());
    for (i, p) in imgs.iter().enumerate() {
        e.hub.publish(&format!("library/s{i}"), "1", p);
    }
    for i in 0..3 {
        e.pull(&format!("library/s{i}"), "1").await;
        tick(1).await;
    }
    // Room for two images (sharing the base layer): the least recently
    // pulled one goes.
    let cap = size(&imgs[1]) + bytes_of(&own_blobs(&imgs[2])) + 1000;
    let r = e.gc(&GcOptions { max_bytes: Some(cap), ..opts(3600, 3600) }).await;
    assert_eq!((r.expired.clone(), r.evicted), (vec!["docker.io/library/s0:1".to_owned()], 1), "{r:?}");
    assert_eq!(r.grace_bytes, bytes_of(&own_blobs(&imgs[0])));
    // Pinned, s0 stays and the next least recently pulled goes instead.
    e.pull("library/s0", "1").await;
    tick(1).await;
    e.pull("library/s2", "1").await;
    let pinned = GcOptions { max_bytes: Some(cap), pins: vec![Pin::parse("library/s0").unwrap()], ..opts(3600, 3600) };
    let r = e.gc(&pinned).await;
    assert_eq!(r.expired, ["docker.io/library/s1:1"], "{r:?}");
    e.assert_consistent().await;
    e.mirror.stop().await;
}

// ---------------------------------------------------------------------------
// Races, one sequence each
// ---------------------------------------------------------------------------

both!(manifest_fetched_while_its_blobs_are_swept, race_manifest_sweep_embedded, race_manifest_sweep_aws);

async fn manifest_fetched_while_its_blobs_are_swept(kind: Kind) {
    let e = env(kind, cfg()).await;
    let p = layered(7, 8, 50_000);
    e.hub.publish("library/p", "1", &p);
    e.pull("library/p", "1").await;
    tick(2).await;

    // The sweep read the index and judged p stale; a client pulls p before
    // the sweep writes: the pull wins, nothing of p goes.
    let (sweep, go) = e.sweep_paused_at(Step::Read, opts(1, 0)).await;
    e.pull("library/p", "1").await;
    go.send(()).unwrap();
    let r = sweep.await.unwrap();
    assert!(r.expired.is_empty() && r.deleted_blobs == 0, "pulled during the sweep: kept ({r:?})");
    e.hub.set_fault(Fault::ServerError);
    e.pull("library/p", "1").await;
    e.hub.set_fault(Fault::None);

    // A slow client got the manifest, then the sweep expired p: the blobs
    // stay for the grace period, and the client finishes from the cache.
    tick(2).await;
    let (_, _, body) = get_manifest(&e.http, &e.mirror.url, "library/p", "1", common::ALL_MANIFESTS).await;
    tick(2).await;
    let r = e.gc(&opts(1, 3)).await;
    assert_eq!((r.expired.len(), r.deleted_blobs, r.grace_blobs), (1, 0, 3), "{r:?}");
    e.hub.set_fault(Fault::ServerError);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let blobs = std::iter::once(&v["config"]).chain(v["layers"].as_array().unwrap()).map(|d| d["digest"].as_str().unwrap().to_owned());
    for d in blobs.clone() {
        get_blob(&e.http, &e.mirror.url, "library/p", &d).await;
    }
    e.hub.set_fault(Fault::None);
    // Once nobody used them for the grace period, they go.
    tick(4).await;
    let r = e.gc(&opts(1, 3)).await;
    assert_eq!(r.deleted_blobs, 3, "{r:?}");
    for d in blobs {
        assert!(!e.stored(&d).await);
    }
    e.assert_consistent().await;
    assert_eq!(e.pull("library/p", "1").await.digest, p.digest(), "and a later pull fetches p again");
    e.mirror.stop().await;
}

both!(blob_requested_while_being_deleted, race_blob_delete_embedded, race_blob_delete_aws);

async fn blob_requested_while_being_deleted(kind: Kind) {
    // A blob request waits at most half a second for a copy, then redirects
    // back to itself: so the answer to a request for a blob being deleted
    // is seen without guessing how long to wait.
    let e = env(kind, MirrorConfig { blob_wait: Duration::from_millis(500), ..cfg() }).await;
    let q = layered(11, 12, 50_000);
    e.hub.publish("library/q", "1", &q);
    // Copied whole first, as `hubcap warm` does (asked again until stored):
    // the pull is then all hits, whatever the short wait.
    hubcap::warm::warm(&e.mirror.mirror, "library/q:1", &[]).await.unwrap();
    e.pull("library/q", "1").await;
    tick(2).await;
    let r = e.gc(&opts(1, 3600)).await;
    assert_eq!(r.expired, ["docker.io/library/q:1"]);
    tick(2).await;
    let (config, base, own) = (q.images()[0].config.0.clone(), q.images()[0].layers[0].0.clone(), q.images()[0].layers[1].0.clone());

    // Requested after the sweep read the index, before it marked the blob:
    // the request marks it used, so the sweep leaves it.
    let (sweep, go) = e.sweep_paused_at(Step::Read, opts(3600, 1)).await;
    get_blob(&e.http, &e.mirror.url, "library/q", &config).await;
    go.send(()).unwrap();
    let r = sweep.await.unwrap();
    assert_eq!(r.deleted_blobs, 2, "the two blobs nobody asked for: {r:?}");
    assert!(e.stored(&config).await && !e.stored(&base).await && !e.stored(&own).await);
    e.hub.set_fault(Fault::ServerError);
    get_blob(&e.http, &e.mirror.url, "library/q", &config).await;
    e.hub.set_fault(Fault::None);

    // Requested once the sweep marked it `deleting` (its bytes still
    // there): while the sweep is held there the mirror hands out no URL,
    // only its wait (a redirect back); once the sweep is done, the blob is
    // fetched again.
    tick(2).await;
    let (sweep, go) = e.sweep_paused_at(Step::BlobsMarked, opts(3600, 1)).await;
    assert!(e.stored(&config).await, "marked, not yet deleted");
    let gets = e.hub.count(|c| &c.blob_get);
    let resp = e.http.get(format!("{}/v2/library/q/blobs/{config}", e.mirror.url)).send().await.unwrap();
    assert_eq!(resp.status(), 307);
    let location = resp.headers()["location"].to_str().unwrap();
    assert_eq!(location, format!("/v2/library/q/blobs/{config}?hubcap-wait=1"), "no URL to a blob being deleted");
    go.send(()).unwrap();
    assert_eq!(sweep.await.unwrap().deleted_blobs, 1);
    let bytes = e.get_blob_patiently("library/q", &config).await;
    assert_eq!(common::sha256(&bytes), config, "the client got the blob, fetched again");
    assert_eq!(e.hub.count(|c| &c.blob_get) - gets, 1);
    assert!(e.stored(&config).await);
    e.assert_consistent().await;
    e.mirror.stop().await;
}

both!(tag_moved_during_a_sweep, race_tag_moved_embedded, race_tag_moved_aws);

async fn tag_moved_during_a_sweep(kind: Kind) {
    // Tags re-validated on every pull, so a pull sees the move at once.
    let e = env(kind, MirrorConfig { tag_ttl: Duration::ZERO, ..cfg() }).await;
    let (m1, m2) = (layered(21, 22, 40_000), layered(21, 23, 40_000));
    e.hub.publish("library/r", "1", &m1);
    e.pull("library/r", "1").await;
    tick(2).await;

    let (sweep, go) = e.sweep_paused_at(Step::Read, opts(1, 3600)).await;
    e.hub.publish("library/r", "1", &m2);
    assert_eq!(e.pull("library/r", "1").await.digest, m2.digest(), "the tag moved upstream and on the mirror");
    go.send(()).unwrap();
    let r = sweep.await.unwrap();
    assert_eq!(r.expired, [format!("docker.io/library/r@{}", m1.digest())], "the old manifest goes, the moved tag stays: {r:?}");
    let t = e.index.tag("docker.io/library/r", "1", "").await.unwrap().unwrap();
    assert_eq!(t.digest.as_str(), m2.digest());
    assert_eq!(r.deleted_blobs, 0, "m1's own blobs wait for the grace period");
    for (d, _) in m2.all_blobs() {
        assert!(e.stored(&d).await, "{d} of the moved tag's manifest is stored");
    }
    e.assert_consistent().await;
    e.hub.set_fault(Fault::ServerError);
    assert_eq!(e.pull("library/r", "1").await.digest, m2.digest(), "served whole from the cache");
    e.hub.set_fault(Fault::None);
    e.mirror.stop().await;
}

/// On DynamoDB a repository's copy of a manifest can outlive the stored
/// manifest (a sweep deleted it just as a pull stored it again): what the
/// copy references stays while the copy is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_repository_copy_keeps_its_blobs_when_the_stored_manifest_is_gone() {
    let e = env(Kind::Aws, cfg()).await;
    let z = layered(71, 72, 20_000);
    e.hub.publish("library/z", "1", &z);
    e.pull("library/z", "1").await;
    assert!(e.index.delete_manifest(&Digest::parse(&z.digest()).unwrap()).await.unwrap());
    tick(2).await;
    let r = e.gc(&opts(3600, 1)).await;
    assert_eq!((r.expired.len(), r.deleted_blobs, r.grace_blobs), (0, 0, 0), "{r:?}");
    // The same when only the tag's copy is left.
    assert!(e.index.expire_manifest_link("docker.io/library/z", &Digest::parse(&z.digest()).unwrap(), i64::MAX).await.unwrap());
    tick(2).await;
    let r = e.gc(&opts(3600, 1)).await;
    assert_eq!((r.expired.len(), r.deleted_blobs, r.grace_blobs), (0, 0, 0), "{r:?}");
    e.hub.set_fault(Fault::ServerError);
    assert_eq!(e.pull("library/z", "1").await.digest, z.digest(), "served whole from the cache");
    e.hub.set_fault(Fault::None);
    e.mirror.stop().await;
}

// ---------------------------------------------------------------------------
// Races under production settings: the mirror answers from its cached
// facts and writes pull and use marks at most every 10 minutes
// ---------------------------------------------------------------------------

both!(cached_blob_facts_are_not_trusted_past_touch_every, cached_blob_facts_embedded, cached_blob_facts_aws);

/// The mirror keeps a blob's `ready` record and hands out its URL without
/// asking the index while its use mark is under 10 minutes old. GC deletes
/// only blobs unused for the grace period (longer), so the record of a
/// blob being deleted is always older than that: the mirror marks it first,
/// the mark fails, and no URL is handed out, then or on the next request.
async fn cached_blob_facts_are_not_trusted_past_touch_every(kind: Kind) {
    let e = env(kind, production()).await;
    let q = layered(81, 82, 30_000);
    e.hub.publish("library/q", "1", &q);
    e.pull("library/q", "1").await;
    let own = q.images()[0].layers[1].0.clone();
    // Within 10 minutes a pull is served from the cached facts: no mark.
    let marked = e.blob_record(&own).await.unwrap().used_at;
    tick(300).await;
    e.pull("library/q", "1").await;
    assert_eq!(e.blob_record(&own).await.unwrap().used_at, marked, "served from the cached facts, nothing written");
    // Not pulled for an hour: expired; then unused for the grace period.
    tick(3600).await;
    assert_eq!(e.gc(&production_gc()).await.expired, ["docker.io/library/q:1"]);
    tick(1801).await;

    // The sweep marked q's blobs `deleting`; the mirror still holds them as
    // ready (its cached mark over an hour old). Asked twice: no URL either
    // time (the failed mark must not pass for a fresh one).
    let (sweep, go) = e.sweep_paused_at(Step::BlobsMarked, production_gc()).await;
    e.assert_blob_withheld("library/q", &own).await;
    e.assert_blob_withheld("library/q", &own).await;
    go.send(()).unwrap();
    assert_eq!(sweep.await.unwrap().deleted_blobs, 3);
    let gets = e.hub.count(|c| &c.blob_get);
    let bytes = e.get_blob_patiently("library/q", &own).await;
    assert_eq!(common::sha256(&bytes), own, "the client got the blob, fetched again");
    assert_eq!(e.hub.count(|c| &c.blob_get) - gets, 1);
    e.assert_consistent().await;
    e.mirror.stop().await;
}

both!(two_sweeps_at_once, two_sweeps_embedded, two_sweeps_aws);

/// Two sweeps on one index at once (gc Lambda runs that overlap, `hubcap
/// gc` beside `serve --gc-interval`), each with a cache of its own: each
/// blob is deleted once, by the sweep that marks it first, and a sweep
/// working from an older read never deletes a blob fetched again since.
async fn two_sweeps_at_once(kind: Kind) {
    let e = env(kind, production()).await;
    let a = layered(91, 92, 30_000);
    let all: Vec<String> = a.all_blobs().into_iter().map(|(d, _)| d).collect();
    e.hub.publish("library/a", "1", &a);
    e.pull("library/a", "1").await;
    let other = e.another_gc().await;
    // Expired, then unused for the grace period: every blob of a is due.
    let expire = || async {
        tick(3601).await;
        assert_eq!(e.gc(&production_gc()).await.expired, ["docker.io/library/a:1"]);
        tick(1801).await;
    };
    expire().await;

    // Both read the index; one marks the blobs and holds its marks; the
    // other, its read saying they are due, finds nothing left to take.
    let (second, go_second) = sweep_held_at(&other, Step::Read, production_gc()).await;
    let (first, go_first) = e.sweep_paused_at(Step::BlobsMarked, production_gc()).await;
    go_second.send(()).unwrap();
    let second = second.await.unwrap().unwrap();
    assert_eq!((second.deleted_blobs, second.complete), (0, true), "{second:?}");
    go_first.send(()).unwrap();
    assert_eq!(first.await.unwrap().deleted_blobs, all.len());
    for d in &all {
        assert!(!e.stored(d).await, "{d} deleted");
    }
    e.assert_consistent().await;

    // Pulled again (fetched again), expired again. One sweep reads the
    // index; the other deletes a's blobs; a client pulls a: fetched once
    // more. The first sweep's read says those blobs are due, the index
    // says they were just used: it leaves them.
    e.pull("library/a", "1").await;
    expire().await;
    let (first, go) = e.sweep_paused_at(Step::Read, production_gc()).await;
    assert_eq!(sweep(&other, &production_gc()).await.deleted_blobs, all.len());
    let gets = e.hub.count(|c| &c.blob_get);
    e.pull("library/a", "1").await;
    assert_eq!(e.hub.count(|c| &c.blob_get) - gets, all.len(), "fetched again after the second sweep");
    go.send(()).unwrap();
    let first = first.await.unwrap();
    assert_eq!((first.deleted_blobs, first.lost_blobs), (0, 0), "{first:?}");
    for d in &all {
        assert!(e.stored(d).await, "{d} fetched again stays");
    }
    e.assert_consistent().await;
    e.hub.set_fault(Fault::ServerError);
    e.pull("library/a", "1").await;
    e.hub.set_fault(Fault::None);
    e.mirror.stop().await;
}

both!(pulled_again_while_its_expiry_is_swept, race_images_expired_embedded, race_images_expired_aws);

/// A sweep expired an image (its tag and repository manifest) and is about
/// to delete the manifests nothing holds; a client pulls the image just
/// then. The tag is a miss (the mirror's cached tag is past its TTL): the
/// manifest is stored and linked again, and the sweep leaves it and its
/// blobs, as does the next one after the grace period.
async fn pulled_again_while_its_expiry_is_swept(kind: Kind) {
    let e = env(kind, production()).await;
    let a = layered(111, 112, 30_000);
    e.hub.publish("library/a", "1", &a);
    e.pull("library/a", "1").await;
    tick(3601).await;

    let (sweep, go) = e.sweep_paused_at(Step::ImagesExpired, production_gc()).await;
    assert!(e.raw.tag("docker.io/library/a", "1", "").await.unwrap().is_none(), "the tag is expired");
    let gets = e.hub.count(|c| &c.manifest_get);
    assert_eq!(e.pull("library/a", "1").await.digest, a.digest());
    assert_eq!(e.hub.count(|c| &c.manifest_get) - gets, 1, "stored again from upstream");
    go.send(()).unwrap();
    let r = sweep.await.unwrap();
    assert_eq!((r.expired.clone(), r.deleted_blobs), (vec!["docker.io/library/a:1".to_owned()], 0), "{r:?}");
    e.assert_consistent().await;
    tick(1801).await;
    let r = e.gc(&production_gc()).await;
    assert_eq!((r.expired.len(), r.deleted_blobs, r.grace_blobs), (0, 0, 0), "kept whole: {r:?}");
    e.assert_consistent().await;
    e.hub.set_fault(Fault::ServerError);
    assert_eq!(e.pull("library/a", "1").await.digest, a.digest(), "served whole from the cache");
    e.hub.set_fault(Fault::None);
    e.mirror.stop().await;
}

both!(pulled_again_while_its_blobs_wait_for_the_sweep, race_manifests_deleted_embedded, race_manifests_deleted_aws);

/// A multi-arch image: its tag leads to an index, whose platform manifest
/// a client pulls by digest, and the mirror keeps that repository link as
/// a cached fact. A sweep deleted the image's manifests and is about to
/// judge its blobs; a client pulls the image just then. The tag is a miss
/// (stored again from upstream); the platform manifest comes from the
/// cached fact, whose pull mark finds the link gone: the mirror stores it
/// again itself. So the index holds the whole image, and neither this
/// sweep nor the next after the grace period takes a blob of it.
async fn pulled_again_while_its_blobs_wait_for_the_sweep(kind: Kind) {
    let e = env(kind, production()).await;
    let multi = images::index(
        Format::Oci,
        vec![images::small_image(Format::Oci, "amd64", 121, 2), images::small_image(Format::Oci, "arm64", 122, 2)],
    );
    e.hub.publish("library/m", "1", &multi);
    // The second pull reads what the first stored: the cached facts.
    let pulled = e.pull("library/m", "1").await;
    e.pull("library/m", "1").await;
    tick(3601).await;

    let (sweep, go) = e.sweep_paused_at(Step::ManifestsDeleted, production_gc()).await;
    let platform = Digest::parse(&pulled.image_digest).unwrap();
    assert!(e.raw.manifest("docker.io/library/m", &platform).await.unwrap().record.is_none(), "deleted");
    let gets = e.hub.count(|c| &c.manifest_get);
    let again = e.pull("library/m", "1").await;
    assert_eq!((again.digest, again.image_digest), (pulled.digest, pulled.image_digest));
    assert_eq!(e.hub.count(|c| &c.manifest_get) - gets, 1, "only the tag asked upstream");
    go.send(()).unwrap();
    let r = sweep.await.unwrap();
    assert_eq!((r.expired.len(), r.deleted_manifests, r.deleted_blobs), (1, 2, 0), "{r:?}");
    e.assert_consistent().await;
    tick(1801).await;
    let r = e.gc(&production_gc()).await;
    assert_eq!((r.expired.len(), r.deleted_blobs, r.grace_blobs), (0, 0, 0), "kept whole: {r:?}");
    e.hub.set_fault(Fault::ServerError);
    e.pull("library/m", "1").await;
    e.hub.set_fault(Fault::None);
    e.mirror.stop().await;
}

both!(a_sweep_that_marked_too_slowly_deletes_nothing, marked_too_slowly_embedded, marked_too_slowly_aws);

/// A sweep marks a batch of blobs `deleting` under a lease (15 minutes),
/// then deletes their bytes. When half the lease went by in between (a
/// stalled function, a paused process), the bytes are not deleted: the
/// lease may soon pass to a reader who fetches the blob again. The sweep
/// stops with an error; the blobs stay withheld until the lease ends, and
/// the next sweep finishes the job.
async fn a_sweep_that_marked_too_slowly_deletes_nothing(kind: Kind) {
    let e = env(kind, production()).await;
    let x = layered(131, 132, 30_000);
    let all: Vec<String> = x.all_blobs().into_iter().map(|(d, _)| d).collect();
    e.hub.publish("library/x", "1", &x);
    e.pull("library/x", "1").await;
    tick(3601).await;
    assert_eq!(e.gc(&production_gc()).await.expired, ["docker.io/library/x:1"]);
    tick(1801).await;

    let (slow, go) = sweep_held_at(&e.gc_storage(), Step::BlobsMarked, production_gc()).await;
    // Half of the 15-minute lease passes on the index's clock.
    tick(451).await;
    go.send(()).unwrap();
    let err = slow.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("too slowly"), "{err}");
    for d in &all {
        assert!(e.stored(d).await, "{d}: nothing deleted");
    }
    e.assert_consistent().await;
    e.assert_blob_withheld("library/x", &all[1]).await;
    // Past the lease the next sweep takes them again and finishes.
    tick(500).await;
    let r = e.gc(&production_gc()).await;
    assert_eq!((r.deleted_blobs, r.complete), (all.len(), true), "{r:?}");
    for d in &all {
        assert!(!e.stored(d).await, "{d} deleted");
    }
    e.assert_consistent().await;
    e.mirror.stop().await;
}

// ---------------------------------------------------------------------------
// Pulls and GC together, in a loop
// ---------------------------------------------------------------------------

both!(pulls_and_gc_in_a_loop, loop_embedded, loop_aws);

async fn pulls_and_gc_in_a_loop(kind: Kind) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let e = env(kind, cfg()).await;
    let imgs: Vec<Published> = (0..8).map(|i| layered(300, 310 + i, 20_000)).collect();
    for (i, p) in imgs.iter().enumerate() {
        e.hub.publish(&format!("library/l{i}"), "1", p);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let runs = Arc::new(AtomicUsize::new(0));
    // GC as often as it can, pulls or not: what is not pulled for 10 s
    // expires, and blobs nothing references go once unused for 30 s (on
    // the index's clock, which the rounds below move 20 s at a time; a pull
    // takes a fraction of a real second).
    let sweeper = {
        let (index, store, stop, runs) = (e.index.clone(), e.store.clone(), stop.clone(), runs.clone());
        tokio::spawn(async move {
            let mut deleted = 0;
            while !stop.load(Ordering::SeqCst) {
                let r = hubcap::lifecycle::run(index.as_ref(), store.as_ref(), &opts(10, 30)).await.unwrap();
                deleted += r.deleted_blobs;
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            deleted
        })
    };
    // Two clients pull the images round robin, each image every fourth
    // round (twice in all); between rounds the clock moves 20 s and two
    // more sweeps run, so every image expires and its own blobs go before
    // its next pull. Every byte is checked.
    let mut pulls = 0;
    for round in 0..8 {
        let (i, j) = (round % imgs.len(), (round + 4) % imgs.len());
        let (ni, nj) = (format!("library/l{i}"), format!("library/l{j}"));
        let (x, y) = tokio::join!(e.pull(&ni, "1"), e.pull(&nj, "1"));
        assert_eq!((x.digest.as_str(), y.digest.as_str()), (imgs[i].digest().as_str(), imgs[j].digest().as_str()));
        pulls += 2;
        tick(20).await;
        let seen = runs.load(Ordering::SeqCst);
        while runs.load(Ordering::SeqCst) < seen + 2 {
            assert!(!sweeper.is_finished(), "the sweeper stopped");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    stop.store(true, Ordering::SeqCst);
    let deleted = sweeper.await.unwrap();
    let runs = runs.load(Ordering::SeqCst);
    assert!(runs >= 16 && deleted >= 2 * imgs.len(), "GC ran {runs} times and deleted {deleted} blobs meanwhile");
    assert_eq!(e.hub.count(|c| &c.blob_get), 1 + 2 * 2 * imgs.len(), "each image's own blobs were collected and fetched again");
    eprintln!("{pulls} pulls, every byte checked, alongside {runs} sweeps deleting {deleted} blobs");
    e.assert_consistent().await;
    e.mirror.stop().await;
}

// ---------------------------------------------------------------------------
// Sweeps cut off half-way
// ---------------------------------------------------------------------------

both!(cut_off_sweeps_resume, resume_embedded, resume_aws);

async fn cut_off_sweeps_resume(kind: Kind) {
    let e = env(kind, cfg()).await;
    let imgs: Vec<Published> = (0..4).map(|i| layered(400, 410 + i, 10_000)).collect();
    for (i, p) in imgs.iter().enumerate() {
        e.hub.publish(&format!("library/k{i}"), "1", p);
        e.pull(&format!("library/k{i}"), "1").await;
    }
    tick(40).await;
    e.pull("library/k0", "1").await;
    // A small write budget cuts every sweep off (one manifest's blobs and
    // its deletion is the largest unit: four writes); each run goes on
    // from where the cache stands, and the cache is consistent after each.
    let mut runs = 0;
    loop {
        runs += 1;
        assert!(runs < 60, "sweeps never completed");
        // k0, pulled every loop, stays; the others were not pulled for 40 s.
        let r = e.gc(&GcOptions { max_writes: Some(4), delete_lease: secs(1), ..opts(30, 0) }).await;
        e.assert_consistent().await;
        e.hub.set_fault(Fault::ServerError);
        e.pull("library/k0", "1").await;
        e.hub.set_fault(Fault::None);
        if r.complete && r.expired.is_empty() && r.deleted_blobs == 0 && r.grace_blobs == 0 {
            break;
        }
        // Past the leases of blobs a cut-off sweep left marked.
        tick(1).await;
    }
    assert!(runs > 3, "the work took several cut-off runs ({runs})");
    for p in &imgs[1..] {
        for (d, _) in own_blobs(p) {
            assert!(!e.stored(&d).await, "{d} of an expired image is gone");
        }
    }
    for (d, _) in imgs[0].all_blobs() {
        assert!(e.stored(&d).await, "the image pulled meanwhile stays whole");
    }
    let inv = hubcap::lifecycle::inventory(e.index.as_ref()).await.unwrap();
    assert_eq!((inv.images, inv.blobs as u64, inv.bytes), (1, 3, bytes_of(&imgs[0].all_blobs())));
    e.mirror.stop().await;
}

both!(a_sweep_killed_mid_delete_is_finished_next_time, killed_sweep_embedded, killed_sweep_aws);

async fn a_sweep_killed_mid_delete_is_finished_next_time(kind: Kind) {
    let e = env(kind, cfg()).await;
    let x = layered(51, 52, 30_000);
    e.hub.publish("library/x", "1", &x);
    e.pull("library/x", "1").await;
    tick(2).await;
    assert_eq!(e.gc(&opts(1, 3600)).await.expired, ["docker.io/library/x:1"]);
    tick(2).await;

    // Killed at the worst point: blobs marked `deleting`, bytes still there.
    let (sweep, _go) = e.sweep_paused_at(Step::BlobsMarked, GcOptions { delete_lease: secs(2), ..opts(3600, 1) }).await;
    sweep.abort();
    let _ = sweep.await;
    e.assert_consistent().await;
    let blobs: Vec<String> = x.all_blobs().into_iter().map(|(d, _)| d).collect();
    for d in &blobs {
        assert!(e.stored(d).await, "the bytes outlive the killed sweep");
        assert!(!e.index.touch_blob(&Digest::parse(d).unwrap(), None).await.unwrap(), "but no reader may use them");
    }
    // A client wanting one of them gets it once the dead sweep's lease ends.
    let wanted = x.images()[0].layers[1].0.clone();
    let bytes = get_blob(&e.http, &e.mirror.url, "library/x", &wanted).await;
    assert_eq!(common::sha256(&bytes), wanted);
    // The next sweep finishes the rest and leaves the fetched blob alone.
    tick(2).await;
    let r = e.gc(&opts(3600, 60)).await;
    assert_eq!((r.deleted_blobs, r.complete), (2, true), "{r:?}");
    for d in &blobs {
        assert_eq!(e.stored(d).await, *d == wanted, "{d}");
    }
    e.assert_consistent().await;
    e.mirror.stop().await;
}

/// `hubcap serve` runs the same sweep itself, on `--gc-interval`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_sweeps_by_itself() {
    let hub = FakeHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let y = layered(61, 62, 30_000);
    hub.publish("library/y", "1", &y);
    let port = common::procs::free_port();
    let data = dir.path().join("data");
    let proc = common::procs::Proc::spawn(
        std::process::Command::new(env!("CARGO_BIN_EXE_hubcap"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--upstream", &format!("docker.io={}", hub.url)])
            .args(["--redirect-allow", &hub.cdn])
            .args(["--gc-interval", "1s", "--unused-for", "5s", "--grace", "0"])
            .arg("--data")
            .arg(&data)
            .env("HUBCAP_LOG", "info")
            .env("NO_COLOR", "1"),
        dir.path().join("hubcap.log"),
    );
    let url = format!("http://127.0.0.1:{port}");
    common::procs::wait_ready(&format!("{url}/v2/"), &proc).await;
    // Counted at once: well within the 5 s the image is kept unpulled.
    pull(&client(), &url, "library/y", "1").await;
    let files = || std::fs::read_dir(data.join("blobs/sha256")).unwrap().count();
    assert_eq!(files(), 3);
    // Swept within a minute (about 6 s: 5 s unused, then the next sweep).
    // The sweep logs its report after its last phase, a moment after the
    // files went: both are waited for.
    let started = std::time::Instant::now();
    while (files() > 0 || !proc.log().contains("deleted_blobs=3")) && started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(files(), 0, "expired and swept without being asked:\n{}", proc.log());
    assert!(proc.log().contains("deleted_blobs=3"), "{}", proc.log());
}

// ---------------------------------------------------------------------------
// The commands
// ---------------------------------------------------------------------------

both!(gc_and_stats_commands, commands_embedded, commands_aws);

async fn gc_and_stats_commands(kind: Kind) {
    let e = env(kind, cfg()).await;
    let (a, b) = (layered(31, 32, 20_000), layered(31, 33, 20_000));
    e.hub.publish("library/a", "1", &a);
    e.hub.publish("library/b", "1", &b);
    e.pull("library/a", "1").await;
    e.pull("library/b", "1").await;
    e.pull("library/b", "1").await;
    e.mirror.mirror.flush_stats().await.unwrap();
    let mut storage_flags: Vec<String> = Vec::new();
    let mut envs: Vec<(&str, String)> = Vec::new();
    match &e.backend {
        Backend::Local(dir) => storage_flags.extend(["--data".to_owned(), dir.display().to_string()]),
        Backend::Aws(s) => {
            storage_flags.extend(["--storage", "aws", "--bucket", &s.bucket, "--table", &s.table].map(str::to_owned));
            envs = common::moto::env_for(&e._moto.as_ref().unwrap().url);
        }
    }
    let hubcap = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_hubcap"))
            .args(args)
            .args(&storage_flags)
            .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
            .env("HUBCAP_LOG", "warn")
            .output()
            .unwrap();
        assert!(out.status.success(), "hubcap {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let json = |args: &[&str]| -> serde_json::Value { serde_json::from_str(&hubcap(args)).unwrap() };

    let stats = json(&["stats", "--json"]);
    let all = bytes_of(&a.all_blobs()) + bytes_of(&own_blobs(&b));
    assert_eq!((stats["cache"]["images"].as_u64(), stats["cache"]["bytes"].as_u64()), (Some(2), Some(all)), "{stats}");
    let misses = stats["requests"]["miss"].as_u64().unwrap();
    assert!((2..=7).contains(&misses), "the first pulls' misses (manifests, and blobs not yet prefetched): {stats}");
    assert!(stats["requests"]["hit"].as_u64().unwrap() >= 4, "the third pull came from the cache: {stats}");
    assert!(stats["hit_ratio"].as_f64().unwrap() > 0.3, "{stats}");
    assert!(stats["upstream_requests_saved"].as_u64().unwrap() >= 4, "{stats}");
    assert!(stats["ratelimit_remaining"].as_i64().is_some_and(|n| n > 0), "{stats}");
    assert_eq!(stats["cache"]["least_recently_pulled"][0]["image"], "docker.io/library/a:1", "{stats}");
    assert_eq!(stats["cache"]["oldest"].as_array().unwrap().len(), 2);
    let text = hubcap(&["stats"]);
    assert!(text.contains("cached: 2 images") && text.contains("last ratelimit-remaining: 9"), "{text}");

    sleep_secs(2).await;
    let dry = hubcap(&["gc", "--dry-run", "--unused-for", "1s", "--grace", "0"]);
    assert!(dry.contains("dry run") && dry.contains("docker.io/library/a:1") && dry.contains("docker.io/library/b:1"), "{dry}");
    assert_eq!(json(&["stats", "--json"])["cache"]["images"], 2, "a dry run changes nothing");
    // With no grace period one run expires the images and frees their bytes.
    let run = json(&["gc", "--json", "--unused-for", "1s", "--grace", "0"]);
    assert_eq!(run["expired"].as_array().unwrap().len(), 2, "{run}");
    assert_eq!(
        (run["deleted_blobs"].as_u64(), run["reclaimed_bytes"].as_u64(), run["grace_bytes"].as_u64()),
        (Some(5), Some(all), Some(0)),
        "{run}"
    );
    let stats = json(&["stats", "--json"]);
    assert_eq!((stats["cache"]["images"].as_u64(), stats["cache"]["bytes"].as_u64()), (Some(0), Some(0)), "{stats}");
    assert_eq!(stats["requests"]["miss"].as_u64(), Some(misses), "the counters outlive the images");
    if let Backend::Local(dir) = &e.backend {
        assert_eq!(std::fs::read_dir(dir.join("blobs/sha256")).unwrap().count(), 0, "no blob file left");
    }
    e.mirror.stop().await;
}
