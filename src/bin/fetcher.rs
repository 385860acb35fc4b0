//! The `fetcher` Lambda: consumes DynamoDB Stream records of pending blobs
//! and copies each blob from upstream into S3, verified.

use aws_lambda_events::event::dynamodb::Event;
use hubcap::config::LambdaSettings;
use lambda_runtime::{LambdaEvent, service_fn};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    hubcap::lambda::init_logging();
    let settings = LambdaSettings::from_env()?;
    let fetcher = hubcap::lambda::fetcher(&settings).await?;
    let fetcher = &fetcher;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Event>| async move {
        Ok::<_, lambda_runtime::Error>(hubcap::lambda::handle_stream(fetcher, event.payload).await)
    }))
    .await
}
