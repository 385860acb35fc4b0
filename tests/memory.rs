//! A 1 GiB blob is copied from upstream through the fetcher of the real
//! `hubcap serve` binary with bounded memory: peak RSS under 128 MiB, on
//! the embedded backend and on S3 (moto_server). The blob is generated on
//! the fly by the fake Docker Hub, so nothing holds it whole.

mod common;

use std::time::{Duration, Instant};

use common::fakehub::FakeHub;
use common::moto::Moto;
use common::procs::{Proc, free_port, wait_ready};

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
    loop {
        let resp = http.get(format!("{url}/v2/huge/blobs/{digest}")).send().await.unwrap();
        assert_eq!(resp.status(), 307, "{}", server.log());
        if !resp.headers()["location"].to_str().unwrap().contains("hubcap-wait") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(600), "copy too slow:\n{}", server.log());
    }
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(hub.cdn_gets(&digest), 1);
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
