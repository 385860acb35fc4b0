//! The statistics report: what the cache holds (an inventory read from the
//! index) and how requests were served (counters stored in the index by
//! every instance), as `hubcap stats` prints it and `/_hubcap/stats` returns
//! it.

use serde::Serialize;

use super::prometheus::UpstreamStat;
use crate::lifecycle::Inventory;
use crate::storage::StoredStats;

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Cached images, manifests, blobs and bytes; the oldest and the least
    /// recently pulled images.
    pub cache: Inventory,
    /// Registry requests by cache result, all instances, all time.
    pub requests: std::collections::BTreeMap<String, u64>,
    /// Answers served from the cache over answers that needed the cache or
    /// upstream (null before any).
    pub hit_ratio: Option<f64>,
    /// Upstream GETs the cache saved: every cached answer (a re-validation
    /// costs only a HEAD, which Docker Hub does not count).
    pub upstream_requests_saved: u64,
    pub upstream_requests: u64,
    pub upstream_rate_limited: u64,
    /// The last `ratelimit-remaining` an upstream reported, and when (Unix time).
    pub ratelimit_remaining: Option<i64>,
    pub ratelimit_seen_at: Option<i64>,
}

pub fn report(cache: Inventory, stored: &StoredStats) -> Report {
    let get = |k: &str| stored.counters.get(k).copied().unwrap_or(0);
    let served = get("hit") + get("stale") + get("revalidated");
    let answered = served + get("miss");
    let requests = ["hit", "miss", "stale", "revalidated", "pass"].iter().map(|k| (k.to_string(), get(k))).collect();
    Report {
        cache,
        requests,
        hit_ratio: (answered > 0).then(|| served as f64 / answered as f64),
        upstream_requests_saved: served,
        upstream_requests: get("upstream_requests"),
        upstream_rate_limited: get("upstream_rate_limited"),
        ratelimit_remaining: stored.ratelimit_remaining.map(|(n, _)| n),
        ratelimit_seen_at: stored.ratelimit_remaining.map(|(_, t)| t),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1048576.0)
}

fn ago(t: i64, now: i64) -> String {
    if t <= 0 {
        return "never".into();
    }
    let s = (now - t).max(0);
    match s {
        0..120 => format!("{s}s ago"),
        120..7200 => format!("{}m ago", s / 60),
        7200..172800 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

/// The report as text for a terminal.
pub fn render(r: &Report, now: i64) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let c = &r.cache;
    let _ = writeln!(out, "cached: {} images, {} manifests, {} blobs, {}", c.images, c.manifests, c.blobs, mib(c.bytes));
    let ratio = r.hit_ratio.map_or("n/a".to_owned(), |h| format!("{:.1}%", h * 100.0));
    let total: u64 = r.requests.values().sum();
    let _ = writeln!(out, "requests: {total} (hit ratio {ratio}); upstream requests saved: {}", r.upstream_requests_saved);
    let _ = writeln!(out, "upstream: {} requests, {} rate-limited", r.upstream_requests, r.upstream_rate_limited);
    match (r.ratelimit_remaining, r.ratelimit_seen_at) {
        (Some(n), Some(t)) => {
            let _ = writeln!(out, "last ratelimit-remaining: {n} ({})", ago(t, now));
        }
        _ => out.push_str("last ratelimit-remaining: not seen\n"),
    }
    for (title, list) in [("oldest", &c.oldest), ("least recently pulled", &c.least_recently_pulled)] {
        let _ = writeln!(out, "{title}:");
        if list.is_empty() {
            out.push_str("  (none)\n");
        }
        for i in list {
            let _ = writeln!(out, "  {}  cached {}, pulled {}, {}", i.image, ago(i.cached_at, now), ago(i.pulled_at, now), mib(i.bytes));
        }
    }
    out
}

/// `/_hubcap/stats`: the report plus this instance's counts since start-up
/// and each upstream's numbers.
pub fn with_instance(report: &Report, since_start: &[(&str, u64)], upstreams: &[UpstreamStat]) -> serde_json::Value {
    let mut body = serde_json::to_value(report).unwrap_or_default();
    let since: serde_json::Map<_, _> = since_start.iter().map(|(k, v)| (k.to_string(), serde_json::json!(v))).collect();
    body["since_start"] = serde_json::json!({ "requests": since });
    body["upstreams"] = upstreams
        .iter()
        .map(|u| serde_json::json!({ "registry": u.registry, "requests": u.requests, "rate_limited": u.rate_limited, "ratelimit_remaining": u.ratelimit_remaining }))
        .collect();
    body
}
