//! The three functions run under their own IAM policies from template.yaml
//! (after the SAM transform): every AWS call each one makes on its real code
//! paths is recorded and must be allowed by its policy, or the test fails
//! naming the function, the action and the resource. See common/iam.rs.
//!
//! `HUBCAP_TEMPLATE=path` checks against another template (to see the test
//! fail on a copy with a permission removed).

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::fakehub::{FakeHub, Fault};
use common::iam::{API, EventSourceMapping, FETCHER, GC, Stack, checks, default_credentials, sdk_as, violations};
use common::images::{self, Format, Published};
use common::moto::{CountingProxy, Moto, aws_json};
use common::{ALL_MANIFESTS, client, config, get_manifest, pull};
use hubcap::assemble::Backend;
use hubcap::storage::aws::{AwsStorage, Encryption};

const USER: &str = "fleet-bot";
const TOKEN: &str = "dckr_pat_iam";

async fn serve(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    url
}

/// The backend as `function` sees it: the stack's bucket and table through
/// the recording proxy, signed with the function's credentials.
async fn storage_as(proxy: &CountingProxy, stack: &Stack, function: &str) -> AwsStorage {
    AwsStorage {
        bucket: stack.bucket.clone(),
        table: stack.table.clone(),
        encryption: Encryption::BucketDefault,
        sdk: Some(sdk_as(&proxy.url, function).await),
    }
}

/// A function's cold start: its upstreams, with the credentials read from
/// Secrets Manager by the default AWS configuration, as `api_router` and
/// `fetcher` do.
async fn cold_start_upstreams(proxy: &CountingProxy, function: &str, hub: &FakeHub, secret: &str) -> hubcap::mirror::upstream::Upstreams {
    default_credentials(&proxy.url, function);
    hubcap::assemble::upstreams(&[format!("docker.io={}", hub.url)], &common::upstream_limits(), None, Some(secret)).await.unwrap()
}

/// An image index over `child` padded with an annotation past the size
/// DynamoDB items hold, so the api stores and reads it in S3 (manifests/).
fn large_index(child: images::Image) -> Published {
    let media_type = "application/vnd.oci.image.index.v1+json";
    let body = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [{
            "mediaType": child.media_type, "digest": child.digest, "size": child.manifest.len(),
            "platform": { "architecture": child.arch, "os": "linux" },
        }],
        "annotations": { "org.example.padding": "x".repeat(hubcap::storage::aws::INLINE_MANIFEST_MAX + 1024) },
    });
    Published::Index { media_type: media_type.into(), body: Bytes::from(serde_json::to_vec(&body).unwrap()), children: vec![child] }
}

async fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The stack, created by the test (not by a function): moto with the
/// bucket, the table and its stream, the dead-letter queue and the upstream
/// credentials secret; and the recording proxy the functions call through.
async fn iam_stack(table: &str, secret_value: &str) -> (Moto, Stack, CountingProxy) {
    let moto = Moto::start().await;
    let (bucket, table) = (format!("{table}-bucket"), table.to_owned());
    moto.setup(&bucket, &table).await;
    let described = aws_json(&moto.url, "dynamodb", "DynamoDB_20120810.DescribeTable", &serde_json::json!({ "TableName": table })).await;
    let stream_arn = described["Table"]["LatestStreamArn"].as_str().unwrap().to_owned();
    let queue = aws_json(&moto.url, "sqs", "AmazonSQS.CreateQueue", &serde_json::json!({ "QueueName": format!("{table}-dlq") })).await;
    let queue_url = queue["QueueUrl"].as_str().unwrap().to_owned();
    let attrs = aws_json(
        &moto.url,
        "sqs",
        "AmazonSQS.GetQueueAttributes",
        &serde_json::json!({ "QueueUrl": queue_url, "AttributeNames": ["QueueArn"] }),
    )
    .await;
    let queue_arn = attrs["Attributes"]["QueueArn"].as_str().unwrap().to_owned();
    let secret = aws_json(
        &moto.url,
        "secretsmanager",
        "secretsmanager.CreateSecret",
        &serde_json::json!({ "Name": format!("hubcap/{table}"), "SecretString": secret_value }),
    )
    .await;
    let secret_arn = secret["ARN"].as_str().unwrap().to_owned();
    let stack = Stack { bucket, table, stream_arn, queue_url, queue_arn, secret_arn };
    let proxy = CountingProxy::start(&moto.url).await;
    (moto, stack, proxy)
}

/// Every call the functions made through `proxy`, against their policies:
/// panics naming each one refused; returns the actions each function needed.
fn assert_allowed(proxy: &CountingProxy, stack: &Stack) -> (BTreeMap<String, BTreeSet<String>>, Vec<common::iam::Check>) {
    let calls = proxy.take_records();
    let strangers: Vec<_> = calls.iter().filter(|c| !common::iam::FUNCTIONS.contains(&c.principal.as_str())).collect();
    assert!(strangers.is_empty(), "every call through the proxy is a function's: {strangers:#?}");
    let checks = checks(&calls);
    let (problems, decisions) = violations(stack, &checks);
    let mut seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (c, decision) in &decisions {
        seen.entry(c.function.clone()).or_default().insert(c.action.clone());
        eprintln!("  {decision:9} {} {} {} <- {}", c.function, c.action, c.resource, c.because);
    }
    assert!(problems.is_empty(), "{} call(s) the template's policies do not allow:\n  {}", problems.len(), problems.join("\n  "));
    (seen, checks)
}

const MIB: u64 = 1 << 20;

/// The multipart path of the fetcher and gc under their policies: a 40 MiB
/// layer copied in parts, its copy stopped at a checkpoint (a fetcher out
/// of time, as a killed one leaves it) and continued by the next
/// invocation (ListParts); a corrupt copy's upload aborted; an upload no
/// checkpoint names aborted by GC (ListMultipartUploads).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_multipart_path_is_allowed_by_the_fetcher_and_gc_policies() {
    use hubcap::lambda::{BatchLimits, handle_stream_within};
    use hubcap::storage::{BlobStore as _, FetchIndex as _};
    common::init_logs();
    let hub = FakeHub::start().await;
    let size = 40 * MIB;
    let resumed = hub.put_synthetic_blob("library/iam-big", size, 401);
    // Stored (not generated) bytes: the CDN flips one of them (Fault::WrongBytes).
    let corrupt = hub.put_blob("library/iam-big", &images::noise(size as usize, 402));
    // One stream at 4 MB/s: an 8 MiB part every 2 s or so.
    let relay = common::relay::Relay::start(hub.cdn.parse().unwrap(), Some(4_000_000)).await;
    hub.set_fault(Fault::RedirectBlobsTo(relay.url.clone()));
    let (moto, stack, proxy) = iam_stack("iam-mp", "{}").await;
    let mut limits = common::upstream_limits();
    limits.parallel_ranges = 1;
    limits.redirect_allow.push(relay.url.trim_start_matches("http://").to_owned());
    let upstreams = hubcap::mirror::upstream::build_upstreams(&[format!("docker.io={}", hub.url)], &limits, &HashMap::new()).unwrap();
    let fetcher = hubcap::lambda::fetcher_with(&storage_as(&proxy, &stack, FETCHER).await, upstreams).await;
    let raw = moto.storage(&stack.bucket, &stack.table).await;
    let (store, index) = hubcap::storage::aws::connect(&raw, hubcap::storage::aws::SdkRole::Batch).await;
    let mut pump = common::moto::StreamPump::new(&moto.url, &stack.table);
    let pending = |mut e: aws_lambda_events::event::dynamodb::Event| {
        e.records.retain(|r| hubcap::lambda::job_from_record(r).unwrap().is_some());
        e
    };

    // A copy stopped at a checkpoint, then continued by the next invocation.
    let d = hubcap::oci::Digest::parse(&resumed).unwrap();
    assert!(index.create_pending_blob(&d, "docker.io/library/iam-big", Some(size)).await.unwrap());
    let event = pending(pump.poll().await);
    let cut_off = Instant::now() + Duration::from_secs(6);
    let resp = handle_stream_within(&fetcher, event, BatchLimits { concurrency: 1, stop_starting: None, cut_off: Some(cut_off) }).await;
    assert!(resp.batch_item_failures.is_empty(), "{:?}", resp.batch_item_failures);
    let cp = index.blob_checkpoint(&d).await.unwrap().expect("the stopped copy left a checkpoint");
    assert!(cp.offset >= 8 * MIB && cp.offset < size, "{cp:?}");
    let event = pending(pump.poll().await);
    assert_eq!(event.records.len(), 1, "the stopped blob's fresh record");
    let resp = handle_stream_within(&fetcher, event, BatchLimits::unbounded(1)).await;
    assert!(resp.batch_item_failures.is_empty(), "{:?}", resp.batch_item_failures);
    assert_eq!(store.size(&d).await.unwrap(), Some(size), "continued and completed");

    // A corrupt copy: its upload aborted, nothing stored.
    hub.set_fault(Fault::WrongBytes);
    let bad = hubcap::oci::Digest::parse(&corrupt).unwrap();
    assert!(index.create_pending_blob(&bad, "docker.io/library/iam-big", Some(size)).await.unwrap());
    let event = pending(pump.poll().await);
    assert_eq!(event.records.len(), 1, "the corrupt blob's record");
    let resp = handle_stream_within(&fetcher, event, BatchLimits::unbounded(1)).await;
    assert_eq!(resp.batch_item_failures.len(), 1, "the corrupt copy fails its record");
    assert_eq!(store.size(&bad).await.unwrap(), None);
    assert!(store.uploads().await.unwrap().is_empty(), "its upload was aborted");

    // An upload nothing names (a copy whose record went): GC aborts it once
    // older than a fetch lease.
    let sdk = raw.sdk.clone().unwrap();
    let s3 = aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(&sdk).force_path_style(true).build());
    s3.create_multipart_upload().bucket(&stack.bucket).key(format!("blobs/sha256/{}", "e".repeat(64))).send().await.unwrap();
    assert_eq!(store.uploads().await.unwrap().len(), 1);
    hubcap::storage::clock::advance(hubcap::mirror::fetch::FETCH_LEASE + Duration::from_secs(60));
    let settings = <hubcap::config::LambdaSettings as clap::Parser>::try_parse_from([
        "gc",
        "--upstream",
        &format!("docker.io={}", hub.url),
        "--grace",
        "1d",
    ])
    .unwrap();
    let gc_storage = storage_as(&proxy, &stack, GC).await;
    let payload: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/events/scheduled.json")).unwrap()).unwrap();
    let sweep =
        hubcap::lambda::maintenance_on(Backend::Aws(Box::new(gc_storage)), &settings, &payload, Duration::from_secs(300)).await.unwrap();
    assert_eq!(sweep["aborted_uploads"], 1, "{sweep}");
    assert!(store.uploads().await.unwrap().is_empty());

    let (seen, checks) = assert_allowed(&proxy, &stack);
    for (function, actions) in [
        (FETCHER, &["s3:PutObject", "s3:ListMultipartUploadParts", "s3:AbortMultipartUpload"][..]),
        (GC, &["s3:ListBucketMultipartUploads", "s3:AbortMultipartUpload"][..]),
    ] {
        for action in actions {
            assert!(seen.get(function).is_some_and(|s| s.contains(*action)), "{function} never needed {action}: {seen:#?}");
        }
    }
    // And the same calls against a template without each multipart
    // permission are refused, naming it: the test would catch its removal.
    let original = std::fs::read_to_string(common::iam::template()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (function, line, action) in [
        (FETCHER, "s3:AbortMultipartUpload, s3:ListMultipartUploadParts]", "s3:ListMultipartUploadParts"),
        (FETCHER, "s3:PutObject, s3:AbortMultipartUpload, ", "s3:AbortMultipartUpload"),
        (GC, "[s3:ListBucket, s3:ListBucketMultipartUploads]", "s3:ListBucketMultipartUploads"),
    ] {
        assert_eq!(original.matches(line).count(), 1, "{line}");
        let without = original.replace(line, &line.replace(&format!("{action}, "), "").replace(&format!(", {action}"), ""));
        let path = dir.path().join("template.yaml");
        std::fs::write(&path, without).unwrap();
        let (problems, _) = common::iam::violations_in(&path, &stack, &checks);
        assert!(
            problems.iter().any(|p| p.starts_with(function) && p.contains(action)),
            "without {action}, {function}'s calls are refused: {problems:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_aws_call_of_the_functions_is_allowed_by_their_template_policies() {
    common::init_logs();
    // Upstream requires the credentials kept in Secrets Manager.
    let hub = FakeHub::start_with(Some((USER, TOKEN))).await;
    let app = images::small_image(Format::Oci, "amd64", 301, 2);
    let big = large_index(app.clone());
    hub.publish("library/iam-app", "1", &big);
    let broken = images::small_image(Format::Oci, "amd64", 302, 1);
    hub.publish("library/iam-broken", "1", &Published::Image(broken.clone()));
    let warm = images::small_image(Format::Docker, "amd64", 303, 2);
    hub.publish("library/iam-warm", "1", &Published::Image(warm.clone()));

    // The stack, created by the test (not by a function).
    let moto = Moto::start().await;
    let (bucket, table) = ("iam-bucket".to_owned(), "iam".to_owned());
    moto.setup(&bucket, &table).await;
    let described = aws_json(&moto.url, "dynamodb", "DynamoDB_20120810.DescribeTable", &serde_json::json!({ "TableName": table })).await;
    let stream_arn = described["Table"]["LatestStreamArn"].as_str().unwrap().to_owned();
    let queue = aws_json(&moto.url, "sqs", "AmazonSQS.CreateQueue", &serde_json::json!({ "QueueName": "iam-dlq" })).await;
    let queue_url = queue["QueueUrl"].as_str().unwrap().to_owned();
    let attrs = aws_json(
        &moto.url,
        "sqs",
        "AmazonSQS.GetQueueAttributes",
        &serde_json::json!({ "QueueUrl": queue_url, "AttributeNames": ["QueueArn"] }),
    )
    .await;
    let queue_arn = attrs["Attributes"]["QueueArn"].as_str().unwrap().to_owned();
    let secret_value = serde_json::json!({ "username": USER, "password": TOKEN }).to_string();
    let secret = aws_json(
        &moto.url,
        "secretsmanager",
        "secretsmanager.CreateSecret",
        &serde_json::json!({ "Name": "hubcap/dockerhub", "SecretString": secret_value }),
    )
    .await;
    let secret_arn = secret["ARN"].as_str().unwrap().to_owned();
    let stack = Stack { bucket, table, stream_arn, queue_url, queue_arn, secret_arn };
    let proxy = CountingProxy::start(&moto.url).await;
    let http = client();

    // Cold starts of the api and the fetcher (each reads the secret), and
    // the fetcher's event source mapping.
    let api_upstreams = cold_start_upstreams(&proxy, API, &hub, &stack.secret_arn).await;
    let fetcher_upstreams = cold_start_upstreams(&proxy, FETCHER, &hub, &stack.secret_arn).await;
    let api_storage = storage_as(&proxy, &stack, API).await;
    let (router, _) =
        hubcap::lambda::api_router_with(&api_storage, api_upstreams, config(), 100, Default::default(), Default::default()).await.unwrap();
    let api = serve(router).await;
    let fetcher = Arc::new(hubcap::lambda::fetcher_with(&storage_as(&proxy, &stack, FETCHER).await, fetcher_upstreams).await);
    let esm = EventSourceMapping::start(&proxy.url, &stack.stream_arn, fetcher, &stack.queue_url);

    // A cold pull (misses: the fetcher copies the blobs, the api waits),
    // every blob downloaded through its presigned URL; then warm.
    let pulled = pull(&http, &api, "iam-app", "1").await;
    assert_eq!((pulled.digest.as_str(), pulled.image_digest.as_str()), (big.digest().as_str(), app.digest.as_str()));
    pull(&http, &api, "iam-app", "1").await;
    // A second api instance: nothing in memory, everything from DynamoDB
    // and S3 (the large index is stored under manifests/).
    let again = cold_start_upstreams(&proxy, API, &hub, &stack.secret_arn).await;
    let (router, mirror) =
        hubcap::lambda::api_router_with(&api_storage, again, config(), 100, Default::default(), Default::default()).await.unwrap();
    let api2 = serve(router).await;
    pull(&http, &api2, "iam-app", "1").await;
    let resp = http.get(format!("{api2}/_hubcap/stats")).send().await.unwrap();
    assert_eq!(resp.status(), 200, "the stats inventory (a Scan)");
    mirror.flush_stats().await.unwrap();

    // A blob upstream corrupts: the fetch fails, the batch goes to the
    // dead-letter queue.
    hub.set_fault(Fault::WrongBytes);
    get_manifest(&http, &api, "iam-broken", "1", ALL_MANIFESTS).await;
    let dead = esm.dead_lettered.clone();
    wait_for("the failed batch in the dead-letter queue", Duration::from_secs(60), || dead.load(std::sync::atomic::Ordering::SeqCst) > 0)
        .await;
    hub.set_fault(Fault::None);
    esm.stop().await;

    // The gc function: the warm schedule (reads the secret, copies an image
    // in-process), a sweep that keeps everything, then sweeps that expire
    // everything and delete it.
    let upstream = format!("docker.io={}", hub.url);
    let gc_storage = storage_as(&proxy, &stack, GC).await;
    let gc = |event: &str, unused_for: &str| {
        let settings = <hubcap::config::LambdaSettings as clap::Parser>::try_parse_from([
            "gc",
            "--upstream",
            &upstream,
            "--redirect-allow",
            &hub.cdn,
            "--credentials-secret",
            &stack.secret_arn,
            "--warm-images",
            "library/iam-warm:1",
            "--unused-for",
            unused_for,
            "--grace",
            "0",
        ])
        .unwrap();
        let payload: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(format!("{}/events/{event}", env!("CARGO_MANIFEST_DIR"))).unwrap()).unwrap();
        let storage = gc_storage.clone();
        async move {
            hubcap::lambda::maintenance_on(Backend::Aws(Box::new(storage)), &settings, &payload, Duration::from_secs(300)).await.unwrap()
        }
    };
    default_credentials(&proxy.url, GC);
    let warmed = gc("warm.json", "30d").await;
    assert_eq!(warmed["warmed"], serde_json::json!(["library/iam-warm:1"]), "{warmed}");
    let sweep = gc("scheduled.json", "30d").await;
    assert!(sweep["expired"].as_array().unwrap().is_empty(), "{sweep}");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    // The first expires the images and deletes their manifests, stamping
    // their blobs used; a later one (a second on: stamps are in seconds)
    // deletes the blobs.
    let (mut expired, mut deleted_blobs, mut deleted_manifests) = (0, 0, 0);
    for _ in 0..5 {
        let sweep = gc("scheduled.json", "1s").await;
        expired += sweep["expired"].as_array().unwrap().len();
        deleted_blobs += sweep["deleted_blobs"].as_u64().unwrap();
        deleted_manifests += sweep["deleted_manifests"].as_u64().unwrap();
        if deleted_manifests > 0 && sweep["grace_blobs"].as_u64() == Some(0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    assert_eq!(expired, 3, "iam-app, iam-broken, iam-warm");
    assert!(deleted_manifests > 0);
    let stored: Vec<String> = app.blobs().into_iter().chain(warm.blobs()).map(|(d, _)| d).collect();
    assert!(deleted_blobs as usize >= stored.len(), "{deleted_blobs} blobs deleted");
    let (store, _) =
        hubcap::storage::aws::connect(&moto.storage(&stack.bucket, &stack.table).await, hubcap::storage::aws::SdkRole::Batch).await;
    for digest in &stored {
        use hubcap::storage::BlobStore;
        let d = hubcap::oci::Digest::parse(digest).unwrap();
        assert_eq!(store.size(&d).await.unwrap(), None, "{digest} deleted from S3");
    }

    // Every call each function made, against its own policy.
    let calls = proxy.take_records();
    let strangers: Vec<_> = calls.iter().filter(|c| !common::iam::FUNCTIONS.contains(&c.principal.as_str())).collect();
    assert!(strangers.is_empty(), "every call through the proxy is a function's: {strangers:#?}");
    let checks = checks(&calls);
    let (problems, decisions) = violations(&stack, &checks);
    let mut seen: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (c, _) in &decisions {
        seen.entry(c.function.as_str()).or_default().insert(c.action.as_str());
    }
    let summary: Vec<String> = seen.iter().map(|(f, a)| format!("{f}: {}", a.iter().cloned().collect::<Vec<_>>().join(" "))).collect();
    eprintln!("calls checked ({} distinct needs):\n  {}", checks.len(), summary.join("\n  "));
    for (c, decision) in &decisions {
        eprintln!("  {decision:9} {} {} {} <- {}", c.function, c.action, c.resource, c.because);
    }
    assert!(problems.is_empty(), "{} call(s) the template's policies do not allow:\n  {}", problems.len(), problems.join("\n  "));

    // The test exercised what each function does (else it proves little).
    let want: HashMap<&str, &[&str]> = HashMap::from([
        (
            API,
            &[
                "secretsmanager:GetSecretValue",
                "dynamodb:GetItem",
                "dynamodb:PutItem",
                "dynamodb:UpdateItem",
                "dynamodb:Scan",
                "s3:GetObject",
                "s3:PutObject",
            ][..],
        ),
        (
            FETCHER,
            &[
                "secretsmanager:GetSecretValue",
                "dynamodb:UpdateItem",
                "dynamodb:GetRecords",
                "s3:GetObject",
                "s3:ListBucket",
                "s3:PutObject",
                "sqs:SendMessage",
            ][..],
        ),
        (GC, &["secretsmanager:GetSecretValue", "dynamodb:Scan", "dynamodb:DeleteItem", "s3:PutObject", "s3:DeleteObject"][..]),
    ]);
    for (function, actions) in want {
        for action in actions {
            assert!(seen.get(function).is_some_and(|s| s.contains(action)), "{function} never needed {action}: {summary:#?}");
        }
    }
}
