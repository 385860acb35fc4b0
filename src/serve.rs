//! `hubcap serve`: runs an assembled mirror's router on a TCP listener
//! until SIGTERM/SIGINT, with its background work (storing statistics,
//! GC sweeps). Building the mirror is `assemble`'s.

use std::sync::Arc;
use std::time::Duration;

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

/// What one server holds open for its clients.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// A client must send a request's headers within this; a connection
    /// dripping them is closed (slowloris).
    pub header_timeout: Duration,
    /// Connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// After shutdown is asked, in-flight requests get this long to finish.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { header_timeout: Duration::from_secs(15), max_connections: 1000, shutdown_grace: Duration::from_secs(20) }
    }
}

/// Serves `router` on an already bound listener until `shutdown` resolves,
/// then lets in-flight requests finish, with the default `Limits`.
pub async fn run(listener: TcpListener, router: Router, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
    run_with(listener, router, shutdown, Limits::default()).await
}

/// `run` with explicit limits: HTTP/1 and HTTP/2 connections from hyper's
/// own connection builder, each with the header deadline, at most
/// `max_connections` at once, and a bounded graceful shutdown.
pub async fn run_with(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: Limits,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use tower::ServiceExt;
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before
                    // accept: wait a moment rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        // An IPv4 client of a dual-stack listener is matched as IPv4.
        let peer = std::net::SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let service = router.clone().map_request(move |mut req: axum::http::Request<_>| {
            req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
            req
        });
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), hyper_util::service::TowerToHyperService::new(service));
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown()).await.is_err() {
        tracing::warn!(grace = ?limits.shutdown_grace, "connections still open after the shutdown grace; closing them");
    }
    Ok(())
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
