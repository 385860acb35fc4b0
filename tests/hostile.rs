//! Hostile peers. Clients against the real `hubcap serve` binary:
//! connections that drip their headers (slowloris) are cut off, the server
//! holds no more connections than it is told, and a shutdown lets requests
//! in flight finish but does not wait forever for a client that never
//! finishes. Upstreams against an in-process mirror: redirects into the host
//! or its network are refused, dripping transfers are cut off and cannot
//! starve healthy ones, a blob of no declared size cannot grow without
//! bound, and one whose size upstream misstates, or that runs past its
//! declared size, is refused with nothing stored. All traffic stays on
//! 127.0.0.1 (the "internal" service is another loopback port that is not a
//! configured upstream).

mod common;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::Hubcap;
use common::fakehub::{FakeHub, Fault};
use common::images::{self, Format, Published};
use common::registries::hubcap_serve;
use hubcap::mirror::MirrorConfig;
use hubcap::mirror::upstream::UpstreamLimits;

/// A client that sends a request line and then one header line every
/// 300 ms, never finishing; resolves with how long the server let it.
async fn drip(addr: String, for_at_most: Duration) -> Duration {
    let started = Instant::now();
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\n").await.unwrap();
    let mut buf = [0u8; 1024];
    while started.elapsed() < for_at_most {
        if s.write_all(b"X-Drip: 1\r\n").await.is_err() {
            return started.elapsed();
        }
        // Closed by the server: a read returns 0 bytes (or an error).
        match tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => {}
        }
    }
    started.elapsed()
}

/// Waits for a server sent SIGTERM at `signalled` to exit, failing the test
/// if it is still running `within` after it.
async fn exit_within(mirror: &mut common::procs::Proc, signalled: Instant, within: Duration) -> std::process::ExitStatus {
    loop {
        if let Some(status) = mirror.child.try_wait().unwrap() {
            return status;
        }
        assert!(signalled.elapsed() < within, "still running {:?} after SIGTERM:\n{}", signalled.elapsed(), mirror.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A complete `GET /v2/`; resolves with the status line.
async fn get_base(addr: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).lines().next().unwrap_or("").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_clients_are_cut_off_and_connections_are_capped() {
    let hub = FakeHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (_mirror, url) = hubcap_serve(dir.path(), &hub.url, 0, &["--header-timeout", "1s", "--max-connections", "3"], "hubcap.log").await;
    let addr = url.trim_start_matches("http://").to_owned();

    // Three clients drip their headers and take every connection slot.
    let slow: Vec<_> = (0..3).map(|_| tokio::spawn(drip(addr.clone(), Duration::from_secs(8)))).collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A fourth, complete request waits: it is not served while they hold.
    let started = Instant::now();
    let waiting = tokio::spawn({
        let addr = addr.clone();
        async move { get_base(&addr).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "a fourth connection is not served while three are open");
    // The slow ones are cut off after the header timeout; then it is served.
    for s in slow {
        let held = s.await.unwrap();
        assert!(held < Duration::from_secs(4), "a dripping client was held {held:?}");
    }
    assert_eq!(waiting.await.unwrap(), "HTTP/1.1 200 OK");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shutdown_does_not_wait_forever_for_a_request_that_never_ends() {
    let hub = FakeHub::start().await;
    let img = images::small_image(Format::Oci, "amd64", 73, 1);
    hub.publish("library/stuck", "1", &Published::Image(img));
    let dir = tempfile::tempdir().unwrap();
    let (mut mirror, url) =
        hubcap_serve(dir.path(), &hub.url, 0, &["--header-timeout", "60s", "--shutdown-grace", "1s"], "hubcap.log").await;
    // A request in flight for 30 s: upstream is that slow.
    hub.set_fault(Fault::Slow(Duration::from_secs(30)));
    let slow = tokio::spawn(common::client().get(format!("{url}/v2/stuck/manifests/1")).send());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = mirror.child.id().to_string();
    let killed = std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    let exited = exit_within(&mut mirror, Instant::now(), Duration::from_secs(6)).await;
    assert!(exited.success(), "{exited:?}\n{}", mirror.log());
    assert!(mirror.log().contains("shutdown grace"), "it said it closed what was left:\n{}", mirror.log());
    slow.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_in_flight_finishes_on_sigterm_and_then_the_server_exits() {
    let hub = FakeHub::start().await;
    let img = images::small_image(Format::Oci, "amd64", 72, 1);
    hub.publish("library/inflight", "1", &Published::Image(img.clone()));
    let dir = tempfile::tempdir().unwrap();
    let grace = Duration::from_secs(15);
    let (mut mirror, url) = hubcap_serve(dir.path(), &hub.url, 0, &["--shutdown-grace", "15s"], "hubcap.log").await;
    // Upstream answers the manifest after 3 s; the mirror's request for it
    // is under way once it has fetched its token (before the slow answer).
    hub.set_fault(Fault::Slow(Duration::from_secs(3)));
    let request = tokio::spawn({
        let url = url.clone();
        async move {
            let resp = common::client().get(format!("{url}/v2/inflight/manifests/1")).header("accept", common::ALL_MANIFESTS).send().await;
            let resp = resp.expect("an answer, not a dropped connection");
            let (status, digest) = (resp.status(), resp.headers().get("docker-content-digest").cloned());
            (status, digest, resp.bytes().await.expect("the whole body"))
        }
    });
    let started = Instant::now();
    while hub.count(|c| &c.token) == 0 {
        assert!(started.elapsed() < Duration::from_secs(10), "the mirror never asked upstream:\n{}", mirror.log());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let killed = std::process::Command::new("kill").args(["-TERM", &mirror.child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let signalled = Instant::now();
    assert!(!request.is_finished(), "the request is still in flight when SIGTERM arrives");

    let (status, digest, body) = request.await.unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(common::sha256(&body), img.digest, "the whole manifest");
    assert_eq!(digest.unwrap().to_str().unwrap(), img.digest);
    let exited = exit_within(&mut mirror, signalled, grace).await;
    assert!(exited.success(), "{exited:?}\n{}", mirror.log());
    let log = mirror.log();
    assert!(log.contains("shutting down"), "{log}");
    assert!(!log.contains("connections still open"), "nothing was left to close: {log}");
}

/// Commands that read a cache never make or repair one: `stats` and `gc
/// --dry-run` on a directory that is not there say so (and leave none
/// behind, also when run with no `--data` from elsewhere); run as a user
/// who cannot read the cache's signing key, they fail naming it and the
/// key stays as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_only_commands_never_make_or_repair_a_cache() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere");
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    for args in [&["stats"][..], &["gc", "--dry-run"][..]] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_hubcap")).args(args).arg("--data").arg(&missing).output().unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} on a missing cache fails");
        assert!(said.contains(&format!("no cache at {}", missing.display())), "{args:?}: {said}");
        assert!(!missing.exists(), "{args:?} made no directory");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_hubcap")).args(args).current_dir(&elsewhere).output().unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && said.contains(&format!("no cache at {}", elsewhere.join("hubcap-data").display())), "{said}");
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0, "{args:?} left nothing in the directory it ran in");
    }

    // A cache another user owns: the directory and index readable, the
    // key not (0600, as the server leaves it).
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let hub = FakeHub::start().await;
    let (server, url) = hubcap_serve(&data, &hub.url, 0, &[], "hubcap.log").await;
    assert_eq!(common::client().get(format!("{url}/v2/")).send().await.unwrap().status(), 200);
    drop(server);
    let key = data.join("hubcap-data/signing.key");
    let before = std::fs::read(&key).unwrap();
    use std::os::unix::fs::PermissionsExt;
    for d in [dir.path(), &data, &data.join("hubcap-data")] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let exe = dir.path().join("hubcap");
    std::fs::copy(env!("CARGO_BIN_EXE_hubcap"), &exe).unwrap();
    for args in [&["stats"][..], &["gc", "--dry-run"][..]] {
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&exe)
            .args(args)
            .arg("--data")
            .arg(data.join("hubcap-data"))
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} as another user: {said}");
        assert!(said.contains(&key.display().to_string()) && said.contains("ermission denied"), "{args:?} names the key: {said}");
        assert_eq!(std::fs::read(&key).unwrap(), before, "{args:?}: the key is the same");
    }
}

/// What `serve` says when it starts (the URL to point clients at, with the
/// daemon.json and hosts.toml lines, the cache's absolute path, each
/// upstream's URL), and the `--upstream` values it refuses at once, with
/// what to write instead, rather than answering every pull `404`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_says_where_to_point_clients_and_refuses_upstreams_that_cannot_work() {
    let hub = FakeHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (mirror, url) = hubcap_serve(dir.path(), &hub.url, 0, &[], "hubcap.log").await;
    let log = mirror.log();
    for want in [
        format!("url={url}"),
        format!("cache={}", dir.path().join("hubcap-data").display()),
        format!("upstreams=docker.io={}", hub.url.trim_end_matches('/')),
        format!("\"registry-mirrors\": [\"{url}\"]"),
        format!("[host.\"{url}\"]"),
    ] {
        assert!(log.contains(&want), "the start-up says {want}:\n{log}");
    }
    for (spec, says) in [
        ("docker.io=http://127.0.0.1:9/v2", "write docker.io=http://127.0.0.1:9"),
        ("docker.io=127.0.0.1:9", "write docker.io=https://127.0.0.1:9"),
        ("ghcr", "give its host name"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_hubcap"))
            .args(["serve", "--listen", "127.0.0.1:0", "--upstream", spec, "--data"])
            .arg(dir.path().join("refused"))
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--upstream {spec} is refused");
        assert!(said.contains(says), "--upstream {spec}: {said}");
    }
    // Zero where zero cannot work is refused, not taken silently.
    for flag in
        ["--url-ttl", "--fetch-concurrency", "--max-connections", "--max-connections-per-client", "--header-timeout", "--idle-timeout"]
    {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_hubcap"))
            .args(["serve", "--listen", "127.0.0.1:0", flag, "0", "--data"])
            .arg(dir.path().join("refused"))
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && said.contains("must be"), "{flag} 0 is refused, saying why: {said}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn offline_commands_beside_a_running_server_take_nothing_from_it() {
    let hub = FakeHub::start().await;
    let img = images::small_image(Format::Oci, "amd64", 71, 2);
    hub.publish("library/busy", "1", &Published::Image(img.clone()));
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("hubcap-data");
    let (_mirror, url) = hubcap_serve(dir.path(), &hub.url, 0, &[], "hubcap.log").await;
    // The manifest miss queues its blobs; their copies stop half-way.
    hub.set_fault(common::fakehub::Fault::DripBody(Duration::from_secs(3)));
    let http = common::client();
    common::get_manifest(&http, &url, "busy", "1", common::ALL_MANIFESTS).await;
    let in_progress = || std::fs::read_dir(data.join("tmp")).unwrap().count();
    for _ in 0..50 {
        if in_progress() == img.blobs().len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(in_progress(), img.blobs().len(), "every copy is under way");
    // `hubcap stats` and `hubcap gc` on the same directory meanwhile.
    for args in [&["stats", "--json"][..], &["gc", "--dry-run"][..]] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_hubcap")).args(args).arg("--data").arg(&data).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(in_progress(), img.blobs().len(), "the server's copies in progress are untouched");
    // They finish, and are served, each copied once.
    hub.set_fault(common::fakehub::Fault::None);
    for (digest, bytes) in img.blobs() {
        assert_eq!(common::get_blob(&http, &url, "busy", &digest).await, bytes);
        assert_eq!(hub.cdn_gets(&digest), 1, "{digest} copied once");
    }
}

/// A loopback HTTP service that is not a configured upstream: it answers
/// anything with a tag list naming `evil`, and counts what it is asked.
async fn internal_service() -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let app = axum::Router::new().fallback(move || {
        let counted = counted.clone();
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            ([("content-type", "application/json")], r#"{"name":"library/x","tags":["evil"]}"#)
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr.to_string(), hits)
}

/// An in-process mirror on `hub` with these upstream limits.
async fn mirror_with_limits(dir: &std::path::Path, hub: &FakeHub, limits: UpstreamLimits, blob_wait: Duration) -> Hubcap {
    let mut opts = common::options(
        hubcap::assemble::Backend::Local(dir.to_owned()),
        vec![format!("docker.io={}", hub.url)],
        MirrorConfig { blob_wait, ..common::config() },
    );
    opts.upstream_limits = limits;
    Hubcap::start_opts(opts).await
}

async fn blob_record(m: &Hubcap, repo: &str, digest: &str) -> hubcap::storage::BlobRecord {
    let d = hubcap::oci::Digest::parse(digest).unwrap();
    m.mirror.index().blob(&format!("docker.io/{repo}"), &d).await.unwrap().record.expect("a blob record")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upstream_redirects_are_followed_only_for_blobs_and_never_into_the_host() {
    let hub = FakeHub::start().await;
    let img = images::small_image(Format::Oci, "amd64", 81, 2);
    hub.publish("library/redir", "1", &Published::Image(img.clone()));
    let (internal, hits) = internal_service().await;
    let dir = tempfile::tempdir().unwrap();
    let m = mirror_with_limits(&dir.path().join("a"), &hub, common::upstream_limits(), Duration::from_secs(10)).await;
    let http = common::client();

    // Manifests, HEADs and tag lists never follow a redirect, even to loopback.
    hub.set_fault(Fault::RedirectTo(format!("http://{internal}")));
    let resp = http.get(format!("{}/v2/redir/manifests/1", m.url)).header("accept", common::ALL_MANIFESTS).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.text().await.unwrap().contains("only blob downloads may be redirected"));
    let resp = http.get(format!("{}/v2/redir/tags/list", m.url)).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert!(!resp.text().await.unwrap().contains("evil"), "the redirected tag list never reaches the client");
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the internal service was never asked");

    // Blob downloads follow redirects to the CDN, but not to another
    // loopback port (by address or by name).
    hub.set_fault(Fault::None);
    common::get_manifest(&http, &m.url, "redir", "1", common::ALL_MANIFESTS).await;
    let blobs = img.blobs();
    let (config, _) = &blobs[0];
    common::get_blob(&http, &m.url, "redir", config).await;
    for (i, target) in
        [format!("http://{internal}"), format!("http://localhost:{}", internal.rsplit_once(':').unwrap().1)].iter().enumerate()
    {
        // A blob nothing has fetched yet: the copy starts with this GET.
        let layer = images::noise(3000 + i, 900 + i as u64);
        let digest = hub.put_blob("library/redir", &layer);
        hub.set_fault(Fault::RedirectBlobsTo(target.clone()));
        let resp = http.get(format!("{}/v2/redir/blobs/{digest}", m.url)).send().await.unwrap();
        assert_eq!(resp.status(), 503, "{target}");
        let r = blob_record(&m, "library/redir", &digest).await;
        assert!(r.last_error.as_deref().unwrap_or("").contains("refused"), "{target}: {r:?}");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the internal service was never asked");
    m.stop().await;

    // The rule, not a broken path: allowed explicitly, the same redirect is
    // followed (and its wrong bytes refused).
    let limits = UpstreamLimits { redirect_allow: vec![internal.clone()], ..common::upstream_limits() };
    let m = mirror_with_limits(&dir.path().join("b"), &hub, limits, Duration::from_secs(10)).await;
    let digest = hub.put_blob("library/redir", &images::noise(3500, 950));
    hub.set_fault(Fault::RedirectBlobsTo(format!("http://{internal}")));
    let resp = http.get(format!("{}/v2/redir/blobs/{digest}", m.url)).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert!(hits.load(Ordering::SeqCst) >= 1, "an allowed internal host:port is followed");
    let r = blob_record(&m, "library/redir", &digest).await;
    assert!(r.last_error.as_deref().unwrap_or("").contains("upstream declared"), "its wrong answer is refused: {r:?}");
    m.stop().await;

    // A 401 whose token realm is inside is refused too (a new mirror, so it
    // has no token yet).
    hub.set_fault(Fault::None);
    let before = hits.load(Ordering::SeqCst);
    *hub.state.realm.lock().unwrap() = format!("http://{internal}/token");
    let m = mirror_with_limits(&dir.path().join("c"), &hub, common::upstream_limits(), Duration::from_secs(10)).await;
    let resp = http.get(format!("{}/v2/redir/manifests/1", m.url)).header("accept", common::ALL_MANIFESTS).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.text().await.unwrap().contains("token realm"));
    assert_eq!(hits.load(Ordering::SeqCst), before, "the internal service was never asked for a token");
}

/// How long a copy in the trickling tests may take to bring 1 KiB a second.
const TRICKLE_WINDOW: Duration = Duration::from_secs(4);

/// `library/big` (eight 20 KB layers) and `library/small` (a healthy image)
/// on the fake hub, and a mirror whose copies must bring 1 KiB/s in every
/// `TRICKLE_WINDOW` (the rest of `limits` as given). Returns the mirror and
/// big.
async fn trickle_setup(hub: &FakeHub, dir: &std::path::Path, limits: UpstreamLimits) -> (Hubcap, images::Image) {
    let big = images::image(Format::Oci, "amd64", (0..8).map(|i| vec![(format!("f{i}"), images::noise(20_000, 2000 + i))]).collect());
    hub.publish("library/big", "1", &Published::Image(big.clone()));
    let small = images::small_image(Format::Oci, "amd64", 82, 2);
    hub.publish("library/small", "1", &Published::Image(small));
    let limits = UpstreamLimits { window: TRICKLE_WINDOW, min_rate: 1024, ..limits };
    (mirror_with_limits(dir, hub, limits, Duration::from_secs(3)).await, big)
}

/// Eight layers of `library/big` whose bodies trickle take every fetch slot
/// (the test mirror has 8); a healthy image is still served at once, since
/// stalled copies give their slots back after a quarter window. Returns how
/// many ranged requests the trickling copies made before the healthy pull.
async fn trickling_layers_leave_room_for_a_healthy_pull(hub: &FakeHub, m: &Hubcap) -> usize {
    let http = common::client();
    hub.set_fault(Fault::Trickle { every: Duration::from_millis(300), min_len: 10_000 });
    let ranged = hub.count(|c| &c.cdn_ranged);
    common::get_manifest(&http, &m.url, "big", "1", common::ALL_MANIFESTS).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ranged = hub.count(|c| &c.cdn_ranged) - ranged;
    let started = Instant::now();
    common::pull(&http, &m.url, "small", "1").await;
    let took = started.elapsed();
    assert!(took < TRICKLE_WINDOW / 2 + Duration::from_millis(500), "a healthy pull behind stalled copies took {took:?}");
    ranged
}

/// The same in ranged parts (every blob copied in parts): a part below the
/// rate marks its copy stalled while the copy waits on it, so the slots
/// come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ranged_copies_that_stall_give_their_fetch_slots_back() {
    let hub = FakeHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (m, _) = trickle_setup(&hub, dir.path(), UpstreamLimits { ranged_from: 1, ..common::upstream_limits() }).await;
    let ranged = trickling_layers_leave_room_for_a_healthy_pull(&hub, &m).await;
    assert!(ranged >= 8, "the layers are asked for in ranges: {ranged} ranged requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dripping_upstream_transfers_are_cut_off_and_cannot_starve_healthy_ones() {
    let hub = FakeHub::start().await;
    // A manifest of 40 small layers (about 8 KB), an image of eight 20 KB
    // layers, and a small healthy image.
    let wide = images::image(Format::Oci, "amd64", (0..40).map(|i| vec![(format!("f{i}"), images::noise(100, 1000 + i))]).collect());
    hub.publish("library/wide", "1", &Published::Image(wide.clone()));
    let dir = tempfile::tempdir().unwrap();
    let (m, big) = trickle_setup(&hub, dir.path(), common::upstream_limits()).await;
    let (http, window) = (common::client(), TRICKLE_WINDOW);

    // A manifest that comes a byte at a time fails within the window.
    hub.set_fault(Fault::Trickle { every: Duration::from_millis(300), min_len: 5_000 });
    let started = Instant::now();
    let resp = http.get(format!("{}/v2/wide/manifests/1", m.url)).header("accept", common::ALL_MANIFESTS).send().await.unwrap();
    assert_eq!(resp.status(), 503, "{:?}", resp.text().await);
    let took = started.elapsed();
    assert!(took < window + Duration::from_secs(2), "a trickling manifest held the request {took:?}");

    trickling_layers_leave_room_for_a_healthy_pull(&hub, &m).await;
    // The trickling copies are cut off (three tries, a window each).
    let layers: Vec<String> = big.blobs().into_iter().skip(1).map(|(d, _)| d).collect();
    let deadline = Instant::now() + window * 3 + Duration::from_secs(10);
    for d in &layers {
        loop {
            let r = blob_record(&m, "library/big", d).await;
            if r.state == hubcap::storage::BlobState::Failed {
                assert!(r.last_error.as_deref().unwrap_or("").contains("below the minimum"), "{r:?}");
                break;
            }
            assert!(Instant::now() < deadline, "{d} still {:?} after {:?}", r.state, started.elapsed());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let left = std::fs::read_dir(dir.path().join("tmp")).expect("the store's tmp directory").count();
    assert_eq!(left, 0, "nothing half-written is left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blob_whose_size_upstream_misstates_or_overruns_is_refused_and_nothing_is_stored() {
    let hub = FakeHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let m = mirror_with_limits(dir.path(), &hub, common::upstream_limits(), Duration::from_secs(20)).await;
    let http = common::client();
    for (i, (fault, error)) in [
        (Fault::ShortLength, "upstream declared {short} bytes, the manifest {size}"),
        (Fault::ExtraBytes, "upstream sent more than the {size} bytes declared"),
    ]
    .into_iter()
    .enumerate()
    {
        let img = images::small_image(Format::Oci, "amd64", 86 + i as u64, 1);
        let repo = format!("misstated{i}");
        hub.publish(&format!("library/{repo}"), "1", &Published::Image(img.clone()));
        // The manifest declares each blob's size; the CDN then lies about it
        // (the copies start with the manifest).
        hub.set_fault(fault.clone());
        common::get_manifest(&http, &m.url, &repo, "1", common::ALL_MANIFESTS).await;
        let (digest, layer) = img.blobs().pop().unwrap();
        let resp = http.get(format!("{}/v2/{repo}/blobs/{digest}", m.url)).send().await.unwrap();
        // A 503, or (a copy followed once it brought bytes) a body cut short.
        if resp.status() == 503 {
            assert_eq!(common::error_code(resp).await, "UNAVAILABLE", "{fault:?}");
        } else {
            assert!(common::blob_refused(resp, &digest).await, "{fault:?}: never a complete wrong body");
        }
        let r = blob_record(&m, &format!("library/{repo}"), &digest).await;
        assert_eq!(r.state, hubcap::storage::BlobState::Failed, "{fault:?}");
        let want = error.replace("{short}", &(layer.len() - 1).to_string()).replace("{size}", &layer.len().to_string());
        assert_eq!(r.last_error.as_deref(), Some(want.as_str()), "{fault:?}");
        assert!(!dir.path().join("blobs/sha256").join(digest.trim_start_matches("sha256:")).exists(), "{fault:?}: nothing stored");
        // The image's other blob (its config) fails the same way, maybe a
        // moment later on a loaded machine: once both copies end, nothing
        // half-written is left.
        let started = std::time::Instant::now();
        while std::fs::read_dir(dir.path().join("tmp")).unwrap().count() > 0 && started.elapsed() < Duration::from_secs(15) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0, "{fault:?}: nothing half-written is left");
        // Upstream honest again: the blob is copied and served.
        hub.set_fault(Fault::None);
        assert_eq!(common::get_blob(&http, &m.url, &repo, &digest).await, layer);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blobs_larger_than_the_cap_are_never_copied_whole() {
    let hub = FakeHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let limits = UpstreamLimits { max_blob: 256 * 1024, ..common::upstream_limits() };
    let m = mirror_with_limits(dir.path(), &hub, limits, Duration::from_secs(10)).await;
    let http = common::client();

    // Declared too large (in the manifest): refused without a download.
    let img = images::image(Format::Oci, "amd64", vec![vec![("big".into(), images::noise(300 * 1024, 84))]]);
    hub.publish("library/large", "1", &Published::Image(img.clone()));
    common::get_manifest(&http, &m.url, "large", "1", common::ALL_MANIFESTS).await;
    let (layer, _) = img.blobs().pop().unwrap();
    let resp = http.get(format!("{}/v2/large/blobs/{layer}", m.url)).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(hub.cdn_gets(&layer), 0, "a blob declared larger than the cap is not downloaded");

    // No declared size and a body that never ends: cut off at the cap,
    // with the memory and the disk it took measured while it runs.
    let digest = hub.put_blob("library/large", &images::noise(4000, 85));
    let rss = || common::procs::rss_kib(std::process::id());
    let before = rss();
    let tmp = dir.path().join("tmp");
    let watching = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = {
        let (tmp, watching) = (tmp.clone(), watching.clone());
        tokio::spawn(async move {
            let (mut most_tmp, mut most_rss) = (0u64, 0u64);
            while watching.load(Ordering::SeqCst) {
                let in_tmp: u64 =
                    std::fs::read_dir(&tmp).into_iter().flatten().flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum();
                most_tmp = most_tmp.max(in_tmp);
                most_rss = most_rss.max(common::procs::rss_kib(std::process::id()));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (most_tmp, most_rss)
        })
    };
    hub.set_fault(Fault::Endless);
    let resp = http.get(format!("{}/v2/large/blobs/{digest}", m.url)).send().await.unwrap();
    assert!(common::blob_refused(resp, &digest).await, "a 503, or a followed body cut short");
    let r = blob_record(&m, "library/large", &digest).await;
    watching.store(false, Ordering::SeqCst);
    let (most_tmp, most_rss) = watcher.await.unwrap();
    assert!(r.last_error.as_deref().unwrap_or("").contains("largest blob"), "{r:?}");
    let sent = hub.count(|c| &c.cdn_bytes) as u64;
    let cap = 256 * 1024;
    eprintln!(
        "endless blob: upstream sent {sent} bytes; tmp/ held at most {most_tmp} bytes; RSS {before} KiB before, at most {most_rss} KiB"
    );
    // Three tries, each reading the cap and what loopback's socket buffers
    // held when it stopped (a few MiB at most).
    assert!(sent <= 3 * (cap + (6 << 20)), "upstream sent {sent} bytes before the mirror stopped reading");
    assert!(most_tmp <= cap + (1 << 20), "tmp/ held {most_tmp} bytes: more than the cap and a read's chunk");
    assert!(most_rss <= before + 32 * 1024, "memory grew from {before} to {most_rss} KiB");
}
