//! Webhook endpoints: where an account wants its events POSTed (`/v1/webhook-endpoints`).
//!
//! - **The signing secret is derived, never stored**: `whsec_` + hex HMAC-SHA256(server key,
//!   endpoint id and generation). The table holds the generation only, so a database dump
//!   signs nothing; the secret is shown when the endpoint is created and when it is rotated,
//!   and nowhere else. Rotating bumps the generation and keeps the previous one signing for
//!   [`ROTATION_OVERLAP_HOURS`] (both signatures are sent meanwhile, as Stripe does), so a
//!   receiver can switch without losing a delivery.
//! - **The URL is untrusted**: it is vetted by the SSRF guard of scrape jobs and job webhooks
//!   (the same development allow-list), when created and again at every delivery.
//! - **Bounded**: an account holds at most `max_endpoints`; the count is taken under an
//!   advisory lock on the account, so concurrent creates cannot pass it together (the
//!   account's row is not locked: charges keep running).

use chrono::{DateTime, Duration, Utc};
use deadpool_postgres::{GenericClient, Pool};
use hmac::Mac;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use tokio_postgres::Row;
use url::Url;
use uuid::Uuid;

use super::EventType;
use crate::db;
use crate::jobs::ssrf::{Guard, GuardError, UrlNotAllowed};

/// How long a rotated-away secret still signs deliveries.
pub const ROTATION_OVERLAP_HOURS: i64 = 24;
/// The longest URL accepted.
pub const MAX_URL_LEN: usize = 2048;

/// Why a webhook endpoint request was refused. The `Display` text is the sentence a client
/// reads as the problem's `detail`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "Webhook endpoints are off on this server (no KEYMETER_EVENT_SIGNING_KEY is configured)."
    )]
    Off,
    #[error("No webhook endpoint with that id on this account.")]
    NotFound,
    #[error("url must be an http(s) URL of at most 2048 characters.")]
    BadUrl,
    #[error("url: {0}")]
    UrlNotAllowed(UrlNotAllowed),
    #[error("events must list at least one event type.")]
    NoEvents,
    #[error("events: unknown event type {name:?}; the types are {types}.", types = all_types())]
    UnknownEvent { name: String },
    #[error("The account already has {max} webhook endpoints, the most it may hold.")]
    LimitReached { max: i64 },
    #[error(transparent)]
    Db(#[from] db::Error),
}

fn all_types() -> String {
    EventType::ALL.map(|t| t.as_str()).join(", ")
}

/// An endpoint as clients see it (never with a secret).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct EndpointView {
    /// `we_` and 32 hex digits.
    #[schema(example = "we_0190f6e4c5a97b1e8c4e2f1a3b5d7c9e")]
    pub id: String,
    pub url: String,
    /// The event types delivered to it.
    #[schema(example = json!(["key.created", "job.failed"]))]
    pub events: Vec<String>,
    pub created_at: DateTime<Utc>,
    /// Until when the secret before the last rotation still signs (both `v1` signatures are
    /// sent until then); absent when no rotation overlaps.
    pub previous_secret_expires_at: Option<DateTime<Utc>>,
}

/// An endpoint with its signing secret: the answer to create and to rotate, the only times the
/// secret is shown.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EndpointWithSecret {
    #[serde(flatten)]
    pub endpoint: EndpointView,
    /// `whsec_` and 64 hex digits: the HMAC-SHA256 key of `Keymeter-Signature`, used exactly
    /// as shown (all of it, prefix included).
    #[schema(example = "whsec_3f1c…")]
    pub secret: String,
}

/// The public id of endpoint `id`.
pub fn public_id(id: Uuid) -> String {
    format!("we_{}", id.simple())
}

/// The endpoint id inside a public id; `None` for anything not of that shape.
pub fn parse_id(s: &str) -> Option<Uuid> {
    let hex = s.strip_prefix("we_")?;
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Uuid::parse_str(hex).ok()
}

/// The signing secret of generation `generation` of endpoint `id`.
pub fn secret_for(key: &SecretString, id: Uuid, generation: i32) -> String {
    let mut mac = crate::jobs::webhooks::hmac_sha256(key.expose_secret().as_bytes());
    mac.update(format!("keymeter-webhook-endpoint:{id}:{generation}").as_bytes());
    format!("whsec_{}", hex::encode(mac.finalize().into_bytes()))
}

/// `url` parsed and vetted: http(s), not too long, no credentials, not at an address the guard
/// refuses (the name is resolved now and again at each delivery).
pub async fn check_url(guard: &Guard, raw: &str) -> Result<Url, Error> {
    let raw = raw.trim();
    if raw.len() > MAX_URL_LEN {
        return Err(Error::BadUrl);
    }
    let url = Url::parse(raw).map_err(|_| Error::BadUrl)?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(Error::BadUrl);
    }
    match guard.precheck(&url).await {
        Err(GuardError::NotAllowed(e)) => Err(Error::UrlNotAllowed(e)),
        // A name that does not resolve now may later; it is checked at every delivery.
        _ => Ok(url),
    }
}

/// The event types asked for, each known, without repeats, in the order given.
pub fn parse_events(raw: &[String]) -> Result<Vec<EventType>, Error> {
    if raw.is_empty() {
        return Err(Error::NoEvents);
    }
    let mut out = Vec::with_capacity(raw.len());
    for s in raw {
        let t =
            EventType::parse(s.trim()).ok_or_else(|| Error::UnknownEvent { name: s.clone() })?;
        if !out.contains(&t) {
            out.push(t);
        }
    }
    Ok(out)
}

/// `scheme://host[:port]` of `url` (no user info, the default port omitted): what the sender
/// bounds in-flight deliveries by.
pub fn origin(url: &Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(p) => format!("{}://{host}:{p}", url.scheme()),
        None => format!("{}://{host}", url.scheme()),
    }
}

const COLUMNS: &str = "id, url, event_types, created_at, previous_secret_expires_at";

fn view(row: &Row) -> EndpointView {
    EndpointView {
        id: public_id(row.get(0)),
        url: row.get(1),
        events: row.get(2),
        created_at: row.get(3),
        previous_secret_expires_at: row
            .get::<_, Option<DateTime<Utc>>>(4)
            .filter(|t| *t > Utc::now()),
    }
}

/// Creates an endpoint (the URL and events already checked) and returns it with its secret.
pub async fn create(
    db: &Pool,
    key: Option<&SecretString>,
    max_endpoints: i64,
    account_id: Uuid,
    url: &Url,
    events: &[EventType],
) -> Result<EndpointWithSecret, Error> {
    let key = key.ok_or(Error::Off)?;
    let mut client = db.get().await.map_err(db::Error::from)?;
    let tx = client.transaction().await.map_err(db::Error::from)?;
    // Concurrent creates for one account count one after the other.
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('webhook-endpoints:' || $1::uuid::text, 0))",
        &[&account_id],
    )
    .await
    .map_err(db::Error::from)?;
    let held: i64 = tx
        .query_one(
            "SELECT count(*) FROM webhook_endpoints WHERE account_id = $1",
            &[&account_id],
        )
        .await
        .map_err(db::Error::from)?
        .get(0);
    if held >= max_endpoints {
        return Err(Error::LimitReached { max: max_endpoints });
    }
    let id = Uuid::now_v7();
    let types: Vec<&str> = events.iter().map(|t| t.as_str()).collect();
    let row = tx
        .query_one(
            &format!(
                "INSERT INTO webhook_endpoints (id, account_id, url, origin, event_types)
                 VALUES ($1, $2, $3, $4, $5) RETURNING {COLUMNS}"
            ),
            &[&id, &account_id, &url.as_str(), &origin(url), &types],
        )
        .await
        .map_err(db::Error::from)?;
    tx.commit().await.map_err(db::Error::from)?;
    Ok(EndpointWithSecret {
        endpoint: view(&row),
        secret: secret_for(key, id, 1),
    })
}

/// The account's endpoints, newest first: `limit + 1` rows, so the page can tell there is more.
pub async fn list(
    db: &impl GenericClient,
    account_id: Uuid,
    limit: i64,
    after: Option<(DateTime<Utc>, Uuid)>,
) -> Result<Vec<EndpointView>, Error> {
    let (at, id) = (after.map(|a| a.0), after.map(|a| a.1));
    let rows = db
        .query(
            &format!(
                "SELECT {COLUMNS} FROM webhook_endpoints
                  WHERE account_id = $1
                    AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3::uuid))
                  ORDER BY created_at DESC, id DESC
                  LIMIT $4"
            ),
            &[&account_id, &at, &id, &(limit + 1)],
        )
        .await
        .map_err(db::Error::from)?;
    Ok(rows.iter().map(view).collect())
}

/// One of the account's endpoints.
pub async fn get(
    db: &impl GenericClient,
    account_id: Uuid,
    id: &str,
) -> Result<EndpointView, Error> {
    let id = parse_id(id).ok_or(Error::NotFound)?;
    db.query_opt(
        &format!("SELECT {COLUMNS} FROM webhook_endpoints WHERE id = $1 AND account_id = $2"),
        &[&id, &account_id],
    )
    .await
    .map_err(db::Error::from)?
    .map(|r| view(&r))
    .ok_or(Error::NotFound)
}

/// Deletes one of the account's endpoints, and with it its pending deliveries (one already
/// being sent may still arrive).
pub async fn delete(db: &impl GenericClient, account_id: Uuid, id: &str) -> Result<(), Error> {
    let id = parse_id(id).ok_or(Error::NotFound)?;
    let n = db
        .execute(
            "DELETE FROM webhook_endpoints WHERE id = $1 AND account_id = $2",
            &[&id, &account_id],
        )
        .await
        .map_err(db::Error::from)?;
    if n == 0 {
        return Err(Error::NotFound);
    }
    Ok(())
}

/// A new secret for one of the account's endpoints; the one it replaces keeps signing for
/// [`ROTATION_OVERLAP_HOURS`]. Rotating again within that time ends the older secret at once
/// (only two ever sign).
pub async fn rotate_secret(
    db: &impl GenericClient,
    key: Option<&SecretString>,
    account_id: Uuid,
    id: &str,
) -> Result<EndpointWithSecret, Error> {
    let key = key.ok_or(Error::Off)?;
    let uuid = parse_id(id).ok_or(Error::NotFound)?;
    let until = Utc::now() + Duration::hours(ROTATION_OVERLAP_HOURS);
    let row = db
        .query_opt(
            &format!(
                "UPDATE webhook_endpoints
                    SET secret_generation = secret_generation + 1,
                        previous_secret_expires_at = $3
                  WHERE id = $1 AND account_id = $2
              RETURNING {COLUMNS}, secret_generation"
            ),
            &[&uuid, &account_id, &until],
        )
        .await
        .map_err(db::Error::from)?
        .ok_or(Error::NotFound)?;
    let generation: i32 = row.get(5);
    Ok(EndpointWithSecret {
        endpoint: view(&row),
        secret: secret_for(key, uuid, generation),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_ids_round_trip_and_nothing_else_parses() {
        let id = Uuid::now_v7();
        assert_eq!(parse_id(&public_id(id)), Some(id));
        for bad in [
            "",
            "we_",
            "we_xyz",
            &id.to_string(),
            "evt_0190f6e4c5a97b1e8c4e2f1a3b5d7c9e",
        ] {
            assert_eq!(parse_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn secrets_differ_by_endpoint_generation_and_key() {
        let k1 = SecretString::from("k".repeat(32));
        let k2 = SecretString::from("j".repeat(32));
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let s = secret_for(&k1, a, 1);
        assert!(s.starts_with("whsec_") && s.len() == 6 + 64);
        assert_eq!(s, secret_for(&k1, a, 1));
        assert_ne!(s, secret_for(&k1, a, 2));
        assert_ne!(s, secret_for(&k1, b, 1));
        assert_ne!(s, secret_for(&k2, a, 1));
    }

    #[test]
    fn event_lists_are_checked_and_deduplicated() {
        let ok = parse_events(&[
            "key.created".into(),
            "job.failed".into(),
            "key.created".into(),
        ])
        .expect("known types");
        assert_eq!(ok, vec![EventType::KeyCreated, EventType::JobFailed]);
        assert!(matches!(parse_events(&[]), Err(Error::NoEvents)));
        assert!(matches!(
            parse_events(&["key.exploded".into()]),
            Err(Error::UnknownEvent { .. })
        ));
    }

    #[test]
    fn origins_drop_credentials_paths_and_default_ports() {
        let u = Url::parse("https://user:pw@Example.com:443/hook?x=1").expect("url");
        assert_eq!(origin(&u), "https://example.com");
        let u = Url::parse("http://127.0.0.1:8081/hook").expect("url");
        assert_eq!(origin(&u), "http://127.0.0.1:8081");
    }
}
