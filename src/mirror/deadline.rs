//! A request's deadline: the moment by which the mirror must have its answer
//! on the way, whatever upstream is doing. Behind a Lambda front end that is
//! the invocation's end or the front end's own limit (API Gateway gives up
//! at 29 or 30 s), less a margin; a request that misses it is lost twice (the
//! client gets the front end's 502/504, and a timed-out function's instance,
//! warm cache and all, is thrown away).
//!
//! The entry point sets it for the request's task (`within`); every wait on
//! the request's path (upstream tokens, manifests, re-validation, a blob
//! held for its copy) is cut to what is left (`cap`, `at`), so the mirror
//! answers in time: stale when it has something, else `503` with
//! `Retry-After`. `hubcap serve` sets none, and nothing changes there.
//! Copies run on tasks of their own (the fetch queue), outside any request's
//! deadline.

use std::future::Future;
use std::time::{Duration, Instant};

tokio::task_local! {
    static DEADLINE: Instant;
}

/// Runs `f` with `deadline` as its request's deadline.
pub async fn within<F: Future>(deadline: Instant, f: F) -> F::Output {
    DEADLINE.scope(deadline, f).await
}

/// The current request's deadline, if it has one.
pub fn at() -> Option<Instant> {
    DEADLINE.try_with(|d| *d).ok()
}

/// `wait`, cut to what is left of the current request's deadline.
pub fn cap(wait: Duration) -> Duration {
    match at() {
        Some(d) => wait.min(d.saturating_duration_since(Instant::now())),
        None => wait,
    }
}

/// The earlier of `now + wait` and the current request's deadline.
pub fn by(wait: Duration) -> Instant {
    let own = Instant::now() + wait;
    at().map_or(own, |d| d.min(own))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_are_cut_to_the_deadline_only_inside_it() {
        let long = Duration::from_secs(30);
        assert_eq!(cap(long), long, "no deadline outside a request");
        assert!(at().is_none());
        let deadline = Instant::now() + Duration::from_secs(2);
        within(deadline, async {
            assert!(cap(long) <= Duration::from_secs(2));
            assert_eq!(cap(Duration::from_millis(10)), Duration::from_millis(10));
            assert_eq!(by(long), deadline);
        })
        .await;
        // A task spawned from a request (a copy) is not bound by it.
        within(deadline, async { tokio::spawn(async { assert!(at().is_none()) }).await.unwrap() }).await;
    }
}
