//! The registry's HTTP face: one axum `Router` built by `app(state)`.
//!
//! Routes (pull API of the OCI distribution spec):
//! - `GET /v2/` -> 200 `{}` with `Docker-Distribution-API-Version`.
//! - `GET|HEAD /v2/<name>/manifests/<tag|digest>` -> the manifest bytes.
//! - `GET /v2/<name>/blobs/<digest>` -> 307 to a short-lived URL;
//!   `HEAD` -> 200 with size and digest, never redirected.
//! - `GET /v2/<name>/tags/list?n=&last=` -> relayed from upstream.
//! - anything that writes (push, delete, uploads) -> 405 `UNSUPPORTED`.
//! - `GET|HEAD /_hubcap/blobs/sha256/<hex>?expires=&sig=` -> the blob bytes
//!   (only with the embedded backend, whose signed URLs point here).
//!
//! Names have any depth, so `/v2/{*rest}` is parsed from the right. This
//! module knows OCI, not storage: it calls the `Mirror` service.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use tower::ServiceExt;

use crate::access::AccessPolicy;
use crate::oci::{Accept, Digest, ErrorCode, Reference, RegistryError, RepoPath};
use crate::mirror::{BlobAnswer, Mirror};
use crate::observe::CacheStatus;
use crate::storage::local::{BLOB_URL_PREFIX, FsBlobStore};

const API_VERSION: &str = "Docker-Distribution-API-Version";
/// Query parameter counting self-redirects while a blob is still fetched.
const WAIT_PARAM: &str = "hubcap-wait";
/// Self-redirects before a still-pending blob gets a 503.
const MAX_WAIT_REDIRECTS: u32 = 5;

/// The client's address as the platform saw it (a Lambda's request context);
/// `hubcap serve` uses the TCP peer instead.
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub std::net::IpAddr);

#[derive(Clone)]
pub struct AppState {
    pub mirror: Arc<Mirror>,
    /// Who may use the mirror.
    pub access: Arc<AccessPolicy>,
    /// Set when blobs live on local disk and this server serves their URLs.
    pub local_blobs: Option<Arc<FsBlobStore>>,
}

pub fn app(state: AppState) -> Router {
    let mut router = Router::new()
        .route("/v2", get(api_base).head(api_base))
        .route("/v2/", get(api_base).head(api_base))
        .route("/v2/{*rest}", any(dispatch))
        .route("/_hubcap/stats", get(stats))
        .route("/metrics", get(prometheus));
    if state.local_blobs.is_some() {
        router = router.route(&format!("{BLOB_URL_PREFIX}{{hex}}"), get(local_blob).head(local_blob));
    }
    router
        .fallback(|| async { RegistryError::new(ErrorCode::Unsupported, "not a registry API route") })
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
        .layer(middleware::from_fn(access_log))
}

/// Why a 5xx happened, for the access log (never sent to the client).
#[derive(Clone)]
struct ErrorCause(String);

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, [(header::CONTENT_TYPE, "application/json")], self.body()).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if status.is_server_error() {
            resp.extensions_mut().insert(ErrorCause(self.to_string()));
        }
        resp
    }
}

/// One access-log line per request; 5xx causes logged here, once. Also
/// stamps the API version header and keeps `HEAD` responses bodiless.
async fn access_log(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    // The path only: signed URLs carry their signature in the query.
    let path = req.uri().path().to_owned();
    let ns = req.uri().query().and_then(|q| query_param(q, "ns"));
    let client = client_ip(&req).map_or_else(String::new, |ip| ip.to_string());
    let mut resp = next.run(req).await;
    resp.headers_mut().insert(API_VERSION, HeaderValue::from_static("registry/2.0"));
    if method == Method::HEAD && resp.status().is_client_error() | resp.status().is_server_error() {
        resp.headers_mut().remove(header::CONTENT_LENGTH);
        *resp.body_mut() = Body::empty();
    }
    let cache = resp.extensions().get::<CacheStatus>().map_or("-", |c| c.as_str());
    let status = resp.status().as_u16();
    let ms = (start.elapsed().as_secs_f64() * 10_000.0).round() / 10.0;
    match resp.extensions().get::<ErrorCause>() {
        Some(ErrorCause(cause)) => {
            tracing::error!(target: "hubcap::access", %method, path, ns, status, cache, ms, client, error = %cause, "request failed")
        }
        None => tracing::info!(target: "hubcap::access", %method, path, ns, status, cache, ms, client, "request"),
    }
    resp
}

/// The client's address: from the platform (Lambda) or the TCP peer.
fn client_ip(req: &Request) -> Option<std::net::IpAddr> {
    req.extensions()
        .get::<ClientAddr>()
        .map(|c| c.0)
        .or_else(|| req.extensions().get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.ip()))
}

/// Network and credential checks for every route. Signed blob URLs carry
/// their own authorization, so they need no client credentials.
async fn guard(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let checked = state.access.check_network(client_ip(&req)).and_then(|()| {
        if req.uri().path().starts_with(BLOB_URL_PREFIX) {
            return Ok(());
        }
        state.access.check_credentials(req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()))
    });
    match checked {
        Ok(()) => {
            let resp = next.run(req).await;
            if let Some(c) = resp.extensions().get::<CacheStatus>() {
                state.mirror.counters().record(*c);
            }
            resp
        }
        Err(e) => {
            let challenge = e.code == ErrorCode::Unauthorized;
            let mut resp = e.into_response();
            if challenge {
                resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"hubcap\""));
            }
            resp
        }
    }
}

/// `GET /_hubcap/stats`: what the cache holds and how it served (all
/// instances, all time: see `observe::Report`), plus this instance's counts
/// since start-up and what it knows of its upstreams (JSON).
async fn stats(State(state): State<AppState>) -> Response {
    let report = match state.mirror.report().await {
        Ok(r) => r,
        Err(e) => return RegistryError::from(e).into_response(),
    };
    let body = crate::observe::report::with_instance(&report, &state.mirror.counters().snapshot(), &state.mirror.upstreams().each());
    ([(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// `GET /metrics`: the same in the Prometheus text format.
async fn prometheus(State(state): State<AppState>) -> Response {
    use crate::observe::prometheus;
    let report = state.mirror.report().await.ok();
    let text = prometheus::render(&state.mirror.counters().snapshot(), &state.mirror.upstreams().each(), report.as_ref().map(|r| &r.cache));
    ([(header::CONTENT_TYPE, prometheus::CONTENT_TYPE)], text).into_response()
}

/// `GET /v2/`: the API version check every client starts with.
async fn api_base() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], "{}").into_response()
}

fn query_param(query: &str, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

enum Route<'a> {
    Manifest(&'a str),
    Blob(&'a str),
    Upload,
    Tags,
}

/// Splits `<name>/<endpoint>` from the right, so names may have any depth.
fn parse_route(rest: &str) -> Result<(&str, Route<'_>), RegistryError> {
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Ok((name, Route::Tags));
    }
    if let Some((name, reference)) = rest.rsplit_once("/manifests/") {
        return Ok((name, Route::Manifest(reference)));
    }
    if let Some((name, _)) = rest.split_once("/blobs/uploads") {
        return Ok((name, Route::Upload));
    }
    if let Some((name, digest)) = rest.rsplit_once("/blobs/") {
        return Ok((name, Route::Blob(digest)));
    }
    Err(RegistryError::new(ErrorCode::Unsupported, "a pull-through mirror serves only manifests, blobs and tag lists"))
}

/// Every `/v2/<name>/...` request.
async fn dispatch(State(state): State<AppState>, req: Request) -> Result<Response, RegistryError> {
    let method = req.method().clone();
    let path = req.uri().path();
    let query = req.uri().query().unwrap_or("");
    let rest = path.strip_prefix("/v2/").unwrap_or(path);
    let (name, route) = parse_route(rest)?;
    let read_only = method == Method::GET || method == Method::HEAD;
    if matches!(route, Route::Upload) || !read_only {
        return Err(RegistryError::new(
            ErrorCode::Unsupported,
            format!("{method} is not supported: this registry is a read-only pull-through mirror"),
        ));
    }
    let repo = RepoPath::resolve(name, query_param(query, "ns").as_deref())?;
    state.access.check_repo(&repo)?;
    let head = method == Method::HEAD;
    match route {
        Route::Manifest(reference) => manifest(&state, &repo, reference, req.headers(), head).await,
        Route::Blob(digest) => {
            let digest = Digest::parse(digest)?;
            if head { blob_head(&state, &repo, &digest).await } else { blob_get(&state, &repo, &digest, path, query).await }
        }
        Route::Tags => tags(&state, &repo, name, query, head).await,
        Route::Upload => unreachable!("refused above"),
    }
}

/// `GET|HEAD /v2/<name>/manifests/<reference>`: 200 with the exact bytes,
/// `Docker-Content-Digest`, `Content-Type`, `Content-Length`; 404
/// `MANIFEST_UNKNOWN` when neither cache nor upstream has it in a type the
/// client accepts.
async fn manifest(state: &AppState, repo: &RepoPath, reference: &str, headers: &HeaderMap, head: bool) -> Result<Response, RegistryError> {
    let reference = Reference::parse(reference)?;
    let accept = Accept::parse(headers.get_all(header::ACCEPT).iter().filter_map(|v| v.to_str().ok()));
    let (m, cache) = state.mirror.manifest(repo, &reference, &accept).await?;
    let len = m.body.len();
    let body = if head { Body::empty() } else { Body::from(m.body) };
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, header_value(&m.media_type));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert("docker-content-digest", header_value(m.digest.as_str()));
    h.insert(header::ETAG, header_value(&format!("\"{}\"", m.digest)));
    h.insert("x-cache", HeaderValue::from_static(cache.as_str()));
    resp.extensions_mut().insert(cache);
    Ok(resp)
}

/// `GET /v2/<name>/blobs/<digest>`: 307 to a short-lived URL of the stored
/// blob. While the blob is still being fetched after the bounded wait, a 307
/// back to this URL keeps the client waiting here instead of failing over.
async fn blob_get(state: &AppState, repo: &RepoPath, digest: &Digest, path: &str, query: &str) -> Result<Response, RegistryError> {
    let (answer, cache) = state.mirror.blob(repo, digest).await?;
    let location = match answer {
        BlobAnswer::Ready(url) => url,
        BlobAnswer::Pending => {
            let waited: u32 = query_param(query, WAIT_PARAM).and_then(|w| w.parse().ok()).unwrap_or(0);
            if waited >= MAX_WAIT_REDIRECTS {
                return Err(RegistryError::new(ErrorCode::Unavailable, format!("{digest} is still being fetched from upstream"))
                    .with_retry_after(Some(10)));
            }
            let mut q: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
                .filter(|(k, _)| k != WAIT_PARAM)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            q.push((WAIT_PARAM.to_owned(), (waited + 1).to_string()));
            let q = url::form_urlencoded::Serializer::new(String::new()).extend_pairs(q).finish();
            format!("{path}?{q}")
        }
    };
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::TEMPORARY_REDIRECT;
    let h = resp.headers_mut();
    h.insert(header::LOCATION, header_value(&location));
    h.insert("docker-content-digest", header_value(digest.as_str()));
    h.insert("x-cache", HeaderValue::from_static(cache.as_str()));
    resp.extensions_mut().insert(cache);
    Ok(resp)
}

/// `HEAD /v2/<name>/blobs/<digest>`: 200 with `Content-Length` and
/// `Docker-Content-Digest`; 404 `BLOB_UNKNOWN`.
async fn blob_head(state: &AppState, repo: &RepoPath, digest: &Digest) -> Result<Response, RegistryError> {
    let (size, cache) = state.mirror.blob_size(repo, digest).await?;
    let mut resp = Response::new(Body::empty());
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    h.insert("docker-content-digest", header_value(digest.as_str()));
    h.insert("x-cache", HeaderValue::from_static(cache.as_str()));
    resp.extensions_mut().insert(cache);
    Ok(resp)
}

/// `GET /v2/<name>/tags/list?n=&last=`: upstream's list, with a `Link` to
/// the next page that points back at this mirror.
async fn tags(state: &AppState, repo: &RepoPath, name: &str, query: &str, head: bool) -> Result<Response, RegistryError> {
    let n = match query_param(query, "n") {
        None => None,
        Some(n) => Some(n.parse::<u32>().map_err(|_| RegistryError::code(ErrorCode::PaginationNumberInvalid))?),
    };
    let last = query_param(query, "last");
    let page = state.mirror.tags(repo, n, last.as_deref()).await?;
    let len = page.body.len();
    let mut resp = Response::new(if head { Body::empty() } else { Body::from(page.body) });
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Some(next) = page.next_last {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        if let Some(n) = n {
            q.append_pair("n", &n.to_string());
        }
        q.append_pair("last", &next);
        if let Some(ns) = query_param(query, "ns") {
            q.append_pair("ns", &ns);
        }
        h.insert(header::LINK, header_value(&format!("</v2/{name}/tags/list?{}>; rel=\"next\"", q.finish())));
    }
    resp.extensions_mut().insert(CacheStatus::Pass);
    Ok(resp)
}

/// `GET|HEAD /_hubcap/blobs/sha256/<hex>?expires=&sig=`: the blob's bytes
/// (with `Range`) for a valid, unexpired signature; 403 `DENIED` otherwise.
async fn local_blob(State(state): State<AppState>, req: Request) -> Result<Response, RegistryError> {
    let store = state.local_blobs.as_ref().ok_or_else(|| RegistryError::code(ErrorCode::Unsupported))?;
    let hex = req.uri().path().strip_prefix(BLOB_URL_PREFIX).unwrap_or("");
    let digest = Digest::parse(&format!("sha256:{hex}"))?;
    let query = req.uri().query().unwrap_or("");
    let expires = query_param(query, "expires").and_then(|e| e.parse::<i64>().ok()).unwrap_or(0);
    let sig = query_param(query, "sig").unwrap_or_default();
    if !store.verify(&digest, expires, &sig) {
        return Err(RegistryError::new(ErrorCode::Denied, "blob URL signature invalid or expired"));
    }
    let served = tower_http::services::ServeFile::new(store.path(&digest))
        .oneshot(req)
        .await
        .map_err(|e| RegistryError::code(ErrorCode::Unknown).with_internal(e))?;
    if served.status() == StatusCode::NOT_FOUND {
        return Err(RegistryError::code(ErrorCode::BlobUnknown));
    }
    let mut resp = served.map(Body::new);
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    resp.headers_mut().insert("docker-content-digest", header_value(digest.as_str()));
    Ok(resp)
}

fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}
