//! `Idempotency-Key` for POSTs that charge or create (Stripe's semantics).
//!
//! - The key (≤ 255 printable ASCII characters) is scoped to the account and kept 24 hours
//!   with a SHA-256 of the request (method, path and the canonical JSON body).
//! - Same key, same request, finished: the stored status and body are replayed with
//!   `Idempotent-Replayed: true`, and nothing runs or is charged again.
//! - Same key, different request: 422 `idempotency_key_reused`.
//! - Same key while the first is still running: 409 `idempotency_conflict` (no waiting).
//! - Only successful (2xx) outcomes are stored; a failed request releases its key so the
//!   client can fix the request and retry with the same key.
//!
//! The claim is its own statement (visible to duplicates at once); the completion is
//! written in the caller's transaction, together with the work itself, so a crash can never
//! leave a charge without its stored response.
//!
//! A claim whose request died is reclaimable after [`abandoned_after`] the request timeout
//! (`KEYMETER_REQUEST_TIMEOUT_SECS`), a little longer than it: by then the request that made
//! it has been cut off and its transaction rolled back. That alone would not be enough —
//! another instance may run with a longer timeout (during a rolling change of it), a process
//! may stall past the window — so every claim also carries a fresh token, and
//! [`Guard::complete`] and [`Guard::release`] touch the record only while it still holds this
//! request's token. A slow first attempt whose claim a retry took over therefore finds no row
//! to complete: its transaction fails before it commits, the charge in it is rolled back,
//! and the first attempt answers `409 idempotency_conflict`. The first attempt and its retry
//! can never both charge.

use std::time::Duration;

use actix_web::http::header::HeaderMap;
use actix_web::http::StatusCode;
use actix_web::HttpResponse;
use deadpool_postgres::{GenericClient, Pool, Transaction};
use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::http::problem::{ApiError, ProblemType};

pub const HEADER: &str = "idempotency-key";
pub const REPLAYED: &str = "idempotent-replayed";
/// How old a claim with no result must be before it is taken to be from a request that died:
/// the request timeout plus a fifth of it (at least a second), so the request that made it
/// has certainly been cut off by then. The default timeout of 75 s gives 90 s.
pub fn abandoned_after(request_timeout: Duration) -> Duration {
    request_timeout + (request_timeout / 5).max(Duration::from_secs(1))
}
pub const RETENTION: Duration = Duration::from_secs(24 * 3600);

/// A validated `Idempotency-Key` header value.
#[derive(Debug, Clone)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn from_headers(headers: &HeaderMap) -> Result<Option<IdempotencyKey>, ApiError> {
        let Some(v) = headers.get(HEADER) else {
            return Ok(None);
        };
        let s = v.to_str().unwrap_or("");
        if s.is_empty() || s.len() > 255 || !s.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(ApiError::InvalidRequest(
                "Idempotency-Key must be 1 to 255 printable ASCII characters without spaces."
                    .into(),
            ));
        }
        Ok(Some(IdempotencyKey(s.to_owned())))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// JSON with object keys sorted, so `{"a":1,"b":2}` and `{"b":2,"a":1}` hash alike.
fn canonical(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            Value::Object(
                keys.into_iter()
                    .map(|k| (k.clone(), canonical(&m[k])))
                    .collect(),
            )
        }
        Value::Array(a) => Value::Array(a.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

pub fn request_hash(method: &str, path: &str, body: &Value) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(method.as_bytes());
    h.update(b" ");
    h.update(path.as_bytes());
    h.update(b"\n");
    h.update(canonical(body).to_string().as_bytes());
    h.finalize().to_vec()
}

/// What a claim found.
pub enum Claim {
    /// This request owns the key: run it, then [`Guard::complete`] inside its transaction.
    Owned(Guard),
    /// A finished earlier request with this key and body: answer with this.
    Replay(HttpResponse),
}

/// The start of an idempotent POST: with no `Idempotency-Key` header the request just runs
/// (`Run(None)`); with one it is claimed (`Run(Some(guard))`) or answered from the record.
pub enum Start {
    Run(Option<Guard>),
    Replay(HttpResponse),
}

/// `request_timeout` is the server's (`KEYMETER_REQUEST_TIMEOUT_SECS`): it sets when a claim
/// counts as abandoned (see [`abandoned_after`]).
pub async fn start(
    db: &Pool,
    request_timeout: Duration,
    account_id: Uuid,
    req: &actix_web::HttpRequest,
    body: &Value,
) -> Result<(Option<IdempotencyKey>, Start), ApiError> {
    let Some(key) = IdempotencyKey::from_headers(req.headers())? else {
        return Ok((None, Start::Run(None)));
    };
    let hash = request_hash(req.method().as_str(), req.path(), body);
    let window = abandoned_after(request_timeout);
    let start = match claim(db, account_id, &key, &hash, window).await? {
        Claim::Owned(g) => Start::Run(Some(g)),
        Claim::Replay(res) => Start::Replay(res),
    };
    Ok((Some(key), start))
}

/// This request's hold on a key: the record is its only while it carries `token`.
pub struct Guard {
    account_id: Uuid,
    key: String,
    token: Uuid,
}

/// Claims `key` for this request (a new record, or one abandoned for longer than `window`),
/// or says what an earlier request with it became.
pub async fn claim(
    db: &Pool,
    account_id: Uuid,
    key: &IdempotencyKey,
    hash: &[u8],
    window: Duration,
) -> Result<Claim, ApiError> {
    let client = db.get().await?;
    let token = Uuid::new_v4();
    let claimed = client
        .query_opt(
            "INSERT INTO idempotency_keys AS i (account_id, key, request_hash, token)
             VALUES ($1, $2, $3, $5)
             ON CONFLICT (account_id, key) DO UPDATE
                SET claimed_at = now(), request_hash = EXCLUDED.request_hash, created_at = now(),
                    token = EXCLUDED.token
              WHERE i.status IS NULL
                AND i.claimed_at < now() - make_interval(secs => $4)
                AND i.request_hash = EXCLUDED.request_hash
             RETURNING 1",
            &[
                &account_id,
                &key.as_str(),
                &hash,
                &window.as_secs_f64(),
                &token,
            ],
        )
        .await?;
    if claimed.is_some() {
        return Ok(Claim::Owned(Guard {
            account_id,
            key: key.as_str().to_owned(),
            token,
        }));
    }
    let row = client
        .query_opt(
            "SELECT request_hash, status, response_body, location FROM idempotency_keys
              WHERE account_id = $1 AND key = $2",
            &[&account_id, &key.as_str()],
        )
        .await?;
    let Some(row) = row else {
        // Released between our insert and our read: the client may simply retry.
        return Err(ApiError::problem(
            ProblemType::IdempotencyConflict,
            "A request with this Idempotency-Key was just in progress; retry.",
        ));
    };
    let stored_hash: Vec<u8> = row.get(0);
    if stored_hash != hash {
        return Err(ApiError::IdempotencyKeyReused);
    }
    let status: Option<i16> = row.get(1);
    let Some(status) = status else {
        return Err(ApiError::problem(
            ProblemType::IdempotencyConflict,
            "A request with this Idempotency-Key is still in progress.",
        ));
    };
    let body: Vec<u8> = row.get::<_, Option<Vec<u8>>>(2).unwrap_or_default();
    let location: Option<String> = row.get(3);
    let status = StatusCode::from_u16(status as u16).unwrap_or(StatusCode::OK);
    let mut res = HttpResponse::build(status);
    res.insert_header(("content-type", "application/json"))
        .insert_header((REPLAYED, "true"));
    if let Some(l) = location {
        res.insert_header(("location", l));
    }
    Ok(Claim::Replay(res.body(body)))
}

impl Guard {
    /// Stores the outcome, in the transaction that did the work — only while this request
    /// still holds the claim. When a retry has taken the key over, nothing is stored and the
    /// error (`409 idempotency_conflict`) must make the caller drop the transaction without
    /// committing it, so the work in it (a charge, a reserved job) is rolled back: only the
    /// claim's holder may commit its work. The UPDATE also locks the record until the commit,
    /// so a takeover cannot slip in between this check and the commit.
    pub async fn complete(
        &self,
        tx: &Transaction<'_>,
        status: StatusCode,
        body: &Value,
        location: Option<&str>,
    ) -> Result<(), ApiError> {
        let stored = tx
            .execute(
                "UPDATE idempotency_keys SET status = $3, response_body = $4, location = $5
                  WHERE account_id = $1 AND key = $2 AND token = $6 AND status IS NULL",
                &[
                    &self.account_id,
                    &self.key,
                    &(status.as_u16() as i16),
                    &body.to_string().into_bytes(),
                    &location,
                    &self.token,
                ],
            )
            .await?;
        if stored == 0 {
            tracing::warn!(
                "an idempotent request outlived its claim and was taken over; its work is rolled back"
            );
            return Err(ApiError::problem(
                ProblemType::IdempotencyConflict,
                "This request took so long that a retry with the same Idempotency-Key \
                         took it over; this attempt was undone. Retry with the same key to get \
                         the outcome.",
            ));
        }
        Ok(())
    }

    /// Frees the key after a failed request (nothing was stored, so a retry may run) — unless
    /// a retry has taken it over meanwhile: then the key is the retry's, not ours to free.
    pub async fn release(self, db: &Pool) {
        let result = async {
            let client = db.get().await?;
            client
                .execute(
                    "DELETE FROM idempotency_keys
                      WHERE account_id = $1 AND key = $2 AND token = $3 AND status IS NULL",
                    &[&self.account_id, &self.key, &self.token],
                )
                .await?;
            Ok::<_, ApiError>(())
        }
        .await;
        if result.is_err() {
            tracing::warn!(
                "could not release an idempotency key; it frees itself after the abandon timeout"
            );
        }
    }
}

/// Deletes records past their 24 hours, every 10 minutes, until cancelled.
pub async fn run_purge(db: Pool, stop: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(600));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        if let Err(e) = purge(&db).await {
            tracing::warn!(error = %e, "purging idempotency records failed");
        }
    }
}

pub async fn purge(db: &Pool) -> Result<u64, ApiError> {
    let client = db.get().await?;
    purge_with(&client).await
}

async fn purge_with(client: &impl GenericClient) -> Result<u64, ApiError> {
    Ok(client
        .execute(
            "DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(secs => $1)",
            &[&RETENTION.as_secs_f64()],
        )
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_is_abandoned_only_after_the_request_timeout() {
        let t = Duration::from_secs(75);
        assert_eq!(abandoned_after(t), Duration::from_secs(90));
        for secs in [1, 2, 5, 30, 75, 600] {
            let t = Duration::from_secs(secs);
            assert!(abandoned_after(t) >= t + Duration::from_secs(1), "{secs}");
        }
    }

    #[test]
    fn key_order_does_not_change_the_hash_but_values_do() {
        let a = request_hash(
            "POST",
            "/v1/x",
            &serde_json::json!({"a": 1, "b": {"c": 2, "d": 3}}),
        );
        let b = request_hash(
            "POST",
            "/v1/x",
            &serde_json::json!({"b": {"d": 3, "c": 2}, "a": 1}),
        );
        let c = request_hash(
            "POST",
            "/v1/x",
            &serde_json::json!({"a": 2, "b": {"c": 2, "d": 3}}),
        );
        let d = request_hash(
            "POST",
            "/v1/y",
            &serde_json::json!({"a": 1, "b": {"c": 2, "d": 3}}),
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
    }
}
