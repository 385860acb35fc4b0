//! Blobs in S3: one object per digest (`blobs/sha256/<hex>`), written with a
//! streaming multipart upload completed only after the caller verified the
//! bytes, and handed out as locally presigned URLs.

use super::*;

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

pub(super) fn manifest_key(digest: &Digest) -> String {
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

    pub(super) async fn put_small(&self, key: &str, body: Bytes) -> Result<()> {
        let mut req = self.client.put_object().bucket(&self.bucket).key(key).body(ByteStream::from(body));
        req = match &self.encryption {
            Encryption::BucketDefault => req,
            Encryption::S3 => req.server_side_encryption(ServerSideEncryption::Aes256),
            Encryption::Kms(k) => req.server_side_encryption(ServerSideEncryption::AwsKms).set_ssekms_key_id(k.clone()),
        };
        req.send().await.map_err(|e| unavailable("S3 PutObject", e))?;
        Ok(())
    }

    pub(super) async fn get(&self, key: &str) -> Result<Bytes> {
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

    async fn begin(&self, digest: &Digest, resume: Option<&Checkpoint>) -> Result<Box<dyn BlobWriter>> {
        if let Some(cp) = resume {
            if let Some(w) = self.reopen(digest, cp).await? {
                return Ok(Box::new(w));
            }
            tracing::info!(%digest, offset = cp.offset, "the checkpointed upload is gone or short; copying from the start");
            // Nothing will continue it now.
            let _ = self.discard_upload(&Upload { digest: digest.clone(), id: cp.upload.clone(), started: 0 }).await;
        }
        Ok(Box::new(self.writer(digest)))
    }

    async fn uploads(&self) -> Result<Vec<Upload>> {
        let mut out = Vec::new();
        let (mut key_marker, mut id_marker) = (None::<String>, None::<String>);
        loop {
            let page = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix("blobs/sha256/")
                .set_key_marker(key_marker.clone())
                .set_upload_id_marker(id_marker.clone())
                .send()
                .await
                .map_err(|e| unavailable("S3 ListMultipartUploads", e))?;
            for u in page.uploads() {
                let digest =
                    u.key().and_then(|k| k.strip_prefix("blobs/sha256/")).and_then(|hex| Digest::parse(&format!("sha256:{hex}")).ok());
                if let (Some(digest), Some(id)) = (digest, u.upload_id()) {
                    out.push(Upload { digest, id: id.to_owned(), started: u.initiated().map_or(0, |t| t.secs()) });
                }
            }
            if page.is_truncated() != Some(true) {
                return Ok(out);
            }
            (key_marker, id_marker) = (page.next_key_marker().map(str::to_owned), page.next_upload_id_marker().map(str::to_owned));
            if key_marker.is_none() && id_marker.is_none() {
                return Ok(out);
            }
        }
    }

    async fn discard_upload(&self, upload: &Upload) -> Result<()> {
        let result =
            self.client.abort_multipart_upload().bucket(&self.bucket).key(blob_key(&upload.digest)).upload_id(&upload.id).send().await;
        match result {
            Err(e) if e.as_service_error().is_none_or(|s| s.meta().code() != Some("NoSuchUpload")) => {
                Err(unavailable("S3 AbortMultipartUpload", e))
            }
            _ => Ok(()),
        }
    }

    async fn stored_digests(&self) -> Result<std::collections::HashSet<Digest>> {
        let mut out = std::collections::HashSet::new();
        let mut pages = self.client.list_objects_v2().bucket(&self.bucket).prefix("blobs/sha256/").into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| unavailable("S3 ListObjectsV2", e))?;
            for o in page.contents() {
                if let Some(d) =
                    o.key().and_then(|k| k.strip_prefix("blobs/sha256/")).and_then(|hex| Digest::parse(&format!("sha256:{hex}")).ok())
                {
                    out.insert(d);
                }
            }
        }
        Ok(out)
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

/// Part uploads in flight at once per blob (each holds one part in memory).
const UPLOADS_IN_FLIGHT: usize = 3;

type PartUpload = tokio::task::JoinHandle<Result<CompletedPart>>;

/// A streaming multipart upload: one part buffered, up to
/// `UPLOADS_IN_FLIGHT` uploading at once. Its durable point is the end of
/// the parts completed in sequence from the first.
struct S3BlobWriter {
    client: aws_sdk_s3::Client,
    bucket: String,
    key: String,
    encryption: Encryption,
    buffer: BytesMut,
    upload_id: Option<String>,
    /// Parts completed, by number (1-based).
    done: std::collections::BTreeMap<i32, CompletedPart>,
    /// Parts uploading, in order.
    uploading: std::collections::VecDeque<(i32, PartUpload)>,
    /// Number of the next part to ship.
    next_part: i32,
    start: u64,
    /// Bytes from the blob's start written so far.
    written: u64,
    /// A durable point was reported: a checkpoint may name this upload, so
    /// a dropped writer leaves it for the next copy (GC aborts it once
    /// nothing names it).
    reported: bool,
}

fn part_size() -> u64 {
    PART_SIZE as u64
}

impl S3BlobStore {
    fn writer(&self, digest: &Digest) -> S3BlobWriter {
        S3BlobWriter {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            key: blob_key(digest),
            encryption: self.encryption.clone(),
            buffer: BytesMut::new(),
            upload_id: None,
            done: Default::default(),
            uploading: Default::default(),
            next_part: 1,
            start: 0,
            written: 0,
            reported: false,
        }
    }

    /// Continues upload `cp.upload` at `cp.offset` when S3 still holds its
    /// first `offset / PART_SIZE` parts, each whole (ListParts).
    async fn reopen(&self, digest: &Digest, cp: &Checkpoint) -> Result<Option<S3BlobWriter>> {
        if !cp.offset.is_multiple_of(part_size()) {
            return Ok(None);
        }
        let wanted = (cp.offset / part_size()) as i32;
        let mut w = self.writer(digest);
        let mut pages = self.client.list_parts().bucket(&self.bucket).key(&w.key).upload_id(&cp.upload).into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = match page {
                Ok(p) => p,
                Err(e) if e.as_service_error().is_some_and(|s| s.meta().code() == Some("NoSuchUpload")) => return Ok(None),
                // Unreadable or refused: the copy starts afresh rather than fails.
                Err(e) => {
                    tracing::warn!(%digest, error = %unavailable("S3 ListParts", e), "could not list the checkpointed upload's parts");
                    return Ok(None);
                }
            };
            for p in page.parts() {
                let number = p.part_number().unwrap_or(0);
                if (1..=wanted).contains(&number) && p.size() == Some(PART_SIZE as i64) {
                    w.done.insert(
                        number,
                        CompletedPart::builder()
                            .part_number(number)
                            .set_e_tag(p.e_tag().map(str::to_owned))
                            .set_checksum_crc32(p.checksum_crc32().map(str::to_owned))
                            .build(),
                    );
                }
            }
        }
        if w.done.len() as i32 != wanted {
            return Ok(None);
        }
        w.upload_id = Some(cp.upload.clone());
        w.next_part = wanted + 1;
        (w.start, w.written, w.reported) = (cp.offset, cp.offset, true);
        Ok(Some(w))
    }

    async fn create_upload(&self, key: &str) -> Result<String> {
        let mut req = self.client.create_multipart_upload().bucket(&self.bucket).key(key);
        req = match &self.encryption {
            Encryption::BucketDefault => req,
            Encryption::S3 => req.server_side_encryption(ServerSideEncryption::Aes256),
            Encryption::Kms(k) => req.server_side_encryption(ServerSideEncryption::AwsKms).set_ssekms_key_id(k.clone()),
        };
        let out = req.send().await.map_err(|e| unavailable("S3 CreateMultipartUpload", e))?;
        Ok(out.upload_id().ok_or_else(|| StorageError::Unavailable("S3 gave no upload id".into()))?.to_owned())
    }
}

impl S3BlobWriter {
    fn store(&self) -> S3BlobStore {
        S3BlobStore::new(self.client.clone(), &self.bucket, self.encryption.clone())
    }

    /// Ships `body` as the next part, waiting first while
    /// `UPLOADS_IN_FLIGHT` are running.
    async fn ship(&mut self, body: Bytes) -> Result<()> {
        let upload_id = match &self.upload_id {
            Some(id) => id.clone(),
            None => {
                let id = self.store().create_upload(&self.key).await?;
                self.upload_id = Some(id.clone());
                id
            }
        };
        while self.uploading.len() >= UPLOADS_IN_FLIGHT {
            self.settle_oldest().await?;
        }
        let number = self.next_part;
        self.next_part += 1;
        let (client, bucket, key) = (self.client.clone(), self.bucket.clone(), self.key.clone());
        let task = tokio::spawn(async move {
            let out = client
                .upload_part()
                .bucket(bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(number)
                .body(ByteStream::from(body))
                .send()
                .await
                .map_err(|e| unavailable("S3 UploadPart", e))?;
            Ok(CompletedPart::builder()
                .part_number(number)
                .set_e_tag(out.e_tag().map(str::to_owned))
                .set_checksum_crc32(out.checksum_crc32().map(str::to_owned))
                .build())
        });
        self.uploading.push_back((number, task));
        Ok(())
    }

    /// Waits for the oldest part upload in flight.
    async fn settle_oldest(&mut self) -> Result<()> {
        if let Some((number, task)) = self.uploading.pop_front() {
            let part = task.await.map_err(|e| StorageError::Unavailable(format!("S3 UploadPart {number}: {e}")))??;
            self.done.insert(number, part);
        }
        Ok(())
    }

    /// Collects the part uploads that have finished, in order.
    fn settle_finished(&mut self) -> Result<()> {
        while self.uploading.front().is_some_and(|(_, t)| t.is_finished()) {
            let (number, task) = self.uploading.pop_front().expect("checked");
            let part = futures_util::FutureExt::now_or_never(task)
                .expect("finished")
                .map_err(|e| StorageError::Unavailable(format!("S3 UploadPart {number}: {e}")))??;
            self.done.insert(number, part);
        }
        Ok(())
    }

    async fn settle_all(&mut self) -> Result<()> {
        while !self.uploading.is_empty() {
            self.settle_oldest().await?;
        }
        Ok(())
    }

    fn durable_point(&mut self) -> Option<Durable> {
        let in_sequence = self.done.keys().zip(1..).take_while(|(n, i)| **n == *i).count() as u64;
        let upload = self.upload_id.clone()?;
        (in_sequence > 0).then(|| {
            self.reported = true;
            Durable { upload, offset: in_sequence * part_size() }
        })
    }
}

#[async_trait]
impl BlobWriter for S3BlobWriter {
    fn offset(&self) -> u64 {
        self.start
    }

    fn part_size(&self) -> u64 {
        part_size()
    }

    async fn write(&mut self, chunk: Bytes) -> Result<()> {
        self.written += chunk.len() as u64;
        let mut rest = &chunk[..];
        while !rest.is_empty() {
            // Each part in an allocation of its own, exactly a part long:
            // a part uploading pins nothing more.
            if self.buffer.capacity() == 0 {
                self.buffer = BytesMut::with_capacity(PART_SIZE);
            }
            let n = (PART_SIZE - self.buffer.len()).min(rest.len());
            self.buffer.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            if self.buffer.len() == PART_SIZE {
                let part = std::mem::take(&mut self.buffer).freeze();
                self.ship(part).await?;
            }
        }
        Ok(())
    }

    fn durable(&mut self) -> Result<Option<Durable>> {
        self.settle_finished()?;
        Ok(self.durable_point())
    }

    async fn commit(mut self: Box<Self>) -> Result<()> {
        let rest = std::mem::take(&mut self.buffer).freeze();
        if self.upload_id.is_none() {
            // Smaller than one part: a single PutObject.
            return self.store().put_small(&self.key, rest).await;
        }
        if !rest.is_empty() {
            self.ship(rest).await?;
        }
        self.settle_all().await?;
        let upload_id = self.upload_id.clone().unwrap_or_default();
        let parts = std::mem::take(&mut self.done).into_values().collect();
        let completed = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(&upload_id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
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
        for (_, task) in self.uploading.drain(..) {
            task.abort();
        }
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

    async fn suspend(mut self: Box<Self>) -> Result<Option<Durable>> {
        // Parts in flight finish (an error just ends the sequence there).
        while let Some((number, task)) = self.uploading.pop_front() {
            match task.await {
                Ok(Ok(part)) => {
                    self.done.insert(number, part);
                }
                _ => break,
            }
        }
        let durable = self.durable_point();
        if durable.is_none() {
            // Nothing a checkpoint could name: the upload goes.
            self.reported = false;
        }
        Ok(durable)
    }
}

impl Drop for S3BlobWriter {
    fn drop(&mut self) {
        for (_, task) in self.uploading.drain(..) {
            task.abort();
        }
        // A writer dropped mid-upload (a cancelled task) whose progress no
        // checkpoint can name: abort in the background; the bucket's
        // lifecycle rule catches what this misses. One a checkpoint may
        // name is kept for the next copy.
        if let Some(id) = self.upload_id.take().filter(|_| !self.reported) {
            let (client, bucket, key) = (self.client.clone(), self.bucket.clone(), self.key.clone());
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = client.abort_multipart_upload().bucket(bucket).key(key).upload_id(id).send().await;
                });
            }
        }
    }
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
        let (s3, _) = clients(&sdk, super::SdkRole::Api);
        let store = S3BlobStore::new(s3, "b", Encryption::BucketDefault).signing_with(&sdk);
        let digest = Digest::parse(&format!("sha256:{}", "a".repeat(64))).unwrap();
        let url = store.presigned_get(&digest, Duration::from_secs(900)).await.unwrap();
        let stated: u64 = url.split("X-Amz-Expires=").nth(1).unwrap().split('&').next().unwrap().parse().unwrap();
        assert!((295..=300).contains(&stated), "{url}");
    }
}
