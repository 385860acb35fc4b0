//! AWS faults injected, nothing lost. A fault-injecting proxy in front of
//! moto (`CountingProxy` with a `FaultPlan`) throttles, fails (`500`),
//! resets connections before or half-way through an answer (a write made and
//! reported as failed) and delays answers past the SDK's attempt timeouts, at
//! `HUBCAP_FAULT_PER_MILLE` (default 50: 5 %) of every signed AWS call.
//! Through it: clients pulling cold and warm, a sweep and audit of GC that
//! evicts and deletes, and pulls again; once through `hubcap serve --storage
//! aws` (copies in-process), once through the `api` with the `fetcher` fed by
//! the table's stream (records that fail are delivered again, as Lambda's
//! event source mapping does).
//!
//! Checked afterwards on the raw table and bucket (moto directly, no
//! faults): every pull got verified bytes or `503` with `Retry-After` (never
//! a wrong byte, a `500`, another error or a cut connection); no blob left
//! `pending`, `fetching` or `deleting`; every `ready` blob's object is in the
//! bucket and hashes to its digest; no link says `ready` for a blob that is
//! not; every manifest kept in S3 is there; no multipart upload is left that
//! no checkpoint names; upstream was asked for a blob more than once only as
//! often as a fault or GC's deletion forced it.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::fakehub::FakeHub;
use common::images::{self, Format, Image, Published, sha256};
use common::moto::{AwsFault, CountingProxy, FaultPlan, Moto, StreamPump, aws_json, storage_at};
use common::{ALL_MANIFESTS, Hubcap, client, config};
use hubcap::assemble::Backend;
use hubcap::lifecycle::{GcOptions, GcReport};
use hubcap::mirror::upstream::build_upstreams;
use hubcap::storage::aws::{AwsStorage, SdkRole};

const SEED: u64 = 0x5eed_0024;

fn per_mille() -> u64 {
    std::env::var("HUBCAP_FAULT_PER_MILLE").ok().and_then(|v| v.parse().ok()).unwrap_or(50)
}

/// What the clients saw.
#[derive(Default)]
struct Tally {
    pulls: AtomicU64,
    blobs: AtomicU64,
    bytes: AtomicU64,
    /// `503` answers with `Retry-After` (waited for and asked again).
    unavailable: AtomicU64,
    /// Anything a client must never see.
    violations: Mutex<Vec<String>>,
}

impl Tally {
    fn violation(&self, what: String) {
        eprintln!("VIOLATION: {what}");
        self.violations.lock().unwrap().push(what);
    }
}

/// GETs `url` as a registry client does: follows redirects, waits out a
/// `503` for as long as its `Retry-After` says (cut to a second), and
/// returns the final body. Anything else is a violation.
async fn fetch(
    http: &reqwest::Client,
    base: &str,
    url: String,
    accept: Option<&str>,
    tally: &Tally,
) -> Option<(reqwest::header::HeaderMap, bytes::Bytes)> {
    let mut url = url;
    for _ in 0..60 {
        let mut req = http.get(&url);
        if let Some(a) = accept {
            req = req.header("accept", a);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                tally.violation(format!("GET {url}: {e}"));
                return None;
            }
        };
        match resp.status().as_u16() {
            200 => {
                let headers = resp.headers().clone();
                return match resp.bytes().await {
                    Ok(b) => Some((headers, b)),
                    Err(e) => {
                        tally.violation(format!("GET {url}: body cut: {e}"));
                        None
                    }
                };
            }
            301 | 302 | 303 | 307 | 308 => {
                let loc = resp.headers()["location"].to_str().unwrap().to_owned();
                url = if loc.starts_with('/') { format!("{base}{loc}") } else { loc };
            }
            503 if resp.headers().contains_key("retry-after") => {
                tally.unavailable.fetch_add(1, Ordering::Relaxed);
                let secs: u64 = resp.headers()["retry-after"].to_str().unwrap_or("1").parse().unwrap_or(1);
                tokio::time::sleep(Duration::from_millis(secs.min(1) * 1000)).await;
            }
            status => {
                let body = resp.text().await.unwrap_or_default();
                tally.violation(format!("GET {url}: {status} {body}"));
                return None;
            }
        }
    }
    tally.violation(format!("GET {url}: still unavailable after 60 tries"));
    None
}

/// One pull: the manifest (an index's amd64 child), then every blob, each
/// verified against its digest.
async fn pull(http: &reqwest::Client, base: &str, name: &str, tag: &str, tally: &Tally) {
    let manifest_url = |r: &str| format!("{base}/v2/{name}/manifests/{r}");
    let Some((headers, body)) = fetch(http, base, manifest_url(tag), Some(ALL_MANIFESTS), tally).await else { return };
    let digest = headers.get("docker-content-digest").and_then(|v| v.to_str().ok()).unwrap_or("");
    if digest != sha256(&body) {
        tally.violation(format!("{name}:{tag}: manifest hashes to {}, header said {digest:?}", sha256(&body)));
        return;
    }
    let mut v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    if let Some(children) = v.get("manifests").and_then(|m| m.as_array()).cloned() {
        let want = children[0]["digest"].as_str().unwrap_or("").to_owned();
        let Some((_, body)) = fetch(http, base, manifest_url(&want), Some(ALL_MANIFESTS), tally).await else { return };
        if sha256(&body) != want {
            tally.violation(format!("{name}@{want}: manifest hashes to {}", sha256(&body)));
            return;
        }
        v = serde_json::from_slice(&body).unwrap_or_default();
    }
    let mut blobs = vec![v["config"]["digest"].as_str().unwrap_or("").to_owned()];
    blobs.extend(v["layers"].as_array().into_iter().flatten().filter_map(|l| l["digest"].as_str().map(str::to_owned)));
    for b in blobs {
        let Some((_, bytes)) = fetch(http, base, format!("{base}/v2/{name}/blobs/{b}"), None, tally).await else { return };
        if sha256(&bytes) != b {
            tally.violation(format!("{name}: blob {b} served as bytes hashing to {}", sha256(&bytes)));
            return;
        }
        tally.blobs.fetch_add(1, Ordering::Relaxed);
        tally.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
    }
    tally.pulls.fetch_add(1, Ordering::Relaxed);
}

/// Six images of three small layers, an index of two, and one image with a
/// 20 MiB layer (three S3 parts); (repository, tag) of each.
fn publish(hub: &FakeHub) -> (Vec<(String, String)>, Vec<String>) {
    let mut names = Vec::new();
    let mut blobs = Vec::new();
    let mut add = |hub: &FakeHub, repo: &str, published: Published, imgs: Vec<Image>| {
        hub.publish(&format!("library/{repo}"), "1", &published);
        names.push((repo.to_owned(), "1".to_owned()));
        for img in imgs {
            blobs.extend(img.blobs().into_iter().map(|(d, _)| d));
        }
    };
    for i in 0..6u64 {
        let img = images::small_image(Format::Oci, "amd64", 2400 + i, 3);
        add(hub, &format!("small{i}"), Published::Image(img.clone()), vec![img]);
    }
    let (a, b) = (images::small_image(Format::Oci, "amd64", 2410, 2), images::small_image(Format::Oci, "arm64", 2411, 2));
    add(hub, "multi", images::index(Format::Oci, vec![a.clone(), b]), vec![a]);
    let big = images::image(Format::Oci, "amd64", vec![vec![("big.bin".to_owned(), images::noise(20 << 20, 2420))]]);
    add(hub, "big", Published::Image(big.clone()), vec![big]);
    blobs.sort();
    blobs.dedup();
    (names, blobs)
}

/// `clients` clients each pull every image, in an order of their own.
async fn load(base: &str, names: &[(String, String)], clients: usize, tally: &Arc<Tally>) {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (base, tally) = (base.to_owned(), tally.clone());
        let mut order = names.to_vec();
        order.rotate_left(c % names.len());
        tasks.push(tokio::spawn(async move {
            let http = client();
            for (name, tag) in order {
                pull(&http, &base, &name, &tag, &tally).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// GC through the faults, as its schedule would: a run that fails or stops
/// early is run again. Keeps small0-2 (pinned) and evicts the rest to fit
/// 1 MB, deleting what they referenced at once (no grace).
async fn sweep(storage: &AwsStorage) -> (GcReport, usize) {
    let (store, index) = hubcap::storage::aws::connect(storage, SdkRole::Batch).await;
    let pins =
        ["small0", "small1", "small2"].iter().map(|p| hubcap::lifecycle::Pin::parse(&format!("docker.io/library/{p}")).unwrap()).collect();
    let opts = GcOptions { max_bytes: Some(1 << 20), grace: Duration::ZERO, pins, ..Default::default() };
    let mut failed = 0;
    let mut deleted = 0;
    for _ in 0..10 {
        match hubcap::lifecycle::run(&index, &store, &opts).await {
            Ok(report) if report.complete => {
                deleted += report.deleted_blobs;
                eprintln!("gc: expired {:?}", report.expired);
                return (GcReport { deleted_blobs: deleted, ..report }, failed);
            }
            Ok(report) => deleted += report.deleted_blobs,
            Err(e) => {
                eprintln!("gc run failed (run again): {e}");
                failed += 1;
            }
        }
    }
    panic!("GC never completed a run through the faults");
}

fn attr<'a>(item: &'a serde_json::Value, name: &str, ty: &str) -> Option<&'a str> {
    item.get(name).and_then(|v| v.get(ty)).and_then(|v| v.as_str())
}

/// Every item of `table`, read from moto directly.
async fn scan(moto: &str, table: &str) -> Vec<serde_json::Value> {
    let mut items = Vec::new();
    let mut start: Option<serde_json::Value> = None;
    loop {
        let mut req = serde_json::json!({ "TableName": table });
        if let Some(key) = start.take() {
            req["ExclusiveStartKey"] = key;
        }
        let page = aws_json(moto, "dynamodb", "DynamoDB_20120810.Scan", &req).await;
        items.extend(page["Items"].as_array().cloned().unwrap_or_default());
        match page.get("LastEvaluatedKey") {
            Some(k) if !k.is_null() => start = Some(k.clone()),
            _ => return items,
        }
    }
}

/// The invariants, on the raw table and bucket. Returns the blobs present.
async fn check_store(moto: &str, bucket: &str, table: &str) -> Vec<String> {
    let (s3, _) = hubcap::storage::aws::clients(&common::moto::sdk_at(moto).await, SdkRole::Batch);
    let items = scan(moto, table).await;
    let mut blob_state = HashMap::new();
    let mut checkpoints = Vec::new();
    for item in &items {
        let (pk, sk) = (attr(item, "pk", "S").unwrap_or(""), attr(item, "sk", "S").unwrap_or(""));
        if sk == "blob" {
            let digest = pk.strip_prefix("blob#").unwrap().to_owned();
            let state = attr(item, "state", "S").unwrap_or("").to_owned();
            assert!(state == "ready" || state == "failed", "blob {digest} left {state}: {item}");
            if let Some(cp) = attr(item, "checkpoint", "S") {
                checkpoints.push(cp.to_owned());
            }
            blob_state.insert(digest, (state, attr(item, "size", "N").and_then(|s| s.parse::<u64>().ok())));
        }
    }
    let mut present = Vec::new();
    for (digest, (state, size)) in &blob_state {
        if state != "ready" {
            continue;
        }
        let hex = digest.strip_prefix("sha256:").unwrap();
        let object = s3.get_object().bucket(bucket).key(format!("blobs/sha256/{hex}")).send().await;
        let object = object.unwrap_or_else(|e| panic!("ready blob {digest} has no object: {e:?}"));
        let bytes = object.body.collect().await.unwrap().into_bytes();
        assert_eq!(sha256(&bytes), *digest, "the object of {digest} hashes to something else");
        assert_eq!(Some(bytes.len() as u64), *size, "{digest}'s recorded size");
        present.push(digest.clone());
    }
    for item in &items {
        let (pk, sk) = (attr(item, "pk", "S").unwrap_or(""), attr(item, "sk", "S").unwrap_or(""));
        if pk.starts_with("repo#") && sk.starts_with("blob#") && item.get("ready").and_then(|v| v["BOOL"].as_bool()) == Some(true) {
            let digest = sk.strip_prefix("blob#").unwrap();
            let state = blob_state.get(digest).map(|(s, _)| s.as_str());
            assert_eq!(state, Some("ready"), "link {pk} {sk} says ready, the blob is {state:?}");
        }
        if let Some(key) = attr(item, "body_key", "S") {
            let head = s3.head_object().bucket(bucket).key(key).send().await;
            assert!(head.is_ok(), "manifest {pk} kept at {key}, which is missing");
        }
    }
    let uploads = s3.list_multipart_uploads().bucket(bucket).send().await.unwrap();
    for upload in uploads.uploads() {
        let id = upload.upload_id().unwrap_or("");
        assert!(checkpoints.iter().any(|c| c.contains(id)), "multipart upload {id} of {:?} is named by no checkpoint", upload.key());
    }
    present
}

fn report(path: &str, tally: &Tally, proxy: &CountingProxy, upstream_gets: usize, allowed: usize, gc: &[(GcReport, usize)]) {
    let injected = proxy.faults.injected();
    let mut by_kind: BTreeMap<AwsFault, usize> = BTreeMap::new();
    for ((_, kind), n) in &injected {
        *by_kind.entry(*kind).or_default() += n;
    }
    eprintln!(
        "faults[{path}]: {} of {} signed AWS calls faulted ({:?}); clients: {} pulls, {} blobs ({} MiB) verified, {} answers 503+Retry-After, {} violations; upstream blob GETs {upstream_gets} (at most {allowed} allowed); gc runs: {}",
        proxy.faults.total(),
        proxy.faults.eligible.load(Ordering::SeqCst),
        by_kind,
        tally.pulls.load(Ordering::SeqCst),
        tally.blobs.load(Ordering::SeqCst),
        tally.bytes.load(Ordering::SeqCst) >> 20,
        tally.unavailable.load(Ordering::SeqCst),
        tally.violations.lock().unwrap().len(),
        gc.iter().map(|(r, failed)| format!("deleted {} blobs after {failed} failed runs", r.deleted_blobs)).collect::<Vec<_>>().join("; "),
    );
    eprintln!("faults[{path}] by operation: {injected:?}");
}

/// The final checks shared by both paths.
async fn conclude(
    path: &str,
    (moto, bucket, table): (&str, &str, &str),
    proxy: &CountingProxy,
    hub: &FakeHub,
    blobs: &[String],
    tally: &Tally,
    gc: &[(GcReport, usize)],
) {
    let present = check_store(moto, bucket, table).await;
    let upstream_gets: usize = blobs.iter().map(|b| hub.mirror_cdn_gets(b)).sum();
    let deleted: usize = gc.iter().map(|(r, _)| r.deleted_blobs).sum();
    let allowed = blobs.len() + deleted + proxy.faults.total();
    report(path, tally, proxy, upstream_gets, allowed, gc);
    let violations = tally.violations.lock().unwrap().clone();
    assert!(violations.is_empty(), "{} client violations, first: {:?}", violations.len(), &violations[..violations.len().min(5)]);
    assert!(
        proxy.faults.total() * 1000 >= proxy.faults.eligible.load(Ordering::SeqCst) as usize * per_mille() as usize / 2,
        "faults were injected"
    );
    assert!(
        upstream_gets <= allowed,
        "upstream asked {upstream_gets} times for {} blobs, {deleted} deleted by GC, {} faults",
        blobs.len(),
        proxy.faults.total()
    );
    let present: HashSet<_> = present.into_iter().collect();
    for b in blobs {
        assert!(present.contains(b), "{b} pulled last is stored ready");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_on_aws_loses_nothing_under_injected_faults() {
    let hub = FakeHub::start().await;
    let (names, blobs) = publish(&hub);
    let moto = Moto::start().await;
    moto.setup("faults-bucket", "faults").await;
    let proxy = CountingProxy::start(&moto.url).await;
    let storage = storage_at(&proxy.url, "faults-bucket", "faults").await;
    let opts = || common::options(Backend::Aws(Box::new(storage.clone())), vec![format!("docker.io={}", hub.url)], config());
    let first = Hubcap::start_opts(opts()).await;
    let tally = Arc::new(Tally::default());
    proxy.faults.inject(Some(FaultPlan::all(per_mille(), SEED)));

    load(&first.url, &names, 4, &tally).await; // cold
    let second = Hubcap::start_opts(opts()).await; // an instance with nothing in memory
    load(&second.url, &names, 4, &tally).await; // warm
    // GC with no grace deletes what it evicts at once: only an instance
    // started after it may serve (a running one's memory would still say
    // `ready`; the grace period is what covers that).
    let gc = sweep(&storage).await;
    let after_gc = Hubcap::start_opts(opts()).await;
    load(&after_gc.url, &names, 3, &tally).await; // again, some cold again

    proxy.faults.inject(None);
    let third = Hubcap::start_opts(opts()).await;
    load(&third.url, &names, 1, &tally).await;
    conclude("serve", (&moto.url, "faults-bucket", "faults"), &proxy, &hub, &blobs, &tally, &[gc]).await;
}

fn upstreams(hub: &FakeHub) -> hubcap::mirror::upstream::Upstreams {
    build_upstreams(&[format!("docker.io={}", hub.url)], &common::upstream_limits(), &HashMap::new()).unwrap()
}

/// A new `api` instance (nothing in its memory) on a loopback port, fitted
/// to an HTTP API's 29 s limit.
async fn api(storage: &AwsStorage, hub: &FakeHub) -> String {
    let fit = hubcap::lambda::FrontEndFit { timeout: Some(Duration::from_secs(29)), ..Default::default() };
    let (router, _) = hubcap::lambda::api_router_with(storage, upstreams(hub), config(), 100, Default::default(), fit).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    url
}

/// Feeds the fetcher from the table's stream as the event source mapping
/// does: a record the fetcher reports failed is delivered again (up to
/// three more times, then it goes to the on-failure destination: counted).
fn feed(
    moto: &str,
    table: &str,
    fetcher: Arc<hubcap::mirror::fetch::Fetcher>,
    stop: Arc<AtomicBool>,
    given_up: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    let mut pump = StreamPump::new(moto, table);
    tokio::spawn(async move {
        while !stop.load(Ordering::SeqCst) {
            let mut event = pump.poll().await;
            for _ in 0..4 {
                if event.records.is_empty() {
                    break;
                }
                let resp = hubcap::lambda::handle_stream(&fetcher, event.clone()).await;
                let failed: HashSet<String> = resp.batch_item_failures.iter().filter_map(|f| f.item_identifier.clone()).collect();
                event.records.retain(|r| failed.contains(&r.change.sequence_number.clone().unwrap_or_default()));
            }
            given_up.fetch_add(event.records.len() as u64, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_api_and_fetcher_lose_nothing_under_injected_faults() {
    let hub = FakeHub::start().await;
    let (names, blobs) = publish(&hub);
    let moto = Moto::start().await;
    moto.setup("faults-api-bucket", "faults-api").await;
    let proxy = CountingProxy::start(&moto.url).await;
    let storage = storage_at(&proxy.url, "faults-api-bucket", "faults-api").await;
    let fetcher = Arc::new(hubcap::lambda::fetcher_with(&storage, upstreams(&hub)).await);
    let (stop, given_up) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let feeder = feed(&moto.url, "faults-api", fetcher, stop.clone(), given_up.clone());
    let tally = Arc::new(Tally::default());
    proxy.faults.inject(Some(FaultPlan::all(per_mille(), SEED)));

    let first = api(&storage, &hub).await;
    load(&first, &names, 4, &tally).await;
    let second = api(&storage, &hub).await;
    load(&second, &names, 4, &tally).await;
    let gc = sweep(&storage).await; // no grace: a new instance serves after it
    let after_gc = api(&storage, &hub).await;
    load(&after_gc, &names, 3, &tally).await;

    proxy.faults.inject(None);
    let third = api(&storage, &hub).await;
    load(&third, &names, 1, &tally).await;
    stop.store(true, Ordering::SeqCst);
    feeder.await.unwrap();
    eprintln!("faults[api]: {} stream records went to the on-failure destination", given_up.load(Ordering::SeqCst));
    conclude("api", (&moto.url, "faults-api-bucket", "faults-api"), &proxy, &hub, &blobs, &tally, &[gc]).await;
}

/// AWS that answers nothing in time: the api's SDK settings give up on a
/// call after 5 s (two attempts of 2 s, back-offs under 1 s), so a client
/// gets `503` with `Retry-After` long before the front end's 29 s, and
/// the instance is not timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_api_answers_in_time_when_aws_does_not() {
    let hub = FakeHub::start().await;
    hub.publish("library/late", "1", &Published::Image(images::small_image(Format::Oci, "amd64", 2430, 1)));
    let moto = Moto::start().await;
    moto.setup("late-bucket", "late").await;
    let proxy = CountingProxy::start(&moto.url).await;
    let storage = storage_at(&proxy.url, "late-bucket", "late").await;
    let api = api(&storage, &hub).await;
    let plan = FaultPlan { per_mille: 1000, kinds: vec![AwsFault::Delay], delay: Duration::from_secs(60), seed: SEED };
    proxy.faults.inject(Some(plan));
    let started = std::time::Instant::now();
    let resp = client().get(format!("{api}/v2/late/manifests/1")).header("accept", ALL_MANIFESTS).send().await.unwrap();
    let took = started.elapsed();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    let api_settings = hubcap::storage::aws::settings(SdkRole::Api);
    let bound = api_settings.dynamodb.operation_timeout().unwrap() + Duration::from_secs(2);
    assert!(
        took < bound,
        "answered after {took:?}, the api's DynamoDB calls give up after {:?}",
        api_settings.dynamodb.operation_timeout()
    );
    assert!(proxy.faults.total() >= 2, "the call was attempted again: {:?}", proxy.faults.injected());
}
