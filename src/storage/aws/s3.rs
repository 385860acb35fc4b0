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
