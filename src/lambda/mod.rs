//! What the Lambda binaries run, on the core `hubcap serve` runs too.
//!
//! - `api`: the same axum router, with the index as its fetch queue; it only
//!   adapts Lambda's events to it (every header value kept, the API Gateway
//!   stage prefix, the client's source IP) and adds an EMF record per request;
//! - `fetcher`: DynamoDB Stream records of pending blobs turned into
//!   `Fetcher::fetch` calls, a batch's blobs at once, stopping before the
//!   deadline, with partial batch failures;
//! - `gc`: a lifecycle sweep, or the warm list;
//! - `dev`: `hubcap lambda-dev`, what completes a local `cargo lambda watch`
//!   setup (a Function URL's header joining, the stream's delivery).

mod api;
pub mod dev;
mod fetcher;
mod gc;

use std::time::{Duration, Instant};

pub use api::*;
pub use fetcher::*;
pub use gc::*;

/// JSON logs without colour, as CloudWatch wants them.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HUBCAP_LOG").unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).json().flatten_event(true).with_ansi(false).without_time().try_init();
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
