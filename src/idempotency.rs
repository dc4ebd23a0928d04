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
//! leave a charge without its stored response. A claim whose request died is reclaimable
//! after [`ABANDONED_AFTER`].

use std::time::Duration;

use actix_web::http::header::HeaderMap;
use actix_web::http::StatusCode;
use actix_web::HttpResponse;
use deadpool_postgres::{GenericClient, Pool, Transaction};
use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::error::ApiError;

pub const HEADER: &str = "idempotency-key";
pub const REPLAYED: &str = "idempotent-replayed";
/// A claim older than this with no result is taken to be from a request that died.
pub const ABANDONED_AFTER: Duration = Duration::from_secs(90);
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

pub async fn start(
    db: &Pool,
    account_id: Uuid,
    req: &actix_web::HttpRequest,
    body: &Value,
) -> Result<(Option<IdempotencyKey>, Start), ApiError> {
    let Some(key) = IdempotencyKey::from_headers(req.headers())? else {
        return Ok((None, Start::Run(None)));
    };
    let hash = request_hash(req.method().as_str(), req.path(), body);
    let start = match claim(db, account_id, &key, &hash).await? {
        Claim::Owned(g) => Start::Run(Some(g)),
        Claim::Replay(res) => Start::Replay(res),
    };
    Ok((Some(key), start))
}

pub struct Guard {
    account_id: Uuid,
    key: String,
}

pub async fn claim(
    db: &Pool,
    account_id: Uuid,
    key: &IdempotencyKey,
    hash: &[u8],
) -> Result<Claim, ApiError> {
    let client = db.get().await?;
    let claimed = client
        .query_opt(
            "INSERT INTO idempotency_keys AS i (account_id, key, request_hash)
             VALUES ($1, $2, $3)
             ON CONFLICT (account_id, key) DO UPDATE
                SET claimed_at = now(), request_hash = EXCLUDED.request_hash, created_at = now()
              WHERE i.status IS NULL
                AND i.claimed_at < now() - make_interval(secs => $4)
                AND i.request_hash = EXCLUDED.request_hash
             RETURNING 1",
            &[
                &account_id,
                &key.as_str(),
                &hash,
                &(ABANDONED_AFTER.as_secs_f64()),
            ],
        )
        .await?;
    if claimed.is_some() {
        return Ok(Claim::Owned(Guard {
            account_id,
            key: key.as_str().to_owned(),
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
        return Err(ApiError::Conflict {
            kind: "idempotency_conflict",
            detail: "A request with this Idempotency-Key was just in progress; retry.".into(),
        });
    };
    let stored_hash: Vec<u8> = row.get(0);
    if stored_hash != hash {
        return Err(ApiError::IdempotencyKeyReused);
    }
    let status: Option<i16> = row.get(1);
    let Some(status) = status else {
        return Err(ApiError::Conflict {
            kind: "idempotency_conflict",
            detail: "A request with this Idempotency-Key is still in progress.".into(),
        });
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
    /// Stores the outcome, in the transaction that did the work.
    pub async fn complete(
        &self,
        tx: &Transaction<'_>,
        status: StatusCode,
        body: &Value,
        location: Option<&str>,
    ) -> Result<(), ApiError> {
        tx.execute(
            "UPDATE idempotency_keys SET status = $3, response_body = $4, location = $5
              WHERE account_id = $1 AND key = $2",
            &[
                &self.account_id,
                &self.key,
                &(status.as_u16() as i16),
                &body.to_string().into_bytes(),
                &location,
            ],
        )
        .await?;
        Ok(())
    }

    /// Frees the key after a failed request (nothing was stored, so a retry may run).
    pub async fn release(self, db: &Pool) {
        let result = async {
            let client = db.get().await?;
            client
                .execute(
                    "DELETE FROM idempotency_keys WHERE account_id = $1 AND key = $2 AND status IS NULL",
                    &[&self.account_id, &self.key],
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
