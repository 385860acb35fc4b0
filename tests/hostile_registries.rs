//! Hostile registries, round two: an upstream the operator configured that
//! lies, stalls or floods, against an in-process mirror. What one registry
//! says is never taken for another's content; a token response is read only
//! so far; a registry whose copies fail slowly delays another's by a copy at
//! most; a `Retry-After` passed to clients is bounded; redirect targets
//! learn nothing of the registry; a named upstream is trusted on its own
//! port only; a failed copy leaves nothing on disk. Also `If-Range` on the
//! embedded backend's blob URLs. All on 127.0.0.1.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use common::fakehub::{FakeHub, Fault};
use common::images::{self, Format, Published, sha256};
use common::{ALL_MANIFESTS, Hubcap, client};
use hubcap::assemble::Backend;
use hubcap::mirror::upstream::UpstreamLimits;

/// What the hostile registry does with blob requests.
#[derive(Clone, Default)]
enum Blobs {
    /// `HEAD` says 200 (60 GB) for any digest; `GET` sends junk.
    #[default]
    Claims,
    /// Serves the blobs it was given, honestly.
    Honest,
    /// Answers 500 after this long.
    FailSlowly(Duration),
    /// Sends at most this many bytes of a blob it holds (from the range
    /// asked), then cuts the connection.
    CutAfter(usize),
    /// Redirects a `GET` to this base URL (the same path).
    Redirect(String),
    /// `HEAD` says 60 GB; `GET` sends 1 KB every 100 ms, forever.
    Trickle,
}

#[derive(Default)]
struct Evil {
    blobs_mode: Mutex<Blobs>,
    /// The token endpoint's body never ends.
    endless_token: Mutex<bool>,
    blobs: Mutex<HashMap<String, Bytes>>,
    /// "name:reference" -> (media type, body).
    manifests: Mutex<HashMap<String, (String, Bytes)>>,
    token_bytes: AtomicU64,
    requests: AtomicUsize,
}

struct EvilRegistry {
    url: String,
    state: Arc<Evil>,
}

impl EvilRegistry {
    async fn start() -> EvilRegistry {
        let state = Arc::new(Evil::default());
        let app = axum::Router::new()
            .route("/token", axum::routing::get(evil_token))
            .route("/v2/", axum::routing::get(|| async { "{}" }))
            .route("/v2/{*rest}", axum::routing::any(evil_route))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        EvilRegistry { url, state }
    }
    fn set(&self, mode: Blobs) {
        *self.state.blobs_mode.lock().unwrap() = mode;
    }
}

async fn evil_token(State(s): State<Arc<Evil>>) -> Response {
    // A gigabyte of token, 64 KiB at a time, counted as it goes out.
    let counted = s.clone();
    let stream = futures_util::stream::iter((0..16384).map(move |_| {
        counted.token_bytes.fetch_add(65536, Ordering::SeqCst);
        Ok::<Bytes, std::io::Error>(Bytes::from(vec![b'a'; 65536]))
    }));
    Body::from_stream(stream).into_response()
}

async fn evil_route(State(s): State<Arc<Evil>>, req: Request) -> Response {
    s.requests.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().trim_start_matches("/v2/").to_owned();
    if *s.endless_token.lock().unwrap() && !req.headers().contains_key(header::AUTHORIZATION) {
        let realm = format!("http://{}/token", req.headers()[header::HOST].to_str().unwrap());
        return (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, format!(r#"Bearer realm="{realm}",service="evil""#))])
            .into_response();
    }
    if let Some((name, reference)) = path.rsplit_once("/manifests/") {
        return match s.manifests.lock().unwrap().get(&format!("{name}:{reference}")) {
            Some((mt, body)) => ([(header::CONTENT_TYPE, mt.clone())], body.clone()).into_response(),
            None => ([(header::CONTENT_TYPE, images::OCI_MANIFEST)], "{\"schemaVersion\":2,\"junk\":true}").into_response(),
        };
    }
    let Some((_, digest)) = path.rsplit_once("/blobs/") else { return StatusCode::NOT_FOUND.into_response() };
    let mode = s.blobs_mode.lock().unwrap().clone();
    let held = s.blobs.lock().unwrap().get(digest).cloned();
    let head = req.method() == axum::http::Method::HEAD;
    match mode {
        Blobs::Claims | Blobs::Trickle if head => ([(header::CONTENT_LENGTH, "64424509440")], Body::empty()).into_response(),
        Blobs::Claims => Bytes::from_static(b"not what you asked for").into_response(),
        Blobs::Trickle => {
            let drip = futures_util::stream::unfold((), |()| async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Some((Ok::<Bytes, std::io::Error>(Bytes::from(vec![0u8; 1024])), ()))
            });
            ([(header::CONTENT_LENGTH, "64424509440")], Body::from_stream(drip)).into_response()
        }
        Blobs::Honest => match held {
            Some(b) if head => ([(header::CONTENT_LENGTH, b.len().to_string())], Body::empty()).into_response(),
            Some(b) => b.into_response(),
            None => StatusCode::NOT_FOUND.into_response(),
        },
        Blobs::FailSlowly(d) => {
            tokio::time::sleep(d).await;
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
        Blobs::Redirect(_) if head => ([(header::CONTENT_LENGTH, "5000")], Body::empty()).into_response(),
        Blobs::Redirect(base) => (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, format!("{base}/{digest}"))]).into_response(),
        Blobs::CutAfter(n) => {
            let Some(b) = held else { return StatusCode::NOT_FOUND.into_response() };
            let from = range_start(req.headers()).unwrap_or(0);
            let (status, rest) = (if from > 0 { StatusCode::PARTIAL_CONTENT } else { StatusCode::OK }, b.slice(from..));
            let sent = rest.slice(..n.min(rest.len()));
            let body = futures_util::stream::iter(vec![Ok::<Bytes, std::io::Error>(sent), Err(std::io::Error::other("cut"))]);
            let mut resp = Response::new(Body::from_stream(body));
            *resp.status_mut() = status;
            resp.headers_mut().insert(header::CONTENT_LENGTH, rest.len().into());
            if from > 0 {
                let range = format!("bytes {from}-{}/{}", b.len() - 1, b.len());
                resp.headers_mut().insert(header::CONTENT_RANGE, range.parse().unwrap());
            }
            resp
        }
    }
}

fn range_start(h: &HeaderMap) -> Option<usize> {
    h.get(header::RANGE)?.to_str().ok()?.strip_prefix("bytes=")?.split('-').next()?.parse().ok()
}

/// An in-process mirror on `data` with upstreams `docker.io=<hub>` and
/// `evil.test=<evil>`, these limits, and `deny` patterns.
async fn mirror(data: &std::path::Path, hub: &FakeHub, evil: &EvilRegistry, limits: UpstreamLimits, deny: &[&str]) -> Hubcap {
    let mut opts = common::options(
        Backend::Local(data.to_owned()),
        vec![format!("docker.io={}", hub.url), format!("evil.test={}", evil.url)],
        common::config(),
    );
    opts.upstream_limits = limits;
    let deny: Vec<String> = deny.iter().map(|d| d.to_string()).collect();
    opts.access = hubcap::http::access::AccessPolicy::new(&[], &[], &deny, &[], &[]).unwrap();
    Hubcap::start_opts(opts).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_registry_must_prove_it_holds_what_another_registry_put_in_the_cache() {
    let hub = FakeHub::start().await;
    let evil = EvilRegistry::start().await;
    let secret = images::small_image(Format::Oci, "amd64", 2400, 2);
    hub.publish("acme/secret", "1", &Published::Image(secret.clone()));
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let http = client();
    // Cached while it was served; then denied.
    let m = mirror(&data, &hub, &evil, common::upstream_limits(), &[]).await;
    common::pull(&http, &m.url, "acme/secret", "1").await;
    m.stop().await;
    let m = mirror(&data, &hub, &evil, common::upstream_limits(), &["acme/secret"]).await;
    let resp = http.get(format!("{}/v2/acme/secret/manifests/1", m.url)).send().await.unwrap();
    assert_eq!(resp.status(), 403);

    // The hostile registry says it has everything; it is not believed.
    let (layer, _) = &secret.layers[0];
    for method in ["HEAD", "GET"] {
        let url = format!("{}/v2/evil.test/x/y/blobs/{layer}", m.url);
        let resp = http.request(method.parse().unwrap(), url).send().await.unwrap();
        assert_eq!(resp.status(), 404, "{method} of a layer cached from docker.io through evil.test");
        assert!(resp.headers().get("location").is_none());
    }
    let resp =
        http.get(format!("{}/v2/evil.test/x/y/manifests/{}", m.url, secret.digest)).header("accept", ALL_MANIFESTS).send().await.unwrap();
    assert!(resp.status().is_client_error() || resp.status().is_server_error(), "{}", resp.status());
    assert_ne!(sha256(&resp.bytes().await.unwrap()), secret.digest, "the manifest is not served under evil.test");
    let stats = http.get(format!("{}/_hubcap/stats", m.url)).send().await.unwrap().text().await.unwrap();
    assert!(!stats.contains("evil.test/x/y"), "{stats}");

    // The rule, not a broken path: a registry that serves the bytes has them.
    evil.set(Blobs::Honest);
    evil.state.blobs.lock().unwrap().insert(layer.clone(), secret.layers[0].1.clone());
    let resp = http.get(format!("{}/v2/evil.test/x/y/blobs/{layer}", m.url)).send().await.unwrap();
    assert_eq!(resp.status(), 307, "proved by its bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_response_is_read_only_so_far() {
    let hub = FakeHub::start().await;
    let evil = EvilRegistry::start().await;
    *evil.state.endless_token.lock().unwrap() = true;
    let dir = tempfile::tempdir().unwrap();
    let m = mirror(&dir.path().join("data"), &hub, &evil, common::upstream_limits(), &[]).await;
    let started = Instant::now();
    let resp = client().get(format!("{}/v2/evil.test/x/y/manifests/1", m.url)).header("accept", ALL_MANIFESTS).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.text().await.unwrap().contains("misbehaved"));
    let sent = evil.state.token_bytes.load(Ordering::SeqCst);
    assert!(sent < 32 << 20, "read {sent} bytes of a 1 GiB token (the cap is 256 KiB)");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_registry_whose_copies_fail_slowly_delays_another_by_a_copy_at_most() {
    let hub = FakeHub::start().await;
    let healthy = images::small_image(Format::Oci, "amd64", 2500, 1);
    hub.publish("library/healthy", "1", &Published::Image(healthy.clone()));
    let evil = EvilRegistry::start().await;
    evil.set(Blobs::FailSlowly(Duration::from_millis(700)));
    // An image of 300 layers, each of which fails slowly.
    let layers: Vec<serde_json::Value> = (0..300)
        .map(|i| serde_json::json!({ "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha256(format!("l{i}").as_bytes()), "size": 100 }))
        .collect();
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": images::OCI_MANIFEST,
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(b"c"), "size": 1 },
        "layers": layers,
    });
    evil.state.manifests.lock().unwrap().insert("x/slow:1".into(), (images::OCI_MANIFEST.into(), Bytes::from(manifest.to_string())));
    let dir = tempfile::tempdir().unwrap();
    let mut opts = common::options(
        Backend::Local(dir.path().join("data")),
        vec![format!("docker.io={}", hub.url), format!("evil.test={}", evil.url)],
        common::config(),
    );
    opts.fetch_concurrency = 8;
    let m = Hubcap::start_opts(opts).await;
    let http = client();
    // The hostile image's manifest queues its 301 blobs.
    common::get_manifest(&http, &m.url, "evil.test/x/slow", "1", ALL_MANIFESTS).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let pulled = common::pull(&http, &m.url, "library/healthy", "1").await;
    let took = started.elapsed();
    assert_eq!(pulled.digest, healthy.digest);
    // Fair turns: the healthy registry's blobs wait for a slot to free, not
    // for the 301 queued before them (each fails after about 10 s: 3 copy
    // attempts of 3 requests; 301 of them at 8 at a time is 6 minutes).
    assert!(took < Duration::from_secs(30), "the healthy pull took {took:?}");
    let asked = evil.state.requests.load(Ordering::SeqCst);
    assert!(asked < 1000, "the hostile image's copies ({asked} requests so far) are mostly still waiting their turn");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upstreams_retry_after_reaches_clients_bounded() {
    let hub = FakeHub::start().await;
    hub.publish("library/limited", "1", &Published::Image(images::small_image(Format::Oci, "amd64", 2600, 1)));
    let evil = EvilRegistry::start().await;
    let dir = tempfile::tempdir().unwrap();
    let m = mirror(&dir.path().join("data"), &hub, &evil, common::upstream_limits(), &[]).await;
    hub.set_fault(Fault::RateLimitFor { times: 10, retry_after: 999_999_999 });
    let resp = client().get(format!("{}/v2/limited/manifests/1", m.url)).header("accept", ALL_MANIFESTS).send().await.unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "300", "an upstream's 999999999 s is passed on as 5 minutes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redirect_targets_learn_nothing_of_the_registry_url() {
    let hub = FakeHub::start().await;
    let evil = EvilRegistry::start().await;
    // An allowed object store that records what it is sent.
    let seen: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let blob = Bytes::from(images::noise(5000, 2700));
    let digest = sha256(&blob);
    let (recorded, served) = (seen.clone(), blob.clone());
    let store = axum::Router::new().fallback(move |headers: HeaderMap| {
        let (recorded, served) = (recorded.clone(), served.clone());
        async move {
            recorded.lock().unwrap().push(headers.get(header::REFERER).map(|v| v.to_str().unwrap().to_owned()));
            served
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let store_addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, store).await.unwrap() });
    evil.set(Blobs::Redirect(format!("http://{store_addr}/objects")));
    let dir = tempfile::tempdir().unwrap();
    let limits = UpstreamLimits { redirect_allow: vec![store_addr], ..common::upstream_limits() };
    let m = mirror(&dir.path().join("data"), &hub, &evil, limits, &[]).await;
    let got = common::get_blob(&client(), &m.url, "evil.test/x/y", &digest).await;
    assert_eq!(got, blob);
    let seen = seen.lock().unwrap().clone();
    assert!(!seen.is_empty() && seen.iter().all(Option::is_none), "no Referer: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upstream_named_by_host_is_trusted_on_its_own_port_only() {
    let hub = FakeHub::start().await;
    let port = hub.url.rsplit(':').next().unwrap().to_owned();
    *hub.state.realm.lock().unwrap() = format!("http://localhost:{port}/token");
    // Another loopback service, reached by the upstream's own name.
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let internal = axum::Router::new().fallback(move || {
        counted.fetch_add(1, Ordering::SeqCst);
        async { "internal" }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let internal_port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, internal).await.unwrap() });
    let digest = hub.put_blob("library/named", &images::noise(3000, 2800));
    hub.set_fault(Fault::RedirectBlobsTo(format!("http://localhost:{internal_port}")));
    let dir = tempfile::tempdir().unwrap();
    let opts =
        common::options(Backend::Local(dir.path().join("data")), vec![format!("docker.io=http://localhost:{port}")], common::config());
    let m = Hubcap::start_opts(opts).await;
    let resp = client().get(format!("{}/v2/named/blobs/{digest}", m.url)).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the upstream's name on another port was not followed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_copy_leaves_nothing_on_disk() {
    let hub = FakeHub::start().await;
    let evil = EvilRegistry::start().await;
    // 40 MiB that come 9 MiB at a time: each attempt keeps a part or two,
    // three attempts fail.
    let blob = Bytes::from(images::noise(40 << 20, 2900));
    let digest = sha256(&blob);
    evil.state.blobs.lock().unwrap().insert(digest.clone(), blob);
    evil.set(Blobs::CutAfter(9 << 20));
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let limits = UpstreamLimits { parallel_ranges: 1, ..common::upstream_limits() };
    let m = mirror(&data, &hub, &evil, limits, &[]).await;
    let resp = client().get(format!("{}/v2/evil.test/x/y/blobs/{digest}", m.url)).send().await.unwrap();
    assert!(common::blob_refused(resp, &digest).await, "a 503, or a followed body cut short");
    let d = hubcap::oci::Digest::parse(&digest).unwrap();
    let started = Instant::now();
    loop {
        let r = m.mirror.index().blob("evil.test/x/y", &d).await.unwrap().record.unwrap();
        if r.state == hubcap::storage::BlobState::Failed {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(m.mirror.index().blob_checkpoint(&d).await.unwrap(), None, "no checkpoint names a kept part");
    let left: Vec<_> = std::fs::read_dir(data.join("tmp")).unwrap().flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "nothing of the failed copies is left: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_range_is_served_only_of_the_representation_if_range_names() {
    let hub = FakeHub::start().await;
    let img = images::small_image(Format::Oci, "amd64", 3000, 1);
    hub.publish("library/ranged", "1", &Published::Image(img.clone()));
    let evil = EvilRegistry::start().await;
    let dir = tempfile::tempdir().unwrap();
    let m = mirror(&dir.path().join("data"), &hub, &evil, common::upstream_limits(), &[]).await;
    let http = client();
    common::pull(&http, &m.url, "ranged", "1").await;
    let (layer, bytes) = &img.layers[0];
    let resp = http.get(format!("{}/v2/ranged/blobs/{layer}", m.url)).send().await.unwrap();
    let location = format!("{}{}", m.url, resp.headers()["location"].to_str().unwrap());
    let get = |if_range: Option<&str>| {
        let mut req = http.get(&location).header("range", "bytes=0-9");
        if let Some(v) = if_range {
            req = req.header("if-range", v);
        }
        req.send()
    };
    let resp = get(None).await.unwrap();
    assert_eq!(resp.status(), 206);
    let etag = resp.headers()["etag"].to_str().unwrap().to_owned();
    assert_eq!(etag, format!("\"{layer}\""));
    assert_eq!(get(Some(&etag)).await.unwrap().status(), 206, "the validator matches: the range");
    for other in ["\"sha256:0000\"", "W/\"x\"", "Wed, 21 Oct 2015 07:28:00 GMT"] {
        let resp = get(Some(other)).await.unwrap();
        assert_eq!(resp.status(), 200, "If-Range {other}: the whole blob");
        assert_eq!(resp.bytes().await.unwrap(), bytes.clone());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_size_another_registry_claimed_is_not_told_of_this_ones_blob() {
    let hub = FakeHub::start().await;
    let small = images::small_image(Format::Oci, "amd64", 3100, 1);
    hub.publish("library/small", "1", &Published::Image(small.clone()));
    let (layer, bytes) = small.layers[0].clone();
    let evil = EvilRegistry::start().await;
    evil.set(Blobs::Trickle);
    let dir = tempfile::tempdir().unwrap();
    let m = mirror(&dir.path().join("data"), &hub, &evil, common::upstream_limits(), &[]).await;
    let http = client();
    // The hostile registry asks first: 60 GB, it says, and its copy trickles.
    let resp = http.head(format!("{}/v2/evil.test/x/y/blobs/{layer}", m.url)).send().await.unwrap();
    assert_eq!(resp.headers()["content-length"], "64424509440");
    common::get_manifest(&http, &m.url, "small", "1", ALL_MANIFESTS).await;
    let resp = http.head(format!("{}/v2/small/blobs/{layer}", m.url)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-length"], bytes.len().to_string().as_str(), "docker.io's size for docker.io's blob");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_copy_from_another_registry_holds_no_request_hostage() {
    let hub = FakeHub::start().await;
    let small = images::small_image(Format::Oci, "amd64", 3500, 1);
    hub.publish("library/small", "1", &Published::Image(small.clone()));
    let (layer, _) = small.layers[0].clone();
    let evil = EvilRegistry::start().await;
    evil.set(Blobs::Trickle);
    let dir = tempfile::tempdir().unwrap();
    let m = mirror(&dir.path().join("data"), &hub, &evil, common::upstream_limits(), &[]).await;
    let http = client();
    // The hostile registry asks first: its copy of the layer trickles.
    let resp = http.head(format!("{}/v2/evil.test/x/y/blobs/{layer}", m.url)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Docker Hub's image with that layer is pulled at once, from Docker Hub.
    let started = Instant::now();
    let pulled = common::pull(&http, &m.url, "small", "1").await;
    assert_eq!(pulled.digest, small.digest);
    assert!(started.elapsed() < Duration::from_secs(10), "held hostage {:?}", started.elapsed());
    assert_eq!(hub.cdn_gets(&layer), 1, "copied from Docker Hub, beside the hostile copy");
    // And it stays served: the hostile copy failing later changes nothing.
    let d = hubcap::oci::Digest::parse(&layer).unwrap();
    let r = m.mirror.index().blob("docker.io/library/small", &d).await.unwrap().record.unwrap();
    assert_eq!(r.state, hubcap::storage::BlobState::Ready);
}

/// The same on the Lambda path, where the index is the queue (one copy per
/// digest, by the fetcher): a client naming Docker Hub is sent to Docker
/// Hub's own blob location at once instead of waiting on the hostile copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_lambda_a_copy_from_another_registry_holds_no_request_hostage() {
    let dir = tempfile::tempdir().unwrap();
    let hub = FakeHub::start().await;
    let small = images::small_image(Format::Oci, "amd64", 3600, 1);
    hub.publish("library/small", "1", &Published::Image(small.clone()));
    let (layer, _) = small.layers[0].clone();
    let evil = EvilRegistry::start().await;
    evil.set(Blobs::Trickle);
    let upstreams = format!("docker.io={},evil.test={}", hub.url, evil.url);
    let stack = common::lambda::LambdaStack::start(dir.path(), "hostage", &hub.url, &[("HUBCAP_UPSTREAM", upstreams)]).await;
    let http = client();
    // The image's config is cached first: the emulator's stream pump hands
    // the fetcher one batch at a time, and the hostile copy's batch holds
    // the ones behind it (on AWS, StreamParallelizationFactor spreads them).
    common::get_blob(&http, &stack.front, "small", &small.config.0).await;
    let resp = http.head(format!("{}/v2/evil.test/x/y/blobs/{layer}", stack.front)).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{}", stack.logs());
    // The fetcher has the hostile copy by now (or will have).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    let pulled = common::pull(&http, &stack.front, "small", "1").await;
    assert_eq!(pulled.digest, small.digest);
    assert!(started.elapsed() < Duration::from_secs(10), "held hostage {:?}:\n{}", started.elapsed(), stack.logs());
    let sent_to_cdn = stack.api.log().lines().any(|l| l.contains(&format!("/v2/small/blobs/{layer}")) && l.contains("\"status\":307"));
    assert!(sent_to_cdn, "the layer was a redirect to Docker Hub's CDN:\n{}", stack.api.log());
    assert_eq!(hub.cdn_gets(&layer), 1, "the client got it from Docker Hub");
}
