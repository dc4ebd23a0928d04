//! Reading the ledger: recent movements, filtered pages, and usage per day or hour.

use chrono::{DateTime, Duration, Utc};
use deadpool_postgres::GenericClient;
use serde::Serialize;
use uuid::Uuid;

use super::ledger::{movement, Kind, Movement, MOVEMENT_COLUMNS};
use super::Error;

/// A `kind` filter: one of the ledger's [`Kind`]s.
pub fn parse_kind(s: &str) -> Result<Kind, Error> {
    Kind::parse(s).ok_or(Error::UnknownKind)
}

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
) -> Result<Vec<Movement>, Error> {
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
    /// With `group_by=key`: the key whose charges and refunds these are (`null`: rows
    /// written before keys were recorded). Absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, nullable)]
    pub key_id: Option<Option<String>>,
}

/// Which rows a usage report counts and how it splits them: only one key's (`key_id`),
/// and/or one row per key in each bucket (`by_key`).
#[derive(Debug, Clone, Default)]
pub struct UsageFilter {
    pub key_id: Option<String>,
    pub by_key: bool,
}

impl UsageFilter {
    /// `group_by`: absent or `key`; `key_id`: a key id's shape (any account's key id gives
    /// an empty report, as the rows are the caller's account's only).
    pub fn parse(group_by: Option<&str>, key_id: Option<&str>) -> Result<UsageFilter, Error> {
        let by_key = match group_by {
            None => false,
            Some("key") => true,
            Some(_) => return Err(Error::UnknownGroupBy),
        };
        if key_id.is_some_and(|k| !crate::auth::api_key::is_key_id(k)) {
            return Err(Error::InvalidKeyId);
        }
        Ok(UsageFilter {
            key_id: key_id.map(str::to_owned),
            by_key,
        })
    }
}

/// The width of a usage bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    Day,
    Hour,
}

impl Granularity {
    /// `day` (the default, when absent) or `hour`.
    pub fn parse(s: Option<&str>) -> Result<Granularity, Error> {
        match s.unwrap_or("day") {
            "day" => Ok(Granularity::Day),
            "hour" => Ok(Granularity::Hour),
            _ => Err(Error::UnknownGranularity),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Granularity::Day => "day",
            Granularity::Hour => "hour",
        }
    }

    /// The longest report of this granularity, in days (its rows stay a few hundred).
    pub fn max_days(self) -> i64 {
        match self {
            Granularity::Day => 366,
            Granularity::Hour => 31,
        }
    }
}

/// The span a usage report covers, checked: `from` before `to`, at most the granularity's
/// longest span.
#[derive(Debug, Clone, Copy)]
pub struct UsageWindow {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub granularity: Granularity,
}

impl UsageWindow {
    /// `to` defaults to `now`, `from` to 30 days before `to`. Both must be inside the years
    /// 0000–9999 (what `pagination::parse_time` accepts), so neither default can overflow.
    pub fn new(
        granularity: Granularity,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<UsageWindow, Error> {
        let to = to.unwrap_or(now);
        let from = from.unwrap_or(to - Duration::days(30));
        if from >= to {
            return Err(Error::EmptyRange);
        }
        let max_days = granularity.max_days();
        if to - from > Duration::days(max_days) {
            return Err(Error::RangeTooLong {
                granularity: granularity.as_str(),
                max_days,
            });
        }
        Ok(UsageWindow {
            from,
            to,
            granularity,
        })
    }
}

/// A usage report: the buckets with any charge or refund, oldest first, and their totals.
#[derive(Debug)]
pub struct Usage {
    pub window: UsageWindow,
    pub buckets: Vec<UsageBucket>,
    pub charged: i64,
    pub refunded: i64,
}

/// Charges and refunds per bucket of `window`, with their totals.
pub async fn usage(
    db: &impl GenericClient,
    account_id: Uuid,
    window: UsageWindow,
) -> Result<Usage, Error> {
    usage_filtered(db, account_id, window, &UsageFilter::default()).await
}

/// [`usage`], of one key only and/or split per key (see [`UsageFilter`]).
pub async fn usage_filtered(
    db: &impl GenericClient,
    account_id: Uuid,
    window: UsageWindow,
    filter: &UsageFilter,
) -> Result<Usage, Error> {
    let buckets = buckets(db, account_id, &window, filter).await?;
    let (charged, refunded) = buckets.iter().fold((0i64, 0i64), |acc, b| {
        (acc.0 + b.charged, acc.1 + b.refunded)
    });
    Ok(Usage {
        window,
        buckets,
        charged,
        refunded,
    })
}

async fn buckets(
    db: &impl GenericClient,
    account_id: Uuid,
    window: &UsageWindow,
    filter: &UsageFilter,
) -> Result<Vec<UsageBucket>, Error> {
    let (from, to, granularity) = (window.from, window.to, window.granularity.as_str());
    let rows = db
        .query(
            "SELECT date_trunc($4, created_at, 'UTC') AS bucket,
                    COALESCE(sum(-delta) FILTER (WHERE kind = 'charge'), 0)::bigint,
                    COALESCE(sum(delta) FILTER (WHERE kind = 'refund'), 0)::bigint,
                    count(*) FILTER (WHERE kind = 'charge'),
                    count(*) FILTER (WHERE kind = 'refund'),
                    CASE WHEN $6 THEN key_id END AS k
               FROM credit_ledger
              WHERE account_id = $1 AND created_at >= $2 AND created_at < $3
                AND kind IN ('charge', 'refund')
                AND ($5::text IS NULL OR key_id = $5)
              GROUP BY bucket, k ORDER BY bucket, k NULLS FIRST",
            &[
                &account_id,
                &from,
                &to,
                &granularity,
                &filter.key_id,
                &filter.by_key,
            ],
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
                key_id: filter.by_key.then(|| r.get(5)),
            }
        })
        .collect())
}

/// A usage report as CSV: a header row, then one row per bucket (with `key_id` when split
/// per key). Every value is a timestamp, a number or a key id (`0-9A-Za-z`), so none needs
/// quoting and none can start a spreadsheet formula. `GET /v1/usage?format=csv` and the
/// console's download both write it here, so the two files cannot differ.
pub fn csv(buckets: &[UsageBucket], by_key: bool) -> String {
    let mut out = String::from(if by_key {
        "start,key_id,charged,refunded,net,charges,refunds\r\n"
    } else {
        "start,charged,refunded,net,charges,refunds\r\n"
    });
    for b in buckets {
        let start = b.start.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let key = if by_key {
            format!("{},", b.key_id.clone().flatten().unwrap_or_default())
        } else {
            String::new()
        };
        out.push_str(&format!(
            "{start},{key}{},{},{},{},{}\r\n",
            b.charged, b.refunded, b.net, b.charges, b.refunds
        ));
    }
    out
}
