//! The `api` function: Lambda's HTTP events (Function URL, HTTP API, REST
//! API) through the registry router, one EMF record per request.
//!
//! What the front ends do to a function's answers is not the router's
//! business, so it is handled here (`FrontEndFit`), for the worst case
//! reported, since none of it can be checked from outside AWS:
//! - a `HEAD` answer's `Content-Length` is the front end's (the length of the
//!   body it carries: 0), not the function's: a `HEAD` of a manifest or blob
//!   carries no `Docker-Content-Digest` by default, so that the clients that
//!   trust a `HEAD`'s size (containerd) `GET` instead (`HeadAnswers`);
//! - the front end gives up after its own limit (API Gateway: 29 or 30 s) or
//!   at the invocation's deadline: every wait is cut to that less a margin
//!   (`mirror::deadline`), and a request still running then gets `503` with
//!   `Retry-After` instead of the front end's 502/504 and a lost instance.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::{Method, header};
use axum::response::IntoResponse;
use lambda_http::request::LambdaRequest;

use crate::assemble::{self, Assembled, Backend, BoxError, Fetching, Options};
use crate::config::{LambdaSettings, StorageKind};
use crate::http::ClientAddr;
use crate::http::access::AccessPolicy;
use crate::mirror::upstream::Upstreams;
use crate::mirror::{Mirror, MirrorConfig, deadline};
use crate::observe::emf::{UpstreamDeltas, emf_line};
use crate::observe::{CacheStatus, STATS_FLUSH_EVERY};
use crate::oci::{ErrorCode, RegistryError};
use crate::storage::aws::AwsStorage;

/// The `api` function's router: the mirror on S3 + DynamoDB, whose blob
/// misses are fetched by the `fetcher` function.
///
/// With `HUBCAP_STORAGE=local` it runs on the embedded backend instead, with
/// an in-process fetcher: `cargo lambda watch` with no AWS at all.
pub async fn api_router(settings: &LambdaSettings) -> Result<(Router, Arc<Mirror>), BoxError> {
    let fetching = if settings.storage == StorageKind::Local { Fetching::Owner } else { Fetching::ByStream };
    let mut opts = settings.options()?;
    opts.access = settings.access.resolve().await?;
    let Assembled { mirror, router } = assemble::mirror(&opts, fetching).await?;
    Ok((with_metrics(settings.front_end().fit(router), mirror.clone()), mirror))
}

/// The `api` function on S3 + DynamoDB with upstreams already built (tests).
pub async fn api_router_with(
    storage: &AwsStorage,
    upstreams: Upstreams,
    cfg: MirrorConfig,
    memory_cache_entries: usize,
    access: AccessPolicy,
    front_end: FrontEndFit,
) -> Result<(Router, Arc<Mirror>), BoxError> {
    let opts = Options {
        backend: Backend::Aws(Box::new(storage.clone())),
        upstreams: Vec::new(),
        credentials: None,
        credentials_secret: None,
        mirror: cfg,
        fetch_concurrency: 1,
        access,
        memory_cache_entries,
        upstream_limits: Default::default(),
    };
    let Assembled { mirror, router } = assemble::mirror_with(&opts, upstreams, Fetching::ByStream).await?;
    Ok((with_metrics(front_end.fit(router), mirror.clone()), mirror))
}

/// What a `HEAD` of a manifest or a blob carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum HeadAnswers {
    /// No `Docker-Content-Digest`. containerd resolves a tag or digest with a
    /// `HEAD` and, when the answer has a digest, trusts its `Content-Length`:
    /// behind a front end that writes 0 there, every pull fails ("reports
    /// content size of zero") and Docker falls back to Docker Hub. Without a
    /// digest containerd (and Docker's resolver) `GET`s the manifest instead:
    /// one more request per pull, a right size always.
    #[default]
    WithoutDigest,
    /// Size and digest, as `hubcap serve` answers: only behind a front end
    /// `hubcap check` found to keep a `HEAD`'s `Content-Length`.
    Full,
}

/// How the api fits the front end in front of it.
#[derive(Clone, Copy, Debug, Default)]
pub struct FrontEndFit {
    pub head: HeadAnswers,
    /// The longest the front end waits for an answer (API Gateway: 29 s for
    /// a REST API, 30 s for an HTTP API); `None`: the invocation's deadline
    /// (a Function URL waits as long as the function runs).
    pub timeout: Option<Duration>,
}

/// Kept free before the front end's or the invocation's end, for the answer
/// to reach the client (and a cold start's initialisation, which counts
/// against API Gateway's limit but not against the handler's clock).
pub const DEADLINE_MARGIN: Duration = Duration::from_secs(2);

impl FrontEndFit {
    /// `router` answering as this front end needs.
    pub fn fit(self, router: Router) -> Router {
        router.layer(axum::middleware::from_fn_with_state(self, fit_answer))
    }
}

/// Manifest and blob routes (`/v2/<name>/manifests/<ref>`, `.../blobs/<digest>`).
fn is_content_route(path: &str) -> bool {
    path.starts_with("/v2/") && (path.contains("/manifests/") || path.contains("/blobs/"))
}

async fn fit_answer(
    axum::extract::State(fit): axum::extract::State<FrontEndFit>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let arrived = Instant::now();
    let head = req.method() == Method::HEAD && is_content_route(req.uri().path());
    let invocation = req.extensions().get::<lambda_http::Context>().and_then(|c| super::instant_of(c.deadline));
    let end = [invocation, fit.timeout.map(|t| arrived + t)].into_iter().flatten().min();
    let mut resp = match end {
        None => next.run(req).await,
        Some(end) => {
            // Waits end a margin before the front end gives up; the whole
            // request, half a margin before (what no wait covers).
            let waits_end = end.checked_sub(DEADLINE_MARGIN).unwrap_or(arrived).max(arrived);
            let hard = end.checked_sub(DEADLINE_MARGIN / 2).unwrap_or(arrived).max(arrived);
            match tokio::time::timeout_at(hard.into(), deadline::within(waits_end, next.run(req))).await {
                Ok(resp) => resp,
                Err(_) => {
                    tracing::warn!(after_ms = arrived.elapsed().as_millis() as u64, "no answer before the front end's deadline; 503");
                    RegistryError::new(ErrorCode::Unavailable, "the mirror could not answer in time; try again")
                        .with_retry_after(Some(5))
                        .into_response()
                }
            }
        }
    };
    // A client told "unavailable" on Lambda is told when to come back.
    if resp.status().is_server_error() && !resp.headers().contains_key(header::RETRY_AFTER) {
        resp.headers_mut().insert(header::RETRY_AFTER, axum::http::HeaderValue::from_static("5"));
    }
    if head && fit.head == HeadAnswers::WithoutDigest {
        resp.headers_mut().remove("docker-content-digest");
        resp.headers_mut().remove(header::ETAG);
    }
    resp
}

/// Adds one EMF record per request to a router: requests, cache results,
/// 5xx answers, and what upstream was asked meanwhile.
pub fn with_metrics(router: Router, mirror: Arc<Mirror>) -> Router {
    let state = Arc::new((mirror, UpstreamDeltas::default()));
    router.layer(axum::middleware::from_fn_with_state(state, emit_request_metrics))
}

async fn emit_request_metrics(
    axum::extract::State(state): axum::extract::State<Arc<(Arc<Mirror>, UpstreamDeltas)>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    let cache = resp.extensions().get::<CacheStatus>().copied();
    let flag = |c: CacheStatus| if cache == Some(c) { 1.0 } else { 0.0 };
    let mut metrics = vec![
        ("Requests", 1.0, "Count"),
        ("Hit", flag(CacheStatus::Hit), "Count"),
        ("Miss", flag(CacheStatus::Miss), "Count"),
        ("Stale", flag(CacheStatus::Stale), "Count"),
        ("Revalidated", flag(CacheStatus::Revalidated), "Count"),
        ("Http5xx", if resp.status().is_server_error() { 1.0 } else { 0.0 }, "Count"),
        ("Latency", started.elapsed().as_secs_f64() * 1000.0, "Milliseconds"),
    ];
    metrics.extend(state.1.take(&state.0.upstreams().each()));
    println!("{}", emf_line("api", &metrics));
    // A warm instance adds its counts to the stored statistics about once a minute.
    state.0.flush_stats_every(STATS_FLUSH_EVERY).await;
    resp
}

/// Keeps every value of a header a client sent several times. A REST API
/// (payload 1.0) delivers the last value in `headers` and all of them in
/// `multiValueHeaders`, and lambda_http lays `headers` over
/// `multiValueHeaders`: of Docker's `Accept` headers (one per media type)
/// only the last would reach the router, and an OCI index would never be
/// negotiated. Dropping from `headers` what `multiValueHeaders` carries
/// leaves the complete set. Function URLs and HTTP APIs (payload 2.0) join
/// repeated headers with commas and need nothing.
pub fn keep_repeated_headers(mut event: LambdaRequest) -> LambdaRequest {
    if let LambdaRequest::ApiGatewayV1(ag) = &mut event {
        let repeated: Vec<_> = ag.multi_value_headers.keys().cloned().collect();
        for name in repeated {
            ag.headers.remove(&name);
        }
    }
    event
}

/// A Lambda HTTP event as the router sees it: every header value kept
/// (`keep_repeated_headers`), the stage prefix and source IP handled
/// (`prepare_request`). What the `api` binary does to each event.
pub fn request_from_event(event: LambdaRequest) -> lambda_http::Request {
    prepare_request(keep_repeated_headers(event).into())
}

/// Runs the `api` function: Lambda's HTTP events through `router`.
pub async fn run_api(router: Router) -> Result<(), lambda_http::Error> {
    let service = tower::ServiceBuilder::new().map_request(prepare_request).service(router);
    // lambda_http's own adapter (events in, its response type out), with
    // the events' repeated headers kept first.
    let adapter = lambda_http::Adapter::from(service);
    let handler = tower::ServiceBuilder::new()
        .map_request(|e: lambda_http::LambdaEvent<LambdaRequest>| lambda_http::LambdaEvent {
            payload: keep_repeated_headers(e.payload),
            context: e.context,
        })
        .service(adapter);
    lambda_http::lambda_runtime::run(handler).await
}

/// Fits a Lambda HTTP request to the router: removes an API Gateway stage
/// prefix (`/prod/v2/...` -> `/v2/...`) and records the client's source IP.
pub fn prepare_request(mut req: lambda_http::Request) -> lambda_http::Request {
    use lambda_http::request::RequestContext;
    let (stage, ip) = match req.extensions().get::<RequestContext>() {
        Some(RequestContext::ApiGatewayV1(c)) => (c.stage.clone(), c.identity.source_ip.clone()),
        Some(RequestContext::ApiGatewayV2(c)) => (c.stage.clone(), c.http.source_ip.clone()),
        _ => (None, None),
    };
    // An empty stage too: lambda_http adds `/` + stage (`//v2/...`).
    if let Some(stage) = stage.filter(|s| s != "$default") {
        let prefix = format!("/{stage}");
        let path = req.uri().path();
        if let Some(rest) = path.strip_prefix(&prefix).filter(|r| r.starts_with('/')) {
            let pq = match req.uri().query() {
                Some(q) => format!("{rest}?{q}"),
                None => rest.to_owned(),
            };
            let mut parts = req.uri().clone().into_parts();
            if let Ok(pq) = pq.parse() {
                parts.path_and_query = Some(pq);
                if let Ok(uri) = axum::http::Uri::from_parts(parts) {
                    *req.uri_mut() = uri;
                }
            }
        }
    }
    if let Some(ip) = ip.and_then(|ip| ip.parse().ok()) {
        req.extensions_mut().insert(ClientAddr(ip));
    }
    req
}
