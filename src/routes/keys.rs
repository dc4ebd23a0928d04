//! `/v1/keys`: an account manages its own keys. A key only ever sees its own account's keys;
//! another account's key id is simply not found. A key never creates (or rotates into
//! existence) a key with more power than its own, and an account holds at most its tier's
//! `max_keys` active keys (see `auth::key_store`).

use actix_web::{web, HttpResponse};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use utoipa::ToSchema;

use crate::auth::key_store::{CreatedKey, KeySpec, KeyView};
use crate::auth::{key_actions, Authenticated, Scope};
use crate::credits::key_caps::SpendLimit;
use crate::http::problem::ApiResult;
use crate::pagination::{Page, PageQuery};
use crate::routes::{Access, Routes};
use crate::startup::AppState;

pub fn configure(routes: &mut Routes) {
    routes
        .get(Access::Key, "/v1/keys", list)
        .post(Access::Key, "/v1/keys", create)
        .get(Access::Key, "/v1/keys/{id}", get)
        .patch(Access::Key, "/v1/keys/{id}", update)
        .delete(Access::Key, "/v1/keys/{id}", revoke)
        .post(Access::Key, "/v1/keys/{id}/rotate", rotate);
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = NewKey)]
pub struct CreateKey {
    /// 1 to 100 characters, not only spaces, no control characters (default `default`).
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"
    )]
    name: Option<String>,
    /// At least one scope (default `scrape`, `read`), each one the calling key has.
    #[schema(value_type = Option<Vec<Scope>>, min_items = 1)]
    scopes: Option<Vec<String>>,
    /// When the key stops working; must be in the future and, if the calling key expires, no
    /// later than it. When absent: the calling key's expiry (never, if it has none).
    expires_at: Option<DateTime<Utc>>,
    /// The key's own limit in requests per minute, from 1 to the tier's; enforced on top of
    /// the account's tier limit, which all its keys share. When absent: the calling key's own
    /// limit, if it has one.
    #[schema(minimum = 1)]
    rate_limit: Option<i64>,
    /// What the key may spend per UTC calendar day or month; a charge or job beyond it is
    /// `402 key_spend_limit_exceeded`. When absent: the calling key's own limit, if it has
    /// one (a key with a limit may only create keys with no more credits over the same period).
    spend_limit: Option<SpendLimit>,
}

#[utoipa::path(
    post,
    path = "/v1/keys",
    operation_id = "create_key",
    tag = "keys",
    summary = "Create a key",
    description = "A new key for this account. The response's `key` is the only time the \
        whole key is shown. The new key carries no more than the calling key: only scopes it \
        has, an expiry no later than its own (inherited when absent), a rate limit no higher \
        than its own (inherited when absent). An account holds at most its tier's `max_keys` \
        active keys.",
    request_body = CreateKey,
    responses(
        crate::openapi::JsonBody,
        (status = 201, description = "The new key, with its plaintext.", body = CreatedKey),
        (status = 403, description = "`insufficient_scope`: also when the new key would carry \
            more than the calling key: scopes it lacks (`missing_scopes`), a later expiry, a \
            higher rate limit, or no spend limit, a higher one or another period than its own."),
        (status = 409, description = "`key_limit_reached`: the account already holds its \
            tier's `max_keys` active keys (`max_keys`)."),
        (status = 422, description = "`validation_failed`: a bad name, an unknown scope, an \
            expiry in the past, a `rate_limit` outside 1 to the tier's requests per minute, \
            `spend_limit.credits` below 1, or an unknown field."),
    ),
    security(("ApiKey" = ["keys:manage"]), ("ApiKeyHeader" = ["keys:manage"])),
)]
pub async fn create(
    state: web::Data<AppState>,
    caller: Authenticated,
    body: web::Json<CreateKey>,
) -> ApiResult<HttpResponse> {
    caller.require(Scope::KeysManage)?;
    let b = body.into_inner();
    let spec = KeySpec::parse(b.name, b.scopes, b.expires_at)?;
    let created = key_actions::create(
        &state.db,
        &state.tiers,
        &caller,
        spec,
        b.rate_limit,
        b.spend_limit,
    )
    .await?;
    Ok(HttpResponse::Created().json(created))
}

#[utoipa::path(
    get,
    path = "/v1/keys",
    operation_id = "list_keys",
    tag = "keys",
    summary = "List this account's keys",
    description = "Newest first, cursor-paginated. Never shows a secret.",
    params(PageQuery),
    responses(
        (status = 200, description = "A page of keys.", body = Page<KeyView>),
        (status = 400, description = "`invalid_request`: a malformed query string or cursor."),
        (status = 422, description = "`validation_failed`: `limit` out of range, or a \
            `cursor` whose time is out of range."),
    ),
    security(("ApiKey" = ["read"]), ("ApiKeyHeader" = ["read"])),
)]
pub async fn list(
    state: web::Data<AppState>,
    caller: Authenticated,
    query: web::Query<PageQuery>,
) -> ApiResult<HttpResponse> {
    caller.require(Scope::Read)?;
    let limit = query.limit()?;
    let cursor = query.cursor()?;
    let rows = key_actions::list(&state.db, caller.account_id, limit, cursor).await?;
    Ok(
        HttpResponse::Ok().json(Page::from_overfetch(rows, limit, |k| {
            (k.created_at, k.id.clone())
        })),
    )
}

#[utoipa::path(
    get,
    path = "/v1/keys/{id}",
    operation_id = "get_key",
    tag = "keys",
    summary = "One key",
    params(("id" = String, Path, description = "The key id (12 characters).")),
    responses(
        (status = 200, description = "The key.", body = KeyView),
        (status = 404, description = "`not_found`: no key with that id on this account."),
    ),
    security(("ApiKey" = ["read"]), ("ApiKeyHeader" = ["read"])),
)]
pub async fn get(
    state: web::Data<AppState>,
    caller: Authenticated,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    caller.require(Scope::Read)?;
    let k = key_actions::get(&state.db, caller.account_id, &path).await?;
    Ok(HttpResponse::Ok().json(k))
}

#[utoipa::path(
    delete,
    path = "/v1/keys/{id}",
    operation_id = "revoke_key",
    tag = "keys",
    summary = "Revoke a key",
    description = "Idempotent. A key may revoke itself. Every instance refuses the key within \
        a second.",
    params(("id" = String, Path, description = "The key id (12 characters).")),
    responses(
        (status = 200, description = "The revoked key.", body = KeyView),
        (status = 404, description = "`not_found`: no key with that id on this account."),
    ),
    security(("ApiKey" = ["keys:manage"]), ("ApiKeyHeader" = ["keys:manage"])),
)]
pub async fn revoke(
    state: web::Data<AppState>,
    caller: Authenticated,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    caller.require(Scope::KeysManage)?;
    let k = key_actions::revoke(&state.db, &state.auth.cache, &caller, &path).await?;
    Ok(HttpResponse::Ok().json(k))
}

/// `Some(None)` for an explicit `null`, `None` when the field is absent.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = KeyUpdate)]
pub struct UpdateKey {
    /// A new name: 1 to 100 characters, not only spaces, no control characters.
    #[schema(min_length = 1, max_length = 100)]
    name: Option<String>,
    /// A new spend limit; `null` removes it. A new limit, or one whose period changes,
    /// starts from what the key already spent in the current period; changing only the
    /// credits keeps the period's count.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<SpendLimit>, nullable)]
    spend_limit: Option<Option<SpendLimit>>,
}

#[utoipa::path(
    patch,
    path = "/v1/keys/{id}",
    operation_id = "update_key",
    tag = "keys",
    summary = "Change a key's name or spend limit",
    description = "Changes the fields present: `name`, and `spend_limit` (`null` removes it). \
        Charges racing the change are decided against it exactly. A key with a spend limit of \
        its own may only set limits of no more credits over the same period, and cannot remove \
        one.",
    params(("id" = String, Path, description = "The key id (12 characters).")),
    request_body = UpdateKey,
    responses(
        crate::openapi::JsonBody,
        (status = 200, description = "The key as it now is.", body = KeyView),
        (status = 403, description = "`insufficient_scope`: also when the calling key has a \
            spend limit and the new one would be higher, of another period, or none."),
        (status = 404, description = "`not_found`: no key with that id on this account."),
        (status = 422, description = "`validation_failed`: a bad name, `spend_limit.credits` \
            below 1, an unknown `period`, or an unknown field."),
    ),
    security(("ApiKey" = ["keys:manage"]), ("ApiKeyHeader" = ["keys:manage"])),
)]
pub async fn update(
    state: web::Data<AppState>,
    caller: Authenticated,
    path: web::Path<String>,
    body: web::Json<UpdateKey>,
) -> ApiResult<HttpResponse> {
    caller.require(Scope::KeysManage)?;
    let b = body.into_inner();
    let k = key_actions::update(&state.db, &caller, &path, b.name, b.spend_limit).await?;
    Ok(HttpResponse::Ok().json(k))
}

#[derive(Deserialize, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Rotate {
    /// How long the old key keeps working, 0 to 86400 seconds (default 3600).
    #[schema(minimum = 0, maximum = 86400)]
    grace_seconds: Option<i64>,
}

#[utoipa::path(
    post,
    path = "/v1/keys/{id}/rotate",
    operation_id = "rotate_key",
    tag = "keys",
    summary = "Rotate a key",
    description = "Issues a successor with the same name, scopes, expiry and rate limit \
        (whatever the request asks); the old key works until its grace period ends. The calling \
        key may only rotate a key it could have created: none with scopes it lacks, a later \
        expiry or a higher rate limit. A rotation never counts against `max_keys` (the old key \
        leaves the count). The body is optional.",
    params(("id" = String, Path, description = "The key id (12 characters).")),
    request_body(content = Option<Rotate>, content_type = "application/json"),
    responses(
        (status = 201, description = "The successor key, with its plaintext.", body = CreatedKey),
        (status = 400, description = "`invalid_json`: the body is not JSON; `bad_request`: it \
            could not be read."),
        (status = 403, description = "`insufficient_scope`: also when the key to rotate \
            carries more than the calling key: scopes it lacks (`missing_scopes`), a later \
            expiry, or a higher rate limit."),
        (status = 404, description = "`not_found`: no key with that id on this account."),
        (status = 409, description = "`key_revoked`: the key is revoked; \
            `key_already_rotated`: it already has a successor."),
        (status = 422, description = "`validation_failed`: `grace_seconds` out of range or an \
            unknown field."),
    ),
    security(("ApiKey" = ["keys:manage"]), ("ApiKeyHeader" = ["keys:manage"])),
)]
pub async fn rotate(
    state: web::Data<AppState>,
    caller: Authenticated,
    path: web::Path<String>,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    caller.require(Scope::KeysManage)?;
    let body: Rotate = crate::http::extractors::json_or_default(&body)?;
    let created = key_actions::rotate(
        &state.db,
        &state.auth.cache,
        &caller,
        &path,
        body.grace_seconds,
    )
    .await?;
    Ok(HttpResponse::Created().json(created))
}
