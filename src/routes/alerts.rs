//! `/v1/account/alerts`: the account's low-balance threshold (see `credits::alerts`).

use actix_web::{web, HttpResponse};
use serde::{Deserialize, Deserializer};
use utoipa::ToSchema;

use crate::auth::{Authenticated, Scope};
use crate::credits::alerts::{self, AlertSettings};
use crate::http::problem::{ApiError, ApiResult};
use crate::routes::{Access, Routes};
use crate::startup::AppState;

pub fn configure(routes: &mut Routes) {
    routes
        .get(Access::Key, "/v1/account/alerts", get_alerts)
        .put(Access::Key, "/v1/account/alerts", put_alerts);
}

/// A field that must be present, `null` being a value of its own.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<i64>>, D::Error> {
    Option::<i64>::deserialize(d).map(Some)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AlertsBody {
    /// `balance.low` fires when a charge takes the balance from at or above this to below
    /// it (0 to 10^15; 0: never). `null` follows the tier's default again.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<i64>, minimum = 0, maximum = 1e15, required = true)]
    low_balance_threshold: Option<Option<i64>>,
}

/// `GET /v1/account/alerts` (`billing`).
#[utoipa::path(
    get,
    path = "/v1/account/alerts",
    operation_id = "get_account_alerts",
    tag = "accounts",
    summary = "Low-balance alert settings",
    description = "The threshold in effect (the account's own or its tier's default), where \
        it comes from, and whether the balance is below it now.",
    responses(
        (status = 200, description = "The alert settings.", body = AlertSettings),
    ),
    security(("ApiKey" = ["billing"]), ("ApiKeyHeader" = ["billing"])),
)]
pub async fn get_alerts(
    state: web::Data<AppState>,
    caller: Authenticated,
) -> ApiResult<HttpResponse> {
    caller.require(Scope::Billing)?;
    let client = state.db.get().await?;
    let settings = alerts::get(&client, &state.tiers, caller.account_id).await?;
    Ok(HttpResponse::Ok().json(settings))
}

/// `PUT /v1/account/alerts {low_balance_threshold}` (`billing`).
#[utoipa::path(
    put,
    path = "/v1/account/alerts",
    operation_id = "put_account_alerts",
    tag = "accounts",
    summary = "Set the low-balance threshold",
    description = "`balance.low` fires once when a charge takes the balance from at or above \
        the threshold to below it, and again only after the balance was back at or above it; \
        `balance.depleted` when a charge takes it to 0. Setting a threshold fires nothing. \
        `null` returns to the tier's default.",
    request_body = AlertsBody,
    responses(
        crate::openapi::JsonBody,
        (status = 200, description = "The alert settings now.", body = AlertSettings),
        (status = 422, description = "`validation_failed`: `low_balance_threshold` missing, \
            not a whole number, or outside 0 to 10^15, or an unknown field."),
    ),
    security(("ApiKey" = ["billing"]), ("ApiKeyHeader" = ["billing"])),
)]
pub async fn put_alerts(
    state: web::Data<AppState>,
    caller: Authenticated,
    body: web::Json<AlertsBody>,
) -> ApiResult<HttpResponse> {
    caller.require(Scope::Billing)?;
    let Some(threshold) = body.low_balance_threshold else {
        return Err(ApiError::validation(
            "low_balance_threshold",
            "low_balance_threshold is required (null: the tier's default).",
        ));
    };
    let client = state.db.get().await?;
    let settings = alerts::set(&client, &state.tiers, caller.account_id, threshold).await?;
    Ok(HttpResponse::Ok().json(settings))
}
