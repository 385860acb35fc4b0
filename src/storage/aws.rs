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
//! The table has a stream (new images) and a TTL attribute, `expires_at`.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType, StreamSpecification, StreamViewType,
    TimeToLiveSpecification, TransactWriteItem, Update,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, ServerSideEncryption};
use bytes::{Bytes, BytesMut};

use super::{
    BlobRecord, BlobState, BlobStore, BlobWriter, Entry, Index, Linked, ManifestRecord, Result, ScanPage, StorageError, StoredStats,
    TagRecord, now,
};
use crate::oci::Digest;

/// S3 multipart part size: inside S3's 5 MiB minimum, bounded memory.
pub const PART_SIZE: usize = 8 * 1024 * 1024;
/// Manifests at least this large are kept in S3, not inline (items max 400 KB).
pub const INLINE_MANIFEST_MAX: usize = 350 * 1024;
/// Items per page of a sweep.
const SCAN_PAGE: i32 = 500;
/// The table's TTL attribute.
pub const TTL_ATTRIBUTE: &str = "expires_at";

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

// ---------------------------------------------------------------------------
// S3 blobs
// ---------------------------------------------------------------------------

pub struct S3BlobStore {
    client: aws_sdk_s3::Client,
    bucket: String,
    encryption: Encryption,
    /// When the signing credentials expire, as last asked: a presigned URL
    /// dies with them, whatever lifetime it states.
    expiry: std::sync::Arc<std::sync::Mutex<Option<CredentialsExpiry>>>,
    /// The provider of the credentials the client signs with.
    credentials: Option<aws_credential_types::provider::SharedCredentialsProvider>,
}

#[derive(Clone, Copy)]
struct CredentialsExpiry {
    asked: std::time::Instant,
    expires: Option<std::time::SystemTime>,
}

/// How often the credentials' expiry is asked again (a provider may fetch).
const EXPIRY_CHECK_EVERY: Duration = Duration::from_secs(60);

/// A presigned URL's lifetime: `ttl`, cut to the signing credentials' end.
/// The URL stops working then anyway (AWS: "a presigned URL created with
/// temporary credentials expires when the credentials do"); saying so keeps
/// clients from holding a URL that looks valid and is not.
pub fn url_lifetime(ttl: Duration, now: std::time::SystemTime, expires: Option<std::time::SystemTime>) -> Duration {
    match expires {
        Some(end) => ttl.min(end.duration_since(now).unwrap_or_default()).max(Duration::from_secs(1)),
        None => ttl,
    }
}

pub fn blob_key(digest: &Digest) -> String {
    format!("blobs/sha256/{}", digest.hex())
}

fn manifest_key(digest: &Digest) -> String {
    format!("manifests/sha256/{}", digest.hex())
}

impl S3BlobStore {
    pub fn new(client: aws_sdk_s3::Client, bucket: &str, encryption: Encryption) -> S3BlobStore {
        S3BlobStore { client, bucket: bucket.to_owned(), encryption, expiry: Default::default(), credentials: None }
    }

    /// Signs with credentials from `sdk`'s provider, whose expiry bounds the
    /// lifetime of presigned URLs.
    pub fn signing_with(mut self, sdk: &aws_config::SdkConfig) -> S3BlobStore {
        self.credentials = sdk.credentials_provider();
        self
    }

    /// When the credentials that sign URLs expire (`None`: not known, e.g.
    /// static keys, or Lambda's, which come from the environment without an
    /// expiry), asked at most once a minute.
    async fn credentials_expiry(&self, ttl: Duration) -> Option<std::time::SystemTime> {
        let cached = *self.expiry.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cached.filter(|c| c.asked.elapsed() < EXPIRY_CHECK_EVERY) {
            return c.expires;
        }
        use aws_credential_types::provider::ProvideCredentials;
        let provider = self.credentials.as_ref()?;
        let expires = provider.provide_credentials().await.ok().and_then(|c| c.expiry());
        if let Some(left) = expires.and_then(|e| e.duration_since(std::time::SystemTime::now()).ok()).filter(|left| *left < ttl) {
            tracing::warn!(?left, ?ttl, "the signing credentials expire within the blob URL lifetime: URLs are shortened to match");
        }
        *self.expiry.lock().unwrap_or_else(|p| p.into_inner()) = Some(CredentialsExpiry { asked: std::time::Instant::now(), expires });
        expires
    }

    async fn put_small(&self, key: &str, body: Bytes) -> Result<()> {
        let mut req = self.client.put_object().bucket(&self.bucket).key(key).body(ByteStream::from(body));
        req = match &self.encryption {
            Encryption::BucketDefault => req,
            Encryption::S3 => req.server_side_encryption(ServerSideEncryption::Aes256),
            Encryption::Kms(k) => req.server_side_encryption(ServerSideEncryption::AwsKms).set_ssekms_key_id(k.clone()),
        };
        req.send().await.map_err(|e| unavailable("S3 PutObject", e))?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Bytes> {
        let out = self.client.get_object().bucket(&self.bucket).key(key).send().await.map_err(|e| unavailable("S3 GetObject", e))?;
        let body = out.body.collect().await.map_err(|e| StorageError::Unavailable(format!("S3 GetObject body: {e}")))?;
        Ok(body.into_bytes())
    }
}

#[async_trait]
impl BlobStore for S3BlobStore {
    async fn size(&self, digest: &Digest) -> Result<Option<u64>> {
        match self.client.head_object().bucket(&self.bucket).key(blob_key(digest)).send().await {
            Ok(out) => Ok(Some(out.content_length().unwrap_or(0).max(0) as u64)),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(None),
            Err(e) => Err(unavailable("S3 HeadObject", e)),
        }
    }

    async fn presigned_get(&self, digest: &Digest, ttl: Duration) -> Result<String> {
        let lifetime = url_lifetime(ttl, std::time::SystemTime::now(), self.credentials_expiry(ttl).await);
        let config = PresigningConfig::expires_in(lifetime).map_err(|e| StorageError::Unavailable(format!("presigning: {e}")))?;
        let req = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(blob_key(digest))
            .presigned(config)
            .await
            .map_err(|e| unavailable("S3 presign", e))?;
        Ok(req.uri().to_owned())
    }

    async fn begin(&self, digest: &Digest) -> Result<Box<dyn BlobWriter>> {
        Ok(Box::new(S3BlobWriter {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            key: blob_key(digest),
            encryption: self.encryption.clone(),
            buffer: BytesMut::new(),
            upload_id: None,
            parts: Vec::new(),
            written: 0,
        }))
    }

    async fn delete(&self, digest: &Digest) -> Result<()> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(blob_key(digest))
            .send()
            .await
            .map_err(|e| unavailable("S3 DeleteObject", e))?;
        Ok(())
    }

    async fn delete_many(&self, digests: &[Digest]) -> Result<()> {
        use aws_sdk_s3::types::{Delete, ObjectIdentifier};
        for chunk in digests.chunks(1000) {
            let objects = chunk.iter().map(|d| ObjectIdentifier::builder().key(blob_key(d)).build().expect("key set")).collect::<Vec<_>>();
            let delete = Delete::builder().set_objects(Some(objects)).quiet(true).build().expect("objects set");
            let out = self
                .client
                .delete_objects()
                .bucket(&self.bucket)
                .delete(delete)
                .send()
                .await
                .map_err(|e| unavailable("S3 DeleteObjects", e))?;
            if let Some(err) = out.errors().first() {
                return Err(StorageError::Unavailable(format!(
                    "S3 DeleteObjects: {} {}: {}",
                    err.key().unwrap_or(""),
                    err.code().unwrap_or(""),
                    err.message().unwrap_or("")
                )));
            }
        }
        Ok(())
    }
}

/// A streaming multipart upload: at most one part buffered at a time.
struct S3BlobWriter {
    client: aws_sdk_s3::Client,
    bucket: String,
    key: String,
    encryption: Encryption,
    buffer: BytesMut,
    upload_id: Option<String>,
    parts: Vec<CompletedPart>,
    /// Bytes written so far.
    written: u64,
}

impl S3BlobWriter {
    async fn upload_part(&mut self, body: Bytes) -> Result<()> {
        let upload_id = match &self.upload_id {
            Some(id) => id.clone(),
            None => {
                let mut req = self.client.create_multipart_upload().bucket(&self.bucket).key(&self.key);
                req = match &self.encryption {
                    Encryption::BucketDefault => req,
                    Encryption::S3 => req.server_side_encryption(ServerSideEncryption::Aes256),
                    Encryption::Kms(k) => req.server_side_encryption(ServerSideEncryption::AwsKms).set_ssekms_key_id(k.clone()),
                };
                let out = req.send().await.map_err(|e| unavailable("S3 CreateMultipartUpload", e))?;
                let id = out.upload_id().ok_or_else(|| StorageError::Unavailable("S3 gave no upload id".into()))?.to_owned();
                self.upload_id = Some(id.clone());
                id
            }
        };
        let number = self.parts.len() as i32 + 1;
        let out = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(&upload_id)
            .part_number(number)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| unavailable("S3 UploadPart", e))?;
        self.parts.push(
            CompletedPart::builder()
                .part_number(number)
                .set_e_tag(out.e_tag().map(str::to_owned))
                .set_checksum_crc32(out.checksum_crc32().map(str::to_owned))
                .build(),
        );
        Ok(())
    }
}

#[async_trait]
impl BlobWriter for S3BlobWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<()> {
        self.written += chunk.len() as u64;
        self.buffer.extend_from_slice(&chunk);
        while self.buffer.len() >= PART_SIZE {
            let part = self.buffer.split_to(PART_SIZE).freeze();
            self.upload_part(part).await?;
        }
        Ok(())
    }

    async fn commit(mut self: Box<Self>) -> Result<()> {
        let rest = std::mem::take(&mut self.buffer).freeze();
        if self.upload_id.is_none() {
            // Smaller than one part: a single PutObject.
            let store = S3BlobStore::new(self.client.clone(), &self.bucket, self.encryption.clone());
            return store.put_small(&self.key, rest).await;
        }
        if !rest.is_empty() {
            self.upload_part(rest).await?;
        }
        let upload_id = self.upload_id.clone().unwrap_or_default();
        let completed = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(&upload_id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(std::mem::take(&mut self.parts))).build())
            .send()
            .await;
        self.upload_id = None;
        match completed {
            Ok(_) => Ok(()),
            // A 200 whose XML the SDK cannot read (some S3 emulators name the
            // root element differently): S3 completed the upload when it
            // answered 200, so confirm the object is there, whole.
            Err(SdkError::ServiceError(e)) if e.raw().status().as_u16() == 200 && e.err().code().is_none() => {
                let out = self
                    .client
                    .head_object()
                    .bucket(&self.bucket)
                    .key(&self.key)
                    .send()
                    .await
                    .map_err(|e| unavailable("S3 HeadObject", e))?;
                match out.content_length() {
                    Some(len) if len as u64 == self.written => Ok(()),
                    other => {
                        Err(StorageError::Unavailable(format!("S3 completed {} with {other:?} bytes, {} written", self.key, self.written)))
                    }
                }
            }
            Err(e) => Err(unavailable("S3 CompleteMultipartUpload", e)),
        }
    }

    async fn abort(mut self: Box<Self>) -> Result<()> {
        if let Some(id) = self.upload_id.take() {
            self.client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&self.key)
                .upload_id(id)
                .send()
                .await
                .map_err(|e| unavailable("S3 AbortMultipartUpload", e))?;
        }
        Ok(())
    }
}

impl Drop for S3BlobWriter {
    fn drop(&mut self) {
        // A writer dropped mid-upload (a cancelled task): abort in the
        // background; the bucket's lifecycle rule catches what this misses.
        if let Some(id) = self.upload_id.take() {
            let (client, bucket, key) = (self.client.clone(), self.bucket.clone(), self.key.clone());
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = client.abort_multipart_upload().bucket(bucket).key(key).upload_id(id).send().await;
                });
            }
        }
    }
}

// ---------------------------------------------------------------------------
// DynamoDB index
// ---------------------------------------------------------------------------

pub struct DynamoIndex {
    client: aws_sdk_dynamodb::Client,
    table: String,
    /// Where manifests too large for an item go.
    large: S3BlobStore,
}

type Item = HashMap<String, AttributeValue>;

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}
fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}
fn get_s<'a>(item: &'a Item, k: &str) -> Option<&'a str> {
    item.get(k).and_then(|v| v.as_s().ok()).map(String::as_str)
}
fn get_n(item: &Item, k: &str) -> Option<i64> {
    item.get(k).and_then(|v| v.as_n().ok()).and_then(|v| v.parse().ok())
}

fn repo_pk(repo: &str) -> String {
    format!("repo#{repo}")
}
fn blob_pk(d: &Digest) -> String {
    format!("blob#{d}")
}
fn manifest_pk(d: &Digest) -> String {
    format!("manifest#{d}")
}
fn tag_sk(tag: &str, variant: &str) -> String {
    format!("tag#{tag}#{variant}")
}

fn parse_digest(v: Option<&str>) -> Result<Digest> {
    Digest::parse(v.unwrap_or("")).map_err(|e| StorageError::Index(format!("bad digest in index: {e}")))
}

impl DynamoIndex {
    pub fn new(client: aws_sdk_dynamodb::Client, table: &str, large: S3BlobStore) -> DynamoIndex {
        DynamoIndex { client, table: table.to_owned(), large }
    }

    /// An UpdateItem on a blob's own item.
    fn update_blob(&self, digest: &Digest) -> aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder {
        self.client.update_item().table_name(&self.table).key("pk", s(blob_pk(digest))).key("sk", s("blob"))
    }

    async fn get(&self, pk: String, sk: String) -> Result<Option<Item>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", s(pk))
            .key("sk", s(sk))
            .send()
            .await
            .map_err(|e| unavailable("DynamoDB GetItem", e))?;
        Ok(out.item)
    }

    async fn put(&self, item: Item) -> Result<()> {
        self.client.put_item().table_name(&self.table).set_item(Some(item)).send().await.map_err(|e| unavailable("DynamoDB PutItem", e))?;
        Ok(())
    }

    /// The attributes that carry a manifest's content, inline or by S3 key.
    async fn manifest_attrs(&self, m: &ManifestRecord) -> Result<Item> {
        let mut item = Item::new();
        item.insert("digest".into(), s(m.digest.as_str()));
        item.insert("media_type".into(), s(&m.media_type));
        if m.body.len() < INLINE_MANIFEST_MAX {
            item.insert("body".into(), AttributeValue::B(aws_sdk_dynamodb::primitives::Blob::new(m.body.to_vec())));
        } else {
            let key = manifest_key(&m.digest);
            self.large.put_small(&key, m.body.clone()).await?;
            item.insert("body_key".into(), s(key));
        }
        Ok(item)
    }

    async fn manifest_from(&self, item: &Item) -> Result<ManifestRecord> {
        let digest = parse_digest(get_s(item, "digest"))?;
        let media_type = get_s(item, "media_type").unwrap_or_default().to_owned();
        let body = match (item.get("body").and_then(|b| b.as_b().ok()), get_s(item, "body_key")) {
            (Some(b), _) => Bytes::copy_from_slice(b.as_ref()),
            (None, Some(key)) => self.large.get(key).await?,
            (None, None) => return Err(StorageError::Index(format!("manifest {digest} has no body"))),
        };
        // Never trust a stored body blindly: it must still hash to its name.
        if Digest::of(&body) != digest {
            return Err(StorageError::Index(format!("stored manifest {digest} does not match its digest")));
        }
        Ok(ManifestRecord { digest, media_type, body })
    }

    fn blob_from(item: &Item) -> Result<BlobRecord> {
        let digest = parse_digest(get_s(item, "pk").and_then(|pk| pk.strip_prefix("blob#")))?;
        Ok(BlobRecord {
            digest,
            state: get_s(item, "state").and_then(BlobState::parse).unwrap_or(BlobState::Failed),
            size: get_n(item, "size").map(|v| v as u64),
            source: get_s(item, "source").unwrap_or_default().to_owned(),
            attempts: get_n(item, "attempts").unwrap_or(0) as u32,
            last_error: get_s(item, "last_error").map(str::to_owned),
            updated_at: get_n(item, "updated_at").unwrap_or(0),
            used_at: get_n(item, "used_at").unwrap_or(0),
            lease_until: get_n(item, "lease_until").unwrap_or(0),
        })
    }

    /// Sets `used_at` on a `ready` blob item, and through `via` marks that
    /// repository's link ready (with `size`) in the same transaction. False
    /// when the blob is not ready (GC took it); the link then loses `ready`.
    async fn touch(&self, digest: &Digest, via: Option<&str>, size: Option<u64>) -> Result<bool> {
        let t = now();
        let blob = Update::builder()
            .table_name(&self.table)
            .key("pk", s(blob_pk(digest)))
            .key("sk", s("blob"))
            .update_expression("SET used_at = :now")
            .condition_expression("#s = :ready")
            .expression_attribute_names("#s", "state")
            .expression_attribute_values(":now", n(t))
            .expression_attribute_values(":ready", s("ready"));
        let Some(repo) = via else {
            let b = blob.build().map_err(|e| StorageError::Index(e.to_string()))?;
            let result = self
                .client
                .update_item()
                .table_name(b.table_name)
                .set_key(Some(b.key))
                .update_expression(b.update_expression)
                .set_condition_expression(b.condition_expression)
                .set_expression_attribute_names(b.expression_attribute_names)
                .set_expression_attribute_values(b.expression_attribute_values)
                .send()
                .await;
            return conditional("DynamoDB UpdateItem", result);
        };
        let mut set = "SET #r = :true, used_at = :now, #k = :kind".to_owned();
        let mut link = Update::builder()
            .table_name(&self.table)
            .key("pk", s(repo_pk(repo)))
            .key("sk", s(blob_pk(digest)))
            .expression_attribute_names("#r", "ready")
            .expression_attribute_names("#k", "kind")
            .expression_attribute_values(":true", AttributeValue::Bool(true))
            .expression_attribute_values(":now", n(t))
            .expression_attribute_values(":kind", s("repo_blob"));
        if let Some(size) = size {
            set.push_str(", #z = :size");
            link = link.expression_attribute_names("#z", "size").expression_attribute_values(":size", n(size));
        }
        let build = |u: aws_sdk_dynamodb::types::builders::UpdateBuilder| {
            u.build().map(|u| TransactWriteItem::builder().update(u).build()).map_err(|e| StorageError::Index(e.to_string()))
        };
        let result = self
            .client
            .transact_write_items()
            .transact_items(build(blob)?)
            .transact_items(build(link.update_expression(set))?)
            .send()
            .await;
        let touched = conditional("DynamoDB TransactWriteItems", result)?;
        if !touched {
            let _ = self
                .client
                .update_item()
                .table_name(&self.table)
                .key("pk", s(repo_pk(repo)))
                .key("sk", s(blob_pk(digest)))
                .update_expression("REMOVE #r")
                .condition_expression("attribute_exists(pk)")
                .expression_attribute_names("#r", "ready")
                .send()
                .await;
        }
        Ok(touched)
    }

    /// Reads one scanned item as a sweep entry (None: not an entry kind).
    async fn entry_from(&self, item: &Item) -> Result<Option<Entry>> {
        let pk = get_s(item, "pk").unwrap_or_default();
        let sk = get_s(item, "sk").unwrap_or_default();
        let repo = || pk.strip_prefix("repo#").unwrap_or_default().to_owned();
        Ok(Some(match get_s(item, "kind").unwrap_or_default() {
            "tag" => {
                let Some((tag, variant)) = sk.strip_prefix("tag#").and_then(|r| r.split_once('#')) else { return Ok(None) };
                Entry::Tag(TagRecord {
                    repo: repo(),
                    tag: tag.to_owned(),
                    variant: variant.to_owned(),
                    digest: parse_digest(get_s(item, "digest"))?,
                    media_type: get_s(item, "media_type").unwrap_or_default().to_owned(),
                    checked_at: get_n(item, "checked_at").unwrap_or(0),
                    pulled_at: get_n(item, "last_pulled").unwrap_or(0),
                })
            }
            "repo_manifest" => Entry::ManifestLink {
                repo: repo(),
                digest: parse_digest(sk.strip_prefix("manifest#"))?,
                pulled_at: get_n(item, "last_pulled").unwrap_or(0),
            },
            "manifest" => Entry::Manifest { record: self.manifest_from(item).await?, created_at: get_n(item, "created_at").unwrap_or(0) },
            "blob" => Entry::Blob(Self::blob_from(item)?),
            "repo_blob" => Entry::BlobLink { repo: repo(), digest: parse_digest(sk.strip_prefix("blob#"))? },
            _ => return Ok(None),
        }))
    }

    /// Creates the table (key schema, stream, TTL) when it does not exist.
    pub async fn create_table(&self) -> Result<bool> {
        let attr = |name: &str| {
            AttributeDefinition::builder()
                .attribute_name(name)
                .attribute_type(ScalarAttributeType::S)
                .build()
                .expect("complete attribute definition")
        };
        let key =
            |name: &str, t: KeyType| KeySchemaElement::builder().attribute_name(name).key_type(t).build().expect("complete key element");
        let created = self
            .client
            .create_table()
            .table_name(&self.table)
            .attribute_definitions(attr("pk"))
            .attribute_definitions(attr("sk"))
            .key_schema(key("pk", KeyType::Hash))
            .key_schema(key("sk", KeyType::Range))
            .billing_mode(BillingMode::PayPerRequest)
            .stream_specification(
                StreamSpecification::builder()
                    .stream_enabled(true)
                    .stream_view_type(StreamViewType::NewImage)
                    .build()
                    .expect("complete stream spec"),
            )
            .send()
            .await;
        let created = match created {
            Ok(_) => true,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_resource_in_use_exception()) => false,
            Err(e) => return Err(unavailable("DynamoDB CreateTable", e)),
        };
        if created {
            let ttl = TimeToLiveSpecification::builder().enabled(true).attribute_name(TTL_ATTRIBUTE).build().expect("complete TTL spec");
            self.client
                .update_time_to_live()
                .table_name(&self.table)
                .time_to_live_specification(ttl)
                .send()
                .await
                .map_err(|e| unavailable("DynamoDB UpdateTimeToLive", e))?;
        }
        Ok(created)
    }
}

/// Creates the bucket when it does not exist. True when it was created.
pub async fn create_bucket(client: &aws_sdk_s3::Client, bucket: &str, region: Option<&str>) -> Result<bool> {
    let mut req = client.create_bucket().bucket(bucket);
    if let Some(region) = region.filter(|r| *r != "us-east-1") {
        req = req.create_bucket_configuration(
            aws_sdk_s3::types::CreateBucketConfiguration::builder()
                .location_constraint(aws_sdk_s3::types::BucketLocationConstraint::from(region))
                .build(),
        );
    }
    match req.send().await {
        Ok(_) => Ok(true),
        Err(e) if e.as_service_error().is_some_and(|s| s.is_bucket_already_owned_by_you() || s.is_bucket_already_exists()) => Ok(false),
        Err(e) => Err(unavailable("S3 CreateBucket", e)),
    }
}

#[async_trait]
impl Index for DynamoIndex {
    async fn tag(&self, repo: &str, tag: &str, variant: &str) -> Result<Option<TagRecord>> {
        Ok(self.tag_manifest(repo, tag, variant).await?.map(|(t, _)| t))
    }

    async fn tag_manifest(&self, repo: &str, tag: &str, variant: &str) -> Result<Option<(TagRecord, Option<ManifestRecord>)>> {
        let Some(item) = self.get(repo_pk(repo), tag_sk(tag, variant)).await? else { return Ok(None) };
        let record = TagRecord {
            repo: repo.to_owned(),
            tag: tag.to_owned(),
            variant: variant.to_owned(),
            digest: parse_digest(get_s(&item, "digest"))?,
            media_type: get_s(&item, "media_type").unwrap_or_default().to_owned(),
            checked_at: get_n(&item, "checked_at").unwrap_or(0),
            pulled_at: get_n(&item, "last_pulled").unwrap_or(0),
        };
        let manifest = self.manifest_from(&item).await.ok();
        Ok(Some((record, manifest)))
    }

    async fn put_tag(&self, t: &TagRecord, manifest: &ManifestRecord) -> Result<()> {
        let mut item = self.manifest_attrs(manifest).await?;
        item.insert("pk".into(), s(repo_pk(&t.repo)));
        item.insert("sk".into(), s(tag_sk(&t.tag, &t.variant)));
        item.insert("kind".into(), s("tag"));
        item.insert("checked_at".into(), n(t.checked_at));
        item.insert("last_pulled".into(), n(now()));
        self.put(item).await
    }

    async fn touch_tag(&self, repo: &str, tag: &str, variant: &str, checked_at: i64) -> Result<()> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(repo_pk(repo)))
            .key("sk", s(tag_sk(tag, variant)))
            .update_expression("SET checked_at = :c")
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_values(":c", n(checked_at))
            .send()
            .await;
        // Not made when the tag was deleted meanwhile: nothing to touch.
        conditional("DynamoDB UpdateItem", result).map(|_| ())
    }

    async fn delete_tag(&self, repo: &str, tag: &str, variant: &str) -> Result<()> {
        self.client
            .delete_item()
            .table_name(&self.table)
            .key("pk", s(repo_pk(repo)))
            .key("sk", s(tag_sk(tag, variant)))
            .send()
            .await
            .map_err(|e| unavailable("DynamoDB DeleteItem", e))?;
        Ok(())
    }

    async fn manifest(&self, repo: &str, digest: &Digest) -> Result<Linked<ManifestRecord>> {
        if let Some(item) = self.get(repo_pk(repo), manifest_pk(digest)).await? {
            let pulled_at = get_n(&item, "last_pulled").unwrap_or(0);
            return Ok(Linked { linked: true, record: Some(self.manifest_from(&item).await?), pulled_at });
        }
        match self.get(manifest_pk(digest), "manifest".into()).await? {
            Some(item) => Ok(Linked { linked: false, record: Some(self.manifest_from(&item).await?), pulled_at: 0 }),
            None => Ok(Linked { linked: false, record: None, pulled_at: 0 }),
        }
    }

    async fn put_manifest(&self, repo: &str, m: &ManifestRecord, blobs: &[Digest]) -> Result<Vec<Digest>> {
        // Blobs first (links, then the conditional pending writes that
        // enqueue them), the manifest last: a crash part-way never leaves a
        // manifest whose blobs are unknown.
        let mut pending = Vec::new();
        for b in blobs {
            self.link(repo, b).await?;
            if self.create_pending_blob(b, repo, None).await? {
                pending.push(b.clone());
            } else {
                // Known already: referenced now, so GC's grace starts over.
                self.touch(b, None, None).await?;
            }
        }
        let attrs = self.manifest_attrs(m).await?;
        let mut global = attrs.clone();
        global.insert("pk".into(), s(manifest_pk(&m.digest)));
        global.insert("sk".into(), s("manifest"));
        global.insert("kind".into(), s("manifest"));
        global.insert("created_at".into(), n(now()));
        // What it references, for lifecycle sweeps.
        global.insert("blobs".into(), AttributeValue::L(blobs.iter().map(|b| s(b.as_str())).collect()));
        self.put(global).await?;
        let mut link = attrs;
        link.insert("pk".into(), s(repo_pk(repo)));
        link.insert("sk".into(), s(manifest_pk(&m.digest)));
        link.insert("kind".into(), s("repo_manifest"));
        link.insert("last_pulled".into(), n(now()));
        self.put(link).await?;
        Ok(pending)
    }

    async fn link(&self, repo: &str, digest: &Digest) -> Result<()> {
        self.client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(repo_pk(repo)))
            .key("sk", s(blob_pk(digest)))
            .update_expression("SET #k = :k, linked_at = if_not_exists(linked_at, :t)")
            .expression_attribute_names("#k", "kind")
            .expression_attribute_values(":k", s("repo_blob"))
            .expression_attribute_values(":t", n(now()))
            .send()
            .await
            .map_err(|e| unavailable("DynamoDB UpdateItem", e))?;
        Ok(())
    }

    async fn blob(&self, repo: &str, digest: &Digest) -> Result<Linked<BlobRecord>> {
        let link = self.get(repo_pk(repo), blob_pk(digest)).await?;
        if let Some(l) = &link
            && l.get("ready").and_then(|r| r.as_bool().ok()).copied() == Some(true)
        {
            // Ready is final for a digest: the link alone answers a hit.
            return Ok(Linked {
                linked: true,
                record: Some(BlobRecord {
                    digest: digest.clone(),
                    state: BlobState::Ready,
                    size: get_n(l, "size").map(|v| v as u64),
                    source: String::new(),
                    attempts: 0,
                    last_error: None,
                    updated_at: 0,
                    used_at: get_n(l, "used_at").unwrap_or(0),
                    lease_until: 0,
                }),
                pulled_at: 0,
            });
        }
        let mut record = match self.get(blob_pk(digest), "blob".into()).await? {
            Some(item) => Some(Self::blob_from(&item)?),
            None => None,
        };
        if let (Some(_), Some(r)) = (&link, &mut record)
            && r.state == BlobState::Ready
        {
            // Remember readiness on the link, so the next hit is one read:
            // only together with the blob item still being ready.
            if self.touch(digest, Some(repo), r.size).await? {
                r.used_at = now();
            } else {
                r.state = BlobState::Deleting;
            }
        }
        Ok(Linked { linked: link.is_some(), record, pulled_at: 0 })
    }

    async fn create_pending_blob(&self, digest: &Digest, source: &str, size: Option<u64>) -> Result<bool> {
        let mut item = Item::new();
        item.insert("pk".into(), s(blob_pk(digest)));
        item.insert("sk".into(), s("blob"));
        item.insert("kind".into(), s("blob"));
        item.insert("state".into(), s("pending"));
        item.insert("source".into(), s(source));
        item.insert("attempts".into(), n(0));
        item.insert("updated_at".into(), n(now()));
        if let Some(size) = size {
            item.insert("size".into(), n(size));
        }
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(pk) OR #s = :failed OR (#s = :deleting AND lease_until < :now)")
            .expression_attribute_names("#s", "state")
            .expression_attribute_values(":failed", s("failed"))
            .expression_attribute_values(":deleting", s("deleting"))
            .expression_attribute_values(":now", n(now()))
            .send()
            .await;
        conditional("DynamoDB PutItem", result)
    }

    async fn claim_blob(&self, digest: &Digest, lease: Duration) -> Result<bool> {
        let t = now();
        let result = self
            .update_blob(digest)
            .update_expression("SET #s = :fetching, lease_until = :until, updated_at = :now ADD attempts :one")
            .condition_expression("attribute_exists(pk) AND (#s IN (:pending, :failed) OR (#s = :fetching AND lease_until < :now))")
            .expression_attribute_names("#s", "state")
            .expression_attribute_values(":fetching", s("fetching"))
            .expression_attribute_values(":pending", s("pending"))
            .expression_attribute_values(":failed", s("failed"))
            .expression_attribute_values(":until", n(t + lease.as_secs() as i64))
            .expression_attribute_values(":now", n(t))
            .expression_attribute_values(":one", n(1))
            .send()
            .await;
        conditional("DynamoDB UpdateItem", result)
    }

    async fn requeue_stale_blob(&self, digest: &Digest, stale: Duration) -> Result<bool> {
        let t = now();
        // A MODIFY that leaves the item pending passes the stream filter: the
        // fetcher runs again.
        let result = self
            .update_blob(digest)
            .update_expression("SET #s = :pending, updated_at = :now REMOVE lease_until")
            .condition_expression("(#s = :pending AND updated_at < :cutoff) OR (#s = :fetching AND lease_until < :now)")
            .expression_attribute_names("#s", "state")
            .expression_attribute_values(":pending", s("pending"))
            .expression_attribute_values(":fetching", s("fetching"))
            .expression_attribute_values(":now", n(t))
            .expression_attribute_values(":cutoff", n(t - stale.as_secs() as i64))
            .send()
            .await;
        conditional("DynamoDB UpdateItem", result)
    }

    async fn set_blob_state(&self, digest: &Digest, state: BlobState, size: Option<u64>, error: Option<&str>) -> Result<()> {
        let mut set = vec!["#s = :state", "updated_at = :now"];
        if state == BlobState::Ready {
            set.push("used_at = :now");
        }
        // Never over a GC delete in progress (its bytes are going), and
        // never creating an item GC removed.
        let mut req = self
            .update_blob(digest)
            .condition_expression("attribute_exists(pk) AND #s <> :deleting")
            .expression_attribute_names("#s", "state")
            .expression_attribute_values(":deleting", s("deleting"))
            .expression_attribute_values(":state", s(state.as_str()))
            .expression_attribute_values(":now", n(now()));
        if let Some(size) = size {
            set.push("#z = :size");
            req = req.expression_attribute_names("#z", "size");
            req = req.expression_attribute_values(":size", n(size));
        }
        let mut expr = format!("SET {}", set.join(", "));
        match error {
            Some(e) => {
                expr.push_str(", last_error = :err");
                req = req.expression_attribute_values(":err", s(e.chars().take(1000).collect::<String>()));
            }
            None => expr.push_str(" REMOVE last_error, lease_until"),
        }
        conditional("DynamoDB UpdateItem", req.update_expression(expr).send().await)?;
        Ok(())
    }

    async fn unfinished_blobs(&self) -> Result<Vec<BlobRecord>> {
        let mut out = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let page = self
                .client
                .scan()
                .table_name(&self.table)
                .filter_expression("#k = :k AND #s IN (:p, :f)")
                .expression_attribute_names("#s", "state")
                .expression_attribute_names("#k", "kind")
                .expression_attribute_values(":k", s("blob"))
                .expression_attribute_values(":p", s("pending"))
                .expression_attribute_values(":f", s("fetching"))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| unavailable("DynamoDB Scan", e))?;
            for item in page.items() {
                out.push(Self::blob_from(item)?);
            }
            match page.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => return Ok(out),
            }
        }
    }

    async fn tag_pulled(&self, repo: &str, tag: &str, variant: &str) -> Result<()> {
        self.pulled(repo_pk(repo), tag_sk(tag, variant)).await.map(|_| ())
    }

    async fn manifest_pulled(&self, repo: &str, digest: &Digest) -> Result<bool> {
        self.pulled(repo_pk(repo), manifest_pk(digest)).await
    }

    async fn touch_blob(&self, digest: &Digest, via: Option<&str>) -> Result<bool> {
        self.touch(digest, via, None).await
    }

    async fn scan(&self, cursor: Option<String>) -> Result<ScanPage> {
        let start = match cursor {
            Some(c) => {
                let (pk, sk) = c.split_once('\n').ok_or_else(|| StorageError::Index("bad sweep cursor".into()))?;
                Some(Item::from([("pk".to_owned(), s(pk)), ("sk".to_owned(), s(sk))]))
            }
            None => None,
        };
        let page = self
            .client
            .scan()
            .table_name(&self.table)
            .limit(SCAN_PAGE)
            .set_exclusive_start_key(start)
            .send()
            .await
            .map_err(|e| unavailable("DynamoDB Scan", e))?;
        let mut entries = Vec::with_capacity(page.items().len());
        for item in page.items() {
            if let Some(e) = self.entry_from(item).await? {
                entries.push(e);
            }
        }
        let next = page
            .last_evaluated_key
            .filter(|k| !k.is_empty())
            .map(|k| format!("{}\n{}", get_s(&k, "pk").unwrap_or_default(), get_s(&k, "sk").unwrap_or_default()));
        Ok(ScanPage { entries, next })
    }

    async fn expire_tag(&self, repo: &str, tag: &str, variant: &str, digest: &Digest, pulled_before: i64) -> Result<bool> {
        let result = self
            .client
            .delete_item()
            .table_name(&self.table)
            .key("pk", s(repo_pk(repo)))
            .key("sk", s(tag_sk(tag, variant)))
            .condition_expression("digest = :d AND (attribute_not_exists(last_pulled) OR last_pulled < :before)")
            .expression_attribute_values(":d", s(digest.as_str()))
            .expression_attribute_values(":before", n(pulled_before))
            .send()
            .await;
        conditional("DynamoDB DeleteItem", result)
    }

    async fn expire_manifest_link(&self, repo: &str, digest: &Digest, pulled_before: i64) -> Result<bool> {
        let result = self
            .client
            .delete_item()
            .table_name(&self.table)
            .key("pk", s(repo_pk(repo)))
            .key("sk", s(manifest_pk(digest)))
            .condition_expression("attribute_not_exists(last_pulled) OR last_pulled < :before")
            .expression_attribute_values(":before", n(pulled_before))
            .send()
            .await;
        conditional("DynamoDB DeleteItem", result)
    }

    async fn delete_manifest(&self, digest: &Digest) -> Result<bool> {
        let out = self
            .client
            .delete_item()
            .table_name(&self.table)
            .key("pk", s(manifest_pk(digest)))
            .key("sk", s("manifest"))
            .return_values(aws_sdk_dynamodb::types::ReturnValue::AllOld)
            .send()
            .await
            .map_err(|e| unavailable("DynamoDB DeleteItem", e))?;
        // A large manifest's S3 body stays: tag and repository copies of the
        // item point at the same object, and one may be new.
        Ok(out.attributes.is_some_and(|a| !a.is_empty()))
    }

    async fn begin_blob_delete(&self, digest: &Digest, used_before: i64, lease: Duration) -> Result<bool> {
        let t = now();
        let result = self
            .update_blob(digest)
            .update_expression("SET #s = :deleting, lease_until = :until, updated_at = :now")
            .condition_expression(
                "(#s IN (:ready, :failed) AND (used_at < :before OR (attribute_not_exists(used_at) AND updated_at < :before))) \
                 OR (#s = :deleting AND lease_until < :now)",
            )
            .expression_attribute_names("#s", "state")
            .expression_attribute_values(":deleting", s("deleting"))
            .expression_attribute_values(":ready", s("ready"))
            .expression_attribute_values(":failed", s("failed"))
            .expression_attribute_values(":before", n(used_before))
            .expression_attribute_values(":until", n(t + lease.as_secs() as i64))
            .expression_attribute_values(":now", n(t))
            .send()
            .await;
        conditional("DynamoDB UpdateItem", result)
    }

    async fn finish_blob_delete(&self, digest: &Digest, repos: &[String]) -> Result<()> {
        let result = self
            .client
            .delete_item()
            .table_name(&self.table)
            .key("pk", s(blob_pk(digest)))
            .key("sk", s("blob"))
            .condition_expression("#s = :deleting")
            .expression_attribute_names("#s", "state")
            .expression_attribute_values(":deleting", s("deleting"))
            .send()
            .await;
        if !conditional("DynamoDB DeleteItem", result)? {
            return Ok(());
        }
        for repo in repos {
            self.client
                .delete_item()
                .table_name(&self.table)
                .key("pk", s(repo_pk(repo)))
                .key("sk", s(blob_pk(digest)))
                .send()
                .await
                .map_err(|e| unavailable("DynamoDB DeleteItem", e))?;
        }
        Ok(())
    }

    async fn add_stats(&self, delta: &StoredStats) -> Result<()> {
        let mut req = self.client.update_item().table_name(&self.table).key("pk", s("stats")).key("sk", s("stats"));
        let mut add = Vec::new();
        for (i, (k, v)) in delta.counters.iter().enumerate().filter(|(_, (_, v))| **v > 0) {
            add.push(format!("#c{i} :c{i}"));
            req = req.expression_attribute_names(format!("#c{i}"), format!("n_{k}")).expression_attribute_values(format!(":c{i}"), n(v));
        }
        let mut expr = "SET #k = :kind".to_owned();
        req = req.expression_attribute_names("#k", "kind").expression_attribute_values(":kind", s("stats"));
        if let Some((remaining, at)) = delta.ratelimit_remaining {
            expr.push_str(", ratelimit_remaining = :rr, ratelimit_at = :ra");
            req = req.expression_attribute_values(":rr", n(remaining)).expression_attribute_values(":ra", n(at));
        }
        if !add.is_empty() {
            expr.push_str(&format!(" ADD {}", add.join(", ")));
        }
        req.update_expression(expr).send().await.map_err(|e| unavailable("DynamoDB UpdateItem", e))?;
        Ok(())
    }

    async fn stats(&self) -> Result<StoredStats> {
        let item = self.get("stats".into(), "stats".into()).await?.unwrap_or_default();
        let mut out = StoredStats::default();
        for (k, _) in item.iter() {
            if let Some(name) = k.strip_prefix("n_") {
                out.counters.insert(name.to_owned(), get_n(&item, k).unwrap_or(0).max(0) as u64);
            }
        }
        out.ratelimit_remaining = get_n(&item, "ratelimit_remaining").zip(get_n(&item, "ratelimit_at"));
        Ok(out)
    }
}

impl DynamoIndex {
    /// Sets `last_pulled` on an item that still exists.
    async fn pulled(&self, pk: String, sk: String) -> Result<bool> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(pk))
            .key("sk", s(sk))
            .update_expression("SET last_pulled = :t")
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_values(":t", n(now()))
            .send()
            .await;
        conditional("DynamoDB UpdateItem", result)
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

async fn sdk_config(cfg: &AwsStorage) -> aws_config::SdkConfig {
    match &cfg.sdk {
        Some(sdk) => sdk.clone(),
        None => aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await,
    }
}

/// The two backends. S3 uses path-style addressing whenever an endpoint is
/// overridden (emulators).
pub async fn connect(cfg: &AwsStorage) -> (S3BlobStore, DynamoIndex) {
    let sdk = sdk_config(cfg).await;
    let (s3, ddb) = clients(&sdk);
    let store = S3BlobStore::new(s3.clone(), &cfg.bucket, cfg.encryption.clone()).signing_with(&sdk);
    let index = DynamoIndex::new(ddb, &cfg.table, S3BlobStore::new(s3, &cfg.bucket, cfg.encryption.clone()));
    (store, index)
}

pub fn clients(sdk: &aws_config::SdkConfig) -> (aws_sdk_s3::Client, aws_sdk_dynamodb::Client) {
    let overridden = sdk.endpoint_url().is_some() || std::env::var_os("AWS_ENDPOINT_URL_S3").is_some();
    let s3 = aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(sdk).force_path_style(overridden).build());
    (s3, aws_sdk_dynamodb::Client::new(sdk))
}

/// `hubcap aws-setup`: creates the bucket and the table (stream, TTL) with
/// the schema `template.yaml` declares. Running it twice is harmless.
pub async fn setup(cfg: &AwsStorage) -> Result<(bool, bool)> {
    let sdk = sdk_config(cfg).await;
    let region = sdk.region().map(|r| r.to_string());
    let (s3, ddb) = clients(&sdk);
    let bucket = create_bucket(&s3, &cfg.bucket, region.as_deref()).await?;
    let index = DynamoIndex::new(ddb, &cfg.table, S3BlobStore::new(s3, &cfg.bucket, cfg.encryption.clone()));
    let table = index.create_table().await?;
    Ok((bucket, table))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    #[test]
    fn a_url_lives_no_longer_than_its_signing_credentials() {
        let now = SystemTime::now();
        let ttl = Duration::from_secs(900);
        assert_eq!(url_lifetime(ttl, now, None), ttl, "static keys: as configured");
        assert_eq!(url_lifetime(ttl, now, Some(now + Duration::from_secs(3600))), ttl);
        assert_eq!(url_lifetime(ttl, now, Some(now + Duration::from_secs(300))), Duration::from_secs(300));
        assert_eq!(url_lifetime(ttl, now, Some(now - Duration::from_secs(5))), Duration::from_secs(1), "never zero");
    }

    /// The presigned URL states the shorter lifetime (signed locally: no
    /// request leaves the process).
    #[tokio::test]
    async fn presigned_urls_are_cut_to_session_credentials() {
        let expires = SystemTime::now() + Duration::from_secs(300);
        let creds = aws_sdk_s3::config::Credentials::new("AKID", "secret", Some("session".into()), Some(expires), "session");
        let sdk = aws_config::SdkConfig::builder()
            .behavior_version(aws_config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .credentials_provider(aws_credential_types::provider::SharedCredentialsProvider::new(creds))
            .endpoint_url("http://127.0.0.1:9")
            .build();
        let (s3, _) = clients(&sdk);
        let store = S3BlobStore::new(s3, "b", Encryption::BucketDefault).signing_with(&sdk);
        let digest = Digest::parse(&format!("sha256:{}", "a".repeat(64))).unwrap();
        let url = store.presigned_get(&digest, Duration::from_secs(900)).await.unwrap();
        let stated: u64 = url.split("X-Amz-Expires=").nth(1).unwrap().split('&').next().unwrap().parse().unwrap();
        assert!((295..=300).contains(&stated), "{url}");
    }
}
