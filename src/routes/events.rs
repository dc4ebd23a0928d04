//! `/v1/events` and `/v1/webhook-endpoints`: an account's event log, and the endpoints its
//! events are POSTed to (see `events::delivery` for how, and the README for verifying them).
//!
//! Scopes: reading events, endpoints and deliveries needs `read`. Creating, deleting and
//! rotating an endpoint needs `keys:manage`: those answers carry a signing secret, a
//! credential like a key, and an endpoint receives everything that happens to the account —
//! the power to add one is the power to manage the account's credentials.

use actix_web::{web, HttpResponse};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::{Authenticated, Scope};
use crate::events::endpoints::{self, EndpointView, EndpointWithSecret};
use crate::events::reads::{self, DeliveryView};
use crate::events::EventType;
use crate::http::problem::{ApiError, ApiResult};
use crate::pagination::{Page, PageQuery};
use crate::routes::{Access, Routes};
use crate::startup::AppState;

pub fn configure(routes: &mut Routes) {
    routes
        .get(Access::Key, "/v1/events", list_events)
        .get(Access::Key, "/v1/webhook-endpoints", list_endpoints)
        .post(Access::Key, "/v1/webhook-endpoints", create_endpoint)
        .get(Access::Key, "/v1/webhook-endpoints/{id}", get_endpoint)
        .delete(Access::Key, "/v1/webhook-endpoints/{id}", delete_endpoint)
        .post(
            Access::Key,
            "/v1/webhook-endpoints/{id}/rotate-secret",
            rotate_secret,
        )
        .get(
            Access::Key,
            "/v1/webhook-endpoints/{id}/deliveries",
            list_deliveries,
        );
}

/// An event, as `GET /v1/events` lists it and as a webhook delivery's body carries it.
#[derive(Serialize, ToSchema)]
#[schema(as = Event)]
#[allow(dead_code)]
pub struct EventDoc {
    /// `evt_` and 32 hex digits; the same on every retry of its deliveries — deduplicate on
    /// it.
    #[schema(example = "evt_0190f6e4c5a97b1e8c4e2f1a3b5d7c9e")]
    id: String,
    /// One of the event types (see the README's list and each one's `data`).
    #[serde(rename = "type")]
    #[schema(example = "key.created")]
    event_type: String,
    account_id: Uuid,
    created_at: DateTime<Utc>,
    /// The event's facts: `key.created`/`key.revoked` `{key_id, name}`; `credits.granted`
    /// `{amount, balance_after, source, ledger_entry_id}`; `job.succeeded`/`job.failed`
    /// `{job_id, status, cost, …}`; others as their issue section documents.
    #[schema(value_type = Object)]
    data: Value,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Events per page, 1 to 100 (default 20).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 100)]
    limit: Option<String>,
    /// `next_cursor` from the previous page.
    #[param(pattern = "^-?[0-9]{1,16}_[0-9]{1,19}$")]
    cursor: Option<String>,
    /// Only events of this type (`key.created`, `credits.granted`, …).
    #[serde(rename = "type")]
    event_type: Option<String>,
}

fn bad_cursor() -> ApiError {
    ApiError::InvalidRequest("The cursor is not one this API returned.".into())
}

#[utoipa::path(
    get,
    path = "/v1/events",
    operation_id = "list_events",
    tag = "events",
    summary = "List events",
    description = "This account's events, newest first, cursor-paginated, optionally of one \
        `type`. Each was recorded in the transaction of the change it describes.",
    params(EventsQuery),
    responses(
        (status = 200, description = "A page of events.", body = Page<EventDoc>),
        (status = 400, description = "`invalid_request`: a malformed query string, an unknown \
            parameter or a cursor this API did not return."),
        (status = 422, description = "`validation_failed`: `limit` out of range or an \
            unknown `type`."),
    ),
    security(("ApiKey" = ["read"]), ("ApiKeyHeader" = ["read"])),
)]
pub async fn list_events(
    state: web::Data<AppState>,
    caller: Authenticated,
    q: web::Query<EventsQuery>,
) -> ApiResult<HttpResponse> {
    caller.require(Scope::Read)?;
    let q = q.into_inner();
    let event_type = match &q.event_type {
        Some(t) => Some(EventType::parse(t).ok_or_else(|| {
            ApiError::validation(
                "type",
                format!(
                    "type must be one of {}.",
                    EventType::ALL.map(|t| t.as_str()).join(", ")
                ),
            )
        })?),
        None => None,
    };
    let page = PageQuery {
        limit: q.limit,
        cursor: q.cursor,
    };
    let limit = page.limit()?;
    let before = match page.cursor()? {
        Some(c) => Some(c.id_as::<i64>().map_err(|_| bad_cursor())?),
        None => None,
    };
    let client = state.db.get().await?;
    let events = reads::list_events(&client, caller.account_id, event_type, before, limit).await?;
    Ok(
        HttpResponse::Ok().json(Page::from_overfetch(events, limit, |e| {
            (e.created_at, e.seq.to_string())
        })),
    )
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = NewWebhookEndpoint)]
pub struct CreateEndpoint {
    /// An http(s) URL of at most 2048 characters, not at a loopback, private, link-local or
    /// other internal address, without credentials.
    #[schema(example = "https://example.com/keymeter/events", max_length = 2048)]
    url: String,
    /// The event types to deliver there, at least one.
    #[schema(min_items = 1, example = json!(["key.created", "credits.granted"]))]
    events: Vec<String>,
}

#[utoipa::path(
    post,
    path = "/v1/webhook-endpoints",
    operation_id = "create_webhook_endpoint",
    tag = "events",
    summary = "Create a webhook endpoint",
    description = "From now on, this account's events of the listed types are POSTed to `url`, \
        signed with the endpoint's `secret` (`Keymeter-Signature: t=…,v1=…`, the hex \
        HMAC-SHA256 of `t.body` keyed with the secret exactly as shown). The `secret` is shown \
        here and by rotate-secret only. An account holds at most 16 endpoints.",
    request_body = CreateEndpoint,
    responses(
        crate::openapi::JsonBody,
        (status = 201, description = "The endpoint, with its signing secret.", body = EndpointWithSecret),
        (status = 404, description = "`feature_disabled`: the server has no event signing key."),
        (status = 409, description = "`webhook_endpoint_limit_reached`: the account holds the \
            most endpoints it may (`max_endpoints`)."),
        (status = 422, description = "`validation_failed`: a malformed `url`, no or an unknown \
            event type (`field`); `url_not_allowed`: `url` points at an internal address or \
            carries credentials."),
    ),
    security(("ApiKey" = ["keys:manage"]), ("ApiKeyHeader" = ["keys:manage"])),
)]
pub async fn create_endpoint(
    state: web::Data<AppState>,
    caller: Authenticated,
    body: web::Json<CreateEndpoint>,
) -> ApiResult<HttpResponse> {
    caller.require(Scope::KeysManage)?;
    let b = body.into_inner();
    let sender = &state.event_sender;
    let events = endpoints::parse_events(&b.events)?;
    let url = endpoints::check_url(sender.guard(), &b.url).await?;
    let created = endpoints::create(
        &state.db,
        sender.signing_key(),
        sender.settings().max_endpoints,
        caller.account_id,
        &url,
        &events,
    )
    .await?;
    Ok(HttpResponse::Created().json(created))
}

#[utoipa::path(
    get,
    path = "/v1/webhook-endpoints",
    operation_id = "list_webhook_endpoints",
    tag = "events",
    summary = "List webhook endpoints",
    description = "Newest first, cursor-paginated. Never shows a secret.",
    params(PageQuery),
    responses(
        (status = 200, description = "A page of endpoints.", body = Page<EndpointView>),
        (status = 400, description = "`invalid_request`: a malformed query string or cursor."),
        (status = 422, description = "`validation_failed`: `limit` out of range."),
    ),
    security(("ApiKey" = ["read"]), ("ApiKeyHeader" = ["read"])),
)]
pub async fn list_endpoints(
    state: web::Data<AppState>,
    caller: Authenticated,
    q: web::Query<PageQuery>,
) -> ApiResult<HttpResponse> {
    caller.require(Scope::Read)?;
    let limit = q.limit()?;
    let after = match q.cursor()? {
        Some(c) => Some((c.at, c.id_as::<Uuid>().map_err(|_| bad_cursor())?)),
        None => None,
    };
    let client = state.db.get().await?;
    let rows = endpoints::list(&client, caller.account_id, limit, after).await?;
    Ok(
        HttpResponse::Ok().json(Page::from_overfetch(rows, limit, |e| {
            (
                e.created_at,
                e.id.strip_prefix("we_").unwrap_or(&e.id).to_owned(),
            )
        })),
    )
}

#[utoipa::path(
    get,
    path = "/v1/webhook-endpoints/{id}",
    operation_id = "get_webhook_endpoint",
    tag = "events",
    summary = "One webhook endpoint",
    params(("id" = String, Path, description = "The endpoint id (`we_…`).")),
    responses(
        (status = 200, description = "The endpoint (without its secret).", body = EndpointView),
        (status = 404, description = "`not_found`: no endpoint with that id on this account."),
    ),
    security(("ApiKey" = ["read"]), ("ApiKeyHeader" = ["read"])),
)]
pub async fn get_endpoint(
    state: web::Data<AppState>,
    caller: Authenticated,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    caller.require(Scope::Read)?;
    let client = state.db.get().await?;
    let e = endpoints::get(&client, caller.account_id, &path).await?;
    Ok(HttpResponse::Ok().json(e))
}

#[utoipa::path(
    delete,
    path = "/v1/webhook-endpoints/{id}",
    operation_id = "delete_webhook_endpoint",
    tag = "events",
    summary = "Delete a webhook endpoint",
    description = "No more deliveries are made to it; its pending ones are dropped (one being \
        sent at this moment may still arrive).",
    params(("id" = String, Path, description = "The endpoint id (`we_…`).")),
    responses(
        (status = 204, description = "Deleted."),
        (status = 404, description = "`not_found`: no endpoint with that id on this account."),
    ),
    security(("ApiKey" = ["keys:manage"]), ("ApiKeyHeader" = ["keys:manage"])),
)]
pub async fn delete_endpoint(
    state: web::Data<AppState>,
    caller: Authenticated,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    caller.require(Scope::KeysManage)?;
    let client = state.db.get().await?;
    endpoints::delete(&client, caller.account_id, &path).await?;
    Ok(HttpResponse::NoContent().finish())
}

#[utoipa::path(
    post,
    path = "/v1/webhook-endpoints/{id}/rotate-secret",
    operation_id = "rotate_webhook_endpoint_secret",
    tag = "events",
    summary = "Rotate an endpoint's signing secret",
    description = "A new `secret`, shown this once. For 24 hours the previous secret still \
        signs: every delivery carries two `v1` signatures (the new secret's first), so a \
        receiver accepting either switches without losing a delivery. Rotating again within \
        those 24 hours ends the older secret at once.",
    params(("id" = String, Path, description = "The endpoint id (`we_…`).")),
    responses(
        (status = 200, description = "The endpoint, with its new secret.", body = EndpointWithSecret),
        (status = 404, description = "`not_found`: no endpoint with that id on this account; \
            `feature_disabled`: the server has no event signing key."),
    ),
    security(("ApiKey" = ["keys:manage"]), ("ApiKeyHeader" = ["keys:manage"])),
)]
pub async fn rotate_secret(
    state: web::Data<AppState>,
    caller: Authenticated,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    caller.require(Scope::KeysManage)?;
    let client = state.db.get().await?;
    let e = endpoints::rotate_secret(
        &client,
        state.event_sender.signing_key(),
        caller.account_id,
        &path,
    )
    .await?;
    Ok(HttpResponse::Ok().json(e))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeliveriesQuery {
    /// Deliveries per page, 1 to 100 (default 20).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 100)]
    limit: Option<String>,
    /// `next_cursor` from the previous page.
    #[param(pattern = "^-?[0-9]{1,16}_[0-9]{1,19}$")]
    cursor: Option<String>,
}

#[utoipa::path(
    get,
    path = "/v1/webhook-endpoints/{id}/deliveries",
    operation_id = "list_webhook_deliveries",
    tag = "events",
    summary = "An endpoint's deliveries",
    description = "Newest first, cursor-paginated: each event sent (or to be sent) to this \
        endpoint, with its status (`pending`, `delivered`, `failed`), attempts, the last \
        response code and the next attempt. A failing delivery is retried with backoff (5 s, \
        doubling, at most an hour apart) until its event is a day old.",
    params(("id" = String, Path, description = "The endpoint id (`we_…`)."), DeliveriesQuery),
    responses(
        (status = 200, description = "A page of deliveries.", body = Page<DeliveryView>),
        (status = 400, description = "`invalid_request`: a malformed query string or cursor."),
        (status = 404, description = "`not_found`: no endpoint with that id on this account."),
        (status = 422, description = "`validation_failed`: `limit` out of range."),
    ),
    security(("ApiKey" = ["read"]), ("ApiKeyHeader" = ["read"])),
)]
pub async fn list_deliveries(
    state: web::Data<AppState>,
    caller: Authenticated,
    path: web::Path<String>,
    q: web::Query<DeliveriesQuery>,
) -> ApiResult<HttpResponse> {
    caller.require(Scope::Read)?;
    let q = q.into_inner();
    let page = PageQuery {
        limit: q.limit,
        cursor: q.cursor,
    };
    let limit = page.limit()?;
    let before = match page.cursor()? {
        Some(c) => Some(c.id_as::<i64>().map_err(|_| bad_cursor())?),
        None => None,
    };
    let client = state.db.get().await?;
    let rows = reads::list_deliveries(&client, caller.account_id, &path, before, limit).await?;
    Ok(
        HttpResponse::Ok().json(Page::from_overfetch(rows, limit, |d| {
            (d.created_at, d.seq.to_string())
        })),
    )
}
