//! Lifecycle end to end, on both backends (files + SQLite, and S3 +
//! DynamoDB on moto_server): retention, pins, the size cap, GC racing
//! pulls (one sequence test per race, and a loop), sweeps cut off and
//! resumed, and the `gc` / `stats` commands.
//!
//! GC runs on its own index and store instances, as `hubcap gc` or the gc
//! Lambda would next to a serving mirror; pulls go over HTTP and check
//! every byte. The index keeps Unix seconds, and the scenarios move its
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
use hubcap::storage::{BlobState, BlobStore, Index};
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
    http: reqwest::Client,
    _dir: tempfile::TempDir,
    _moto: Option<common::moto::Moto>,
}

/// A mirror that records every pull (no throttling of pull marks), so
/// retention can be observed within seconds.
fn cfg() -> MirrorConfig {
    MirrorConfig { touch_every: Duration::ZERO, ..common::config() }
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
    Env { hub, mirror, backend, index, store, http: client(), _dir: dir, _moto: moto }
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
        let (pause, mut at) = gate(step);
        let (index, store) = (self.index.clone(), self.store.clone());
        let o = GcOptions { pause: Some(pause), ..o };
        let sweep = tokio::spawn(async move { hubcap::lifecycle::run(index.as_ref(), store.as_ref(), &o).await.unwrap() });
        (sweep, at.recv().await.unwrap())
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

    /// The cache's own invariant: every blob the index calls ready is
    /// stored whole, and every tag leads to a stored manifest.
    async fn assert_consistent(&self) {
        let mut cursor = None;
        loop {
            let page = self.index.scan(cursor).await.unwrap();
            for e in page.entries {
                match e {
                    hubcap::storage::Entry::Blob(b) if b.state == BlobState::Ready => {
                        assert_eq!(self.store.size(&b.digest).await.unwrap(), b.size, "ready blob {} is stored whole", b.digest);
                    }
                    hubcap::storage::Entry::Tag(t) => {
                        let m = self.index.manifest(&t.repo, &t.digest).await.unwrap();
                        assert!(m.record.is_some(), "tag {}:{} leads to a stored manifest", t.repo, t.tag);
                    }
                    _ => {}
                }
            }
            match page.next {
                Some(n) => cursor = Some(n),
                None => return,
            }
        }
    }
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
    let started = std::time::Instant::now();
    while files() > 0 && started.elapsed() < Duration::from_secs(60) {
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
