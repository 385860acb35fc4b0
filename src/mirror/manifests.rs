//! The manifest path: by digest (immutable, served forever once cached),
//! by tag (trusted for the tag TTL, then re-validated with a `HEAD`, served
//! stale when upstream fails), a miss fetched, verified and stored with one
//! upstream request however many clients ask.

use super::*;

/// Most blobs an image manifest, or manifests an index, may reference (a
/// real image has tens of layers; an index, tens of platforms).
pub const MAX_REFERENCES: usize = 1000;

impl Mirror {
    pub async fn manifest(
        &self,
        repo: &RepoPath,
        reference: &Reference,
        accept: &Accept,
    ) -> Result<(ManifestRecord, CacheStatus), RegistryError> {
        match reference {
            Reference::Digest(d) => self.manifest_by_digest(repo, d, accept).await,
            Reference::Tag(t) => {
                // The primary answer is what upstream gives a client that
                // accepts every type; a narrower client gets its own variant.
                let (m, status) = self.resolve_tag(repo, t, &Accept::all()).await?;
                if accept.accepts(&m.media_type) {
                    return Ok((m, status));
                }
                let (m, status) = self.resolve_tag(repo, t, accept).await?;
                if !accept.accepts(&m.media_type) {
                    return Err(not_acceptable(&m));
                }
                Ok((m, status))
            }
        }
    }

    async fn manifest_by_digest(
        &self,
        repo: &RepoPath,
        digest: &Digest,
        accept: &Accept,
    ) -> Result<(ManifestRecord, CacheStatus), RegistryError> {
        let key = repo.key();
        let found = self.index.manifest(&key, digest).await?;
        let (m, status) = match found.record {
            Some(m) if found.linked => {
                if self.stale_mark(found.pulled_at) {
                    self.manifest_pulled(repo, &m).await;
                }
                (m, CacheStatus::Hit)
            }
            _ => {
                let _flight = self.flights.lock(format!("m {key}@{digest}")).await;
                let found = self.index.manifest(&key, digest).await?;
                match found.record {
                    Some(m) if found.linked => (m, CacheStatus::Hit),
                    Some(_) => {
                        // Cached from another repository, perhaps of another
                        // registry: this one must prove it has it by serving
                        // it (a `HEAD 200` proves nothing), the bytes
                        // verified against the digest as on a miss.
                        let upstream = self.upstreams.get(&repo.registry)?;
                        (self.fetch_manifest(upstream, repo, digest.as_str(), &Accept::all(), Some(digest)).await?, CacheStatus::Miss)
                    }
                    None => {
                        let upstream = self.upstreams.get(&repo.registry)?;
                        (self.fetch_manifest(upstream, repo, digest.as_str(), &Accept::all(), Some(digest)).await?, CacheStatus::Miss)
                    }
                }
            }
        };
        if !accept.accepts(&m.media_type) {
            return Err(not_acceptable(&m));
        }
        Ok((m, status))
    }

    /// Records a pull of a manifest by digest in `repo`. When the link is
    /// gone (GC expired it since this instance cached it), the manifest is
    /// stored again, as a miss would store it, from the bytes at hand (a
    /// digest's bytes never change): otherwise GC never learns of the pull,
    /// and what a kept image reaches through it (an index's platform
    /// manifest, its blobs) goes, to be fetched again. A failure to record
    /// it never fails the pull.
    async fn manifest_pulled(&self, repo: &RepoPath, m: &ManifestRecord) {
        let recorded = match self.index.manifest_pulled(&repo.key(), &m.digest).await {
            Ok(true) => Ok(()),
            Ok(false) => match parse_manifest(&m.body, Some(&m.media_type)) {
                Ok(info) => self.store_manifest(repo, m, &info).await,
                Err(e) => Err(e),
            },
            Err(e) => Err(e.into()),
        };
        if let Err(e) = recorded {
            tracing::warn!(repo = %repo, digest = %m.digest, error = %e, "could not record a pull");
        }
    }

    fn tag_is_fresh(&self, t: &TagRecord) -> bool {
        now() - t.checked_at < self.cfg.tag_ttl.as_secs() as i64
    }

    /// Answers a tag for one Accept variant: cached while fresh, re-validated
    /// after its TTL, stale when upstream fails, fetched on a miss.
    async fn resolve_tag(&self, repo: &RepoPath, tag: &str, accept: &Accept) -> Result<(ManifestRecord, CacheStatus), RegistryError> {
        let key = repo.key();
        let variant = accept.key();
        if let Some((t, Some(m))) = self.index.tag_manifest(&key, tag, &variant).await?
            && self.tag_is_fresh(&t)
        {
            self.tag_pulled(&t).await;
            return Ok((m, CacheStatus::Hit));
        }
        let _flight = self.flights.lock(format!("t {key}:{tag}#{variant}")).await;
        let cached = match self.index.tag_manifest(&key, tag, &variant).await? {
            Some((t, Some(m))) => Some((t, m)),
            _ => None,
        };
        let upstream = self.upstreams.get(&repo.registry)?;
        let types = accept.upstream_types();
        if let Some((t, m)) = cached {
            self.tag_pulled(&t).await;
            if self.tag_is_fresh(&t) {
                // Re-validated by the request we waited for.
                return Ok((m, CacheStatus::Hit));
            }
            if self.upstreams.backing_off(&repo.registry) {
                return Ok((m, CacheStatus::Stale));
            }
            // Within the request's deadline too: a stale answer in time beats a
            // fresh one the front end has given up on.
            let within = deadline::cap(self.cfg.revalidate_timeout);
            let head = tokio::time::timeout(within, upstream.head_manifest(repo, tag, &types, Retry::ONCE)).await;
            let failure = match head {
                Ok(Ok(Some((digest, _)))) if digest == t.digest => {
                    self.index.touch_tag(&key, tag, &variant, now()).await?;
                    return Ok((m, CacheStatus::Revalidated));
                }
                Ok(Ok(Some((digest, _)))) => {
                    // The tag moved: take the new manifest by digest (it may
                    // already be cached), then move the tag.
                    match self.manifest_by_digest(repo, &digest, &Accept::all()).await {
                        Ok((new, _)) => {
                            self.put_tag(repo, tag, &variant, &new).await?;
                            return Ok((new, CacheStatus::Revalidated));
                        }
                        Err(e) => e.to_string(),
                    }
                }
                Ok(Ok(None)) => {
                    self.index.delete_tag(&key, tag, &variant).await?;
                    return Err(RegistryError::new(ErrorCode::ManifestUnknown, format!("tag {tag} no longer exists upstream")));
                }
                Ok(Err(e)) => {
                    let pause = match &e {
                        UpstreamError::RateLimited { retry_after: Some(s) } => Duration::from_secs((*s).clamp(1, 300)),
                        _ => self.cfg.upstream_backoff,
                    };
                    self.upstreams.back_off(&repo.registry, pause);
                    e.to_string()
                }
                Err(_) => {
                    self.upstreams.back_off(&repo.registry, self.cfg.upstream_backoff);
                    format!("no answer within {within:.1?}")
                }
            };
            tracing::warn!(repo = %repo, tag, error = %failure, "tag re-validation failed; serving the cached manifest");
            return Ok((m, CacheStatus::Stale));
        }
        let m = self.fetch_manifest(upstream, repo, tag, accept, None).await?;
        self.put_tag(repo, tag, &variant, &m).await?;
        Ok((m, CacheStatus::Miss))
    }

    async fn put_tag(&self, repo: &RepoPath, tag: &str, variant: &str, m: &ManifestRecord) -> Result<(), RegistryError> {
        let record = TagRecord {
            repo: repo.key(),
            tag: tag.to_owned(),
            variant: variant.to_owned(),
            digest: m.digest.clone(),
            media_type: m.media_type.clone(),
            checked_at: now(),
            pulled_at: now(),
        };
        Ok(self.index.put_tag(&record, m).await?)
    }

    /// GETs a manifest upstream, verifies its digest, stores it (linking and
    /// enqueueing what it references).
    async fn fetch_manifest(
        &self,
        upstream: &Upstream,
        repo: &RepoPath,
        reference: &str,
        accept: &Accept,
        expect: Option<&Digest>,
    ) -> Result<ManifestRecord, RegistryError> {
        let got = upstream
            .get_manifest(repo, reference, &accept.upstream_types(), Retry::FETCH)
            .await
            .map_err(|e| upstream_error(e, repo, ErrorCode::ManifestUnknown))?;
        let digest = Digest::of(&got.body);
        let lie = |what: String| {
            RegistryError::new(ErrorCode::ManifestInvalid, format!("upstream {} sent a bad manifest: {what}", repo.registry))
        };
        if let Some(claimed) = &got.digest
            && *claimed != digest
        {
            return Err(lie(format!("its bytes hash to {digest}, not the {claimed} it claimed")));
        }
        if let Some(want) = expect
            && *want != digest
        {
            return Err(lie(format!("asked for {want}, got {digest}")));
        }
        let info = parse_manifest(&got.body, got.content_type.as_deref())?;
        // Each referenced blob is an index write and a fetch: a manifest no
        // runtime could use must not fan out into thousands of them.
        if info.blobs.len() > MAX_REFERENCES || info.manifests.len() > MAX_REFERENCES {
            return Err(lie(format!(
                "it references {} blobs and {} manifests; the mirror takes at most {MAX_REFERENCES} of each",
                info.blobs.len(),
                info.manifests.len()
            )));
        }
        let record = ManifestRecord { digest, media_type: info.media_type.clone(), body: got.body };
        self.store_manifest(repo, &record, &info).await?;
        Ok(record)
    }

    async fn store_manifest(&self, repo: &RepoPath, m: &ManifestRecord, info: &ManifestInfo) -> Result<(), RegistryError> {
        let pending = self.index.put_manifest(&repo.key(), m, &info.blobs).await?;
        // Prefetch: by the time the client asks for the layers, they are on
        // their way into the store.
        for d in pending {
            let size = info.blobs.iter().find(|b| b.digest == d).and_then(|b| b.size);
            self.queue.enqueue(FetchJob { digest: d, source: repo.clone(), size });
        }
        Ok(())
    }

    // -- blobs --------------------------------------------------------------
}
