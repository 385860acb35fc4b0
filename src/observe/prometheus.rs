//! `/metrics` in the Prometheus text format: request counts by cache
//! result, each upstream's requests, 429s and last rate-limit headroom, and
//! what the cache holds.

use std::fmt::Write as _;

use crate::lifecycle::Inventory;

/// One upstream registry's numbers since start-up.
#[derive(Clone, Debug)]
pub struct UpstreamStat {
    pub registry: String,
    pub requests: u64,
    pub rate_limited: u64,
    pub ratelimit_remaining: Option<i64>,
}

/// The text exposition: `requests` by cache result, `upstreams`, and the
/// cache's size when the inventory could be read.
pub fn render(requests: &[(&str, u64)], upstreams: &[UpstreamStat], cache: Option<&Inventory>) -> String {
    let mut out = String::new();
    out.push_str("# HELP hubcap_requests_total Registry requests answered, by cache result.\n# TYPE hubcap_requests_total counter\n");
    for (k, v) in requests {
        let _ = writeln!(out, "hubcap_requests_total{{cache=\"{k}\"}} {v}");
    }
    out.push_str(
        "# HELP hubcap_upstream_requests_total Requests sent to each upstream registry.\n# TYPE hubcap_upstream_requests_total counter\n",
    );
    for u in upstreams {
        let _ = writeln!(out, "hubcap_upstream_requests_total{{registry=\"{}\"}} {}", u.registry, u.requests);
    }
    out.push_str("# HELP hubcap_upstream_rate_limited_total 429 answers from each upstream registry.\n# TYPE hubcap_upstream_rate_limited_total counter\n");
    for u in upstreams {
        let _ = writeln!(out, "hubcap_upstream_rate_limited_total{{registry=\"{}\"}} {}", u.registry, u.rate_limited);
    }
    if let Some(c) = cache {
        out.push_str("# HELP hubcap_cache_images Images in the cache.\n# TYPE hubcap_cache_images gauge\n");
        let _ = writeln!(out, "hubcap_cache_images {}", c.images);
        out.push_str("# HELP hubcap_cache_bytes Bytes of blobs in the cache.\n# TYPE hubcap_cache_bytes gauge\n");
        let _ = writeln!(out, "hubcap_cache_bytes {}", c.bytes);
        out.push_str("# HELP hubcap_cache_blobs Blobs in the cache.\n# TYPE hubcap_cache_blobs gauge\n");
        let _ = writeln!(out, "hubcap_cache_blobs {}", c.blobs);
    }
    out.push_str("# HELP hubcap_upstream_ratelimit_remaining The last ratelimit-remaining an upstream reported.\n# TYPE hubcap_upstream_ratelimit_remaining gauge\n");
    for u in upstreams {
        if let Some(n) = u.ratelimit_remaining {
            let _ = writeln!(out, "hubcap_upstream_ratelimit_remaining{{registry=\"{}\"}} {n}", u.registry);
        }
    }
    out
}

/// The content type of `render`'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";
