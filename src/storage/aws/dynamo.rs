//! The `Index` on one DynamoDB table: conditional writes for every state
//! change, transactions where two items must agree.

use super::items::*;
use super::*;

pub struct DynamoIndex {
    pub(super) client: aws_sdk_dynamodb::Client,
    pub(super) table: String,
    /// Where manifests too large for an item go.
    pub(super) large: S3BlobStore,
}

#[async_trait]
impl ServeIndex for DynamoIndex {
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

    async fn put_manifest(&self, repo: &str, m: &ManifestRecord, blobs: &[Descriptor]) -> Result<Vec<Digest>> {
        // Blobs first (links, then the conditional pending writes that
        // enqueue them), the manifest last: a crash part-way never leaves a
        // manifest whose blobs are unknown.
        let mut pending = Vec::new();
        for Descriptor { digest: b, size } in blobs {
            self.link(repo, b).await?;
            if self.create_pending_blob(b, repo, *size).await? {
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
        global.insert("blobs".into(), AttributeValue::L(blobs.iter().map(|b| s(b.digest.as_str())).collect()));
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
            .update_expression("SET #k = :k")
            .expression_attribute_names("#k", "kind")
            .expression_attribute_values(":k", s("repo_blob"))
            .send()
            .await
            .map_err(|e| unavailable("DynamoDB UpdateItem", e))?;
        Ok(())
    }

    async fn blob_record(&self, digest: &Digest) -> Result<Option<BlobRecord>> {
        self.get(blob_pk(digest), "blob".into()).await?.as_ref().map(Self::blob_from).transpose()
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
                    checkpoint: None,
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

    async fn tag_pulled(&self, repo: &str, tag: &str, variant: &str) -> Result<()> {
        self.pulled(repo_pk(repo), tag_sk(tag, variant)).await.map(|_| ())
    }

    async fn manifest_pulled(&self, repo: &str, digest: &Digest) -> Result<bool> {
        self.pulled(repo_pk(repo), manifest_pk(digest)).await
    }

    async fn touch_blob(&self, digest: &Digest, via: Option<&str>) -> Result<bool> {
        self.touch(digest, via, None).await
    }
}

#[async_trait]
impl FetchIndex for DynamoIndex {
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
        let token = write_token();
        item.insert(WRITER.into(), s(&token));
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
            .return_values_on_condition_check_failure(FOUND_ON_FAILURE)
            .send()
            .await;
        blob_write_made("DynamoDB PutItem", &token, result)
    }

    async fn claim_blob(&self, digest: &Digest, lease: Duration) -> Result<bool> {
        let t = now();
        let token = write_token();
        let result = self
            .update_blob(digest)
            .update_expression("SET #s = :fetching, lease_until = :until, updated_at = :now, #w = :w ADD attempts :one")
            .expression_attribute_names("#w", WRITER)
            .expression_attribute_values(":w", s(&token))
            .condition_expression("attribute_exists(pk) AND (#s IN (:pending, :failed) OR (#s = :fetching AND lease_until < :now))")
            .expression_attribute_names("#s", "state")
            .expression_attribute_values(":fetching", s("fetching"))
            .expression_attribute_values(":pending", s("pending"))
            .expression_attribute_values(":failed", s("failed"))
            .expression_attribute_values(":until", n(t + lease.as_secs() as i64))
            .expression_attribute_values(":now", n(t))
            .expression_attribute_values(":one", n(1))
            .return_values_on_condition_check_failure(FOUND_ON_FAILURE)
            .send()
            .await;
        blob_write_made("DynamoDB UpdateItem", &token, result)
    }

    async fn requeue_stale_blob(&self, digest: &Digest, stale: Duration) -> Result<bool> {
        let t = now();
        // A MODIFY that leaves the item pending passes the stream filter: the
        // fetcher runs again.
        let token = write_token();
        let result = self
            .update_blob(digest)
            .update_expression("SET #s = :pending, updated_at = :now, #w = :w REMOVE lease_until")
            .expression_attribute_names("#w", WRITER)
            .expression_attribute_values(":w", s(&token))
            .condition_expression("(#s = :pending AND updated_at < :cutoff) OR (#s = :fetching AND lease_until < :now)")
            .expression_attribute_names("#s", "state")
            .expression_attribute_values(":pending", s("pending"))
            .expression_attribute_values(":fetching", s("fetching"))
            .expression_attribute_values(":now", n(t))
            .expression_attribute_values(":cutoff", n(t - stale.as_secs() as i64))
            .return_values_on_condition_check_failure(FOUND_ON_FAILURE)
            .send()
            .await;
        blob_write_made("DynamoDB UpdateItem", &token, result)
    }

    async fn mark_blob_lost(&self, digest: &Digest, repos: &[String]) -> Result<bool> {
        // A MODIFY to pending passes the stream filter: the fetcher runs.
        // Once the blob item is not ready, no link can be made ready again
        // (`touch` is conditional on it); then the known links forget it.
        // A link made ready between the caller's read and this write keeps
        // its flag until the blob is stored again.
        let token = write_token();
        let result = self
            .update_blob(digest)
            .update_expression("SET #s = :pending, updated_at = :now, last_error = :err, #w = :w REMOVE lease_until")
            .expression_attribute_names("#w", WRITER)
            .expression_attribute_values(":w", s(&token))
            .condition_expression("#s = :ready")
            .expression_attribute_names("#s", "state")
            .expression_attribute_values(":pending", s("pending"))
            .expression_attribute_values(":ready", s("ready"))
            .expression_attribute_values(":now", n(now()))
            .expression_attribute_values(":err", s(crate::storage::LOST))
            .return_values_on_condition_check_failure(FOUND_ON_FAILURE)
            .send()
            .await;
        if !blob_write_made("DynamoDB UpdateItem", &token, result)? {
            return Ok(false);
        }
        for repo in repos {
            self.forget_link_readiness(repo, digest).await?;
        }
        Ok(true)
    }

    async fn blob_checkpoint(&self, digest: &Digest) -> Result<Option<Checkpoint>> {
        let item = self.get(blob_pk(digest), "blob".into()).await?;
        Ok(item.as_ref().and_then(|i| get_s(i, "checkpoint")).and_then(Checkpoint::decode))
    }

    async fn save_checkpoint(&self, digest: &Digest, checkpoint: Option<&Checkpoint>) -> Result<()> {
        // A checkpoint write leaves the item `fetching`: the stream filter
        // lets it by, no fetcher runs for it.
        let result = match checkpoint {
            Some(cp) => {
                self.update_blob(digest)
                    .update_expression("SET checkpoint = :cp")
                    .condition_expression("#s = :fetching")
                    .expression_attribute_names("#s", "state")
                    .expression_attribute_values(":fetching", s("fetching"))
                    .expression_attribute_values(":cp", s(cp.encode()))
                    .send()
                    .await
            }
            None => {
                self.update_blob(digest).update_expression("REMOVE checkpoint").condition_expression("attribute_exists(pk)").send().await
            }
        };
        conditional("DynamoDB UpdateItem", result)?;
        Ok(())
    }

    async fn set_blob_state(&self, digest: &Digest, state: BlobState, size: Option<u64>, error: Option<&str>) -> Result<()> {
        let mut set = vec!["#s = :state", "updated_at = :now"];
        if state == BlobState::Ready {
            set.push("used_at = :now");
        }
        // Never over a GC delete in progress (its bytes are going), never
        // creating an item GC removed, and a ready blob stays ready (a copy
        // beside it that fails, or ends later, changes nothing).
        let condition = match state {
            BlobState::Ready => "attribute_exists(pk) AND #s <> :deleting",
            _ => "attribute_exists(pk) AND #s <> :deleting AND #s <> :ready",
        };
        let mut req = self
            .update_blob(digest)
            .condition_expression(condition)
            .expression_attribute_names("#s", "state")
            .expression_attribute_values(":deleting", s("deleting"))
            .expression_attribute_values(":state", s(state.as_str()))
            .expression_attribute_values(":now", n(now()));
        if state != BlobState::Ready {
            req = req.expression_attribute_values(":ready", s("ready"));
        }
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
        if state == BlobState::Ready {
            expr.push_str(if error.is_none() { ", checkpoint" } else { " REMOVE checkpoint" });
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
}

#[async_trait]
impl SweepIndex for DynamoIndex {
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
            .condition_expression("attribute_exists(pk) AND (attribute_not_exists(last_pulled) OR last_pulled < :before)")
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
        let token = write_token();
        let result = self
            .update_blob(digest)
            .update_expression("SET #s = :deleting, lease_until = :until, updated_at = :now, #w = :w")
            .expression_attribute_names("#w", WRITER)
            .expression_attribute_values(":w", s(&token))
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
            .return_values_on_condition_check_failure(FOUND_ON_FAILURE)
            .send()
            .await;
        blob_write_made("DynamoDB UpdateItem", &token, result)
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
            .return_values_on_condition_check_failure(FOUND_ON_FAILURE)
            .send()
            .await;
        match result {
            Ok(_) => {}
            // The item in another state: everything stays. A delete made
            // whose answer was lost fails its condition when retried and
            // finds no item: its links go too.
            Err(SdkError::ServiceError(e)) if e.err().code() == Some("ConditionalCheckFailedException") => {
                if e.err().found().is_some() {
                    return Ok(());
                }
            }
            Err(e) => return Err(unavailable("DynamoDB DeleteItem", e)),
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
}

#[async_trait]
impl StatsIndex for DynamoIndex {
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
    pub(super) async fn pulled(&self, pk: String, sk: String) -> Result<bool> {
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
