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
//!
//! # Layout
//! - `registry`: the `/v2/<name>/...` handlers;
//! - `blobs`: the embedded backend's signed blob URLs;
//! - `access`: who may use the mirror (networks, repositories, credentials);
//! - here: the router, the access log, the guard, the error answer, and the
//!   thin `/_hubcap/stats` and `/metrics` handlers.

pub mod access;
mod blobs;
mod registry;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};

use self::access::AccessPolicy;
use self::blobs::local_blob;
pub use self::blobs::range_to_honour;
use self::registry::dispatch;
use crate::mirror::Mirror;
use crate::observe::CacheStatus;
use crate::oci::{ErrorCode, RegistryError};
use crate::storage::local::{BLOB_URL_PREFIX, FsBlobStore};

pub(crate) const API_VERSION: &str = "Docker-Distribution-API-Version";

/// Longest `Retry-After` a client is told, whatever upstream said (an
/// upstream's `999999999` is passed on as this).
pub const MAX_RETRY_AFTER: u64 = 300;
/// `Retry-After` of a `503` whose cause names no time (storage failing).
pub const DEFAULT_RETRY_AFTER: u64 = 2;

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
        // Every 503 says when to come back: what the cause knows, else soon
        // (storage that failed has been retried by its SDK already).
        let retry_after = self.retry_after.or((status == StatusCode::SERVICE_UNAVAILABLE).then_some(DEFAULT_RETRY_AFTER));
        if let Some(secs) = retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs.clamp(1, MAX_RETRY_AFTER)));
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
    let mut report = match state.mirror.report().await {
        Ok(r) => r,
        Err(e) => return RegistryError::from(e).into_response(),
    };
    // The lists name images: none of a repository this mirror refuses
    // (cached before a deny rule, or by `hubcap warm`).
    let visible = |image: &crate::lifecycle::ImageInfo| {
        let (key, _) = crate::oci::split_image(&image.image);
        crate::oci::RepoPath::from_key(key).is_some_and(|r| state.access.check_repo(&r).is_ok())
    };
    report.cache.oldest.retain(visible);
    report.cache.least_recently_pulled.retain(visible);
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

pub(super) fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

pub(super) fn query_param(query: &str, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}
