//! Delivering account events to webhook endpoints: signed POSTs, at least once, retried
//! with backoff for a day, fair between accounts, on any instance.
//!
//! - **Fan-out in the recording transaction**: a trigger on `events` (V14) writes one
//!   `event_deliveries` row per subscribed endpoint in the statement that records the event,
//!   and NOTIFYs `keymeter_event_deliveries`. So a committed event always has its deliveries
//!   and a rolled-back one never does, and nothing here reads `events` by `seq` — whose order
//!   is not commit order, so a "seq > last seen" reader would skip a slow transaction's event.
//! - **Prompt**: the NOTIFY wakes every instance's sender as the transaction commits; a short
//!   poll is the backstop (and what brings retries due).
//! - **One sender at a time per attempt, across instances**: a claim takes due rows with
//!   `FOR UPDATE SKIP LOCKED` and pushes their next attempt out by a lease longer than a
//!   request can take, counting the attempt; the outcome is written fenced by that count, so
//!   an instance whose lease ran out cannot overwrite a newer claim (a late success is still
//!   recorded: the receiver got it).
//! - **One account's receiver cannot delay another's**: the claim is the job webhooks' round
//!   robin (V7, `jobs::webhooks`) — one due delivery per account and per destination origin
//!   each pass, none for an account or origin already at its in-flight limit — and each
//!   delivery runs on its own task, so a receiver that accepts and never answers holds only
//!   its own account's slots. The backlog stays in PostgreSQL; memory is bounded by the
//!   in-flight limit.
//! - **Signed as Stripe signs**: `Keymeter-Signature: t=<unix>,v1=<hex HMAC-SHA256 of
//!   "<t>.<body>">`, keyed with the endpoint's secret exactly as shown (`whsec_…`); during a
//!   rotation's overlap a second `v1` signed with the previous secret follows. The body is
//!   `{id, type, created_at, account_id, data}`; `id` (also `Keymeter-Event-Id`) is the same
//!   on every retry, for the receiver to deduplicate on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::Mac;
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use url::Url;
use uuid::Uuid;

use super::endpoints::secret_for;
use super::Event;
use crate::config::EventsSettings;
use crate::jobs::ssrf::{AllowList, Guard};

pub const SIGNATURE_HEADER: &str = "Keymeter-Signature";
pub const EVENT_ID_HEADER: &str = "Keymeter-Event-Id";
pub const EVENT_TYPE_HEADER: &str = "Keymeter-Event-Type";
/// The channel the fan-out trigger NOTIFYs.
pub const CHANNEL: &str = "keymeter_event_deliveries";

/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// `t=<timestamp>,v1=<sig>[,v1=<sig>…]`: one signature per secret, in the order given.
pub fn signature_header(secrets: &[String], timestamp: i64, body: &[u8]) -> String {
    let mut out = format!("t={timestamp}");
    for secret in secrets {
        let mut mac = crate::jobs::webhooks::hmac_sha256(secret.as_bytes());
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        out.push_str(",v1=");
        out.push_str(&hex::encode(mac.finalize().into_bytes()));
    }
    out
}

/// A claimed delivery: what to send, and the attempt number that fences its outcome.
struct Claimed {
    id: i64,
    account_id: Uuid,
    origin: String,
    attempt: i32,
    endpoint_id: Uuid,
    url: String,
    generation: i32,
    previous_until: Option<DateTime<Utc>>,
    event: Event,
}

/// What came of one attempt.
enum Outcome {
    Delivered(u16),
    Failed { status: Option<u16>, error: String },
}

/// Sends due deliveries; cheap to clone (the HTTP client and the resolver are shared).
#[derive(Clone)]
pub struct Sender {
    client: reqwest::Client,
    guard: Guard,
    settings: EventsSettings,
    wake: Arc<tokio::sync::Notify>,
}

impl Sender {
    pub fn new(allow: AllowList, settings: EventsSettings) -> anyhow::Result<Sender> {
        let guard = Guard::new(allow, None);
        let client = reqwest::Client::builder()
            .user_agent(concat!("keymeter-events/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .timeout(settings.timeout)
            .dns_resolver(guard.resolver())
            .no_proxy()
            .build()?;
        Ok(Sender {
            client,
            guard,
            settings,
            wake: Arc::default(),
        })
    }

    /// The SSRF guard endpoint URLs are vetted by.
    pub fn guard(&self) -> &Guard {
        &self.guard
    }

    pub fn settings(&self) -> &EventsSettings {
        &self.settings
    }

    pub fn signing_key(&self) -> Option<&SecretString> {
        self.settings.signing_key.as_ref()
    }

    /// Wakes the sender when a transaction that queued deliveries commits (on any instance),
    /// and after the LISTEN connection (re)connects, since a notification may have been lost.
    pub fn subscription(&self) -> crate::db::listen::Subscription {
        let (on_message, on_connect) = (self.wake.clone(), self.wake.clone());
        crate::db::listen::Subscription {
            channel: CHANNEL,
            on_message: Arc::new(move |_: &str| on_message.notify_one()),
            on_connect: Arc::new(move || on_connect.notify_one()),
        }
    }

    fn backoff(&self, attempts: i32) -> Duration {
        let exp = u32::try_from(attempts.saturating_sub(1))
            .unwrap_or(0)
            .min(20);
        self.settings
            .retry_base
            .saturating_mul(2u32.saturating_pow(exp))
            .min(MAX_BACKOFF)
    }

    /// Sends due deliveries until cancelled: claims a fair share whenever a slot is free, runs
    /// each on its own task and records each outcome as soon as it is known.
    pub async fn run(&self, db: deadpool_postgres::Pool, stop: CancellationToken) {
        if self.settings.signing_key.is_none() {
            return;
        }
        let this = Arc::new(self.clone());
        let in_flight = Arc::new(InFlight::default());
        let tasks = TaskTracker::new();
        let mut cursor = Uuid::nil();
        loop {
            if stop.is_cancelled() {
                break;
            }
            let free = self
                .settings
                .max_in_flight
                .saturating_sub(in_flight.total());
            let claimed = if free == 0 {
                Vec::new()
            } else {
                match self.claim_fairly(&db, &in_flight, &mut cursor, free).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "claiming event deliveries failed");
                        Vec::new()
                    }
                }
            };
            let n = claimed.len();
            for d in claimed {
                let slot = in_flight.take(d.account_id, &d.origin);
                let (this, db, stop) = (this.clone(), db.clone(), stop.clone());
                tasks.spawn(async move {
                    this.deliver(&db, d, &stop).await;
                    drop(slot);
                });
            }
            if n > 0 {
                continue;
            }
            tokio::select! {
                () = in_flight.freed.notified() => {}
                () = self.wake.notified() => {}
                () = tokio::time::sleep(self.settings.poll) => {}
                () = stop.cancelled() => break,
            }
        }
        tasks.close();
        tasks.wait().await;
    }

    /// One pass of the round robin from the account after `cursor` (wrapping around once).
    async fn claim_fairly(
        &self,
        db: &deadpool_postgres::Pool,
        in_flight: &InFlight,
        cursor: &mut Uuid,
        free: usize,
    ) -> Result<Vec<Claimed>, crate::db::Error> {
        let client = db.get().await?;
        let (busy_accounts, busy_origins) =
            in_flight.busy(self.settings.per_account, self.settings.per_destination);
        let mut claimed = self
            .claim_after(&client, *cursor, free, &busy_accounts, &busy_origins)
            .await?;
        if claimed.len() < free && !cursor.is_nil() {
            let more = self
                .claim_after(
                    &client,
                    Uuid::nil(),
                    free - claimed.len(),
                    &busy_accounts,
                    &busy_origins,
                )
                .await?;
            *cursor = Uuid::nil();
            claimed.extend(more);
        }
        if let Some(last) = claimed.iter().map(|d| d.account_id).max() {
            *cursor = (*cursor).max(last);
        }
        Ok(claimed)
    }

    /// Claims up to `limit` due deliveries — one per account (accounts in id order after
    /// `after`, found by a skip scan over the pending index) and one per origin, none for a
    /// busy account or origin — leasing each and counting its attempt.
    async fn claim_after(
        &self,
        client: &deadpool_postgres::Client,
        after: Uuid,
        limit: usize,
        busy_accounts: &[Uuid],
        busy_origins: &[String],
    ) -> Result<Vec<Claimed>, crate::db::Error> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let scan = limit.saturating_add(i64::try_from(busy_accounts.len()).unwrap_or(0));
        let lease = self.settings.timeout.as_secs_f64() * 2.0 + 5.0;
        let rows = client
            .query(
                "WITH RECURSIVE accts(account_id, n) AS (
                     (SELECT account_id, 1::bigint FROM event_deliveries
                       WHERE delivered_at IS NULL AND failed_at IS NULL
                         AND next_attempt_at <= now() AND account_id > $1
                       ORDER BY account_id LIMIT 1)
                   UNION ALL
                     SELECT (SELECT d.account_id FROM event_deliveries d
                              WHERE d.delivered_at IS NULL AND d.failed_at IS NULL
                                AND d.next_attempt_at <= now()
                                AND d.account_id > accts.account_id
                              ORDER BY d.account_id LIMIT 1),
                            accts.n + 1
                       FROM accts
                      WHERE accts.account_id IS NOT NULL AND accts.n < $2
                 ),
                 candidates AS (
                     SELECT c.id, c.origin, c.next_attempt_at, a.n
                       FROM accts a
                      CROSS JOIN LATERAL (
                          SELECT d.id, d.origin, d.next_attempt_at FROM event_deliveries d
                           WHERE d.account_id = a.account_id
                             AND d.delivered_at IS NULL AND d.failed_at IS NULL
                             AND d.next_attempt_at <= now()
                             AND d.origin <> ALL($4)
                           ORDER BY d.account_id, d.next_attempt_at
                           LIMIT 1
                           FOR UPDATE SKIP LOCKED
                      ) c
                      WHERE a.account_id IS NOT NULL AND a.account_id <> ALL($3)
                 ),
                 picked AS (
                     SELECT id FROM (
                         SELECT DISTINCT ON (origin) id, n FROM candidates
                          ORDER BY origin, next_attempt_at
                     ) one_per_origin
                     ORDER BY n
                     LIMIT $5
                 )
                 UPDATE event_deliveries d
                    SET attempts = d.attempts + 1,
                        next_attempt_at = now() + make_interval(secs => $6)
                   FROM picked p, events e, webhook_endpoints w
                  WHERE d.id = p.id AND e.id = d.event_id AND w.id = d.endpoint_id
              RETURNING d.id, d.account_id, d.origin, d.attempts, w.id, w.url,
                        w.secret_generation, w.previous_secret_expires_at,
                        e.id, e.seq, e.type, e.account_id, e.created_at, e.payload",
                &[&after, &scan, &busy_accounts, &busy_origins, &limit, &lease],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| Claimed {
                id: r.get(0),
                account_id: r.get(1),
                origin: r.get(2),
                attempt: r.get(3),
                endpoint_id: r.get(4),
                url: r.get(5),
                generation: r.get(6),
                previous_until: r.get(7),
                event: Event {
                    id: r.get(8),
                    seq: r.get(9),
                    event_type: r.get(10),
                    account_id: r.get(11),
                    created_at: r.get(12),
                    data: r.get(13),
                },
            })
            .collect())
    }

    /// Sends one claimed delivery and records what came of it. Cancelled (the instance is
    /// stopping), it hands the claim back, due at once and uncounted.
    async fn deliver(&self, db: &deadpool_postgres::Pool, d: Claimed, stop: &CancellationToken) {
        let outcome = tokio::select! {
            o = self.send(&d) => Some(o),
            () = stop.cancelled() => None,
        };
        if let Err(e) = self.record(db, &d, outcome).await {
            // The lease runs out and the delivery is sent again: at least once.
            tracing::warn!(delivery = d.id, error = %e, "recording an event delivery failed");
        }
    }

    /// The secrets that sign `d` now: the current one, and the previous one while a rotation
    /// overlaps.
    fn secrets(&self, d: &Claimed) -> Vec<String> {
        let Some(key) = self.settings.signing_key.as_ref() else {
            return Vec::new();
        };
        let mut out = vec![secret_for(key, d.endpoint_id, d.generation)];
        if d.generation > 1 && d.previous_until.is_some_and(|t| t > Utc::now()) {
            out.push(secret_for(key, d.endpoint_id, d.generation - 1));
        }
        out
    }

    async fn send(&self, d: &Claimed) -> Outcome {
        let failed = |status, error: String| Outcome::Failed { status, error };
        let url = match Url::parse(&d.url) {
            Ok(u) => u,
            Err(e) => return failed(None, format!("invalid URL: {e}")),
        };
        // Vetted again: a name may resolve somewhere else today.
        if let Err(e) = self.guard.check(&url).await {
            return failed(None, e.to_string());
        }
        let body = match serde_json::to_vec(&d.event) {
            Ok(b) => b,
            Err(e) => return failed(None, e.to_string()),
        };
        let secrets = self.secrets(d);
        if secrets.is_empty() {
            return failed(None, "webhook endpoints are off".to_owned());
        }
        let t = Utc::now().timestamp();
        let sent = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .header(SIGNATURE_HEADER, signature_header(&secrets, t, &body))
            .header(EVENT_ID_HEADER, &d.event.id)
            .header(EVENT_TYPE_HEADER, &d.event.event_type)
            .body(body)
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => Outcome::Delivered(r.status().as_u16()),
            Ok(r) => failed(
                Some(r.status().as_u16()),
                format!("answered {}", r.status().as_u16()),
            ),
            Err(e) => failed(None, format!("request failed: {}", e.without_url())),
        }
    }

    /// Writes an outcome, fenced by the attempt this instance claimed.
    async fn record(
        &self,
        db: &deadpool_postgres::Pool,
        d: &Claimed,
        outcome: Option<Outcome>,
    ) -> Result<(), crate::db::Error> {
        let client = db.get().await?;
        let (id, attempt) = (d.id, d.attempt);
        match outcome {
            None => {
                client
                    .execute(
                        "UPDATE event_deliveries
                            SET attempts = attempts - 1, next_attempt_at = now()
                          WHERE id = $1 AND attempts = $2
                            AND delivered_at IS NULL AND failed_at IS NULL",
                        &[&id, &attempt],
                    )
                    .await?;
            }
            Some(Outcome::Delivered(status)) => {
                client
                    .execute(
                        "UPDATE event_deliveries
                            SET delivered_at = now(), failed_at = NULL,
                                last_status = $2, last_error = NULL
                          WHERE id = $1 AND delivered_at IS NULL",
                        &[&id, &i32::from(status)],
                    )
                    .await?;
            }
            Some(Outcome::Failed { status, error }) => {
                let wait = self.backoff(attempt);
                let next = Utc::now()
                    + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::hours(1));
                let window = chrono::Duration::from_std(self.settings.retry_for)
                    .unwrap_or(chrono::Duration::days(1));
                let give_up = next > d.event.created_at + window;
                let status = status.map(i32::from);
                if give_up {
                    tracing::warn!(delivery = id, attempt, %error, "event delivery given up");
                } else {
                    tracing::info!(delivery = id, attempt, retry_in_ms = wait.as_millis() as u64, %error, "event delivery failed; will retry");
                }
                client
                    .execute(
                        "UPDATE event_deliveries
                            SET next_attempt_at = CASE WHEN $3 THEN next_attempt_at ELSE $4 END,
                                failed_at = CASE WHEN $3 THEN now() END,
                                last_status = $5, last_error = $6
                          WHERE id = $1 AND attempts = $2 AND delivered_at IS NULL",
                        &[&id, &attempt, &give_up, &next, &status, &error],
                    )
                    .await?;
            }
        }
        Ok(())
    }
}

/// What this instance has in flight, per account and per origin (the claim skips whatever is
/// at its limit). Only deliveries in flight are counted, so the maps stay as small as the
/// in-flight bound. A `std` mutex: the critical sections are a few map operations.
#[derive(Default)]
struct InFlight {
    counts: Mutex<Counts>,
    /// Signalled whenever a delivery ends and frees a slot.
    freed: tokio::sync::Notify,
}

#[derive(Default)]
struct Counts {
    total: usize,
    accounts: HashMap<Uuid, usize>,
    origins: HashMap<String, usize>,
}

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn total(&self) -> usize {
        self.lock().total
    }

    fn busy(&self, per_account: usize, per_origin: usize) -> (Vec<Uuid>, Vec<String>) {
        let c = self.lock();
        (
            c.accounts
                .iter()
                .filter(|(_, n)| **n >= per_account)
                .map(|(a, _)| *a)
                .collect(),
            c.origins
                .iter()
                .filter(|(_, n)| **n >= per_origin)
                .map(|(o, _)| o.clone())
                .collect(),
        )
    }

    /// Counts a delivery in flight until the returned slot is dropped (even on a panic).
    fn take(self: &Arc<Self>, account_id: Uuid, origin: &str) -> Slot {
        let mut c = self.lock();
        c.total += 1;
        *c.accounts.entry(account_id).or_default() += 1;
        *c.origins.entry(origin.to_owned()).or_default() += 1;
        Slot {
            in_flight: self.clone(),
            account_id,
            origin: origin.to_owned(),
        }
    }
}

struct Slot {
    in_flight: Arc<InFlight>,
    account_id: Uuid,
    origin: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        {
            let mut c = self.in_flight.lock();
            c.total = c.total.saturating_sub(1);
            if let Some(n) = c.accounts.get_mut(&self.account_id) {
                *n -= 1;
                if *n == 0 {
                    c.accounts.remove(&self.account_id);
                }
            }
            if let Some(n) = c.origins.get_mut(&self.origin) {
                *n -= 1;
                if *n == 0 {
                    c.origins.remove(&self.origin);
                }
            }
        }
        self.in_flight.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented recipe, computed independently: HMAC-SHA256 keyed with the secret as
    /// shown, over `t.body`, hex.
    #[test]
    fn each_secret_gets_its_own_v1_in_order() {
        let body = br#"{"id":"evt_1"}"#;
        let secrets = vec!["whsec_a".to_owned(), "whsec_b".to_owned()];
        let h = signature_header(&secrets, 1_700_000_000, body);
        let parts: Vec<&str> = h.split(',').collect();
        assert_eq!(parts[0], "t=1700000000");
        assert_eq!(parts.len(), 3);
        for (secret, part) in secrets.iter().zip(&parts[1..]) {
            let mut mac = <hmac::Hmac<sha2::Sha256> as hmac::digest::KeyInit>::new_from_slice(
                secret.as_bytes(),
            )
            .expect("any key length");
            mac.update(b"1700000000.");
            mac.update(body);
            let want = hex::encode(mac.finalize().into_bytes());
            assert_eq!(*part, format!("v1={want}"));
        }
    }
}
