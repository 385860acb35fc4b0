//! Metrics in CloudWatch Embedded Metric Format (EMF): one JSON log line per
//! request or fetch, which CloudWatch Logs turns into metrics in the `hubcap`
//! namespace with no API call and no agent. Used by the Lambda functions.

use std::sync::atomic::{AtomicU64, Ordering};

use super::prometheus::UpstreamStat;

pub const NAMESPACE: &str = "hubcap";

/// One EMF record: `metrics` are (name, value, unit); `function` is the
/// dimension (`api`, `fetcher`).
pub fn emf_line(function: &str, metrics: &[(&str, f64, &str)]) -> String {
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let mut record = serde_json::json!({
        "_aws": {
            "Timestamp": now_ms,
            "CloudWatchMetrics": [{
                "Namespace": NAMESPACE,
                "Dimensions": [["Function"]],
                "Metrics": metrics.iter().map(|(name, _, unit)| serde_json::json!({ "Name": name, "Unit": unit })).collect::<Vec<_>>(),
            }],
        },
        "Function": function,
    });
    for (name, value, _) in metrics {
        record[*name] = serde_json::json!(value);
    }
    record.to_string()
}

/// What the upstream clients did since the last look: requests, 429s and
/// the lowest rate-limit headroom reported.
#[derive(Default)]
pub struct UpstreamDeltas {
    requests: AtomicU64,
    rate_limited: AtomicU64,
}

impl UpstreamDeltas {
    pub fn take(&self, upstreams: &[UpstreamStat]) -> Vec<(&'static str, f64, &'static str)> {
        let requests: u64 = upstreams.iter().map(|u| u.requests).sum();
        let limited: u64 = upstreams.iter().map(|u| u.rate_limited).sum();
        let dr = requests.saturating_sub(self.requests.swap(requests, Ordering::Relaxed));
        let dl = limited.saturating_sub(self.rate_limited.swap(limited, Ordering::Relaxed));
        let mut out = vec![("UpstreamRequests", dr as f64, "Count"), ("Upstream429", dl as f64, "Count")];
        if let Some(min) = upstreams.iter().filter_map(|u| u.ratelimit_remaining).min() {
            out.push(("RatelimitRemaining", min as f64, "Count"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_follow_the_embedded_metric_format() {
        let line = emf_line("api", &[("Hit", 1.0, "Count"), ("Latency", 2.5, "Milliseconds")]);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["_aws"]["CloudWatchMetrics"][0]["Namespace"], "hubcap");
        assert_eq!(v["_aws"]["CloudWatchMetrics"][0]["Dimensions"], serde_json::json!([["Function"]]));
        assert_eq!(v["_aws"]["CloudWatchMetrics"][0]["Metrics"][1], serde_json::json!({"Name": "Latency", "Unit": "Milliseconds"}));
        assert_eq!((v["Function"].as_str(), v["Hit"].as_f64(), v["Latency"].as_f64()), (Some("api"), Some(1.0), Some(2.5)));
        assert!(v["_aws"]["Timestamp"].as_u64().unwrap() > 0);
    }
}
