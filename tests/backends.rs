//! One contract, every backend: the same suite runs against the embedded
//! backend (files + SQLite) and against S3 + DynamoDB on moto_server.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hubcap::oci::Digest;
use hubcap::storage::local::{FsBlobStore, SqliteIndex};
use hubcap::storage::{BlobState, BlobStore, Index, ManifestRecord, TagRecord, aws, now};

fn digest_of(b: &[u8]) -> Digest {
    Digest::of(b)
}

fn manifest(body: Vec<u8>) -> ManifestRecord {
    ManifestRecord { digest: digest_of(&body), media_type: "application/vnd.oci.image.manifest.v1+json".into(), body: Bytes::from(body) }
}

/// Fetches a presigned URL's bytes (absolute, or relative to `base`).
type Fetch = Box<dyn Fn(String) -> futures_util::future::BoxFuture<'static, Option<Bytes>> + Send + Sync>;

async fn contract(index: Arc<dyn Index>, store: Arc<dyn BlobStore>, fetch: Option<Fetch>) {
    let repo = "docker.io/library/suite";
    let other = "docker.io/library/elsewhere";

    // Manifests: stored once, linked per repository; referenced blobs pending once.
    let (b1, b2) = (digest_of(b"config"), digest_of(b"layer"));
    let m = manifest(br#"{"schemaVersion":2}"#.to_vec());
    assert!(!index.manifest(repo, &m.digest).await.unwrap().linked);
    let pending = index.put_manifest(repo, &m, &[b1.clone(), b2.clone()]).await.unwrap();
    assert_eq!(pending, vec![b1.clone(), b2.clone()], "the first store makes its blobs pending");
    assert!(index.put_manifest(other, &m, &[b1.clone(), b2.clone()]).await.unwrap().is_empty(), "only the first wins");
    let found = index.manifest(repo, &m.digest).await.unwrap();
    assert!(found.linked);
    assert_eq!(found.record.unwrap(), m);
    let unlinked = index.manifest("docker.io/x/y", &m.digest).await.unwrap();
    assert!(!unlinked.linked);
    assert_eq!(unlinked.record.unwrap(), m, "known, but not for that repository");

    // A manifest too big for a DynamoDB item round-trips too.
    let big = manifest(format!("{{\"pad\":\"{}\"}}", "x".repeat(400 * 1024)).into_bytes());
    index.put_manifest(repo, &big, &[]).await.unwrap();
    assert_eq!(index.manifest(repo, &big.digest).await.unwrap().record.unwrap(), big);

    // Tags.
    let t = TagRecord {
        repo: repo.into(),
        tag: "1".into(),
        variant: String::new(),
        digest: m.digest.clone(),
        media_type: m.media_type.clone(),
        checked_at: 100,
    };
    index.put_tag(&t, &m).await.unwrap();
    assert_eq!(index.tag(repo, "1", "").await.unwrap().unwrap(), t);
    let (tt, tm) = index.tag_manifest(repo, "1", "").await.unwrap().unwrap();
    assert_eq!((tt, tm.unwrap()), (t.clone(), m.clone()));
    index.touch_tag(repo, "1", "", 200).await.unwrap();
    assert_eq!(index.tag(repo, "1", "").await.unwrap().unwrap().checked_at, 200);
    assert!(index.tag(repo, "1", "narrow").await.unwrap().is_none(), "variants are separate");
    index.delete_tag(repo, "1", "").await.unwrap();
    assert!(index.tag(repo, "1", "").await.unwrap().is_none());
    index.touch_tag(repo, "1", "", 300).await.unwrap(); // touching a deleted tag is harmless
    assert!(index.tag(repo, "1", "").await.unwrap().is_none());

    // Blob states and leases.
    let view = index.blob(repo, &b1).await.unwrap();
    assert!(view.linked);
    assert_eq!(view.record.unwrap().state, BlobState::Pending);
    assert!(!index.create_pending_blob(&b1, repo, None).await.unwrap(), "already pending");
    assert!(index.claim_blob(&b1, Duration::from_secs(600)).await.unwrap());
    assert!(!index.claim_blob(&b1, Duration::from_secs(600)).await.unwrap(), "one fetcher at a time");
    assert!(index.claim_blob(&b1, Duration::ZERO).await.is_ok(), "an expired lease may be taken over");
    index.set_blob_state(&b1, BlobState::Failed, None, Some("boom")).await.unwrap();
    let failed = index.blob(repo, &b1).await.unwrap().record.unwrap();
    assert_eq!((failed.state, failed.last_error.as_deref()), (BlobState::Failed, Some("boom")));
    assert!(index.create_pending_blob(&b1, repo, Some(6)).await.unwrap(), "a failed blob may be retried");
    index.set_blob_state(&b1, BlobState::Ready, Some(6), None).await.unwrap();
    for _ in 0..2 {
        let ready = index.blob(repo, &b1).await.unwrap();
        assert!(ready.linked);
        let r = ready.record.unwrap();
        assert_eq!((r.state, r.size), (BlobState::Ready, Some(6)));
    }
    assert!(!index.blob(other, &digest_of(b"nothing")).await.unwrap().linked);
    let unfinished: Vec<Digest> = index.unfinished_blobs().await.unwrap().into_iter().map(|b| b.digest).collect();
    assert!(unfinished.contains(&b2) && !unfinished.contains(&b1));
    // A pending blob nobody picked up is re-queued once it is stale, not before.
    assert!(!index.requeue_stale_blob(&b2, Duration::from_secs(3600)).await.unwrap(), "fresh: left alone");
    assert!(index.requeue_stale_blob(&b2, Duration::ZERO).await.is_ok());
    assert!(!index.requeue_stale_blob(&b1, Duration::ZERO).await.unwrap(), "a ready blob is never re-queued");
    index.link(other, &b2).await.unwrap();
    assert!(index.blob(other, &b2).await.unwrap().linked);

    // Blob bytes: invisible until committed; multi-part sized blobs too.
    let data = Bytes::from(common::images::noise(20 * 1024 * 1024 + 123, 7));
    let d = digest_of(&data);
    let mut w = store.begin(&d).await.unwrap();
    for chunk in data.chunks(1024 * 1024) {
        w.write(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    assert_eq!(store.size(&d).await.unwrap(), None, "not visible before commit");
    w.commit().await.unwrap();
    assert_eq!(store.size(&d).await.unwrap(), Some(data.len() as u64));
    let small = Bytes::from_static(b"small blob");
    let ds = digest_of(&small);
    let mut w = store.begin(&ds).await.unwrap();
    w.write(small.clone()).await.unwrap();
    w.commit().await.unwrap();
    assert_eq!(store.size(&ds).await.unwrap(), Some(small.len() as u64));
    let aborted = digest_of(b"aborted");
    let mut w = store.begin(&aborted).await.unwrap();
    w.write(Bytes::from(vec![1u8; 9 * 1024 * 1024])).await.unwrap();
    w.abort().await.unwrap();
    assert_eq!(store.size(&aborted).await.unwrap(), None, "an aborted blob leaves nothing");
    if let Some(fetch) = fetch {
        let url = store.presigned_get(&d, Duration::from_secs(60)).await.unwrap();
        assert_eq!(fetch(url).await.unwrap(), data, "the presigned URL serves the bytes");
    }
    store.delete(&ds).await.unwrap();
    assert_eq!(store.size(&ds).await.unwrap(), None);
    assert!(now() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_backend_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let index = Arc::new(SqliteIndex::open(&dir.path().join("index.db")).unwrap());
    let store = Arc::new(FsBlobStore::open(dir.path()).unwrap());
    contract(index, store, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_aws_backend_keeps_the_contract() {
    let moto = common::moto::Moto::start().await;
    let storage = moto.setup("suite-bucket", "suite-table").await;
    let (_, table_created) = aws::setup(&storage).await.unwrap();
    assert!(!table_created, "aws-setup run twice is harmless");
    let (store, index) = aws::connect(&storage).await;
    let fetch: Fetch = Box::new(|url: String| {
        Box::pin(async move {
            let resp = reqwest::get(&url).await.ok()?;
            resp.status().is_success().then_some(())?;
            resp.bytes().await.ok()
        })
    });
    contract(Arc::new(index), Arc::new(store), Some(fetch)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_objects_are_encrypted_as_configured() {
    let moto = common::moto::Moto::start().await;
    let mut storage = moto.setup("sse-bucket", "sse-table").await;
    storage.encryption = aws::Encryption::S3;
    let (store, _) = aws::connect(&storage).await;
    let (s3, _) = aws::clients(storage.sdk.as_ref().unwrap());
    for size in [1000usize, 9 * 1024 * 1024] {
        let data = Bytes::from(common::images::noise(size, size as u64));
        let d = digest_of(&data);
        let mut w = store.begin(&d).await.unwrap();
        w.write(data).await.unwrap();
        w.commit().await.unwrap();
        let head = s3.head_object().bucket("sse-bucket").key(aws::blob_key(&d)).send().await.unwrap();
        assert_eq!(head.server_side_encryption(), Some(&aws_sdk_s3::types::ServerSideEncryption::Aes256), "{size} bytes");
    }
}
