//! Reading a blob's bytes from upstream, in order, under the transfer rules:
//! one stream, or (for a large blob when upstream honours `Range`) parts
//! requested several at once and handed back in order, so the copy hashes
//! every byte in sequence while the parts arrive in parallel. At most
//! `parallel_ranges` parts are in flight or waiting, so memory stays at
//! that many parts whatever the blob's size. When the store can write at
//! offsets (a file), each part writes its bytes there as they arrive, and
//! the reader only hashes them. A link fast enough for one connection (the
//! first part's latency and first MiB show it) gets the rest as one stream
//! instead: there parallel parts would only cost.
//!
//! Every body keeps to the minimum rate (`Pace`): each window must bring
//! `min_rate` × window bytes or the read fails; a quarter window below the
//! rate marks the copy stalled (its fetch slot then goes to another). In
//! parts, each part keeps to the rate on its connection, and any part below
//! it marks the copy stalled, even while the reader waits for another.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use reqwest::StatusCode;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::upstream::{Retry, Upstream, UpstreamError, UpstreamLimits};
use crate::oci::{Digest, RepoPath};
use crate::storage::{OffsetWriter, StorageError};

/// Tries of one part before the copy fails.
/// Why a copy failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{0}")]
    Rejected(String),
    /// Upstream answered a `Range` with other bytes: the next try reads
    /// the blob as one stream.
    #[error("{0}")]
    BadRange(String),
    /// The copy stopped at a checkpoint before its deadline: the blob is
    /// `pending` again and the next fetch continues it.
    #[error("copy suspended at byte {0} before the deadline")]
    Suspended(u64),
}

impl FetchError {
    pub(super) fn is_permanent(&self) -> bool {
        matches!(self, FetchError::Upstream(UpstreamError::NotFound | UpstreamError::Denied(_)) | FetchError::Storage(_))
    }
}

const PART_ATTEMPTS: u32 = 3;

/// Bytes of parts in flight or waiting for the reader, at most.
const RANGE_BUFFERS: u64 = 32 << 20;

/// A part's bytes gathered before they are written at their offset.
const PLACE_BATCH: u64 = 256 << 10;

/// Bytes of the first part that show how fast one connection runs.
const PROBE: u64 = 1 << 20;

/// A body's bytes as they come.
type Bytestream = BoxStream<'static, Result<Bytes, FetchError>>;

fn bytes_of(resp: reqwest::Response) -> Bytestream {
    resp.bytes_stream().map(|r| r.map_err(|e| FetchError::Upstream(UpstreamError::Transport(e.to_string())))).boxed()
}

/// `body`, which must bring exactly `len` bytes (of the range from `start`):
/// fewer is a transport failure, more a wrong range.
fn exactly(body: Bytestream, start: u64, len: u64) -> Bytestream {
    futures_util::stream::unfold(Some((body, 0u64)), move |state| async move {
        let (mut body, got) = state?;
        match body.next().await {
            Some(Ok(chunk)) if got + chunk.len() as u64 > len => {
                Some((Err(FetchError::BadRange(format!("upstream sent more than the {len} bytes from {start}"))), None))
            }
            Some(Ok(chunk)) => {
                let got = got + chunk.len() as u64;
                Some((Ok(chunk), Some((body, got))))
            }
            Some(Err(e)) => Some((Err(e), None)),
            None if got == len => None,
            None => {
                Some((Err(FetchError::Upstream(UpstreamError::Transport(format!("{len} bytes from {start} cut off after {got}")))), None))
            }
        }
    })
    .boxed()
}

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
    async fn next(&mut self, body: &mut Bytestream, stalled: &mut bool) -> Result<Option<Bytes>, FetchError> {
        loop {
            let (window_end, quarter_end) = (self.window_start.0 + self.window, self.quarter_start.0 + self.window / 4);
            let next = tokio::time::timeout_at(window_end.min(quarter_end), body.next()).await;
            let chunk = match next {
                Ok(None) => return Ok(None),
                Ok(Some(chunk)) => {
                    let chunk = chunk.map_err(|e| match e {
                        FetchError::Upstream(UpstreamError::Transport(why)) => {
                            FetchError::Upstream(UpstreamError::Transport(format!("blob body cut off after {} bytes: {why}", self.got)))
                        }
                        other => other,
                    })?;
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
    Stream { body: Bytestream, pace: Pace },
    Parts(Parts),
}

impl Body {
    pub(super) fn stream(resp: reqwest::Response, limits: &UpstreamLimits) -> Body {
        Body::Stream { body: bytes_of(resp), pace: Pace::new(limits) }
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

    /// Whether the bytes `next` hands over are already written (at their
    /// offsets): the reader then only hashes them.
    pub(super) fn placed(&self) -> bool {
        matches!(self, Body::Parts(p) if p.source.sink.is_some())
    }

    /// The next bytes in order (`None` at the end); `stalled` as `Pace`.
    pub(super) async fn next(&mut self, stalled: &mut bool) -> Result<Option<Bytes>, FetchError> {
        match self {
            Body::Stream { body, pace } => pace.next(body, stalled).await,
            Body::Parts(parts) => parts.next(stalled).await,
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
    /// Where each part writes its bytes as they arrive, if anywhere.
    sink: Option<Arc<dyn OffsetWriter>>,
    /// Told when a part falls below the minimum rate.
    stalls: Arc<tokio::sync::Notify>,
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
    running: VecDeque<JoinHandle<Result<Vec<Bytes>, FetchError>>>,
    /// What is left of the part being handed over.
    current: VecDeque<Bytes>,
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
    /// from byte 0. Returns the body and the offset it starts at. With a
    /// `sink`, every part writes its bytes there, at their offsets.
    pub(super) async fn start(
        upstream: &Arc<Upstream>,
        repo: &RepoPath,
        digest: &Digest,
        size: u64,
        from: u64,
        sink: Option<Arc<dyn OffsetWriter>>,
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
        let asked = Instant::now();
        let resp = upstream.get_blob_range(repo, digest, from, first_end, Retry::FETCH).await?;
        if resp.status() != StatusCode::PARTIAL_CONTENT {
            return Ok((Body::stream(resp, limits), 0));
        }
        check_range(&resp, from, first_end, size)?;
        let (head, first, fast) = probe(bytes_of(resp), asked, left, limits.one_stream_within).await?;
        let first = futures_util::stream::iter(head.into_iter().map(Ok)).chain(first).boxed();
        if fast && first_end + 1 < size {
            // One connection is fast enough: the first part, then the rest
            // as one stream, asked for now so it is under way meanwhile.
            let (upstream, repo, digest, rest) = (upstream.clone(), repo.clone(), digest.clone(), first_end + 1);
            let asking = tokio::spawn(async move { upstream.get_blob_range(&repo, &digest, rest, size - 1, Retry::FETCH).await });
            let rest = futures_util::stream::once(async move {
                let resp = asking.await.map_err(|e| FetchError::Rejected(format!("the request for the rest ended: {e}")))??;
                check_range(&resp, rest, size - 1, size)?;
                Ok::<_, FetchError>(exactly(bytes_of(resp), rest, size - rest))
            })
            .try_flatten();
            let body = exactly(first, from, first_end + 1 - from).chain(rest).boxed();
            return Ok((Body::Stream { body, pace: Pace::new(limits) }, from));
        }
        let stalls = Arc::default();
        let source = Source { upstream: upstream.clone(), repo: repo.clone(), digest: digest.clone(), size, sink, stalls };
        let count = left.div_ceil(part);
        let mut parts = Parts { source, from, part, count, parallel, next: 1, running: VecDeque::new(), current: VecDeque::new() };
        let source = parts.source.clone();
        parts.running.push_back(tokio::spawn(async move { read_part(&source, from, first_end, Some(first)).await }));
        Ok((Body::Parts(parts), from))
    }

    /// The next bytes in order; an empty chunk when a part has fallen below
    /// the rate while the reader waits (then `stalled` is set).
    async fn next(&mut self, stalled: &mut bool) -> Result<Option<Bytes>, FetchError> {
        if let Some(chunk) = self.current.pop_front() {
            return Ok(Some(chunk));
        }
        while self.next < self.count && self.running.len() < self.parallel {
            let (start, source) = (self.from + self.next * self.part, self.source.clone());
            let end = (start + self.part).min(self.source.size) - 1;
            self.running.push_back(tokio::spawn(async move { read_part(&source, start, end, None).await }));
            self.next += 1;
        }
        let Some(task) = self.running.front_mut() else { return Ok(None) };
        let joined = tokio::select! {
            joined = task => joined,
            () = self.source.stalls.notified(), if !*stalled => {
                *stalled = true;
                return Ok(Some(Bytes::new()));
            }
        };
        self.running.pop_front();
        match joined {
            Ok(part) => {
                self.current = part?.into();
                Ok(Some(self.current.pop_front().unwrap_or_default()))
            }
            Err(e) => Err(FetchError::Rejected(format!("a part download ended: {e}"))),
        }
    }
}

/// Reads the start of a first part, asked for at `asked`, to see whether
/// one connection would bring all `left` bytes within `one_stream_within`
/// (zero: never): the answer's first bytes must come within it, and then
/// `PROBE` bytes (or the end) within the share of the time left that
/// `PROBE` is of `left` (the latency counts once, not per MiB). Returns
/// what it read, the rest of the body, and whether it was that fast.
async fn probe(
    mut body: Bytestream,
    asked: Instant,
    left: u64,
    one_stream_within: Duration,
) -> Result<(Vec<Bytes>, Bytestream, bool), FetchError> {
    let (mut head, mut got) = (Vec::new(), 0u64);
    if one_stream_within.is_zero() {
        return Ok((head, body, false));
    }
    let mut by = asked + one_stream_within;
    while got < PROBE {
        match tokio::time::timeout_at(by, body.next()).await {
            Ok(Some(chunk)) => {
                let chunk = chunk?;
                if head.is_empty() {
                    let now = Instant::now();
                    by = now + (asked + one_stream_within).saturating_duration_since(now).mul_f64(PROBE as f64 / left.max(PROBE) as f64);
                }
                got += chunk.len() as u64;
                head.push(chunk);
            }
            Ok(None) => break,
            // Too slow for one stream: what came is the part's start.
            Err(_) => return Ok((head, body, false)),
        }
    }
    Ok((head, body, Instant::now() <= by))
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

/// Reads bytes `start..=end` (from `first` when given, the first try: an
/// answer already checked), checking upstream answered exactly that range
/// and sent exactly its bytes, and writes them to the source's sink as they
/// come; each part is tried `PART_ATTEMPTS` times
/// (a later try writes the whole range again).
async fn read_part(s: &Source, start: u64, end: u64, mut first: Option<Bytestream>) -> Result<Vec<Bytes>, FetchError> {
    let (mut attempt, mut told) = (0, false);
    loop {
        attempt += 1;
        let result = async {
            let body = match first.take() {
                Some(body) => body,
                None => {
                    let resp = s.upstream.get_blob_range(&s.repo, &s.digest, start, end, Retry::FETCH).await?;
                    check_range(&resp, start, end, s.size)?;
                    bytes_of(resp)
                }
            };
            let len = end - start + 1;
            let mut body = exactly(body, start, len);
            let mut pace = Pace::new(s.upstream.limits());
            // The part's bytes in one allocation of its size (network chunks
            // kept as they come could each pin a larger buffer), cut into
            // pieces of `PLACE_BATCH` (and the last) as they are written to
            // the sink.
            let (mut buf, mut pieces, mut placed) = (BytesMut::with_capacity(len as usize), Vec::new(), 0u64);
            let mut stalled = false;
            while let Some(chunk) = pace.next(&mut body, &mut stalled).await? {
                if stalled && !std::mem::replace(&mut told, true) {
                    s.stalls.notify_one();
                }
                buf.extend_from_slice(&chunk);
                let last = placed + buf.len() as u64 == len;
                if let Some(sink) = s.sink.as_ref().filter(|_| !buf.is_empty() && (last || buf.len() as u64 >= PLACE_BATCH)) {
                    let piece = buf.split().freeze();
                    sink.write_at(start + placed, piece.clone()).await?;
                    placed += piece.len() as u64;
                    pieces.push(piece);
                }
            }
            if !buf.is_empty() {
                pieces.push(buf.freeze());
            }
            Ok(pieces)
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
