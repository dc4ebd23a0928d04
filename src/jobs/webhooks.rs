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
//! - **The customer's URL is untrusted**: the same SSRF guard as scrape jobs vets it (and the
//!   address connected to), no redirects are followed, and the answer is not read beyond its
//!   status.

use std::time::Duration;

use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use url::Url;
use uuid::Uuid;

use super::ssrf::{AllowList, Guard};
use crate::error::ApiError;

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
fn hmac_sha256(key: &[u8]) -> Hmac<Sha256> {
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

/// Checks a `webhook_url` when the job is created: http(s), not too long, and not pointing
/// at an address the guard refuses.
pub async fn validate_url(sender: &Sender, raw: &str) -> Result<Url, ApiError> {
    let guard = &sender.guard;
    if sender.settings.signing_key.is_none() {
        return Err(ApiError::validation(
            "webhook_url",
            "Job webhooks are off on this server (no KEYMETER_WEBHOOK_SIGNING_KEY is configured).",
        ));
    }
    if raw.len() > 2048 {
        return Err(ApiError::validation(
            "webhook_url",
            "webhook_url must be at most 2048 characters.",
        ));
    }
    let url = Url::parse(raw.trim())
        .map_err(|e| ApiError::validation("webhook_url", format!("webhook_url: {e}.")))?;
    if let Err(super::ssrf::GuardError::NotAllowed(e)) = guard.precheck(&url).await {
        return Err(ApiError::problem(
            actix_web::http::StatusCode::UNPROCESSABLE_ENTITY,
            "url_not_allowed",
            "URL not allowed",
            format!("webhook_url: {e}"),
        )
        .with("field", "webhook_url"));
    }
    Ok(url)
}

/// Sends due deliveries until cancelled.
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

    pub async fn run(&self, db: deadpool_postgres::Pool, stop: CancellationToken) {
        if self.settings.signing_key.is_none() {
            return;
        }
        loop {
            let sent = match self.send_due(&db).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "job webhook delivery pass failed");
                    0
                }
            };
            if sent > 0 {
                continue;
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    /// Takes up to 16 due deliveries (pushing their next attempt out so no other instance
    /// sends them meanwhile), sends them concurrently, records each outcome.
    async fn send_due(&self, db: &deadpool_postgres::Pool) -> Result<usize, ApiError> {
        let rows = {
            let client = db.get().await?;
            client
                .query(
                    "UPDATE job_webhooks w
                        SET attempts = w.attempts + 1,
                            next_attempt_at = now() + make_interval(secs => $1)
                       FROM accounts a
                      WHERE w.job_id IN (SELECT job_id FROM job_webhooks
                                          WHERE delivered_at IS NULL AND failed_at IS NULL
                                            AND next_attempt_at <= now()
                                          ORDER BY next_attempt_at
                                          LIMIT 16
                                          FOR UPDATE SKIP LOCKED)
                        AND a.id = w.account_id
                  RETURNING w.job_id, w.account_id, w.url, w.event_id, w.payload, w.attempts,
                            a.webhook_secret_version",
                    &[&(self.settings.timeout.as_secs_f64() * 2.0 + 5.0)],
                )
                .await?
        };
        let n = rows.len();
        let sends = rows.into_iter().map(|row| async move {
            let job_id: Uuid = row.get(0);
            let account_id: Uuid = row.get(1);
            let url: String = row.get(2);
            let event_id: Uuid = row.get(3);
            let payload: serde_json::Value = row.get(4);
            let attempts: i32 = row.get(5);
            let version: i32 = row.get(6);
            let outcome = match self.secret(account_id, version) {
                Some(secret) => self.send(&url, event_id, &payload, &secret).await,
                None => Err("job webhooks are off".to_owned()),
            };
            (job_id, attempts, outcome)
        });
        let outcomes = futures_util::future::join_all(sends).await;
        let client = db.get().await?;
        for (job_id, attempts, outcome) in outcomes {
            match outcome {
                Ok(()) => {
                    client
                        .execute(
                            "UPDATE job_webhooks SET delivered_at = now(), last_error = NULL
                              WHERE job_id = $1",
                            &[&job_id],
                        )
                        .await?;
                }
                Err(error) if attempts >= self.settings.max_attempts => {
                    tracing::warn!(%job_id, attempts, %error, "job webhook given up");
                    client
                        .execute(
                            "UPDATE job_webhooks SET failed_at = now(), last_error = $2
                              WHERE job_id = $1",
                            &[&job_id, &error],
                        )
                        .await?;
                }
                Err(error) => {
                    let wait = self.backoff(attempts);
                    tracing::info!(%job_id, attempts, retry_in_ms = wait.as_millis() as u64, %error, "job webhook failed; will retry");
                    client
                        .execute(
                            "UPDATE job_webhooks
                                SET next_attempt_at = now() + make_interval(secs => $2),
                                    last_error = $3
                              WHERE job_id = $1",
                            &[&job_id, &wait.as_secs_f64(), &error],
                        )
                        .await?;
                }
            }
        }
        Ok(n)
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
mod tests {
    use super::*;

    #[test]
    fn secrets_differ_per_account_and_version_and_are_stable() {
        let key = SecretString::from("k".repeat(32));
        let a = Uuid::now_v7();
        let b = Uuid::now_v7();
        assert_eq!(secret_for(&key, a, 1), secret_for(&key, a, 1));
        assert_ne!(secret_for(&key, a, 1), secret_for(&key, b, 1));
        assert_ne!(secret_for(&key, a, 1), secret_for(&key, a, 2));
        assert!(secret_for(&key, a, 1).starts_with("whsec_"));
    }

    #[test]
    fn long_keys_are_hashed_as_hmac_requires() {
        let long = "x".repeat(100);
        let mut ours = hmac_sha256(long.as_bytes());
        ours.update(b"m");
        let mut reference =
            <Hmac<Sha256> as Mac>::new_from_slice(long.as_bytes()).expect("any length");
        reference.update(b"m");
        assert_eq!(
            ours.finalize().into_bytes(),
            reference.finalize().into_bytes()
        );
    }

    #[test]
    fn signature_matches_an_independent_hmac() {
        // echo -n '1700000000.{"a":1}' | openssl dgst -sha256 -hmac whsec_test
        let h = signature_header("whsec_test", 1_700_000_000, br#"{"a":1}"#);
        assert_eq!(
            h,
            "t=1700000000,v1=38877139021993b830af32feea6e18a8da83eb2f6e49ee50bd9e4cf4ca4d3789"
        );
    }
}
