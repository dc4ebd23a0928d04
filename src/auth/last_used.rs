//! `last_used_at`, written in batches by a background task — never by the request.
//!
//! The request only compares a per-key atomic timestamp and, at most once per key every
//! `GRANULARITY_SECS`, inserts into a small map under a `std::sync::Mutex` (held for one
//! insert; never across an `.await`). The flusher swaps the map out and writes it with one
//! `UPDATE … FROM unnest(…)`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use super::cache::KeyRecord;

const GRANULARITY_SECS: i64 = 10;

#[derive(Default)]
pub struct LastUsed {
    pending: Mutex<HashMap<String, DateTime<Utc>>>,
}

impl LastUsed {
    pub fn touch(&self, key_id: &str, record: &KeyRecord, now: DateTime<Utc>) {
        let secs = now.timestamp();
        let prev = record.last_used_mark.load(Ordering::Relaxed);
        if secs - prev < GRANULARITY_SECS {
            return;
        }
        record.last_used_mark.store(secs, Ordering::Relaxed);
        if let Ok(mut map) = self.pending.lock() {
            map.insert(key_id.to_owned(), now);
        }
    }

    fn take(&self) -> HashMap<String, DateTime<Utc>> {
        self.pending
            .lock()
            .map(|mut m| std::mem::take(&mut *m))
            .unwrap_or_default()
    }

    pub async fn flush(&self, db: &Pool) -> anyhow::Result<usize> {
        let batch = self.take();
        if batch.is_empty() {
            return Ok(0);
        }
        let (ids, times): (Vec<String>, Vec<DateTime<Utc>>) = batch.into_iter().unzip();
        let client = db.get().await?;
        let n = client
            .execute(
                "UPDATE api_keys k
                    SET last_used_at = GREATEST(COALESCE(k.last_used_at, v.t), v.t)
                   FROM unnest($1::text[], $2::timestamptz[]) AS v(id, t)
                  WHERE k.id = v.id",
                &[&ids, &times],
            )
            .await?;
        Ok(n as usize)
    }

    /// Flushes every `every` until cancelled, then once more.
    pub async fn run(&self, db: Pool, every: Duration, stop: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => break,
            }
            if let Err(e) = self.flush(&db).await {
                tracing::warn!(error = %e, "flushing last_used_at failed; will retry");
            }
        }
        if let Err(e) = self.flush(&db).await {
            tracing::warn!(error = %e, "final last_used_at flush failed");
        }
    }
}
