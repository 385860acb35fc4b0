//! How requests were answered: per-instance counters (`Counters`), and the
//! statistics every instance adds to the index (`RequestStats::flush`), so
//! `hubcap stats` and `/_hubcap/stats` report all instances, all time.

use std::time::{Duration, Instant};

use super::report::{Report, report};
use crate::lifecycle::Inventory;
use crate::storage::{Index, StatsIndex, StorageError, StoredStats};

/// How a request was answered, for the access log and the `X-Cache` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheStatus {
    Hit,
    Miss,
    /// Cached answer served because upstream failed re-validation.
    Stale,
    /// Tag confirmed (or updated) upstream after its TTL.
    Revalidated,
    /// Relayed from upstream, not cached (tag lists).
    Pass,
}

impl CacheStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Stale => "stale",
            CacheStatus::Revalidated => "revalidated",
            CacheStatus::Pass => "pass",
        }
    }
}

/// How requests were answered since start-up (in memory).
#[derive(Debug, Default)]
pub struct Counters {
    pub hit: std::sync::atomic::AtomicU64,
    pub miss: std::sync::atomic::AtomicU64,
    pub stale: std::sync::atomic::AtomicU64,
    pub revalidated: std::sync::atomic::AtomicU64,
    pub pass: std::sync::atomic::AtomicU64,
}

impl Counters {
    pub fn record(&self, status: CacheStatus) {
        let c = match status {
            CacheStatus::Hit => &self.hit,
            CacheStatus::Miss => &self.miss,
            CacheStatus::Stale => &self.stale,
            CacheStatus::Revalidated => &self.revalidated,
            CacheStatus::Pass => &self.pass,
        };
        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// (cache result, count) for every result.
    pub fn snapshot(&self) -> [(&'static str, u64); 5] {
        let l = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        [
            ("hit", l(&self.hit)),
            ("miss", l(&self.miss)),
            ("stale", l(&self.stale)),
            ("revalidated", l(&self.revalidated)),
            ("pass", l(&self.pass)),
        ]
    }
}

/// What the upstream clients have done since start-up, summed over all
/// upstreams (the mirror's side of the statistics).
#[derive(Clone, Debug, Default)]
pub struct UpstreamTally {
    pub requests: u64,
    pub rate_limited: u64,
    /// The latest `ratelimit-remaining` any upstream reported, and when.
    pub ratelimit_seen: Option<(i64, i64)>,
}

/// How long an inventory read for `/_hubcap/stats` is reused.
const INVENTORY_TTL: Duration = Duration::from_secs(60);

/// How often an instance adds its counts to the stored statistics (a
/// server on a timer, a Lambda after a request): one write per instance.
pub const STATS_FLUSH_EVERY: Duration = Duration::from_secs(60);

/// An instance's counters and what of them is stored.
pub struct RequestStats {
    counters: Counters,
    /// What was last added to the stored statistics, and when.
    flushed: tokio::sync::Mutex<(StoredStats, Instant)>,
    /// The last inventory read for the statistics, and when.
    inventory: tokio::sync::Mutex<Option<(Instant, Inventory)>>,
}

impl Default for RequestStats {
    fn default() -> Self {
        RequestStats {
            counters: Counters::default(),
            flushed: tokio::sync::Mutex::new((StoredStats::default(), Instant::now())),
            inventory: tokio::sync::Mutex::new(None),
        }
    }
}

impl RequestStats {
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// What the cache holds and how it served: the inventory is read at
    /// most once a minute.
    pub async fn report(&self, index: &dyn Index, upstreams: &UpstreamTally) -> Result<Report, StorageError> {
        let inventory = {
            let mut cached = self.inventory.lock().await;
            match cached.as_ref() {
                Some((at, inv)) if at.elapsed() < INVENTORY_TTL => inv.clone(),
                _ => {
                    let inv = crate::lifecycle::inventory(index).await?;
                    *cached = Some((Instant::now(), inv.clone()));
                    inv
                }
            }
        };
        Ok(report(inventory, &self.stored(index, upstreams).await?))
    }

    /// The counters as the stored statistics count them (totals since start).
    fn totals(&self, upstreams: &UpstreamTally) -> StoredStats {
        let mut out = StoredStats::default();
        for (k, v) in self.counters.snapshot() {
            out.counters.insert(k.to_owned(), v);
        }
        out.counters.insert("upstream_requests".into(), upstreams.requests);
        out.counters.insert("upstream_rate_limited".into(), upstreams.rate_limited);
        out.ratelimit_remaining = upstreams.ratelimit_seen;
        out
    }

    /// Adds what was counted since the last flush to the stored statistics.
    pub async fn flush(&self, index: &dyn StatsIndex, upstreams: &UpstreamTally) -> Result<(), StorageError> {
        let mut last = self.flushed.lock().await;
        let totals = self.totals(upstreams);
        let mut delta = StoredStats::default();
        for (k, v) in &totals.counters {
            let d = v.saturating_sub(last.0.counters.get(k).copied().unwrap_or(0));
            if d > 0 {
                delta.counters.insert(k.clone(), d);
            }
        }
        delta.ratelimit_remaining = totals.ratelimit_remaining.filter(|r| last.0.ratelimit_remaining != Some(*r));
        if !delta.counters.is_empty() || delta.ratelimit_remaining.is_some() {
            index.add_stats(&delta).await?;
        }
        *last = (totals, Instant::now());
        Ok(())
    }

    /// `flush`, when the last flush is at least `every` old.
    pub async fn flush_every(&self, index: &dyn StatsIndex, upstreams: &UpstreamTally, every: Duration) {
        if self.flushed.lock().await.1.elapsed() < every {
            return;
        }
        if let Err(e) = self.flush(index, upstreams).await {
            tracing::warn!(error = %e, "could not store request statistics");
        }
    }

    /// The stored statistics plus what this instance counted since its last flush.
    async fn stored(&self, index: &dyn StatsIndex, upstreams: &UpstreamTally) -> Result<StoredStats, StorageError> {
        let mut stored = index.stats().await?;
        let last = self.flushed.lock().await;
        let totals = self.totals(upstreams);
        for (k, v) in totals.counters {
            let unflushed = v.saturating_sub(last.0.counters.get(&k).copied().unwrap_or(0));
            *stored.counters.entry(k).or_default() += unflushed;
        }
        // The later of what is stored (maybe by another instance) and what this one saw.
        stored.ratelimit_remaining = stored.ratelimit_remaining.into_iter().chain(totals.ratelimit_remaining).max_by_key(|(_, at)| *at);
        Ok(stored)
    }
}
