//! What an account reads of its events and of their deliveries: `GET /v1/events` and
//! `GET /v1/webhook-endpoints/{id}/deliveries`, both newest first, `limit + 1` rows so the
//! page can tell there is more.

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Serialize;
use uuid::Uuid;

use super::endpoints::{self, Error};
use super::{Event, EventType};
use crate::db;

/// The account's events, optionally of one type, before `before_seq` (the cursor's id).
pub async fn list_events(
    db: &impl GenericClient,
    account_id: Uuid,
    event_type: Option<EventType>,
    before_seq: Option<i64>,
    limit: i64,
) -> Result<Vec<Event>, db::Error> {
    let t = event_type.map(|t| t.as_str());
    let rows = db
        .query(
            "SELECT id, seq, type, account_id, created_at, payload FROM events
              WHERE account_id = $1
                AND ($2::text IS NULL OR type = $2)
                AND ($3::bigint IS NULL OR seq < $3)
              ORDER BY seq DESC
              LIMIT $4",
            &[&account_id, &t, &before_seq, &(limit + 1)],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Event {
            id: r.get(0),
            seq: r.get(1),
            event_type: r.get(2),
            account_id: r.get(3),
            created_at: r.get(4),
            data: r.get(5),
        })
        .collect())
}

/// One delivery of one event to one endpoint.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DeliveryView {
    #[serde(skip)]
    pub seq: i64,
    pub event_id: String,
    pub event_type: String,
    /// `pending` (not yet delivered, being retried), `delivered`, or `failed` (given up a day
    /// after the event).
    #[schema(value_type = String, example = "pending")]
    pub status: &'static str,
    /// Attempts made so far.
    pub attempts: i32,
    /// The HTTP status of the last answer, if the receiver answered at all.
    pub last_response_code: Option<i32>,
    /// Why the last attempt failed (a status, a timeout, a refused address…).
    pub last_error: Option<String>,
    /// When the next attempt is due (`pending` only).
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

/// The deliveries of one of the account's endpoints, before `before_id` (the cursor's id).
pub async fn list_deliveries(
    db: &impl GenericClient,
    account_id: Uuid,
    endpoint: &str,
    before_id: Option<i64>,
    limit: i64,
) -> Result<Vec<DeliveryView>, Error> {
    // Another account's endpoint is simply not found.
    let endpoint = endpoints::get(db, account_id, endpoint).await?;
    let id = endpoints::parse_id(&endpoint.id).ok_or(Error::NotFound)?;
    let rows = db
        .query(
            "SELECT d.id, d.event_id, e.type, d.delivered_at, d.failed_at, d.attempts,
                    d.last_status, d.last_error, d.next_attempt_at, d.created_at
               FROM event_deliveries d JOIN events e ON e.id = d.event_id
              WHERE d.endpoint_id = $1 AND ($2::bigint IS NULL OR d.id < $2)
              ORDER BY d.id DESC
              LIMIT $3",
            &[&id, &before_id, &(limit + 1)],
        )
        .await
        .map_err(db::Error::from)?;
    Ok(rows
        .iter()
        .map(|r| {
            let delivered: Option<DateTime<Utc>> = r.get(3);
            let failed: Option<DateTime<Utc>> = r.get(4);
            let status = match (delivered, failed) {
                (Some(_), _) => "delivered",
                (None, Some(_)) => "failed",
                (None, None) => "pending",
            };
            DeliveryView {
                seq: r.get(0),
                event_id: r.get(1),
                event_type: r.get(2),
                status,
                attempts: r.get(5),
                last_response_code: r.get(6),
                last_error: r.get(7),
                next_attempt_at: (status == "pending").then(|| r.get(8)),
                delivered_at: delivered,
                created_at: r.get(9),
            }
        })
        .collect())
}
