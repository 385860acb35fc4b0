//! Test harness: the fake Docker Hub, test images, an in-process `hubcap`
//! on loopback, and a pull that behaves like a container client and checks
//! every byte it receives.
#![allow(dead_code)]

pub mod containerd;
pub mod fakehub;
pub mod iam;
pub mod images;
pub mod lambda;
pub mod moto;
pub mod netns;
pub mod procs;
pub mod registries;
pub mod relay;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hubcap::assemble::{Assembled, Backend, Fetching, MEMORY_CACHE_ENTRIES, Options};
use hubcap::mirror::{Mirror, MirrorConfig};
use hubcap::serve::run;
use tokio::sync::oneshot;

pub use images::{ALL_MANIFESTS, sha256};

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("HUBCAP_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

pub fn config() -> MirrorConfig {
    MirrorConfig {
        tag_ttl: Duration::from_secs(600),
        blob_wait: Duration::from_secs(20),
        url_ttl: Duration::from_secs(900),
        revalidate_timeout: Duration::from_secs(1),
        upstream_backoff: Duration::from_millis(200),
        ..MirrorConfig::default()
    }
}

/// The options the tests serve with: `backend`, `upstreams`, no upstream
/// credentials, open access.
/// Upstream limits for tests: the defaults, with the fake hubs' CDNs
/// allowed as redirect targets, and large blobs always in parallel parts
/// (a loopback upstream is fast enough for one stream, and a loaded
/// machine might make it look otherwise: each test picks its path).
pub fn upstream_limits() -> hubcap::mirror::upstream::UpstreamLimits {
    hubcap::mirror::upstream::UpstreamLimits {
        redirect_allow: fakehub::cdns(),
        one_stream_within: std::time::Duration::ZERO,
        ..Default::default()
    }
}

pub fn options(backend: Backend, upstreams: Vec<String>, mirror: MirrorConfig) -> Options {
    Options {
        backend,
        upstreams,
        credentials: None,
        credentials_secret: None,
        mirror,
        fetch_concurrency: 8,
        access: Default::default(),
        memory_cache_entries: MEMORY_CACHE_ENTRIES,
        upstream_limits: upstream_limits(),
    }
}

/// A `hubcap serve` running in this process on 127.0.0.1:0.
pub struct Hubcap {
    pub url: String,
    pub addr: SocketAddr,
    pub mirror: Arc<Mirror>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Hubcap {
    pub async fn start(data: &Path, upstreams: Vec<String>, mirror: MirrorConfig) -> Hubcap {
        Hubcap::start_opts(options(Backend::Local(data.to_owned()), upstreams, mirror)).await
    }

    pub async fn start_opts(opts: Options) -> Hubcap {
        init_logs();
        let Assembled { mirror, router } = hubcap::assemble::mirror(&opts, Fetching::Owner).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            run(listener, router, async move {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        Hubcap { url: format!("http://{addr}"), addr, mirror, stop: Some(tx), task: Some(task) }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

/// A registries.conf (containers-registries.conf(5), the code path of
/// daemon.json's `registry-mirrors`) that sends docker.io to `mirror`
/// (`http://host:port` or `host:port`). docker.io's own location is a closed
/// loopback port: a fallback could never leave this host.
pub fn registries_conf(dir: &Path, mirror: &str, name: &str) -> std::path::PathBuf {
    let host = mirror.trim_start_matches("http://");
    let path = dir.join(format!("registries-{name}.conf"));
    std::fs::write(
        &path,
        format!(
            "unqualified-search-registries = [\"docker.io\"]\n\n[[registry]]\nprefix = \"docker.io\"\nlocation = \"127.0.0.1:9\"\ninsecure = true\n\n[[registry.mirror]]\nlocation = \"{host}\"\ninsecure = true\n"
        ),
    )
    .unwrap();
    path
}

/// A signature policy that accepts the unsigned test images (`dir/policy.json`).
pub fn skopeo_policy(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("policy.json");
    std::fs::write(&path, r#"{"default":[{"type":"insecureAcceptAnything"}]}"#).unwrap();
    path
}

/// A client that does not follow redirects, so 307s can be checked.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

#[derive(Debug)]
pub struct Pulled {
    pub digest: String,
    pub media_type: String,
    /// The platform manifest's digest (same as `digest` for a plain image).
    pub image_digest: String,
    pub blobs: Vec<String>,
}

/// GETs a manifest with `accept`; checks status 200 and the digest header
/// against the bytes. Returns (media type, digest, body).
pub async fn get_manifest(http: &reqwest::Client, base: &str, name: &str, reference: &str, accept: &str) -> (String, String, bytes::Bytes) {
    let resp = http.get(format!("{base}/v2/{name}/manifests/{reference}")).header("accept", accept).send().await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.bytes().await.unwrap();
    assert_eq!(status, 200, "manifest {name}:{reference}: {}", String::from_utf8_lossy(&body));
    let digest = headers["docker-content-digest"].to_str().unwrap().to_owned();
    assert_eq!(digest, sha256(&body), "digest header matches the bytes");
    assert_eq!(headers["content-length"].to_str().unwrap(), body.len().to_string());
    let mt = headers["content-type"].to_str().unwrap().to_owned();
    (mt, digest, body)
}

/// GETs a blob through the 307 (or, from a copy `serve` is running, its
/// bytes as they come) and checks its bytes hash to `digest`. A
/// copy still running is waited for as a client does: the mirror's
/// redirects back to itself are followed, and a 503 asked again a second
/// later, for up to a minute (a loaded machine can outlast a test's short
/// `blob_wait`).
pub async fn get_blob(http: &reqwest::Client, base: &str, name: &str, digest: &str) -> bytes::Bytes {
    let first = format!("{base}/v2/{name}/blobs/{digest}");
    let (started, mut next) = (std::time::Instant::now(), first.clone());
    let resp = loop {
        let resp = http.get(&next).send().await.unwrap();
        let waiting = resp.headers().get("location").is_some_and(|l| l.to_str().unwrap_or("").contains("hubcap-wait="));
        let retry = resp.status() == 503;
        if !(waiting || retry) || started.elapsed() > Duration::from_secs(60) {
            break resp;
        }
        if waiting {
            next = format!("{base}{}", resp.headers()["location"].to_str().unwrap());
        } else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            next = first.clone();
        }
    };
    if resp.status() == 200 {
        // `serve` hands a cold blob's bytes as its copy brings them: the
        // last one only once stored, verified.
        let body = resp.bytes().await.unwrap_or_else(|e| panic!("blob {digest}: the followed copy was cut: {e}"));
        assert_eq!(sha256(&body), digest, "blob bytes match their digest");
        return body;
    }
    assert_eq!(resp.status(), 307, "blob {digest}: {:?}", resp.text().await);
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    let url = if location.starts_with('/') { format!("{base}{location}") } else { location };
    let resp = http.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200, "blob URL {url}");
    let body = resp.bytes().await.unwrap();
    assert_eq!(sha256(&body), digest, "blob bytes match their digest");
    body
}

/// Waits until `base` answers the blob with a redirect to the stored blob,
/// without reading it: a `200` (`serve` following the copy) is dropped and
/// asked again, as is a redirect back to the mirror. Panics with `log` on
/// any other answer, or after `within`.
pub async fn wait_stored(http: &reqwest::Client, base: &str, name: &str, digest: &str, within: Duration, log: impl Fn() -> String) {
    let started = std::time::Instant::now();
    loop {
        let resp = http.get(format!("{base}/v2/{name}/blobs/{digest}")).send().await.unwrap();
        match resp.status().as_u16() {
            200 => tokio::time::sleep(Duration::from_millis(200)).await,
            307 if !resp.headers()["location"].to_str().unwrap().contains("hubcap-wait") => return,
            307 => {}
            other => panic!("blob {digest}: {other}\n{}", log()),
        }
        assert!(started.elapsed() < within, "blob {digest} not stored within {within:?}:\n{}", log());
    }
}

/// Whether a blob answer is a refusal a client sees as one: a `503`, or
/// (`serve` following a copy that turned out bad) a `200` whose body is cut
/// before its end or does not hash to `digest`. Reads the body.
pub async fn blob_refused(resp: reqwest::Response, digest: &str) -> bool {
    match resp.status().as_u16() {
        503 => true,
        200 => resp.bytes().await.map_or(true, |b| sha256(&b) != digest),
        _ => false,
    }
}

/// Pulls like a container client: manifest by tag (all types accepted),
/// the amd64 image of an index, then config and layers, every byte checked.
pub async fn pull(http: &reqwest::Client, base: &str, name: &str, reference: &str) -> Pulled {
    let (media_type, digest, body) = get_manifest(http, base, name, reference, ALL_MANIFESTS).await;
    let mut v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let mut image_digest = digest.clone();
    if let Some(children) = v.get("manifests").and_then(|m| m.as_array()).cloned() {
        let child = children.iter().find(|c| c["platform"]["architecture"] == "amd64").unwrap_or(&children[0]);
        let d = child["digest"].as_str().unwrap();
        let (_, cd, cbody) = get_manifest(http, base, name, d, ALL_MANIFESTS).await;
        image_digest = cd;
        v = serde_json::from_slice(&cbody).unwrap();
    }
    let mut blobs = vec![v["config"]["digest"].as_str().unwrap().to_owned()];
    blobs.extend(v["layers"].as_array().unwrap().iter().map(|l| l["digest"].as_str().unwrap().to_owned()));
    for b in &blobs {
        get_blob(http, base, name, b).await;
    }
    Pulled { digest, media_type, image_digest, blobs }
}

/// The OCI error code of a response body.
pub async fn error_code(resp: reqwest::Response) -> String {
    let v: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap_or_default();
    v["errors"][0]["code"].as_str().unwrap_or("").to_owned()
}
