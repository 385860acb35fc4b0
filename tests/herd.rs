//! The herd simulation (issue 14, SCALING.md): N simulated Docker clients
//! pull one new image within W seconds through `api` instances that each
//! serve one request at a time with a cache of their own, as Lambda runs
//! them (a new instance whenever all are busy), on moto (S3 + DynamoDB,
//! the api's calls through a counting proxy) with the `fetcher` function fed
//! by the table's stream, from the fake Docker Hub whose CDN sits behind a
//! relay capping each connection's rate (a copy that takes T seconds).
//!
//! The clients do what dockerd 20.10 was measured to do
//! (`tests/docker.rs`, `how_long_docker_waits_on_a_mirror_for_a_layer`):
//! the manifest, the config (no retry: a failure fails the pull over to the
//! next endpoint), then the layers 3 at a time; each layer try is two
//! request chains of at most 10 requests (9 redirects followed), and a
//! layer gets 6 tries with pauses of 5, 10, 15, 20 and 25 s. A pull fails
//! when any of that runs out. Clients do not download the bytes: a `307` to
//! the bucket is a served layer.
//!
//! For each wait design (`hold`: today's, `retry`: SCALING.md's) and
//! scenario (cold; warm: all cached; half-cold: manifests cached, the big
//! layer not), it reports instance-seconds per pull, peak concurrent
//! instances, GetItems per pull and on the hottest key per second, upstream
//! GETs per blob and failed pulls; then scales them to N = 10,000 in 60 s
//! (concurrency and reads per second grow with the arrival rate; per-pull
//! figures stay).
//!
//! The suite runs it small (20 clients in 4 s, the retry design, cold and
//! warm) and checks what must hold at any size; `bench/run.sh` runs it
//! full (`HUBCAP_BENCH=full`: 300 clients in 30 s, both designs, three
//! scenarios) and writes the table into BENCHMARKS.md.

mod common;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::response::Response;
use common::fakehub::{FakeHub, Fault};
use common::images::{self, ALL_MANIFESTS, Format, Published};
use common::moto::{CountingProxy, Moto, StreamPump};
use common::relay::Relay;
use futures_util::StreamExt;
use hubcap::lambda::{BatchLimits, api_router_with, fetcher_with, handle_stream_within, job_from_record};
use hubcap::mirror::upstream::{Upstreams, build_upstreams};
use hubcap::mirror::{BlobWaitMode, MirrorConfig};
use hubcap::storage::aws::AwsStorage;
use tower::ServiceExt;

const MIB: u64 = 1 << 20;

/// The simulated fleet.
#[derive(Clone, Copy)]
struct Herd {
    nodes: usize,
    window: Duration,
    /// The big layer's size and the upstream's rate per connection: the
    /// copy takes about size / rate.
    big: u64,
    rate: u64,
}

/// What one scenario measured.
#[derive(Debug, Default, Clone)]
struct Measured {
    pulls: usize,
    /// Of them, Docker's daemon's.
    docker_pulls: usize,
    failed: usize,
    instance_secs: f64,
    /// Instance-seconds spent on Docker's daemon's requests.
    docker_instance_secs: f64,
    peak_instances: usize,
    instances_made: usize,
    get_items: usize,
    hottest_key_per_sec: usize,
    upstream_gets_per_blob: f64,
    slowest_pull: f64,
    wall: f64,
}

/// `api` instances as Lambda runs them: one request at a time each, a new
/// one (cold, empty cache) whenever every instance is busy.
struct Pool {
    idle: Mutex<Vec<Router>>,
    busy: AtomicUsize,
    peak: AtomicUsize,
    made: AtomicUsize,
    busy_micros: AtomicU64,
    /// The part of `busy_micros` spent on Docker's daemon's requests.
    docker_micros: AtomicU64,
    storage: AwsStorage,
    cfg: MirrorConfig,
    hub: String,
    also_allowed: String,
}

impl Pool {
    async fn instance(&self) -> Router {
        if let Some(r) = self.idle.lock().unwrap().pop() {
            return r;
        }
        self.made.fetch_add(1, Ordering::SeqCst);
        let upstreams = upstreams(&self.hub, &self.also_allowed);
        api_router_with(&self.storage, upstreams, self.cfg.clone(), 10_000, Default::default(), Default::default()).await.unwrap().0
    }
}

async fn dispatch(State(pool): State<Arc<Pool>>, req: Request) -> Response {
    let docker = req.headers().get("user-agent").and_then(|v| v.to_str().ok()).is_some_and(|ua| ua.starts_with("docker/"));
    let router = pool.instance().await;
    let busy = pool.busy.fetch_add(1, Ordering::SeqCst) + 1;
    pool.peak.fetch_max(busy, Ordering::SeqCst);
    let started = Instant::now();
    let resp = router.clone().oneshot(req).await.unwrap();
    // The body is read here, inside the invocation, as Lambda buffers it.
    let (parts, body) = resp.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap_or_default();
    pool.busy_micros.fetch_add(started.elapsed().as_micros() as u64, Ordering::SeqCst);
    if docker {
        pool.docker_micros.fetch_add(started.elapsed().as_micros() as u64, Ordering::SeqCst);
    }
    pool.busy.fetch_sub(1, Ordering::SeqCst);
    pool.idle.lock().unwrap().push(router);
    Response::from_parts(parts, axum::body::Body::from(body))
}

fn upstreams(hub: &str, also: &str) -> Upstreams {
    let mut limits = common::upstream_limits();
    limits.redirect_allow.push(also.to_owned());
    build_upstreams(&[format!("docker.io={hub}")], &limits, &Default::default()).unwrap()
}

/// One layer chain: at most 10 requests (9 redirects followed). A `307` to
/// anything but the mirror is the stored blob.
async fn chain(http: &reqwest::Client, base: &str, path: &str) -> Result<(), u16> {
    let mut url = format!("{base}{path}");
    for _ in 0..10 {
        let resp = http.get(&url).send().await.map_err(|_| 599u16)?;
        match resp.status().as_u16() {
            200 => return Ok(()),
            307 => {
                let to = resp.headers()["location"].to_str().unwrap().to_owned();
                if to.starts_with('/') {
                    url = format!("{base}{to}");
                } else if to.starts_with(base) {
                    url = to;
                } else {
                    return Ok(());
                }
            }
            other => return Err(other),
        }
    }
    Err(310)
}

/// Docker's daemon (its User-Agent starts `docker/`): 6 tries of a layer.
const DOCKER_UA: &str = "docker/20.10.24+dfsg1 go/go1.19.8 git-commit/5d6db84 kernel/6.1.0 os/linux arch/amd64 UpstreamClient(Docker-Client/20.10.24+dfsg1 \\(linux\\))";
/// podman (containers/image): one try of a layer, then the next endpoint.
const PODMAN_UA: &str = "containers/5.23.1 (github.com/containers/image)";

/// A layer as the client fetches it: `tries` tries of two chains (dockerd:
/// 6, with pauses of 5, 10, 15, 20, 25 s; podman: 1).
async fn layer(http: &reqwest::Client, base: &str, path: &str, tries: u64) -> Result<(), String> {
    for try_ in 0..tries {
        if try_ > 0 {
            tokio::time::sleep(Duration::from_secs(5 * try_)).await;
        }
        for _ in 0..2 {
            if chain(http, base, path).await.is_ok() {
                return Ok(());
            }
        }
    }
    Err(format!("{path}: {tries} tries failed"))
}

/// One node's pull of `name:tag` (an image of config + layers).
async fn pull(http: &reqwest::Client, base: &str, name: &str, tag: &str, tries: u64) -> Result<(), String> {
    let resp =
        http.get(format!("{base}/v2/{name}/manifests/{tag}")).header("accept", ALL_MANIFESTS).send().await.map_err(|e| e.to_string())?;
    if resp.status() != 200 {
        return Err(format!("manifest: {}", resp.status()));
    }
    let body = resp.bytes().await.map_err(|e| e.to_string())?;
    let m: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    let config = m["config"]["digest"].as_str().unwrap().to_owned();
    chain(http, base, &format!("/v2/{name}/blobs/{config}")).await.map_err(|s| format!("config: {s}"))?;
    let layers: Vec<String> = m["layers"].as_array().unwrap().iter().map(|l| l["digest"].as_str().unwrap().to_owned()).collect();
    let results: Vec<Result<(), String>> = futures_util::stream::iter(layers)
        .map(|d| async move { layer(http, base, &format!("/v2/{name}/blobs/{d}"), tries).await })
        .buffer_unordered(3)
        .collect()
        .await;
    results.into_iter().collect()
}

/// A world for one design: its own table and bucket, the fetcher fed by
/// the stream.
struct World {
    moto: Moto,
    proxy: CountingProxy,
    through_proxy: AwsStorage,
    direct: AwsStorage,
    pump_stop: tokio::sync::watch::Sender<bool>,
}

async fn world(hub: &FakeHub, relay: &str, name: &str) -> World {
    let moto = Moto::start().await;
    let direct = moto.setup(&format!("{name}-bucket"), name).await;
    let proxy = CountingProxy::start(&moto.url).await;
    let through_proxy = common::moto::storage_at(&proxy.url, &format!("{name}-bucket"), name).await;
    let fetcher = Arc::new(fetcher_with(&direct, upstreams(&hub.url, relay)).await);
    let (pump_stop, stop) = tokio::sync::watch::channel(false);
    let mut pump = StreamPump::new(&moto.url, name);
    tokio::spawn(async move {
        // The event source mapping: batches of pending-blob records, each
        // batch an invocation of its own.
        while !*stop.borrow() {
            let mut event = pump.poll().await;
            event.records.retain(|r| job_from_record(r).ok().flatten().is_some());
            if !event.records.is_empty() {
                let fetcher = fetcher.clone();
                tokio::spawn(async move { handle_stream_within(&fetcher, event, BatchLimits::unbounded(4)).await });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    World { moto, proxy, through_proxy, direct, pump_stop }
}

/// Runs `herd.nodes` pulls spread evenly over `herd.window` against fresh
/// instances, and measures. Every `podman_every`-th node is podman (0: none).
#[allow(clippy::too_many_arguments)]
async fn scenario(
    w: &World,
    hub: &FakeHub,
    relay: &str,
    mode: BlobWaitMode,
    herd: Herd,
    name: &str,
    blobs: &[String],
    podman_every: usize,
) -> Measured {
    let cfg = MirrorConfig { blob_wait_mode: mode, ..Default::default() };
    let pool = Arc::new(Pool {
        idle: Mutex::default(),
        busy: AtomicUsize::new(0),
        peak: AtomicUsize::new(0),
        made: AtomicUsize::new(0),
        busy_micros: AtomicU64::new(0),
        docker_micros: AtomicU64::new(0),
        storage: w.through_proxy.clone(),
        cfg,
        hub: hub.url.clone(),
        also_allowed: relay.to_owned(),
    });
    let app = Router::new().fallback(dispatch).with_state(pool.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    w.proxy.reads.lock().unwrap().clear();
    let gets_before: Vec<usize> = blobs.iter().map(|b| hub.cdn_gets(b)).collect();
    let started = Instant::now();
    let mut nodes = Vec::new();
    for i in 0..herd.nodes {
        let at = herd.window.mul_f64(i as f64 / herd.nodes as f64);
        let (base, name) = (base.clone(), name.to_owned());
        nodes.push(tokio::spawn(async move {
            tokio::time::sleep_until(tokio::time::Instant::from_std(started + at)).await;
            let podman = podman_every > 0 && i % podman_every == podman_every - 1;
            let (ua, tries) = if podman { (PODMAN_UA, 1) } else { (DOCKER_UA, 6) };
            let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).user_agent(ua).build().unwrap();
            let t = Instant::now();
            let r = pull(&http, &base, &name, "1", tries).await;
            (r, t.elapsed().as_secs_f64())
        }));
    }
    let mut m = Measured { pulls: herd.nodes, ..Default::default() };
    for n in nodes {
        let (r, took) = n.await.unwrap();
        if let Err(e) = r {
            if m.failed < 3 {
                eprintln!("failed pull: {e}");
            }
            m.failed += 1;
        }
        m.slowest_pull = m.slowest_pull.max(took);
    }
    m.wall = started.elapsed().as_secs_f64();
    m.instance_secs = pool.busy_micros.load(Ordering::SeqCst) as f64 / 1e6;
    m.docker_instance_secs = pool.docker_micros.load(Ordering::SeqCst) as f64 / 1e6;
    m.docker_pulls = herd.nodes - herd.nodes.checked_div(podman_every).unwrap_or(0);
    m.peak_instances = pool.peak.load(Ordering::SeqCst);
    m.instances_made = pool.made.load(Ordering::SeqCst);
    let reads = w.proxy.reads.lock().unwrap().clone();
    m.get_items = reads.values().sum();
    m.hottest_key_per_sec = reads.values().copied().max().unwrap_or(0);
    let mut top: Vec<(&(String, u64), &usize)> = reads.iter().collect();
    top.sort_by_key(|(_, n)| std::cmp::Reverse(**n));
    eprintln!("hottest keys (key, second, GetItems): {:?}", &top[..top.len().min(4)]);
    let gets: usize = blobs.iter().zip(&gets_before).map(|(b, before)| hub.cdn_gets(b) - before).sum();
    m.upstream_gets_per_blob = gets as f64 / blobs.len() as f64;
    m
}

/// The image every node pulls: a config, two small layers and one big one.
fn publish(hub: &FakeHub, name: &str, seed: u64, big: u64) -> Vec<String> {
    let mut img = images::small_image(Format::Docker, "amd64", seed, 2);
    let big_digest = hub.put_synthetic_blob(name, big, seed);
    let mut v: serde_json::Value = serde_json::from_slice(&img.manifest).unwrap();
    v["layers"].as_array_mut().unwrap().push(serde_json::json!({
        "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "digest": big_digest, "size": big,
    }));
    img.manifest = bytes::Bytes::from(serde_json::to_vec(&v).unwrap());
    img.digest = images::sha256(&img.manifest);
    hub.publish(name, "1", &Published::Image(img.clone()));
    img.blobs().into_iter().map(|(d, _)| d).chain(std::iter::once(big_digest)).collect()
}

/// Removes the big layer from the cache (as GC would), keeping manifests.
async fn forget(w: &World, digest: &str) {
    use hubcap::storage::{BlobStore, SweepIndex};
    let (store, index) = hubcap::storage::aws::connect(&w.direct, hubcap::storage::aws::SdkRole::Batch).await;
    let d = hubcap::oci::Digest::parse(digest).unwrap();
    assert!(index.begin_blob_delete(&d, i64::MAX, Duration::from_secs(60)).await.unwrap());
    store.delete(&d).await.unwrap();
    index.finish_blob_delete(&d, &["docker.io/library/herd".to_owned()]).await.unwrap();
}

fn row(design: &str, scenario: &str, herd: Herd, m: &Measured) -> String {
    let per_pull = m.instance_secs / m.pulls as f64;
    let scale = (10_000.0 / 60.0) / (herd.nodes as f64 / herd.window.as_secs_f64());
    format!(
        "| {design} | {scenario} | {}/{} | {per_pull:.3} | {} ({}) | {:.1} | {} | {:.2} | {:.1} s | {:.0} | {:.0} |",
        m.pulls - m.failed,
        m.pulls,
        m.peak_instances,
        m.instances_made,
        m.get_items as f64 / m.pulls as f64,
        m.hottest_key_per_sec,
        m.upstream_gets_per_blob,
        m.slowest_pull,
        m.peak_instances as f64 * scale,
        m.hottest_key_per_sec as f64 * scale,
    )
}

const HEADER: &str = "| design | scenario | pulls ok | instance-s per pull | peak instances (made) | GetItems per pull | hottest key GetItems/s | upstream GETs per blob | slowest pull | peak instances at 10,000 in 60 s | hottest key reads/s at 10,000 in 60 s |\n|---|---|---|---|---|---|---|---|---|---|---|";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_herd_pulling_one_new_image_through_single_request_instances() {
    let full = std::env::var("HUBCAP_BENCH").is_ok_and(|v| v == "full");
    let herd = if full {
        Herd { nodes: 300, window: Duration::from_secs(30), big: 24 * MIB, rate: 1_500_000 }
    } else {
        Herd { nodes: 20, window: Duration::from_secs(4), big: 24 * MIB, rate: 3_000_000 }
    };
    // The smoke run mixes in podman nodes (one try per layer: they must be
    // held, never told to come back); the full run is Docker's daemon only.
    let podman_every = if full { 0 } else { 4 };
    let designs: &[(BlobWaitMode, &str)] =
        if full { &[(BlobWaitMode::Hold, "hold (today)"), (BlobWaitMode::Retry, "retry")] } else { &[(BlobWaitMode::Retry, "retry")] };
    let hub = FakeHub::start().await;
    let relay = Relay::start(hub.cdn.parse().unwrap(), Some(herd.rate)).await;
    hub.set_fault(Fault::RedirectBlobsTo(relay.url.clone()));
    let relay_addr = relay.url.trim_start_matches("http://").to_owned();
    let mut rows = Vec::new();
    for (i, (mode, label)) in designs.iter().enumerate() {
        let name = "library/herd";
        let blobs = publish(&hub, name, 900 + i as u64, herd.big);
        let w = world(&hub, &relay_addr, &format!("herd{i}")).await;
        let cold = scenario(&w, &hub, &relay_addr, *mode, herd, name, &blobs, podman_every).await;
        eprintln!("{label} cold: {cold:?}");
        rows.push(row(label, "cold", herd, &cold));
        let warm = scenario(&w, &hub, &relay_addr, *mode, herd, name, &blobs, podman_every).await;
        eprintln!("{label} warm: {warm:?}");
        rows.push(row(label, "warm", herd, &warm));
        for (m, what) in [(&cold, "cold"), (&warm, "warm")] {
            assert_eq!(m.failed, 0, "{label} {what}: no pull fails");
        }
        assert_eq!(cold.upstream_gets_per_blob, 1.0, "{label}: one upstream GET per blob, whatever the herd");
        assert_eq!(warm.upstream_gets_per_blob, 0.0, "{label}: nothing upstream when warm");
        if *mode == BlobWaitMode::Retry && podman_every > 0 {
            // podman is held through the copy; Docker's daemon waits outside
            // (same herd, same moment, so load slows both alike).
            let docker = cold.docker_instance_secs / cold.docker_pulls as f64;
            let podman = (cold.instance_secs - cold.docker_instance_secs) / (cold.pulls - cold.docker_pulls) as f64;
            eprintln!("instance-s per pull: Docker {docker:.2}, podman {podman:.2}");
            assert!(docker * 3.0 < podman, "{label}: Docker's clients wait outside: {docker:.2} instance-s per pull, podman's {podman:.2}");
            // The README's claim, as stated.
            assert!(docker < 1.0, "{label}: Docker's clients hold under a second of instance time per pull: {docker:.2}");
        }
        if full {
            forget(&w, blobs.last().unwrap()).await;
            let half = scenario(&w, &hub, &relay_addr, *mode, herd, name, &blobs, podman_every).await;
            eprintln!("{label} half-cold: {half:?}");
            rows.push(row(label, "half-cold", herd, &half));
        }
        let _ = w.pump_stop.send(true);
        tokio::time::sleep(Duration::from_millis(500)).await;
        drop(w.moto);
    }
    let table = format!("{HEADER}\n{}", rows.join("\n"));
    println!("{table}");
    if full {
        write_section(herd, &table);
    }
}

/// Puts the table into BENCHMARKS.md between the herd markers.
fn write_section(herd: Herd, table: &str) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/BENCHMARKS.md");
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let (start, end) = ("<!-- herd:start -->", "<!-- herd:end -->");
    let section = format!(
        "{start}\n## The herd simulation\n\n`HUBCAP_BENCH=full cargo test --release --test herd -- --nocapture` (run by `bench/run.sh`): {} simulated Docker clients pull one new image (config, two small layers, one of {} MiB copied at {:.1} MB/s) spread over {} s, through `api` instances that serve one request at a time with caches of their own (a new one whenever all are busy), on moto, the fetcher fed by the stream; one run per row. The last two columns scale the measured peaks to 10,000 nodes in 60 s by the arrival rate (SCALING.md); per-pull figures do not change with N.\n\n{table}\n{end}",
        herd.nodes,
        herd.big / MIB,
        herd.rate as f64 / 1e6,
        herd.window.as_secs()
    );
    let out = match (text.find(start), text.find(end)) {
        (Some(a), Some(b)) => format!("{}{section}{}", &text[..a], &text[b + end.len()..]),
        _ => format!("{}\n\n{section}\n", text.trim_end()),
    };
    std::fs::write(path, out).unwrap();
}
