//! `hubcap serve`: assembles a backend (embedded files + SQLite, or S3 +
//! DynamoDB), the in-process fetcher and the configured upstreams into the
//! router, and runs it on a TCP listener until SIGTERM/SIGINT.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use tokio::net::TcpListener;

use crate::http::access::AccessPolicy;
use crate::observe::STATS_FLUSH_EVERY;
use crate::mirror::fetch::{Fetcher, LocalQueue};
use crate::http::{AppState, app};
use crate::mirror::upstream::{Upstreams, build_upstreams, load_credentials, parse_credentials};
use crate::mirror::{Mirror, MirrorConfig};
use crate::storage::aws::{self, AwsStorage};
use crate::storage::cached::CachedIndex;
use crate::storage::local::{FsBlobStore, SqliteIndex};
use crate::storage::{BlobStore, Index};

/// Facts per kind kept in the in-memory cache in front of the index.
pub const MEMORY_CACHE_ENTRIES: usize = 10_000;

/// Docker Hub's registry endpoint, the default upstream.
pub const DOCKER_HUB_URL: &str = "https://registry-1.docker.io";

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where the cache lives.
#[derive(Clone, Debug)]
pub enum Backend {
    /// Files and SQLite in this directory.
    Local(PathBuf),
    /// S3 and DynamoDB.
    Aws(Box<AwsStorage>),
}

#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub backend: Backend,
    /// `REGISTRY=URL` or `REGISTRY` (then `https://REGISTRY`); docker.io is
    /// always configured, by default as Docker Hub.
    pub upstreams: Vec<String>,
    /// A docker `config.json`-style file with upstream credentials.
    pub credentials: Option<PathBuf>,
    /// An AWS Secrets Manager secret (name or ARN) with upstream credentials.
    pub credentials_secret: Option<String>,
    pub mirror: MirrorConfig,
    pub fetch_concurrency: usize,
    pub access: AccessPolicy,
}

/// The upstreams configured by `--upstream`, with credentials from a file
/// (`--credentials`) and/or an AWS Secrets Manager secret, read once here.
pub async fn upstreams_from(specs: &[String], credentials: Option<&Path>, secret: Option<&str>) -> Result<Upstreams, BoxError> {
    let mut all = match credentials {
        Some(path) => load_credentials(path)?,
        None => HashMap::new(),
    };
    if let Some(secret) = secret.filter(|s| !s.is_empty()) {
        let text = crate::secrets::secret_string(secret).await?;
        all.extend(parse_credentials(&text).map_err(|e| format!("secret {secret}: {e}"))?);
    }
    build_upstreams(specs, &all)
}

/// Opens a backend: the index (behind the in-memory cache) and the blob
/// store; for the embedded backend also the store whose URLs this server serves.
pub async fn open_backend(
    backend: &Backend,
    tag_ttl: std::time::Duration,
) -> Result<(Arc<dyn Index>, Arc<dyn BlobStore>, Option<Arc<FsBlobStore>>), BoxError> {
    Ok(match backend {
        Backend::Local(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| format!("data directory {}: {e}", dir.display()))?;
            let store = Arc::new(FsBlobStore::open(dir)?);
            let index = SqliteIndex::open(&dir.join("index.db"))?;
            (Arc::new(CachedIndex::new(index, MEMORY_CACHE_ENTRIES, tag_ttl)), store.clone(), Some(store))
        }
        Backend::Aws(cfg) => {
            let (store, index) = aws::connect(cfg).await;
            (Arc::new(CachedIndex::new(index, MEMORY_CACHE_ENTRIES, tag_ttl)), Arc::new(store), None)
        }
    })
}

/// The mirror with an in-process fetcher, and its router.
pub async fn build_local(opts: &ServeOptions) -> Result<(Router, Arc<Mirror>), BoxError> {
    let (index, store, local_blobs) = open_backend(&opts.backend, opts.mirror.tag_ttl).await?;
    let upstreams = Arc::new(upstreams_from(&opts.upstreams, opts.credentials.as_deref(), opts.credentials_secret.as_deref()).await?);
    let fetcher = Arc::new(Fetcher::new(index.clone(), store.clone(), upstreams.clone()));
    let queue = Arc::new(LocalQueue::new(fetcher, opts.fetch_concurrency));
    let mirror = Arc::new(Mirror::new(index, store, queue, upstreams, opts.mirror.clone()));
    if matches!(opts.backend, Backend::Local(_)) {
        // Shared AWS tables are re-driven by their stream, not by each server.
        let resumed = mirror.resume_fetches().await?;
        if resumed > 0 {
            tracing::info!(resumed, "resuming unfinished blob fetches");
        }
    }
    let router = app(AppState { mirror: mirror.clone(), access: Arc::new(opts.access.clone()), local_blobs });
    Ok((router, mirror))
}


/// The server's background work: storing its request statistics, and a GC
/// sweep every `gc_interval` (none when zero), the first a minute after
/// start (or sooner, when the interval is shorter).
pub fn spawn_maintenance(mirror: Arc<Mirror>, gc: crate::lifecycle::GcOptions, gc_interval: std::time::Duration) -> tokio::task::JoinHandle<()> {
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
