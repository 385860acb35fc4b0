//! The embedded backend for `hubcap serve`: blobs as files under the data
//! directory (`fs`: written to a temporary name, renamed only once verified,
//! and HMAC-signed, expiring blob URLs that the same process serves, the
//! local stand-in for S3 presigned URLs), the index in SQLite (`sqlite`, WAL).

mod fs;
mod sqlite;

pub use fs::FsBlobStore;
pub use sqlite::SqliteIndex;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use rusqlite::{Connection, OptionalExtension, params};
use sha2::Sha256;

use super::{
    BlobRecord, BlobState, BlobStore, BlobWriter, Checkpoint, Durable, Entry, FetchIndex, Linked, ManifestRecord, OffsetWriter,
    PartialBlob, Result, ScanPage, ServeIndex, StatsIndex, StorageError, StoredStats, SweepIndex, TagRecord, Upload, now,
};
use crate::oci::{Descriptor, Digest};

/// Route prefix of the signed blob URLs this backend hands out.
pub const BLOB_URL_PREFIX: &str = "/_hubcap/blobs/sha256/";
