//! `/metrics` in the Prometheus text format (0.0.4): request counts by cache
//! result, each upstream's requests, 429s and last rate-limit headroom, and
//! what the cache holds.
//!
//! Written by the prometheus-client crate (names, escaping, layout). The
//! numbers live in hubcap's own atomics and the index, not in a metrics
//! library, so each scrape fills a fresh registry from them.

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::lifecycle::Inventory;

/// One upstream registry's numbers since start-up.
#[derive(Clone, Debug)]
pub struct UpstreamStat {
    pub registry: String,
    pub requests: u64,
    pub rate_limited: u64,
    pub ratelimit_remaining: Option<i64>,
}

/// Metrics with one label.
type ByLabel<M> = Family<[(&'static str, String); 1], M>;

fn counters<'a>(label: &'static str, rows: impl IntoIterator<Item = (&'a str, u64)>) -> ByLabel<Counter> {
    let family = ByLabel::<Counter>::default();
    for (value, n) in rows {
        family.get_or_create(&[(label, value.to_owned())]).inc_by(n);
    }
    family
}

fn gauge(v: impl TryInto<i64>) -> Gauge {
    let g = Gauge::default();
    g.set(v.try_into().unwrap_or(i64::MAX));
    g
}

/// The text exposition: `requests` by cache result, `upstreams`, and the
/// cache's size when the inventory could be read. (Help texts have no final
/// `.`: the registry adds it; counters are registered without `_total`: the
/// encoder adds it.)
pub fn render(requests: &[(&str, u64)], upstreams: &[UpstreamStat], cache: Option<&Inventory>) -> String {
    let mut reg = Registry::with_prefix("hubcap");
    reg.register("requests", "Registry requests answered, by cache result", counters("cache", requests.iter().copied()));
    let each = |f: fn(&UpstreamStat) -> u64| upstreams.iter().map(move |u| (u.registry.as_str(), f(u)));
    reg.register("upstream_requests", "Requests sent to each upstream registry", counters("registry", each(|u| u.requests)));
    reg.register("upstream_rate_limited", "429 answers from each upstream registry", counters("registry", each(|u| u.rate_limited)));
    if let Some(c) = cache {
        reg.register("cache_images", "Images in the cache", gauge(c.images));
        reg.register("cache_bytes", "Bytes of blobs in the cache", gauge(c.bytes));
        reg.register("cache_blobs", "Blobs in the cache", gauge(c.blobs));
    }
    let remaining = ByLabel::<Gauge>::default();
    for u in upstreams {
        if let Some(n) = u.ratelimit_remaining {
            remaining.get_or_create(&[("registry", u.registry.clone())]).set(n);
        }
    }
    reg.register("upstream_ratelimit_remaining", "The last ratelimit-remaining an upstream reported", remaining);
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_text::encode(&mut out, &reg);
    out
}

/// The content type of `render`'s output.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_keep_their_names_and_labels() {
        let up = |r: &str, rem| UpstreamStat { registry: r.into(), requests: 7, rate_limited: 1, ratelimit_remaining: rem };
        let cache = Inventory { images: 2, blobs: 5, bytes: 1234, ..Inventory::default() };
        let text = render(&[("hit", 3), ("miss", 4)], &[up("docker.io", Some(99)), up("ghcr.io", None)], Some(&cache));
        for line in [
            "# HELP hubcap_requests_total Registry requests answered, by cache result.",
            "# TYPE hubcap_requests_total counter",
            "hubcap_requests_total{cache=\"hit\"} 3",
            "hubcap_requests_total{cache=\"miss\"} 4",
            "# TYPE hubcap_upstream_requests_total counter",
            "hubcap_upstream_requests_total{registry=\"ghcr.io\"} 7",
            "hubcap_upstream_rate_limited_total{registry=\"docker.io\"} 1",
            "# TYPE hubcap_cache_bytes gauge",
            "hubcap_cache_images 2",
            "hubcap_cache_bytes 1234",
            "hubcap_cache_blobs 5",
            "# TYPE hubcap_upstream_ratelimit_remaining gauge",
            "hubcap_upstream_ratelimit_remaining{registry=\"docker.io\"} 99",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        assert!(!text.contains("ghcr.io\"} 99") && !text.contains("# EOF"), "{text}");
        assert!(!render(&[], &[], None).contains("hubcap_cache_bytes"));
    }
}
