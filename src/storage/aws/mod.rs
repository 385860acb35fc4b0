//! The AWS backend: blobs in S3, the index in one DynamoDB table.
//!
//! # S3
//! One object per digest, shared by every repository: `blobs/sha256/<hex>`.
//! Manifests too large to sit in a DynamoDB item go to
//! `manifests/sha256/<hex>`. Blob URLs are presigned locally (no network
//! call). Blobs are written with a streaming multipart upload (8 MiB parts,
//! bounded memory) and completed only after the caller verified the bytes;
//! anything else is aborted, so an unverified blob is never visible. A blob
//! smaller than one part is a single PutObject.
//!
//! # DynamoDB: one table, key `pk` (S) + `sk` (S)
//!
//! | item | pk | sk | attributes |
//! |---|---|---|---|
//! | blob | `blob#<digest>` | `blob` | `state` (pending/fetching/ready/failed/deleting), `size`, `source` (`registry/repo` to fetch from), `attempts`, `lease_until`, `last_error`, `updated_at`, `used_at` |
//! | manifest | `manifest#<digest>` | `manifest` | `media_type`, `body` (B, under 350 KB) or `body_key` (S3), `blobs` (the config and layer digests it references), `created_at` |
//! | repository's manifest (link) | `repo#<registry/name>` | `manifest#<digest>` | a copy of the manifest item, `last_pulled`: a digest hit is one GetItem |
//! | repository's blob (link) | `repo#<registry/name>` | `blob#<digest>` | `ready`, `size`, `used_at` once the blob is known ready: a blob hit is one GetItem |
//! | tag | `repo#<registry/name>` | `tag#<tag>#<variant>` | `digest`, `media_type`, `checked_at`, `last_pulled`, and a copy of the manifest: a tag hit is one GetItem |
//! | request counters | `stats` | `stats` | `n_<counter>` (N, added to), `ratelimit_remaining`, `ratelimit_at` |
//!
//! Every item also has `kind`. Writing a `pending` blob item is conditional
//! (only when absent, `failed`, or `deleting` under an expired GC lease), so
//! only the first miss wins; its stream record is what triggers the fetcher
//! Lambda: the index write is the enqueue. A blob link says `ready` only
//! after a transaction that found the blob item `ready` and set `used_at` on
//! both; GC marks a blob `deleting` only when its `used_at` is older than the
//! grace period, so a link whose `used_at` is recent is safe to serve from.
//! The table has a stream (new images). It has no TTL attribute: expiry
//! is the lifecycle sweep's, which knows what is still referenced.
//!
//! # Layout
//! - `s3`: the blob store (multipart writer, presigned URLs);
//! - `items`: the table's item layout and codecs (keys, attributes, records);
//! - `dynamo`: the `Index` on that table;
//! - `setup`: creating the bucket and the table (`hubcap aws-setup`);
//! - `tuning`: the SDK's retry and timeout settings of each role.

mod dynamo;
mod items;
mod s3;
mod setup;
mod tuning;

pub use dynamo::DynamoIndex;
pub use items::pending_blob;
pub use s3::{S3BlobStore, blob_key, url_lifetime};
pub use setup::{create_bucket, setup};
pub use tuning::{SdkRole, Settings, clients, settings};

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, ReturnValuesOnConditionCheckFailure, ScalarAttributeType,
    StreamSpecification, StreamViewType, TransactWriteItem, Update,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, ServerSideEncryption};
use bytes::{Bytes, BytesMut};

use super::{
    BlobRecord, BlobState, BlobStore, BlobWriter, Checkpoint, Durable, Entry, FetchIndex, Linked, ManifestRecord, Result, ScanPage,
    ServeIndex, StatsIndex, StorageError, StoredStats, SweepIndex, TagRecord, Upload, now,
};
use crate::oci::{Descriptor, Digest};

/// S3 multipart part size: inside S3's 5 MiB minimum, bounded memory.
pub const PART_SIZE: usize = 8 * 1024 * 1024;
/// Manifests at least this large are kept in S3, not inline (items max 400 KB).
pub const INLINE_MANIFEST_MAX: usize = 350 * 1024;
/// Items per page of a sweep.
const SCAN_PAGE: i32 = 500;

/// An SDK failure, said briefly: the service's code and message, or the
/// transport's cause chain.
fn unavailable<E, R>(what: &str, e: SdkError<E, R>) -> StorageError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let detail = match &e {
        SdkError::ServiceError(se) if se.err().code().is_some() => {
            let err = se.err();
            format!("{}: {}", err.code().unwrap_or("error"), err.message().unwrap_or(""))
        }
        other => aws_sdk_s3::error::DisplayErrorContext(other).to_string(),
    };
    StorageError::Unavailable(format!("{what}: {detail}"))
}

/// Server-side encryption for stored objects.
#[derive(Clone, Debug, Default)]
pub enum Encryption {
    /// The bucket's default.
    #[default]
    BucketDefault,
    /// SSE-S3 (AES256).
    S3,
    /// SSE-KMS, with this key (or the AWS managed key when `None`).
    Kms(Option<String>),
}

impl Encryption {
    pub fn parse(mode: &str, kms_key: Option<String>) -> std::result::Result<Encryption, String> {
        match mode {
            "" | "default" => Ok(Encryption::BucketDefault),
            "AES256" | "aes256" | "s3" => Ok(Encryption::S3),
            "aws:kms" | "kms" => Ok(Encryption::Kms(kms_key)),
            other => Err(format!("unknown server-side encryption {other:?} (AES256 or aws:kms)")),
        }
    }
}

/// The outcome of a conditional DynamoDB write: true when it was made,
/// false when its condition did not hold.
fn conditional<O, E, R>(what: &str, result: std::result::Result<O, SdkError<E, R>>) -> Result<bool>
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match result {
        Ok(_) => Ok(true),
        Err(SdkError::ServiceError(e))
            if matches!(e.err().code(), Some("ConditionalCheckFailedException" | "TransactionCanceledException")) =>
        {
            Ok(false)
        }
        Err(e) => Err(unavailable(what, e)),
    }
}

/// Where the AWS backend lives.
#[derive(Clone, Debug)]
pub struct AwsStorage {
    pub bucket: String,
    pub table: String,
    pub encryption: Encryption,
    /// An explicit SDK configuration; `None` reads the environment (region,
    /// credentials, `AWS_ENDPOINT_URL`) as every AWS tool does.
    pub sdk: Option<aws_config::SdkConfig>,
}

pub(super) async fn sdk_config(cfg: &AwsStorage) -> aws_config::SdkConfig {
    match &cfg.sdk {
        Some(sdk) => sdk.clone(),
        None => aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await,
    }
}

/// The two backends, with the SDK settings of `role`.
pub async fn connect(cfg: &AwsStorage, role: SdkRole) -> (S3BlobStore, DynamoIndex) {
    let sdk = sdk_config(cfg).await;
    let (s3, ddb) = clients(&sdk, role);
    let store = S3BlobStore::new(s3.clone(), &cfg.bucket, cfg.encryption.clone()).signing_with(&sdk);
    let index = DynamoIndex::new(ddb, &cfg.table, S3BlobStore::new(s3, &cfg.bucket, cfg.encryption.clone()));
    (store, index)
}
