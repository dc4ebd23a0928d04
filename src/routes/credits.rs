//! `/v1/credits` and `/v1/usage`: the balance, the ledger, usage per day — and the metered
//! charge endpoint, for spending credits on usage the customer meters themselves.

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::accounts;
use crate::auth::{Authenticated, Scope};
use crate::credits::grants::{self, OpenGrant};
use crate::credits::ledger::{Kind, Movement};
use crate::credits::metered::{self, MeteredCharge};
use crate::credits::report::{self, LedgerFilter, UsageBucket, UsageFilter, UsageWindow};
use crate::http::idempotent;
use crate::http::problem::ApiResult;
use crate::idempotency;
use crate::pagination::{self, Page, TimeRange};
use crate::routes::{Access, Routes};
use crate::startup::AppState;

pub fn configure(routes: &mut Routes) {
    routes
        .get(Access::Key, "/v1/credits", summary)
        .get(Access::Key, "/v1/credits/ledger", ledger_page)
        .post(Access::Key, "/v1/credits/charge", charge)
        .get(Access::Key, "/v1/usage", usage);
}

#[derive(Serialize, ToSchema)]
pub struct CreditsSummary {
    #[schema(value_type = String, example = "credits")]
    object: &'static str,
    balance: i64,
    /// The most recent ledger entries, newest first.
    recent: Vec<Movement>,
    /// Expiring grants not yet expired, earliest expiry first (spent in that order, before
    /// any other credits); `remaining` leaves the balance within a minute of `expires_at`.
    /// Purchased credits never expire and are not listed.
    grants: Vec<OpenGrant>,
}

/// `GET /v1/credits` (`read`): the balance and the last ten movements.
#[utoipa::path(
    get,
    path = "/v1/credits",
    operation_id = "credits_summary",
    tag = "credits",
    summary = "Balance and recent movements",
    responses(
        (status = 200, description = "The balance, the latest ledger entries and the open \
            expiring grants.", body = CreditsSummary),
    ),
    security(("ApiKey" = ["read"]), ("ApiKeyHeader" = ["read"])),
)]
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
    let grants = grants::open(&client, caller.account_id).await?;
    Ok(HttpResponse::Ok().json(CreditsSummary {
        object: "credits",
        balance: account.credit_balance,
        recent,
        grants,
    }))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LedgerQuery {
    /// Entries per page, 1 to 100 (default 20).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 100)]
    limit: Option<String>,
    /// `next_cursor` from the previous page.
    #[param(pattern = "^-?[0-9]{1,16}_[0-9]{1,18}$")]
    cursor: Option<String>,
    /// Only entries of this kind.
    #[param(inline, value_type = Option<Kind>)]
    kind: Option<String>,
    /// Entries at or after this time: a date (`2026-11-23`, midnight UTC) or an RFC 3339 time.
    #[param(schema_with = crate::pagination::time_param_schema)]
    from: Option<String>,
    /// Entries before this time: a date or an RFC 3339 time.
    #[param(schema_with = crate::pagination::time_param_schema)]
    to: Option<String>,
}

/// `GET /v1/credits/ledger` (`read`): newest first, filtered by kind and time.
#[utoipa::path(
    get,
    path = "/v1/credits/ledger",
    operation_id = "credits_ledger",
    tag = "credits",
    summary = "The ledger, filtered",
    description = "Every movement of the balance, newest first, cursor-paginated; `from` is \
        inclusive, `to` exclusive.",
    params(LedgerQuery),
    responses(
        (status = 200, description = "A page of ledger entries.", body = Page<Movement>),
        (status = 400, description = "`invalid_request`: a malformed query string, an unknown \
            parameter or a cursor this API did not return."),
        (status = 422, description = "`validation_failed`: `limit`, `kind`, `from`, `to` or \
            the time in `cursor` is not acceptable (times must lie in the years 0000–9999)."),
    ),
    security(("ApiKey" = ["read"]), ("ApiKeyHeader" = ["read"])),
)]
pub async fn ledger_page(
    state: web::Data<AppState>,
    caller: Authenticated,
    q: web::Query<LedgerQuery>,
) -> ApiResult<HttpResponse> {
    caller.require(Scope::Read)?;
    let (limit, cursor) = pagination::page(q.limit.as_deref(), q.cursor.as_deref())?;
    let before_id = cursor.map(|c| c.id_as::<i64>()).transpose()?;
    let kind = q.kind.as_deref().map(report::parse_kind).transpose()?;
    let range = TimeRange::parse(q.from.as_deref(), q.to.as_deref())?;
    let filter = LedgerFilter {
        kind,
        from: range.from,
        to: range.to,
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

/// The width of a usage bucket.
// `report::Granularity`, for the document only.
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)] // Only describes the accepted values of `granularity`.
pub enum Granularity {
    Day,
    Hour,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    /// Start: a date (`2026-11-23`) or an RFC 3339 time (default: 30 days before `to`).
    #[param(schema_with = crate::pagination::time_param_schema)]
    from: Option<String>,
    /// End: a date or an RFC 3339 time (default: now).
    #[param(schema_with = crate::pagination::time_param_schema)]
    to: Option<String>,
    /// `day` (default; at most 366 days) or `hour` (at most 31 days).
    #[param(inline, value_type = Option<Granularity>)]
    granularity: Option<String>,
    /// `key`: one row per key in each bucket, each with its `key_id` (`null` for rows
    /// written before charges recorded their key).
    #[param(inline, value_type = Option<UsageGroupBy>)]
    group_by: Option<String>,
    /// Only the charges and refunds caused by this key (its 12-character id).
    #[param(pattern = "^[0-9A-Za-z]{12}$")]
    key_id: Option<String>,
    /// `json` (default) or `csv`: `text/csv`, a header row, then one row per bucket (and key).
    #[param(inline, value_type = Option<UsageFormat>)]
    format: Option<String>,
}

/// How `GET /v1/usage` splits its buckets.
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)] // Only describes the accepted values of `group_by`.
pub enum UsageGroupBy {
    Key,
}

/// The representation of `GET /v1/usage`.
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)] // Only describes the accepted values of `format`.
pub enum UsageFormat {
    Json,
    Csv,
}

#[derive(Serialize, ToSchema)]
pub struct UsageTotal {
    charged: i64,
    refunded: i64,
    net: i64,
}

#[derive(Serialize, ToSchema)]
pub struct UsageReport {
    #[schema(value_type = String, example = "usage")]
    object: &'static str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    #[schema(value_type = Granularity)]
    granularity: &'static str,
    /// Buckets with any charge or refund, oldest first.
    data: Vec<UsageBucket>,
    total: UsageTotal,
}

/// `GET /v1/usage?from=&to=&granularity=day|hour` (`read`): charges and refunds per bucket.
/// Defaults to the last 30 days; a range is at most 366 days (day) or 31 days (hour).
#[utoipa::path(
    get,
    path = "/v1/usage",
    operation_id = "usage",
    tag = "credits",
    summary = "Usage per day or hour, per key, as JSON or CSV",
    description = "Credits charged and refunded per bucket, with totals. `from` defaults to \
        30 days before `to`, `to` to now; `from` must be before `to`, and a range is at most \
        366 days (`day`) or 31 days (`hour`). `group_by=key` splits each bucket per key \
        (`key_id`), `key_id=` counts one key's only, and `format=csv` answers the same rows as \
        `text/csv` with a header row (`start,[key_id,]charged,refunded,net,charges,refunds`).",
    params(UsageQuery),
    responses(
        (status = 200, description = "The usage report.", content(
            (UsageReport = "application/json"),
            (String = "text/csv"),
        )),
        (status = 400, description = "`invalid_request`: a malformed query string or an unknown \
            parameter."),
        (status = 422, description = "`validation_failed`: a bad or out-of-range time (years \
            0000–9999), granularity, range, `group_by`, `key_id` or `format`."),
    ),
    security(("ApiKey" = ["read"]), ("ApiKeyHeader" = ["read"])),
)]
pub async fn usage(
    state: web::Data<AppState>,
    caller: Authenticated,
    q: web::Query<UsageQuery>,
) -> ApiResult<HttpResponse> {
    caller.require(Scope::Read)?;
    let granularity = report::Granularity::parse(q.granularity.as_deref())?;
    let range = TimeRange::parse(q.from.as_deref(), q.to.as_deref())?;
    let window = UsageWindow::new(granularity, range.from, range.to, Utc::now())?;
    let filter = UsageFilter::parse(q.group_by.as_deref(), q.key_id.as_deref())?;
    let csv = match q.format.as_deref() {
        None | Some("json") => false,
        Some("csv") => true,
        Some(_) => {
            return Err(crate::http::problem::ApiError::validation(
                "format",
                "format must be json or csv.",
            ))
        }
    };
    let client = state.db.get().await?;
    let usage = report::usage_filtered(&client, caller.account_id, window, &filter).await?;
    if csv {
        return Ok(HttpResponse::Ok()
            .content_type("text/csv; charset=utf-8")
            .insert_header((
                actix_web::http::header::CONTENT_DISPOSITION,
                "attachment; filename=\"usage.csv\"",
            ))
            .body(report::csv(&usage.buckets, filter.by_key)));
    }
    Ok(HttpResponse::Ok().json(UsageReport {
        object: "usage",
        from: usage.window.from,
        to: usage.window.to,
        granularity: usage.window.granularity.as_str(),
        data: usage.buckets,
        total: UsageTotal {
            charged: usage.charged,
            refunded: usage.refunded,
            net: usage.charged - usage.refunded,
        },
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Charge)]
struct ChargeBody {
    /// Credits to spend, 1 to 1,000,000.
    #[schema(minimum = 1, maximum = 1_000_000)]
    amount: i64,
    /// Up to 500 characters (no NUL), kept on the ledger entry.
    #[schema(max_length = 500, pattern = "^[^\\x00]*$")]
    reason: Option<String>,
}

/// `POST /v1/credits/charge` (`scrape`) {amount, reason?}: spends credits for metered usage.
/// One statement moves the balance and writes the ledger row; 402 when short. Honours
/// `Idempotency-Key`: the charge and its stored response commit together.
#[utoipa::path(
    post,
    path = "/v1/credits/charge",
    operation_id = "charge_credits",
    tag = "credits",
    summary = "Spend credits",
    description = "Spends credits for usage you meter yourself: the balance and the ledger \
        move together, or not at all. Honours `Idempotency-Key`.",
    params(("Idempotency-Key" = Option<String>, Header, description = crate::openapi::IDEMPOTENCY_KEY)),
    request_body = ChargeBody,
    responses(
        (status = 201, description = "The ledger entry of the charge.", body = Movement),
        (status = 400, description = "`invalid_json`: the body is not JSON; \
            `invalid_request`: a malformed `Idempotency-Key`; `bad_request`: the body could not \
            be read."),
        (status = 402, description = "`insufficient_credits`: the balance is below `amount` \
            (`balance` and `cost` say by how much); `key_spend_limit_exceeded`: the calling \
            key's `spend_limit` for the period would be passed (`limit`, `spent`, `resets_at`). \
            Nothing is charged."),
        (status = 409, description = "`idempotency_conflict`: a request with this \
            `Idempotency-Key` is still running, or this one outlived its claim and a retry took \
            it over (this attempt was undone)."),
        (status = 422, description = "`validation_failed`: `amount` or `reason` out of range, \
            or an unknown field; `idempotency_key_reused`: this `Idempotency-Key` came with \
            another request."),
    ),
    security(("ApiKey" = ["scrape"]), ("ApiKeyHeader" = ["scrape"])),
)]
pub async fn charge(
    state: web::Data<AppState>,
    caller: Authenticated,
    req: HttpRequest,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    caller.require(Scope::Scrape)?;
    let (raw, body): (serde_json::Value, ChargeBody) = crate::http::extractors::json_body(&body)?;
    let charge = MeteredCharge::new(body.amount, body.reason)?;
    let request = idempotent::request(&req, caller.account_id, &raw, StatusCode::CREATED)?;
    let lane = state.config.charge_coalescing.then_some(&*state.charges);
    let outcome = idempotency::run(&state.db, state.config.request_timeout, request, |guard| {
        metered::charge(
            &state.db,
            lane,
            caller.account_id,
            &caller.key_id,
            &charge,
            guard,
        )
    })
    .await?;
    Ok(idempotent::respond(outcome, |m| {
        HttpResponse::Created().json(m)
    }))
}
