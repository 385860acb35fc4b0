//! Clients following a copy: a request for a cold blob on the embedded
//! backend gets its bytes as they reach the store, from the one upstream
//! copy however many clients wait, instead of waiting for the whole blob
//! (containerd and podman try a layer once; a large cold layer from a slow
//! upstream outlasts any wait). The bytes are not verified while they go
//! out, so the last one is held back until the copy commits: a copy that
//! turns out corrupt cuts its followers' connections and never sends them a
//! complete wrong body (clients check the digest of what they get).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::watch;

use crate::oci::Digest;
use crate::storage::PartialBlob;

/// Bytes read from the store per piece sent to a follower.
const PIECE: usize = 256 << 10;

/// A copy under way in this process, as clients waiting for its blob may
/// follow it: the current attempt's bytes in the store (a retry replaces
/// them), the size it must end at, and how it ended.
#[derive(Clone)]
pub struct Follow {
    pub partial: watch::Receiver<Option<Arc<dyn PartialBlob>>>,
    pub size: Option<u64>,
    /// `Some(true)` once the blob is stored (verified), `Some(false)` once
    /// the fetch failed or stopped.
    pub outcome: watch::Receiver<Option<bool>>,
}

/// The copies under way in this process, by digest and the registry they
/// copy from.
#[derive(Default)]
pub(super) struct Following(Mutex<HashMap<(Digest, String), Follow>>);

/// A fetch's entry in `Following`, for as long as it runs: how it ended is
/// told when it is dropped.
pub(super) struct Followed<'a> {
    following: &'a Following,
    key: (Digest, String),
    pub(super) partial: watch::Sender<Option<Arc<dyn PartialBlob>>>,
    outcome: watch::Sender<Option<bool>>,
}

impl Following {
    pub(super) fn start(&self, digest: &Digest, registry: &str, size: Option<u64>) -> Followed<'_> {
        let (partial, partial_rx) = watch::channel(None);
        let (outcome, outcome_rx) = watch::channel(None);
        let follow = Follow { partial: partial_rx, size, outcome: outcome_rx };
        let key = (digest.clone(), registry.to_owned());
        self.0.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone(), follow);
        Followed { following: self, key, partial, outcome }
    }
}

impl Followed<'_> {
    pub(super) fn ended(&self, stored: bool) {
        self.outcome.send_replace(Some(stored));
    }
}

impl Drop for Followed<'_> {
    fn drop(&mut self) {
        self.outcome.send_if_modified(|o| o.is_none() && o.replace(false).is_none());
        self.following.0.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.key);
    }
}

impl Following {
    /// The copy of `digest` from `registry` under way, if any.
    pub(super) fn get(&self, digest: &Digest, registry: &str) -> Option<Follow> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).get(&(digest.clone(), registry.to_owned())).cloned()
    }
}

impl Follow {
    /// The blob's bytes in order, as the copy brings them: its last byte
    /// only once the copy is stored (verified); an error, which cuts the
    /// client's connection, when it fails.
    pub fn into_stream(self) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
        futures_util::stream::unfold((self, 0u64, false), |(mut f, sent, over)| async move {
            if over {
                return None;
            }
            loop {
                let partial = f.partial.borrow().clone();
                let stored = *f.outcome.borrow() == Some(true);
                if let Some(p) = &partial {
                    let avail = p.readable();
                    // Unverified: the end is held back until it is stored.
                    let end = match (stored, f.size) {
                        (true, Some(size)) => size.min(avail),
                        (true, None) => avail,
                        (false, Some(size)) => avail.min(size.saturating_sub(1)),
                        (false, None) => avail.saturating_sub(1),
                    };
                    if sent < end {
                        let len = (end - sent).min(PIECE as u64) as usize;
                        return match p.read_at(sent, len).await {
                            Ok(piece) if !piece.is_empty() => {
                                let n = piece.len() as u64;
                                Some((Ok(piece), (f, sent + n, false)))
                            }
                            Ok(_) => Some((Err(std::io::Error::other("the copy's bytes are gone")), (f, sent, true))),
                            Err(e) => Some((Err(std::io::Error::other(e.to_string())), (f, sent, true))),
                        };
                    }
                    if stored && f.size.is_none_or(|size| sent >= size) {
                        return None;
                    }
                }
                if partial.is_none() && f.outcome.borrow().is_some() {
                    return Some((Err(std::io::Error::other("the blob's copy ended with nothing to follow")), (f, sent, true)));
                }
                if *f.outcome.borrow() == Some(false) {
                    return Some((Err(std::io::Error::other("the blob's copy from upstream failed")), (f, sent, true)));
                }
                // More bytes, another attempt's, or the end.
                let grown = async {
                    match &partial {
                        Some(p) => p.grown(sent).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = grown => {}
                    _ = f.partial.changed() => {}
                    _ = f.outcome.changed() => {}
                }
            }
        })
    }
}
