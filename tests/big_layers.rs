//! Big layers: a blob of at least 32 MiB is copied in ranges of at most
//! 8 MiB (balanced: 40 MiB is 8 × 5 MiB), four in flight, hashed in order,
//! on the embedded backend (each part written at its offset of one temp
//! file as it arrives) and on S3 (moto_server).
//! Against an upstream that honours `Range`, one that ignores it (one
//! stream), one that answers the wrong range (the next try reads it whole),
//! one that corrupts a part (nothing stored) and one that cuts parts off
//! (only the part is asked again). The blobs are generated on the fly by the
//! fake Docker Hub. All traffic stays on 127.0.0.1.

mod common;

use std::time::{Duration, Instant};

use common::fakehub::{FakeHub, Fault};
use common::moto::{Moto, StreamPump};
use common::procs::{Proc, free_port, wait_ready};
use common::relay::Relay;
use common::{Hubcap, client};
use hubcap::assemble::Backend;
use hubcap::storage::{BlobStore, FetchIndex};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 40 * MIB;

async fn mirror(hub: &FakeHub, backend: Backend) -> Hubcap {
    Hubcap::start_opts(common::options(backend, vec![format!("docker.io={}", hub.url)], common::config())).await
}

/// HEADs the blob (linking it and starting its copy), then GETs it until
/// the mirror redirects to the stored blob: its status then, and the time.
async fn fetch(m: &Hubcap, digest: &str) -> (u16, Duration) {
    let http = client();
    let started = Instant::now();
    let head = http.head(format!("{}/v2/big/blobs/{digest}", m.url)).send().await.unwrap();
    assert_eq!(head.status(), 200);
    loop {
        let resp = http.get(format!("{}/v2/big/blobs/{digest}", m.url)).send().await.unwrap();
        let status = resp.status().as_u16();
        if status == 200 {
            // Following the copy (`serve`): its last byte comes once it is
            // stored; a copy that fails cuts the body.
            match resp.bytes().await {
                Ok(body) if common::sha256(&body) == digest => continue,
                _ => return (503, started.elapsed()),
            }
        }
        if status != 307 || !resp.headers()["location"].to_str().unwrap().contains("hubcap-wait") {
            return (status, started.elapsed());
        }
        assert!(started.elapsed() < Duration::from_secs(120));
    }
}

/// The stored blob's bytes hash to its digest (read through its URL).
async fn served_intact(m: &Hubcap, digest: &str) {
    let http = reqwest::Client::new();
    let body = http.get(format!("{}/v2/big/blobs/{digest}", m.url)).send().await.unwrap();
    assert_eq!(body.status(), 200);
    assert_eq!(common::sha256(&body.bytes().await.unwrap()), digest);
}

fn body_bytes(hub: &FakeHub) -> u64 {
    hub.counters().cdn_body_bytes.load(std::sync::atomic::Ordering::SeqCst)
}

async fn ranged_cases(backend: impl Fn(&str) -> Backend) {
    let hub = FakeHub::start().await;

    // Honoured: five parts, every byte asked once.
    let digest = hub.put_synthetic_blob("library/big", SIZE, 1);
    let m = mirror(&hub, backend("honoured")).await;
    let (status, took) = fetch(&m, &digest).await;
    assert_eq!(status, 307);
    eprintln!("40 MiB in 8 ranges: {took:.2?}");
    assert_eq!(hub.count(|c| &c.cdn_ranged), 8, "two full rounds of four 5 MiB parts");
    assert_eq!(body_bytes(&hub), SIZE, "no byte asked twice");
    served_intact(&m, &digest).await;

    // Ignored (200, the whole blob): read as that one stream.
    let digest = hub.put_synthetic_blob("library/big", SIZE, 2);
    hub.set_fault(Fault::IgnoreRange);
    let before = (hub.count(|c| &c.cdn_get), body_bytes(&hub));
    assert_eq!(fetch(&m, &digest).await.0, 307);
    assert_eq!((hub.count(|c| &c.cdn_get) - before.0, body_bytes(&hub) - before.1), (1, SIZE), "one GET of the whole blob");
    served_intact(&m, &digest).await;

    // Answered with the wrong range: the copy fails, the next reads it whole.
    let digest = hub.put_synthetic_blob("library/big", SIZE, 3);
    hub.set_fault(Fault::WrongRange);
    assert_eq!(fetch(&m, &digest).await.0, 307);
    served_intact(&m, &digest).await;

    // A part cut off is asked again, not the whole blob.
    let digest = hub.put_synthetic_blob("library/big", SIZE, 4);
    hub.set_fault(Fault::CutRanges);
    let before = body_bytes(&hub);
    assert_eq!(fetch(&m, &digest).await.0, 307);
    let sent = body_bytes(&hub) - before;
    let cuts = hub.count(|c| &c.cuts) as u64;
    assert_eq!(cuts, 8, "every part was cut once");
    assert_eq!(sent, SIZE + cuts * 5 * MIB / 2, "each cut part asked again, nothing else: {sent} bytes for {SIZE}");
    served_intact(&m, &digest).await;

    // A corrupted part: nothing is stored, the client is told.
    let digest = hub.put_synthetic_blob("library/big", SIZE, 5);
    hub.set_fault(Fault::CorruptRange);
    assert_eq!(fetch(&m, &digest).await.0, 503);
    let d = hubcap::oci::Digest::parse(&digest).unwrap();
    assert_eq!(m.mirror.store().size(&d).await.unwrap(), None, "nothing stored");
    let left: Vec<_> = m.mirror.store().uploads().await.unwrap().into_iter().filter(|u| u.digest == d).collect();
    assert!(left.is_empty(), "the upload of wrong bytes is aborted, not kept to continue: {left:?}");
    assert_eq!(m.mirror.index().blob_checkpoint(&d).await.unwrap(), None, "and no checkpoint names it");
    let r = m.mirror.index().blob("docker.io/library/big", &d).await.unwrap().record.unwrap();
    assert!(r.last_error.as_deref().unwrap_or("").contains("hashing to"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_blobs_come_in_parallel_ranges_on_the_embedded_backend() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    ranged_cases(|name| Backend::Local(root.join(name))).await;
    assert_eq!(std::fs::read_dir(root.join("honoured/tmp")).unwrap().count(), 0, "nothing half-written left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_blobs_come_in_parallel_ranges_to_s3() {
    let moto = Moto::start().await;
    let storage = moto.setup("big-bucket", "big").await;
    ranged_cases(|_| Backend::Aws(Box::new(storage.clone()))).await;
}

/// An upstream fast enough for one connection (its first MiB shows it) is
/// read as one stream: the first part, then the rest in one request asked
/// for at once. Two ranged requests, every byte once, on both backends; a
/// wrong range or wrong bytes in that stream are caught as in parts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fast_upstream_is_read_as_one_stream_after_its_first_part() {
    let hub = FakeHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start().await;
    let storage = moto.setup("fast-bucket", "fast").await;
    // Generous, so that a loaded machine still counts as fast (the default
    // is half a second for the whole blob).
    let limits = hubcap::mirror::upstream::UpstreamLimits { one_stream_within: Duration::from_secs(60), ..common::upstream_limits() };
    for (seed, backend) in [(7, Backend::Local(dir.path().join("data"))), (8, Backend::Aws(Box::new(storage.clone())))] {
        let mut opts = common::options(backend, vec![format!("docker.io={}", hub.url)], common::config());
        opts.upstream_limits = limits.clone();
        let m = Hubcap::start_opts(opts).await;
        let digest = hub.put_synthetic_blob("library/big", SIZE, seed);
        let before = (hub.count(|c| &c.cdn_ranged), body_bytes(&hub));
        assert_eq!(fetch(&m, &digest).await.0, 307);
        assert_eq!(hub.count(|c| &c.cdn_ranged) - before.0, 2, "the first part, then the rest");
        assert_eq!(body_bytes(&hub) - before.1, SIZE, "no byte asked twice");
        served_intact(&m, &digest).await;

        // The rest answered with another range (the first part, from byte
        // 0, is right): that copy fails, the next reads the blob whole.
        let digest = hub.put_synthetic_blob("library/big", SIZE, seed + 10);
        hub.set_fault(Fault::WrongRange);
        let before = (hub.count(|c| &c.cdn_ranged), hub.count(|c| &c.cdn_get));
        assert_eq!(fetch(&m, &digest).await.0, 307);
        hub.set_fault(Fault::None);
        let asked = (hub.count(|c| &c.cdn_ranged) - before.0, hub.count(|c| &c.cdn_get) - before.1);
        assert_eq!(asked, (2, 3), "(ranged, all) GETs: the first part, the rest (refused), then the whole blob");
        served_intact(&m, &digest).await;

        // A byte of each ranged answer flipped: nothing stored, no upload
        // left, the client told.
        let digest = hub.put_synthetic_blob("library/big", SIZE, seed + 20);
        hub.set_fault(Fault::CorruptRange);
        assert_eq!(fetch(&m, &digest).await.0, 503);
        hub.set_fault(Fault::None);
        let d = hubcap::oci::Digest::parse(&digest).unwrap();
        assert_eq!(m.mirror.store().size(&d).await.unwrap(), None, "nothing stored");
        assert!(m.mirror.store().uploads().await.unwrap().iter().all(|u| u.digest != d), "the upload of wrong bytes is aborted");
        assert_eq!(m.mirror.index().blob_checkpoint(&d).await.unwrap(), None, "and no checkpoint names it");
    }
}

/// On the embedded backend every part writes its bytes at their offsets of
/// the one temp file as they arrive: with the first part held back
/// upstream, the later parts of the first round are already in the file
/// (the right bytes, where they belong) before byte 0 comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parts_are_written_at_their_offsets_as_they_arrive_on_the_embedded_backend() {
    let hub = FakeHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let digest = hub.put_synthetic_blob("library/big", SIZE, 6);
    let pause = Duration::from_secs(4);
    hub.set_fault(Fault::SlowFirstRange(pause));
    let m = mirror(&hub, Backend::Local(dir.path().join("data"))).await;
    let started = Instant::now();
    let head = client().head(format!("{}/v2/big/blobs/{digest}", m.url)).send().await.unwrap();
    assert_eq!(head.status(), 200);
    // 8 parts of 5 MiB, four at a time: parts 1-3 end at 20 MiB.
    let (part, round) = (5 * MIB, 20 * MIB);
    let tmp = dir.path().join("data/tmp");
    let mut file = None;
    while file.is_none() && started.elapsed() < pause - Duration::from_millis(500) {
        file = std::fs::read_dir(&tmp).unwrap().flatten().map(|e| e.path()).find(|p| p.metadata().is_ok_and(|m| m.len() >= round));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let file = file.unwrap_or_else(|| panic!("no temp file reached {round} bytes while the first part was held back"));
    // The file's length says the last of those parts has begun; the others
    // may still be arriving (a loaded machine): look again until they are
    // whole, while byte 0 is still held back.
    let mut want = Vec::with_capacity((round - part) as usize);
    let mut noise = common::images::Noise::range(6, part, round - part);
    while let Some(chunk) = noise.next_chunk(1 << 20) {
        want.extend_from_slice(&chunk);
    }
    let mut on_file = std::fs::read(&file).unwrap();
    while on_file[part as usize..round as usize] != want[..] && started.elapsed() < pause - Duration::from_millis(300) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        on_file = std::fs::read(&file).unwrap();
    }
    assert!(started.elapsed() < pause, "read before the first part came");
    let at = (part as usize..round as usize).find(|i| on_file[*i] != want[*i - part as usize]);
    assert_eq!(at, None, "every byte of parts 1 to 3 is the blob's, at its offset");
    assert!(on_file[..part as usize].iter().all(|b| *b == 0), "the first part is not there yet");
    assert_eq!(fetch(&m, &digest).await.0, 307);
    assert!(started.elapsed() >= pause);
    served_intact(&m, &digest).await;
}

// ---------------------------------------------------------------------------
// Resumable copies: a copy cut off part-way continues from its checkpoint.

/// `hubcap serve` (this build's binary) in `data`, with `extra` flags and
/// environment; killed with SIGKILL when dropped.
async fn serve(dir: &std::path::Path, hub: &FakeHub, extra: &[&str], env: &[(&str, String)], log: &str) -> (Proc, String) {
    let port = free_port();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_hubcap"));
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--upstream", &format!("docker.io={}", hub.url)])
        .env("HUBCAP_REDIRECT_ALLOW", common::fakehub::cdns().join(","))
        .args(extra)
        .arg("--data")
        .arg(dir.join("data"))
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("HUBCAP_LOG", "info")
        .env("NO_COLOR", "1");
    let proc = Proc::spawn(&mut cmd, dir.join(log));
    let url = format!("http://127.0.0.1:{port}");
    wait_ready(&format!("{url}/_hubcap/stats"), &proc).await;
    (proc, url)
}

/// Starts the blob's copy (a HEAD links it and queues the fetch), then
/// kills the server with SIGKILL once upstream has sent `at` bytes.
async fn kill_mid_copy(proc: &mut Proc, url: &str, hub: &FakeHub, digest: &str, at: u64) -> u64 {
    let head = client().head(format!("{url}/v2/big/blobs/{digest}")).send().await.unwrap();
    assert_eq!(head.status(), 200);
    let started = Instant::now();
    while body_bytes(hub) < at {
        assert!(started.elapsed() < Duration::from_secs(120), "the copy never got to {at} bytes:\n{}", proc.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proc.child.kill().unwrap();
    proc.child.wait().unwrap();
    body_bytes(hub)
}

const RESUMED: &str = "continuing an interrupted copy from its checkpoint";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_copy_killed_mid_way_continues_from_its_checkpoint_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let hub = FakeHub::start().await;
    let size = 512 * MIB;
    let digest = hub.put_synthetic_blob("library/big", size, 21);
    let (mut first, url) = serve(dir.path(), &hub, &[], &[], "first.log").await;
    // Killed once upstream has sent 40% of the blob: a copy from byte 0
    // afterwards would make it 1.4x the blob's size at least.
    let sent = kill_mid_copy(&mut first, &url, &hub, &digest, size * 2 / 5).await;
    eprintln!("killed after upstream sent {sent} bytes");
    let (second, url) = serve(dir.path(), &hub, &[], &[], "second.log").await;
    let http = client();
    let started = Instant::now();
    loop {
        let resp = http.get(format!("{url}/v2/big/blobs/{digest}")).send().await.unwrap();
        if resp.status() == 307 && !resp.headers()["location"].to_str().unwrap().contains("hubcap-wait") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "not copied after the restart:\n{}", second.log());
    }
    let total = body_bytes(&hub);
    eprintln!("upstream sent {total} bytes for a {size}-byte blob: {:.3}x", total as f64 / size as f64);
    assert!(second.log().contains(RESUMED), "the restarted server continued the copy:\n{}", second.log());
    assert!(total as f64 <= size as f64 * 1.1, "upstream bytes {total} for {size}: more than 1.1x");
    let body = reqwest::Client::new().get(format!("{url}/v2/big/blobs/{digest}")).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(common::sha256(&body), digest, "every byte, once, in order");
    let left = std::fs::read_dir(dir.path().join("data/tmp")).unwrap().count();
    assert_eq!(left, 0, "the continued upload became the blob: nothing left in tmp/");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_copy_to_s3_killed_mid_way_is_continued_by_the_fetcher_lambda() {
    use hubcap::lambda::{BatchLimits, handle_stream_within};
    let dir = tempfile::tempdir().unwrap();
    let hub = FakeHub::start().await;
    // Bytes read but not yet durable are lost to a kill: the ranges in
    // flight (32 MiB), the part being filled and the part uploads in flight
    // (8 + 3 x 8 MiB): 64 MiB at most, under a tenth of this blob.
    let size = 768 * MIB;
    let digest = hub.put_synthetic_blob("library/big", size, 22);
    let moto = Moto::start().await;
    let storage = moto.setup("killed-bucket", "killed").await;
    let flags = ["--storage", "aws", "--bucket", "killed-bucket", "--table", "killed"];
    let (mut server, url) = serve(dir.path(), &hub, &flags, &moto.env(), "serve.log").await;
    let sent = kill_mid_copy(&mut server, &url, &hub, &digest, size * 2 / 5).await;
    eprintln!("killed after upstream sent {sent} bytes");

    // The dead server's lease runs out; the record that re-queues the blob
    // runs the fetcher function, which continues the upload in S3.
    let (store, index) = hubcap::storage::aws::connect(&storage, hubcap::storage::aws::SdkRole::Batch).await;
    let d = hubcap::oci::Digest::parse(&digest).unwrap();
    let cp = index.blob_checkpoint(&d).await.unwrap().expect("the killed copy left a checkpoint");
    assert!(cp.offset >= 8 * MIB && cp.offset < size, "{cp:?}");
    let mut pump = StreamPump::new(&moto.url, "killed");
    pump.poll().await;
    hubcap::storage::clock::advance(hubcap::mirror::fetch::FETCH_LEASE + Duration::from_secs(1));
    assert!(index.requeue_stale_blob(&d, Duration::from_secs(60)).await.unwrap(), "the dead copy's lease ran out");
    let event = pending(pump.poll().await);
    assert_eq!(event.records.len(), 1, "the re-queued blob's record");
    let fetcher = hubcap::lambda::fetcher_with(&storage, upstreams(&hub, &[])).await;
    let resp = handle_stream_within(&fetcher, event, BatchLimits::unbounded(1)).await;
    assert!(resp.batch_item_failures.is_empty(), "{:?}", resp.batch_item_failures);
    let total = body_bytes(&hub);
    eprintln!("upstream sent {total} bytes for a {size}-byte blob: {:.3}x", total as f64 / size as f64);
    assert_eq!(store.size(&d).await.unwrap(), Some(size));
    assert!(total as f64 <= size as f64 * 1.1, "upstream bytes {total} for {size}: more than 1.1x");
    assert!(total <= size + sent - cp.offset + 8 * MIB, "only what the checkpoint did not hold was asked again");
    assert_eq!(index.blob_checkpoint(&d).await.unwrap(), None, "a stored blob has no checkpoint");
    let left: Vec<_> = store.uploads().await.unwrap();
    assert!(left.is_empty(), "the continued upload was completed, no other left: {left:?}");
    served_from_s3(&store, &d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fetcher_short_of_time_checkpoints_and_the_next_invocation_finishes_the_copy() {
    use hubcap::lambda::{BatchLimits, handle_stream_within};
    let hub = FakeHub::start().await;
    let size = 256 * MIB;
    let digest = hub.put_synthetic_blob("library/big", size, 23);
    // Each upstream connection capped at 4 MB/s: the copy takes ~16 s.
    let relay = Relay::start(hub.cdn.parse().unwrap(), Some(4_000_000)).await;
    hub.set_fault(Fault::RedirectBlobsTo(relay.url.clone()));
    let moto = Moto::start().await;
    let storage = moto.setup("deadline-bucket", "deadline").await;
    let (store, index) = hubcap::storage::aws::connect(&storage, hubcap::storage::aws::SdkRole::Batch).await;
    let fetcher = hubcap::lambda::fetcher_with(&storage, upstreams(&hub, &[relay.url.trim_start_matches("http://")])).await;
    let mut pump = StreamPump::new(&moto.url, "deadline");
    let d = hubcap::oci::Digest::parse(&digest).unwrap();
    assert!(index.create_pending_blob(&d, "docker.io/library/big", Some(size)).await.unwrap());
    let event = pending(pump.poll().await);
    assert_eq!(event.records.len(), 1);

    // An invocation with 8 s left: it stops at a checkpoint in time.
    let started = Instant::now();
    let limits = BatchLimits { concurrency: 1, stop_starting: None, cut_off: Some(started + Duration::from_secs(8)) };
    let resp = handle_stream_within(&fetcher, event, limits).await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(8), "stopped before the cut-off: {took:?}");
    assert!(resp.batch_item_failures.is_empty(), "a suspended copy is not a failed record: {:?}", resp.batch_item_failures);
    let cp = index.blob_checkpoint(&d).await.unwrap().expect("checkpointed");
    let first = body_bytes(&hub);
    eprintln!("first invocation: {took:?}, checkpoint at {} of {size}, upstream sent {first}", cp.offset);
    assert!(cp.offset >= 32 * MIB && cp.offset < size, "{cp:?}");
    assert!(first <= cp.offset + 8 * MIB, "the parts asked for were read to the end, not dropped: {first} sent, {} kept", cp.offset);
    assert_eq!(store.size(&d).await.unwrap(), None, "nothing visible yet");

    // Putting the blob back to pending was the re-queue: its stream record
    // runs the next invocation, which finishes the copy.
    let event = pending(pump.poll().await);
    assert_eq!(event.records.len(), 1, "the suspended blob's fresh record");
    let resp = handle_stream_within(&fetcher, event, BatchLimits::unbounded(1)).await;
    assert!(resp.batch_item_failures.is_empty(), "{:?}", resp.batch_item_failures);
    let total = body_bytes(&hub);
    eprintln!("upstream sent {total} bytes for a {size}-byte blob across two invocations: {:.3}x", total as f64 / size as f64);
    assert_eq!(store.size(&d).await.unwrap(), Some(size));
    assert!(total <= size + 8 * MIB, "at most one part asked twice: {total}");
    assert!(store.uploads().await.unwrap().is_empty(), "no upload left behind");
    served_from_s3(&store, &d).await;
}

/// Only the event source mapping's filter's records: pending blobs.
fn pending(mut event: aws_lambda_events::event::dynamodb::Event) -> aws_lambda_events::event::dynamodb::Event {
    event.records.retain(|r| hubcap::lambda::job_from_record(r).unwrap().is_some());
    event
}

/// Upstreams for the fetcher function: `hub`, with `also` allowed as
/// redirect targets besides the fake CDNs.
fn upstreams(hub: &FakeHub, also: &[&str]) -> hubcap::mirror::upstream::Upstreams {
    let mut limits = common::upstream_limits();
    limits.redirect_allow.extend(also.iter().map(|s| s.to_string()));
    hubcap::mirror::upstream::build_upstreams(&[format!("docker.io={}", hub.url)], &limits, &Default::default()).unwrap()
}

/// The object's bytes in S3 hash to its digest (through a presigned URL).
async fn served_from_s3(store: &hubcap::storage::aws::S3BlobStore, d: &hubcap::oci::Digest) {
    let url = store.presigned_get(d, Duration::from_secs(60)).await.unwrap();
    let body = reqwest::get(url).await.unwrap().bytes().await.unwrap();
    assert_eq!(common::sha256(&body), d.to_string());
}
