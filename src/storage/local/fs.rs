//! Blobs as files: `blobs/sha256/<hex>`, written under `tmp/` and renamed
//! into place only once verified; signed, expiring URLs for them.

use super::*;

pub struct FsBlobStore {
    root: PathBuf,
    /// Signs blob URLs. Kept in the data directory so URLs survive a restart.
    key: Vec<u8>,
}

impl FsBlobStore {
    /// Removes what writes cut off by a crash left in `tmp/` (never
    /// visible). Only the server that owns the directory may, at its start:
    /// another process's copies in progress live there.
    pub fn clear_unfinished(&self) -> Result<()> {
        for entry in std::fs::read_dir(self.root.join("tmp"))? {
            let _ = std::fs::remove_file(entry?.path());
        }
        Ok(())
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

    async fn begin(&self, digest: &Digest) -> Result<Box<dyn BlobWriter>> {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self.root.join("tmp").join(format!("{}.{}.{n}", digest.hex(), std::process::id()));
        let file = tokio::fs::File::create(&tmp).await?;
        Ok(Box::new(FsBlobWriter { file: Some(file), tmp, dest: self.path(digest) }))
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
    dest: PathBuf,
}

#[async_trait]
impl BlobWriter for FsBlobWriter {
    async fn write(&mut self, chunk: Bytes) -> Result<()> {
        let file = self.file.as_mut().ok_or_else(|| StorageError::Index("writer already closed".into()))?;
        file.write_all(&chunk).await?;
        Ok(())
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
        if self.file.take().is_some() {
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
