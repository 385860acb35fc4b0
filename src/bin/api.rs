//! The `api` Lambda: the registry router behind a Function URL or API
//! Gateway, on S3 + DynamoDB. Settings come from `HUBCAP_*` variables.

use hubcap::config::LambdaSettings;

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    hubcap::lambda::init_logging();
    let settings = LambdaSettings::from_env()?;
    let (router, _mirror) = hubcap::lambda::api_router(&settings).await?;
    hubcap::lambda::run_api(router).await
}
