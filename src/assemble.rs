//! Building a mirror from its options, for any backend. `hubcap serve`,
//! `warm`, `gc`, `stats` and the three Lambdas all come through here, so
//! there is one way to open storage (the index always behind the in-memory
//! cache), one way to build the upstreams (credentials from a file and/or
//! AWS Secrets Manager), and one choice of where blob misses are fetched:
//! - `Fetching::InProcess`: a bounded queue in this process (`warm`, the gc
//!   Lambda's warm list);
//! - `Fetching::Owner`: the same, for the one server that owns an embedded
//!   backend's directory (`hubcap serve`, an `api` Lambda on local storage):
//!   at start it clears what a crash left half-written and resumes unfinished
//!   fetches. Nothing else touches those, so `hubcap gc`, `stats` and `warm`
//!   are safe beside a running server;
//! - `Fetching::ByStream`: the index is the queue, and the `fetcher` Lambda
//!   consumes its stream (the `api` Lambda on AWS).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;

use crate::http::access::AccessPolicy;
use crate::http::{AppState, app};
use crate::mirror::fetch::Fetcher;
use crate::mirror::queue::{FetchQueue, IndexQueue, LocalQueue};
use crate::mirror::upstream::{UpstreamLimits, Upstreams, build_upstreams, load_credentials, parse_credentials};
use crate::mirror::{Mirror, MirrorConfig};
use crate::storage::aws::{self, AwsStorage, SdkRole};
use crate::storage::cached::CachedIndex;
use crate::storage::local::{FsBlobStore, SqliteIndex};
use crate::storage::{BlobStore, FetchIndex, Index};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Facts per kind kept in the in-memory cache in front of the index.
pub const MEMORY_CACHE_ENTRIES: usize = 10_000;

/// Where the cache lives.
#[derive(Clone, Debug)]
pub enum Backend {
    /// Files and SQLite in this directory.
    Local(PathBuf),
    /// S3 and DynamoDB.
    Aws(Box<AwsStorage>),
}

/// Everything a mirror is built from.
#[derive(Clone, Debug)]
pub struct Options {
    pub backend: Backend,
    /// `REGISTRY=URL` or `REGISTRY` (then `https://REGISTRY`); docker.io is
    /// always configured, by default as Docker Hub.
    pub upstreams: Vec<String>,
    /// A docker `config.json`-style file with upstream credentials.
    pub credentials: Option<PathBuf>,
    /// An AWS Secrets Manager secret (name or ARN) with upstream credentials.
    pub credentials_secret: Option<String>,
    pub mirror: MirrorConfig,
    /// Blob copies at once, with `Fetching::InProcess`.
    pub fetch_concurrency: usize,
    pub access: AccessPolicy,
    /// Facts per kind in the in-memory cache in front of the index.
    pub memory_cache_entries: usize,
    /// Redirects, time and size limits of upstream transfers.
    pub upstream_limits: UpstreamLimits,
}

/// Where blob misses are fetched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fetching {
    InProcess,
    Owner,
    ByStream,
}

/// An opened backend.
pub struct Storage {
    /// The index, behind the in-memory cache.
    pub index: Arc<dyn Index>,
    pub store: Arc<dyn BlobStore>,
    /// The embedded backend's store, whose signed URLs this process serves.
    pub local_blobs: Option<Arc<FsBlobStore>>,
}

/// A mirror and the router that serves it.
pub struct Assembled {
    pub mirror: Arc<Mirror>,
    pub router: Router,
}

/// Opens a backend for a batch job (gc, stats, audit). A command that
/// reads a cache never makes one: a wrong `--data` would report an empty
/// cache and leave a directory behind.
pub async fn open(backend: &Backend, tag_ttl: std::time::Duration, memory_cache_entries: usize) -> Result<Storage, BoxError> {
    if let Backend::Local(dir) = backend {
        let shown = std::path::absolute(dir).unwrap_or_else(|_| dir.clone());
        match std::fs::metadata(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(format!("no cache at {} (give the cache's directory with --data)", shown.display()).into());
            }
            Err(e) => return Err(format!("data directory {}: {e}", shown.display()).into()),
            Ok(_) => {}
        }
    }
    open_as(backend, tag_ttl, memory_cache_entries, false, SdkRole::Batch).await
}

/// `open`; as the `owner` of an embedded backend's directory, also clears
/// what a crash left half-written and releases the fetches it left.
/// `role` picks the AWS SDK's settings.
async fn open_as(
    backend: &Backend,
    tag_ttl: std::time::Duration,
    memory_cache_entries: usize,
    owner: bool,
    role: SdkRole,
) -> Result<Storage, BoxError> {
    Ok(match backend {
        Backend::Local(dir) => {
            let shown = std::path::absolute(dir).unwrap_or_else(|_| dir.clone());
            std::fs::create_dir_all(dir).map_err(|e| format!("data directory {}: {e}", shown.display()))?;
            let store = Arc::new(FsBlobStore::open(dir).map_err(|e| format!("data directory {}: {e}", shown.display()))?);
            let index = SqliteIndex::open(&dir.join("index.db")).map_err(|e| format!("data directory {}: {e}", shown.display()))?;
            if owner {
                // Uploads a checkpoint names are continued, not cleared.
                let resumable = index.unfinished_blobs().await?.into_iter().filter_map(|b| b.checkpoint).map(|c| c.upload).collect();
                store.clear_unfinished(&resumable)?;
                index.release_unfinished().await?;
            }
            let index = Arc::new(CachedIndex::new(index, memory_cache_entries, tag_ttl));
            Storage { index, store: store.clone(), local_blobs: Some(store) }
        }
        Backend::Aws(cfg) => {
            let (store, index) = aws::connect(cfg, role).await;
            let index = Arc::new(CachedIndex::new(index, memory_cache_entries, tag_ttl));
            Storage { index, store: Arc::new(store), local_blobs: None }
        }
    })
}

/// The upstreams configured by `--upstream`, with credentials from a file
/// (`--credentials`) and/or an AWS Secrets Manager secret, read once here.
pub async fn upstreams(
    specs: &[String],
    limits: &UpstreamLimits,
    credentials: Option<&Path>,
    secret: Option<&str>,
) -> Result<Upstreams, BoxError> {
    let mut all = match credentials {
        Some(path) => load_credentials(path)?,
        None => HashMap::new(),
    };
    if let Some(secret) = secret.filter(|s| !s.is_empty()) {
        let text = crate::secrets::secret_string(secret).await?;
        all.extend(parse_credentials(&text).map_err(|e| format!("secret {secret}: {e}"))?);
    }
    build_upstreams(specs, limits, &all)
}

/// The mirror `opts` describe, and its router.
pub async fn mirror(opts: &Options, fetching: Fetching) -> Result<Assembled, BoxError> {
    let upstreams =
        upstreams(&opts.upstreams, &opts.upstream_limits, opts.credentials.as_deref(), opts.credentials_secret.as_deref()).await?;
    mirror_with(opts, upstreams, fetching).await
}

/// `mirror`, with upstreams already built.
pub async fn mirror_with(opts: &Options, upstreams: Upstreams, fetching: Fetching) -> Result<Assembled, BoxError> {
    let owner = fetching == Fetching::Owner;
    let Storage { index, store, local_blobs } = {
        // Copies by stream: the api Lambda; else the copies run here.
        let role = if fetching == Fetching::ByStream { SdkRole::Api } else { SdkRole::Serve };
        open_as(&opts.backend, opts.mirror.tag_ttl, opts.memory_cache_entries, owner, role).await?
    };
    let upstreams = Arc::new(upstreams);
    upstreams.prepare();
    let queue: Arc<dyn FetchQueue> = match fetching {
        Fetching::InProcess | Fetching::Owner => {
            let fetcher = Arc::new(Fetcher::new(index.clone(), store.clone(), upstreams.clone()));
            Arc::new(LocalQueue::new(fetcher, opts.fetch_concurrency))
        }
        Fetching::ByStream => Arc::new(IndexQueue),
    };
    let mirror = Arc::new(Mirror::new(index, store, queue, upstreams, opts.mirror.clone()));
    if owner && local_blobs.is_some() {
        // Shared AWS tables are re-driven by their stream, not by each server.
        let resumed = mirror.resume_fetches().await?;
        if resumed > 0 {
            tracing::info!(resumed, "resuming unfinished blob fetches");
        }
    }
    let router = app(AppState { mirror: mirror.clone(), access: Arc::new(opts.access.clone()), local_blobs });
    Ok(Assembled { mirror, router })
}

/// The `fetcher` Lambda's worker: the verified copy on a backend, writing
/// to the index itself (a fetch's state changes must be seen at once).
pub async fn fetcher(storage: &AwsStorage, upstreams: Upstreams) -> Fetcher {
    let upstreams = Arc::new(upstreams);
    upstreams.prepare();
    let (store, index) = aws::connect(storage, SdkRole::Fetcher).await;
    Fetcher::new(Arc::new(index), Arc::new(store), upstreams)
}
