//! `hubcap lambda-dev`: the two parts of AWS that a local Lambda setup
//! (`cargo lambda watch` + moto) lacks, so a real client can pull through
//! the `api` and `fetcher` binaries on a laptop. Development and tests
//! only: on AWS the front end and the event source mapping do this.
//!
//! - `front`: the `api` function's front end (Function URL, HTTP API, REST
//!   API, or every reported rewrite at once): client requests become that
//!   front end's events, sent through the Lambda invoke API, and answers are
//!   rewritten by its rules (a `HEAD`'s `Content-Length`, a renamed
//!   challenge, its time limit).
//! - `pump`: reads the table's DynamoDB Stream and invokes the `fetcher`
//!   function with batches of the records the template's filter lets through
//!   (blob items left `pending`), retrying those it reports failed, as the
//!   event source mapping does.
//!
//! It knows HTTP, Lambda's event shapes and the stream's wire format;
//! nothing of the mirror itself.

mod front;
mod pump;

use std::net::SocketAddr;
use std::time::Duration;

pub use self::front::{FrontEnd, front};
pub use self::pump::{Pump, StreamReader, passes_filter};
use crate::assemble::BoxError;

pub struct LambdaDevOptions {
    /// Where clients connect (the mirror URL for daemon.json).
    pub listen: SocketAddr,
    /// The `api` function's invoke URL under `cargo lambda watch`
    /// (`.../2015-03-31/functions/api/invocations`).
    pub api_url: String,
    /// Which front end to play.
    pub front_end: FrontEnd,
    /// The `api` function's timeout (the template's), after which a
    /// Function URL gives up.
    pub function_timeout: Duration,
    /// The table whose stream feeds the fetcher; `None`: no pump.
    pub table: Option<String>,
    /// The `fetcher` function's invoke URL under `cargo lambda watch`.
    pub fetcher_url: Option<String>,
    /// How often the stream is read.
    pub poll_every: Duration,
}

/// Runs the front and, with a table and a fetcher URL, the pump, until
/// `shutdown` resolves.
pub async fn run(opts: LambdaDevOptions, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), BoxError> {
    let listener = tokio::net::TcpListener::bind(opts.listen).await.map_err(|e| format!("cannot listen on {}: {e}", opts.listen))?;
    let pump = match (&opts.table, &opts.fetcher_url) {
        (Some(table), Some(fetcher)) => {
            let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
            let mut pump = Pump::new(&sdk, table, fetcher).await?;
            let every = opts.poll_every;
            tracing::info!(table, fetcher, stream = %pump.stream_arn(), "pumping the table's stream into the fetcher");
            Some(tokio::spawn(async move {
                loop {
                    if let Err(e) = pump.step().await {
                        tracing::warn!(error = %e, "stream pump");
                    }
                    tokio::time::sleep(every).await;
                }
            }))
        }
        (None, None) => None,
        _ => return Err("--table and --fetcher-url go together".into()),
    };
    tracing::info!(listen = %listener.local_addr()?, api = %opts.api_url, front_end = ?opts.front_end, "playing the api function's front end");
    let app = front(opts.front_end, &opts.api_url, opts.function_timeout);
    let result = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).with_graceful_shutdown(shutdown).await;
    if let Some(p) = pump {
        p.abort();
    }
    Ok(result?)
}
