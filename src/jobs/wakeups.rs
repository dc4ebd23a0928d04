//! In-process wake-ups for the job queue: idle workers wait for "a job was queued", a
//! `POST /v1/scrape` waits for "job X is done". Fed by this instance's own commits (at once)
//! and by the LISTEN connection (other instances' commits). Both are hints: workers and
//! waiters also look at the database on a short timer, so a lost notification delays, never
//! loses, anything.
//!
//! A job this instance ends wakes its waiter and a worker in process ([`Wakeups::job_ended`],
//! [`Wakeups::job_queued`]), and hands the waiter the job as it ended, so the request answers
//! without reading it back; the `done:` notification its commit sends comes back through
//! LISTEN too, and is then dropped ([`Wakeups::ending_here`]): it would only wake a worker for
//! a second, empty claim. Notifications for jobs ended elsewhere wake as before.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::queue::{Job, CHANNEL};
use crate::db::listen::Subscription;

/// At most this many ends recorded here may wait for their notification to come back.
const MAX_ENDING_HERE: usize = 65_536;

#[derive(Default)]
pub struct Wakeups {
    work: Notify,
    waiters: Mutex<HashMap<Uuid, Arc<Slot>>>,
    /// Jobs whose end this instance is recording, until their `done:` comes back.
    ending_here: Mutex<HashSet<Uuid>>,
    /// Workers whose last look at the queue did not find it empty ([`SlotWatch`]).
    watching_slots: AtomicUsize,
    /// Fired shortly before a shutdown's HTTP drain times out: requests still waiting for a
    /// job answer with where to find it instead of being cut off with the connection.
    handoff: CancellationToken,
}

/// What a waiter is woken through, and the job as this instance ended it, when it did.
#[derive(Default)]
struct Slot {
    notify: Notify,
    ended: Mutex<Option<Job>>,
}

/// A registered waiter; unregisters itself when dropped.
pub struct Waiter {
    wakeups: Arc<Wakeups>,
    id: Uuid,
    slot: Arc<Slot>,
}

impl Waiter {
    pub async fn notified(&self) {
        self.slot.notify.notified().await;
    }

    /// The job as this instance's commit ended it ([`Wakeups::job_ended`]): what a read
    /// would return, without the round trip. `None` when it ended elsewhere (or not yet).
    pub fn take_ended(&self) -> Option<Job> {
        self.slot.ended.lock().ok()?.take()
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if let Ok(mut map) = self.wakeups.waiters.lock() {
            map.remove(&self.id);
        }
    }
}

/// One worker's say in whether a freed slot should wake a worker: on from before each claim
/// (so a job that ends while the claim looks cannot be missed) until a claim finds nothing
/// queued; off again when the worker stops.
pub struct SlotWatch {
    wakeups: Arc<Wakeups>,
    on: std::cell::Cell<bool>,
}

impl SlotWatch {
    pub fn set(&self, on: bool) {
        if self.on.replace(on) != on {
            if on {
                self.wakeups.watching_slots.fetch_add(1, Ordering::SeqCst);
            } else {
                self.wakeups.watching_slots.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

impl Drop for SlotWatch {
    fn drop(&mut self) {
        self.set(false);
    }
}

impl Wakeups {
    /// One more job may be claimable.
    pub fn job_queued(&self) {
        self.work.notify_one();
    }

    /// A running job ended, so its account has a free slot: wake a worker if one may be
    /// waiting for it. When every worker's last claim found the queue empty, no queued job
    /// waits for a slot here (one queued since woke a worker itself), and waking one would
    /// only cost an empty claim per finished job.
    pub fn slot_freed(&self) {
        if self.watching_slots.load(Ordering::SeqCst) > 0 {
            self.work.notify_one();
        }
    }

    /// A worker's place in the count [`Wakeups::slot_freed`] reads.
    pub fn watch_slots(self: &Arc<Self>) -> SlotWatch {
        SlotWatch {
            wakeups: self.clone(),
            on: std::cell::Cell::new(false),
        }
    }

    pub async fn work_available(&self) {
        self.work.notified().await;
    }

    /// Registers interest in `id` finishing. Register before the job can finish (before
    /// committing it), so the wake-up cannot be missed: `notify_one` keeps a permit.
    pub fn register(self: &Arc<Self>, id: Uuid) -> Waiter {
        let slot = Arc::new(Slot::default());
        if let Ok(mut map) = self.waiters.lock() {
            map.insert(id, slot.clone());
        }
        Waiter {
            wakeups: self.clone(),
            id,
            slot,
        }
    }

    /// `id` ended (here or elsewhere): its waiter, if any, reads it.
    pub fn job_done(&self, id: Uuid) {
        if let Some(s) = self.slot(id) {
            s.notify.notify_one();
        }
    }

    /// This instance committed `job`'s end: its waiter, if any, is handed the job as it
    /// ended, the committed row (a sync request then answers without reading it back).
    pub fn job_ended(&self, job: Job) {
        if let Some(s) = self.slot(job.id) {
            if let Ok(mut ended) = s.ended.lock() {
                *ended = Some(job);
            }
            s.notify.notify_one();
        }
    }

    /// The registered waiter of `id`, if any (taken out of the lock at once).
    fn slot(&self, id: Uuid) -> Option<Arc<Slot>> {
        self.waiters.lock().ok()?.get(&id).cloned()
    }

    /// Tells every waiting request (now and later) to stop waiting and hand its job off.
    pub fn hand_off(&self) {
        self.handoff.cancel();
    }

    /// Completes once `hand_off` has been called.
    pub async fn handed_off(&self) {
        self.handoff.cancelled().await;
    }

    /// This instance is about to record `id`'s end and will wake in process whoever waits
    /// on it: its `done:` notification, when it comes back through LISTEN, is not needed.
    pub fn ending_here(&self, id: Uuid) {
        if let Ok(mut set) = self.ending_here.lock() {
            // Entries leave when their notification comes back; one only stays when it is
            // lost (a dropped LISTEN connection clears them all). Bound what that can keep.
            if set.len() >= MAX_ENDING_HERE {
                set.clear();
            }
            set.insert(id);
        }
    }

    /// `id`'s end was not recorded here after all (no notification will come from us).
    pub fn not_ended_here(&self, id: Uuid) {
        if let Ok(mut set) = self.ending_here.lock() {
            set.remove(&id);
        }
    }

    /// Whether `id`'s `done:` is this instance's own, already acted on (and forgets it).
    fn ended_here(&self, id: Uuid) -> bool {
        self.ending_here
            .lock()
            .map(|mut set| set.remove(&id))
            .unwrap_or(false)
    }

    /// After a reconnect: anything may have happened meanwhile.
    fn wake_everyone(&self) {
        if let Ok(mut set) = self.ending_here.lock() {
            set.clear();
        }
        self.work.notify_waiters();
        if let Ok(map) = self.waiters.lock() {
            for s in map.values() {
                s.notify.notify_one();
            }
        }
    }

    pub fn subscription(self: &Arc<Self>) -> Subscription {
        let (on_msg, on_connect) = (self.clone(), self.clone());
        Subscription {
            channel: CHANNEL,
            on_message: Arc::new(move |payload: &str| {
                if payload == "queued" {
                    on_msg.job_queued();
                } else if let Some(id) = payload.strip_prefix("done:") {
                    if let Ok(id) = id.parse() {
                        if on_msg.ended_here(id) {
                            return;
                        }
                        on_msg.job_done(id);
                    }
                    // A finished job frees a concurrency slot for its account.
                    on_msg.slot_freed();
                }
            }),
            on_connect: Arc::new(move || on_connect.wake_everyone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn woken(wakeups: &Wakeups) -> bool {
        tokio::time::timeout(Duration::from_millis(20), wakeups.work_available())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_done_notification_wakes_a_worker_only_for_jobs_ended_elsewhere() {
        let wakeups = Arc::new(Wakeups::default());
        let sub = wakeups.subscription();
        let worker = wakeups.watch_slots();
        worker.set(true);
        let (mine, theirs) = (Uuid::now_v7(), Uuid::now_v7());
        wakeups.ending_here(mine);
        (sub.on_message)(&format!("done:{mine}"));
        assert!(!woken(&wakeups).await, "our own end already woke a worker");
        (sub.on_message)(&format!("done:{theirs}"));
        assert!(woken(&wakeups).await, "another instance's end frees a slot");
        // Forgotten once it came back: a later notification for it wakes again.
        (sub.on_message)(&format!("done:{mine}"));
        assert!(woken(&wakeups).await);
    }

    #[tokio::test]
    async fn an_end_not_recorded_here_leaves_its_notification_alone() {
        let wakeups = Arc::new(Wakeups::default());
        let sub = wakeups.subscription();
        let worker = wakeups.watch_slots();
        worker.set(true);
        let id = Uuid::now_v7();
        let waiter = wakeups.register(id);
        wakeups.ending_here(id);
        wakeups.not_ended_here(id);
        (sub.on_message)(&format!("done:{id}"));
        assert!(woken(&wakeups).await);
        tokio::time::timeout(Duration::from_millis(20), waiter.notified())
            .await
            .expect("the waiter is woken by the other instance's end");
    }

    #[tokio::test]
    async fn a_freed_slot_wakes_a_worker_only_while_one_saw_jobs_waiting() {
        let wakeups = Arc::new(Wakeups::default());
        let (a, b) = (wakeups.watch_slots(), wakeups.watch_slots());
        wakeups.slot_freed();
        assert!(!woken(&wakeups).await, "no worker looks for a slot");
        a.set(true);
        b.set(true);
        b.set(false);
        wakeups.slot_freed();
        assert!(woken(&wakeups).await, "a still saw jobs waiting");
        drop(a);
        wakeups.slot_freed();
        assert!(!woken(&wakeups).await, "a stopped");
        // A queued job wakes a worker whatever the count.
        wakeups.job_queued();
        assert!(woken(&wakeups).await);
    }
}
