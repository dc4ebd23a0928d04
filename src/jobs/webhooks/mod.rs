//! Job webhooks: when a job with a `webhook_url` finishes, its event is POSTed there, signed
//! the way Stripe signs its own (`Keymeter-Signature: t=<unix>,v1=<hex HMAC-SHA256 of
//! "<t>.<body>">`), and retried with exponential backoff a bounded number of times.
//!
//! - **The per-account secret is derived, not stored**: `whsec_` + HMAC-SHA256(server signing
//!   key, account id and version). The database holds only the version, so a database dump
//!   signs nothing; bumping the version rotates the secret.
//! - **Deliveries are rows** (`job_webhooks`), written in the transaction that finishes the
//!   job, so a crash between finishing and sending loses nothing; any instance sends them
//!   (FOR UPDATE SKIP LOCKED), at least once — receivers dedupe on the event id, which is
//!   also sent as `Keymeter-Event-Id`.
//! - **One account's endpoint cannot delay another's**: a customer controls its endpoint, and
//!   one that accepts and never answers holds a delivery for the whole timeout. So deliveries
//!   are claimed fairly — round robin over the accounts with due deliveries, at most one per
//!   account and per destination origin in each pass — with a bounded number in flight on
//!   this instance per account, per origin and in all; each one runs on its own task and
//!   records its outcome when it ends, so a slow endpoint holds only its own slots. Memory is
//!   bounded by the in-flight limit, whatever an account queues: the backlog stays in
//!   PostgreSQL.
//! - **The customer's URL is untrusted**: the same SSRF guard as scrape jobs vets it (and the
//!   address connected to), no redirects are followed, and the answer is not read beyond its
//!   status.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use url::Url;
use uuid::Uuid;

use super::ssrf::{AllowList, Guard};

pub const SIGNATURE_HEADER: &str = "Keymeter-Signature";
pub const EVENT_ID_HEADER: &str = "Keymeter-Event-Id";

#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// `None`: job webhooks are off.
    pub signing_key: Option<SecretString>,
    /// Tries in all (the first one included).
    pub max_attempts: i32,
    /// Wait before the first retry; each later one waits 4× longer (capped at 6 hours).
    pub retry_base: Duration,
    pub timeout: Duration,
    /// Deliveries in flight on this instance, all accounts together.
    pub max_in_flight: usize,
    /// Deliveries in flight on this instance for one account.
    pub per_account: usize,
    /// Deliveries in flight on this instance to one origin (scheme, host, port).
    pub per_destination: usize,
}

/// A claimed delivery: what to send, and the attempt number that fences its outcome.
struct Delivery {
    job_id: Uuid,
    account_id: Uuid,
    url: String,
    origin: String,
    event_id: Uuid,
    payload: serde_json::Value,
    attempt: i32,
    secret_version: i32,
}

/// What this instance has in flight, per account and per origin: the claim skips whatever is
/// at its limit. Only deliveries in flight are counted, so the maps stay as small as the
/// in-flight bound whatever the accounts queue. A `std` mutex: the critical sections are a
/// few map operations and never await.
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

    /// The accounts and origins at their limits.
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

    /// Counts `d` in flight until the returned slot is dropped (even if its task panics).
    fn take(self: &Arc<Self>, d: &Delivery) -> Slot {
        let mut c = self.lock();
        c.total += 1;
        *c.accounts.entry(d.account_id).or_default() += 1;
        *c.origins.entry(d.origin.clone()).or_default() += 1;
        Slot {
            in_flight: self.clone(),
            account_id: d.account_id,
            origin: d.origin.clone(),
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

/// The account's current signing secret.
pub fn secret_for(signing_key: &SecretString, account_id: Uuid, version: i32) -> String {
    let mut mac = hmac_sha256(signing_key.expose_secret().as_bytes());
    mac.update(format!("keymeter-job-webhook:{account_id}:{version}").as_bytes());
    format!("whsec_{}", hex::encode(mac.finalize().into_bytes()))
}

/// HMAC-SHA256 keyed with `key`, built infallibly: HMAC pads a key to the hash's 64-byte
/// block (hashing a longer one first, RFC 2104), which is done here so the block-sized
/// constructor, which cannot fail, can be used.
pub(crate) fn hmac_sha256(key: &[u8]) -> Hmac<Sha256> {
    let mut block = [0u8; 64];
    if key.len() > block.len() {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    <Hmac<Sha256> as KeyInit>::new(&block.into())
}

/// `t=<timestamp>,v1=<signature>` for `payload` sent at `timestamp`.
pub fn signature_header(secret: &str, timestamp: i64, payload: &[u8]) -> String {
    let mut mac = hmac_sha256(secret.as_bytes());
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(payload);
    format!(
        "t={timestamp},v1={}",
        hex::encode(mac.finalize().into_bytes())
    )
}

/// Why a `webhook_url` was refused when the job was created. The `Display` text is the
/// sentence a client reads as the problem's `detail`.
#[derive(Debug, thiserror::Error)]
pub enum WebhookUrlError {
    /// The server has no signing key, so it cannot sign (and does not send) job webhooks.
    #[error(
        "Job webhooks are off on this server (no KEYMETER_WEBHOOK_SIGNING_KEY is configured)."
    )]
    Off,
    #[error("webhook_url must be at most 2048 characters.")]
    TooLong,
    #[error("webhook_url: {0}.")]
    Malformed(url::ParseError),
    /// It points at an address the SSRF guard refuses (or is not http(s), or has
    /// credentials).
    #[error("webhook_url: {0}")]
    NotAllowed(super::ssrf::UrlNotAllowed),
}

/// Checks a `webhook_url` when the job is created: http(s), not too long, and not pointing
/// at an address the guard refuses.
pub async fn validate_url(sender: &Sender, raw: &str) -> Result<Url, WebhookUrlError> {
    let guard = &sender.guard;
    if sender.settings.signing_key.is_none() {
        return Err(WebhookUrlError::Off);
    }
    if raw.len() > 2048 {
        return Err(WebhookUrlError::TooLong);
    }
    let url = Url::parse(raw.trim()).map_err(WebhookUrlError::Malformed)?;
    if let Err(super::ssrf::GuardError::NotAllowed(e)) = guard.precheck(&url).await {
        return Err(WebhookUrlError::NotAllowed(e));
    }
    Ok(url)
}

/// Sends due deliveries until cancelled. Cheap to clone (the HTTP client and the resolver are
/// shared).
#[derive(Clone)]
pub struct Sender {
    client: reqwest::Client,
    guard: Guard,
    settings: WebhookSettings,
}

impl Sender {
    pub fn new(allow: AllowList, settings: WebhookSettings) -> anyhow::Result<Sender> {
        let guard = Guard::new(allow, None);
        let client = reqwest::Client::builder()
            .user_agent(concat!("keymeter-webhooks/", env!("CARGO_PKG_VERSION")))
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
        })
    }

    pub fn settings(&self) -> &WebhookSettings {
        &self.settings
    }

    fn backoff(&self, attempts: i32) -> Duration {
        let exp = u32::try_from(attempts.saturating_sub(1))
            .unwrap_or(0)
            .min(12);
        self.settings
            .retry_base
            .saturating_mul(4u32.saturating_pow(exp))
            .min(Duration::from_secs(6 * 3600))
    }

    /// The account's signing secret, when webhooks are on.
    pub fn secret(&self, account_id: Uuid, version: i32) -> Option<String> {
        self.settings
            .signing_key
            .as_ref()
            .map(|k| secret_for(k, account_id, version))
    }

    /// Sends due deliveries until cancelled: claims a fair share whenever a slot is free, runs
    /// each delivery on its own task, and records each outcome as soon as it is known — no
    /// delivery ever waits for another one to finish.
    pub async fn run(&self, db: deadpool_postgres::Pool, stop: CancellationToken) {
        if self.settings.signing_key.is_none() {
            return;
        }
        // The delivery tasks outlive a borrow of `self`.
        let this = Arc::new(self.clone());
        let in_flight = Arc::new(InFlight::default());
        let deliveries = TaskTracker::new();
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
                    Ok(claimed) => claimed,
                    Err(e) => {
                        tracing::warn!(error = %e, "claiming job webhook deliveries failed");
                        Vec::new()
                    }
                }
            };
            let n = claimed.len();
            for delivery in claimed {
                let slot = in_flight.take(&delivery);
                let (this, db, stop) = (this.clone(), db.clone(), stop.clone());
                deliveries.spawn(async move {
                    this.deliver(&db, delivery, &stop).await;
                    drop(slot);
                });
            }
            if n > 0 {
                // Each pass gives an account (and an origin) one more delivery at most; keep
                // going until everyone due is at a limit or served.
                continue;
            }
            // Nothing to claim now: wait for a slot to free up, or for new rows.
            tokio::select! {
                () = in_flight.freed.notified() => {}
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
                () = stop.cancelled() => break,
            }
        }
        // Deliveries still in flight hand their claims back (see `deliver`).
        deliveries.close();
        deliveries.wait().await;
    }

    /// One pass of the round robin: from the account after `cursor` on (wrapping around
    /// once), at most one due delivery per account and per origin, none for an account or an
    /// origin already at its limit, `free` at most.
    async fn claim_fairly(
        &self,
        db: &deadpool_postgres::Pool,
        in_flight: &InFlight,
        cursor: &mut Uuid,
        free: usize,
    ) -> Result<Vec<Delivery>, crate::db::Error> {
        let client = db.get().await?;
        let (busy_accounts, busy_origins) =
            in_flight.busy(self.settings.per_account, self.settings.per_destination);
        let mut claimed = self
            .claim_after(&client, *cursor, free, &busy_accounts, &busy_origins)
            .await?;
        if claimed.len() < free && !cursor.is_nil() {
            // Wrap around: the accounts before the cursor get their turn too. One this pass
            // already served may get a second delivery — never beyond its limit, which the
            // next pass enforces again.
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

    /// Claims (pushes each chosen delivery's next attempt out by a lease, so no other instance
    /// sends it meanwhile, and counts the attempt) up to `limit` due deliveries: one per
    /// account, accounts in id order after `after`, one per origin.
    ///
    /// The accounts are found by a skip scan over the pending-by-account index — one probe
    /// per account, however many deliveries it queued — so the cost of a pass does not grow
    /// with one account's backlog. Accounts and origins at their limit are skipped.
    async fn claim_after(
        &self,
        client: &deadpool_postgres::Client,
        after: Uuid,
        limit: usize,
        busy_accounts: &[Uuid],
        busy_origins: &[String],
    ) -> Result<Vec<Delivery>, crate::db::Error> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let scan = limit.saturating_add(i64::try_from(busy_accounts.len()).unwrap_or(0));
        let lease = self.settings.timeout.as_secs_f64() * 2.0 + 5.0;
        let rows = client
            .query(
                "WITH RECURSIVE accts(account_id, n) AS (
                     (SELECT account_id, 1::bigint FROM job_webhooks
                       WHERE delivered_at IS NULL AND failed_at IS NULL
                         AND next_attempt_at <= now() AND account_id > $1
                       ORDER BY account_id LIMIT 1)
                   UNION ALL
                     SELECT (SELECT w.account_id FROM job_webhooks w
                              WHERE w.delivered_at IS NULL AND w.failed_at IS NULL
                                AND w.next_attempt_at <= now()
                                AND w.account_id > accts.account_id
                              ORDER BY w.account_id LIMIT 1),
                            accts.n + 1
                       FROM accts
                      WHERE accts.account_id IS NOT NULL AND accts.n < $2
                 ),
                 candidates AS (
                     SELECT c.job_id, c.origin, c.next_attempt_at, a.n
                       FROM accts a
                      CROSS JOIN LATERAL (
                          SELECT w.job_id, w.origin, w.next_attempt_at FROM job_webhooks w
                           WHERE w.account_id = a.account_id
                             AND w.delivered_at IS NULL AND w.failed_at IS NULL
                             AND w.next_attempt_at <= now()
                             AND w.origin <> ALL($4)
                           ORDER BY w.account_id, w.next_attempt_at
                           LIMIT 1
                           FOR UPDATE SKIP LOCKED
                      ) c
                      WHERE a.account_id IS NOT NULL AND a.account_id <> ALL($3)
                 ),
                 picked AS (
                     SELECT job_id FROM (
                         SELECT DISTINCT ON (origin) job_id, n FROM candidates
                          ORDER BY origin, next_attempt_at
                     ) one_per_origin
                     ORDER BY n
                     LIMIT $5
                 )
                 UPDATE job_webhooks w
                    SET attempts = w.attempts + 1,
                        next_attempt_at = now() + make_interval(secs => $6)
                   FROM picked p, accounts a
                  WHERE w.job_id = p.job_id AND a.id = w.account_id
              RETURNING w.job_id, w.account_id, w.url, w.origin, w.event_id, w.payload,
                        w.attempts, a.webhook_secret_version",
                &[&after, &scan, &busy_accounts, &busy_origins, &limit, &lease],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| Delivery {
                job_id: row.get(0),
                account_id: row.get(1),
                url: row.get(2),
                origin: row.get(3),
                event_id: row.get(4),
                payload: row.get(5),
                attempt: row.get(6),
                secret_version: row.get(7),
            })
            .collect())
    }

    /// Sends one claimed delivery and records what came of it. Cancelled (the instance is
    /// stopping), it hands the claim back — the attempt uncounted, due at once — so another
    /// instance sends it without waiting for the lease to run out.
    async fn deliver(&self, db: &deadpool_postgres::Pool, d: Delivery, stop: &CancellationToken) {
        let job_id = d.job_id;
        let outcome = tokio::select! {
            outcome = async {
                match self.secret(d.account_id, d.secret_version) {
                    Some(secret) => self.send(&d.url, d.event_id, &d.payload, &secret).await,
                    None => Err("job webhooks are off".to_owned()),
                }
            } => Some(outcome),
            () = stop.cancelled() => None,
        };
        if let Err(e) = self.record(db, &d, outcome).await {
            // The claim's lease runs out and the delivery is sent again: at least once.
            tracing::warn!(%job_id, error = %e, "recording a job webhook outcome failed");
        }
    }

    /// Writes an outcome, fenced by the attempt this instance claimed: if the lease ran out
    /// and another instance claimed the delivery since, only a success is still recorded
    /// (the receiver got it), never a retry time or a failure over the newer claim.
    async fn record(
        &self,
        db: &deadpool_postgres::Pool,
        d: &Delivery,
        outcome: Option<Result<(), String>>,
    ) -> Result<(), crate::db::Error> {
        let client = db.get().await?;
        let (job_id, attempts) = (d.job_id, d.attempt);
        match outcome {
            None => {
                client
                    .execute(
                        "UPDATE job_webhooks
                            SET attempts = attempts - 1, next_attempt_at = now()
                          WHERE job_id = $1 AND attempts = $2
                            AND delivered_at IS NULL AND failed_at IS NULL",
                        &[&job_id, &attempts],
                    )
                    .await?;
            }
            Some(Ok(())) => {
                client
                    .execute(
                        "UPDATE job_webhooks SET delivered_at = now(), last_error = NULL
                          WHERE job_id = $1 AND delivered_at IS NULL",
                        &[&job_id],
                    )
                    .await?;
            }
            Some(Err(error)) if attempts >= self.settings.max_attempts => {
                tracing::warn!(%job_id, attempts, %error, "job webhook given up");
                client
                    .execute(
                        "UPDATE job_webhooks SET failed_at = now(), last_error = $3
                          WHERE job_id = $1 AND attempts = $2 AND delivered_at IS NULL",
                        &[&job_id, &attempts, &error],
                    )
                    .await?;
            }
            Some(Err(error)) => {
                let wait = self.backoff(attempts);
                tracing::info!(%job_id, attempts, retry_in_ms = wait.as_millis() as u64, %error, "job webhook failed; will retry");
                client
                    .execute(
                        "UPDATE job_webhooks
                            SET next_attempt_at = now() + make_interval(secs => $3),
                                last_error = $4
                          WHERE job_id = $1 AND attempts = $2 AND delivered_at IS NULL",
                        &[&job_id, &attempts, &wait.as_secs_f64(), &error],
                    )
                    .await?;
            }
        }
        Ok(())
    }

    async fn send(
        &self,
        url: &str,
        event_id: Uuid,
        payload: &serde_json::Value,
        secret: &str,
    ) -> Result<(), String> {
        let url = Url::parse(url).map_err(|e| format!("invalid URL: {e}"))?;
        self.guard.check(&url).await.map_err(|e| e.to_string())?;
        let body = serde_json::to_vec(payload).map_err(|e| e.to_string())?;
        let t = chrono::Utc::now().timestamp();
        let response = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .header(SIGNATURE_HEADER, signature_header(secret, t, &body))
            .header(EVENT_ID_HEADER, format!("evt_{}", event_id.simple()))
            .body(body)
            .send()
            .await
            .map_err(|e| format!("request failed: {}", e.without_url()))?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("answered {}", status.as_u16()))
        }
    }
}

#[cfg(test)]
mod tests;
