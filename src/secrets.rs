//! Upstream credentials from AWS Secrets Manager: one `GetSecretValue` at
//! start-up (a Lambda's cold start). The value is handed to the upstream
//! client and never logged.

use aws_sdk_secretsmanager::error::DisplayErrorContext;

pub async fn secret_string(id: &str) -> Result<String, String> {
    let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let client = aws_sdk_secretsmanager::Client::new(&sdk);
    let out = client.get_secret_value().secret_id(id).send().await.map_err(|e| format!("secret {id}: {}", DisplayErrorContext(e)))?;
    out.secret_string().map(str::to_owned).ok_or_else(|| format!("secret {id} has no string value"))
}
