//! The `fetcher` function: a batch of stream records of pending blobs,
//! copied concurrently into the store, stopping before the deadline; what it
//! did not finish is reported back by sequence number for a retry. A copy
//! too long for the time left stops at a checkpoint and puts its blob back
//! to `pending`: that write's stream record runs the next invocation, which
//! continues it, so a blob of any size completes across invocations.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use aws_lambda_events::event::dynamodb::{Event, EventRecord};
use aws_lambda_events::event::streams::{DynamoDbBatchItemFailure, DynamoDbEventResponse};
use futures_util::StreamExt;

use crate::assemble::{self, BoxError};
use crate::config::LambdaSettings;
use crate::mirror::fetch::{FetchError, FetchJob, Fetcher};
use crate::mirror::upstream::Upstreams;
use crate::observe::emf::{UpstreamDeltas, emf_line};
use crate::oci::RepoPath;
use crate::storage::aws::AwsStorage;

/// The `fetcher` function's worker.
pub async fn fetcher(settings: &LambdaSettings) -> Result<Fetcher, BoxError> {
    let m = &settings.mirror;
    let upstreams =
        assemble::upstreams(&m.upstreams, &m.upstream_limits(), m.credentials.as_deref(), m.credentials_secret.as_deref()).await?;
    Ok(assemble::fetcher(&settings.aws.storage()?, upstreams).await)
}

/// The `fetcher` function's worker with upstreams already built (tests).
pub async fn fetcher_with(storage: &AwsStorage, upstreams: Upstreams) -> Fetcher {
    assemble::fetcher(storage, upstreams).await
}

/// The fetch job a stream record asks for: an INSERT or MODIFY that leaves a
/// blob item `pending`. Other records (claims, completions, other items)
/// need nothing.
pub fn job_from_record(record: &EventRecord) -> Result<Option<FetchJob>, String> {
    if !matches!(record.event_name.as_str(), "INSERT" | "MODIFY") {
        return Ok(None);
    }
    let image = serde_json::to_value(&record.change.new_image).map_err(|e| e.to_string())?;
    let Some((digest, source, size)) = crate::storage::aws::pending_blob(&image)? else { return Ok(None) };
    let source = RepoPath::from_key(&source).ok_or_else(|| format!("bad source {source:?}"))?;
    Ok(Some(FetchJob { digest, source, size }))
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
                let result = fetcher.fetch_until(&job, cut_off).await;
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
            Err(FetchError::Suspended(at)) => {
                // Pending again: that write's stream record runs the rest.
                tracing::info!(digest = %job.digest, at, "copy suspended before the deadline; its record re-queues it");
                let mut m = vec![("FetchesSuspended", 1.0, "Count")];
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
