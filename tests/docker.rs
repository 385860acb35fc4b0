//! Docker's own daemon (Debian's docker.io, dockerd 20.10) pulls through
//! `registry-mirrors`: against the real `hubcap serve` (upstream: Debian's
//! docker-registry), and against the `api` and `fetcher` Lambdas under
//! `cargo lambda watch` on moto behind `hubcap lambda-dev` (upstream: the
//! fake Docker Hub). The images: a multi-arch OCI index, a Docker schema 2
//! manifest list and a plain Docker schema 2 image. Every pull is checked
//! against what the daemon stored: the digest it reports and records, the
//! image ID, and from `docker save` the config's bytes and every unpacked
//! layer's diff_id.
//!
//! Cold: one image by digest, all by tag, the index's arm64 image
//! (`--platform`). Warm, with the images removed and the upstream stopped:
//! all by tag, then all by digest; every request a hit, none upstream.
//! `hubcap serve` then restarts with every tag due for re-validation (served
//! stale), and with client credentials (dockerd sends config.json's Docker
//! Hub entry to the mirror).
//!
//! dockerd falls back to Docker Hub when a mirror fails, so each scenario
//! runs in namespaces of its own: the outer test re-runs this binary for the
//! inner test under `unshare --net --mount --pid`. The network namespace has
//! only loopback (a fallback finds no route, nothing can leave the host); the
//! mount namespace puts tmpfs over /run and /etc/docker (dockerd writes its
//! key.json and plugin directory there); the PID namespace's init is the
//! inner test, so when it ends, however it ends, the kernel kills dockerd,
//! its containerd and every other process it started.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::images::{self, Format, Image, Published};
use common::lambda::LambdaStack;
use common::netns::{Dockerd, access_lines, amd64, field, inner, pull_and_verify, pull_platform_and_verify, run_isolated};
use common::procs::Proc;
use common::registries::{self, upstream_registry};

/// The images every scenario pulls: a multi-arch OCI index (most of Docker
/// Hub today), a Docker schema 2 manifest list and a plain Docker schema 2
/// image. A few layers of a few KB each.
fn test_images(seed: u64) -> Vec<(&'static str, &'static str, Published)> {
    let oci = images::index(
        Format::Oci,
        vec![images::small_image(Format::Oci, "amd64", seed, 3), images::small_image(Format::Oci, "arm64", seed + 1, 2)],
    );
    let list = images::index(
        Format::Docker,
        vec![images::small_image(Format::Docker, "arm64", seed + 2, 1), images::small_image(Format::Docker, "amd64", seed + 3, 2)],
    );
    let plain = Published::Image(images::small_image(Format::Docker, "amd64", seed + 4, 2));
    vec![("library/oci-index", "1", oci), ("library/docker-list", "1", list), ("library/docker-plain", "1", plain)]
}

/// How a pull names the image.
#[derive(Clone, Copy, Debug)]
enum By {
    Tag,
    Digest,
}

/// Pulls and verifies every image, by tag or by digest.
async fn pull_all(docker: &Dockerd, dir: &Path, pulled: &[(&str, &str, Published)], by: By) {
    let t = Instant::now();
    for (name, tag, img) in pulled {
        let reference = match by {
            By::Tag => format!("{name}:{tag}"),
            By::Digest => format!("{name}@{}", img.digest()),
        };
        pull_and_verify(docker, dir, &reference, img).await;
    }
    println!("pulled by {by:?} in {:.1} s", t.elapsed().as_secs_f64());
}

/// Cold: the last image by digest (a miss by digest, its blobs fetched
/// for that pull), every image by tag, and the first one's arm64 image
/// (`--platform`).
async fn cold_pulls(docker: &Dockerd, dir: &Path, pulled: &[(&str, &str, Published)]) {
    let (name, _, img) = pulled.last().unwrap();
    pull_and_verify(docker, dir, &format!("{name}@{}", img.digest()), img).await;
    pull_all(docker, dir, pulled, By::Tag).await;
    let (name, tag, img) = &pulled[0];
    pull_platform_and_verify(docker, dir, &format!("{name}:{tag}"), img, "arm64").await;
}

/// Removes every image (and so every layer) from the daemon.
async fn remove_all(docker: &Dockerd) {
    let ids = docker.run(&["images", "-aq"]).await;
    let mut ids: Vec<&str> = ids.split_whitespace().collect();
    ids.dedup();
    let mut args = vec!["rmi", "-f"];
    args.extend(ids);
    docker.run(&args).await;
    let left = docker.run(&["images", "-aq"]).await;
    assert!(left.trim().is_empty(), "no image left: {left}");
}

/// The requests the mirror sent upstream (`/metrics`, this process's count).
async fn upstream_requests(mirror: &str) -> u64 {
    let text = reqwest::get(format!("{mirror}/metrics")).await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("hubcap_upstream_requests_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// The warm pulls' requests for each image were all answered from the
/// cache, config and layers included.
fn assert_all_hits(warm: &str, pulled: &[(&str, &str, Published)]) {
    for (name, _, img) in pulled {
        let lines = access_lines(warm, &format!("/v2/{name}/"));
        assert!(!lines.is_empty(), "{name} asked for:\n{warm}");
        for l in &lines {
            assert_eq!(field(l, "cache"), "hit", "{name}: warm requests all hits:\n{l}");
        }
        for (blob, _) in amd64(img).blobs() {
            let served = access_lines(warm, &format!("/v2/{name}/blobs/{blob}"));
            assert!(
                served.iter().filter(|l| field(l, "status") == "307").count() >= 2,
                "{name}: {blob} served by tag and by digest:\n{warm}"
            );
        }
    }
}

/// SIGTERM, then up to 5 s for a clean exit (then `Proc`'s SIGKILL).
fn stop_gracefully(mut proc: Proc) {
    let _ = Command::new("kill").args(["-TERM", &proc.child.id().to_string()]).status();
    for _ in 0..100 {
        if let Ok(Some(status)) = proc.child.try_wait() {
            assert!(status.success(), "clean exit on SIGTERM:\n{}", proc.log());
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no exit 5 s after SIGTERM:\n{}", proc.log());
}

#[test]
fn docker_pulls_through_hubcap_serve() {
    run_isolated("netns::hubcap_serve");
}

#[test]
fn docker_pulls_through_the_lambdas_under_cargo_lambda_watch() {
    run_isolated("netns::lambdas");
}

#[test]
fn how_long_docker_waits_on_a_mirror_for_a_layer() {
    run_isolated("netns::patience");
}

/// What a layer request meets at the `patience` scenario's registry.
#[derive(Clone, Copy, PartialEq)]
enum Patience {
    /// Always a `307` to itself, one hop further.
    RedirectForever,
    /// The bytes, after this long.
    Hold(Duration),
}

/// The `patience` scenario's registry: no auth, the images' manifests and
/// blobs, except that requests for `layer` meet `mode`; it records when
/// each of those came and at which hop.
struct Patient {
    manifests: HashMap<String, Image>,
    blobs: HashMap<String, bytes::Bytes>,
    layer: String,
    mode: Patience,
    seen: Vec<(Instant, u32)>,
}

async fn patient(
    axum::extract::State(state): axum::extract::State<std::sync::Arc<std::sync::Mutex<Patient>>>,
    uri: axum::http::Uri,
) -> axum::response::Response {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    let path = uri.path().trim_start_matches("/v2/").to_owned();
    if path.is_empty() {
        return StatusCode::OK.into_response();
    }
    let hop: u32 = uri.query().and_then(|q| q.strip_prefix("hop=")).and_then(|v| v.parse().ok()).unwrap_or(0);
    let (name, kind, reference) = match path.rsplitn(3, '/').collect::<Vec<_>>()[..] {
        [reference, kind, name] => (name.to_owned(), kind.to_owned(), reference.to_owned()),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    let wait = {
        let mut s = state.lock().unwrap();
        if kind == "manifests" {
            let Some(img) = s.manifests.get(&name) else { return StatusCode::NOT_FOUND.into_response() };
            let headers = [
                (header::CONTENT_TYPE, img.media_type.clone()),
                (header::HeaderName::from_static("docker-content-digest"), img.digest.clone()),
            ];
            return (headers, img.manifest.clone()).into_response();
        }
        let Some(bytes) = s.blobs.get(&reference).cloned() else { return StatusCode::NOT_FOUND.into_response() };
        if reference != s.layer {
            return bytes.into_response();
        }
        s.seen.push((Instant::now(), hop));
        match s.mode {
            Patience::RedirectForever => {
                let next = format!("/v2/{name}/blobs/{reference}?hop={}", hop + 1);
                return (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, next)]).into_response();
            }
            Patience::Hold(d) => (d, bytes),
        }
    };
    tokio::time::sleep(wait.0).await;
    wait.1.into_response()
}

/// The tries in recorded layer requests: chains per try (a try is the
/// chains starting within a second of each other), the most redirects any
/// chain followed, and the pauses between tries in seconds.
fn tries_of(seen: &[(Instant, u32)]) -> (Vec<usize>, u32, Vec<f64>) {
    let mut tries: Vec<(Instant, usize)> = Vec::new();
    for (at, _) in seen.iter().filter(|(_, hop)| *hop == 0) {
        match tries.last_mut() {
            Some((start, n)) if *at - *start < Duration::from_secs(1) => *n += 1,
            _ => tries.push((*at, 1)),
        }
    }
    let max_hop = seen.iter().map(|(_, hop)| *hop).max().unwrap_or(0);
    let pauses = tries.windows(2).map(|w| (w[1].0 - w[0].0).as_secs_f64()).collect();
    (tries.iter().map(|(_, n)| *n).collect(), max_hop, pauses)
}

/// `podman pull` or `ctr content fetch` of `forever:1` through `mirror`,
/// each falling back to a closed loopback port; at most two minutes.
async fn client_pull(client: &str, d: &Path, mirror: &str) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(client);
    let _containerd = if client == "podman" {
        cmd.env("CONTAINERS_REGISTRIES_CONF", common::registries_conf(d, mirror, "patience"));
        cmd.arg("--root").arg(d.join("podman-root")).arg("--runroot").arg(d.join("podman-run"));
        cmd.args(["--storage-driver", "vfs", "--events-backend", "none", "--cgroup-manager", "cgroupfs"]);
        cmd.args(["pull", "--arch", "amd64", "--os", "linux"]).arg("--signature-policy").arg(common::skopeo_policy(d));
        cmd.arg("docker.io/library/forever:1");
        None
    } else {
        let sock = d.join("ctrd.sock");
        let config = d.join("containerd.toml");
        let toml = format!(
            "version = 2\nroot = \"{}\"\nstate = \"{}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{}\"\n[ttrpc]\n  address = \"{}\"\n",
            d.join("ctrd-root").display(),
            d.join("ctrd-state").display(),
            sock.display(),
            d.join("ctrd-ttrpc.sock").display()
        );
        std::fs::write(&config, toml).unwrap();
        let containerd = Proc::spawn(Command::new("containerd").arg("--config").arg(&config), d.join("containerd.log"));
        for _ in 0..200 {
            if sock.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let hosts = d.join("certs.d");
        std::fs::create_dir_all(hosts.join("docker.io")).unwrap();
        let host = format!("server = \"http://127.0.0.1:9\"\n\n[host.\"{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n");
        std::fs::write(hosts.join("docker.io/hosts.toml"), host).unwrap();
        cmd.arg("--address").arg(&sock).args(["content", "fetch", "--hosts-dir"]).arg(&hosts).arg("docker.io/library/forever:1");
        Some(containerd)
    };
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{client} still running after 120 s"))
        .unwrap()
}

mod netns {
    use super::*;

    /// Scenario 1: dockerd -> `hubcap serve` -> Debian's docker-registry.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    #[ignore = "run by its outer test, in its own namespaces"]
    async fn hubcap_serve() {
        let Some((t0, dir)) = inner() else { return };
        let d = dir.path();
        let (registry, registry_url) = upstream_registry(d).await;
        let pulled = test_images(300);
        for (name, tag, img) in &pulled {
            images::push(&registry_url, name, tag, img).await;
        }
        let (mirror, mirror_url) = registries::hubcap_serve(d, &registry_url, 0, &[], "hubcap.log").await;
        let docker = Dockerd::start(d, &mirror_url).await;
        println!("started in {:.1} s", t0.elapsed().as_secs_f64());

        cold_pulls(&docker, d, &pulled).await;
        let log = mirror.log();
        for (name, tag, _) in &pulled {
            let lines = access_lines(&log, &format!("/v2/{name}/manifests/{tag}"));
            assert!(lines.iter().any(|l| field(l, "status") == "200"), "dockerd asked the mirror for {name}:{tag}:\n{log}");
        }
        let cold_upstream = upstream_requests(&mirror_url).await;
        assert!(cold_upstream > 0);

        // Warm: upstream gone, the images removed; by tag, then by digest.
        drop(registry);
        let mark = mirror.log().len();
        for by in [By::Tag, By::Digest] {
            remove_all(&docker).await;
            pull_all(&docker, d, &pulled, by).await;
        }
        assert_eq!(upstream_requests(&mirror_url).await, cold_upstream, "the warm pulls sent nothing upstream");
        assert_all_hits(&mirror.log()[mark..], &pulled);

        // The mirror restarts with every tag due for re-validation, upstream
        // still gone: the tags are served stale from what is on disk.
        let port: u16 = mirror_url.rsplit(':').next().unwrap().parse().unwrap();
        stop_gracefully(mirror);
        let (mirror, _) = registries::hubcap_serve(d, "http://127.0.0.1:9", port, &["--tag-ttl", "0"], "hubcap-restarted.log").await;
        remove_all(&docker).await;
        pull_all(&docker, d, &pulled, By::Tag).await;
        let log = mirror.log();
        for (name, tag, _) in &pulled {
            let lines = access_lines(&log, &format!("/v2/{name}/manifests/{tag}"));
            assert!(lines.iter().any(|l| field(l, "cache") == "stale"), "{name}:{tag} served stale:\n{log}");
        }
        docker.assert_mirror_only(&mirror_url, &pulled);

        // A mirror that requires credentials: dockerd presents the client's
        // credentials for Docker Hub (`https://index.docker.io/v1/` in
        // config.json) to the mirror when challenged; without them it fails.
        stop_gracefully(mirror);
        let (mirror, _) =
            registries::hubcap_serve(d, "http://127.0.0.1:9", port, &["--client-user", "ci:pa55word"], "hubcap-locked.log").await;
        remove_all(&docker).await;
        let (name, tag, img) = &pulled[0];
        let reference = format!("{name}:{tag}");
        let refused = docker.docker().args(["pull", &reference]).output().await.unwrap();
        assert!(!refused.status.success(), "no credentials, no pull");
        assert!(mirror.log().contains("status=401"), "challenged:\n{}", mirror.log());
        use base64::Engine as _;
        let auth = base64::engine::general_purpose::STANDARD.encode("ci:pa55word");
        std::fs::create_dir_all(&docker.config).unwrap();
        std::fs::write(
            docker.config.join("config.json"),
            serde_json::json!({ "auths": { "https://index.docker.io/v1/": { "auth": auth } } }).to_string(),
        )
        .unwrap();
        pull_and_verify(&docker, d, &reference, img).await;
        let log = mirror.log();
        assert!(!log.contains("pa55word") && !log.contains(&auth), "the client's credentials stay out of the log:\n{log}");
        drop(docker);
        println!("total {:.1} s", t0.elapsed().as_secs_f64());
    }

    /// Scenario 3, what any mirror's blob-miss path must fit: how many
    /// redirects dockerd follows for a layer, how often and when it tries
    /// the layer again, and how long it waits on one response. dockerd ->
    /// the fake Docker Hub as the mirror, its blob redirects going to a
    /// host that plays each part.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    #[ignore = "run by its outer test, in its own namespaces"]
    async fn patience() {
        let Some((t0, dir)) = inner() else { return };
        let d = dir.path();
        let (forever, held) = (images::small_image(Format::Docker, "amd64", 320, 1), images::small_image(Format::Docker, "amd64", 321, 1));
        let blobs: HashMap<String, bytes::Bytes> = forever.blobs().into_iter().chain(held.blobs()).collect();
        let manifests: HashMap<String, Image> =
            [("library/forever".to_owned(), forever.clone()), ("library/held".to_owned(), held.clone())].into();
        let state = std::sync::Arc::new(std::sync::Mutex::new(Patient {
            manifests,
            blobs,
            layer: forever.layers[0].0.clone(),
            mode: Patience::RedirectForever,
            seen: Vec::new(),
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new().fallback(patient).with_state(state.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let docker = Dockerd::start(d, &url).await;
        println!("started in {:.1} s", t0.elapsed().as_secs_f64());

        // Redirected forever: the redirects dockerd follows per try, the
        // tries, and the pauses between them; then the pull fails.
        let started = Instant::now();
        let out = docker.docker().args(["pull", "forever:1"]).output().await.unwrap();
        let took = started.elapsed();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!out.status.success(), "a layer that never comes fails the pull");
        println!("docker pull: {text}\n{}", docker.log_tail());
        let (per_try, max_hop, pauses) = tries_of(&state.lock().unwrap().seen);
        println!(
            "dockerd, redirected forever: {} tries of {per_try:?} request chains, each chain {} requests ({max_hop} redirects followed), pauses between tries {pauses:.1?} s, pull failed after {:.1} s",
            per_try.len(),
            max_hop + 1,
            took.as_secs_f64()
        );
        assert_eq!(max_hop, 9, "Go's client follows 9 redirects (it refuses the 10th)");
        assert!(per_try.iter().all(|n| *n == 2), "each try asks twice: {per_try:?}");
        assert_eq!(per_try.len(), 6, "dockerd tries a layer 6 times: the first and 5 retries (--max-download-attempts)");
        for (i, pause) in pauses.iter().enumerate() {
            let want = 5.0 * (i + 1) as f64;
            assert!((want..want + 2.0).contains(pause), "pause {i}: {pause:.1} s, want about {want} s");
        }

        // podman and containerd's ctr, redirected forever too (their mirror
        // configuration falls back to a closed loopback port).
        for client in ["podman", "ctr"] {
            state.lock().unwrap().seen.clear();
            let started = Instant::now();
            let out = client_pull(client, d, &url).await;
            let took = started.elapsed();
            let (per_try, max_hop, pauses) = tries_of(&state.lock().unwrap().seen);
            println!(
                "{client}, redirected forever: {} tries of {per_try:?} request chains, each chain {} requests ({max_hop} redirects followed), pauses between tries {pauses:.1?} s, pull failed after {:.1} s",
                per_try.len(),
                max_hop + 1,
                took.as_secs_f64()
            );
            assert!(!out.status.success(), "{client}: a layer that never comes fails the pull");
            assert_eq!(max_hop, 9, "{client}: Go's client follows 9 redirects:\n{}", String::from_utf8_lossy(&out.stderr));
            // Unlike dockerd, one try: a mirror must never tell them to come back later.
            assert_eq!(per_try, [1], "{client} tries a layer once, one chain");
        }

        // Held: one response 25 s in coming (more than `--blob-wait`, 20 s)
        // is waited for.
        let hold = Duration::from_secs(25);
        {
            let mut h = state.lock().unwrap();
            h.layer = held.layers[0].0.clone();
            h.mode = Patience::Hold(hold);
            h.seen.clear();
        }
        let started = Instant::now();
        docker.run(&["pull", "held:1"]).await;
        let took = started.elapsed();
        let tries = state.lock().unwrap().seen.len();
        println!("held {hold:?}: pulled in {:.1} s with {tries} request(s) for the layer", took.as_secs_f64());
        assert_eq!(tries, 1, "the held response was waited for, not given up and tried again");
        assert!(took >= hold);
        drop(docker);
        println!("total {:.1} s", t0.elapsed().as_secs_f64());
    }

    /// Scenario 2: dockerd -> `hubcap lambda-dev` -> the `api` function
    /// under `cargo lambda watch` on moto (S3 + DynamoDB), the `fetcher`
    /// function fed by the table's stream -> the fake Docker Hub.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    #[ignore = "run by its outer test, in its own namespaces"]
    async fn lambdas() {
        let Some((t0, dir)) = inner() else { return };
        let d = dir.path();
        let mut hub = common::fakehub::FakeHub::start().await;
        let pulled = test_images(310);
        for (name, tag, img) in &pulled {
            hub.publish(name, tag, img);
        }
        // A blob still on its way into S3 waits 0.25 s, then the api
        // redirects Docker back to itself (`?hubcap-wait=N`), up to 5
        // times: the cold pulls can take that loop (seen with 0.05 s).
        let world = LambdaStack::start(d, "docker", &hub.url, &[("HUBCAP_BLOB_WAIT", "0.25".into())]).await;
        let docker = Dockerd::start(d, &world.front).await;
        println!("started in {:.1} s", t0.elapsed().as_secs_f64());

        cold_pulls(&docker, d, &pulled).await;
        // Every blob came from upstream once, copied into S3 by the fetcher function.
        for (name, _, img) in &pulled {
            for (digest, _) in amd64(img).blobs() {
                assert_eq!(hub.cdn_gets(&digest), 1, "{name}: {digest} copied from upstream once\n{}", world.logs());
            }
        }
        assert!(world.fetcher.log().contains("\"fetched\""), "the fetcher function copied the blobs:\n{}", world.logs());
        let cold_upstream = upstream_requests(&world.front).await;
        assert!(cold_upstream > 0);

        // Warm: upstream gone, the images removed; by tag, then by digest.
        hub.stop().await;
        let marks = (world.api.log().len(), world.fetcher.log().len());
        for by in [By::Tag, By::Digest] {
            remove_all(&docker).await;
            pull_all(&docker, d, &pulled, by).await;
        }
        assert_eq!(upstream_requests(&world.front).await, cold_upstream, "the warm pulls sent nothing upstream\n{}", world.logs());
        assert_all_hits(&world.api.log()[marks.0..], &pulled);
        assert!(!world.fetcher.log()[marks.1..].contains("\"fetched\""), "nothing fetched warm:\n{}", world.logs());
        docker.assert_mirror_only(&world.front, &pulled);
        drop(docker);
        println!("total {:.1} s", t0.elapsed().as_secs_f64());
    }
}
