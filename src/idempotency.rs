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
//!
//! Callers go through [`run`], the one place the claim → work → record-or-release sequence
//! is written: the route turns the HTTP request into a [`Request`] (see
//! `crate::http::idempotent`), the work gets the claim's [`Guard`] and records its outcome
//! with [`Guard::record`] in the transaction that does it, and a failure releases the key.
//! This module speaks no HTTP: a stored outcome is a status number, an optional `Location`
//! and the body's bytes ([`StoredResponse`]); rendering a replay is the HTTP layer's job.

use std::future::Future;
use std::time::Duration;

use deadpool_postgres::{GenericClient, Pool, Transaction};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

pub const HEADER: &str = "idempotency-key";
pub const REPLAYED: &str = "idempotent-replayed";
/// How old a claim with no result must be before it is taken to be from a request that died:
/// the request timeout plus a fifth of it (at least a second), so the request that made it
/// has certainly been cut off by then. The default timeout of 75 s gives 90 s.
pub fn abandoned_after(request_timeout: Duration) -> Duration {
    request_timeout + (request_timeout / 5).max(Duration::from_secs(1))
}
pub const RETENTION: Duration = Duration::from_secs(24 * 3600);

/// Why a request could not have its key (each becomes a problem in `http::problem`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The key is not 1 to 255 printable ASCII characters.
    #[error("Idempotency-Key must be 1 to 255 printable ASCII characters without spaces.")]
    InvalidKey,
    /// The key was first used with a different request.
    #[error("This Idempotency-Key was used with a different request; use a new key.")]
    KeyReused,
    /// Another request holds the key, or took it over from this one.
    #[error("{cause}")]
    Conflict { cause: Conflict },
    /// The outcome could not be encoded for storing (a bug, not the client's doing).
    #[error("could not encode an idempotent response: {0}")]
    Encode(#[from] serde_json::Error),
    #[error(transparent)]
    Db(#[from] crate::db::Error),
}
crate::impl_db_error_from!(Error);

/// What another request with the same key is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Conflict {
    /// The holder released the key between our claim and our read: a retry may run.
    #[error("A request with this Idempotency-Key was just in progress; retry.")]
    JustReleased,
    /// The first request with this key has not finished.
    #[error("A request with this Idempotency-Key is still in progress.")]
    InProgress,
    /// This request outlived its claim and a retry took the key over; its work is undone.
    #[error(
        "This request took so long that a retry with the same Idempotency-Key \
                         took it over; this attempt was undone. Retry with the same key to get \
                         the outcome."
    )]
    TakenOver,
}

impl Error {
    fn conflict(cause: Conflict) -> Self {
        Error::Conflict { cause }
    }
}

/// A validated `Idempotency-Key` value.
#[derive(Debug, Clone)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// 1 to 255 printable ASCII characters, no spaces (Stripe's rule).
    pub fn parse(s: &str) -> Result<IdempotencyKey, Error> {
        if s.is_empty() || s.len() > 255 || !s.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(Error::InvalidKey);
        }
        Ok(IdempotencyKey(s.to_owned()))
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

/// An idempotent request: whose key, what the request was, and the status its success is
/// answered with (stored with the body, so a replay answers the same).
#[derive(Debug, Clone)]
pub struct Request {
    pub account_id: Uuid,
    pub key: IdempotencyKey,
    /// [`request_hash`] of the method, path and body.
    pub hash: Vec<u8>,
    /// The status of a successful answer (a number: this module speaks no HTTP).
    pub status: u16,
}

impl Request {
    pub fn new(
        account_id: Uuid,
        key: IdempotencyKey,
        method: &str,
        path: &str,
        body: &Value,
        status: u16,
    ) -> Request {
        Request {
            account_id,
            key,
            hash: request_hash(method, path, body),
            status,
        }
    }
}

/// The outcome a finished request stored: what a replay answers with (as JSON, with
/// `Idempotent-Replayed: true`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    /// The `Location` header, when the answer had one.
    pub location: Option<String>,
    /// The JSON body, byte for byte.
    pub body: Vec<u8>,
}

/// What a claim found.
pub enum Claim {
    /// This request owns the key: run it, then [`Guard::record`] inside its transaction.
    Owned(Guard),
    /// A finished earlier request with this key and body: answer with this.
    Replay(StoredResponse),
}

/// What [`run`] did.
#[derive(Debug)]
pub enum Outcome<T> {
    /// The work ran (first request with this key, or no key at all).
    Ran(T),
    /// An earlier request with this key and body finished: answer with its outcome.
    Replayed(StoredResponse),
}

/// The one idempotent sequence: without a `request` (no `Idempotency-Key`) the work just
/// runs with `None`; with one, the key is claimed — or the stored outcome / the refusal of
/// an earlier request with it is returned without running anything — and the work runs with
/// `Some(guard)`. The work must [`Guard::record`] its outcome (in the transaction that does
/// the work, so both commit or neither does); when it fails, the key is released so the
/// client may fix the request and retry with the same key.
///
/// `request_timeout` is the server's (`KEYMETER_REQUEST_TIMEOUT_SECS`): it sets when a claim
/// counts as abandoned (see [`abandoned_after`]). `E` is the work's error type; the claim's
/// refusals (`KeyReused`, `Conflict`, a database failure) reach the caller as `E` too.
pub async fn run<T, E, F, Fut>(
    db: &Pool,
    request_timeout: Duration,
    request: Option<Request>,
    work: F,
) -> Result<Outcome<T>, E>
where
    E: From<Error>,
    F: FnOnce(Option<Guard>) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let Some(request) = request else {
        return work(None).await.map(Outcome::Ran);
    };
    let guard = match claim(db, &request, abandoned_after(request_timeout)).await? {
        Claim::Owned(guard) => guard,
        Claim::Replay(stored) => return Ok(Outcome::Replayed(stored)),
    };
    match work(Some(guard.clone())).await {
        Ok(done) => Ok(Outcome::Ran(done)),
        Err(e) => {
            guard.release(db).await;
            Err(e)
        }
    }
}

/// This request's hold on a key: the record is its only while it carries `token`. Cloning
/// it does not make a second claim; both copies are this request's.
#[derive(Debug, Clone)]
pub struct Guard {
    account_id: Uuid,
    key: IdempotencyKey,
    token: Uuid,
    status: u16,
}

/// Claims the request's key (a new record, or one abandoned for longer than `window`), or
/// says what an earlier request with it became.
pub async fn claim(db: &Pool, request: &Request, window: Duration) -> Result<Claim, Error> {
    let client = db.get().await?;
    let token = Uuid::new_v4();
    let (account_id, key, hash) = (request.account_id, &request.key, &request.hash);
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
                hash,
                &window.as_secs_f64(),
                &token,
            ],
        )
        .await?;
    if claimed.is_some() {
        return Ok(Claim::Owned(Guard {
            account_id,
            key: key.clone(),
            token,
            status: request.status,
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
        return Err(Error::conflict(Conflict::JustReleased));
    };
    let stored_hash: Vec<u8> = row.get(0);
    if &stored_hash != hash {
        return Err(Error::KeyReused);
    }
    let status: Option<i16> = row.get(1);
    let Some(status) = status else {
        return Err(Error::conflict(Conflict::InProgress));
    };
    Ok(Claim::Replay(StoredResponse {
        status: u16::try_from(status).unwrap_or(200),
        location: row.get(3),
        body: row.get::<_, Option<Vec<u8>>>(2).unwrap_or_default(),
    }))
}

impl Guard {
    /// The key this request holds (kept on what the work writes, e.g. the ledger row).
    pub fn key(&self) -> &IdempotencyKey {
        &self.key
    }

    /// Records the outcome — the request's success status, `body` as JSON and `location` —
    /// in the transaction that did the work, only while this request still holds the claim.
    /// When a retry has taken the key over, nothing is stored and the error
    /// ([`Conflict::TakenOver`]) must make the caller drop the transaction without committing
    /// it, so the work in it (a charge, a reserved job) is rolled back: only the claim's
    /// holder may commit its work. The UPDATE also locks the record until the commit, so a
    /// takeover cannot slip in between this check and the commit.
    pub async fn record(
        &self,
        tx: &Transaction<'_>,
        body: &impl Serialize,
        location: Option<&str>,
    ) -> Result<(), Error> {
        let body = serde_json::to_value(body)?;
        self.complete(tx, self.status, &body, location).await
    }

    /// [`Guard::record`] for work that has no transaction of its own (a call to another
    /// service): the outcome is stored in a transaction of its own.
    pub async fn record_alone(
        &self,
        db: &Pool,
        body: &impl Serialize,
        location: Option<&str>,
    ) -> Result<(), Error> {
        let mut client = db.get().await?;
        let tx = client.transaction().await?;
        self.record(&tx, body, location).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Stores `status`, `body` and `location` as the key's outcome (see [`Guard::record`]).
    async fn complete(
        &self,
        tx: &Transaction<'_>,
        status: impl Into<u16>,
        body: &Value,
        location: Option<&str>,
    ) -> Result<(), Error> {
        let status = i16::try_from(status.into()).unwrap_or(200);
        let stored = tx
            .execute(
                "UPDATE idempotency_keys SET status = $3, response_body = $4, location = $5
                  WHERE account_id = $1 AND key = $2 AND token = $6 AND status IS NULL",
                &[
                    &self.account_id,
                    &self.key.as_str(),
                    &status,
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
            return Err(Error::conflict(Conflict::TakenOver));
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
                    &[&self.account_id, &self.key.as_str(), &self.token],
                )
                .await?;
            Ok::<_, Error>(())
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

pub async fn purge(db: &Pool) -> Result<u64, Error> {
    let client = db.get().await?;
    purge_with(&client).await
}

async fn purge_with(client: &impl GenericClient) -> Result<u64, Error> {
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
