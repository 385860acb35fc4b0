//! Cold layers from a slow upstream through `hubcap serve` (the embedded
//! backend): containerd and podman try a layer once, so the mirror gives
//! them its bytes as the one upstream copy brings them, instead of holding
//! the request and redirecting it back to itself until they give up. A copy
//! that turns out corrupt cuts every client it was feeding before the last
//! byte: none gets a complete wrong layer. The upstream's CDN is reached
//! through a relay that gives each connection 80 KB/s.

mod common;

use std::time::{Duration, Instant};

use common::containerd::Containerd;
use common::fakehub::{FakeHub, Fault};
use common::images::{self, Format, Published, sha256};
use common::relay::Relay;
use common::{Hubcap, procs::run};
use hubcap::assemble::Backend;

/// The fake hub, its CDN behind a relay at `rate` bytes a second per
/// connection, and a mirror on the embedded backend in `dir`.
async fn slow_world(dir: &std::path::Path, rate: u64) -> (FakeHub, Relay, Hubcap) {
    let hub = FakeHub::start().await;
    let relay = Relay::start(hub.cdn.parse().unwrap(), Some(rate)).await;
    hub.set_fault(Fault::RedirectBlobsTo(relay.url.clone()));
    let mut opts = common::options(Backend::Local(dir.join("data")), vec![format!("docker.io={}", hub.url)], common::config());
    opts.upstream_limits.redirect_allow.push(relay.url.trim_start_matches("http://").to_owned());
    let mirror = Hubcap::start_opts(opts).await;
    (hub, relay, mirror)
}

/// A one-layer image whose layer is `len` bytes of noise.
fn one_layer(len: usize, seed: u64) -> images::Image {
    images::image(Format::Oci, "amd64", vec![vec![("big/noise.bin".to_owned(), images::noise(len, seed))]])
}

/// podman with its storage in `dir` and docker.io mirrored by `mirror`,
/// running `args`.
fn podman(dir: &std::path::Path, mirror: &str, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("podman");
    cmd.env("CONTAINERS_REGISTRIES_CONF", common::registries_conf(dir, mirror, "cold"));
    cmd.arg("--root").arg(dir.join("podman-root")).arg("--runroot").arg(dir.join("podman-run"));
    cmd.args(["--storage-driver", "vfs", "--events-backend", "none", "--cgroup-manager", "cgroupfs"]).args(args);
    cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
    cmd
}

/// `podman pull` of `reference` (linux/amd64).
fn podman_pull(dir: &std::path::Path, mirror: &str, reference: &str) -> tokio::process::Command {
    let policy = common::skopeo_policy(dir);
    let mut cmd = podman(dir, mirror, &["pull", "--arch", "amd64", "--os", "linux", "--signature-policy"]);
    cmd.arg(policy).arg(reference);
    cmd
}

/// A plain client's GET of the blob: when its first byte came, when the
/// last, and what it got (or where it was cut).
async fn follow(mirror: &str, name: &str, digest: &str) -> (Option<Duration>, Duration, Result<Vec<u8>, String>) {
    use futures_util::StreamExt;
    let started = Instant::now();
    let resp = reqwest::get(format!("{mirror}/v2/{name}/blobs/{digest}")).await.unwrap();
    let (mut first, mut got) = (None, Vec::new());
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) => {
                first.get_or_insert(started.elapsed());
                got.extend_from_slice(&c);
            }
            Err(e) => return (first, started.elapsed(), Err(format!("cut after {} bytes: {e}", got.len()))),
        }
    }
    (first, started.elapsed(), Ok(got))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn containerd_and_podman_pull_a_cold_layer_from_a_slow_upstream_as_it_comes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (hub, _relay, mirror) = slow_world(d, 80_000).await;
    let img = one_layer(40 << 20, 3200);
    hub.publish("library/coldbig", "1", &Published::Image(img.clone()));
    let (layer, bytes) = img.layers[0].clone();
    let containerd = Containerd::start(d).await;
    let hosts = containerd.hosts(&mirror.url, "cold");
    let started = Instant::now();
    // Three clients at once: containerd, podman, and one that times bytes.
    let ctr = tokio::spawn({
        let mut cmd = containerd.fetch(&hosts, "docker.io/library/coldbig:1", Some("linux/amd64"));
        async move { cmd.output().await.unwrap() }
    });
    let pod = tokio::spawn({
        let mut cmd = podman_pull(d, &mirror.url, "docker.io/library/coldbig:1");
        async move { cmd.output().await.unwrap() }
    });
    // After the manifest (the clients ask for it first), a plain client.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (first, took, got) = follow(&mirror.url, "library/coldbig", &layer).await;
    let got = got.unwrap();
    assert_eq!(sha256(&got), layer, "the followed bytes are the layer's");
    let first = first.unwrap();
    eprintln!("plain client: first byte after {first:?}, the whole layer after {took:?}");
    assert!(first < Duration::from_secs(10), "bytes from the first seconds: {first:?}");
    for (name, out) in [("ctr", ctr.await.unwrap()), ("podman", pod.await.unwrap())] {
        assert!(out.status.success(), "{name}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    eprintln!("all three pulled the cold {} MiB layer in {:?}", bytes.len() >> 20, started.elapsed());
    assert!(containerd.listed().await.contains(&layer), "containerd stored it (it checks the digest)");
    let digest = run(&mut podman(d, &mirror.url, &["image", "inspect", "--format", "{{.Digest}}", "docker.io/library/coldbig:1"])).await;
    assert_eq!(digest.trim(), img.digest, "podman recorded the image (it checks every layer's digest)");
    // One upstream copy for all three clients.
    let sent = hub.counters().cdn_body_bytes.load(std::sync::atomic::Ordering::SeqCst);
    let total = (bytes.len() + img.config.1.len()) as u64;
    assert!(sent <= total + (1 << 20), "upstream sent {sent} bytes for {total}: one copy");
    assert_eq!(hub.count(|c| &c.manifest_get), 1, "and one manifest GET");
    // Warm, it is a redirect as before.
    let resp = common::client().get(format!("{}/v2/library/coldbig/blobs/{layer}", mirror.url)).send().await.unwrap();
    assert_eq!(resp.status(), 307);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_copy_that_turns_out_corrupt_cuts_every_client_it_was_feeding() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (hub, _relay, mirror) = slow_world(d, 80_000).await;
    let img = one_layer(256 << 10, 3300);
    hub.publish("library/coldbad", "1", &Published::Image(img.clone()));
    // The CDN sends other bytes under the layer's digest (same length).
    let (layer, good) = img.layers[0].clone();
    let mut bad = good.to_vec();
    let at = bad.len() / 2;
    bad[at] ^= 0xff;
    hub.put_lying_blob("library/coldbad", &good, &bad);
    let containerd = Containerd::start(d).await;
    let hosts = containerd.hosts(&mirror.url, "bad");
    let ctr = tokio::spawn({
        let mut cmd = containerd.fetch(&hosts, "docker.io/library/coldbad:1", Some("linux/amd64"));
        async move { cmd.output().await.unwrap() }
    });
    let pod = tokio::spawn({
        let mut cmd = podman_pull(d, &mirror.url, "docker.io/library/coldbad:1");
        async move { cmd.output().await.unwrap() }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (first, _, got) = follow(&mirror.url, "library/coldbad", &layer).await;
    assert!(first.is_some(), "it was following the copy");
    let why = got.expect_err("a corrupt copy's follower is cut, never handed a complete body");
    eprintln!("plain client: {why}");
    for (name, out) in [("ctr", ctr.await.unwrap()), ("podman", pod.await.unwrap())] {
        assert!(!out.status.success(), "{name} got a layer: {}", String::from_utf8_lossy(&out.stdout));
    }
    assert!(!containerd.listed().await.contains(&layer), "containerd stored nothing of it");
    assert!(!d.join("data/blobs/sha256").join(layer.trim_start_matches("sha256:")).exists(), "nor did the mirror");
}

/// The api Lambda cannot stream a layer of gigabytes: under `cargo lambda
/// watch` (behind the worst case of AWS's front ends), a cold large layer
/// that takes longer to copy than containerd waits on the mirror is handed
/// out where the upstream serves it (its CDN), while the fetcher copies it
/// into S3. With `HUBCAP_COLD_BLOBS=wait` containerd is held as before,
/// and gives up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_lambda_a_cold_large_layer_comes_from_the_upstreams_cdn_while_it_is_copied() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let hub = FakeHub::start().await;
    // 24 MiB at 2 MB/s per connection: a copy of about 12 s.
    let relay = Relay::start(hub.cdn.parse().unwrap(), Some(2_000_000)).await;
    hub.set_fault(Fault::RedirectBlobsTo(relay.url.clone()));
    let (img, other) = (one_layer(24 << 20, 3400), one_layer(24 << 20, 3401));
    hub.publish("library/lambdacold", "1", &Published::Image(img.clone()));
    hub.publish("library/lambdawait", "1", &Published::Image(other.clone()));
    let mut allow = common::fakehub::cdns();
    allow.push(relay.url.trim_start_matches("http://").to_owned());
    // A blob still being copied is held 1 s, then the client is sent back
    // (5 times): about 6 s of patience on the mirror's side.
    let env = [("HUBCAP_BLOB_WAIT", "1".to_owned()), ("HUBCAP_REDIRECT_ALLOW", allow.join(","))];
    let stack = common::lambda::LambdaStack::start(d, "coldlambda", &hub.url, &env).await;
    let containerd = Containerd::start(d).await;
    let (layer, _) = img.layers[0].clone();

    let started = Instant::now();
    let hosts = containerd.hosts(&stack.front, "lambda");
    let out = containerd.fetch(&hosts, "docker.io/library/lambdacold:1", Some("linux/amd64")).output().await.unwrap();
    let took = started.elapsed();
    assert!(out.status.success(), "ctr: {}\n{}", String::from_utf8_lossy(&out.stderr), stack.logs());
    assert!(containerd.listed().await.contains(&layer), "containerd stored the layer (digest checked)");
    eprintln!("ctr pulled the cold 24 MiB layer through the api in {took:?}");
    let sent_to_cdn = stack.api.log().lines().any(|l| l.contains(&format!("/blobs/{layer}")) && l.contains("\"status\":307"));
    assert!(sent_to_cdn, "the layer was a redirect:\n{}", stack.api.log());
    // The fetcher copied it into S3 meanwhile (or soon after).
    let (store, _) = hubcap::storage::aws::connect(&stack.storage, hubcap::storage::aws::SdkRole::Batch).await;
    let d_layer = hubcap::oci::Digest::parse(&layer).unwrap();
    let waiting = Instant::now();
    use hubcap::storage::BlobStore as _;
    while store.size(&d_layer).await.unwrap().is_none() {
        assert!(waiting.elapsed() < Duration::from_secs(60), "the layer never reached S3:\n{}", stack.logs());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The setting off: held, sent back, and containerd, which tries once, gives up.
    let wait = stack.variant(&d.join("wait"), &[("HUBCAP_COLD_BLOBS", "wait".to_owned())]).await;
    let (_front, url) = wait.front(d, common::lambda::WORST_CASE).await;
    let hosts = containerd.hosts(&url, "lambda-wait");
    let out = containerd.fetch(&hosts, "docker.io/library/lambdawait:1", Some("linux/amd64")).output().await.unwrap();
    assert!(!out.status.success(), "held past its patience, ctr fails:\n{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("with HUBCAP_COLD_BLOBS=wait: {}", String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or(""));
}
