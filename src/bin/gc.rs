//! The `gc` Lambda, run on a schedule. Expiring stale images arrives with
//! the lifecycle work; until then it only records that it ran.

use aws_lambda_events::event::eventbridge::EventBridgeEvent;
use lambda_runtime::{LambdaEvent, service_fn};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    hubcap::lambda::init_logging();
    lambda_runtime::run(service_fn(|event: LambdaEvent<EventBridgeEvent>| async move {
        tracing::info!(time = ?event.payload.time, "gc: nothing to expire yet (lifecycle not enabled)");
        Ok::<_, lambda_runtime::Error>(())
    }))
    .await
}
