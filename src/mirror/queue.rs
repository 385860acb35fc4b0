//! The in-process fetch queue (`LocalQueue`): runs `Fetcher` copies with
//! bounded concurrency, one copy per digest and registry, and lets requests
//! wait for or follow a copy under way. `IndexQueue` is the AWS one, where
//! the index write is the enqueue and a DynamoDB Stream runs the fetcher.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Semaphore, watch};

use super::fetch::{FetchJob, Fetcher, Slot};
use super::follow::Follow;
use crate::oci::Digest;

/// What a wait for a blob's fetch came to.
#[derive(Debug, PartialEq, Eq)]
pub enum WaitOutcome {
    /// The fetch finished (ready or failed: the index says which), or none
    /// was running.
    Done,
    TimedOut,
}

/// Where fetch jobs go. Locally an in-process queue; on AWS the index write
/// itself is the enqueue (a DynamoDB Stream triggers the fetcher).
#[async_trait]
pub trait FetchQueue: Send + Sync {
    /// Starts a fetch unless one for this digest is already running.
    fn enqueue(&self, job: FetchJob);
    /// Waits for the running fetch of `digest` (the one from `registry`,
    /// when there are several) to finish, at most `timeout`.
    async fn wait(&self, digest: &Digest, registry: &str, timeout: Duration) -> WaitOutcome;
    /// The copy of `digest` from `registry` running in this process, to
    /// follow while it runs (`None`: none here, or its bytes cannot be read
    /// until stored).
    fn follow(&self, _digest: &Digest, _registry: &str) -> Option<Follow> {
        None
    }
    /// Whether `follow` may ever find a copy here.
    fn follows(&self) -> bool {
        false
    }
    /// Whether a blob asked for by one registry while its copy runs from
    /// another is copied beside it (`enqueue`), rather than waited for.
    fn copies_beside(&self) -> bool {
        false
    }
}

/// Copies (stalled ones included) allowed per fetch slot.
const STRAGGLERS: usize = 4;

/// In-process fetch queue: at most `concurrency` copies making progress at
/// once (`STRAGGLERS` times that counting stalled ones), and at most one per
/// digest and registry. Jobs wait in one line per upstream registry, and a
/// free slot goes to the next registry in turn: a registry whose thousand
/// layers fail slowly delays another's by one copy at most, not by the
/// thousand. A blob asked for by one registry while its copy runs from
/// another is copied beside it (`Fetcher::fetch_beside`): one registry's
/// source cannot hold another's clients hostage.
pub struct LocalQueue {
    fetcher: Arc<Fetcher>,
    /// Running and waiting fetches by digest, with the registry they copy
    /// from; the receiver turns `true` when the fetch ends.
    running: Arc<Mutex<Running>>,
    waiting: Arc<Mutex<Waiting>>,
    /// Wakes the dispatcher: a job is waiting, or the queue is gone.
    wake: Arc<tokio::sync::Notify>,
}

#[derive(Default)]
struct Running {
    leased: HashMap<Digest, (String, watch::Receiver<bool>)>,
    beside: HashMap<(Digest, String), watch::Receiver<bool>>,
}

/// A job not started yet: copied under the blob's lease, or beside it.
struct Queued {
    job: FetchJob,
    done: watch::Sender<bool>,
    beside: bool,
}

/// Jobs not started yet, a line per registry, and whose turn is next.
#[derive(Default)]
struct Waiting {
    lines: HashMap<String, VecDeque<Queued>>,
    turns: VecDeque<String>,
    closed: bool,
}

impl Waiting {
    fn push(&mut self, queued: Queued) {
        let registry = queued.job.source.registry.clone();
        let line = self.lines.entry(registry.clone()).or_default();
        if line.is_empty() {
            self.turns.push_back(registry);
        }
        line.push_back(queued);
    }

    /// The next registry's first job; that registry goes to the back.
    fn pop(&mut self) -> Option<Queued> {
        let registry = self.turns.pop_front()?;
        let line = self.lines.get_mut(&registry)?;
        let next = line.pop_front();
        if line.is_empty() {
            self.lines.remove(&registry);
        } else {
            self.turns.push_back(registry);
        }
        next
    }
}

impl LocalQueue {
    /// The queue and its dispatcher (on the current Tokio runtime).
    pub fn new(fetcher: Arc<Fetcher>, concurrency: usize) -> LocalQueue {
        let n = concurrency.max(1);
        let q = LocalQueue { fetcher: fetcher.clone(), running: Arc::default(), waiting: Arc::default(), wake: Arc::default() };
        let (slots, copies) = (Arc::new(Semaphore::new(n)), Arc::new(Semaphore::new(n * STRAGGLERS)));
        let (waiting, wake, running) = (q.waiting.clone(), q.wake.clone(), q.running.clone());
        tokio::spawn(async move {
            loop {
                // A copy's place and a slot first, then the next job in turn.
                let (Ok(copy), Ok(slot)) = (copies.clone().acquire_owned().await, slots.clone().acquire_owned().await) else { return };
                let queued = loop {
                    let next = {
                        let mut w = waiting.lock().unwrap_or_else(|p| p.into_inner());
                        if w.closed {
                            return;
                        }
                        w.pop()
                    };
                    match next {
                        Some(q) => break q,
                        None => wake.notified().await,
                    }
                };
                let (fetcher, running) = (fetcher.clone(), running.clone());
                tokio::spawn(async move {
                    let Queued { job, done, beside } = queued;
                    let mut slot = Slot(Some(slot));
                    let _ = match beside {
                        true => fetcher.fetch_beside(&job, &mut slot).await,
                        false => fetcher.fetch_in(&job, &mut slot, None).await,
                    };
                    drop((slot, copy));
                    let mut r = running.lock().unwrap_or_else(|p| p.into_inner());
                    match beside {
                        true => r.beside.remove(&(job.digest.clone(), job.source.registry.clone())),
                        false => r.leased.remove(&job.digest).map(|(_, rx)| rx),
                    };
                    let _ = done.send(true);
                });
            }
        });
        q
    }
}

impl Drop for LocalQueue {
    fn drop(&mut self) {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
        self.wake.notify_one();
    }
}

#[async_trait]
impl FetchQueue for LocalQueue {
    fn enqueue(&self, job: FetchJob) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let registry = job.source.registry.clone();
        let beside = match running.leased.get(&job.digest) {
            None => false,
            Some((from, _)) if *from == registry => return,
            Some(_) if running.beside.contains_key(&(job.digest.clone(), registry.clone())) => return,
            Some(_) => true,
        };
        let (done, rx) = watch::channel(false);
        match beside {
            true => running.beside.insert((job.digest.clone(), registry), rx),
            false => running.leased.insert(job.digest.clone(), (registry, rx)).map(|(_, rx)| rx),
        };
        self.waiting.lock().unwrap_or_else(|p| p.into_inner()).push(Queued { job, done, beside });
        self.wake.notify_one();
    }

    async fn wait(&self, digest: &Digest, registry: &str, timeout: Duration) -> WaitOutcome {
        let rx = {
            let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            running.beside.get(&(digest.clone(), registry.to_owned())).or(running.leased.get(digest).map(|(_, rx)| rx)).cloned()
        };
        let Some(mut rx) = rx else { return WaitOutcome::Done };
        match tokio::time::timeout(timeout, rx.wait_for(|done| *done)).await {
            Ok(_) => WaitOutcome::Done,
            Err(_) => WaitOutcome::TimedOut,
        }
    }

    fn follow(&self, digest: &Digest, registry: &str) -> Option<Follow> {
        self.fetcher.follow(digest, registry)
    }

    fn follows(&self) -> bool {
        true
    }

    fn copies_beside(&self) -> bool {
        true
    }
}

/// The queue when the index itself is the queue (AWS): writing a `pending`
/// blob item emits the stream record that runs the fetcher Lambda, so there
/// is nothing to enqueue here, and waiting means polling the index.
pub struct IndexQueue;

#[async_trait]
impl FetchQueue for IndexQueue {
    fn enqueue(&self, _job: FetchJob) {}

    async fn wait(&self, _digest: &Digest, _registry: &str, _timeout: Duration) -> WaitOutcome {
        WaitOutcome::Done
    }
}
