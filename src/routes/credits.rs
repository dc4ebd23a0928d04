//! `/v1/credits` and `/v1/usage`: the balance, the ledger, usage per day — and the metered
//! charge endpoint, for spending credits on usage the customer meters themselves.

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use chrono::{Duration, Utc};
use serde::Deserialize;
use serde_json::json;

use crate::accounts;
use crate::auth::{Authenticated, Scope};
use crate::credits::ledger::{self, ChargeContext, Kind, Once};
use crate::credits::report::{self, LedgerFilter};
use crate::error::{ApiError, ApiResult};
use crate::idempotency::{self, IdempotencyKey, Start};
use crate::pagination::{Page, PageQuery};
use crate::startup::AppState;

/// `GET /v1/credits` (`read`): the balance and the last ten movements.
pub async fn summary(state: web::Data<AppState>, caller: Authenticated) -> ApiResult<HttpResponse> {
    caller.require(Scope::Read)?;
    let client = state.db.get().await?;
    let account = accounts::get(&client, caller.account_id)
        .await?
        .ok_or_else(accounts::not_found)?;
    let recent = report::list(
        &client,
        caller.account_id,
        &LedgerFilter {
            kind: None,
            from: None,
            to: None,
            before_id: None,
        },
        9,
    )
    .await?;
    Ok(HttpResponse::Ok().json(json!({
        "object": "credits",
        "balance": account.credit_balance,
        "recent": recent,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerQuery {
    limit: Option<i64>,
    cursor: Option<String>,
    kind: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

/// `GET /v1/credits/ledger` (`read`): newest first, filtered by kind and time.
pub async fn ledger_page(
    state: web::Data<AppState>,
    caller: Authenticated,
    q: web::Query<LedgerQuery>,
) -> ApiResult<HttpResponse> {
    caller.require(Scope::Read)?;
    let q = q.into_inner();
    let page = PageQuery {
        limit: q.limit,
        cursor: q.cursor,
    };
    let limit = page.limit()?;
    let before_id = match page.cursor()? {
        Some(c) => Some(c.id.parse::<i64>().map_err(|_| {
            ApiError::InvalidRequest("The cursor is not one this API returned.".into())
        })?),
        None => None,
    };
    let kind = match q.kind.as_deref() {
        None => None,
        Some(k) => Some(Kind::parse(k).ok_or_else(|| {
            ApiError::validation(
                "kind",
                "kind must be one of grant, purchase, charge, refund, adjustment, clawback.",
            )
        })?),
    };
    let filter = LedgerFilter {
        kind,
        from: q
            .from
            .as_deref()
            .map(|s| report::parse_time("from", s))
            .transpose()?,
        to: q
            .to
            .as_deref()
            .map(|s| report::parse_time("to", s))
            .transpose()?,
        before_id,
    };
    let client = state.db.get().await?;
    let rows = report::list(&client, caller.account_id, &filter, limit).await?;
    Ok(
        HttpResponse::Ok().json(Page::from_overfetch(rows, limit, |m| {
            (m.created_at, m.id.to_string())
        })),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    from: Option<String>,
    to: Option<String>,
    granularity: Option<String>,
}

/// `GET /v1/usage?from=&to=&granularity=day|hour` (`read`): charges and refunds per bucket.
/// Defaults to the last 30 days; a range is at most 366 days (day) or 31 days (hour).
pub async fn usage(
    state: web::Data<AppState>,
    caller: Authenticated,
    q: web::Query<UsageQuery>,
) -> ApiResult<HttpResponse> {
    caller.require(Scope::Read)?;
    let granularity = q.granularity.as_deref().unwrap_or("day");
    let max_days = match granularity {
        "day" => 366,
        "hour" => 31,
        _ => {
            return Err(ApiError::validation(
                "granularity",
                "granularity must be day or hour.",
            ))
        }
    };
    let to = match &q.to {
        Some(s) => report::parse_time("to", s)?,
        None => Utc::now(),
    };
    let from = match &q.from {
        Some(s) => report::parse_time("from", s)?,
        None => to - Duration::days(30),
    };
    if from >= to {
        return Err(ApiError::validation("from", "from must be before to."));
    }
    if to - from > Duration::days(max_days) {
        return Err(ApiError::validation(
            "from",
            format!("a {granularity} report covers at most {max_days} days."),
        ));
    }
    let client = state.db.get().await?;
    let buckets = report::usage(&client, caller.account_id, from, to, granularity).await?;
    let totals = buckets.iter().fold((0i64, 0i64), |acc, b| {
        (acc.0 + b.charged, acc.1 + b.refunded)
    });
    Ok(HttpResponse::Ok().json(json!({
        "object": "usage",
        "from": from,
        "to": to,
        "granularity": granularity,
        "data": buckets,
        "total": {"charged": totals.0, "refunded": totals.1, "net": totals.0 - totals.1},
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChargeBody {
    amount: i64,
    reason: Option<String>,
}

pub const MAX_CHARGE: i64 = 1_000_000;

/// `POST /v1/credits/charge` (`scrape`) {amount, reason?}: spends credits for metered usage.
/// One statement moves the balance and writes the ledger row; 402 when short. Honours
/// `Idempotency-Key`: the charge and its stored response commit together.
pub async fn charge(
    state: web::Data<AppState>,
    caller: Authenticated,
    req: HttpRequest,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    caller.require(Scope::Scrape)?;
    let (raw, parsed): (serde_json::Value, ChargeBody) = crate::http::extractors::json_body(&body)?;
    if !(1..=MAX_CHARGE).contains(&parsed.amount) {
        return Err(ApiError::validation(
            "amount",
            format!("amount must be between 1 and {MAX_CHARGE}."),
        ));
    }
    if parsed
        .reason
        .as_ref()
        .is_some_and(|r| r.chars().count() > 500)
    {
        return Err(ApiError::validation(
            "reason",
            "reason must be at most 500 characters.",
        ));
    }
    let (key, guard) = match idempotency::start(&state.db, caller.account_id, &req, &raw).await? {
        (_, Start::Replay(res)) => return Ok(res),
        (key, Start::Run(guard)) => (key, guard),
    };
    let outcome = async {
        let mut client = state.db.get().await?;
        let ctx = ChargeContext {
            job_id: None,
            reason: parsed.reason.as_deref(),
            idempotency_key: key.as_ref().map(IdempotencyKey::as_str),
        };
        match &guard {
            None if !state.config.charge_coalescing => {
                let m = ledger::charge(&client, caller.account_id, parsed.amount, &ctx).await?;
                Ok::<_, ApiError>(m)
            }
            None => {
                drop(client);
                // Without an idempotency record to complete, concurrent charges to one account
                // can share a commit (see credits::coalesce).
                let m = state
                    .charges
                    .charge(
                        &state.db,
                        caller.account_id,
                        parsed.amount,
                        parsed.reason.clone(),
                    )
                    .await?;
                Ok::<_, ApiError>(Once::Done(m))
            }
            Some(g) => {
                let tx = client.transaction().await?;
                let m = ledger::charge(&tx, caller.account_id, parsed.amount, &ctx).await?;
                if let Once::Done(movement) = &m {
                    let body = serde_json::to_value(movement).map_err(anyhow::Error::from)?;
                    g.complete(&tx, StatusCode::CREATED, &body, None).await?;
                }
                tx.commit().await?;
                Ok(m)
            }
        }
    }
    .await;
    match outcome {
        Ok(Once::Done(m)) => Ok(HttpResponse::Created().json(m)),
        Ok(Once::AlreadyDone) => Err(ApiError::Internal(anyhow::anyhow!(
            "charge without a job reported as duplicate"
        ))),
        Err(e) => {
            if let Some(g) = guard {
                g.release(&state.db).await;
            }
            Err(e)
        }
    }
}
