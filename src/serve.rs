//! `hubcap serve`: runs an assembled mirror's router on a TCP listener
//! until SIGTERM/SIGINT, with its background work (storing statistics,
//! GC sweeps). Building the mirror is `assemble`'s.

use std::sync::Arc;

use axum::Router;
use tokio::net::TcpListener;

use crate::mirror::Mirror;
use crate::observe::STATS_FLUSH_EVERY;

/// The server's background work: storing its request statistics, and a GC
/// sweep every `gc_interval` (none when zero), the first a minute after
/// start (or sooner, when the interval is shorter).
pub fn spawn_maintenance(
    mirror: Arc<Mirror>,
    gc: crate::lifecycle::GcOptions,
    gc_interval: std::time::Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        use tokio::time::{Instant, MissedTickBehavior, interval_at};
        let mut flush = interval_at(Instant::now() + STATS_FLUSH_EVERY, STATS_FLUSH_EVERY);
        let mut sweep = (!gc_interval.is_zero()).then(|| {
            let mut i = interval_at(Instant::now() + gc_interval.min(std::time::Duration::from_secs(60)), gc_interval);
            i.set_missed_tick_behavior(MissedTickBehavior::Delay);
            i
        });
        let next_sweep = async |sweep: &mut Option<tokio::time::Interval>| match sweep {
            Some(i) => i.tick().await,
            None => std::future::pending().await,
        };
        loop {
            tokio::select! {
                _ = flush.tick() => mirror.flush_stats_every(STATS_FLUSH_EVERY).await,
                _ = next_sweep(&mut sweep) => match crate::lifecycle::run(mirror.index().as_ref(), mirror.store().as_ref(), &gc).await {
                    Ok(r) => tracing::info!(
                        expired = r.expired.len(),
                        deleted_blobs = r.deleted_blobs,
                        reclaimed_bytes = r.reclaimed_bytes,
                        complete = r.complete,
                        "gc"
                    ),
                    Err(e) => tracing::warn!(error = %e, "gc failed; the next sweep retries"),
                },
            }
        }
    })
}

/// Serves `router` on an already bound listener until `shutdown` resolves,
/// then lets in-flight requests finish.
pub async fn run(listener: TcpListener, router: Router, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
    axum::serve(listener, router.into_make_service_with_connect_info::<std::net::SocketAddr>()).with_graceful_shutdown(shutdown).await
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutting down");
}
