//! hubcap: a pull-through mirror for Docker Hub and other OCI registries.
//!
//! # Layout
//! Layers, top to bottom; each uses only those below it.
//!
//! Entry points
//! - `serve`: `hubcap serve`'s TCP server and background work.
//! - `lambda`: what the `api`, `fetcher` and `gc` binaries run, and
//!   `lambda::dev` (`hubcap lambda-dev`).
//! - `assemble`: builds a mirror from options, for any backend (used by
//!   every entry point).
//! - `config`: settings shared by the CLI and the Lambdas (flags + env).
//! - `check`: `hubcap check`, an end-to-end probe of a running mirror.
//! - `warm`: `hubcap warm` and the gc Lambda's warm list: caching images
//!   ahead of time through the mirror.
//!
//! HTTP
//! - `http`: the axum router (OCI routes, the embedded backend's signed blob
//!   URLs, who may use the mirror). Knows OCI, not storage: thin handlers
//!   that call the service.
//!
//! Services
//! - `mirror`: the pull-through service (`Mirror`: index and store first,
//!   then upstream, write through), the verified blob fetch and its queues
//!   (`mirror::fetch`), and the upstream registries (`mirror::upstream`).
//!   Knows the storage traits, not backends.
//! - `lifecycle`: which images expire and the safe sweep that removes them;
//!   the inventory.
//! - `observe`: request counters and stored statistics, the statistics
//!   report, Prometheus and CloudWatch EMF renderings.
//!
//! Storage
//! - `storage`: the `BlobStore` and `Index` traits and records; the embedded
//!   backend (`storage::local`: files + SQLite), the AWS one (`storage::aws`:
//!   S3 + DynamoDB) and the warm in-memory cache (`storage::cached`). Knows
//!   its SDKs, nothing of HTTP.
//! - `secrets`: upstream credentials from AWS Secrets Manager.
//!
//! Vocabulary
//! - `oci`: names, references, digests, media types, content negotiation,
//!   repository and tag patterns, and the one table of OCI error codes.
//!   Pure: no I/O.
//!
//! Process
//! - `alloc`: the allocator setting that keeps big copies' memory bounded.
//!
//! Controllers call services; services never call controllers.

pub mod alloc;
pub mod assemble;
pub mod check;
pub mod config;
pub mod http;
pub mod lambda;
pub mod lifecycle;
pub mod mirror;
pub mod observe;
pub mod oci;
pub mod secrets;
pub mod serve;
pub mod storage;
pub mod warm;

#[cfg(test)]
mod house {
    /// No file of `src/` over 600 lines, no import circle between modules
    /// (`tests/tools/house.py` says how it reads the module graph).
    #[test]
    fn files_stay_short_and_modules_import_in_one_direction() {
        let out = std::process::Command::new("python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/house.py"))
            .output()
            .expect("python3 (tests/run.sh installs it)");
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{said}");
    }
}
