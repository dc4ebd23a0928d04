//! In-process wake-ups for the job queue: idle workers wait for "a job was queued", a
//! `POST /v1/scrape` waits for "job X is done". Fed by this instance's own commits (at once)
//! and by the LISTEN connection (other instances' commits). Both are hints: workers and
//! waiters also look at the database on a short timer, so a lost notification delays, never
//! loses, anything.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::queue::CHANNEL;
use crate::db::listen::Subscription;

#[derive(Default)]
pub struct Wakeups {
    work: Notify,
    waiters: Mutex<HashMap<Uuid, Arc<Notify>>>,
    /// Fired shortly before a shutdown's HTTP drain times out: requests still waiting for a
    /// job answer with where to find it instead of being cut off with the connection.
    handoff: CancellationToken,
}

/// A registered waiter; unregisters itself when dropped.
pub struct Waiter {
    wakeups: Arc<Wakeups>,
    id: Uuid,
    notify: Arc<Notify>,
}

impl Waiter {
    pub async fn notified(&self) {
        self.notify.notified().await;
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if let Ok(mut map) = self.wakeups.waiters.lock() {
            map.remove(&self.id);
        }
    }
}

impl Wakeups {
    /// One more job may be claimable.
    pub fn job_queued(&self) {
        self.work.notify_one();
    }

    pub async fn work_available(&self) {
        self.work.notified().await;
    }

    /// Registers interest in `id` finishing. Register before the job can finish (before
    /// committing it), so the wake-up cannot be missed: `notify_one` keeps a permit.
    pub fn register(self: &Arc<Self>, id: Uuid) -> Waiter {
        let notify = Arc::new(Notify::new());
        if let Ok(mut map) = self.waiters.lock() {
            map.insert(id, notify.clone());
        }
        Waiter {
            wakeups: self.clone(),
            id,
            notify,
        }
    }

    pub fn job_done(&self, id: Uuid) {
        let notify = self.waiters.lock().ok().and_then(|m| m.get(&id).cloned());
        if let Some(n) = notify {
            n.notify_one();
        }
    }

    /// Tells every waiting request (now and later) to stop waiting and hand its job off.
    pub fn hand_off(&self) {
        self.handoff.cancel();
    }

    /// Completes once `hand_off` has been called.
    pub async fn handed_off(&self) {
        self.handoff.cancelled().await;
    }

    /// After a reconnect: anything may have happened meanwhile.
    fn wake_everyone(&self) {
        self.work.notify_waiters();
        if let Ok(map) = self.waiters.lock() {
            for n in map.values() {
                n.notify_one();
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
                        on_msg.job_done(id);
                    }
                    // A finished job frees a concurrency slot for its account.
                    on_msg.job_queued();
                }
            }),
            on_connect: Arc::new(move || on_connect.wake_everyone()),
        }
    }
}
