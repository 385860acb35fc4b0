//! The table's item layout: keys (`blob#<digest>`, `repo#<registry/name>`,
//! `tag#<tag>#<variant>`, ...), attribute codecs, and the records the index
//! reads out of items. Only this module knows how an item is spelled.

use super::s3::manifest_key;
use super::*;

pub(super) type Item = HashMap<String, AttributeValue>;

/// A blob left `pending` by a stream record's new image (DynamoDB JSON, as
/// the stream delivers it): its digest, source repository key and declared
/// size. `None` for every other item or state.
pub fn pending_blob(image: &serde_json::Value) -> std::result::Result<Option<(Digest, String, Option<u64>)>, String> {
    let attr = |name: &str, ty: &str| image.get(name).and_then(|v| v.get(ty)).and_then(|v| v.as_str()).map(str::to_owned);
    if attr("sk", "S").as_deref() != Some("blob") || attr("state", "S").as_deref() != Some("pending") {
        return Ok(None);
    }
    let pk = attr("pk", "S").unwrap_or_default();
    let digest = Digest::parse(pk.strip_prefix("blob#").unwrap_or(&pk)).map_err(|e| e.to_string())?;
    let source = attr("source", "S").ok_or("pending blob without source")?;
    let size = attr("size", "N").and_then(|s| s.parse().ok());
    Ok(Some((digest, source, size)))
}

/// The attribute naming the writer of a blob item's last conditional state
/// change (a token of that one call).
pub(super) const WRITER: &str = "writer";

/// A token no other call, here or in another process, draws: 128 bits from
/// the standard library's randomly keyed hasher.
pub(super) fn write_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let draw = || {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(call);
        h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
        h.finish()
    };
    format!("{:016x}{:016x}", draw(), draw())
}

/// What a conditional write on a blob's item asks back when its condition
/// fails: the item as it stood (`ALL_OLD`), carried by the
/// `ConditionalCheckFailedException` at no extra read.
pub(super) const FOUND_ON_FAILURE: ReturnValuesOnConditionCheckFailure = ReturnValuesOnConditionCheckFailure::AllOld;

/// A write's error that may carry the item its failed condition found.
pub(super) trait FoundItem {
    fn found(&self) -> Option<&Item>;
}

macro_rules! found_item {
    ($($error:ty),*) => {$(
        impl FoundItem for $error {
            fn found(&self) -> Option<&Item> {
                match self {
                    Self::ConditionalCheckFailedException(e) => e.item(),
                    _ => None,
                }
            }
        }
    )*};
}
found_item!(
    aws_sdk_dynamodb::operation::put_item::PutItemError,
    aws_sdk_dynamodb::operation::update_item::UpdateItemError,
    aws_sdk_dynamodb::operation::delete_item::DeleteItemError
);

/// The outcome of a conditional write on a blob's item that set `WRITER` to
/// `token` and asked for `FOUND_ON_FAILURE`. A write DynamoDB made whose
/// answer was lost (a connection reset, an attempt timed out) is retried by
/// the SDK, and the retry fails the condition the first attempt changed:
/// the item it found then carries this call's token, and the write was made.
pub(super) fn blob_write_made<O, E, R>(what: &str, token: &str, result: std::result::Result<O, SdkError<E, R>>) -> Result<bool>
where
    E: ProvideErrorMetadata + FoundItem + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match result {
        Ok(_) => Ok(true),
        Err(SdkError::ServiceError(e)) if e.err().code() == Some("ConditionalCheckFailedException") => {
            Ok(e.err().found().and_then(|i| get_s(i, WRITER)) == Some(token))
        }
        Err(e) => Err(unavailable(what, e)),
    }
}

pub(super) fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}
pub(super) fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}
pub(super) fn get_s<'a>(item: &'a Item, k: &str) -> Option<&'a str> {
    item.get(k).and_then(|v| v.as_s().ok()).map(String::as_str)
}
pub(super) fn get_n(item: &Item, k: &str) -> Option<i64> {
    item.get(k).and_then(|v| v.as_n().ok()).and_then(|v| v.parse().ok())
}

pub(super) fn repo_pk(repo: &str) -> String {
    format!("repo#{repo}")
}
pub(super) fn blob_pk(d: &Digest) -> String {
    format!("blob#{d}")
}
pub(super) fn manifest_pk(d: &Digest) -> String {
    format!("manifest#{d}")
}
pub(super) fn tag_sk(tag: &str, variant: &str) -> String {
    format!("tag#{tag}#{variant}")
}

pub(super) fn parse_digest(v: Option<&str>) -> Result<Digest> {
    Digest::parse(v.unwrap_or("")).map_err(|e| StorageError::Index(format!("bad digest in index: {e}")))
}

impl DynamoIndex {
    pub fn new(client: aws_sdk_dynamodb::Client, table: &str, large: S3BlobStore) -> DynamoIndex {
        DynamoIndex { client, table: table.to_owned(), large }
    }

    /// An UpdateItem on a blob's own item.
    pub(super) fn update_blob(&self, digest: &Digest) -> aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder {
        self.client.update_item().table_name(&self.table).key("pk", s(blob_pk(digest))).key("sk", s("blob"))
    }

    pub(super) async fn get(&self, pk: String, sk: String) -> Result<Option<Item>> {
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

    pub(super) async fn put(&self, item: Item) -> Result<()> {
        self.client.put_item().table_name(&self.table).set_item(Some(item)).send().await.map_err(|e| unavailable("DynamoDB PutItem", e))?;
        Ok(())
    }

    /// The attributes that carry a manifest's content, inline or by S3 key.
    pub(super) async fn manifest_attrs(&self, m: &ManifestRecord) -> Result<Item> {
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

    pub(super) async fn manifest_from(&self, item: &Item) -> Result<ManifestRecord> {
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

    pub(super) fn blob_from(item: &Item) -> Result<BlobRecord> {
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
            checkpoint: get_s(item, "checkpoint").and_then(Checkpoint::decode),
        })
    }

    /// Sets `used_at` on a `ready` blob item, and through `via` marks that
    /// repository's link ready (with `size`) in the same transaction. False
    /// when the blob is not ready (GC took it); the link then loses `ready`.
    pub(super) async fn touch(&self, digest: &Digest, via: Option<&str>, size: Option<u64>) -> Result<bool> {
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
            let _ = self.forget_link_readiness(repo, digest).await;
        }
        Ok(touched)
    }

    /// Clears the `ready` copy on `repo`'s link to a blob (if the link
    /// exists), so the next read asks the blob item itself.
    pub(super) async fn forget_link_readiness(&self, repo: &str, digest: &Digest) -> Result<bool> {
        let result = self
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
        conditional("DynamoDB UpdateItem", result)
    }

    /// Reads one scanned item as a sweep entry (None: not an entry kind).
    pub(super) async fn entry_from(&self, item: &Item) -> Result<Option<Entry>> {
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
}
