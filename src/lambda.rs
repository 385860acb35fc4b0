//! What the Lambda binaries run. The `api` function serves the same axum
//! router as `hubcap serve`, on the AWS backends, with the index as its
//! fetch queue; this module only adapts Lambda's request context to it (the
//! API Gateway stage prefix, the client's source IP). The `fetcher` function
//! turns DynamoDB Stream records of pending blobs into `Fetcher::fetch` calls
//! and reports partial batch failures. The `gc` function runs `maintenance`:
//! a lifecycle sweep, or the warm list.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lambda_events::event::dynamodb::{Event, EventRecord};
use aws_lambda_events::event::streams::{DynamoDbBatchItemFailure, DynamoDbEventResponse};
use axum::Router;
use lambda_http::request::LambdaRequest;
use futures_util::StreamExt;

use crate::http::access::AccessPolicy;
use crate::config::{LambdaSettings, StorageKind};
use crate::mirror::fetch::{FetchJob, Fetcher};
use crate::http::ClientAddr;
use crate::observe::emf::{UpstreamDeltas, emf_line};
use crate::oci::{Digest, RepoPath};
use crate::mirror::upstream::Upstreams;
use crate::mirror::{Mirror, MirrorConfig};
use crate::observe::{CacheStatus, STATS_FLUSH_EVERY};
use crate::assemble::{self, Assembled, Backend, BoxError, Fetching, Options};
use crate::storage::aws::AwsStorage;

/// JSON logs without colour, as CloudWatch wants them.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HUBCAP_LOG").unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).json().flatten_event(true).with_ansi(false).without_time().try_init();
}

/// The `api` function's router: the mirror on S3 + DynamoDB, whose blob
/// misses are fetched by the `fetcher` function.
///
/// With `HUBCAP_STORAGE=local` it runs on the embedded backend instead, with
/// an in-process fetcher: `cargo lambda watch` with no AWS at all.
pub async fn api_router(settings: &LambdaSettings) -> Result<(Router, Arc<Mirror>), BoxError> {
    let fetching = if settings.storage == StorageKind::Local { Fetching::InProcess } else { Fetching::ByStream };
    let Assembled { mirror, router } = assemble::mirror(&settings.options()?, fetching).await?;
    Ok((with_metrics(router, mirror.clone()), mirror))
}

/// The `api` function on S3 + DynamoDB with upstreams already built (tests).
pub async fn api_router_with(
    storage: &AwsStorage,
    upstreams: Upstreams,
    cfg: MirrorConfig,
    memory_cache_entries: usize,
    access: AccessPolicy,
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
    };
    let Assembled { mirror, router } = assemble::mirror_with(&opts, upstreams, Fetching::ByStream).await?;
    Ok((with_metrics(router, mirror.clone()), mirror))
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

/// What the `gc` function does with one event: `{"action": "warm"}` caches
/// `HUBCAP_WARM_IMAGES`; anything else (the schedule's own event) runs a
/// GC sweep that stops 30 s before `remaining` runs out.
pub async fn maintenance(
    settings: &LambdaSettings,
    event: &serde_json::Value,
    remaining: std::time::Duration,
) -> Result<serde_json::Value, BoxError> {
    maintenance_on(settings.backend()?, settings, event, remaining).await
}

/// `maintenance` on a given backend.
pub async fn maintenance_on(
    backend: Backend,
    settings: &LambdaSettings,
    event: &serde_json::Value,
    remaining: std::time::Duration,
) -> Result<serde_json::Value, BoxError> {
    if event.get("action").and_then(|a| a.as_str()) == Some("warm") {
        let opts = settings.mirror.options(backend, AccessPolicy::default());
        let Assembled { mirror, .. } = assemble::mirror(&opts, Fetching::InProcess).await?;
        let mut warmed = Vec::new();
        let mut failed = Vec::new();
        for image in settings.warm_images.iter().filter(|i| !i.trim().is_empty()) {
            match crate::lifecycle::warm::warm(&mirror, image.trim(), &settings.warm_platforms).await {
                Ok(w) => {
                    tracing::info!(image, manifests = w.manifests, blobs = w.blobs, bytes = w.bytes, "warmed");
                    warmed.push(image.clone());
                }
                Err(e) => {
                    tracing::warn!(image, error = %e, "warm failed");
                    failed.push(image.clone());
                }
            }
        }
        mirror.flush_stats().await?;
        return Ok(serde_json::json!({ "warmed": warmed, "failed": failed }));
    }
    let mut opts = settings.gc.options()?;
    opts.deadline = Some(std::time::Instant::now() + remaining.saturating_sub(std::time::Duration::from_secs(30)));
    let storage = assemble::open(&backend, Duration::ZERO, assemble::MEMORY_CACHE_ENTRIES).await?;
    let report = crate::lifecycle::run(storage.index.as_ref(), storage.store.as_ref(), &opts).await?;
    tracing::info!(
        expired = report.expired.len(),
        deleted_manifests = report.deleted_manifests,
        deleted_blobs = report.deleted_blobs,
        reclaimed_bytes = report.reclaimed_bytes,
        complete = report.complete,
        "gc"
    );
    let m = [
        ("ImagesExpired", report.expired.len() as f64, "Count"),
        ("BlobsDeleted", report.deleted_blobs as f64, "Count"),
        ("BytesReclaimed", report.reclaimed_bytes as f64, "Bytes"),
        ("CachedBytes", report.before.bytes as f64, "Bytes"),
        ("CachedImages", report.before.images as f64, "Count"),
    ];
    println!("{}", emf_line("gc", &m));
    Ok(serde_json::to_value(&report)?)
}

/// The `fetcher` function's worker.
pub async fn fetcher(settings: &LambdaSettings) -> Result<Fetcher, BoxError> {
    let m = &settings.mirror;
    let upstreams = assemble::upstreams(&m.upstreams, m.credentials.as_deref(), m.credentials_secret.as_deref()).await?;
    Ok(assemble::fetcher(&settings.aws.storage()?, upstreams).await)
}

/// The `fetcher` function's worker with upstreams already built (tests).
pub async fn fetcher_with(storage: &AwsStorage, upstreams: Upstreams) -> Fetcher {
    assemble::fetcher(storage, upstreams).await
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
    if let Some(stage) = stage.filter(|s| !s.is_empty() && s != "$default") {
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

/// The fetch job a stream record asks for: an INSERT or MODIFY that leaves a
/// blob item `pending`. Other records (claims, completions, other items)
/// need nothing.
pub fn job_from_record(record: &EventRecord) -> Result<Option<FetchJob>, String> {
    if !matches!(record.event_name.as_str(), "INSERT" | "MODIFY") {
        return Ok(None);
    }
    let image = serde_json::to_value(&record.change.new_image).map_err(|e| e.to_string())?;
    let attr = |name: &str, ty: &str| image.get(name).and_then(|v| v.get(ty)).and_then(|v| v.as_str()).map(str::to_owned);
    if attr("sk", "S").as_deref() != Some("blob") || attr("state", "S").as_deref() != Some("pending") {
        return Ok(None);
    }
    let pk = attr("pk", "S").unwrap_or_default();
    let digest = Digest::parse(pk.strip_prefix("blob#").unwrap_or(&pk)).map_err(|e| e.to_string())?;
    let source = attr("source", "S").ok_or("pending blob without source")?;
    let (registry, name) = source.split_once('/').ok_or_else(|| format!("bad source {source:?}"))?;
    let size = attr("size", "N").and_then(|s| s.parse().ok());
    Ok(Some(FetchJob { digest, source: RepoPath { registry: registry.to_owned(), name: name.to_owned() }, size }))
}

/// How a batch of stream records is run: how many copies at once, and when
/// to stop before the function's own timeout kills the whole batch.
#[derive(Clone, Copy, Debug)]
pub struct BatchLimits {
    /// Copies in flight at once (the batch's blobs are independent).
    pub concurrency: usize,
    /// No copy starts after this; the records not started are reported as
    /// failures, so the event source mapping delivers them again.
    pub stop_starting: Option<Instant>,
    /// Copies still running then are cut off, their blobs put back to
    /// `pending` (a fresh stream record, no lease to wait out) and their
    /// records reported as failures.
    pub cut_off: Option<Instant>,
}

impl BatchLimits {
    /// No copy starts in the last `START_MARGIN` before `deadline`, and the
    /// handler returns `CUT_OFF_MARGIN` before it: enough to report back.
    pub fn before(deadline: Instant, concurrency: usize) -> BatchLimits {
        BatchLimits {
            concurrency: concurrency.max(1),
            stop_starting: Some(deadline.checked_sub(START_MARGIN).unwrap_or(deadline)),
            cut_off: Some(deadline.checked_sub(CUT_OFF_MARGIN).unwrap_or(deadline)),
        }
    }

    pub fn unbounded(concurrency: usize) -> BatchLimits {
        BatchLimits { concurrency: concurrency.max(1), stop_starting: None, cut_off: None }
    }
}

/// A copy started this close to the function's timeout would rarely finish.
const START_MARGIN: Duration = Duration::from_secs(60);
/// Time left to put cut-off blobs back to `pending` and return the report.
const CUT_OFF_MARGIN: Duration = Duration::from_secs(10);

/// Runs the fetches a batch of stream records asks for, one at a time and
/// with no deadline. See `handle_stream_within`.
pub async fn handle_stream(fetcher: &Fetcher, event: Event) -> DynamoDbEventResponse {
    handle_stream_within(fetcher, event, BatchLimits::unbounded(1)).await
}

/// Runs the fetches a batch of stream records asks for, `limits.concurrency`
/// at a time. Only records whose fetch failed, was cut off or never started
/// are reported, so only they are retried; a record delivered twice finds
/// its blob claimed or stored and does nothing.
pub async fn handle_stream_within(fetcher: &Fetcher, event: Event, limits: BatchLimits) -> DynamoDbEventResponse {
    let deltas = UpstreamDeltas::default();
    deltas.take(&fetcher.upstreams().each());
    let mut failed: Vec<String> = Vec::new();
    let mut queue = std::collections::VecDeque::new();
    for record in &event.records {
        let id = record.change.sequence_number.clone().unwrap_or_else(|| record.event_id.clone());
        match job_from_record(record) {
            Ok(Some(job)) => queue.push_back((id, job)),
            Ok(None) => {}
            // Retrying a record that cannot be read would fail the same way.
            Err(e) => tracing::error!(record = %id, error = %e, "unreadable stream record skipped"),
        }
    }
    let mut running = futures_util::stream::FuturesUnordered::new();
    let mut in_flight: HashMap<String, FetchJob> = HashMap::new();
    let cut_off = limits.cut_off.map(tokio::time::Instant::from_std);
    loop {
        while running.len() < limits.concurrency && limits.stop_starting.is_none_or(|t| Instant::now() < t) {
            let Some((id, job)) = queue.pop_front() else { break };
            in_flight.insert(id.clone(), job.clone());
            running.push(async move {
                let started = Instant::now();
                let result = fetcher.fetch(&job).await;
                (id, job, started.elapsed(), result)
            });
        }
        if running.is_empty() {
            break;
        }
        let next = async {
            match cut_off {
                Some(at) => tokio::time::timeout_at(at, running.next()).await.ok(),
                None => Some(running.next().await),
            }
        };
        let Some(Some((id, job, took, result))) = next.await else { break };
        in_flight.remove(&id);
        match result {
            Ok(size) => {
                tracing::info!(digest = %job.digest, source = %job.source, ?size, "fetched");
                let mut m = vec![("BytesFetched", size.unwrap_or(0) as f64, "Bytes"), ("FetchFailures", 0.0, "Count")];
                m.push(("FetchDuration", took.as_secs_f64() * 1000.0, "Milliseconds"));
                m.extend(deltas.take(&fetcher.upstreams().each()));
                println!("{}", emf_line("fetcher", &m));
            }
            Err(e) => {
                let mut m = vec![("FetchFailures", 1.0, "Count")];
                m.extend(deltas.take(&fetcher.upstreams().each()));
                println!("{}", emf_line("fetcher", &m));
                tracing::warn!(digest = %job.digest, source = %job.source, error = %e, "fetch failed");
                failed.push(id);
            }
        }
    }
    // Cut off at the deadline: the copies still running stop here.
    drop(running);
    for (id, job) in in_flight {
        tracing::warn!(digest = %job.digest, source = %job.source, "copy cut off before the function's timeout; queued again");
        if let Err(e) = fetcher.release(&job.digest).await {
            tracing::warn!(digest = %job.digest, error = %e, "could not put the blob back to pending");
        }
        failed.push(id);
    }
    for (id, job) in queue {
        tracing::info!(digest = %job.digest, "not started before the function's timeout; left for a retry");
        failed.push(id);
    }
    let mut response = DynamoDbEventResponse::default();
    for id in failed {
        let mut failure = DynamoDbBatchItemFailure::default();
        failure.item_identifier = Some(id);
        response.batch_item_failures.push(failure);
    }
    response
}

/// The `Instant` of a Lambda deadline given in milliseconds since the
/// epoch. `None` for one long past: `cargo lambda watch` sends a fixed
/// 600 000 (ten minutes after 1970), which is no deadline at all.
pub fn instant_of(deadline_ms: u64) -> Option<Instant> {
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    if deadline_ms + 60_000 < now_ms {
        return None;
    }
    Some(Instant::now() + Duration::from_millis(deadline_ms.saturating_sub(now_ms)))
}
