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
//! - **One account's endpoint cannot delay another's**: deliveries are sent by the fair
//!   outbox loop shared with account events ([`crate::outbox`]) — round robin over the
//!   accounts with due deliveries, a bounded number in flight per account, per origin and in
//!   all, each on its own task — so a slow endpoint holds only its own slots, and memory is
//!   bounded whatever an account queues.
//! - **The customer's URL is untrusted**: the same SSRF guard as scrape jobs vets it (and the
//!   address connected to), no redirects are followed, and the answer is not read beyond its
//!   status.

use std::sync::Arc;
use std::time::Duration;

use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use url::Url;
use uuid::Uuid;

use super::ssrf::{AllowList, Guard};
use crate::outbox::{self, Outbox};

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
pub struct Delivery {
    job_id: Uuid,
    account_id: Uuid,
    url: String,
    origin: String,
    event_id: Uuid,
    payload: serde_json::Value,
    attempt: i32,
    secret_version: i32,
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
    /// The fair claim and the hand-back of `job_webhooks` ([`crate::outbox`]), built once.
    claim: Arc<str>,
    hand_back: Arc<str>,
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
            claim: outbox::claim_sql(
                "job_webhooks",
                "job_id",
                "picked p, accounts a",
                "AND a.id = t.account_id
              RETURNING t.job_id, t.account_id, t.url, t.origin, t.event_id, t.payload,
                        t.attempts, a.webhook_secret_version",
            )
            .into(),
            hand_back: outbox::hand_back_sql("job_webhooks", "job_id").into(),
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

    /// Sends due deliveries until cancelled, fairly between accounts ([`crate::outbox`]).
    pub async fn run(&self, db: deadpool_postgres::Pool, stop: CancellationToken) {
        if self.settings.signing_key.is_none() {
            return;
        }
        let limits = outbox::Limits {
            max_in_flight: self.settings.max_in_flight,
            per_account: self.settings.per_account,
            per_destination: self.settings.per_destination,
            poll: Duration::from_millis(250),
            lease: self.settings.timeout * 2 + Duration::from_secs(5),
        };
        outbox::run(
            Arc::new(self.clone()),
            limits,
            db,
            stop,
            None,
            "job webhooks",
        )
        .await;
    }

    /// Writes an outcome, fenced by the attempt this instance claimed: if the lease ran out
    /// and another instance claimed the delivery since, only a success is still recorded
    /// (the receiver got it), never a retry time or a failure over the newer claim.
    async fn record_outcome(
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
                    .execute(&self.hand_back[..], &[&job_id, &attempts])
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

    async fn post(
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

impl Outbox for Sender {
    type Item = Delivery;
    type Outcome = Result<(), String>;

    fn claim_sql(&self) -> &str {
        &self.claim
    }

    fn item(&self, row: &tokio_postgres::Row) -> Delivery {
        Delivery {
            job_id: row.get(0),
            account_id: row.get(1),
            url: row.get(2),
            origin: row.get(3),
            event_id: row.get(4),
            payload: row.get(5),
            attempt: row.get(6),
            secret_version: row.get(7),
        }
    }

    fn account_id(d: &Delivery) -> Uuid {
        d.account_id
    }

    fn origin(d: &Delivery) -> &str {
        &d.origin
    }

    async fn send(&self, d: &Delivery) -> Result<(), String> {
        match self.secret(d.account_id, d.secret_version) {
            Some(secret) => self.post(&d.url, d.event_id, &d.payload, &secret).await,
            None => Err("job webhooks are off".to_owned()),
        }
    }

    async fn record(
        &self,
        db: &deadpool_postgres::Pool,
        d: &Delivery,
        outcome: Option<Result<(), String>>,
    ) -> Result<(), crate::db::Error> {
        self.record_outcome(db, d, outcome).await
    }

    fn record_failed(d: &Delivery, error: &crate::db::Error) {
        tracing::warn!(job_id = %d.job_id, %error, "recording a job webhook outcome failed");
    }
}

#[cfg(test)]
mod tests;
