//! Stories of the pull-through cache, driven over HTTP against the fake
//! Docker Hub on loopback.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::fakehub::{FakeHub, Fault};
use common::images::{self, Format, Published};
use common::{Hubcap, client, config, error_code, get_blob, get_manifest, pull};

async fn setup() -> (FakeHub, tempfile::TempDir, Hubcap) {
    let hub = FakeHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mirror = Hubcap::start(dir.path(), vec![format!("docker.io={}", hub.url)], config()).await;
    (hub, dir, mirror)
}

fn three_layer(seed: u64) -> Published {
    Published::Image(images::small_image(Format::Docker, "amd64", seed, 3))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_pull_makes_no_upstream_get() {
    let (hub, _dir, mirror) = setup().await;
    let img = three_layer(1);
    hub.publish("library/alpine", "3.20", &img);
    let http = client();

    let first = pull(&http, &mirror.url, "alpine", "3.20").await;
    assert_eq!(first.digest, img.digest());
    assert_eq!(hub.count(|c| &c.manifest_get), 1);
    assert_eq!(hub.count(|c| &c.cdn_get), 4, "config and three layers, each copied once");
    assert_eq!(hub.count(|c| &c.cdn_saw_authorization), 0, "the upstream token never reaches the CDN");

    let before = (hub.count(|c| &c.manifest_get), hub.count(|c| &c.manifest_head), hub.count(|c| &c.blob_get), hub.count(|c| &c.cdn_get));
    let second = pull(&http, &mirror.url, "library/alpine", "3.20").await;
    assert_eq!(second.digest, first.digest);
    let after = (hub.count(|c| &c.manifest_get), hub.count(|c| &c.manifest_head), hub.count(|c| &c.blob_get), hub.count(|c| &c.cdn_get));
    assert_eq!(before, after, "the second pull is served from the cache alone");
    assert_eq!(hub.count(|c| &c.token), 1, "one token, reused until it expires");

    let head = http.head(format!("{}/v2/alpine/manifests/3.20", mirror.url)).header("accept", common::ALL_MANIFESTS).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], img.top().1.len().to_string().as_str());
    assert_eq!(head.headers()["docker-content-digest"], img.digest().as_str());
    assert!(head.bytes().await.unwrap().is_empty());

    // The mirror's own account of it, as JSON and for Prometheus.
    let stats: serde_json::Value =
        serde_json::from_slice(&http.get(format!("{}/_hubcap/stats", mirror.url)).send().await.unwrap().bytes().await.unwrap()).unwrap();
    assert!(stats["requests"]["hit"].as_u64().unwrap() >= 5, "{stats}");
    let misses = stats["requests"]["miss"].as_u64().unwrap();
    assert!((1..=5).contains(&misses), "the first pull's misses (prefetched layers are hits): {stats}");
    assert!(stats["hit_ratio"].as_f64().unwrap() > 0.5);
    assert_eq!(stats["upstreams"][0]["ratelimit_remaining"], 99);
    assert_eq!(stats["since_start"]["requests"]["miss"].as_u64(), Some(misses), "this instance's own counts too: {stats}");
    let cached: u64 = img.all_blobs().iter().map(|(_, b)| b.len() as u64).sum();
    assert_eq!((stats["cache"]["images"].as_u64(), stats["cache"]["bytes"].as_u64()), (Some(1), Some(cached)), "{stats}");
    assert_eq!(stats["cache"]["least_recently_pulled"][0]["image"], "docker.io/library/alpine:3.20");
    let metrics = http.get(format!("{}/metrics", mirror.url)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("# TYPE hubcap_requests_total counter"), "{metrics}");
    assert!(metrics.contains(&format!("hubcap_requests_total{{cache=\"miss\"}} {misses}")), "{metrics}");
    assert!(metrics.contains("hubcap_upstream_ratelimit_remaining{registry=\"docker.io\"} 99"), "{metrics}");
    assert!(metrics.contains(&format!("hubcap_cache_bytes {cached}")), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_the_ttl_only_a_head_goes_upstream() {
    let hub = FakeHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    // The tag TTL is 600 s (`config()`): the clock jumps past it, and the
    // next request, made at once, is well within the fresh one.
    let mirror = Hubcap::start(dir.path(), vec![format!("docker.io={}", hub.url)], config()).await;
    let img = three_layer(2);
    hub.publish("library/redis", "7", &img);
    let http = client();
    pull(&http, &mirror.url, "redis", "7").await;
    assert_eq!((hub.count(|c| &c.manifest_get), hub.count(|c| &c.manifest_head)), (1, 0));

    hubcap::storage::clock::advance(Duration::from_secs(601)); // past the tag TTL, no waiting
    let resp = http.get(format!("{}/v2/redis/manifests/7", mirror.url)).header("accept", common::ALL_MANIFESTS).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-cache"], "revalidated");
    assert_eq!((hub.count(|c| &c.manifest_get), hub.count(|c| &c.manifest_head)), (1, 1), "an unchanged tag costs a HEAD, no GET");

    // Within the fresh TTL again: nothing upstream.
    let resp = http.get(format!("{}/v2/redis/manifests/7", mirror.url)).send().await.unwrap();
    assert_eq!(resp.headers()["x-cache"], "hit");
    assert_eq!(hub.count(|c| &c.manifest_head), 1);

    // The tag moves upstream: after the TTL the new image is served.
    let newer = three_layer(3);
    hub.publish("library/redis", "7", &newer);
    hubcap::storage::clock::advance(Duration::from_secs(601)); // past the tag TTL, no waiting
    let pulled = pull(&http, &mirror.url, "redis", "7").await;
    assert_eq!(pulled.digest, newer.digest());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tag_ttl_of_zero_checks_every_time() {
    let hub = FakeHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config();
    cfg.tag_ttl = Duration::ZERO;
    let mirror = Hubcap::start(dir.path(), vec![format!("docker.io={}", hub.url)], cfg).await;
    hub.publish("library/nginx", "1", &three_layer(4));
    let http = client();
    for _ in 0..3 {
        get_manifest(&http, &mirror.url, "nginx", "1", common::ALL_MANIFESTS).await;
    }
    assert_eq!((hub.count(|c| &c.manifest_get), hub.count(|c| &c.manifest_head)), (1, 2));
}

/// A mirror (tag TTL 1 s) that cached postgres:16 from `hub`, the clock
/// moved past the tag's TTL (no waiting): its next pull re-validates.
async fn stale_postgres(hub: &FakeHub) -> (tempfile::TempDir, Hubcap, Published, reqwest::Client) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config();
    cfg.tag_ttl = Duration::from_secs(1);
    let mirror = Hubcap::start(dir.path(), vec![format!("docker.io={}", hub.url)], cfg).await;
    let img = three_layer(5);
    hub.publish("library/postgres", "16", &img);
    let http = client();
    pull(&http, &mirror.url, "postgres", "16").await;
    hubcap::storage::clock::advance(Duration::from_secs(2)); // past the tag TTL, no waiting
    (dir, mirror, img, http)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_upstream_is_down_cached_tags_are_still_served() {
    let hub = FakeHub::start().await;
    let (_dir, mirror, _img, http) = stale_postgres(&hub).await;

    for fault in [Fault::ServerError, Fault::Slow(Duration::from_secs(5)), Fault::RateLimit] {
        hub.set_fault(fault.clone());
        let asked = hub.count(|c| &c.registry);
        let resp =
            http.get(format!("{}/v2/postgres/manifests/16", mirror.url)).header("accept", common::ALL_MANIFESTS).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{fault:?}");
        assert_eq!(resp.headers()["x-cache"], "stale", "{fault:?}");
        assert!(hub.count(|c| &c.registry) > asked, "{fault:?}: upstream was asked, and failed");
        // Let the mirror's back-off after a failure pass, so the next fault is really asked.
        hub.set_fault(Fault::None);
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
}

/// An upstream that is gone (not failing: nothing listens), asked by a
/// mirror with no back-off running: the cached tag is served, at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_upstream_is_gone_cached_tags_are_still_served_at_once() {
    let mut hub = FakeHub::start().await;
    let (_dir, mirror, img, http) = stale_postgres(&hub).await;
    hub.stop().await;
    let started = std::time::Instant::now();
    let resp = http.get(format!("{}/v2/postgres/manifests/16", mirror.url)).header("accept", common::ALL_MANIFESTS).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-cache"], "stale", "re-validation was tried and failed");
    let pulled = pull(&http, &mirror.url, "postgres", "16").await;
    assert_eq!(pulled.digest, img.digest());
    assert!(started.elapsed() < Duration::from_secs(5), "stale answers come fast");

    // Something never cached cannot be served, and says why.
    let resp = http.get(format!("{}/v2/library/other/manifests/1", mirror.url)).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(error_code(resp).await, "UNAVAILABLE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupted_or_truncated_blob_is_never_served_nor_stored() {
    let (hub, dir, mirror) = setup().await;
    let img = images::small_image(Format::Oci, "amd64", 6, 1);
    let layer = img.layers[0].0.clone();
    hub.publish("library/busybox", "1", &Published::Image(img.clone()));
    let http = client();
    let blob_file = dir.path().join("blobs/sha256").join(layer.trim_start_matches("sha256:"));

    for fault in [Fault::WrongBytes, Fault::Truncate] {
        hub.set_fault(fault.clone());
        let resp = http.get(format!("{}/v2/busybox/blobs/{layer}", mirror.url)).send().await.unwrap();
        // A 503, or (a copy followed once it brought bytes) a body cut short.
        if resp.status() == 503 {
            assert_eq!(error_code(resp).await, "UNAVAILABLE");
        } else {
            assert!(common::blob_refused(resp, &layer).await, "{fault:?}: never a complete wrong body");
        }
        assert!(!blob_file.exists(), "{fault:?}: nothing stored");
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0, "no partial file left");
    }

    hub.set_fault(Fault::None);
    let bytes = get_blob(&http, &mirror.url, "busybox", &layer).await;
    assert_eq!(bytes, img.layers[0].1);
    assert!(blob_file.exists());
}

/// A blob GET as a strict client: redirects (back to the mirror while the
/// copy runs, then to the blob) followed, the bytes checked; any other
/// answer, a `503` included, fails the test.
async fn strict_blob(http: &reqwest::Client, base: &str, name: &str, digest: &str) {
    let mut url = format!("{base}/v2/{name}/blobs/{digest}");
    for _ in 0..30 {
        let resp = http.get(&url).send().await.unwrap();
        match resp.status().as_u16() {
            200 => {
                let body = resp.bytes().await.unwrap();
                assert_eq!(common::sha256(&body), digest);
                return;
            }
            307 => {
                let loc = resp.headers()["location"].to_str().unwrap().to_owned();
                url = if loc.starts_with('/') { format!("{base}{loc}") } else { loc };
            }
            s => panic!("blob {digest}: {s} {}", resp.text().await.unwrap_or_default()),
        }
    }
    panic!("blob {digest}: still redirected after 30 hops");
}

/// Twenty clients miss the same image at the same moment: the copies are
/// held upstream until every client is waiting on them, so all twenty
/// overlap; each blob is fetched once and no client is told to come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_pulls_fetch_each_blob_once() {
    let (hub, _dir, mirror) = setup().await;
    let img =
        images::index(Format::Oci, vec![images::small_image(Format::Oci, "amd64", 7, 4), images::small_image(Format::Oci, "arm64", 8, 2)]);
    hub.publish("library/python", "3.12", &img);
    let amd64 = img.images()[0].clone();
    let http = client();
    let url = Arc::new(mirror.url.clone());
    hub.hold_cdn();
    let pulls: Vec<_> = (0..20)
        .map(|_| {
            let (http, url, amd64) = (http.clone(), url.clone(), amd64.clone());
            tokio::spawn(async move {
                let (_, digest, _) = get_manifest(&http, &url, "python", "3.12", common::ALL_MANIFESTS).await;
                get_manifest(&http, &url, "python", &amd64.digest, common::ALL_MANIFESTS).await;
                for (blob, _) in amd64.blobs() {
                    strict_blob(&http, &url, "python", &blob).await;
                }
                digest
            })
        })
        .collect();
    // Every client is asking for the first blob, whose copy is held.
    let first = amd64.blobs()[0].0.clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while hub.cdn_gets(&first) == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    hub.release_cdn();
    for p in pulls {
        assert_eq!(p.await.unwrap(), img.digest());
    }
    for (digest, _) in amd64.blobs() {
        assert_eq!(hub.cdn_gets(&digest), 1, "blob {digest} fetched once");
    }
    assert_eq!(hub.count(|c| &c.manifest_get), 2, "one GET for the index, one for the amd64 manifest");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_names_digests_and_methods_get_the_right_oci_codes() {
    let (hub, _dir, mirror) = setup().await;
    hub.publish("library/alpine", "3", &three_layer(9));
    let http = client();
    let m = &mirror.url;
    let zero = format!("sha256:{}", "0".repeat(64));
    let cases: Vec<(reqwest::Method, String, u16, &str)> = vec![
        (reqwest::Method::GET, format!("{m}/v2/Alpine/manifests/3"), 400, "NAME_INVALID"),
        (reqwest::Method::GET, format!("{m}/v2/a//b/manifests/3"), 400, "NAME_INVALID"),
        // No manifest is named so: a pull of it is a 404, as the spec says.
        (reqwest::Method::GET, format!("{m}/v2/alpine/manifests/-bad"), 404, "MANIFEST_UNKNOWN"),
        (reqwest::Method::GET, format!("{m}/v2/alpine/manifests/.INVALID_MANIFEST_NAME"), 404, "MANIFEST_UNKNOWN"),
        (reqwest::Method::GET, format!("{m}/v2/alpine/manifests/sha256:abc"), 400, "DIGEST_INVALID"),
        (reqwest::Method::GET, format!("{m}/v2/alpine/blobs/md5:{}", "0".repeat(32)), 400, "DIGEST_INVALID"),
        (reqwest::Method::GET, format!("{m}/v2/alpine/blobs/sha512:{}", "0".repeat(128)), 400, "DIGEST_INVALID"),
        (reqwest::Method::GET, format!("{m}/v2/alpine/blobs/{zero}"), 404, "BLOB_UNKNOWN"),
        (reqwest::Method::GET, format!("{m}/v2/alpine/manifests/nope"), 404, "MANIFEST_UNKNOWN"),
        (reqwest::Method::GET, format!("{m}/v2/alpine/manifests/{zero}"), 404, "MANIFEST_UNKNOWN"),
        (reqwest::Method::PUT, format!("{m}/v2/alpine/manifests/3"), 405, "UNSUPPORTED"),
        (reqwest::Method::DELETE, format!("{m}/v2/alpine/manifests/3"), 405, "UNSUPPORTED"),
        (reqwest::Method::DELETE, format!("{m}/v2/alpine/blobs/{zero}"), 405, "UNSUPPORTED"),
        (reqwest::Method::POST, format!("{m}/v2/alpine/blobs/uploads/"), 405, "UNSUPPORTED"),
        (reqwest::Method::PATCH, format!("{m}/v2/alpine/blobs/uploads/abc"), 405, "UNSUPPORTED"),
        (reqwest::Method::PUT, format!("{m}/v2/alpine/blobs/uploads/abc?digest={zero}"), 405, "UNSUPPORTED"),
        (reqwest::Method::GET, format!("{m}/v2/_catalog"), 405, "UNSUPPORTED"),
        (reqwest::Method::GET, format!("{m}/v2/quay.io/org/img/manifests/1"), 403, "DENIED"),
        (reqwest::Method::GET, format!("{m}/v2/org/img/manifests/1?ns=quay.io"), 403, "DENIED"),
        (reqwest::Method::GET, format!("{m}/v2/alpine/tags/list?n=x"), 400, "PAGINATION_NUMBER_INVALID"),
    ];
    for (method, url, status, code) in cases {
        let resp = http.request(method.clone(), &url).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{method} {url}");
        assert_eq!(resp.headers()["content-type"], "application/json", "{method} {url}");
        assert_eq!(error_code(resp).await, code, "{method} {url}");
    }
    // HEAD responses never carry a body, errors included.
    for reference in ["nope", ".INVALID_MANIFEST_NAME"] {
        let resp = http.head(format!("{m}/v2/alpine/manifests/{reference}")).send().await.unwrap();
        assert_eq!(resp.status(), 404, "{reference}");
        assert!(resp.bytes().await.unwrap().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_keeps_the_cache() {
    let mut hub = FakeHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let upstreams = vec![format!("docker.io={}", hub.url)];
    let mirror = Hubcap::start(dir.path(), upstreams.clone(), config()).await;
    let img = images::index(Format::Docker, vec![images::small_image(Format::Docker, "amd64", 10, 2)]);
    hub.publish("library/debian", "12", &img);
    let http = client();
    let first = pull(&http, &mirror.url, "debian", "12").await;
    mirror.stop().await;
    hub.stop().await;

    let mirror = Hubcap::start(dir.path(), upstreams, config()).await;
    let again = pull(&http, &mirror.url, "debian", "12").await;
    assert_eq!(again.digest, first.digest);
    let by_digest = get_manifest(&http, &mirror.url, "debian", &first.image_digest, common::ALL_MANIFESTS).await;
    assert_eq!(by_digest.1, first.image_digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn manifests_are_negotiated_and_never_of_a_type_the_client_refused() {
    let (hub, _dir, mirror) = setup().await;
    let img = images::index(
        Format::Docker,
        vec![images::small_image(Format::Docker, "amd64", 11, 1), images::small_image(Format::Docker, "arm64", 12, 1)],
    );
    hub.publish("library/golang", "1", &img);
    let http = client();
    let (mt, digest, _) = get_manifest(&http, &mirror.url, "golang", "1", common::ALL_MANIFESTS).await;
    assert_eq!((mt.as_str(), digest), (images::DOCKER_LIST, img.digest()));

    // A client that takes no list gets the platform manifest, as upstream would give it.
    let (mt, digest, _) = get_manifest(&http, &mirror.url, "golang", "1", images::DOCKER_MANIFEST).await;
    assert_eq!((mt.as_str(), digest), (images::DOCKER_MANIFEST, img.images()[0].digest.clone()));
    // Asked again: served from the cached variant.
    let gets = hub.count(|c| &c.manifest_get);
    let (mt, _, _) = get_manifest(&http, &mirror.url, "golang", "1", images::DOCKER_MANIFEST).await;
    assert_eq!(mt, images::DOCKER_MANIFEST);
    assert_eq!(hub.count(|c| &c.manifest_get), gets);

    // A digest whose type the client refuses is not served.
    let resp = http
        .get(format!("{}/v2/golang/manifests/{}", mirror.url, img.digest()))
        .header("accept", images::OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(error_code(resp).await, "MANIFEST_UNKNOWN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn content_cached_for_one_repository_never_leaks_into_another() {
    let (hub, _dir, mirror) = setup().await;
    let img = images::small_image(Format::Oci, "amd64", 13, 1);
    hub.publish("team/private-ish", "1", &Published::Image(img.clone()));
    let http = client();
    pull(&http, &mirror.url, "team/private-ish", "1").await;
    let layer = &img.layers[0].0;
    for url in [format!("{}/v2/other/repo/blobs/{layer}", mirror.url), format!("{}/v2/other/repo/manifests/{}", mirror.url, img.digest)] {
        let resp = http.get(&url).send().await.unwrap();
        assert_eq!(resp.status(), 404, "{url}");
        let resp = http.head(&url).send().await.unwrap();
        assert_eq!(resp.status(), 404, "HEAD {url}");
    }
    // Once upstream has it in the other repository too, it is served there.
    hub.publish("other/repo", "1", &Published::Image(img.clone()));
    get_blob(&http, &mirror.url, "other/repo", layer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blob_heads_are_answered_directly_and_blob_urls_are_signed() {
    let (hub, dir, mirror) = setup().await;
    let img = images::small_image(Format::Oci, "amd64", 14, 1);
    let (layer, bytes) = img.layers[0].clone();
    hub.publish("library/node", "22", &Published::Image(img));
    let http = client();

    let head = http.head(format!("{}/v2/node/blobs/{layer}", mirror.url)).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], bytes.len().to_string().as_str());
    assert_eq!(head.headers()["docker-content-digest"], layer.as_str());

    let resp = http.get(format!("{}/v2/node/blobs/{layer}", mirror.url)).send().await.unwrap();
    assert_eq!(resp.status(), 307);
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    let url = format!("{}{location}", mirror.url);

    let ranged = http.get(&url).header("range", "bytes=10-19").send().await.unwrap();
    assert_eq!(ranged.status(), 206);
    assert_eq!(ranged.bytes().await.unwrap(), bytes.slice(10..20));
    // A suffix longer than the blob is all of it (RFC 9110); a header that
    // does not parse, or asks several ranges, is ignored: never a 416.
    let suffix = format!("bytes=-{}", bytes.len() * 10);
    for range in [suffix.as_str(), "bytes=0-1,5-6", "bytes=junk"] {
        let whole = http.get(&url).header("range", range).send().await.unwrap();
        assert_eq!(whole.status(), 200, "{range}");
        assert_eq!(whole.bytes().await.unwrap(), bytes, "{range}");
    }
    let head = http.head(&url).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], bytes.len().to_string().as_str());

    // URLs signed here with the store's own key (the mirror's data
    // directory holds it): one that has not expired is served, so each
    // refusal below is for its one fault.
    let store = hubcap::storage::local::FsBlobStore::open(dir.path()).unwrap();
    let digest = hubcap::oci::Digest::parse(&layer).unwrap();
    let path = location.split('?').next().unwrap();
    let signed = |expires: i64, sig: &str| format!("{}{path}?expires={expires}&sig={sig}", mirror.url);
    let later = hubcap::storage::now() + 60;
    let good = store.sign(&digest, later);
    let resp = http.get(signed(later, &good)).send().await.unwrap();
    assert_eq!(resp.status(), 200, "signed as the mirror signs");
    assert_eq!(resp.bytes().await.unwrap(), bytes);
    let past = hubcap::storage::now() - 1;
    let mut flipped = good.clone().into_bytes();
    flipped[0] = if flipped[0] == b'0' { b'1' } else { b'0' };
    let refused = [
        ("expired, its signature valid", signed(past, &store.sign(&digest, past))),
        ("a valid expiry, one digit of the signature changed", signed(later, std::str::from_utf8(&flipped).unwrap())),
        ("a valid expiry, the signature of another expiry", signed(later, &store.sign(&digest, later + 3600))),
        ("a valid expiry, a longer signature", url.replace("sig=", "sig=00")),
    ];
    for (what, url) in refused {
        let resp = http.get(&url).send().await.unwrap();
        assert_eq!(resp.status(), 403, "{what}");
        assert_eq!(error_code(resp).await, "DENIED", "{what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blob_still_being_fetched_redirects_back_until_it_is_ready() {
    let hub = FakeHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config();
    cfg.blob_wait = Duration::from_millis(250);
    let mirror = Hubcap::start(dir.path(), vec![format!("docker.io={}", hub.url)], cfg).await;
    let img = images::small_image(Format::Oci, "amd64", 15, 1);
    let (layer, bytes) = img.layers[0].clone();
    hub.publish("library/slow", "1", &Published::Image(img));
    let http = client();
    let blob_url = format!("{}/v2/slow/blobs/{layer}", mirror.url);
    // The copy stays in flight (held at the CDN) until released below.
    hub.hold_cdn();
    // The HEAD links the blob and starts its fetch.
    assert_eq!(http.head(&blob_url).send().await.unwrap().status(), 200);
    let resp = http.get(&blob_url).send().await.unwrap();
    assert_eq!(resp.status(), 307);
    assert_eq!(resp.headers()["location"].to_str().unwrap(), format!("/v2/slow/blobs/{layer}?hubcap-wait=1"));
    assert_eq!(resp.headers()["x-cache"], "miss");
    // A client that follows the redirects back is told after five of them
    // to come back later.
    let follow = reqwest::Client::new();
    let resp = follow.get(&blob_url).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.url().query(), Some("hubcap-wait=5"), "five redirects back, then the refusal");
    assert_eq!(resp.headers()["retry-after"], "10");
    assert_eq!(error_code(resp).await, "UNAVAILABLE");

    // Upstream answers: once the copy is stored (HEAD says hit) the same
    // client gets the blob, copied once.
    hub.release_cdn();
    let stored = async {
        while http.head(&blob_url).send().await.unwrap().headers()["x-cache"] != "hit" {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), stored).await.expect("the copy completes once upstream answers");
    let resp = follow.get(&blob_url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap(), bytes);
    assert_eq!(hub.cdn_gets(&layer), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blob_that_stays_pending_is_redirected_back_five_times_then_answered_503() {
    let hub = FakeHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config();
    cfg.blob_wait = Duration::from_millis(100);
    let mirror = Hubcap::start(dir.path(), vec![format!("docker.io={}", hub.url)], cfg).await;
    let layer = hub.put_blob("library/stuck", &images::noise(4000, 98));
    // The copy sends half the blob and then nothing for a minute: it is
    // neither finished nor cut off (the window is 30 s) while the test runs.
    hub.set_fault(Fault::DripBody(Duration::from_secs(60)));
    let http = client();
    let first = format!("/v2/stuck/blobs/{layer}?ns=docker.io");
    let mut path = first.clone();
    let mut redirects = Vec::new();
    let last = loop {
        let resp = http.get(format!("{}{path}", mirror.url)).send().await.unwrap();
        if resp.status() != 307 {
            break resp;
        }
        path = resp.headers()["location"].to_str().unwrap().to_owned();
        redirects.push(path.clone());
        assert!(redirects.len() <= 10, "still redirecting: {redirects:?}");
    };
    let want: Vec<String> = (1..=5).map(|n| format!("/v2/stuck/blobs/{layer}?ns=docker.io&hubcap-wait={n}")).collect();
    assert_eq!(redirects, want, "five redirects back to itself, counted, the other parameters kept");
    assert_eq!(last.status(), 503);
    assert_eq!(last.headers()["retry-after"], "10");
    assert_eq!(error_code(last).await, "UNAVAILABLE");
    // A client that follows redirects gets the same answer at the same place.
    let resp = reqwest::Client::new().get(format!("{}{first}", mirror.url)).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.url().as_str().ends_with("hubcap-wait=5"), "{}", resp.url());
    assert_eq!(hub.cdn_gets(&layer), 1, "all of them waited on the one copy under way");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rate_limited_miss_says_so_and_the_headroom_is_recorded() {
    let (hub, _dir, mirror) = setup().await;
    hub.publish("library/ruby", "3", &three_layer(16));
    let http = client();
    get_manifest(&http, &mirror.url, "ruby", "3", common::ALL_MANIFESTS).await;
    let up = mirror.mirror.upstreams().get("docker.io").unwrap().clone();
    assert_eq!(up.ratelimit_remaining(), Some(99));
    hub.set_fault(Fault::RateLimit);
    let resp = http.get(format!("{}/v2/ruby/manifests/other", mirror.url)).send().await.unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "300", "upstream's 3600 s, told as at most 5 minutes");
    assert_eq!(error_code(resp).await, "TOOMANYREQUESTS");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn other_registries_are_chosen_by_ns_or_host_segment_when_configured() {
    let hub = FakeHub::start().await;
    let ghcr = FakeHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mirror = Hubcap::start(dir.path(), vec![format!("docker.io={}", hub.url), format!("ghcr.io={}", ghcr.url)], config()).await;
    let img = three_layer(17);
    ghcr.publish("org/tool", "v1", &img);
    let http = client();
    let a = pull(&http, &mirror.url, "ghcr.io/org/tool", "v1").await;
    assert_eq!(a.digest, img.digest());
    let (_, d, _) = get_manifest(&http, &mirror.url, "org/tool", "v1?ns=ghcr.io", common::ALL_MANIFESTS).await;
    assert_eq!(d, img.digest());
    assert_eq!(hub.count(|c| &c.manifest_get), 0, "Docker Hub was never asked");
    // Docker Hub has no org/tool: the registries are not mixed up.
    let resp = http.get(format!("{}/v2/org/tool/manifests/v1", mirror.url)).send().await.unwrap();
    assert_eq!(resp.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tag_lists_are_relayed_with_pagination() {
    let (hub, _dir, mirror) = setup().await;
    for t in ["a", "b", "c"] {
        hub.publish("library/tiny", t, &three_layer(18));
    }
    let http = client();
    let resp = http.get(format!("{}/v2/tiny/tags/list?n=2", mirror.url)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let link = resp.headers()["link"].to_str().unwrap().to_owned();
    assert_eq!(link, r#"</v2/tiny/tags/list?n=2&last=b>; rel="next""#);
    let v: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(v["tags"], serde_json::json!(["a", "b"]));
    let next = http.get(format!("{}{}", mirror.url, &link[1..link.find('>').unwrap()])).send().await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&next.bytes().await.unwrap()).unwrap();
    assert_eq!(v["tags"], serde_json::json!(["c"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_credentials_are_used_for_tokens() {
    let hub = FakeHub::start_with(Some(("ci-bot", "dckr_pat_secret"))).await;
    hub.publish("library/alpine", "1", &three_layer(19));
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("auth.json");
    std::fs::write(&creds, r#"{"auths":{"https://index.docker.io/v1/":{"auth":"Y2ktYm90OmRja3JfcGF0X3NlY3JldA=="}}}"#).unwrap();
    let opts = hubcap::assemble::Options {
        credentials: Some(creds),
        ..common::options(hubcap::assemble::Backend::Local(dir.path().join("data")), vec![format!("docker.io={}", hub.url)], config())
    };
    let mirror = Hubcap::start_opts(opts).await;
    pull(&client(), &mirror.url, "alpine", "1").await;

    // Without credentials the token endpoint refuses, and the client is told.
    let dir2 = tempfile::tempdir().unwrap();
    let anon = Hubcap::start(dir2.path(), vec![format!("docker.io={}", hub.url)], config()).await;
    let resp = client().get(format!("{}/v2/alpine/manifests/1", anon.url)).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(error_code(resp).await, "NAME_UNKNOWN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_tokens_are_fetched_again_when_they_expire_or_are_revoked() {
    let hub = FakeHub::start().await;
    hub.set_token_ttl(Duration::from_secs(60));
    for (tag, seed) in [("1", 99), ("2", 100), ("3", 101)] {
        hub.publish("library/tokened", tag, &three_layer(seed));
    }
    let (dir, http) = (tempfile::tempdir().unwrap(), client());
    let mirror = Hubcap::start(dir.path(), vec![format!("docker.io={}", hub.url)], config()).await;
    pull(&http, &mirror.url, "tokened", "1").await;
    assert_eq!(hub.count(|c| &c.token), 1);

    // Past the token's 60 s (the tag's TTL is 600 s): the mirror asks for a
    // new one before using it again, so upstream never sees it expired.
    hubcap::storage::clock::advance(Duration::from_secs(61));
    pull(&http, &mirror.url, "tokened", "2").await;
    assert_eq!(hub.count(|c| &c.token), 2, "one new token");
    assert_eq!(hub.count(|c| &c.stale_token), 0, "the expired token was never sent");

    // Upstream drops its tokens early: the 401 is answered with a new one.
    hub.revoke_tokens();
    pull(&http, &mirror.url, "tokened", "3").await;
    assert_eq!(hub.count(|c| &c.stale_token), 1, "the revoked token was refused once");
    assert_eq!(hub.count(|c| &c.token), 3, "and replaced once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_basic_challenge_is_answered_with_the_configured_credentials() {
    use base64::Engine as _;
    let hub = FakeHub::start_basic("ci-bot", "dckr_pat_secret").await;
    hub.publish("library/alpine", "1", &three_layer(102));
    let dir = tempfile::tempdir().unwrap();
    let mirror_with = |user: &'static str, pass: &'static str| {
        let (data, creds) = (dir.path().join(format!("data-{pass}")), dir.path().join(format!("auth-{pass}.json")));
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        std::fs::write(&creds, format!(r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{auth}"}}}}}}"#)).unwrap();
        let opts = hubcap::assemble::Options {
            credentials: Some(creds),
            ..common::options(hubcap::assemble::Backend::Local(data), vec![format!("docker.io={}", hub.url)], config())
        };
        Hubcap::start_opts(opts)
    };
    let http = client();
    let mirror = mirror_with("ci-bot", "dckr_pat_secret").await;
    pull(&http, &mirror.url, "alpine", "1").await;
    assert_eq!(hub.count(|c| &c.token), 0, "no token: the credentials themselves");
    assert_eq!(hub.count(|c| &c.cdn_saw_authorization), 0, "the credentials never reach the CDN");

    // Without credentials, or with wrong ones, the client is told why.
    let dir2 = tempfile::tempdir().unwrap();
    let anon = Hubcap::start(dir2.path(), vec![format!("docker.io={}", hub.url)], config()).await;
    let wrong = mirror_with("ci-bot", "not-the-password").await;
    for m in [&anon, &wrong] {
        let resp = http.get(format!("{}/v2/alpine/manifests/1", m.url)).header("accept", common::ALL_MANIFESTS).send().await.unwrap();
        assert_eq!(resp.status(), 404);
        let body: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
        assert_eq!(body["errors"][0]["code"], "NAME_UNKNOWN", "{body}");
        assert!(body["errors"][0]["message"].as_str().unwrap().contains("needs credentials"), "{body}");
    }
    assert_eq!(hub.count(|c| &c.manifest_get), 1, "only the mirror with the credentials got the manifest");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_api_base_answers_with_the_version_header() {
    let (_hub, _dir, mirror) = setup().await;
    let resp = client().get(format!("{}/v2/", mirror.url)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["docker-distribution-api-version"], "registry/2.0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn access_control_by_network_repository_and_credentials() {
    let hub = FakeHub::start().await;
    hub.publish("library/alpine", "1", &three_layer(20));
    hub.publish("bitnami/redis", "1", &three_layer(21));
    hub.publish("library/secret-db", "1", &three_layer(22));
    let dir = tempfile::tempdir().unwrap();
    let access = hubcap::http::access::AccessPolicy::new(
        &["127.0.0.0/8".into()],
        &["library/*".into()],
        &["library/secret*".into()],
        &["ci:pa55word".into()],
        &["static-token".into()],
    )
    .unwrap();
    let opts = hubcap::assemble::Options {
        access,
        ..common::options(hubcap::assemble::Backend::Local(dir.path().to_owned()), vec![format!("docker.io={}", hub.url)], config())
    };
    let mirror = Hubcap::start_opts(opts).await;
    let http = client();

    let resp = http.get(format!("{}/v2/", mirror.url)).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers()["www-authenticate"], r#"Basic realm="hubcap""#);
    assert_eq!(error_code(resp).await, "UNAUTHORIZED");
    let resp = http.get(format!("{}/v2/", mirror.url)).basic_auth("ci", Some("wrong")).send().await.unwrap();
    assert_eq!(resp.status(), 401);

    let authed = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .default_headers(
            [(reqwest::header::AUTHORIZATION, reqwest::header::HeaderValue::from_static("Basic Y2k6cGE1NXdvcmQ="))].into_iter().collect(),
        )
        .build()
        .unwrap();
    pull(&authed, &mirror.url, "alpine", "1").await;
    let bearer = http.get(format!("{}/v2/", mirror.url)).bearer_auth("static-token").send().await.unwrap();
    assert_eq!(bearer.status(), 200);
    for name in ["bitnami/redis", "library/secret-db"] {
        let resp = authed.get(format!("{}/v2/{name}/manifests/1", mirror.url)).send().await.unwrap();
        assert_eq!(resp.status(), 403, "{name}");
        assert_eq!(error_code(resp).await, "DENIED");
    }
    assert_eq!(hub.count(|c| &c.manifest_get), 1, "refused repositories never reach upstream");

    // A network that is not allowed is refused before anything else.
    let dir2 = tempfile::tempdir().unwrap();
    let elsewhere = hubcap::http::access::AccessPolicy::new(&["10.0.0.0/8".into()], &[], &[], &[], &[]).unwrap();
    let opts = hubcap::assemble::Options {
        access: elsewhere,
        ..common::options(hubcap::assemble::Backend::Local(dir2.path().to_owned()), vec![format!("docker.io={}", hub.url)], config())
    };
    let closed = Hubcap::start_opts(opts).await;
    let resp = http.get(format!("{}/v2/", closed.url)).send().await.unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(error_code(resp).await, "DENIED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn warm_caches_images_ahead_of_time_with_no_server_running() {
    let mut hub = FakeHub::start().await;
    let img = images::index(
        Format::Oci,
        vec![images::small_image(Format::Oci, "amd64", 30, 2), images::small_image(Format::Oci, "arm64", 31, 1)],
    );
    hub.publish("library/base", "1", &img);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_hubcap"))
        .args(["warm", "--platform", "linux/amd64", "--upstream", &format!("docker.io={}", hub.url), "base:1"])
        .args(["--redirect-allow", &hub.cdn])
        .arg("--data")
        .arg(&data)
        .env("HUBCAP_LOG", "warn")
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("warmed base:1: 2 manifests, 3 blobs"), "{text}");
    let (amd64, arm64) = (img.images()[0], img.images()[1]);
    for (d, _) in amd64.blobs() {
        assert_eq!(hub.cdn_gets(&d), 1);
    }
    assert_eq!(hub.cdn_gets(&arm64.layers[0].0), 0, "other platforms are left alone");

    // Upstream gone: the warmed image is served from the cache.
    hub.stop().await;
    let mirror = Hubcap::start(&data, vec![format!("docker.io={}", hub.url)], config()).await;
    let pulled = pull(&client(), &mirror.url, "base", "1").await;
    assert_eq!(pulled.image_digest, amd64.digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blob_whose_size_upstream_does_not_say_is_never_served_as_empty() {
    let (hub, _dir, mirror) = setup().await;
    let bytes = b"a blob upstream HEADs without a Content-Length".repeat(100);
    let digest = hub.put_blob("library/sizeless", &bytes);
    hub.set_fault(Fault::NoBlobLength);
    let http = client();
    // Unknown is not zero: the mirror copies the blob, verified, and then
    // answers the size it really has.
    let head = http.head(format!("{}/v2/sizeless/blobs/{digest}", mirror.url)).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"].to_str().unwrap(), bytes.len().to_string());
    assert_eq!(get_blob(&http, &mirror.url, "sizeless", &digest).await.to_vec(), bytes);
    assert_eq!(hub.cdn_gets(&digest), 1, "copied once, not retried against a size of 0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tag_lists_come_in_pages_of_a_thousand_and_an_oversized_one_is_refused() {
    let (hub, _dir, mirror) = setup().await;
    let img = three_layer(61);
    for i in 0..1500 {
        hub.publish("library/many", &format!("t{i:04}"), &img);
    }
    let http = client();
    // No `n`: a page of at most a thousand, with a Link to the rest.
    let resp = http.get(format!("{}/v2/many/tags/list", mirror.url)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let link = resp.headers()["link"].to_str().unwrap().to_owned();
    let body: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(body["tags"].as_array().unwrap().len(), 1000);
    assert!(link.contains("last=t0999"), "{link}");
    let resp = http.get(format!("{}/v2/many/tags/list?last=t0999&n=5000", mirror.url)).send().await.unwrap();
    let body: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(body["tags"].as_array().unwrap().len(), 500, "the rest");
    // An upstream that sends megabytes of tags is refused, not relayed.
    hub.set_fault(Fault::HugeTagList);
    let resp = http.get(format!("{}/v2/many/tags/list", mirror.url)).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(error_code(resp).await, "UNAVAILABLE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_manifest_with_thousands_of_layers_is_refused_before_any_fetch() {
    let (hub, _dir, mirror) = setup().await;
    let layers = (0..=hubcap::mirror::MAX_REFERENCES).map(|i| vec![(format!("l/{i}"), vec![i as u8])]).collect();
    let img = Published::Image(images::image(Format::Oci, "amd64", layers));
    hub.publish("library/fanout", "1", &img);
    let http = client();
    let resp = http.get(format!("{}/v2/fanout/manifests/1", mirror.url)).header("accept", common::ALL_MANIFESTS).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(error_code(resp).await, "MANIFEST_INVALID");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hub.count(|c| &c.blob_get), 0, "nothing fetched for it");
    let stats = http.get(format!("{}/_hubcap/stats", mirror.url)).send().await.unwrap().text().await.unwrap();
    assert!(stats.contains("\"manifests\":0"), "nothing stored: {stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_short_deny_pattern_denies_the_official_image_it_names() {
    let hub = FakeHub::start().await;
    hub.publish("library/good", "1", &three_layer(23));
    hub.publish("library/fine", "1", &three_layer(24));
    let dir = tempfile::tempdir().unwrap();
    // `good` is written as a name is, and means what the name means:
    // docker.io/library/good.
    let access = hubcap::http::access::AccessPolicy::new(&[], &[], &["good".into()], &[], &[]).unwrap();
    let opts = hubcap::assemble::Options {
        access,
        ..common::options(hubcap::assemble::Backend::Local(dir.path().to_owned()), vec![format!("docker.io={}", hub.url)], config())
    };
    let mirror = Hubcap::start_opts(opts).await;
    let http = client();
    for name in ["good", "library/good", "docker.io/library/good"] {
        let resp = http.get(format!("{}/v2/{name}/manifests/1", mirror.url)).send().await.unwrap();
        assert_eq!(resp.status(), 403, "{name}");
        assert_eq!(error_code(resp).await, "DENIED");
    }
    pull(&http, &mirror.url, "fine", "1").await;
    assert_eq!(hub.count(|c| &c.manifest_get), 1, "only the allowed image went upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_statistics_name_no_image_of_a_repository_the_mirror_refuses() {
    let hub = FakeHub::start().await;
    hub.publish("library/secret-db", "1", &three_layer(25));
    hub.publish("library/open", "1", &three_layer(26));
    let dir = tempfile::tempdir().unwrap();
    let backend = || hubcap::assemble::Backend::Local(dir.path().to_owned());
    // Cached while nothing was refused.
    let first = Hubcap::start_opts(common::options(backend(), vec![format!("docker.io={}", hub.url)], config())).await;
    let http = client();
    pull(&http, &first.url, "secret-db", "1").await;
    pull(&http, &first.url, "open", "1").await;
    first.stop().await;
    // Then served with a deny rule: the statistics do not name it.
    let access = hubcap::http::access::AccessPolicy::new(&[], &[], &["secret*".into()], &[], &[]).unwrap();
    let opts = hubcap::assemble::Options { access, ..common::options(backend(), vec![format!("docker.io={}", hub.url)], config()) };
    let second = Hubcap::start_opts(opts).await;
    let stats = http.get(format!("{}/_hubcap/stats", second.url)).send().await.unwrap().text().await.unwrap();
    assert!(stats.contains("docker.io/library/open:1"), "{stats}");
    assert!(!stats.contains("secret"), "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blob_lost_from_the_store_is_fetched_again() {
    let (hub, dir, mirror) = setup().await;
    let img = images::small_image(Format::Oci, "amd64", 91, 2);
    hub.publish("library/lost", "1", &Published::Image(img.clone()));
    let http = client();
    pull(&http, &mirror.url, "lost", "1").await;
    let (layer, bytes) = img.blobs().pop().unwrap();
    let file = dir.path().join("blobs/sha256").join(layer.trim_start_matches("sha256:"));
    assert!(file.exists());

    // Removed by hand: HEAD still knows its size, and a GET serves it,
    // fetched again (not a 404 behind a 200).
    std::fs::remove_file(&file).unwrap();
    let head = http.head(format!("{}/v2/lost/blobs/{layer}", mirror.url)).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"].to_str().unwrap(), bytes.len().to_string());
    assert_eq!(get_blob(&http, &mirror.url, "lost", &layer).await, bytes);
    assert_eq!(hub.cdn_gets(&layer), 2, "copied again once");
    assert!(file.exists());

    // Removed between the redirect and the client's GET: 503 with
    // Retry-After, and the retry through /v2/ gets it back.
    let resp = http.get(format!("{}/v2/lost/blobs/{layer}", mirror.url)).send().await.unwrap();
    assert_eq!(resp.status(), 307);
    let url = format!("{}{}", mirror.url, resp.headers()["location"].to_str().unwrap());
    std::fs::remove_file(&file).unwrap();
    let resp = http.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_eq!(get_blob(&http, &mirror.url, "lost", &layer).await, bytes);
    assert_eq!(hub.cdn_gets(&layer), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_manifest_whose_bytes_or_digest_lie_is_refused_and_nothing_is_cached() {
    let (hub, _dir, mirror) = setup().await;
    let img = images::small_image(Format::Oci, "amd64", 93, 1);
    hub.publish("library/liar", "1", &Published::Image(img.clone()));
    let http = client();
    let get = |reference: String| {
        let (http, url) = (http.clone(), format!("{}/v2/liar/manifests/{reference}", mirror.url));
        async move { http.get(url).header("accept", common::ALL_MANIFESTS).send().await.unwrap() }
    };
    for fault in [Fault::LyingDigest, Fault::ChangedManifest] {
        hub.set_fault(fault.clone());
        for reference in ["1".to_owned(), img.digest.clone()] {
            let resp = get(reference.clone()).await;
            assert_eq!(resp.status(), 502, "{fault:?} {reference}");
            assert_eq!(error_code(resp).await, "MANIFEST_INVALID", "{fault:?} {reference}");
        }
        let stats = http.get(format!("{}/_hubcap/stats", mirror.url)).send().await.unwrap().text().await.unwrap();
        assert!(stats.contains("\"manifests\":0"), "{fault:?}: nothing stored: {stats}");
        assert_eq!(hub.count(|c| &c.blob_get), 0, "{fault:?}: nothing fetched for it");
    }
    // Upstream honest again: the next pull is clean.
    hub.set_fault(Fault::None);
    let pulled = pull(&http, &mirror.url, "liar", "1").await;
    assert_eq!(pulled.digest, img.digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fresh_mirror_serves_a_stale_tag_when_upstream_is_unreachable() {
    let (mut hub, dir, mirror) = setup().await;
    hub.publish("library/gone", "1", &three_layer(94));
    let http = client();
    let first = pull(&http, &mirror.url, "gone", "1").await;
    mirror.stop().await;
    // A restarted mirror (no back-off remembered), the tag's TTL over, and
    // upstream not listening at all: the transport error serves the tag stale.
    hubcap::storage::clock::advance(Duration::from_secs(601));
    hub.stop().await;
    let mirror = Hubcap::start(dir.path(), vec![format!("docker.io={}", hub.url)], config()).await;
    let resp = http.get(format!("{}/v2/gone/manifests/1", mirror.url)).header("accept", common::ALL_MANIFESTS).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-cache"], "stale");
    assert_eq!(resp.headers()["docker-content-digest"].to_str().unwrap(), first.digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tag_deleted_upstream_is_unknown_once_its_ttl_is_over() {
    let (hub, _dir, mirror) = setup().await;
    hub.publish("library/dropped", "1", &three_layer(95));
    let http = client();
    pull(&http, &mirror.url, "dropped", "1").await;
    hub.untag("library/dropped", "1");
    let get = || http.get(format!("{}/v2/dropped/manifests/1", mirror.url)).header("accept", common::ALL_MANIFESTS).send();
    assert_eq!(get().await.unwrap().status(), 200, "trusted for its TTL");
    hubcap::storage::clock::advance(Duration::from_secs(601));
    let resp = get().await.unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(error_code(resp).await, "MANIFEST_UNKNOWN");
    let resp = get().await.unwrap();
    assert_eq!(resp.status(), 404, "and stays so (the tag was dropped from the cache)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_short_retry_after_is_waited_out() {
    let (hub, _dir, mirror) = setup().await;
    hub.publish("library/busy", "1", &three_layer(96));
    hub.set_fault(Fault::RateLimitFor { times: 1, retry_after: 1 });
    let http = client();
    let started = std::time::Instant::now();
    pull(&http, &mirror.url, "busy", "1").await;
    assert_eq!(hub.count(|c| &c.rate_limited), 1, "one 429");
    assert!(started.elapsed() >= Duration::from_secs(1), "its Retry-After was waited out");
    // A long one is not: the client is told to come back.
    hub.publish("library/busy", "2", &three_layer(97));
    hub.set_fault(Fault::RateLimitFor { times: 1, retry_after: 3600 });
    let resp = http.get(format!("{}/v2/busy/manifests/2", mirror.url)).header("accept", common::ALL_MANIFESTS).send().await.unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "300", "upstream's 3600 s, told as at most 5 minutes");
}
