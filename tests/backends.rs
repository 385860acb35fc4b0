//! One contract, every backend: the same suite runs against the embedded
//! backend (files + SQLite) and against S3 + DynamoDB on moto_server.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hubcap::oci::Digest;
use hubcap::storage::local::{FsBlobStore, SqliteIndex};
use hubcap::storage::{BlobState, BlobStore, Entry, Index, ManifestRecord, TagRecord, aws, now};

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
        pulled_at: 0,
    };
    index.put_tag(&t, &m).await.unwrap();
    let got = index.tag(repo, "1", "").await.unwrap().unwrap();
    assert!(got.pulled_at >= now() - 5, "storing a tag is a pull");
    let t = TagRecord { pulled_at: got.pulled_at, ..t };
    assert_eq!(got, t);
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
    store.delete_many(&[d.clone(), ds.clone()]).await.unwrap();
    assert_eq!(store.size(&d).await.unwrap(), None, "deleted in a batch; missing ones are fine");
    assert!(now() > 0);
}

/// The lifecycle half of the contract: pull marks, conditional expiry, the
/// `deleting` protocol, sweeps and stored statistics.
async fn lifecycle_contract(index: Arc<dyn Index>, store: Arc<dyn BlobStore>) {
    let repo = "docker.io/library/life";
    let other = "docker.io/library/other";
    let layer = Bytes::from_static(b"a layer that will be collected");
    let b = digest_of(&layer);
    let m = manifest(format!(r#"{{"schemaVersion":2,"layers":[{{"digest":"{b}"}}]}}"#).into_bytes());
    assert_eq!(index.put_manifest(repo, &m, std::slice::from_ref(&b)).await.unwrap(), vec![b.clone()]);
    let mut w = store.begin(&b).await.unwrap();
    w.write(layer.clone()).await.unwrap();
    w.commit().await.unwrap();
    assert!(index.claim_blob(&b, Duration::from_secs(60)).await.unwrap());
    index.set_blob_state(&b, BlobState::Ready, Some(layer.len() as u64), None).await.unwrap();
    let t = TagRecord {
        repo: repo.into(),
        tag: "v1".into(),
        variant: String::new(),
        digest: m.digest.clone(),
        media_type: m.media_type.clone(),
        checked_at: now(),
        pulled_at: 0,
    };
    index.put_tag(&t, &m).await.unwrap();

    // Pull marks.
    let linked = index.manifest(repo, &m.digest).await.unwrap();
    assert!(linked.linked && linked.pulled_at >= now() - 5, "storing a manifest is a pull in its repository");
    assert!(index.manifest_pulled(repo, &m.digest).await.unwrap());
    assert!(!index.manifest_pulled(other, &m.digest).await.unwrap(), "not linked there");
    index.tag_pulled(repo, "v1", "").await.unwrap();
    index.tag_pulled(repo, "gone", "").await.unwrap(); // harmless, creates nothing
    assert!(index.tag(repo, "gone", "").await.unwrap().is_none());
    let view = index.blob(repo, &b).await.unwrap().record.unwrap();
    assert_eq!(view.state, BlobState::Ready);
    assert!(view.used_at >= now() - 5, "a fetched blob counts as used");
    assert!(index.touch_blob(&b, Some(repo)).await.unwrap());

    // A sweep sees every kind of item, over pages.
    let mut cursor = None;
    let (mut tags, mut links, mut manifests, mut blobs, mut blob_links) = (0, 0, 0, 0, 0);
    loop {
        let page = index.scan(cursor).await.unwrap();
        for e in page.entries {
            match e {
                Entry::Tag(x) if x.repo == repo => tags += 1,
                Entry::ManifestLink { repo: r, digest, pulled_at } if r == repo && digest == m.digest => {
                    assert!(pulled_at > 0);
                    links += 1
                }
                Entry::Manifest { record, created_at } if record.digest == m.digest => {
                    assert!(created_at > 0);
                    manifests += 1
                }
                Entry::Blob(x) if x.digest == b => blobs += 1,
                Entry::BlobLink { repo: r, digest } if r == repo && digest == b => blob_links += 1,
                _ => {}
            }
        }
        match page.next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    assert_eq!((tags, links, manifests, blobs, blob_links), (1, 1, 1, 1, 1));

    // Expiry is conditional on what the sweep saw.
    let later = now() + 10;
    assert!(!index.expire_tag(repo, "v1", "", &digest_of(b"other"), later).await.unwrap(), "the tag moved");
    assert!(!index.expire_tag(repo, "v1", "", &m.digest, now() - 100).await.unwrap(), "pulled since");
    assert!(index.expire_tag(repo, "v1", "", &m.digest, later).await.unwrap());
    assert!(index.tag(repo, "v1", "").await.unwrap().is_none());
    assert!(!index.expire_manifest_link(repo, &m.digest, now() - 100).await.unwrap(), "pulled since");
    assert!(index.expire_manifest_link(repo, &m.digest, later).await.unwrap());
    assert!(!index.manifest(repo, &m.digest).await.unwrap().linked);
    assert!(index.delete_manifest(&m.digest).await.unwrap());
    assert!(index.manifest(repo, &m.digest).await.unwrap().record.is_none());

    // Deleting a blob: only when unused for the grace period; from the
    // mark on, no reader serves it, no fetch revives it within the lease.
    assert!(!index.begin_blob_delete(&b, now() - 100, Duration::from_secs(600)).await.unwrap(), "used recently");
    assert!(index.begin_blob_delete(&b, later, Duration::from_secs(600)).await.unwrap());
    assert!(!index.begin_blob_delete(&b, later, Duration::from_secs(600)).await.unwrap(), "one sweep holds it");
    assert!(!index.touch_blob(&b, Some(repo)).await.unwrap(), "a reader loses to the mark");
    assert_ne!(index.blob(repo, &b).await.unwrap().record.unwrap().state, BlobState::Ready);
    assert!(!index.create_pending_blob(&b, repo, None).await.unwrap(), "not fetched again under the lease");
    assert!(!index.claim_blob(&b, Duration::ZERO).await.unwrap());
    index.set_blob_state(&b, BlobState::Ready, Some(1), None).await.unwrap();
    assert_eq!(index.blob(repo, &b).await.unwrap().record.unwrap().state, BlobState::Deleting, "a late fetcher cannot revive it");
    store.delete_many(std::slice::from_ref(&b)).await.unwrap();
    index.finish_blob_delete(&b, &[repo.to_owned()]).await.unwrap();
    let after = index.blob(repo, &b).await.unwrap();
    assert!(after.record.is_none() && !after.linked, "record and links gone");
    assert!(index.create_pending_blob(&b, repo, None).await.unwrap(), "a later miss fetches it again");
    // A sweep that died leaves `deleting` under a lease; after it, a miss takes over.
    index.set_blob_state(&b, BlobState::Failed, None, Some("x")).await.unwrap();
    assert!(index.begin_blob_delete(&b, later, Duration::ZERO).await.unwrap());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(index.create_pending_blob(&b, repo, None).await.unwrap(), "an expired GC lease is taken over");

    // Stored statistics add up across flushes.
    let mut delta = hubcap::storage::StoredStats::default();
    delta.counters.insert("hit".into(), 3);
    delta.counters.insert("miss".into(), 1);
    index.add_stats(&delta).await.unwrap();
    delta.ratelimit_remaining = Some((42, 1_700_000_000));
    index.add_stats(&delta).await.unwrap();
    let stats = index.stats().await.unwrap();
    assert_eq!((stats.counters["hit"], stats.counters["miss"]), (6, 2));
    assert_eq!(stats.ratelimit_remaining, Some((42, 1_700_000_000)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_backend_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let index = Arc::new(SqliteIndex::open(&dir.path().join("index.db")).unwrap());
    let store = Arc::new(FsBlobStore::open(dir.path()).unwrap());
    contract(index.clone(), store.clone(), None).await;
    lifecycle_contract(index, store).await;
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
    let (index, store): (Arc<dyn Index>, Arc<dyn BlobStore>) = (Arc::new(index), Arc::new(store));
    contract(index.clone(), store.clone(), Some(fetch)).await;
    lifecycle_contract(index, store).await;
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
