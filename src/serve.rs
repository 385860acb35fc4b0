//! `hubcap serve`: runs an assembled mirror's router on a TCP listener
//! until SIGTERM/SIGINT, with its background work (storing statistics,
//! GC sweeps). Building the mirror is `assemble`'s. What it holds open for
//! clients is bounded from the moment of accept (`Limits`): networks not
//! served and addresses over their share are closed before a byte is read,
//! and a connection carries a request in time or goes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;

use crate::http::access::AccessPolicy;

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
#[derive(Clone, Debug)]
pub struct Limits {
    /// A connection must bring a request's headers within this of being
    /// accepted (or of the end of its last answer: `idle_timeout`); one that
    /// sends nothing, or drips them (slowloris), is closed.
    pub header_timeout: Duration,
    /// A kept-alive connection with no request in flight and no byte moved
    /// for this long is closed.
    pub idle_timeout: Duration,
    /// Connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Connections one client address may hold at once; more are closed on
    /// accept (a fleet behind one NAT address shares it).
    pub per_client: usize,
    /// After shutdown is asked, in-flight requests get this long to finish;
    /// connections with none are closed at once.
    pub shutdown_grace: Duration,
    /// Who may connect at all: a connection from another network is closed
    /// on accept, before a byte is read (`None`: any).
    pub admit: Option<Arc<AccessPolicy>>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1000,
            per_client: 250,
            shutdown_grace: Duration::from_secs(20),
            admit: None,
        }
    }
}

/// Serves `router` on an already bound listener until `shutdown` resolves,
/// then lets in-flight requests finish, with the default `Limits`.
pub async fn run(listener: TcpListener, router: Router, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
    run_with(listener, router, shutdown, Limits::default()).await
}

/// Connections held per client address.
#[derive(Default)]
struct PerClient(Mutex<HashMap<IpAddr, usize>>);

/// One connection counted against its address until dropped.
struct Counted(Arc<PerClient>, IpAddr);

impl PerClient {
    fn take(self: &Arc<Self>, ip: IpAddr, cap: usize) -> Option<Counted> {
        let mut held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = held.entry(ip).or_default();
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(Counted(self.clone(), ip))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut held = self.0.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = held.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.1);
            }
        }
    }
}

/// What a connection's watchdog knows of it: when a byte last moved (in
/// milliseconds since `born`), requests in flight, and whether it has
/// carried one yet.
struct Activity {
    born: Instant,
    last: AtomicU64,
    in_flight: AtomicUsize,
    served: AtomicBool,
}

impl Activity {
    fn touch(&self) {
        self.last.store(self.born.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn quiet_for(&self) -> Duration {
        self.born.elapsed().saturating_sub(Duration::from_millis(self.last.load(Ordering::Relaxed)))
    }
}

/// A request in flight until dropped (its answer's headers are out).
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// A client's socket, noting each byte that moves either way.
struct Watched<S> {
    io: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// `run` with explicit limits: HTTP/1 and HTTP/2 connections from hyper's
/// own connection builder, at most `max_connections` at once and
/// `per_client` from one address, refused on accept when the address is
/// not admitted; each watched, so that one that sends no request within
/// the header deadline, or sits idle past `idle_timeout`, is closed, and on
/// shutdown those with no request in flight are closed at once while the
/// others get `shutdown_grace`.
pub async fn run_with(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: Limits,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use tower::ServiceExt;
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let per_client = Arc::new(PerClient::default());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let (stopping, stop_seen) = tokio::sync::watch::channel(false);
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    let (header_timeout, idle_timeout) = (limits.header_timeout, limits.idle_timeout);
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
        // Before any byte is read: a network the mirror does not serve, or
        // an address holding its share of connections, is closed here.
        if limits.admit.as_ref().is_some_and(|a| a.check_network(Some(peer.ip())).is_err()) {
            tracing::debug!(client = %peer.ip(), "connection from a network not served; closed on accept");
            continue;
        }
        let Some(counted) = per_client.take(peer.ip(), limits.per_client.max(1)) else {
            tracing::warn!(client = %peer.ip(), cap = limits.per_client, "a client holds its share of connections; closed on accept");
            continue;
        };
        let activity = Arc::new(Activity {
            born: Instant::now(),
            last: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            served: AtomicBool::new(false),
        });
        let (counter, router) = (activity.clone(), router.clone());
        // Each request counted in flight until its answer's headers are
        // out (its body then moves bytes, which the watchdog sees).
        let service = tower::service_fn(move |mut req: axum::http::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
            counter.in_flight.fetch_add(1, Ordering::Relaxed);
            counter.served.store(true, Ordering::Relaxed);
            let (guard, router) = (InFlight(counter.clone()), router.clone());
            async move {
                let resp = router.oneshot(req).await;
                drop(guard);
                resp
            }
        });
        let io = Watched { io: stream, activity: activity.clone() };
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), hyper_util::service::TowerToHyperService::new(service));
        let conn = graceful.watch(conn.into_owned());
        let mut stop_seen = stop_seen.clone();
        tokio::spawn(async move {
            tokio::pin!(conn);
            let check = (header_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = &mut conn => break,
                    _ = tokio::time::sleep(check) => {}
                    _ = stop_seen.changed() => {}
                }
                if activity.in_flight.load(Ordering::Relaxed) > 0 {
                    continue;
                }
                // No request in flight: closed when shutting down, when none
                // came in time, or when kept alive idle too long.
                let limit = if activity.served.load(Ordering::Relaxed) { idle_timeout } else { header_timeout };
                if *stop_seen.borrow() || activity.quiet_for() >= limit {
                    break;
                }
            }
            drop((permit, counted));
        });
    }
    drop(listener);
    let _ = stopping.send(true);
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
