//! The AWS SDK's retry and timeout settings for each way hubcap runs, chosen
//! rather than defaulted (the SDK's defaults wait forever for an answer and
//! back off for up to 20 s), each with its reason.
//!
//! What every role shares: a connection is made in milliseconds inside a
//! region, so a connect timeout of 1-2 s catches a black-holed endpoint
//! early (the SDK's default is 3.1 s); DynamoDB answers an item call in
//! milliseconds, so an attempt still unanswered after a few seconds is a bad
//! connection and is retried on another; S3 moves an 8 MiB part per attempt,
//! which needs more. Retries use the SDK's standard mode (full-jitter
//! exponential back-off and its retry quota, so a failing service is not
//! hammered), except the batch role, which uses adaptive mode: a sweep or an
//! audit scanning the whole table is what throttles a partition, and
//! adaptive mode slows its own sending instead of spending retries. The
//! operation and attempt timeouts do not cover a streamed body read after
//! the call returned (the SDK's stalled-stream protection watches those).

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;

/// What the SDK clients are used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SdkRole {
    /// The `api` Lambda: every call is on a client's request, inside a
    /// front end's 29-30 s. Few attempts, short waits: after 5 s a call has
    /// failed, and the request answers stale or `503` with `Retry-After`
    /// while there is time left to (the request's own deadline cuts
    /// whatever is still waiting).
    Api,
    /// `hubcap serve --storage aws`: the client's requests (as `Api`, with
    /// no front end's limit) and the copies into S3 (as `Fetcher`).
    Serve,
    /// The `fetcher` Lambda: copies that run up to 15 minutes; a call
    /// failed for good costs a resumed copy, so it is retried more and
    /// longer than a client's call.
    Fetcher,
    /// The `gc` Lambda and the CLI's tools (`gc`, `stats`, `aws-setup`):
    /// whole-table scans and batch writes, with time to spare.
    Batch,
}

/// One role's settings, per service.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub retry: RetryConfig,
    pub dynamodb: TimeoutConfig,
    pub s3: TimeoutConfig,
}

fn timeouts(connect: Duration, attempt: Duration, operation: Duration) -> TimeoutConfig {
    TimeoutConfig::builder().connect_timeout(connect).operation_attempt_timeout(attempt).operation_timeout(operation).build()
}

fn standard(attempts: u32, first: Duration, longest: Duration) -> RetryConfig {
    RetryConfig::standard().with_max_attempts(attempts).with_initial_backoff(first).with_max_backoff(longest)
}

/// The settings of `role`.
pub fn settings(role: SdkRole) -> Settings {
    let s = Duration::from_secs;
    let ms = Duration::from_millis;
    match role {
        // 3 attempts with back-offs under 1 s: a throttled or reset call is
        // retried twice and the whole of it stays under 5 s (DynamoDB) or
        // 10 s (S3: a manifest body of a few MB), well inside the deadline.
        SdkRole::Api => {
            Settings { retry: standard(3, ms(50), s(1)), dynamodb: timeouts(s(1), s(2), s(5)), s3: timeouts(s(1), s(5), s(10)) }
        }
        // As the api for the index; S3 attempts long enough for an 8 MiB
        // part over a slow link to the region (8 MiB at 5 Mbit/s is 13 s).
        SdkRole::Serve => {
            Settings { retry: standard(4, ms(100), s(2)), dynamodb: timeouts(s(2), s(3), s(10)), s3: timeouts(s(2), s(30), s(90)) }
        }
        // Six attempts, back-offs up to 5 s: riding out a throttled burst is
        // cheaper than a copy that stops and resumes.
        SdkRole::Fetcher => {
            Settings { retry: standard(6, ms(200), s(5)), dynamodb: timeouts(s(2), s(3), s(30)), s3: timeouts(s(2), s(30), s(120)) }
        }
        // Scan pages of 500 items and batch deletes: longer attempts, many
        // of them, and adaptive sending.
        SdkRole::Batch => Settings {
            retry: RetryConfig::adaptive().with_max_attempts(8).with_initial_backoff(ms(200)).with_max_backoff(s(10)),
            dynamodb: timeouts(s(2), s(10), s(60)),
            s3: timeouts(s(2), s(30), s(120)),
        },
    }
}

/// The S3 and DynamoDB clients of `role` on `sdk` (region, credentials,
/// endpoint). S3 uses path-style addressing whenever an endpoint is
/// overridden (emulators).
pub fn clients(sdk: &aws_config::SdkConfig, role: SdkRole) -> (aws_sdk_s3::Client, aws_sdk_dynamodb::Client) {
    let settings = settings(role);
    let overridden = sdk.endpoint_url().is_some() || std::env::var_os("AWS_ENDPOINT_URL_S3").is_some();
    let s3 = aws_sdk_s3::config::Builder::from(sdk)
        .force_path_style(overridden)
        .retry_config(settings.retry.clone())
        .timeout_config(settings.s3)
        .build();
    let ddb = aws_sdk_dynamodb::config::Builder::from(sdk).retry_config(settings.retry).timeout_config(settings.dynamodb).build();
    (aws_sdk_s3::Client::from_conf(s3), aws_sdk_dynamodb::Client::from_conf(ddb))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever a role retries, its worst case stays inside what waits on
    /// it: the api's inside the front end's deadline less its margin.
    #[test]
    fn every_role_has_bounded_attempts_and_the_api_fits_its_deadline() {
        for role in [SdkRole::Api, SdkRole::Serve, SdkRole::Fetcher, SdkRole::Batch] {
            let s = settings(role);
            for t in [&s.dynamodb, &s.s3] {
                let (attempt, operation) = (t.operation_attempt_timeout().unwrap(), t.operation_timeout().unwrap());
                assert!(attempt < operation, "{role:?}");
                assert!(t.connect_timeout().unwrap() <= Duration::from_secs(2), "{role:?}");
            }
            assert!(s.retry.max_attempts() >= 3, "{role:?} retries throttling");
        }
        let api = settings(SdkRole::Api);
        let deadline = Duration::from_secs(29) - crate::lambda::DEADLINE_MARGIN;
        assert!(api.s3.operation_timeout().unwrap() + api.dynamodb.operation_timeout().unwrap() < deadline);
        assert_eq!(api.retry.mode(), aws_config::retry::RetryMode::Standard);
        assert_eq!(settings(SdkRole::Batch).retry.mode(), aws_config::retry::RetryMode::Adaptive);
    }
}
