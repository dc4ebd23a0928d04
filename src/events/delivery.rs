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
//! - **One account's receiver cannot delay another's**: the sender is the fair outbox loop
//!   shared with job webhooks ([`crate::outbox`]) — one due delivery per account and per
//!   destination origin each pass, none for an account or origin already at its in-flight
//!   limit — and each delivery runs on its own task, so a receiver that accepts and never
//!   answers holds only its own account's slots. The backlog stays in PostgreSQL; memory is
//!   bounded by the in-flight limit.
//! - **Signed as Stripe signs**: `Keymeter-Signature: t=<unix>,v1=<hex HMAC-SHA256 of
//!   "<t>.<body>">`, keyed with the endpoint's secret exactly as shown (`whsec_…`); during a
//!   rotation's overlap a second `v1` signed with the previous secret follows. The body is
//!   `{id, type, created_at, account_id, data}`; `id` (also `Keymeter-Event-Id`) is the same
//!   on every retry, for the receiver to deduplicate on.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::Mac;
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;
use url::Url;
use uuid::Uuid;

use super::endpoints::secret_for;
use super::Event;
use crate::config::EventsSettings;
use crate::jobs::ssrf::{AllowList, Guard};
use crate::outbox::{self, Outbox};

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
pub struct Claimed {
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
pub enum Outcome {
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
    /// The fair claim and the hand-back of `event_deliveries` ([`crate::outbox`]), built once.
    claim: Arc<str>,
    hand_back: Arc<str>,
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
            claim: outbox::claim_sql(
                "event_deliveries",
                "id",
                "picked p, events e, webhook_endpoints w",
                "AND e.id = t.event_id AND w.id = t.endpoint_id
              RETURNING t.id, t.account_id, t.origin, t.attempts, w.id, w.url,
                        w.secret_generation, w.previous_secret_expires_at,
                        e.id, e.seq, e.type, e.account_id, e.created_at, e.payload",
            )
            .into(),
            hand_back: outbox::hand_back_sql("event_deliveries", "id").into(),
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

    /// Sends due deliveries until cancelled, fairly between accounts ([`crate::outbox`]).
    pub async fn run(&self, db: deadpool_postgres::Pool, stop: CancellationToken) {
        if self.settings.signing_key.is_none() {
            return;
        }
        let limits = outbox::Limits {
            max_in_flight: self.settings.max_in_flight,
            per_account: self.settings.per_account,
            per_destination: self.settings.per_destination,
            poll: self.settings.poll,
            lease: self.settings.timeout * 2 + Duration::from_secs(5),
        };
        let wake = Some(self.wake.clone());
        outbox::run(
            Arc::new(self.clone()),
            limits,
            db,
            stop,
            wake,
            "account events",
        )
        .await;
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

    async fn post(&self, d: &Claimed) -> Outcome {
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
    async fn record_outcome(
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
                    .execute(&self.hand_back[..], &[&id, &attempt])
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

impl Outbox for Sender {
    type Item = Claimed;
    type Outcome = Outcome;

    fn claim_sql(&self) -> &str {
        &self.claim
    }

    fn item(&self, r: &tokio_postgres::Row) -> Claimed {
        Claimed {
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
        }
    }

    fn account_id(d: &Claimed) -> Uuid {
        d.account_id
    }

    fn origin(d: &Claimed) -> &str {
        &d.origin
    }

    async fn send(&self, d: &Claimed) -> Outcome {
        self.post(d).await
    }

    async fn record(
        &self,
        db: &deadpool_postgres::Pool,
        d: &Claimed,
        outcome: Option<Outcome>,
    ) -> Result<(), crate::db::Error> {
        self.record_outcome(db, d, outcome).await
    }

    fn record_failed(d: &Claimed, error: &crate::db::Error) {
        tracing::warn!(delivery = d.id, %error, "recording an event delivery failed");
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
