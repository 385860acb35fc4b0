//! Bounded memory of the real `hubcap serve` binary: a 1 GiB blob is copied
//! from upstream (in parallel 8 MiB ranges) with peak RSS under 128 MiB, on
//! the embedded backend and on
//! S3 (moto_server), the blob generated on the fly by the fake Docker Hub so
//! nothing holds it whole; and fat manifests read through a thousand tags
//! do not grow the warm cache past its byte budget.

mod common;

use std::time::{Duration, Instant};

use common::fakehub::FakeHub;
use common::images::{Published, fat_image};
use common::moto::Moto;
use common::procs::{Proc, free_port, wait_ready};
use futures_util::StreamExt;

const GIB: u64 = 1 << 30;
const RSS_LIMIT_KIB: u64 = 128 * 1024;

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

async fn copy_one_gib(extra: &[&str], env: Vec<(&'static str, String)>) -> (u64, f64) {
    let hub = FakeHub::start().await;
    let digest = hub.put_synthetic_blob("library/huge", GIB, 42);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_hubcap"));
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--upstream", &format!("docker.io={}", hub.url)])
        .args(["--redirect-allow", &hub.cdn])
        .arg("--data")
        .arg(dir.path().join("data"))
        .args(extra)
        .env("HUBCAP_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let server = Proc::spawn(&mut cmd, dir.path().join("hubcap.log"));
    let url = format!("http://127.0.0.1:{port}");
    wait_ready(&format!("{url}/v2/"), &server).await;
    let http = common::client();
    let started = Instant::now();
    // The HEAD links the blob and starts its copy; then wait for the 307.
    let head = http.head(format!("{url}/v2/huge/blobs/{digest}")).send().await.unwrap();
    assert_eq!(head.status(), 200);
    common::wait_stored(&http, &url, "huge", &digest, Duration::from_secs(600), || server.log()).await;
    let secs = started.elapsed().as_secs_f64();
    // In 128 ranges of 8 MiB, four at a time: every byte asked once.
    assert_eq!(hub.cdn_gets(&digest), 128);
    assert_eq!(hub.counters().cdn_body_bytes.load(std::sync::atomic::Ordering::SeqCst), GIB);
    (peak_rss_kib(server.child.id()), GIB as f64 / 1e6 / secs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_1_gib_blob_copies_in_bounded_memory_on_the_embedded_backend() {
    let (rss, mbps) = copy_one_gib(&[], vec![]).await;
    eprintln!("embedded backend: 1 GiB copied at {mbps:.0} MB/s, peak RSS {} MiB", rss / 1024);
    assert!(rss < RSS_LIMIT_KIB, "peak RSS {rss} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_1_gib_blob_copies_in_bounded_memory_to_s3() {
    let moto = Moto::start().await;
    moto.setup("huge-bucket", "huge").await;
    let (rss, mbps) = copy_one_gib(&["--storage", "aws", "--bucket", "huge-bucket", "--table", "huge"], moto.env()).await;
    eprintln!("S3 (moto): 1 GiB copied at {mbps:.0} MB/s, peak RSS {} MiB", rss / 1024);
    assert!(rss < RSS_LIMIT_KIB, "peak RSS {rss} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fat_manifests_under_many_tags_keep_memory_bounded() {
    let hub = FakeHub::start().await;
    // 1,000 tags of one 525 KB manifest, and 100 tags of distinct ones.
    let shared = fat_image(1, 525_000);
    for t in 0..1000 {
        hub.publish("library/fat", &format!("s{t}"), &Published::Image(shared.clone()));
    }
    for t in 0..100 {
        hub.publish("library/fat", &format!("d{t}"), &Published::Image(fat_image(100 + t, 525_000)));
    }
    let dir = tempfile::tempdir().unwrap();
    let (server, url) = common::registries::hubcap_serve(dir.path(), &hub.url, 0, &[], "hubcap.log").await;
    let start_rss = peak_rss_kib(server.child.id());
    let http = common::client();
    let tags: Vec<String> = (0..1000).map(|t| format!("s{t}")).chain((0..100).map(|t| format!("d{t}"))).collect();
    let started = Instant::now();
    for round in 0..3 {
        let mut reads = futures_util::stream::iter(tags.iter().map(|t| {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let resp = http.get(format!("{url}/v2/fat/manifests/{t}")).header("accept", common::ALL_MANIFESTS).send().await.unwrap();
                assert_eq!(resp.status(), 200, "{t}");
                resp.bytes().await.unwrap().len()
            }
        }))
        .buffer_unordered(8);
        while let Some(len) = reads.next().await {
            assert!(len > 525_000);
        }
        eprintln!("round {round}: peak RSS {} MiB after {:.1?}", peak_rss_kib(server.child.id()) / 1024, started.elapsed());
    }
    let rss = peak_rss_kib(server.child.id());
    eprintln!("3 × 1,100 reads of 525 KB manifests: peak RSS {} MiB (at start {} MiB)", rss / 1024, start_rss / 1024);
    assert!(rss < 100 * 1024, "peak RSS {rss} KiB");
}
