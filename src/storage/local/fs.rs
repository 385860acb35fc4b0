//! Blobs as files: `blobs/sha256/<hex>`, written under `tmp/<hex>.<id>` and
//! renamed into place only once verified; signed, expiring URLs for them.
//! A copy in progress reports a durable point every `PART` bytes written
//! (the file name is the upload id its checkpoint names), so a copy cut off
//! (a crash, a kill) continues from there. The bytes are not synced then (a
//! sync per part would slow every copy): a copy continued re-reads its
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
        use sha2::Digest as _;
        use sha2::digest::common::hazmat::SerializableState;
        use tokio::io::AsyncReadExt;
        let path = self.upload_path(digest, &cp.upload)?;
        let mut file = tokio::fs::OpenOptions::new().read(true).write(true).open(&path).await.ok()?;
        if file.metadata().await.ok()?.len() < cp.offset {
            return None;
        }
        let (mut hasher, mut left, mut buf) = (Sha256::new(), cp.offset, vec![0u8; 1 << 20]);
        while left > 0 {
            let n = file.read(&mut buf[..left.min(1 << 20) as usize]).await.ok()?;
            if n == 0 {
                return None;
            }
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
        if hasher.serialize().as_slice() != cp.hash.as_slice() {
            tracing::warn!(%digest, upload = %cp.upload, "the checkpointed file no longer hashes to its checkpoint; copying from the start");
            return None;
        }
        file.set_len(cp.offset).await.ok()?;
        let mut file = file;
        tokio::io::AsyncSeekExt::seek(&mut file, std::io::SeekFrom::Start(cp.offset)).await.ok()?;
        Some(FsBlobWriter::new(file, path, cp.upload.clone(), self.path(digest), cp.offset))
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
        let file = tokio::fs::File::create(&tmp).await?;
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

struct FsBlobWriter {
    file: Option<tokio::fs::File>,
    tmp: PathBuf,
    /// The upload id: the file's name under `tmp/`.
    id: String,
    dest: PathBuf,
    start: u64,
    written: u64,
    /// Bytes from the blob's start handed to the system.
    flushed: u64,
    /// A durable point was reported: a checkpoint may name this file, so
    /// a dropped writer leaves it for the next copy.
    reported: bool,
}

impl FsBlobWriter {
    fn new(file: tokio::fs::File, tmp: PathBuf, id: String, dest: PathBuf, start: u64) -> FsBlobWriter {
        FsBlobWriter { file: Some(file), tmp, id, dest, start, written: start, flushed: start, reported: false }
    }

    fn file(&mut self) -> Result<&mut tokio::fs::File> {
        self.file.as_mut().ok_or_else(|| StorageError::Index("writer already closed".into()))
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
        self.file()?.write_all(&chunk).await?;
        let before = self.written;
        self.written += chunk.len() as u64;
        if self.written / PART > before / PART {
            // Handed to the system (not synced): a process killed now
            // leaves them in the file; `reopen` checks them.
            self.file()?.flush().await?;
            self.flushed = self.written;
        }
        Ok(())
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
        let mut file = self.file.take().ok_or_else(|| StorageError::Index("writer already closed".into()))?;
        file.flush().await?;
        self.flushed = self.written;
        let durable = self.durable()?;
        if durable.is_none() {
            let _ = tokio::fs::remove_file(&self.tmp).await;
        }
        Ok(durable)
    }

    async fn commit(mut self: Box<Self>) -> Result<()> {
        let mut file = self.file.take().ok_or_else(|| StorageError::Index("writer already closed".into()))?;
        file.flush().await?;
        file.sync_all().await?;
        drop(file);
        tokio::fs::rename(&self.tmp, &self.dest).await?;
        // The rename itself is durable only once its directory is synced.
        if let Some(dir) = self.dest.parent() {
            tokio::fs::File::open(dir).await?.sync_all().await?;
        }
        Ok(())
    }

    async fn abort(mut self: Box<Self>) -> Result<()> {
        self.file.take();
        let _ = tokio::fs::remove_file(&self.tmp).await;
        Ok(())
    }
}

impl Drop for FsBlobWriter {
    fn drop(&mut self) {
        // Cut off (a cancelled task): what a checkpoint may name stays for
        // the next copy (GC removes it once nothing names it).
        if self.file.take().is_some() && !self.reported {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// The key that signs blob URLs: read, or made (32 random bytes). Readable
/// by its owner only: whoever reads it can sign URLs to any cached blob.
fn signing_key(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Write};
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if let Ok(k) = std::fs::read(path)
        && k.len() >= 32
    {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        return Ok(k);
    }
    let mut k = vec![0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut k)?;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
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
