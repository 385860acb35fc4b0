//! Blobs as files: `blobs/sha256/<hex>`, written under `tmp/<hex>.<id>` and
//! renamed into place only once verified; signed, expiring URLs for them.
//! Ranged parts are written at their offsets of the one temp file as they
//! arrive (`OffsetWriter`), in any order; the caller hashes them in order.
//! A copy in progress reports a durable point every `PART` bytes written in
//! order (the file name is the upload id its checkpoint names), so a copy
//! cut off (a crash, a kill) continues from there. The bytes are not synced
//! then (a sync per part would slow every copy; writeback is only started,
//! so the final sync has little left to do): a copy continued re-reads its
//! file's first `offset` bytes and must hash to the checkpoint's state, so
//! whatever a power loss did to the file is found and the copy starts over.

use super::*;

pub struct FsBlobStore {
    root: PathBuf,
    /// Signs blob URLs. Kept in the data directory so URLs survive a restart.
    key: Vec<u8>,
}

/// A copy in progress reports a durable point every this many bytes.
const PART: u64 = 8 << 20;

impl FsBlobStore {
    /// Removes what writes cut off by a crash left in `tmp/` (never
    /// visible), except the uploads in `keep` (named by a checkpoint: the
    /// copy continues from them). Only the server that owns the directory
    /// may, at its start: another process's copies in progress live there.
    pub fn clear_unfinished(&self, keep: &std::collections::HashSet<String>) -> Result<()> {
        for entry in std::fs::read_dir(self.root.join("tmp"))? {
            let entry = entry?;
            if !entry.file_name().to_str().is_some_and(|name| keep.contains(name)) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    /// The file of upload `id` of `digest`, if `id` names one (no path).
    fn upload_path(&self, digest: &Digest, id: &str) -> Option<PathBuf> {
        let ok = id.strip_prefix(digest.hex()).is_some_and(|rest| rest.starts_with('.')) && !id.contains('/');
        ok.then(|| self.root.join("tmp").join(id))
    }

    /// Opens upload `cp.upload` to continue at `cp.offset`, when the file's
    /// first `offset` bytes still hash to the checkpoint's sha256 state
    /// (anything past them is dropped).
    async fn reopen(&self, digest: &Digest, cp: &Checkpoint) -> Option<FsBlobWriter> {
        let path = self.upload_path(digest, &cp.upload)?;
        let (at, want) = (path.clone(), cp.clone());
        let file = tokio::task::spawn_blocking(move || prefix_matches(&at, &want)).await.ok()??;
        if file.is_none() {
            tracing::warn!(%digest, upload = %cp.upload, "the checkpointed file no longer hashes to its checkpoint; copying from the start");
        }
        Some(FsBlobWriter::new(file?, path, cp.upload.clone(), self.path(digest), cp.offset))
    }

    pub fn open(data_dir: &Path) -> Result<FsBlobStore> {
        std::fs::create_dir_all(data_dir.join("blobs/sha256"))?;
        std::fs::create_dir_all(data_dir.join("tmp"))?;
        let key = signing_key(&data_dir.join("signing.key"))?;
        Ok(FsBlobStore { root: data_dir.to_owned(), key })
    }

    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    fn mac(&self, digest: &Digest, expires: i64) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(digest.as_str().as_bytes());
        mac.update(b"\n");
        mac.update(expires.to_string().as_bytes());
        mac
    }

    /// Checks a signed URL's signature and expiry.
    pub fn verify(&self, digest: &Digest, expires: i64, sig_hex: &str) -> bool {
        if expires < now() {
            return false;
        }
        let Ok(sig) = hex::decode(sig_hex) else { return false };
        self.mac(digest, expires).verify_slice(&sig).is_ok()
    }

    pub fn sign(&self, digest: &Digest, expires: i64) -> String {
        hex::encode(self.mac(digest, expires).finalize().into_bytes())
    }
}

#[async_trait]
impl BlobStore for FsBlobStore {
    async fn size(&self, digest: &Digest) -> Result<Option<u64>> {
        match tokio::fs::metadata(self.path(digest)).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn presigned_get(&self, digest: &Digest, ttl: Duration) -> Result<String> {
        let expires = now() + ttl.as_secs() as i64;
        Ok(format!("{BLOB_URL_PREFIX}{}?expires={expires}&sig={}", digest.hex(), self.sign(digest, expires)))
    }

    async fn begin(&self, digest: &Digest, resume: Option<&Checkpoint>) -> Result<Box<dyn BlobWriter>> {
        if let Some(cp) = resume {
            if let Some(w) = self.reopen(digest, cp).await {
                return Ok(Box::new(w));
            }
            tracing::info!(%digest, upload = %cp.upload, offset = cp.offset, "the checkpointed upload is gone or short; copying from the start");
            // Nothing will continue it now.
            self.discard_upload(&Upload { digest: digest.clone(), id: cp.upload.clone(), started: 0 }).await?;
        }
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("{}.{}.{}.{n}", digest.hex(), std::process::id(), now());
        let tmp = self.root.join("tmp").join(&id);
        // Read too: clients following the copy read what is written so far.
        let file = tokio::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&tmp).await?.into_std().await;
        Ok(Box::new(FsBlobWriter::new(file, tmp, id, self.path(digest), 0)))
    }

    async fn uploads(&self) -> Result<Vec<Upload>> {
        let mut out = Vec::new();
        let mut dir = tokio::fs::read_dir(self.root.join("tmp")).await?;
        while let Some(entry) = dir.next_entry().await? {
            let Some(id) = entry.file_name().to_str().map(str::to_owned) else { continue };
            let Some(digest) = id.split_once('.').and_then(|(hex, _)| Digest::parse(&format!("sha256:{hex}")).ok()) else { continue };
            let written = entry.metadata().await?.modified()?;
            let started = written.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
            out.push(Upload { digest, id, started });
        }
        Ok(out)
    }

    async fn discard_upload(&self, upload: &Upload) -> Result<()> {
        if let Some(path) = self.upload_path(&upload.digest, &upload.id) {
            match tokio::fs::remove_file(path).await {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                _ => {}
            }
        }
        Ok(())
    }

    async fn stored_here(&self, digest: &Digest) -> Option<bool> {
        Some(tokio::fs::try_exists(self.path(digest)).await.unwrap_or(true))
    }

    async fn stored_digests(&self) -> Result<std::collections::HashSet<Digest>> {
        let mut out = std::collections::HashSet::new();
        let mut dir = tokio::fs::read_dir(self.root.join("blobs/sha256")).await?;
        while let Some(entry) = dir.next_entry().await? {
            if let Some(d) = entry.file_name().to_str().and_then(|hex| Digest::parse(&format!("sha256:{hex}")).ok()) {
                out.insert(d);
            }
        }
        Ok(out)
    }

    async fn delete(&self, digest: &Digest) -> Result<()> {
        match tokio::fs::remove_file(self.path(digest)).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}

/// Opens `path` for writing when its first `cp.offset` bytes hash to
/// `cp`'s state, cut to that length: `Some(None)` when they do not, `None`
/// when the file is gone or short.
fn prefix_matches(path: &Path, cp: &Checkpoint) -> Option<Option<std::fs::File>> {
    use sha2::Digest as _;
    use sha2::digest::common::hazmat::SerializableState;
    use std::io::Read;
    let mut file = std::fs::OpenOptions::new().read(true).write(true).open(path).ok()?;
    if file.metadata().ok()?.len() < cp.offset {
        return None;
    }
    let (mut hasher, mut left, mut buf) = (Sha256::new(), cp.offset, vec![0u8; 1 << 20]);
    while left > 0 {
        let n = file.read(&mut buf[..left.min(1 << 20) as usize]).ok()?;
        if n == 0 {
            return None;
        }
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    if hasher.serialize().as_slice() != cp.hash.as_slice() {
        return Some(None);
    }
    file.set_len(cp.offset).ok()?;
    Some(Some(file))
}

/// In-order bytes gathered before they are written in one go.
const BATCH: u64 = 1 << 20;
/// ... or for at most this long: a slow upstream's bytes still reach the
/// file (and the clients following the copy) soon after they come.
const BATCH_FOR: std::time::Duration = std::time::Duration::from_millis(100);

/// The temp file, shared with the parts writing at their offsets. Closed
/// (under the write lock, so after any write in progress) when the writer
/// ends: later writes fail without touching the file.
struct Shared {
    file: std::fs::File,
    closed: std::sync::RwLock<bool>,
    /// The extents written, merged (start -> end), and the in-order prefix
    /// from the blob's start they make (and whether the writer has ended),
    /// published for followers.
    extents: std::sync::Mutex<std::collections::BTreeMap<u64, u64>>,
    prefix: tokio::sync::watch::Sender<(u64, bool)>,
}

impl Shared {
    fn new(file: std::fs::File) -> Shared {
        Shared {
            file,
            closed: std::sync::RwLock::new(false),
            extents: std::sync::Mutex::default(),
            prefix: tokio::sync::watch::Sender::new((0, false)),
        }
    }

    fn write_at(&self, mut offset: u64, chunks: &[Bytes]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let closed = self.closed.read().unwrap_or_else(|p| p.into_inner());
        if *closed {
            return Err(std::io::Error::other("the upload was closed"));
        }
        let from = offset;
        for chunk in chunks {
            self.file.write_all_at(chunk, offset)?;
            offset += chunk.len() as u64;
        }
        self.wrote(from, offset);
        Ok(())
    }

    /// Notes bytes `from..to` as on the file, and the prefix they extend.
    fn wrote(&self, from: u64, to: u64) {
        if to <= from {
            return;
        }
        let mut extents = self.extents.lock().unwrap_or_else(|p| p.into_inner());
        let (mut start, mut end) = (from, to);
        // Merge with every extent that touches or overlaps this one.
        let touching: Vec<(u64, u64)> = extents.range(..=to).filter(|(s, e)| **e >= from && **s <= to).map(|(s, e)| (*s, *e)).collect();
        for (s, e) in touching {
            extents.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        extents.insert(start, end);
        if let Some(end) = extents.get(&0).copied() {
            self.prefix.send_if_modified(|p| {
                let grew = end > p.0;
                p.0 = p.0.max(end);
                grew
            });
        }
    }

    fn close(&self) {
        *self.closed.write().unwrap_or_else(|p| p.into_inner()) = true;
        self.prefix.send_modify(|p| p.1 = true);
    }

    /// Starts writing back `len` bytes from `offset` (Linux; elsewhere a
    /// no-op): the data is not durable after it, but the final `fsync` has
    /// less left to do.
    fn start_writeback(&self, offset: u64, len: u64) {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: a valid descriptor (the file lives as long as `self`);
            // the call reads no memory of ours.
            unsafe {
                libc::sync_file_range(self.file.as_raw_fd(), offset as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE);
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (offset, len);
    }
}

/// What clients following an upload read: the temp file (kept open: it
/// stays readable once renamed into place, or removed).
struct FsPartial(Arc<Shared>);

#[async_trait]
impl PartialBlob for FsPartial {
    fn readable(&self) -> u64 {
        self.0.prefix.borrow().0
    }

    async fn grown(&self, seen: u64) {
        let mut rx = self.0.prefix.subscribe();
        let _ = rx.wait_for(|(prefix, ended)| *prefix > seen || *ended).await;
    }

    async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes> {
        let shared = self.0.clone();
        let bytes = tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            let mut buf = vec![0u8; len];
            let n = shared.file.read_at(&mut buf, offset)?;
            buf.truncate(n);
            Ok::<_, std::io::Error>(Bytes::from(buf))
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(bytes)
    }
}

/// The `OffsetWriter` of an upload's temp file.
struct FsOffsets(Arc<Shared>);

#[async_trait]
impl OffsetWriter for FsOffsets {
    async fn write_at(&self, offset: u64, bytes: Bytes) -> Result<()> {
        let shared = self.0.clone();
        Ok(tokio::task::spawn_blocking(move || shared.write_at(offset, &[bytes])).await.map_err(std::io::Error::other)??)
    }
}

struct FsBlobWriter {
    /// `None` once closed.
    shared: Option<Arc<Shared>>,
    tmp: PathBuf,
    /// The upload id: the file's name under `tmp/`.
    id: String,
    dest: PathBuf,
    start: u64,
    /// Bytes from the blob's start given to `write` or `placed`.
    written: u64,
    /// In-order bytes not yet handed to a write: `written - batch_len..written`.
    batch: Vec<Bytes>,
    batch_len: u64,
    /// The write of the previous batch, at most one at a time (the next
    /// batch gathers meanwhile).
    in_flight: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    /// Bytes from the blob's start on the file (their writes completed).
    flushed: u64,
    /// Writeback started up to here.
    kicked: u64,
    /// A durable point was reported: a checkpoint may name this file, so
    /// a dropped writer leaves it for the next copy.
    reported: bool,
    /// A write failed: `flushed` stays where it was.
    failed: bool,
    /// When the batch's first chunk came.
    batch_since: Option<std::time::Instant>,
}

impl FsBlobWriter {
    fn new(file: std::fs::File, tmp: PathBuf, id: String, dest: PathBuf, start: u64) -> FsBlobWriter {
        let shared = Arc::new(Shared::new(file));
        // A continued upload's first `start` bytes are on the file already.
        shared.wrote(0, start);
        FsBlobWriter {
            shared: Some(shared),
            tmp,
            id,
            dest,
            start,
            written: start,
            batch: Vec::new(),
            batch_len: 0,
            in_flight: None,
            flushed: start,
            kicked: start,
            reported: false,
            failed: false,
            batch_since: None,
        }
    }

    fn shared(&self) -> Result<Arc<Shared>> {
        self.shared.clone().ok_or_else(|| std::io::Error::other("writer already closed").into())
    }

    /// Waits for the write in flight. After a failed write nothing more
    /// counts as on the file.
    async fn settle(&mut self) -> Result<()> {
        if self.failed {
            return Err(std::io::Error::other("an earlier write to the upload failed").into());
        }
        if let Some(write) = self.in_flight.take() {
            let done = write.await.map_err(std::io::Error::other).and_then(|r| r);
            if let Err(e) = done {
                self.failed = true;
                return Err(e.into());
            }
        }
        self.flushed = self.written - self.batch_len;
        Ok(())
    }

    /// Hands the gathered batch to a write of its own, once the previous
    /// one is done.
    async fn send(&mut self) -> Result<()> {
        self.settle().await?;
        if self.batch.is_empty() {
            return Ok(());
        }
        let (shared, chunks, at) = (self.shared()?, std::mem::take(&mut self.batch), self.flushed);
        self.batch_len = 0;
        self.batch_since = None;
        self.in_flight = Some(tokio::task::spawn_blocking(move || shared.write_at(at, &chunks)));
        Ok(())
    }

    /// Every byte given so far is on the file.
    async fn drain(&mut self) -> Result<()> {
        self.send().await?;
        self.settle().await
    }

    /// After `written` moved from `before`: at a part boundary, everything
    /// is put on the file and its writeback started.
    async fn advanced(&mut self, before: u64) -> Result<()> {
        if self.written / PART > before / PART {
            self.drain().await?;
            let (shared, from, to) = (self.shared()?, self.kicked, self.flushed);
            self.kicked = to;
            tokio::task::spawn_blocking(move || shared.start_writeback(from, to - from));
        } else if self.batch_len >= BATCH || self.batch_since.is_some_and(|t| t.elapsed() >= BATCH_FOR) {
            self.send().await?;
        }
        Ok(())
    }

    /// Ends the writer: no write, here or through `at_offsets`, touches the
    /// file after this (the lock waits for a write under way). Returns the
    /// file, if still open. Cut off midway, it leaves `Drop` to close.
    async fn close(&mut self) -> Option<Arc<Shared>> {
        let shared = self.shared.clone()?;
        let closing = shared.clone();
        let _ = tokio::task::spawn_blocking(move || closing.close()).await;
        self.in_flight = None;
        self.shared = None;
        Some(shared)
    }
}

#[async_trait]
impl BlobWriter for FsBlobWriter {
    fn offset(&self) -> u64 {
        self.start
    }

    fn part_size(&self) -> u64 {
        PART
    }

    async fn write(&mut self, chunk: Bytes) -> Result<()> {
        self.shared()?;
        let before = self.written;
        self.written += chunk.len() as u64;
        self.batch_len += chunk.len() as u64;
        self.batch.push(chunk);
        self.batch_since.get_or_insert_with(std::time::Instant::now);
        self.advanced(before).await
    }

    fn at_offsets(&self) -> Option<Arc<dyn OffsetWriter>> {
        Some(Arc::new(FsOffsets(self.shared.clone()?)))
    }

    async fn placed(&mut self, len: u64) -> Result<()> {
        self.drain().await?;
        let before = self.written;
        self.written += len;
        self.flushed = self.written;
        self.advanced(before).await
    }

    fn durable(&mut self) -> Result<Option<Durable>> {
        let offset = self.flushed / PART * PART;
        if offset == 0 {
            return Ok(None);
        }
        self.reported = true;
        Ok(Some(Durable { upload: self.id.clone(), offset }))
    }

    async fn suspend(mut self: Box<Self>) -> Result<Option<Durable>> {
        let drained = self.drain().await;
        self.close().await;
        drained?;
        let durable = self.durable()?;
        if durable.is_none() {
            let _ = tokio::fs::remove_file(&self.tmp).await;
        }
        Ok(durable)
    }

    async fn commit(mut self: Box<Self>) -> Result<()> {
        self.drain().await?;
        let shared = self.close().await.ok_or_else(|| std::io::Error::other("writer already closed"))?;
        tokio::task::spawn_blocking(move || shared.file.sync_all()).await.map_err(std::io::Error::other)??;
        tokio::fs::rename(&self.tmp, &self.dest).await?;
        // The rename itself is durable only once its directory is synced.
        if let Some(dir) = self.dest.parent() {
            tokio::fs::File::open(dir).await?.sync_all().await?;
        }
        Ok(())
    }

    async fn abort(mut self: Box<Self>) -> Result<()> {
        self.close().await;
        let _ = tokio::fs::remove_file(&self.tmp).await;
        Ok(())
    }

    fn partial(&self) -> Option<Arc<dyn PartialBlob>> {
        Some(Arc::new(FsPartial(self.shared.clone()?)))
    }
}

impl Drop for FsBlobWriter {
    fn drop(&mut self) {
        // Cut off (a cancelled task): parts still running must not write
        // any more; what a checkpoint may name stays for the next copy
        // (GC removes it once nothing names it).
        if let Some(shared) = self.shared.take() {
            shared.close();
            if !self.reported {
                let _ = std::fs::remove_file(&self.tmp);
            }
        }
    }
}

/// The key that signs blob URLs: read, or made (32 random bytes) when there
/// is none. Readable by its owner only: whoever reads it can sign URLs to
/// any cached blob. A key that exists but cannot be read (another user's
/// cache) is an error naming it, never replaced: a new key would void
/// every URL the owner's server handed out.
fn signing_key(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Write};
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let named = |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    match std::fs::read(path) {
        Ok(k) if k.len() >= 32 => {
            // Kept to its owner; a reader that is not the owner cannot (and need not) say so.
            if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
                tracing::debug!(key = %path.display(), error = %e, "could not restrict the signing key's permissions");
            }
            return Ok(k);
        }
        // A key cut short (a crash while it was written): made again.
        Ok(_) => std::fs::remove_file(path).map_err(named)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(named(e)),
    }
    let mut k = vec![0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut k)?;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(named)?;
    f.write_all(&k)?;
    f.sync_all()?;
    Ok(k)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_signing_key_is_readable_by_its_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signing.key");
        let made = super::signing_key(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        // A key left world-readable (by an older version) is tightened, and kept.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(super::signing_key(&path).unwrap(), made);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
