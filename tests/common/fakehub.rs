//! A fake Docker Hub on loopback: token auth with 401 challenges (or, in
//! Basic mode, 401s that ask for the credentials themselves), tokens with a
//! lifetime when told, `ratelimit-*` headers, blob GETs answered with a 307
//! to a separate CDN-like listener, per-request counters, fault switches,
//! and a switch that holds CDN answers until the test lets them go.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use bytes::Bytes;
use tokio::sync::oneshot;

use super::images::{Image, Published};

#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    None,
    /// Every registry request answers 429 with `Retry-After`.
    RateLimit,
    /// Every registry request answers 500.
    ServerError,
    /// Every registry request waits this long first.
    Slow(Duration),
    /// CDN blob bodies stop half-way (the connection drops).
    Truncate,
    /// CDN blob bodies have one byte flipped (same length).
    WrongBytes,
    /// Blob HEADs say nothing of the size (no Content-Length).
    NoBlobLength,
    /// Tag lists are 2 MiB, streamed with no Content-Length, whatever `n`.
    HugeTagList,
    /// CDN blob bodies send half, pause this long, then the rest.
    DripBody(Duration),
    /// Manifest and CDN blob bodies (whole or ranged) of at least `min_len`
    /// bytes come one byte every `every` (smaller ones as usual).
    Trickle {
        every: Duration,
        min_len: usize,
    },
    /// Manifest GETs, HEADs and tag lists answer 302 to this base URL (the
    /// same path); blob GETs go there instead of to the CDN.
    RedirectTo(String),
    /// Only blob GETs go to this base URL instead of the CDN.
    RedirectBlobsTo(String),
    /// Blob HEADs and CDN bodies say nothing of the size, and CDN bodies
    /// never end.
    Endless,
    /// The CDN ignores `Range` (answers 200 with the whole blob).
    IgnoreRange,
    /// The CDN answers any `Range` with the bytes (and `Content-Range`) of
    /// a range of the same length at offset 0.
    WrongRange,
    /// One byte of every ranged answer is flipped.
    CorruptRange,
    /// A ranged answer from byte 0 sends its headers, then waits this long
    /// before its body (the later parts come at once).
    SlowFirstRange(Duration),
    /// A range stops half-way (the connection drops) the first time it is
    /// asked: the part must be asked again.
    CutRanges,
    /// Manifests come with a `Docker-Content-Digest` that is not theirs.
    LyingDigest,
    /// Manifest bodies are changed on the way (a byte added), the digest
    /// header still the original's.
    ChangedManifest,
    /// The next `times` registry requests answer 429 with this
    /// `Retry-After` (seconds); then as usual.
    RateLimitFor {
        times: usize,
        retry_after: u64,
    },
    /// CDN answers for a whole blob declare a `Content-Length` one byte
    /// short of the blob (and send that many bytes).
    ShortLength,
    /// CDN answers for a whole blob declare no `Content-Length` (chunked)
    /// and send 1 KiB more than the blob: its bytes, then zeros.
    ExtraBytes,
}

/// A `Range: bytes=a-b` the CDN answers (a single closed range).
fn requested_range(headers: &HeaderMap, len: u64) -> Option<(u64, u64)> {
    let spec = headers.get(header::RANGE)?.to_str().ok()?.strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    let (a, b): (u64, u64) = (a.parse().ok()?, b.parse().ok()?);
    (a <= b && b < len).then_some((a, b))
}

/// A body that sends `bytes` one byte every `every`.
fn trickle(bytes: Bytes, every: Duration) -> Body {
    let stream = futures_util::stream::unfold(0usize, move |i| {
        let bytes = bytes.clone();
        async move {
            if i >= bytes.len() {
                return None;
            }
            tokio::time::sleep(every).await;
            Some((Ok::<Bytes, std::io::Error>(bytes.slice(i..i + 1)), i + 1))
        }
    });
    Body::from_stream(stream)
}

#[derive(Default, Debug)]
pub struct Counters {
    pub manifest_get: AtomicUsize,
    /// Registry requests that passed authentication, however answered
    /// (faults included).
    pub registry: AtomicUsize,
    pub manifest_head: AtomicUsize,
    pub blob_get: AtomicUsize,
    pub blob_head: AtomicUsize,
    pub cdn_get: AtomicUsize,
    pub token: AtomicUsize,
    pub tags_list: AtomicUsize,
    /// Requests that reached the CDN carrying an Authorization header.
    pub cdn_saw_authorization: AtomicUsize,
    /// 429s sent by `Fault::RateLimitFor`.
    pub rate_limited: AtomicUsize,
    /// Bytes of never-ending CDN bodies sent (`Fault::Endless`).
    pub cdn_bytes: AtomicUsize,
    /// CDN GETs that asked for a `Range`, and the bytes every CDN answer
    /// carried (whole or part).
    pub cdn_ranged: AtomicUsize,
    pub cdn_body_bytes: AtomicU64,
    /// Ranged answers cut so far (`Fault::CutRanges`).
    pub cuts: AtomicUsize,
    /// Registry requests refused because their token had expired or was
    /// revoked (`FakeHub::set_token_ttl`, `FakeHub::revoke_tokens`).
    pub stale_token: AtomicUsize,
}

impl Counters {
    pub fn get(&self, c: &AtomicUsize) -> usize {
        c.load(Ordering::SeqCst)
    }
}

/// reference (tag or digest) -> (media type, bytes), for one repository.
type Refs = BTreeMap<String, (String, Bytes)>;

pub struct HubState {
    cdn_url: Mutex<String>,
    pub realm: Mutex<String>,
    /// (digest, offset) of ranges already cut (`Fault::CutRanges`).
    cut_ranges: Mutex<HashSet<(String, u64)>>,
    /// repo -> reference (tag or digest) -> (media type, bytes)
    manifests: Mutex<HashMap<String, Refs>>,
    blobs: Mutex<HashMap<String, Bytes>>,
    /// Blobs generated on the fly: digest -> (size, seed) of `images::noise`.
    synthetic: Mutex<HashMap<String, (u64, u64)>>,
    repo_blobs: Mutex<HashMap<String, HashSet<String>>>,
    pub counters: Counters,
    pub cdn_per_blob: Mutex<HashMap<String, usize>>,
    /// Those of `cdn_per_blob` asked by a mirror (`User-Agent: hubcap/...`),
    /// not by a client it sent there.
    pub mirror_cdn_per_blob: Mutex<HashMap<String, usize>>,
    pub fault: Mutex<Fault>,
    credentials: Option<(String, String)>,
    /// Basic mode: registry requests carry `credentials` themselves; no token.
    basic: bool,
    /// Issued tokens and when they expire (`storage::clock` seconds; `None`:
    /// never).
    tokens: Mutex<HashMap<String, Option<i64>>>,
    /// `expires_in` of new tokens, enforced (`None`: 300 s said, never enforced).
    token_ttl: Mutex<Option<u64>>,
    /// How long the token endpoint takes to answer.
    token_delay: Mutex<Duration>,
    ratelimit_remaining: AtomicI64,
    /// While true, CDN blob GETs are counted, then wait (`hold_cdn`).
    cdn_held: tokio::sync::watch::Sender<bool>,
    /// `GET /v2/` answers 401 with the token challenge, as Docker Hub's
    /// does (clients that learn the challenge there: registry:2's proxy).
    challenge_base: std::sync::atomic::AtomicBool,
}

pub struct FakeHub {
    pub url: String,
    pub addr: SocketAddr,
    /// The CDN's `host:port`: a loopback address the mirror follows blob
    /// redirects to only when told (`--redirect-allow`, `cdns()`).
    pub cdn: String,
    pub state: Arc<HubState>,
    stop: Vec<oneshot::Sender<()>>,
}

/// The CDN of every fake hub started in this process.
static CDNS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// What `--redirect-allow` must say for the mirror to follow the fake hubs'
/// blob redirects (in-process mirrors get it from `common::options`).
pub fn cdns() -> Vec<String> {
    CDNS.lock().unwrap().clone()
}

impl FakeHub {
    /// Anonymous token auth, like Docker Hub for public images.
    pub async fn start() -> FakeHub {
        FakeHub::start_with(None).await
    }

    /// Token auth that needs these basic credentials at the token endpoint.
    pub async fn start_with(credentials: Option<(&str, &str)>) -> FakeHub {
        FakeHub::start_mode(credentials, false).await
    }

    /// Basic auth, like some private registries: every registry request
    /// without these credentials is answered `401` with
    /// `WWW-Authenticate: Basic realm="fakehub"`; there is no token.
    pub async fn start_basic(user: &str, password: &str) -> FakeHub {
        FakeHub::start_mode(Some((user, password)), true).await
    }

    async fn start_mode(credentials: Option<(&str, &str)>, basic: bool) -> FakeHub {
        let state = Arc::new(HubState {
            cdn_url: Mutex::default(),
            realm: Mutex::default(),
            cut_ranges: Mutex::default(),
            manifests: Mutex::default(),
            blobs: Mutex::default(),
            synthetic: Mutex::default(),
            repo_blobs: Mutex::default(),
            counters: Counters::default(),
            cdn_per_blob: Mutex::default(),
            mirror_cdn_per_blob: Mutex::default(),
            fault: Mutex::new(Fault::None),
            credentials: credentials.map(|(u, p)| (u.to_owned(), p.to_owned())),
            basic,
            tokens: Mutex::default(),
            token_ttl: Mutex::default(),
            token_delay: Mutex::default(),
            ratelimit_remaining: AtomicI64::new(100),
            cdn_held: tokio::sync::watch::Sender::new(false),
            challenge_base: Default::default(),
        });
        let registry = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let cdn = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = registry.local_addr().unwrap();
        let url = format!("http://{addr}");
        let cdn_addr = cdn.local_addr().unwrap().to_string();
        *state.cdn_url.lock().unwrap() = format!("http://{cdn_addr}");
        CDNS.lock().unwrap().push(cdn_addr.clone());
        *state.realm.lock().unwrap() = format!("{url}/token");
        let registry_app = Router::new()
            .route("/token", get(token))
            .route("/v2/", get(base))
            .route("/v2/{*rest}", any(registry_route))
            .with_state(state.clone());
        let cdn_app = Router::new().route("/blobs/{digest}", get(cdn_blob)).with_state(state.clone());
        let mut stop = Vec::new();
        for (listener, app) in [(registry, registry_app), (cdn, cdn_app)] {
            let (tx, rx) = oneshot::channel::<()>();
            stop.push(tx);
            tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = rx.await;
                    })
                    .await
                    .unwrap();
            });
        }
        FakeHub { url, addr, cdn: cdn_addr, state, stop }
    }

    /// Stops listening and closes idle connections: upstream is down.
    pub async fn stop(&mut self) {
        for tx in self.stop.drain(..) {
            let _ = tx.send(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    /// New tokens say `expires_in: ttl` and are refused once it is over,
    /// on this process's `storage::clock` (tests `advance` it).
    pub fn set_token_ttl(&self, ttl: Duration) {
        *self.state.token_ttl.lock().unwrap() = Some(ttl.as_secs());
    }

    /// The token endpoint answers only after `delay` from now on.
    pub fn set_token_delay(&self, delay: Duration) {
        *self.state.token_delay.lock().unwrap() = delay;
    }

    /// Every token issued so far is refused from now on, whatever it said.
    pub fn revoke_tokens(&self) {
        for expires in self.state.tokens.lock().unwrap().values_mut() {
            *expires = Some(i64::MIN);
        }
    }

    /// `GET /v2/` answers 401 with the token challenge from now on, as
    /// Docker Hub's does.
    pub fn challenge_on_base(&self) {
        self.state.challenge_base.store(true, Ordering::SeqCst);
    }

    pub fn set_fault(&self, fault: Fault) {
        *self.state.fault.lock().unwrap() = fault;
    }

    /// CDN blob GETs from now on are counted, then answered only once
    /// `release_cdn` is called: a copy that is in flight for as long as the
    /// test needs, whatever the machine's load.
    pub fn hold_cdn(&self) {
        self.state.cdn_held.send_replace(true);
    }

    /// Lets held and later CDN blob GETs be answered.
    pub fn release_cdn(&self) {
        self.state.cdn_held.send_replace(false);
    }

    pub fn counters(&self) -> &Counters {
        &self.state.counters
    }

    pub fn count(&self, pick: impl Fn(&Counters) -> &AtomicUsize) -> usize {
        pick(&self.state.counters).load(Ordering::SeqCst)
    }

    pub fn cdn_gets(&self, digest: &str) -> usize {
        self.state.cdn_per_blob.lock().unwrap().get(digest).copied().unwrap_or(0)
    }

    /// `cdn_gets` made by a mirror, not by clients sent to the CDN.
    pub fn mirror_cdn_gets(&self, digest: &str) -> usize {
        self.state.mirror_cdn_per_blob.lock().unwrap().get(digest).copied().unwrap_or(0)
    }

    /// Publishes an image or index (and its children) under `repo:tag`.
    pub fn publish(&self, repo: &str, tag: &str, published: &Published) {
        for image in published.images() {
            self.put_image(repo, image);
        }
        let (mt, body) = published.top();
        let digest = published.digest();
        let mut m = self.state.manifests.lock().unwrap();
        let entry = m.entry(repo.to_owned()).or_default();
        entry.insert(tag.to_owned(), (mt.clone(), body.clone()));
        entry.insert(digest, (mt, body));
    }

    fn put_image(&self, repo: &str, image: &Image) {
        let mut blobs = self.state.blobs.lock().unwrap();
        let mut repo_blobs = self.state.repo_blobs.lock().unwrap();
        let set = repo_blobs.entry(repo.to_owned()).or_default();
        for (digest, bytes) in image.blobs() {
            blobs.insert(digest.clone(), bytes.clone());
            set.insert(digest);
        }
        self.state
            .manifests
            .lock()
            .unwrap()
            .entry(repo.to_owned())
            .or_default()
            .insert(image.digest.clone(), (image.media_type.clone(), image.manifest.clone()));
    }

    /// Puts a lone blob into a repository.
    pub fn put_blob(&self, repo: &str, bytes: &[u8]) -> String {
        let digest = super::images::sha256(bytes);
        self.state.blobs.lock().unwrap().insert(digest.clone(), Bytes::copy_from_slice(bytes));
        self.state.repo_blobs.lock().unwrap().entry(repo.to_owned()).or_default().insert(digest.clone());
        digest
    }

    /// Serves `served` as the blob whose digest is that of `claimed` (a
    /// hostile or broken upstream: same length, other bytes).
    pub fn put_lying_blob(&self, repo: &str, claimed: &[u8], served: &[u8]) -> String {
        let digest = super::images::sha256(claimed);
        self.state.blobs.lock().unwrap().insert(digest.clone(), Bytes::copy_from_slice(served));
        self.state.repo_blobs.lock().unwrap().entry(repo.to_owned()).or_default().insert(digest.clone());
        digest
    }

    /// Puts a blob of `size` noise bytes into a repository, generated on
    /// each request instead of held in memory.
    pub fn put_synthetic_blob(&self, repo: &str, size: u64, seed: u64) -> String {
        let digest = super::images::noise_digest(size, seed);
        self.state.synthetic.lock().unwrap().insert(digest.clone(), (size, seed));
        self.state.repo_blobs.lock().unwrap().entry(repo.to_owned()).or_default().insert(digest.clone());
        digest
    }

    /// Removes a tag upstream.
    pub fn untag(&self, repo: &str, tag: &str) {
        if let Some(m) = self.state.manifests.lock().unwrap().get_mut(repo) {
            m.remove(tag);
        }
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        for tx in self.stop.drain(..) {
            let _ = tx.send(());
        }
    }
}

async fn base(State(s): State<Arc<HubState>>) -> Response {
    if s.challenge_base.load(Ordering::SeqCst) {
        let realm = s.realm.lock().unwrap().clone();
        let mut resp = oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
        let challenge = format!(r#"Bearer realm="{realm}",service="fakehub""#);
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_str(&challenge).unwrap());
        return resp;
    }
    "{}".into_response()
}

async fn token(State(s): State<Arc<HubState>>, headers: HeaderMap, req: Request) -> Response {
    s.counters.token.fetch_add(1, Ordering::SeqCst);
    let delay = *s.token_delay.lock().unwrap();
    tokio::time::sleep(delay).await;
    if let Some(credentials) = &s.credentials {
        let want = basic_header(credentials);
        if headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) != Some(want.as_str()) {
            return (StatusCode::UNAUTHORIZED, "bad credentials").into_response();
        }
    }
    let q = req.uri().query().unwrap_or("");
    assert!(q.contains("scope=repository"), "token request without scope: {q}");
    let t = format!("tok-{}", s.counters.token.load(Ordering::SeqCst));
    let ttl = *s.token_ttl.lock().unwrap();
    s.tokens.lock().unwrap().insert(t.clone(), ttl.map(|ttl| hubcap::storage::clock::now() + ttl as i64));
    axum::Json(serde_json::json!({ "token": t, "expires_in": ttl.unwrap_or(300) })).into_response()
}

/// `Authorization: Basic` of these credentials.
fn basic_header((user, pass): &(String, String)) -> String {
    use base64::Engine as _;
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}")))
}

fn oci_error(status: StatusCode, code: &str) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], format!(r#"{{"errors":[{{"code":"{code}","message":"fake"}}]}}"#))
        .into_response()
}

fn ratelimit(s: &HubState, resp: &mut Response, spend: bool) {
    let left = if spend { s.ratelimit_remaining.fetch_sub(1, Ordering::SeqCst) - 1 } else { s.ratelimit_remaining.load(Ordering::SeqCst) };
    resp.headers_mut().insert("ratelimit-limit", HeaderValue::from_static("100;w=21600"));
    resp.headers_mut().insert("ratelimit-remaining", HeaderValue::from_str(&format!("{left};w=21600")).unwrap());
}

async fn registry_route(State(s): State<Arc<HubState>>, req: Request) -> Response {
    let path = req.uri().path().trim_start_matches("/v2/").to_owned();
    let method = req.method().clone();
    // Token auth: every request needs a bearer token issued by /token and
    // not expired; in Basic mode, the credentials themselves.
    let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("");
    let authorized = if s.basic {
        s.credentials.as_ref().is_some_and(|c| given == basic_header(c))
    } else {
        match given.strip_prefix("Bearer ").and_then(|t| s.tokens.lock().unwrap().get(t).copied()) {
            None => false,
            Some(None) => true,
            Some(Some(expires)) if hubcap::storage::clock::now() < expires => true,
            Some(Some(_)) => {
                s.counters.stale_token.fetch_add(1, Ordering::SeqCst);
                false
            }
        }
    };
    let name = path
        .rsplit_once("/manifests/")
        .or_else(|| path.rsplit_once("/blobs/"))
        .map(|(n, _)| n)
        .or_else(|| path.strip_suffix("/tags/list"))
        .unwrap_or("")
        .to_owned();
    if !authorized {
        let realm = s.realm.lock().unwrap().clone();
        let mut resp = oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED");
        let challenge = if s.basic {
            r#"Basic realm="fakehub""#.to_owned()
        } else {
            format!(r#"Bearer realm="{realm}",service="fakehub",scope="repository:{name}:pull""#)
        };
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_str(&challenge).unwrap());
        return resp;
    }
    s.counters.registry.fetch_add(1, Ordering::SeqCst);
    let fault = s.fault.lock().unwrap().clone();
    match fault {
        Fault::RateLimit => {
            let mut r = oci_error(StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS");
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("3600"));
            ratelimit(&s, &mut r, false);
            return r;
        }
        Fault::ServerError => return oci_error(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN"),
        Fault::RateLimitFor { times, retry_after } if times > 0 => {
            *s.fault.lock().unwrap() = Fault::RateLimitFor { times: times - 1, retry_after };
            s.counters.rate_limited.fetch_add(1, Ordering::SeqCst);
            let mut r = oci_error(StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS");
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
            return r;
        }
        Fault::Slow(d) => tokio::time::sleep(d).await,
        Fault::RedirectTo(base) if !(method == Method::GET && path.contains("/blobs/")) => {
            let target = format!("{base}{}", req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"));
            return (StatusCode::FOUND, [(header::LOCATION, target)]).into_response();
        }
        _ => {}
    }
    if let Some((name, reference)) = path.rsplit_once("/manifests/") {
        let accept: Vec<String> = req
            .headers()
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(',').map(|x| x.split(';').next().unwrap().trim().to_owned()))
            .collect();
        let found = {
            let m = s.manifests.lock().unwrap();
            m.get(name).and_then(|r| r.get(reference).cloned()).map(|(mt, body)| {
                // Like Docker Hub: a client that takes no index gets the
                // first child manifest it does accept.
                if (mt.contains("index") || mt.contains("list")) && !accept.contains(&mt) && !reference.starts_with("sha256:") {
                    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                    for child in v["manifests"].as_array().unwrap() {
                        let d = child["digest"].as_str().unwrap();
                        if let Some((cmt, cbody)) = m[name].get(d)
                            && accept.iter().any(|a| a == cmt)
                        {
                            return (cmt.clone(), cbody.clone());
                        }
                    }
                }
                (mt, body)
            })
        };
        let Some((mt, body)) = found else { return oci_error(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN") };
        let head = method == Method::HEAD;
        if head {
            s.counters.manifest_head.fetch_add(1, Ordering::SeqCst);
        } else {
            s.counters.manifest_get.fetch_add(1, Ordering::SeqCst);
        }
        let digest = match fault {
            Fault::LyingDigest => super::images::sha256(b"something else"),
            _ => super::images::sha256(&body),
        };
        let body = match fault {
            Fault::ChangedManifest => Bytes::from([&body[..], b" "].concat()),
            _ => body,
        };
        let len = body.len();
        let body = match fault {
            _ if head => Body::empty(),
            Fault::Trickle { every, min_len } if len >= min_len => trickle(body, every),
            _ => Body::from(body),
        };
        let mut resp = Response::new(body);
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_str(&mt).unwrap());
        resp.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        resp.headers_mut().insert("docker-content-digest", HeaderValue::from_str(&digest).unwrap());
        ratelimit(&s, &mut resp, !head);
        return resp;
    }
    if let Some((name, digest)) = path.rsplit_once("/blobs/") {
        let known = s.repo_blobs.lock().unwrap().get(name).is_some_and(|set| set.contains(digest));
        let size =
            s.blobs.lock().unwrap().get(digest).map(|b| b.len() as u64).or_else(|| s.synthetic.lock().unwrap().get(digest).map(|x| x.0));
        let (true, Some(size)) = (known, size) else { return oci_error(StatusCode::NOT_FOUND, "BLOB_UNKNOWN") };
        if method == Method::HEAD {
            s.counters.blob_head.fetch_add(1, Ordering::SeqCst);
            if matches!(*s.fault.lock().unwrap(), Fault::NoBlobLength | Fault::Endless) {
                // A body of unknown length: hyper then sends no Content-Length.
                let empty = futures_util::stream::empty::<Result<Bytes, std::io::Error>>();
                let mut resp = Response::new(Body::from_stream(empty));
                resp.headers_mut().insert("docker-content-digest", HeaderValue::from_str(digest).unwrap());
                return resp;
            }
            let mut resp = Response::new(Body::empty());
            resp.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(size));
            resp.headers_mut().insert("docker-content-digest", HeaderValue::from_str(digest).unwrap());
            return resp;
        }
        s.counters.blob_get.fetch_add(1, Ordering::SeqCst);
        let cdn = match fault {
            Fault::RedirectTo(base) | Fault::RedirectBlobsTo(base) => base,
            _ => s.cdn_url.lock().unwrap().clone(),
        };
        return (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, format!("{cdn}/blobs/{digest}?sig=cdn"))]).into_response();
    }
    if let Some(name) = path.strip_suffix("/tags/list") {
        s.counters.tags_list.fetch_add(1, Ordering::SeqCst);
        if *s.fault.lock().unwrap() == Fault::HugeTagList {
            let tags: Vec<String> = (0..150_000).map(|i| format!("tag-{i:08}")).collect();
            let body = serde_json::json!({ "name": name, "tags": tags }).to_string().into_bytes();
            let chunks: Vec<Result<Bytes, std::io::Error>> = body.chunks(64 * 1024).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
            return Response::new(Body::from_stream(futures_util::stream::iter(chunks)));
        }
        let q: HashMap<String, String> = url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()).into_owned().collect();
        let m = s.manifests.lock().unwrap();
        let Some(refs) = m.get(name) else { return oci_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN") };
        let mut tags: Vec<&String> = refs.keys().filter(|r| !r.starts_with("sha256:")).collect();
        tags.sort();
        if let Some(last) = q.get("last") {
            tags.retain(|t| t.as_str() > last.as_str());
        }
        let n: usize = q.get("n").and_then(|n| n.parse().ok()).unwrap_or(usize::MAX);
        let more = tags.len() > n;
        tags.truncate(n);
        let body = serde_json::json!({ "name": name, "tags": tags }).to_string();
        let mut resp = ([(header::CONTENT_TYPE, "application/json")], body).into_response();
        if more {
            let last = tags.last().unwrap();
            resp.headers_mut()
                .insert(header::LINK, HeaderValue::from_str(&format!(r#"</v2/{name}/tags/list?last={last}&n={n}>; rel="next""#)).unwrap());
        }
        return resp;
    }
    oci_error(StatusCode::NOT_FOUND, "NOT_FOUND")
}

async fn cdn_blob(
    State(s): State<Arc<HubState>>,
    axum::extract::Path(digest): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    s.counters.cdn_get.fetch_add(1, Ordering::SeqCst);
    if headers.contains_key(header::AUTHORIZATION) {
        s.counters.cdn_saw_authorization.fetch_add(1, Ordering::SeqCst);
    }
    *s.cdn_per_blob.lock().unwrap().entry(digest.clone()).or_default() += 1;
    if headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok()).is_some_and(|ua| ua.starts_with("hubcap/")) {
        *s.mirror_cdn_per_blob.lock().unwrap().entry(digest.clone()).or_default() += 1;
    }
    let _ = s.cdn_held.subscribe().wait_for(|held| !*held).await;
    if *s.fault.lock().unwrap() == Fault::Endless {
        let chunk = Bytes::from(vec![0u8; 64 * 1024]);
        let sent = s.clone();
        let stream = futures_util::stream::repeat_with(move || {
            sent.counters.cdn_bytes.fetch_add(chunk.len(), Ordering::SeqCst);
            Ok::<Bytes, std::io::Error>(chunk.clone())
        });
        return Response::new(Body::from_stream(stream));
    }
    let fault = s.fault.lock().unwrap().clone();
    let synthetic = s.synthetic.lock().unwrap().get(&digest).copied();
    let stored = s.blobs.lock().unwrap().get(&digest).cloned();
    let total = match (synthetic, &stored) {
        (Some((size, _)), _) => size,
        (None, Some(b)) => b.len() as u64,
        (None, None) => return StatusCode::NOT_FOUND.into_response(),
    };
    let range = requested_range(&headers, total).filter(|_| fault != Fault::IgnoreRange);
    if range.is_some() {
        s.counters.cdn_ranged.fetch_add(1, Ordering::SeqCst);
    }
    let (from, to) = match (range, &fault) {
        (Some((a, b)), Fault::WrongRange) => (0, b - a),
        (Some(r), _) => r,
        (None, _) => (0, total - 1),
    };
    let len = to - from + 1;

    let cut = range.is_some() && fault == Fault::CutRanges && s.cut_ranges.lock().unwrap().insert((digest.clone(), from));
    if cut {
        s.counters.cuts.fetch_add(1, Ordering::SeqCst);
    }
    // A stored blob's answer is counted whole at once; a synthetic one as
    // its chunks are handed to the connection (a copy killed mid-way has
    // been sent what it read, not what its ranges asked for).
    if synthetic.is_none() {
        s.counters.cdn_body_bytes.fetch_add(if cut { len / 2 } else { len }, Ordering::SeqCst);
    }
    let body = match (synthetic, stored) {
        (Some((_, seed)), _) => {
            let mut noise = super::images::Noise::range(seed, from, if cut { len / 2 } else { len });
            let corrupt = range.is_some() && fault == Fault::CorruptRange;
            let mut first = true;
            let sent = s.clone();
            let stream = futures_util::stream::poll_fn(move |_| {
                let chunk = noise.next_chunk(1 << 20).inspect(|c| {
                    sent.counters.cdn_body_bytes.fetch_add(c.len() as u64, Ordering::SeqCst);
                });
                let chunk = chunk.map(|c| {
                    if corrupt && std::mem::take(&mut first) {
                        let mut v = c.to_vec();
                        v[0] ^= 0xff;
                        Bytes::from(v)
                    } else {
                        c
                    }
                });
                std::task::Poll::Ready(chunk.map(Ok::<_, std::io::Error>))
            });
            let tail = futures_util::stream::iter(cut.then(|| Err(std::io::Error::other("connection cut"))));
            let pause = match (&fault, range) {
                (Fault::SlowFirstRange(pause), Some((0, _))) => Some(*pause),
                _ => None,
            };
            let wait = futures_util::StreamExt::filter_map(
                futures_util::stream::once(async move {
                    if let Some(pause) = pause {
                        tokio::time::sleep(pause).await;
                    }
                }),
                |()| async { None::<Result<Bytes, std::io::Error>> },
            );
            Body::from_stream(futures_util::StreamExt::chain(futures_util::StreamExt::chain(wait, stream), tail))
        }
        (None, Some(bytes)) if range.is_some() => {
            let mut part = bytes.slice(from as usize..=to as usize).to_vec();
            if fault == Fault::CorruptRange {
                part[0] ^= 0xff;
            }
            if cut {
                part.truncate(part.len() / 2);
                Body::from_stream(futures_util::stream::iter(vec![
                    Ok::<Bytes, std::io::Error>(Bytes::from(part)),
                    Err(std::io::Error::other("connection cut")),
                ]))
            } else {
                match fault {
                    Fault::Trickle { every, min_len } if part.len() >= min_len => trickle(Bytes::from(part), every),
                    _ => Body::from(part),
                }
            }
        }
        (None, Some(bytes)) => return whole_blob(bytes, fault),
        (None, None) => unreachable!("answered 404 above"),
    };
    let mut resp = Response::new(body);
    resp.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if range.is_some() {
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
        resp.headers_mut().insert(header::CONTENT_RANGE, HeaderValue::from_str(&format!("bytes {from}-{to}/{total}")).unwrap());
    }
    resp
}

/// A stored blob's whole body, under the body faults.
fn whole_blob(bytes: Bytes, fault: Fault) -> Response {
    let len = bytes.len();
    let body = match fault {
        Fault::Truncate => {
            let half = bytes.slice(0..len / 2);
            Body::from_stream(futures_util::stream::iter(vec![
                Ok::<Bytes, std::io::Error>(half),
                Err(std::io::Error::other("connection cut")),
            ]))
        }
        Fault::DripBody(pause) => {
            let (first, rest) = (bytes.slice(0..len / 2), bytes.slice(len / 2..));
            let later = futures_util::stream::once(async move {
                tokio::time::sleep(pause).await;
                Ok::<Bytes, std::io::Error>(rest)
            });
            Body::from_stream(futures_util::StreamExt::chain(futures_util::stream::iter(vec![Ok::<Bytes, std::io::Error>(first)]), later))
        }
        Fault::Trickle { every, min_len } if len >= min_len => trickle(bytes, every),
        Fault::WrongBytes => {
            let mut v = bytes.to_vec();
            v[len / 2] ^= 0xff;
            Body::from(v)
        }
        Fault::ShortLength => {
            // A stream, so hyper sends the declared length, not the body's.
            let mut resp =
                Response::new(Body::from_stream(futures_util::stream::iter(vec![Ok::<Bytes, std::io::Error>(bytes.slice(0..len - 1))])));
            resp.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(len - 1));
            return resp;
        }
        Fault::ExtraBytes => {
            let chunks = vec![Ok::<Bytes, std::io::Error>(bytes), Ok(Bytes::from(vec![0u8; 1024]))];
            return Response::new(Body::from_stream(futures_util::stream::iter(chunks)));
        }
        _ => Body::from(bytes),
    };
    let mut resp = Response::new(body);
    resp.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    resp
}
