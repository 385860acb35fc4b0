//! Big layers: a blob of at least 32 MiB is copied in ranges of at most
//! 8 MiB (balanced: 40 MiB is 8 × 5 MiB), four in flight, hashed in order, on the embedded backend and on S3 (moto_server).
//! Against an upstream that honours `Range`, one that ignores it (one
//! stream), one that answers the wrong range (the next try reads it whole),
//! one that corrupts a part (nothing stored) and one that cuts parts off
//! (only the part is asked again). The blobs are generated on the fly by the
//! fake Docker Hub. All traffic stays on 127.0.0.1.

mod common;

use std::time::{Duration, Instant};

use common::fakehub::{FakeHub, Fault};
use common::moto::Moto;
use common::{Hubcap, client};
use hubcap::assemble::Backend;

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
