//! Account events: what happened to an account that its owner may want to be told about
//! (a low balance, credits granted or expiring, a key created or revoked, a job finished).
//!
//! This module owns the `events` table — an outbox. An event is recorded with
//! [`record`] (or [`record_many`] from a group commit) on the *same* transaction or client as
//! the change it describes, never afterwards on a pool: so a committed change always has its
//! event and a rolled-back one never does, and delivery (at least once, deduplicated by the
//! event id) can happen later from the table alone.
//!
//! Payloads are small JSON objects of facts; like audit details they never carry a secret.

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use crate::db;

pub mod delivery;
pub mod endpoints;
pub mod reads;
pub mod sources;

/// The kinds of event. The string form (`balance.low`…) is the public, stable name a
/// webhook endpoint subscribes to and `GET /v1/events?type=` filters by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    /// A charge took the balance from at or above the account's low-balance threshold to
    /// below it (once per crossing).
    BalanceLow,
    /// A charge took the balance to zero.
    BalanceDepleted,
    /// Credits arrived: a purchase, an operator's grant, an auto-recharge.
    CreditsGranted,
    /// Credits left through a Stripe refund or dispute.
    CreditsClawedBack,
    /// The unspent rest of an expiring grant left the balance.
    CreditsExpired,
    KeyCreated,
    KeyRevoked,
    /// A key's spend limit for its current period was reached (once per period).
    KeySpendLimitReached,
    JobSucceeded,
    JobFailed,
}

impl EventType {
    pub const ALL: [EventType; 10] = [
        EventType::BalanceLow,
        EventType::BalanceDepleted,
        EventType::CreditsGranted,
        EventType::CreditsClawedBack,
        EventType::CreditsExpired,
        EventType::KeyCreated,
        EventType::KeyRevoked,
        EventType::KeySpendLimitReached,
        EventType::JobSucceeded,
        EventType::JobFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventType::BalanceLow => "balance.low",
            EventType::BalanceDepleted => "balance.depleted",
            EventType::CreditsGranted => "credits.granted",
            EventType::CreditsClawedBack => "credits.clawed_back",
            EventType::CreditsExpired => "credits.expired",
            EventType::KeyCreated => "key.created",
            EventType::KeyRevoked => "key.revoked",
            EventType::KeySpendLimitReached => "key.spend_limit_reached",
            EventType::JobSucceeded => "job.succeeded",
            EventType::JobFailed => "job.failed",
        }
    }

    pub fn parse(s: &str) -> Option<EventType> {
        EventType::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl std::fmt::Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A new event's public id: `evt_` and 32 hex digits (a UUIDv7, so ids sort roughly by time).
pub fn new_id() -> String {
    format!("evt_{}", Uuid::now_v7().simple())
}

/// One event to record.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub account_id: Uuid,
    pub event_type: EventType,
    /// A JSON object; anything else is wrapped as `{"value": …}`.
    pub payload: Value,
}

impl NewEvent {
    pub fn new(account_id: Uuid, event_type: EventType, payload: Value) -> Self {
        Self {
            account_id,
            event_type,
            payload,
        }
    }
}

/// An event as stored.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub id: String,
    #[serde(skip)]
    pub seq: i64,
    #[serde(rename = "type")]
    pub event_type: String,
    pub account_id: Uuid,
    pub created_at: DateTime<Utc>,
    pub data: Value,
}

fn object(payload: Value) -> Value {
    match payload {
        Value::Object(_) => payload,
        Value::Null => Value::Object(Default::default()),
        other => serde_json::json!({ "value": other }),
    }
}

/// Records one event on the change's own transaction (or client inside one); returns its id.
pub async fn record(
    client: &impl GenericClient,
    account_id: Uuid,
    event_type: EventType,
    payload: Value,
) -> Result<String, db::Error> {
    let id = new_id();
    let stmt = client
        .prepare_cached(
            "INSERT INTO events (id, account_id, type, payload) VALUES ($1, $2, $3, $4)",
        )
        .await?;
    client
        .execute(
            &stmt,
            &[&id, &account_id, &event_type.as_str(), &object(payload)],
        )
        .await?;
    Ok(id)
}

/// The statement behind [`record_many`], for a caller that pipelines it with its own
/// statements (prepare it with them, execute it with [`Columns::params`] before its COMMIT,
/// without a round trip of its own): the batched job finish does.
pub const RECORD_MANY: &str = "INSERT INTO events (id, account_id, type, payload)
     SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::jsonb[])";

/// A batch of events as the columns [`RECORD_MANY`] takes, ids assigned.
#[derive(Debug, Default)]
pub struct Columns {
    pub ids: Vec<String>,
    pub accounts: Vec<Uuid>,
    pub types: Vec<&'static str>,
    pub payloads: Vec<Value>,
}

impl Columns {
    pub fn of(events: Vec<NewEvent>) -> Columns {
        let mut c = Columns {
            ids: Vec::with_capacity(events.len()),
            accounts: Vec::with_capacity(events.len()),
            types: Vec::with_capacity(events.len()),
            payloads: Vec::with_capacity(events.len()),
        };
        for e in events {
            c.ids.push(new_id());
            c.accounts.push(e.account_id);
            c.types.push(e.event_type.as_str());
            c.payloads.push(object(e.payload));
        }
        c
    }

    pub fn params(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 4] {
        [&self.ids, &self.accounts, &self.types, &self.payloads]
    }
}

/// Records many events in one statement (a group commit's batch); returns their ids in order.
pub async fn record_many(
    client: &impl GenericClient,
    events: Vec<NewEvent>,
) -> Result<Vec<String>, db::Error> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let columns = Columns::of(events);
    let stmt = client.prepare_cached(RECORD_MANY).await?;
    client.execute(&stmt, &columns.params()).await?;
    Ok(columns.ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_round_trips_through_its_public_name() {
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.as_str()), Some(t));
            assert!(t.as_str().contains('.'), "{t}");
        }
        assert_eq!(EventType::parse("balance.nope"), None);
    }

    #[test]
    fn ids_have_the_documented_shape() {
        let id = new_id();
        assert!(id.starts_with("evt_"));
        assert_eq!(id.len(), 4 + 32);
        assert!(id[4..]
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    }

    #[test]
    fn payloads_are_always_objects() {
        assert_eq!(object(Value::Null), serde_json::json!({}));
        assert_eq!(
            object(serde_json::json!(3)),
            serde_json::json!({"value": 3})
        );
    }
}
