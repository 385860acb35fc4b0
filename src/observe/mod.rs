//! Observability: how requests were answered (`counters`: per-instance
//! counts and the statistics stored in the index), the statistics report
//! (`report`: `hubcap stats`, `/_hubcap/stats`), and the two renderings for
//! monitoring systems: Prometheus text (`prometheus`, `/metrics`) and
//! CloudWatch Embedded Metric Format (`emf`, the Lambdas' log lines).
//!
//! It knows the storage traits (where statistics are stored) and plain
//! numbers; the mirror hands it what its upstreams did as an
//! `UpstreamTally`, so nothing here depends on the mirror.

mod counters;
pub mod emf;
pub mod prometheus;
pub mod report;

pub use counters::{CacheStatus, Counters, RequestStats, STATS_FLUSH_EVERY, UpstreamTally};
pub use report::{Report, render, report};
