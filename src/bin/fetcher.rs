//! The `fetcher` Lambda: consumes DynamoDB Stream records of pending blobs
//! and copies each blob from upstream into S3, verified: a batch's blobs
//! `HUBCAP_FETCH_CONCURRENCY` at a time, stopping before the function's
//! timeout and reporting what it did not finish as batch item failures.

use aws_lambda_events::event::dynamodb::Event;
use hubcap::config::LambdaSettings;
use hubcap::lambda::BatchLimits;
use lambda_runtime::{LambdaEvent, service_fn};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    hubcap::alloc::return_large_buffers();
    hubcap::lambda::init_logging();
    let settings = LambdaSettings::from_env()?;
    let fetcher = hubcap::lambda::fetcher(&settings).await?;
    let (fetcher, concurrency) = (&fetcher, settings.mirror.fetch_concurrency);
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Event>| async move {
        let limits = match hubcap::lambda::instant_of(event.context.deadline) {
            Some(deadline) => BatchLimits::before(deadline, concurrency),
            None => BatchLimits::unbounded(concurrency),
        };
        Ok::<_, lambda_runtime::Error>(hubcap::lambda::handle_stream_within(fetcher, event.payload, limits).await)
    }))
    .await
}
