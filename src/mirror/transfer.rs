//! Reading a blob's bytes from upstream, in order, under the transfer rules:
//! one stream, or (for a large blob when upstream honours `Range`) parts
//! requested several at once and handed back in order, so the copy hashes
//! every byte in sequence while the parts arrive in parallel. At most
//! `parallel_ranges` parts are in flight or waiting, so memory stays at
//! that many parts whatever the blob's size.
//!
//! Every body keeps to the minimum rate (`Pace`): each window must bring
//! `min_rate` × window bytes or the read fails; a quarter window below the
//! rate marks the copy stalled (its fetch slot then goes to another).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use reqwest::StatusCode;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::fetch::FetchError;
use super::upstream::{Retry, Upstream, UpstreamError, UpstreamLimits};
use crate::oci::{Digest, RepoPath};

/// Tries of one part before the copy fails.
const PART_ATTEMPTS: u32 = 3;

/// Bytes of parts in flight or waiting for the reader, at most.
const RANGE_BUFFERS: u64 = 32 << 20;

/// The minimum-rate rule over one body.
pub(super) struct Pace {
    window: Duration,
    need: u64,
    min_rate: u64,
    got: u64,
    window_start: (Instant, u64),
    quarter_start: (Instant, u64),
}

impl Pace {
    fn new(limits: &UpstreamLimits) -> Pace {
        let now = Instant::now();
        Pace {
            window: limits.window,
            need: limits.bytes_per_window(),
            min_rate: limits.min_rate,
            got: 0,
            window_start: (now, 0),
            quarter_start: (now, 0),
        }
    }

    /// The next chunk of `body` (`None` at its end). Fails when a window
    /// brought less than the minimum; sets `stalled` when a quarter window
    /// fell below the rate (returning an empty chunk if nothing came).
    async fn next(
        &mut self,
        body: &mut BoxStream<'static, reqwest::Result<Bytes>>,
        stalled: &mut bool,
    ) -> Result<Option<Bytes>, FetchError> {
        loop {
            let (window_end, quarter_end) = (self.window_start.0 + self.window, self.quarter_start.0 + self.window / 4);
            let next = tokio::time::timeout_at(window_end.min(quarter_end), body.next()).await;
            let chunk = match next {
                Ok(None) => return Ok(None),
                Ok(Some(chunk)) => {
                    let chunk = chunk.map_err(|e| UpstreamError::Transport(format!("blob body cut off after {} bytes: {e}", self.got)))?;
                    self.got += chunk.len() as u64;
                    Some(chunk)
                }
                Err(_) => None,
            };
            let now = Instant::now();
            let mut newly_stalled = false;
            if now >= quarter_end {
                if self.got - self.quarter_start.1 < self.need / 4 {
                    newly_stalled = !*stalled;
                    *stalled = true;
                }
                self.quarter_start = (now, self.got);
            }
            if now >= window_end {
                let got = self.got - self.window_start.1;
                if got < self.need {
                    return Err(FetchError::Upstream(UpstreamError::Transport(format!(
                        "upstream sent {got} bytes in {:?} (after {}), below the minimum of {} bytes/s",
                        self.window, self.window_start.1, self.min_rate
                    ))));
                }
                self.window_start = (now, self.got);
            }
            if chunk.is_some() {
                return Ok(chunk);
            }
            if newly_stalled {
                // Nothing yet, but the reader should know now.
                return Ok(Some(Bytes::new()));
            }
        }
    }
}

/// A blob's bytes, in order.
pub(super) enum Body {
    Stream { body: BoxStream<'static, reqwest::Result<Bytes>>, pace: Pace },
    Parts(Parts),
}

impl Body {
    pub(super) fn stream(resp: reqwest::Response, limits: &UpstreamLimits) -> Body {
        Body::Stream { body: resp.bytes_stream().boxed(), pace: Pace::new(limits) }
    }

    /// The next bytes in order (`None` at the end); `stalled` as `Pace`.
    pub(super) async fn next(&mut self, stalled: &mut bool) -> Result<Option<Bytes>, FetchError> {
        match self {
            Body::Stream { body, pace } => pace.next(body, stalled).await,
            Body::Parts(parts) => parts.next().await,
        }
    }

    /// Asks for no more parts: the ones requested still come, then the
    /// body ends (early). False for a stream, which cannot stop cleanly.
    pub(super) fn wind_down(&mut self) -> bool {
        match self {
            Body::Stream { .. } => false,
            Body::Parts(p) => {
                p.count = p.next;
                true
            }
        }
    }

    /// Parts requested and not yet handed over.
    pub(super) fn in_flight(&self) -> u32 {
        match self {
            Body::Stream { .. } => 0,
            Body::Parts(p) => p.running.len() as u32,
        }
    }

    /// How many parts the body comes in (1 for a stream).
    pub(super) fn parts(&self) -> u64 {
        match self {
            Body::Stream { .. } => 1,
            Body::Parts(p) => p.count,
        }
    }
}

/// What every part request needs.
#[derive(Clone)]
struct Source {
    upstream: Arc<Upstream>,
    repo: RepoPath,
    digest: Digest,
    size: u64,
}

/// A blob in ranged parts, at most `parallel` requested ahead of the one the
/// reader waits for. Parts still running when it is dropped are aborted.
pub(super) struct Parts {
    source: Source,
    /// Where the first part starts.
    from: u64,
    part: u64,
    count: u64,
    parallel: usize,
    /// Index of the next part to request.
    next: u64,
    running: VecDeque<JoinHandle<Result<Bytes, FetchError>>>,
}

impl Drop for Parts {
    fn drop(&mut self) {
        for task in &self.running {
            task.abort();
        }
    }
}

impl Parts {
    /// Asks for the first part of bytes `from..size` of a blob of `size`
    /// bytes with a `Range`: a `206` answer means upstream honours ranges
    /// (the parts follow); a `200` is the whole blob, to read as one stream
    /// from byte 0. Returns the body and the offset it starts at.
    pub(super) async fn start(
        upstream: &Arc<Upstream>,
        repo: &RepoPath,
        digest: &Digest,
        size: u64,
        from: u64,
    ) -> Result<(Body, u64), FetchError> {
        let limits = upstream.limits();
        let parallel = limits.parallel_ranges.max(1);
        // However many ranges run at once, their buffers stay within
        // `RANGE_BUFFERS` (parts shrink to no less than 1 MiB). Parts are
        // balanced so every round of `parallel` requests is full: 40 MiB on
        // 4 connections is 8 parts of 5 MiB (two full rounds), not 5 of 8
        // (a second round of one).
        let left = size - from;
        let largest = limits.range_part.min(RANGE_BUFFERS / parallel as u64).max(1 << 20);
        let rounds = left.div_ceil(largest * parallel as u64).max(1);
        let part = left.div_ceil(rounds * parallel as u64).max(1 << 20);
        let first_end = (from + part).min(size) - 1;
        let resp = upstream.get_blob_range(repo, digest, from, first_end, Retry::FETCH).await?;
        if resp.status() != StatusCode::PARTIAL_CONTENT {
            return Ok((Body::stream(resp, limits), 0));
        }
        let source = Source { upstream: upstream.clone(), repo: repo.clone(), digest: digest.clone(), size };
        let mut parts = Parts { source, from, part, count: left.div_ceil(part), parallel, next: 1, running: VecDeque::new() };
        let first = parts.source.clone();
        parts.running.push_back(tokio::spawn(async move { read_part(&first, from, first_end, Some(resp)).await }));
        Ok((Body::Parts(parts), from))
    }

    /// The rest of a blob of `size` bytes from `from` as one stream (a
    /// `Range: bytes=from-` request): a `200` is the whole blob, from 0.
    /// Returns the body and the offset it starts at.
    pub(super) async fn rest(
        upstream: &Arc<Upstream>,
        repo: &RepoPath,
        digest: &Digest,
        size: u64,
        from: u64,
    ) -> Result<(Body, u64), FetchError> {
        let resp = upstream.get_blob_range(repo, digest, from, size - 1, Retry::FETCH).await?;
        if resp.status() != StatusCode::PARTIAL_CONTENT {
            return Ok((Body::stream(resp, upstream.limits()), 0));
        }
        check_range(&resp, from, size - 1, size)?;
        Ok((Body::stream(resp, upstream.limits()), from))
    }

    async fn next(&mut self) -> Result<Option<Bytes>, FetchError> {
        while self.next < self.count && self.running.len() < self.parallel {
            let (start, source) = (self.from + self.next * self.part, self.source.clone());
            let end = (start + self.part).min(self.source.size) - 1;
            self.running.push_back(tokio::spawn(async move { read_part(&source, start, end, None).await }));
            self.next += 1;
        }
        match self.running.pop_front() {
            None => Ok(None),
            Some(task) => match task.await {
                Ok(part) => part.map(Some),
                Err(e) => Err(FetchError::Rejected(format!("a part download ended: {e}"))),
            },
        }
    }
}

/// Upstream answered exactly bytes `start..=end` of `size`.
fn check_range(resp: &reqwest::Response, start: u64, end: u64, size: u64) -> Result<(), FetchError> {
    let want = format!("bytes {start}-{end}/{size}");
    let got = resp.headers().get(reqwest::header::CONTENT_RANGE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if resp.status() != StatusCode::PARTIAL_CONTENT || (got != want && got != format!("bytes {start}-{end}/*")) {
        return Err(FetchError::BadRange(format!(
            "asked upstream for {want}, it answered HTTP {} with range {got:?}",
            resp.status().as_u16()
        )));
    }
    Ok(())
}

/// Reads bytes `start..=end` (from `resp` when given, the first try),
/// checking upstream answered exactly that range; each part is tried
/// `PART_ATTEMPTS` times.
async fn read_part(s: &Source, start: u64, end: u64, mut resp: Option<reqwest::Response>) -> Result<Bytes, FetchError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = async {
            let resp = match resp.take() {
                Some(r) => r,
                None => s.upstream.get_blob_range(&s.repo, &s.digest, start, end, Retry::FETCH).await?,
            };
            check_range(&resp, start, end, s.size)?;
            let len = end - start + 1;
            let mut pace = Pace::new(s.upstream.limits());
            let mut body = resp.bytes_stream().boxed();
            let mut buf = BytesMut::with_capacity(len as usize);
            let mut stalled = false;
            while let Some(chunk) = pace.next(&mut body, &mut stalled).await? {
                if buf.len() as u64 + chunk.len() as u64 > len {
                    return Err(FetchError::BadRange(format!("upstream sent more than the {len} bytes of range {start}-{end}")));
                }
                buf.extend_from_slice(&chunk);
            }
            if buf.len() as u64 != len {
                return Err(FetchError::Upstream(UpstreamError::Transport(format!(
                    "range {start}-{end} cut off after {} bytes",
                    buf.len()
                ))));
            }
            Ok(buf.freeze())
        }
        .await;
        match result {
            Err(FetchError::Upstream(UpstreamError::Transport(why))) if attempt < PART_ATTEMPTS => {
                tracing::debug!(digest = %s.digest, start, attempt, error = %why, "part download failed, retrying");
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
            other => return other,
        }
    }
}
