//! hubcap: a pull-through mirror for Docker Hub and other OCI registries.
//!
//! # Layout
//! - `oci`: registry vocabulary (names, references, digests, media types,
//!   content negotiation) and the one table of OCI error codes.
//! - `http`: the axum router. Knows OCI, not storage: thin handlers that call
//!   the service.
//! - `proxy`: the pull-through service (`Mirror`): index and store first,
//!   then upstream, write through. Knows the storage traits, not backends.
//! - `upstream`: the client for upstream registries (token auth, retries,
//!   redirects, rate-limit headers).
//! - `storage`: the `BlobStore` and `Index` traits; the embedded backend
//!   (`storage::local`: files + SQLite), the AWS one (`storage::aws`: S3 +
//!   DynamoDB) and the warm in-memory cache (`storage::cached`).
//! - `fetch`: the blob fetch job (upstream -> store, verified) and the
//!   in-process queue that runs it.
//! - `serve`: wiring for `hubcap serve` and the TCP server.
//! - `lambda`: the adapters the `api`, `fetcher` and `gc` Lambda binaries run.
//! - `lambda_dev`: `hubcap lambda-dev`, the Function URL front and stream
//!   pump that complete a local `cargo lambda watch` setup.
//! - `config`: settings shared by the CLI and the Lambdas (flags + env).
//! - `access`: who may use the mirror (networks, repositories, credentials).
//! - `check`: `hubcap check`, an end-to-end probe of a running mirror.
//! - `metrics`: CloudWatch Embedded Metric Format records for the Lambdas.
//! - `warm`: `hubcap warm`, caching images ahead of time.
//! - `gc`: lifecycle: which images expire, the safe sweep that removes them
//!   and their blobs, and the inventory `hubcap stats` reports.
//! - `stats`: the statistics report (`hubcap stats`, `/_hubcap/stats`).
//!
//! Controllers call services; services never call controllers.

pub mod assemble;
pub mod check;
pub mod config;
pub mod lifecycle;
pub mod http;
pub mod lambda;
pub mod lambda_dev;
pub mod observe;
pub mod oci;
pub mod mirror;
pub mod secrets;
pub mod serve;
pub mod storage;
