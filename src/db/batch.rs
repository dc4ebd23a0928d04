//! The queue behind group commit and batched reads: requests that arrive while a batch is
//! in flight wait together and go as the next batch.
//!
//! One leader at a time drains a [`Batcher`]: the first request of a quiet moment starts a
//! drain task, which takes everything queued, runs it, and takes again until the queue is
//! empty. The drain runs on the service's own runtime, not on the HTTP worker whose request
//! happened to come first: on shutdown actix stops an idle worker's runtime at once, and a
//! batch running there would be dropped half-way, its requests on other workers unanswered.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::runtime::Handle;

pub struct Batcher<T> {
    pending: Mutex<Vec<T>>,
    running: AtomicBool,
    runtime: Handle,
}

impl<T: Send + 'static> Batcher<T> {
    /// `runtime`: the service's runtime, which outlives the HTTP workers'.
    pub fn new(runtime: Handle) -> Self {
        Self {
            pending: Mutex::default(),
            running: AtomicBool::new(false),
            runtime,
        }
    }

    /// Queues `item`; when no drain is running, starts `drain` (which loops on
    /// [`Batcher::next_batch`]) in its own task — a client hanging up must not abandon the
    /// requests batched with it.
    pub fn push<F, Fut>(self: &Arc<Self>, item: T, drain: F)
    where
        F: FnOnce(Arc<Self>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(item);
        if !self.running.swap(true, Ordering::AcqRel) {
            self.runtime.spawn(drain(self.clone()));
        }
    }

    /// The next batch, oldest first and at most `max` long; `None` once the queue is empty,
    /// when the caller is no longer the leader and must return.
    pub fn next_batch(&self, max: usize) -> Option<Vec<T>> {
        loop {
            let batch = {
                let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                let cut = pending.len().min(max);
                let rest = pending.split_off(cut);
                std::mem::replace(&mut *pending, rest)
            };
            if !batch.is_empty() {
                return Some(batch);
            }
            self.running.store(false, Ordering::Release);
            // An item may have been queued between the take and the store: if so, and nobody
            // else took the lead since, keep leading.
            let more = !self.pending.lock().map(|p| p.is_empty()).unwrap_or(true);
            if !more || self.running.swap(true, Ordering::AcqRel) {
                return None;
            }
        }
    }
}

/// A lane's requests in progress. One that finds none in progress has no batch to join: it
/// may run alone from its own task rather than hop to a drain task and back (what a lone
/// request pays for a lane, in latency, and gets nothing for). Under concurrency the others
/// find it in progress and batch in the lane as before.
#[derive(Default)]
pub struct InProgress(AtomicUsize);

impl InProgress {
    /// Counts a request in until the returned guard is dropped (its caller may be dropped
    /// half-way: a request hanging up).
    pub fn enter(&self) -> Entered<'_> {
        let before = self.0.fetch_add(1, Ordering::AcqRel);
        Entered {
            count: &self.0,
            alone: before == 0,
        }
    }
}

/// One request counted in an [`InProgress`].
pub struct Entered<'a> {
    count: &'a AtomicUsize,
    /// No other request was in progress when this one entered.
    pub alone: bool,
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}
