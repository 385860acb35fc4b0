//! The clock every timestamp in the index comes from: Unix seconds, the
//! system's time plus an offset that only tests move (`advance`). Tag TTLs,
//! fetch and GC leases, pull marks, `unused_for`, grace periods and upstream
//! tokens' lifetimes all compare against it, so tests move time forward
//! instead of sleeping.
//!
//! The offset belongs to the process (the test runner, nextest, runs each
//! test in a process of its own). Waits measured with `Instant` (a blob
//! request's bounded wait, a sweep's deadline, back-off) stay real time.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

static OFFSET: AtomicI64 = AtomicI64::new(0);

/// Now, in Unix seconds.
pub fn now() -> i64 {
    let system = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    system + OFFSET.load(Ordering::Relaxed)
}

/// Moves this process's clock forward by `by` (whole seconds): for tests.
pub fn advance(by: Duration) {
    OFFSET.fetch_add(by.as_secs() as i64, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advancing_moves_now_forward_by_exactly_that() {
        let before = now();
        advance(Duration::from_secs(3600));
        let after = now();
        assert!((3600..=3601).contains(&(after - before)), "{before} -> {after}");
    }
}
