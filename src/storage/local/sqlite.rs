//! The index in SQLite (WAL): one connection behind a mutex, conditional
//! updates for every state change, columns added by `migrate` on open.

use super::*;

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
CREATE TABLE IF NOT EXISTS tags (
    repo TEXT NOT NULL, tag TEXT NOT NULL, variant TEXT NOT NULL,
    digest TEXT NOT NULL, media_type TEXT NOT NULL, checked_at INTEGER NOT NULL,
    last_pulled INTEGER NOT NULL,
    PRIMARY KEY (repo, tag, variant)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS manifests (
    digest TEXT PRIMARY KEY, media_type TEXT NOT NULL, body BLOB NOT NULL,
    created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS links (
    repo TEXT NOT NULL, digest TEXT NOT NULL,
    PRIMARY KEY (repo, digest)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blobs (
    digest TEXT PRIMARY KEY, state TEXT NOT NULL, size INTEGER, source TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT, updated_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS stats (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
";

/// Columns added since the first schema: (table, column, type). A database
/// made before them gets them on open.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    // Last pull of a repository's manifest; NULL on a blob link.
    ("links", "pulled_at", "INTEGER"),
    ("blobs", "used_at", "INTEGER NOT NULL DEFAULT 0"),
    ("blobs", "lease_until", "INTEGER NOT NULL DEFAULT 0"),
    // An interrupted copy's `Checkpoint::encode`.
    ("blobs", "checkpoint", "TEXT"),
];

fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    for (table, column, ty) in ADDED_COLUMNS {
        let exists = conn.prepare(&format!("SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"))?.exists([column])?;
        if !exists {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {ty}"))?;
            if *column == "pulled_at" {
                // Manifests linked before pulls were recorded count as pulled now.
                conn.execute("UPDATE links SET pulled_at = ?1 WHERE digest IN (SELECT digest FROM manifests)", [now()])?;
            }
        }
    }
    Ok(())
}

/// Rows per page of a sweep.
const SCAN_PAGE: usize = 500;

pub struct SqliteIndex {
    // One connection: every statement is a few microseconds, and SQLite
    // serialises writers anyway.
    conn: Mutex<Connection>,
}

fn db_err(e: rusqlite::Error) -> StorageError {
    StorageError::Index(e.to_string())
}

impl SqliteIndex {
    pub fn open(path: &Path) -> Result<SqliteIndex> {
        let conn = Connection::open(path).map_err(db_err)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(db_err)?;
        conn.execute_batch(SCHEMA).map_err(db_err)?;
        migrate(&conn).map_err(db_err)?;
        Ok(SqliteIndex { conn: Mutex::new(conn) })
    }

    /// Puts fetches a previous run left half-done back to `pending`. Only
    /// the server that owns the directory may, at its start: a command run
    /// beside it would take its copies in progress away.
    pub async fn release_unfinished(&self) -> Result<usize> {
        self.with(|c| c.execute("UPDATE blobs SET state = 'pending', lease_until = 0 WHERE state = 'fetching'", []))
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn).map_err(db_err)
    }
}

fn digest_col(s: String) -> rusqlite::Result<Digest> {
    Digest::parse(&s).map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e)))
}

fn blob_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<BlobRecord> {
    Ok(BlobRecord {
        digest: digest_col(row.get(0)?)?,
        state: BlobState::parse(&row.get::<_, String>(1)?).unwrap_or(BlobState::Failed),
        size: row.get::<_, Option<i64>>(2)?.map(|s| s as u64),
        source: row.get(3)?,
        attempts: row.get(4)?,
        last_error: row.get(5)?,
        updated_at: row.get(6)?,
        used_at: row.get(7)?,
        lease_until: row.get(8)?,
        checkpoint: row.get::<_, Option<String>>(9)?.as_deref().and_then(Checkpoint::decode),
    })
}

const BLOB_COLS: &str = "digest, state, size, source, attempts, last_error, updated_at, used_at, lease_until, checkpoint";

/// Makes a blob pending when unknown, failed, or left `deleting` by a GC
/// whose lease ran out.
const PEND_BLOB: &str = "INSERT INTO blobs (digest, state, size, source, attempts, updated_at)
     VALUES (?1, 'pending', ?2, ?3, 0, ?4)
     ON CONFLICT (digest) DO UPDATE SET state = 'pending', source = excluded.source,
         updated_at = excluded.updated_at, lease_until = 0
     WHERE blobs.state = 'failed' OR (blobs.state = 'deleting' AND blobs.lease_until < excluded.updated_at)";

fn tag_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TagRecord> {
    Ok(TagRecord {
        repo: r.get(0)?,
        tag: r.get(1)?,
        variant: r.get(2)?,
        digest: digest_col(r.get(3)?)?,
        media_type: r.get(4)?,
        checked_at: r.get(5)?,
        pulled_at: r.get(6)?,
    })
}

const TAG_COLS: &str = "repo, tag, variant, digest, media_type, checked_at, last_pulled";

/// Where a sweep of the SQLite index stands: the table, and the key of the
/// last row read in it.
#[derive(serde::Serialize, serde::Deserialize, Default)]
struct Cursor {
    table: u8,
    key: Vec<String>,
}

#[async_trait]
impl ServeIndex for SqliteIndex {
    async fn tag(&self, repo: &str, tag: &str, variant: &str) -> Result<Option<TagRecord>> {
        self.with(|c| {
            c.prepare_cached(&format!("SELECT {TAG_COLS} FROM tags WHERE repo = ?1 AND tag = ?2 AND variant = ?3"))?
                .query_row(params![repo, tag, variant], tag_row)
                .optional()
        })
    }

    async fn put_tag(&self, t: &TagRecord, _manifest: &ManifestRecord) -> Result<()> {
        self.with(|c| {
            c.prepare_cached(
                "INSERT INTO tags (repo, tag, variant, digest, media_type, checked_at, last_pulled)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (repo, tag, variant) DO UPDATE SET digest = excluded.digest,
                     media_type = excluded.media_type, checked_at = excluded.checked_at,
                     last_pulled = excluded.last_pulled",
            )?
            .execute(params![t.repo, t.tag, t.variant, t.digest.as_str(), t.media_type, t.checked_at, now()])
            .map(|_| ())
        })
    }

    async fn touch_tag(&self, repo: &str, tag: &str, variant: &str, checked_at: i64) -> Result<()> {
        self.with(|c| {
            c.prepare_cached("UPDATE tags SET checked_at = ?4 WHERE repo = ?1 AND tag = ?2 AND variant = ?3")?
                .execute(params![repo, tag, variant, checked_at])
                .map(|_| ())
        })
    }

    async fn delete_tag(&self, repo: &str, tag: &str, variant: &str) -> Result<()> {
        self.with(|c| {
            c.prepare_cached("DELETE FROM tags WHERE repo = ?1 AND tag = ?2 AND variant = ?3")?
                .execute(params![repo, tag, variant])
                .map(|_| ())
        })
    }

    async fn manifest(&self, repo: &str, digest: &Digest) -> Result<Linked<ManifestRecord>> {
        self.with(|c| {
            let record = c
                .prepare_cached("SELECT media_type, body FROM manifests WHERE digest = ?1")?
                .query_row(params![digest.as_str()], |r| {
                    Ok(ManifestRecord { digest: digest.clone(), media_type: r.get(0)?, body: Bytes::from(r.get::<_, Vec<u8>>(1)?) })
                })
                .optional()?;
            let pulled: Option<Option<i64>> = match record {
                Some(_) => c
                    .prepare_cached("SELECT pulled_at FROM links WHERE repo = ?1 AND digest = ?2")?
                    .query_row(params![repo, digest.as_str()], |r| r.get(0))
                    .optional()?,
                None => None,
            };
            Ok(Linked { linked: pulled.is_some(), record, pulled_at: pulled.flatten().unwrap_or(0) })
        })
    }

    async fn put_manifest(&self, repo: &str, m: &ManifestRecord, blobs: &[Descriptor]) -> Result<Vec<Digest>> {
        let t = now();
        self.with(|c| {
            let tx = c.transaction()?;
            let mut pending = Vec::new();
            {
                tx.prepare_cached("INSERT OR IGNORE INTO manifests (digest, media_type, body, created_at) VALUES (?1, ?2, ?3, ?4)")?
                    .execute(params![m.digest.as_str(), m.media_type, &m.body[..], t])?;
                tx.prepare_cached(
                    "INSERT INTO links (repo, digest, pulled_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (repo, digest) DO UPDATE SET pulled_at = excluded.pulled_at",
                )?
                .execute(params![repo, m.digest.as_str(), t])?;
                let mut link = tx.prepare_cached("INSERT OR IGNORE INTO links (repo, digest) VALUES (?1, ?2)")?;
                let mut pend = tx.prepare_cached(PEND_BLOB)?;
                let mut touch = tx.prepare_cached("UPDATE blobs SET used_at = ?2 WHERE digest = ?1 AND state = 'ready'")?;
                for Descriptor { digest: b, size } in blobs {
                    link.execute(params![repo, b.as_str()])?;
                    if pend.execute(params![b.as_str(), size.map(|s| s as i64), repo, t])? > 0 {
                        pending.push(b.clone());
                    } else {
                        touch.execute(params![b.as_str(), t])?;
                    }
                }
            }
            tx.commit()?;
            Ok(pending)
        })
    }

    async fn link(&self, repo: &str, digest: &Digest) -> Result<()> {
        self.with(|c| {
            c.prepare_cached("INSERT OR IGNORE INTO links (repo, digest) VALUES (?1, ?2)")?
                .execute(params![repo, digest.as_str()])
                .map(|_| ())
        })
    }

    async fn blob(&self, repo: &str, digest: &Digest) -> Result<Linked<BlobRecord>> {
        self.with(|c| {
            let record = c
                .prepare_cached(&format!("SELECT {BLOB_COLS} FROM blobs WHERE digest = ?1"))?
                .query_row(params![digest.as_str()], blob_row)
                .optional()?;
            let linked = c.prepare_cached("SELECT 1 FROM links WHERE repo = ?1 AND digest = ?2")?.exists(params![repo, digest.as_str()])?;
            Ok(Linked { linked, record, pulled_at: 0 })
        })
    }

    async fn tag_pulled(&self, repo: &str, tag: &str, variant: &str) -> Result<()> {
        self.with(|c| {
            c.prepare_cached("UPDATE tags SET last_pulled = ?4 WHERE repo = ?1 AND tag = ?2 AND variant = ?3")?
                .execute(params![repo, tag, variant, now()])
                .map(|_| ())
        })
    }

    async fn manifest_pulled(&self, repo: &str, digest: &Digest) -> Result<bool> {
        self.with(|c| {
            c.prepare_cached("UPDATE links SET pulled_at = ?3 WHERE repo = ?1 AND digest = ?2")?
                .execute(params![repo, digest.as_str(), now()])
                .map(|n| n > 0)
        })
    }

    async fn touch_blob(&self, digest: &Digest, _via: Option<&str>) -> Result<bool> {
        self.with(|c| {
            c.prepare_cached("UPDATE blobs SET used_at = ?2 WHERE digest = ?1 AND state = 'ready'")?
                .execute(params![digest.as_str(), now()])
                .map(|n| n > 0)
        })
    }
}

#[async_trait]
impl FetchIndex for SqliteIndex {
    async fn create_pending_blob(&self, digest: &Digest, source: &str, size: Option<u64>) -> Result<bool> {
        self.with(|c| c.prepare_cached(PEND_BLOB)?.execute(params![digest.as_str(), size.map(|s| s as i64), source, now()]).map(|n| n > 0))
    }

    async fn claim_blob(&self, digest: &Digest, lease: Duration) -> Result<bool> {
        let t = now();
        self.with(|c| {
            c.prepare_cached(
                "UPDATE blobs SET state = 'fetching', attempts = attempts + 1, updated_at = ?2, lease_until = ?3
                 WHERE digest = ?1 AND (state IN ('pending', 'failed') OR (state = 'fetching' AND COALESCE(lease_until, 0) < ?2))",
            )?
            .execute(params![digest.as_str(), t, t + lease.as_secs() as i64])
            .map(|n| n > 0)
        })
    }

    async fn requeue_stale_blob(&self, digest: &Digest, stale: Duration) -> Result<bool> {
        let t = now();
        self.with(|c| {
            c.prepare_cached(
                "UPDATE blobs SET state = 'pending', updated_at = ?2, lease_until = 0
                 WHERE digest = ?1 AND ((state = 'pending' AND updated_at < ?3)
                                     OR (state = 'fetching' AND COALESCE(lease_until, 0) < ?2))",
            )?
            .execute(params![digest.as_str(), t, t - stale.as_secs() as i64])
            .map(|n| n > 0)
        })
    }

    async fn set_blob_state(&self, digest: &Digest, state: BlobState, size: Option<u64>, error: Option<&str>) -> Result<()> {
        self.with(|c| {
            // Never over a GC delete in progress: its bytes are going. A
            // ready blob stays ready (its bytes are stored, verified): a
            // copy beside it that fails, or ends later, changes nothing.
            c.prepare_cached(
                "UPDATE blobs SET state = ?2, size = COALESCE(?3, size), last_error = ?4, updated_at = ?5,
                     used_at = CASE WHEN ?2 = 'ready' THEN ?5 ELSE used_at END,
                     checkpoint = CASE WHEN ?2 = 'ready' THEN NULL ELSE checkpoint END,
                     lease_until = CASE WHEN ?4 IS NULL THEN 0 ELSE lease_until END
                 WHERE digest = ?1 AND state <> 'deleting' AND (?2 = 'ready' OR state <> 'ready')",
            )?
            .execute(params![digest.as_str(), state.as_str(), size.map(|s| s as i64), error, now()])
            .map(|_| ())
        })
    }

    async fn mark_blob_lost(&self, digest: &Digest, _repos: &[String]) -> Result<bool> {
        self.with(|c| {
            c.prepare_cached(
                "UPDATE blobs SET state = 'pending', updated_at = ?2, lease_until = 0, last_error = ?3
                 WHERE digest = ?1 AND state = 'ready'",
            )?
            .execute(params![digest.as_str(), now(), crate::storage::LOST])
            .map(|n| n > 0)
        })
    }

    async fn unfinished_blobs(&self) -> Result<Vec<BlobRecord>> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(&format!("SELECT {BLOB_COLS} FROM blobs WHERE state IN ('pending', 'fetching')"))?;
            let rows = stmt.query_map([], blob_row)?;
            rows.collect()
        })
    }

    async fn blob_checkpoint(&self, digest: &Digest) -> Result<Option<Checkpoint>> {
        let saved: Option<Option<String>> = self.with(|c| {
            c.prepare_cached("SELECT checkpoint FROM blobs WHERE digest = ?1")?.query_row([digest.as_str()], |r| r.get(0)).optional()
        })?;
        Ok(saved.flatten().as_deref().and_then(Checkpoint::decode))
    }

    async fn save_checkpoint(&self, digest: &Digest, checkpoint: Option<&Checkpoint>) -> Result<()> {
        self.with(|c| match checkpoint {
            Some(cp) => c
                .prepare_cached("UPDATE blobs SET checkpoint = ?2 WHERE digest = ?1 AND state = 'fetching'")?
                .execute(params![digest.as_str(), cp.encode()]),
            None => c.prepare_cached("UPDATE blobs SET checkpoint = NULL WHERE digest = ?1")?.execute([digest.as_str()]),
        })
        .map(|_| ())
    }
}

#[async_trait]
impl SweepIndex for SqliteIndex {
    async fn scan(&self, cursor: Option<String>) -> Result<ScanPage> {
        let mut at: Cursor = match cursor {
            Some(c) => serde_json::from_str(&c).map_err(|e| StorageError::Index(format!("bad sweep cursor: {e}")))?,
            None => Cursor::default(),
        };
        let key = |i: usize| at.key.get(i).cloned().unwrap_or_default();
        let (k0, k1, k2) = (key(0), key(1), key(2));
        let first = at.key.is_empty();
        let entries: Vec<(Vec<String>, Entry)> = self.with(|c| {
            let lim = SCAN_PAGE as i64;
            match at.table {
                0 => {
                    let mut st = c.prepare_cached(&format!(
                        "SELECT {TAG_COLS} FROM tags WHERE ?1 OR (repo, tag, variant) > (?2, ?3, ?4)
                         ORDER BY repo, tag, variant LIMIT ?5"
                    ))?;
                    let rows = st.query_map(params![first, k0, k1, k2, lim], |r| {
                        let t = tag_row(r)?;
                        Ok((vec![t.repo.clone(), t.tag.clone(), t.variant.clone()], Entry::Tag(t)))
                    })?;
                    rows.collect()
                }
                1 => {
                    let mut st = c.prepare_cached(
                        "SELECT l.repo, l.digest, l.pulled_at, EXISTS (SELECT 1 FROM manifests m WHERE m.digest = l.digest)
                         FROM links l WHERE ?1 OR (l.repo, l.digest) > (?2, ?3) ORDER BY l.repo, l.digest LIMIT ?4",
                    )?;
                    let rows = st.query_map(params![first, k0, k1, lim], |r| {
                        let (repo, digest): (String, String) = (r.get(0)?, r.get(1)?);
                        let key = vec![repo.clone(), digest.clone()];
                        let digest = digest_col(digest)?;
                        let entry = if r.get::<_, bool>(3)? {
                            Entry::ManifestLink { repo, digest, pulled_at: r.get::<_, Option<i64>>(2)?.unwrap_or(0) }
                        } else {
                            Entry::BlobLink { repo, digest }
                        };
                        Ok((key, entry))
                    })?;
                    rows.collect()
                }
                2 => {
                    let mut st = c.prepare_cached(
                        "SELECT digest, media_type, body, created_at FROM manifests WHERE ?1 OR digest > ?2 ORDER BY digest LIMIT ?3",
                    )?;
                    let rows = st.query_map(params![first, k0, lim], |r| {
                        let digest: String = r.get(0)?;
                        let record = ManifestRecord {
                            digest: digest_col(digest.clone())?,
                            media_type: r.get(1)?,
                            body: Bytes::from(r.get::<_, Vec<u8>>(2)?),
                        };
                        Ok((vec![digest], Entry::Manifest { record, created_at: r.get(3)? }))
                    })?;
                    rows.collect()
                }
                3 => {
                    let mut st =
                        c.prepare_cached(&format!("SELECT {BLOB_COLS} FROM blobs WHERE ?1 OR digest > ?2 ORDER BY digest LIMIT ?3"))?;
                    let rows = st.query_map(params![first, k0, lim], |r| {
                        let b = blob_row(r)?;
                        Ok((vec![b.digest.as_str().to_owned()], Entry::Blob(b)))
                    })?;
                    rows.collect()
                }
                _ => Ok(Vec::new()),
            }
        })?;
        if at.table > 3 {
            return Ok(ScanPage::default());
        }
        if entries.len() < SCAN_PAGE {
            at = Cursor { table: at.table + 1, key: Vec::new() };
        } else if let Some((k, _)) = entries.last() {
            at.key = k.clone();
        }
        let next = (at.table <= 3).then(|| serde_json::to_string(&at).unwrap_or_default());
        Ok(ScanPage { entries: entries.into_iter().map(|(_, e)| e).collect(), next })
    }

    async fn expire_tag(&self, repo: &str, tag: &str, variant: &str, digest: &Digest, pulled_before: i64) -> Result<bool> {
        self.with(|c| {
            c.prepare_cached("DELETE FROM tags WHERE repo = ?1 AND tag = ?2 AND variant = ?3 AND digest = ?4 AND last_pulled < ?5")?
                .execute(params![repo, tag, variant, digest.as_str(), pulled_before])
                .map(|n| n > 0)
        })
    }

    async fn expire_manifest_link(&self, repo: &str, digest: &Digest, pulled_before: i64) -> Result<bool> {
        self.with(|c| {
            c.prepare_cached("DELETE FROM links WHERE repo = ?1 AND digest = ?2 AND COALESCE(pulled_at, 0) < ?3")?
                .execute(params![repo, digest.as_str(), pulled_before])
                .map(|n| n > 0)
        })
    }

    async fn delete_manifest(&self, digest: &Digest) -> Result<bool> {
        self.with(|c| {
            c.prepare_cached(
                "DELETE FROM manifests WHERE digest = ?1
                 AND NOT EXISTS (SELECT 1 FROM links WHERE digest = ?1)
                 AND NOT EXISTS (SELECT 1 FROM tags WHERE digest = ?1)",
            )?
            .execute(params![digest.as_str()])
            .map(|n| n > 0)
        })
    }

    async fn begin_blob_delete(&self, digest: &Digest, used_before: i64, lease: Duration) -> Result<bool> {
        let t = now();
        self.with(|c| {
            c.prepare_cached(
                "UPDATE blobs SET state = 'deleting', lease_until = ?3, updated_at = ?4
                 WHERE digest = ?1 AND (
                     (state IN ('ready', 'failed') AND (CASE WHEN used_at > 0 THEN used_at ELSE updated_at END) < ?2)
                     OR (state = 'deleting' AND lease_until < ?4))",
            )?
            .execute(params![digest.as_str(), used_before, t + lease.as_secs() as i64, t])
            .map(|n| n > 0)
        })
    }

    async fn finish_blob_delete(&self, digest: &Digest, _repos: &[String]) -> Result<()> {
        self.with(|c| {
            let tx = c.transaction()?;
            if tx.execute("DELETE FROM blobs WHERE digest = ?1 AND state = 'deleting'", params![digest.as_str()])? > 0 {
                tx.execute("DELETE FROM links WHERE digest = ?1", params![digest.as_str()])?;
            }
            tx.commit()
        })
    }
}

#[async_trait]
impl StatsIndex for SqliteIndex {
    async fn add_stats(&self, delta: &StoredStats) -> Result<()> {
        self.with(|c| {
            let tx = c.transaction()?;
            {
                let mut add = tx.prepare_cached(
                    "INSERT INTO stats (name, value) VALUES (?1, ?2) ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                )?;
                for (k, v) in &delta.counters {
                    add.execute(params![k, *v as i64])?;
                }
                if let Some((remaining, at)) = delta.ratelimit_remaining {
                    let mut set = tx.prepare_cached(
                        "INSERT INTO stats (name, value) VALUES (?1, ?2) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                    )?;
                    set.execute(params!["ratelimit_remaining", remaining])?;
                    set.execute(params!["ratelimit_at", at])?;
                }
            }
            tx.commit()
        })
    }

    async fn stats(&self) -> Result<StoredStats> {
        self.with(|c| {
            let mut out = StoredStats::default();
            let (mut remaining, mut at) = (None, None);
            let mut st = c.prepare_cached("SELECT name, value FROM stats")?;
            let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            for row in rows {
                let (k, v) = row?;
                match k.as_str() {
                    "ratelimit_remaining" => remaining = Some(v),
                    "ratelimit_at" => at = Some(v),
                    _ => {
                        out.counters.insert(k, v.max(0) as u64);
                    }
                }
            }
            out.ratelimit_remaining = remaining.zip(at);
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> Digest {
        Digest::parse(&format!("sha256:{}", c.to_string().repeat(64))).unwrap()
    }

    #[tokio::test]
    async fn only_the_first_miss_makes_a_blob_pending() {
        let dir = tempfile::tempdir().unwrap();
        let index = SqliteIndex::open(&dir.path().join("index.db")).unwrap();
        let m = ManifestRecord { digest: d('f'), media_type: "x".into(), body: Bytes::from_static(b"{}") };
        let blobs = [d('a'), d('b')].map(|digest| Descriptor { digest, size: Some(5) });
        let first = index.put_manifest("docker.io/a", &m, &blobs).await.unwrap();
        assert_eq!(first, vec![d('a'), d('b')]);
        let sized = index.unfinished_blobs().await.unwrap().into_iter().map(|b| b.size).collect::<Vec<_>>();
        assert_eq!(sized, vec![Some(5), Some(5)], "pending with the size the manifest declares");
        let again = index.put_manifest("docker.io/b", &m, &blobs).await.unwrap();
        assert!(again.is_empty());
        assert!(!index.create_pending_blob(&d('a'), "docker.io/a", None).await.unwrap());
        index.set_blob_state(&d('a'), BlobState::Failed, None, Some("boom")).await.unwrap();
        assert!(index.create_pending_blob(&d('a'), "docker.io/a", None).await.unwrap());
        assert!(index.blob("docker.io/b", &d('b')).await.unwrap().linked);
        assert!(!index.blob("docker.io/c", &d('b')).await.unwrap().linked);
    }

    #[tokio::test]
    async fn signed_urls_expire_and_bind_the_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).unwrap();
        let later = now() + 60;
        let sig = store.sign(&d('a'), later);
        assert!(store.verify(&d('a'), later, &sig));
        assert!(!store.verify(&d('b'), later, &sig));
        assert!(!store.verify(&d('a'), later + 1, &sig));
        let past = now() - 1;
        assert!(!store.verify(&d('a'), past, &store.sign(&d('a'), past)));
        assert!(!store.verify(&d('a'), later, "zz"));
    }

    #[tokio::test]
    async fn an_uncommitted_blob_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).unwrap();
        let mut w = store.begin(&d('a'), None).await.unwrap();
        w.write(Bytes::from_static(b"partial")).await.unwrap();
        drop(w);
        assert_eq!(store.size(&d('a')).await.unwrap(), None);
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        let mut w = store.begin(&d('a'), None).await.unwrap();
        w.write(Bytes::from_static(b"whole")).await.unwrap();
        w.commit().await.unwrap();
        assert_eq!(store.size(&d('a')).await.unwrap(), Some(5));
    }
}
