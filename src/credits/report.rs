//! Reading the ledger: recent movements, filtered pages, and usage per day or hour.

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Serialize;
use uuid::Uuid;

use super::ledger::{movement, Kind, Movement, MOVEMENT_COLUMNS};
use crate::http::problem::ApiError;

pub struct LedgerFilter {
    pub kind: Option<Kind>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    /// Show entries with an id below this (the cursor).
    pub before_id: Option<i64>,
}

pub async fn list(
    db: &impl GenericClient,
    account_id: Uuid,
    f: &LedgerFilter,
    limit: i64,
) -> Result<Vec<Movement>, ApiError> {
    let kind = f.kind.map(Kind::as_str);
    let rows = db
        .query(
            &format!(
                "SELECT {MOVEMENT_COLUMNS} FROM credit_ledger
                  WHERE account_id = $1
                    AND ($2::text IS NULL OR kind = $2)
                    AND ($3::timestamptz IS NULL OR created_at >= $3)
                    AND ($4::timestamptz IS NULL OR created_at < $4)
                    AND ($5::bigint IS NULL OR id < $5)
                  ORDER BY id DESC
                  LIMIT $6"
            ),
            &[
                &account_id,
                &kind,
                &f.from,
                &f.to,
                &f.before_id,
                &(limit + 1),
            ],
        )
        .await?;
    Ok(rows.iter().map(movement).collect())
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UsageBucket {
    /// The start of the day or hour (UTC).
    pub start: DateTime<Utc>,
    /// Credits charged in the bucket.
    pub charged: i64,
    /// Credits refunded in the bucket.
    pub refunded: i64,
    /// charged − refunded: what the bucket really cost.
    pub net: i64,
    /// Number of charges in the bucket.
    pub charges: i64,
    /// Number of refunds in the bucket.
    pub refunds: i64,
}

pub async fn usage(
    db: &impl GenericClient,
    account_id: Uuid,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    granularity: &str,
) -> Result<Vec<UsageBucket>, ApiError> {
    let rows = db
        .query(
            "SELECT date_trunc($4, created_at, 'UTC') AS bucket,
                    COALESCE(sum(-delta) FILTER (WHERE kind = 'charge'), 0)::bigint,
                    COALESCE(sum(delta) FILTER (WHERE kind = 'refund'), 0)::bigint,
                    count(*) FILTER (WHERE kind = 'charge'),
                    count(*) FILTER (WHERE kind = 'refund')
               FROM credit_ledger
              WHERE account_id = $1 AND created_at >= $2 AND created_at < $3
                AND kind IN ('charge', 'refund')
              GROUP BY bucket ORDER BY bucket",
            &[&account_id, &from, &to, &granularity],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let charged: i64 = r.get(1);
            let refunded: i64 = r.get(2);
            UsageBucket {
                start: r.get(0),
                charged,
                refunded,
                net: charged - refunded,
                charges: r.get(3),
                refunds: r.get(4),
            }
        })
        .collect())
}
