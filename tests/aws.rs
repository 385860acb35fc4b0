//! The mirror on S3 + DynamoDB (moto_server on loopback): what a hit costs,
//! the fetcher fed by real DynamoDB Stream records, instances sharing one
//! table, an unreachable backend, the sample events in `events/`, and the
//! three Lambda binaries under `cargo lambda watch`: skopeo pulling through
//! `api` and `fetcher`, then `gc` invoked with the sample scheduled event.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::fakehub::{FakeHub, Fault};
use common::images::{self, Format, Published, sha256};
use common::lambda::{self, LambdaStack};
use common::moto::{CountingProxy, Moto, StreamPump, aws_json, storage_at};
use common::procs::{Proc, free_port, run, wait_ready};
use common::{ALL_MANIFESTS, Hubcap, client, config, error_code, get_blob, get_manifest, pull};
use hubcap::assemble::{Backend, Options};
use hubcap::mirror::fetch::Fetcher;
use hubcap::mirror::upstream::Upstreams;
use hubcap::mirror::upstream::build_upstreams;
use hubcap::storage::aws::AwsStorage;
use hubcap::storage::{BlobState, BlobStore, FetchIndex, ServeIndex};
use tower::ServiceExt;

fn upstreams(hub: &FakeHub) -> Upstreams {
    build_upstreams(&[format!("docker.io={}", hub.url)], &common::upstream_limits(), &HashMap::new()).unwrap()
}

fn aws_opts(storage: AwsStorage, hub: &FakeHub) -> Options {
    common::options(Backend::Aws(Box::new(storage)), vec![format!("docker.io={}", hub.url)], config())
}

/// Serves a router on a loopback port (the `api` function, minus Lambda).
async fn serve(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    url
}

/// Feeds the fetcher from the table's stream until dropped, as the event
/// source mapping does.
struct Pump {
    stop: Arc<AtomicBool>,
}

impl Pump {
    fn start(moto_url: &str, table: &str, fetcher: Arc<Fetcher>) -> Pump {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, mut pump) = (stop.clone(), StreamPump::new(moto_url, table));
        tokio::spawn(async move {
            while !flag.load(Ordering::SeqCst) {
                let event = pump.poll().await;
                if !event.records.is_empty() {
                    hubcap::lambda::handle_stream(&fetcher, event).await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Pump { stop }
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn calls(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hit_costs_one_get_item_and_no_s3_call_and_nothing_when_warm() {
    let hub = FakeHub::start().await;
    let img = images::small_image(Format::Oci, "amd64", 200, 2);
    hub.publish("library/counted", "1", &Published::Image(img.clone()));
    let moto = Moto::start().await;
    moto.setup("hits-bucket", "hits").await;
    let proxy = CountingProxy::start(&moto.url).await;
    let storage = storage_at(&proxy.url, "hits-bucket", "hits").await;
    let http = client();
    let first = Hubcap::start_opts(aws_opts(storage.clone(), &hub)).await;
    pull(&http, &first.url, "counted", "1").await;

    // A fresh instance: nothing in its memory, everything in DynamoDB.
    let cold = Hubcap::start_opts(aws_opts(storage, &hub)).await;
    let layer = &img.layers[0].0;
    for round in ["cold", "warm"] {
        proxy.take();
        let resp = http.get(format!("{}/v2/counted/manifests/1", cold.url)).header("accept", ALL_MANIFESTS).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let by_tag = proxy.take();
        let resp =
            http.get(format!("{}/v2/counted/manifests/{}", cold.url, img.digest)).header("accept", ALL_MANIFESTS).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let by_digest = proxy.take();
        let resp = http.get(format!("{}/v2/counted/blobs/{layer}", cold.url)).send().await.unwrap();
        assert_eq!(resp.status(), 307);
        let blob = proxy.take();
        let want = if round == "cold" { calls(&[("DynamoDB.GetItem", 1)]) } else { calls(&[]) };
        assert_eq!(by_tag, want, "{round} manifest hit by tag");
        assert_eq!(by_digest, want, "{round} manifest hit by digest");
        assert_eq!(blob, want, "{round} blob hit");
    }
    assert_eq!(hub.count(|c| &c.manifest_get), 1, "upstream was asked once, by the first instance");
}

/// What a new image costs in AWS calls, for the README's long-tail cost: a
/// cold pull of one platform of a two-platform index (5 layers) through the
/// api and the fetcher (fed by the stream), all through the counting proxy;
/// then a warm pull after the tag's TTL from a fresh instance (a
/// re-validation and the pull marks).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn what_a_new_image_costs_in_aws_calls() {
    let hub = FakeHub::start().await;
    let img = images::index(
        Format::Oci,
        vec![images::small_image(Format::Oci, "amd64", 240, 5), images::small_image(Format::Oci, "arm64", 241, 5)],
    );
    hub.publish("library/longtail", "1", &img);
    let moto = Moto::start().await;
    moto.setup("tail-bucket", "tail").await;
    let proxy = CountingProxy::start(&moto.url).await;
    let storage = storage_at(&proxy.url, "tail-bucket", "tail").await;
    let mut cfg = config();
    cfg.blob_wait = Duration::from_secs(5);
    let (router, _) =
        hubcap::lambda::api_router_with(&storage, upstreams(&hub), cfg.clone(), 100, Default::default(), Default::default()).await.unwrap();
    let api = serve(router).await;
    let fetcher = Arc::new(hubcap::lambda::fetcher_with(&storage, upstreams(&hub)).await);
    let pump = Pump::start(&moto.url, "tail", fetcher);
    let http = client();
    proxy.take();
    let pulled = pull(&http, &api, "longtail", "1").await;
    assert_eq!(pulled.digest, img.digest());
    // The fetcher's last writes (ready) land after the client has its URL.
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(pump);
    let cold = proxy.take();
    let writes =
        ["DynamoDB.PutItem", "DynamoDB.UpdateItem", "DynamoDB.DeleteItem", "DynamoDB.TransactWriteItems", "DynamoDB.BatchWriteItem"];
    let count = |calls: &BTreeMap<String, usize>, ops: &[&str]| ops.iter().map(|o| calls.get(*o).copied().unwrap_or(0)).sum::<usize>();
    let s3_writes = |calls: &BTreeMap<String, usize>| {
        calls.iter().filter(|(k, _)| k.starts_with("S3.PUT") || k.starts_with("S3.POST")).map(|(_, n)| n).sum::<usize>()
    };
    eprintln!("cold pull of a new image (index, amd64 manifest, config, 5 layers): {cold:?}");
    let (dynamo_writes, puts) = (count(&cold, &writes), s3_writes(&cold));
    eprintln!("cold: {dynamo_writes} DynamoDB writes, {} reads, {puts} S3 writes", count(&cold, &["DynamoDB.GetItem"]));
    // The bound the README's long-tail line rests on (7 blobs, 2 manifests).
    assert!(dynamo_writes <= 40, "{dynamo_writes} DynamoDB writes for a new image: {cold:?}");
    assert!(puts <= 7 * 3, "{puts} S3 writes: {cold:?}");

    // Past the tag's TTL, a fresh instance: re-validated with a HEAD, marks written.
    hubcap::storage::clock::advance(cfg.tag_ttl + Duration::from_secs(1));
    let (router, _) =
        hubcap::lambda::api_router_with(&storage, upstreams(&hub), cfg, 100, Default::default(), Default::default()).await.unwrap();
    let fresh = serve(router).await;
    proxy.take();
    pull(&http, &fresh, "longtail", "1").await;
    let warm = proxy.take();
    eprintln!("warm pull past the TTL, fresh instance: {warm:?}");
    assert!(count(&warm, &writes) <= 12, "{warm:?}");
    assert_eq!(s3_writes(&warm), 0, "{warm:?}");
}

/// The api on moto (blob misses wait only 200 ms), served on loopback, the
/// fetcher, and a pump of the table's stream that hands records to the test.
struct StreamWorld {
    moto: Moto,
    storage: AwsStorage,
    api: String,
    fetcher: Fetcher,
    pump: StreamPump,
}

async fn stream_world(hub: &FakeHub, table: &str) -> StreamWorld {
    let moto = Moto::start().await;
    let storage = moto.setup(&format!("{table}-bucket"), table).await;
    let mut cfg = config();
    cfg.blob_wait = Duration::from_millis(200);
    let (router, _) =
        hubcap::lambda::api_router_with(&storage, upstreams(hub), cfg, 100, Default::default(), Default::default()).await.unwrap();
    let api = serve(router).await;
    let fetcher = hubcap::lambda::fetcher_with(&storage, upstreams(hub)).await;
    let pump = StreamPump::new(&moto.url, table);
    StreamWorld { moto, storage, api, fetcher, pump }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_fetcher_consumes_real_stream_records() {
    let hub = FakeHub::start().await;
    let img = images::small_image(Format::Docker, "amd64", 201, 3);
    hub.publish("library/streamed", "1", &Published::Image(img.clone()));
    let StreamWorld { moto: _moto, storage, api, fetcher, mut pump } = stream_world(&hub, "stream").await;
    let http = client();

    // The manifest miss writes pending blob items: the stream carries them.
    get_manifest(&http, &api, "streamed", "1", ALL_MANIFESTS).await;
    let event = pump.poll().await;
    let jobs: Vec<String> =
        event.records.iter().filter_map(|r| hubcap::lambda::job_from_record(r).unwrap()).map(|j| j.digest.to_string()).collect();
    let mut want: Vec<String> = img.blobs().into_iter().map(|(d, _)| d).collect();
    want.sort();
    let mut got = jobs.clone();
    got.sort();
    assert_eq!(got, want, "one pending record per config and layer");
    let resp = hubcap::lambda::handle_stream(&fetcher, event.clone()).await;
    assert!(resp.batch_item_failures.is_empty());
    for (digest, _) in img.blobs() {
        get_blob(&http, &api, "streamed", &digest).await;
    }
    // Delivered again (at-least-once): nothing is fetched twice.
    let resp = hubcap::lambda::handle_stream(&fetcher, event).await;
    assert!(resp.batch_item_failures.is_empty());
    for (digest, _) in img.blobs() {
        assert_eq!(hub.cdn_gets(&digest), 1, "{digest}");
    }
    // The fetcher's own writes (claims, completions) are records too, and
    // need no fetch.
    let follow_up = pump.poll().await;
    assert!(!follow_up.records.is_empty(), "the fetcher's writes are on the stream");
    assert!(follow_up.records.iter().all(|r| hubcap::lambda::job_from_record(r).unwrap().is_none()));

    // A corrupted upstream: the records fail (and will be retried), nothing is stored.
    let bad = images::small_image(Format::Oci, "amd64", 202, 1);
    hub.publish("library/streamed", "bad", &Published::Image(bad.clone()));
    get_manifest(&http, &api, "streamed", "bad", ALL_MANIFESTS).await;
    hub.set_fault(Fault::WrongBytes);
    let event = pump.poll().await;
    // Each failure names its record by the stream's sequence number (what
    // the event source mapping retries from), not by its event id.
    let mut pending: Vec<String> = event
        .records
        .iter()
        .filter(|r| hubcap::lambda::job_from_record(r).unwrap().is_some())
        .map(|r| r.change.sequence_number.clone().expect("moto's records carry a sequence number"))
        .collect();
    pending.sort();
    assert_eq!(pending.len(), 2, "config and layer are pending");
    assert!(event.records.iter().all(|r| r.change.sequence_number.as_ref() != Some(&r.event_id)), "the two ids differ");
    let resp = hubcap::lambda::handle_stream(&fetcher, event).await;
    let mut failed: Vec<String> = resp.batch_item_failures.iter().map(|f| f.item_identifier.clone().unwrap()).collect();
    failed.sort();
    assert_eq!(failed, pending, "config and layer both failed, reported by sequence number");
    // A client asking now sees the failed blob retried (pending again), not served.
    let resp = http.get(format!("{api}/v2/streamed/blobs/{}", bad.layers[0].0)).send().await.unwrap();
    assert_eq!(resp.status(), 307);
    assert!(resp.headers()["location"].to_str().unwrap().contains("hubcap-wait=1"));
    let (store, _) = hubcap::storage::aws::connect(&storage, hubcap::storage::aws::SdkRole::Batch).await;
    let d = hubcap::oci::Digest::parse(&bad.layers[0].0).unwrap();
    assert_eq!(store.size(&d).await.unwrap(), None, "nothing unverified in S3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_fetcher_copies_a_batch_concurrently_and_stops_before_its_deadline() {
    use hubcap::lambda::{BatchLimits, handle_stream_within};
    use std::time::Instant;
    let hub = FakeHub::start().await;
    let wide = images::small_image(Format::Docker, "amd64", 210, 4);
    hub.publish("library/batch", "wide", &Published::Image(wide.clone()));
    let late = images::small_image(Format::Docker, "amd64", 211, 2);
    hub.publish("library/batch", "late", &Published::Image(late.clone()));
    let StreamWorld { moto: _moto, api, fetcher, mut pump, .. } = stream_world(&hub, "batch").await;
    let http = client();
    let ids = |event: &aws_lambda_events::event::dynamodb::Event| -> Vec<String> {
        event.records.iter().map(|r| r.change.sequence_number.clone().unwrap()).collect()
    };
    // What the event source mapping's filter lets through: pending blobs.
    let pending = |mut event: aws_lambda_events::event::dynamodb::Event| {
        event.records.retain(|r| hubcap::lambda::job_from_record(r).unwrap().is_some());
        event
    };

    // Five blobs, each answered by upstream only after a second: copied
    // side by side, the batch takes about one second, not five.
    get_manifest(&http, &api, "batch", "wide", ALL_MANIFESTS).await;
    let event = pending(pump.poll().await);
    assert_eq!(event.records.len(), 5, "config and four layers");
    hub.set_fault(Fault::Slow(Duration::from_secs(1)));
    let started = Instant::now();
    let resp = handle_stream_within(&fetcher, event, BatchLimits::unbounded(5)).await;
    let took = started.elapsed();
    assert!(resp.batch_item_failures.is_empty(), "{:?}", resp.batch_item_failures);
    assert!(took < Duration::from_millis(3500), "five one-second copies at once took {took:?}");
    for (digest, _) in wide.blobs() {
        assert_eq!(hub.cdn_gets(&digest), 1, "{digest} copied once");
    }

    // Near its deadline the handler starts nothing new and cuts off what
    // runs: every record is reported back (by its sequence number) and the
    // cut-off blob is pending again at once, with no lease to wait out.
    hub.set_fault(Fault::None);
    get_manifest(&http, &api, "batch", "late", ALL_MANIFESTS).await;
    let event = pending(pump.poll().await);
    assert_eq!(event.records.len(), 3, "config and two layers");
    let first = hubcap::lambda::job_from_record(&event.records[0]).unwrap().unwrap().digest;
    hub.set_fault(Fault::Slow(Duration::from_secs(5)));
    let now = Instant::now();
    let limits = BatchLimits {
        concurrency: 1,
        stop_starting: Some(now + Duration::from_millis(1000)),
        cut_off: Some(now + Duration::from_millis(1500)),
    };
    let resp = handle_stream_within(&fetcher, event.clone(), limits).await;
    let took = now.elapsed();
    assert!(took < Duration::from_millis(4000), "returned at the cut-off, not after the 5 s copy: {took:?}");
    let mut reported: Vec<String> = resp.batch_item_failures.iter().map(|f| f.item_identifier.clone().unwrap()).collect();
    reported.sort();
    let mut all = ids(&event);
    all.sort();
    assert_eq!(reported, all, "the cut-off record and the two never started");
    let requeued = pump.poll().await;
    let pending_again: Vec<String> =
        requeued.records.iter().filter_map(|r| hubcap::lambda::job_from_record(r).unwrap()).map(|j| j.digest.to_string()).collect();
    assert_eq!(pending_again, vec![first.to_string()], "the cut-off blob is pending again: a fresh stream record");

    // The retry of the reported records copies everything, once.
    hub.set_fault(Fault::None);
    let resp = handle_stream_within(&fetcher, event, BatchLimits::unbounded(4)).await;
    assert!(resp.batch_item_failures.is_empty(), "{:?}", resp.batch_item_failures);
    for (digest, _) in late.blobs() {
        assert_eq!(hub.cdn_gets(&digest), 1, "{digest} copied once");
        get_blob(&http, &api, "batch", &digest).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_sharing_a_table_and_bucket_fetch_each_blob_once() {
    let hub = FakeHub::start().await;
    let img = images::small_image(Format::Oci, "amd64", 203, 4);
    hub.publish("library/shared", "1", &Published::Image(img.clone()));
    let moto = Moto::start().await;
    let storage = moto.setup("shared-bucket", "shared").await;
    let a = Hubcap::start_opts(aws_opts(storage.clone(), &hub)).await;
    let b = Hubcap::start_opts(aws_opts(storage, &hub)).await;
    let http = client();
    let pulls: Vec<_> = (0..10)
        .map(|i| {
            let url = if i % 2 == 0 { a.url.clone() } else { b.url.clone() };
            let http = http.clone();
            tokio::spawn(async move { pull(&http, &url, "shared", "1").await })
        })
        .collect();
    for p in pulls {
        p.await.unwrap();
    }
    for (digest, _) in img.blobs() {
        assert_eq!(hub.cdn_gets(&digest), 1, "{digest} copied once across both instances");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreachable_aws_backend_answers_503() {
    let hub = FakeHub::start().await;
    hub.publish("library/nowhere", "1", &Published::Image(images::small_image(Format::Oci, "amd64", 204, 1)));
    let storage = storage_at(&format!("http://127.0.0.1:{}", free_port()), "gone", "gone").await;
    let mirror = Hubcap::start_opts(aws_opts(storage, &hub)).await;
    let resp = client().get(format!("{}/v2/nowhere/manifests/1", mirror.url)).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "2", "a 503 says when to come back");
    assert_eq!(error_code(resp).await, "UNAVAILABLE");
    assert_eq!(hub.count(|c| &c.manifest_get), 0, "nothing fetched that could not be stored");
}

fn event(name: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("events").join(name)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sample_events_run_through_the_handlers() {
    let hub = FakeHub::start().await;
    // A multi-arch OCI index, as most official images on Docker Hub are now:
    // each front end must deliver all of Docker's Accept headers for it.
    let hello = images::index(
        Format::Oci,
        vec![images::small_image(Format::Oci, "amd64", 205, 1), images::small_image(Format::Oci, "arm64", 215, 1)],
    );
    hub.publish("library/hello", "latest", &hello);
    let sample = hub.put_blob("library/hello", b"hubcap sample blob\n");
    let moto = Moto::start().await;
    let storage = moto.setup("events-bucket", "events").await;
    let (router, _) =
        hubcap::lambda::api_router_with(&storage, upstreams(&hub), config(), 100, Default::default(), Default::default()).await.unwrap();
    let fetcher = Arc::new(hubcap::lambda::fetcher_with(&storage, upstreams(&hub)).await);

    // The sample stream record drives a real copy: its blob is pending in
    // the index, as a miss leaves it, and nothing has fetched it yet.
    let stream: aws_lambda_events::event::dynamodb::Event = serde_json::from_str(&event("dynamodb-stream-pending-blob.json")).unwrap();
    let job = hubcap::lambda::job_from_record(&stream.records[0]).unwrap().unwrap();
    assert_eq!((job.digest.to_string(), job.source.to_string(), job.size), (sample.clone(), "docker.io/library/hello".into(), Some(19)));
    let (store, index) = hubcap::storage::aws::connect(&storage, hubcap::storage::aws::SdkRole::Batch).await;
    assert!(index.create_pending_blob(&job.digest, "docker.io/library/hello", Some(19)).await.unwrap());
    let resp = hubcap::lambda::handle_stream(&fetcher, stream).await;
    assert!(resp.batch_item_failures.is_empty(), "{:?}", resp.batch_item_failures);
    assert_eq!(hub.cdn_gets(&sample), 1, "the record's blob was copied from upstream");
    assert_eq!(store.size(&job.digest).await.unwrap(), Some(19), "into S3");
    let record = index.blob("docker.io/library/hello", &job.digest).await.unwrap().record;
    assert_eq!(record.map(|r| (r.state, r.size)), Some((BlobState::Ready, Some(19))), "and recorded ready");

    // From here on the table's stream feeds the fetcher.
    let _pump = Pump::start(&moto.url, "events", fetcher.clone());
    for kind in ["function-url", "apigw-v2", "apigw-v1"] {
        for (name, status) in [("base", 200), ("manifest-get", 200), ("manifest-head", 200), ("blob-head", 200), ("blob-get", 307)] {
            let file = format!("{kind}-{name}.json");
            let parsed: lambda_http::request::LambdaRequest = serde_json::from_str(&event(&file)).unwrap_or_else(|e| panic!("{file}: {e}"));
            let req = hubcap::lambda::request_from_event(parsed);
            let client = req.extensions().get::<hubcap::http::ClientAddr>().map(|c| c.0.to_string());
            assert_eq!(client.as_deref(), Some("203.0.113.10"), "{file}: the source IP from the request context");
            let resp = router.clone().oneshot(req).await.unwrap();
            assert_eq!(resp.status().as_u16(), status, "{file}");
            if name.starts_with("manifest-") {
                // Docker's own header set, as this front end delivers it.
                assert_eq!(resp.headers()["content-type"], "application/vnd.oci.image.index.v1+json", "{file}: the index");
            }
            if name == "manifest-get" {
                assert_eq!(resp.headers()["docker-content-digest"].to_str().unwrap(), hello.digest(), "{file}");
            }
            if name.ends_with("-head") {
                // A front end writes its own Content-Length (0 for a HEAD):
                // without a digest, containerd and Docker GET instead of
                // trusting it.
                assert!(!resp.headers().contains_key("docker-content-digest"), "{file}: a HEAD carries no digest on Lambda");
            }
            if name == "blob-get" {
                assert!(resp.headers()["location"].to_str().unwrap().contains("events-bucket"), "{file}: redirected to S3");
            }
        }
    }
    assert_eq!(hub.cdn_gets(&sample), 1, "the sample blob was served from S3, not copied again");

    // The statistics read the inventory from DynamoDB.
    let resp = router.clone().oneshot(axum::http::Request::get("/_hubcap/stats").body(axum::body::Body::empty()).unwrap()).await.unwrap();
    assert_eq!(resp.status(), 200);
    let stats: serde_json::Value = serde_json::from_slice(&axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap()).unwrap();
    assert_eq!(stats["cache"]["images"], 1, "{stats}");
    assert!(stats["requests"]["hit"].as_u64().unwrap() > 0, "{stats}");

    // The gc function: the warm schedule's input caches the warm list, the
    // schedule's own event runs a sweep.
    let upstream = format!("docker.io={}", hub.url);
    let settings = |unused_for: &str| {
        <hubcap::config::LambdaSettings as clap::Parser>::try_parse_from([
            "gc",
            "--upstream",
            &upstream,
            "--redirect-allow",
            &hub.cdn,
            "--warm-images",
            "library/hello:latest",
            "--unused-for",
            unused_for,
            "--grace",
            "0",
        ])
        .unwrap()
    };
    let run = |name: &str, unused_for: &str| {
        let (settings, storage) = (settings(unused_for), storage.clone());
        let payload: serde_json::Value = serde_json::from_str(&event(name)).unwrap();
        async move {
            hubcap::lambda::maintenance_on(Backend::Aws(Box::new(storage)), &settings, &payload, Duration::from_secs(120)).await.unwrap()
        }
    };
    let warmed = run("warm.json", "30d").await;
    assert_eq!(warmed["warmed"], serde_json::json!(["library/hello:latest"]), "{warmed}");
    let sweep = run("scheduled.json", "30d").await;
    assert_eq!((sweep["complete"].as_bool(), sweep["before"]["images"].as_u64()), (Some(true), Some(1)), "{sweep}");
    assert!(sweep["expired"].as_array().unwrap().is_empty(), "just warmed: {sweep}");
    hubcap::storage::clock::advance(Duration::from_secs(2));
    let sweep = run("scheduled.json", "1s").await;
    assert_eq!(sweep["expired"], serde_json::json!(["docker.io/library/hello:latest"]), "{sweep}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_api_lambda_runs_on_the_embedded_backend_under_cargo_lambda_watch() {
    let dir = tempfile::tempdir().unwrap();
    let hub = FakeHub::start().await;
    let img = images::small_image(Format::Docker, "amd64", 208, 2);
    hub.publish("library/offline", "1", &Published::Image(img.clone()));
    let data = dir.path().join("data");
    let settings = [
        ("HUBCAP_STORAGE", "local".to_owned()),
        ("HUBCAP_DATA", data.display().to_string()),
        ("HUBCAP_UPSTREAM", format!("docker.io={}", hub.url)),
        ("HUBCAP_REDIRECT_ALLOW", hub.cdn.clone()),
    ];
    // No AWS at all: not even credentials or an endpoint.
    let env = [&settings[..], &[("AWS_EC2_METADATA_DISABLED", "true".into())]].concat();
    // cargo lambda's emulator of the Lambda control plane and Function URLs,
    // running the `api` binary this test build made.
    let (_watch, port) = lambda::watch(dir.path()).await;
    let api = lambda::default_api(dir.path(), port, &env);
    let base = format!("http://127.0.0.1:{port}");
    wait_ready(&format!("{base}/v2/"), &api).await;
    let pulled = pull(&client(), &base, "offline", "1").await;
    assert_eq!(pulled.digest, img.digest);
    assert!(data.join("index.db").exists());
    // Each request left an EMF record for CloudWatch.
    let emf: Vec<serde_json::Value> =
        api.log().lines().filter(|l| l.contains("CloudWatchMetrics")).map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(emf.iter().any(|r| r["Miss"] == 1.0 && r["UpstreamRequests"].as_f64() > Some(0.0)), "{emf:?}");
    assert!(emf.iter().all(|r| r["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "hubcap"));
}

/// The Lambda binaries of this build as the emulator runs them: skopeo
/// pulls through `api` and `fetcher`, then `gc`, invoked with the sample
/// scheduled event, sweeps what they stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn skopeo_pulls_a_multi_arch_image_through_the_lambdas_under_cargo_lambda_watch_and_lambda_dev() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let hub = FakeHub::start().await;
    // A multi-arch OCI index: skopeo, like Docker, sends one Accept header
    // per media type, which the emulator alone would cut to the first.
    let img = images::index(
        Format::Oci,
        vec![images::small_image(Format::Oci, "amd64", 206, 3), images::small_image(Format::Oci, "arm64", 207, 2)],
    );
    hub.publish("library/lambda", "1", &img);

    // The emulator, the api and fetcher functions, and `hubcap lambda-dev`
    // in front (the Function URL's header joining) feeding the stream to
    // the fetcher (the event source mapping).
    let stack = LambdaStack::start(d, "watch", &hub.url, &[]).await;
    let (port, api, fetcher, dev) = (stack.port, &stack.api, &stack.fetcher, &stack.dev);

    // cargo lambda invoke with a sample event.
    let out = run(tokio::process::Command::new("cargo").args([
        "lambda",
        "invoke",
        "api",
        "--invoke-address",
        "127.0.0.1",
        "--invoke-port",
        &port.to_string(),
        "--data-file",
        concat!(env!("CARGO_MANIFEST_DIR"), "/events/function-url-base.json"),
    ]))
    .await;
    assert!(out.contains("\"statusCode\":200") || out.contains("\"statusCode\": 200"), "{out}");

    let conf = common::registries_conf(d, &stack.front, "lambda");
    let policy = common::skopeo_policy(d);
    let out_dir = d.join("pulled");
    let mut cmd = tokio::process::Command::new("skopeo");
    cmd.arg("--registries-conf").arg(&conf).arg("--policy").arg(&policy);
    cmd.args(["copy", "--all", "--retry-times", "0", "docker://docker.io/library/lambda:1"]).arg(format!("dir:{}", out_dir.display()));
    let copied = cmd.stdin(std::process::Stdio::null()).output().await.unwrap();
    let logs = || format!("api:\n{}\nfetcher:\n{}\nlambda-dev:\n{}", api.log(), fetcher.log(), dev.log());
    assert!(copied.status.success(), "skopeo: {}\n{}", String::from_utf8_lossy(&copied.stderr), logs());
    let manifest = std::fs::read(out_dir.join("manifest.json")).unwrap();
    assert_eq!(sha256(&manifest), img.digest(), "the index itself: {}", String::from_utf8_lossy(&manifest));
    for (digest, bytes) in img.all_blobs() {
        let file = out_dir.join(digest.trim_start_matches("sha256:"));
        let got = std::fs::read(&file).unwrap_or_else(|_| panic!("{digest} pulled\n{}", logs()));
        assert_eq!(got, bytes.to_vec(), "{digest}: every byte");
    }
    let (store, _) = hubcap::storage::aws::connect(&stack.storage, hubcap::storage::aws::SdkRole::Batch).await;
    for (digest, _) in img.all_blobs() {
        assert_eq!(hub.cdn_gets(&digest), 1, "{digest} copied from upstream once");
        let d = hubcap::oci::Digest::parse(&digest).unwrap();
        assert!(store.size(&d).await.unwrap().is_some(), "{digest} is in S3, put there by the fetcher");
    }
    assert!(fetcher.log().contains("\"fetched\""), "the fetcher function copied the blobs:\n{}", logs());

    // The gc function, invoked as its schedule invokes it: `cargo lambda
    // invoke` with the sample scheduled event. A size cap of one byte and
    // no grace period: one run evicts the image and deletes every blob.
    let cap = [("HUBCAP_MAX_SIZE", "1".to_owned()), ("HUBCAP_GRACE", "0".to_owned())];
    let gc = stack.function(d, "gc", env!("CARGO_BIN_EXE_gc"), &cap);
    let out = tokio::process::Command::new("cargo")
        .args(["lambda", "invoke", "gc", "--invoke-address", "127.0.0.1", "--invoke-port", &port.to_string(), "--output-format", "json"])
        .args(["--data-file", concat!(env!("CARGO_MANIFEST_DIR"), "/events/scheduled.json")])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    let said = || format!("{}{}\ngc:\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr), gc.log());
    assert!(out.status.success(), "cargo lambda invoke gc: {}", said());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", said()));
    assert_eq!(report["expired"], serde_json::json!(["docker.io/library/lambda:1"]), "{}", said());
    let counts = ["evicted", "deleted_manifests", "deleted_blobs"].map(|k| report[k].as_u64());
    assert_eq!(counts, [Some(1), Some(3), Some(img.all_blobs().len() as u64)], "the index and both platforms, every blob: {}", said());
    assert_eq!((report["complete"].as_bool(), report["before"]["images"].as_u64()), (Some(true), Some(1)), "{}", said());
    // Done, not only said: the bucket and the table hold none of it now.
    assert!(store.stored_digests().await.unwrap().is_empty(), "S3 is empty");
    let (_, index) = hubcap::storage::aws::connect(&stack.storage, hubcap::storage::aws::SdkRole::Batch).await;
    let left = hubcap::lifecycle::inventory(&index).await.unwrap();
    assert_eq!((left.images, left.manifests, left.blobs), (0, 0, 0), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_credentials_come_from_secrets_manager_and_never_reach_the_logs() {
    let hub = FakeHub::start_with(Some(("fleet-bot", "dckr_pat_from_secret"))).await;
    hub.publish("library/private-ish", "1", &Published::Image(images::small_image(Format::Oci, "amd64", 209, 1)));
    let moto = Moto::start().await;
    let secret = serde_json::json!({ "username": "fleet-bot", "password": "dckr_pat_from_secret" }).to_string();
    aws_json(
        &moto.url,
        "secretsmanager",
        "secretsmanager.CreateSecret",
        &serde_json::json!({ "Name": "hubcap/dockerhub", "SecretString": secret }),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_hubcap"));
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--upstream", &format!("docker.io={}", hub.url)])
        .args(["--redirect-allow", &hub.cdn])
        .args(["--credentials-secret", "hubcap/dockerhub"])
        .arg("--data")
        .arg(dir.path().join("data"))
        .env("HUBCAP_LOG", "debug");
    for (k, v) in moto.env() {
        cmd.env(k, v);
    }
    let server = Proc::spawn(&mut cmd, dir.path().join("hubcap.log"));
    let url = format!("http://127.0.0.1:{port}");
    wait_ready(&format!("{url}/v2/"), &server).await;
    pull(&client(), &url, "private-ish", "1").await;
    let log = server.log();
    assert!(log.contains("hubcap serving") && log.contains("DEBUG"), "a debug log was written:\n{log}");
    // Neither the password nor its base64, nor the Basic credentials sent
    // to the token endpoint (base64 of user:password).
    use base64::Engine as _;
    for secret in ["dckr_pat_from_secret", "fleet-bot:dckr_pat_from_secret"] {
        for engine in [base64::engine::general_purpose::STANDARD_NO_PAD, base64::engine::general_purpose::URL_SAFE_NO_PAD] {
            let encoded = engine.encode(secret);
            assert!(!log.contains(&encoded), "{secret} leaked into the log as {encoded}:\n{log}");
        }
    }
    assert!(!log.contains("dckr_pat_from_secret"), "the secret leaked into the log:\n{log}");
}

/// Lambda's delivery faults: a batch delivered again out of order, and
/// again after GC deleted what it names. Nothing is fetched twice, and
/// nothing GC deleted comes back (no item, no object) from an old record.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stream_records_late_or_out_of_order_fetch_nothing_twice_and_resurrect_nothing() {
    let hub = FakeHub::start().await;
    let img = images::small_image(Format::Oci, "amd64", 212, 2);
    hub.publish("library/late", "1", &Published::Image(img.clone()));
    let StreamWorld { moto: _moto, storage, api, fetcher, mut pump } = stream_world(&hub, "late").await;
    let http = client();
    get_manifest(&http, &api, "late", "1", ALL_MANIFESTS).await;
    let event = pump.poll().await;
    assert_eq!(event.records.iter().filter(|r| hubcap::lambda::job_from_record(r).unwrap().is_some()).count(), 3);
    assert!(hubcap::lambda::handle_stream(&fetcher, event.clone()).await.batch_item_failures.is_empty());
    let once = |what: &str| {
        for (digest, _) in img.blobs() {
            assert_eq!(hub.cdn_gets(&digest), 1, "{what}: {digest}");
        }
    };
    once("first delivery");

    let mut reversed = event.clone();
    reversed.records.reverse();
    assert!(hubcap::lambda::handle_stream(&fetcher, reversed).await.batch_item_failures.is_empty());
    once("delivered again, out of order");

    // GC expires the image and deletes its blobs; then the old batch comes.
    let (store, index) = hubcap::storage::aws::connect(&storage, hubcap::storage::aws::SdkRole::Batch).await;
    let opts = hubcap::lifecycle::GcOptions { unused_for: Duration::ZERO, grace: Duration::ZERO, ..Default::default() };
    hubcap::storage::clock::advance(Duration::from_secs(2));
    let report = hubcap::lifecycle::run(&index, &store, &opts).await.unwrap();
    assert_eq!(report.deleted_blobs, 3, "{report:?}");
    pump.poll().await;
    assert!(hubcap::lambda::handle_stream(&fetcher, event).await.batch_item_failures.is_empty());
    once("delivered after GC deleted the blobs");
    for (digest, _) in img.blobs() {
        let d = hubcap::oci::Digest::parse(&digest).unwrap();
        assert!(index.blob_record(&d).await.unwrap().is_none(), "{digest} has no item again");
        assert_eq!(store.size(&d).await.unwrap(), None, "{digest} has no object again");
    }
    assert!(pump.poll().await.records.iter().all(|r| hubcap::lambda::job_from_record(r).unwrap().is_none()), "and queued nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fetch_whose_stream_record_was_lost_is_driven_again() {
    let hub = FakeHub::start().await;
    let img = images::small_image(Format::Oci, "amd64", 210, 1);
    hub.publish("library/lost", "1", &Published::Image(img.clone()));
    let StreamWorld { moto, storage: _, api, fetcher, mut pump } = stream_world(&hub, "lost").await;
    let http = client();
    get_manifest(&http, &api, "lost", "1", ALL_MANIFESTS).await;
    let lost = pump.poll().await; // delivered to nobody
    assert!(!lost.records.is_empty());

    // Two minutes later the layer is still pending.
    let layer = &img.layers[0].0;
    let aged = serde_json::json!({
        "TableName": "lost",
        "Key": { "pk": { "S": format!("blob#{layer}") }, "sk": { "S": "blob" } },
        "UpdateExpression": "SET updated_at = :old",
        "ExpressionAttributeValues": { ":old": { "N": (hubcap::storage::now() - 120).to_string() } },
    });
    aws_json(&moto.url, "dynamodb", "DynamoDB_20120810.UpdateItem", &aged).await;
    pump.poll().await; // the ageing edit is a stream record too: drop it, as a lost one

    // A client asks for it: the mirror re-queues it, and the stream carries it again.
    let resp = http.get(format!("{api}/v2/lost/blobs/{layer}")).send().await.unwrap();
    assert_eq!(resp.status(), 307);
    let again = pump.poll().await;
    let jobs: Vec<String> =
        again.records.iter().filter_map(|r| hubcap::lambda::job_from_record(r).unwrap()).map(|j| j.digest.to_string()).collect();
    assert_eq!(jobs, vec![layer.clone()], "re-queued once");
    assert!(hubcap::lambda::handle_stream(&fetcher, again).await.batch_item_failures.is_empty());
    get_blob(&http, &api, "lost", layer).await;
}

/// A stream record that never reached the fetcher, or exhausted its
/// retries into the dead-letter queue, for a blob no client asks for
/// again: GC's next run queues the copy again (a new record), and the
/// fetcher makes it. This is how what the dead-letter queue lists is
/// replayed, with nothing read from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gc_queues_again_a_copy_whose_record_was_lost() {
    let hub = FakeHub::start().await;
    let img = images::small_image(Format::Oci, "amd64", 213, 1);
    hub.publish("library/dead", "1", &Published::Image(img.clone()));
    let StreamWorld { moto: _moto, storage, api, fetcher, mut pump } = stream_world(&hub, "dead").await;
    let http = client();
    get_manifest(&http, &api, "dead", "1", ALL_MANIFESTS).await;
    let lost = pump.poll().await; // delivered to nobody
    assert_eq!(lost.records.iter().filter(|r| hubcap::lambda::job_from_record(r).unwrap().is_some()).count(), 2);

    let (store, index) = hubcap::storage::aws::connect(&storage, hubcap::storage::aws::SdkRole::Batch).await;
    let report = hubcap::lifecycle::run(&index, &store, &hubcap::lifecycle::GcOptions::default()).await.unwrap();
    assert_eq!(report.requeued_blobs, 0, "a fresh pending blob is left to its record");
    hubcap::storage::clock::advance(Duration::from_secs(120));
    let report = hubcap::lifecycle::run(&index, &store, &hubcap::lifecycle::GcOptions::default()).await.unwrap();
    assert_eq!(report.requeued_blobs, 2, "{report:?}");
    let event = pump.poll().await;
    let mut jobs: Vec<String> =
        event.records.iter().filter_map(|r| hubcap::lambda::job_from_record(r).unwrap()).map(|j| j.digest.to_string()).collect();
    jobs.sort();
    let mut want: Vec<String> = img.blobs().into_iter().map(|(d, _)| d).collect();
    want.sort();
    assert_eq!(jobs, want, "each lost copy queued again, once");
    assert!(hubcap::lambda::handle_stream(&fetcher, event).await.batch_item_failures.is_empty());
    for (digest, bytes) in img.blobs() {
        assert_eq!(get_blob(&http, &api, "dead", &digest).await, bytes);
        assert_eq!(hub.cdn_gets(&digest), 1, "{digest} copied once");
    }
}

/// An object deleted from the bucket behind a `ready` record: S3 answers the
/// presigned URL with 404 until GC's audit, which lists the bucket, puts the
/// blob back to `pending`; the stream record that write emits runs the
/// fetcher, and a new instance serves it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blob_lost_from_the_bucket_is_found_by_gc_and_fetched_again() {
    let hub = FakeHub::start().await;
    let img = images::small_image(Format::Oci, "amd64", 211, 1);
    hub.publish("library/lost", "1", &Published::Image(img.clone()));
    let StreamWorld { moto: _moto, storage, api, fetcher, mut pump } = stream_world(&hub, "lost").await;
    let http = client();
    get_manifest(&http, &api, "lost", "1", ALL_MANIFESTS).await;
    let resp = hubcap::lambda::handle_stream(&fetcher, pump.poll().await).await;
    assert!(resp.batch_item_failures.is_empty());
    let (layer, bytes) = img.blobs().pop().unwrap();
    assert_eq!(get_blob(&http, &api, "lost", &layer).await, bytes);

    let (store, index) = hubcap::storage::aws::connect(&storage, hubcap::storage::aws::SdkRole::Batch).await;
    let digest = hubcap::oci::Digest::parse(&layer).unwrap();
    hubcap::storage::BlobStore::delete(&store, &digest).await.unwrap();
    let resp = http.get(format!("{api}/v2/lost/blobs/{layer}")).send().await.unwrap();
    assert_eq!(resp.status(), 307, "the index still says ready");
    let s3 = http.get(resp.headers()["location"].to_str().unwrap()).send().await.unwrap();
    assert_eq!(s3.status(), 404, "and S3 has no such object");

    let report = hubcap::lifecycle::run(&index, &store, &hubcap::lifecycle::GcOptions::default()).await.unwrap();
    assert_eq!(report.lost_blobs, 1, "{report:?}");
    assert!(report.expired.is_empty() && report.deleted_blobs == 0, "nothing else changed: {report:?}");
    let again = hubcap::lifecycle::run(&index, &store, &hubcap::lifecycle::GcOptions::default()).await.unwrap();
    assert_eq!(again.lost_blobs, 0, "marked once");

    // The write to pending is a stream record the fetcher acts on.
    let event = pump.poll().await;
    let jobs: Vec<String> =
        event.records.iter().filter_map(|r| hubcap::lambda::job_from_record(r).unwrap()).map(|j| j.digest.to_string()).collect();
    assert_eq!(jobs, vec![layer.clone()]);
    let resp = hubcap::lambda::handle_stream(&fetcher, event).await;
    assert!(resp.batch_item_failures.is_empty());
    assert_eq!(hub.cdn_gets(&layer), 2, "copied again once");
    // A new instance (cold cache) serves the blob again.
    let (router, _) =
        hubcap::lambda::api_router_with(&storage, upstreams(&hub), config(), 100, Default::default(), Default::default()).await.unwrap();
    let fresh = serve(router).await;
    assert_eq!(get_blob(&http, &fresh, "lost", &layer).await, bytes);
}
