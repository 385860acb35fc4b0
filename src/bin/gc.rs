//! The `gc` Lambda, run on a schedule: a lifecycle sweep (expire images not
//! pulled for a while, delete blobs nothing references after the grace
//! period), stopping cleanly before its own timeout so the next run
//! finishes. An event `{"action": "warm"}` (the optional warm schedule)
//! caches the configured base images instead.

use hubcap::config::LambdaSettings;
use lambda_runtime::{LambdaEvent, service_fn};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    hubcap::lambda::init_logging();
    let settings = LambdaSettings::from_env()?;
    let settings = &settings;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<serde_json::Value>| async move {
        // Without a real deadline (the emulator), a Lambda's longest run.
        let remaining = hubcap::lambda::instant_of(event.context.deadline)
            .map_or(std::time::Duration::from_secs(900), |d| d.saturating_duration_since(std::time::Instant::now()));
        hubcap::lambda::maintenance(settings, &event.payload, remaining).await
    }))
    .await
}
