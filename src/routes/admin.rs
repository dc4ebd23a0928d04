//! `/admin`: the operator API, behind `Authorization: Bearer $KEYMETER_ADMIN_TOKEN`. The
//! same operations as `keymeter admin …` (both call `crate::operator`).

use actix_web::{web, HttpResponse};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::accounts::Account;
use crate::audit::{self, Actor, AuditEvent};
use crate::auth::key_store::{CreatedKey, KeySpec, KeyView};
use crate::auth::Scope;
use crate::credits::Movement;
use crate::http::admin_token::AdminToken;
use crate::http::problem::{ApiError, ApiResult};
use crate::operator;
use crate::pagination::Page;
use crate::routes::{Access, Routes};
use crate::startup::AppState;

pub fn configure(routes: &mut Routes) {
    routes
        .post(Access::Admin, "/admin/accounts", create_account)
        .get(Access::Admin, "/admin/accounts/{id}", get_account)
        .post(Access::Admin, "/admin/accounts/{id}/keys", create_key)
        .put(Access::Admin, "/admin/accounts/{id}/tier", set_tier)
        .post(Access::Admin, "/admin/accounts/{id}/tier", set_tier_post)
        .post(Access::Admin, "/admin/accounts/{id}/suspend", suspend)
        .post(Access::Admin, "/admin/accounts/{id}/unsuspend", unsuspend)
        .post(Access::Admin, "/admin/accounts/{id}/credits", grant_credits)
        .post(Access::Admin, "/admin/keys/{id}/revoke", revoke_key)
        .get(Access::Admin, "/admin/audit", audit_trail);
}

fn account_id(raw: &str) -> Result<Uuid, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::NotFound("No account with that id.".into()))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = AdminNewAccount)]
pub struct CreateAccount {
    #[schema(example = "ada@example.com", format = Email, max_length = 254)]
    email: String,
    /// A configured tier (default `free`).
    tier: Option<String>,
    /// Starting credits, recorded as a `grant` (default 0).
    #[serde(default)]
    #[schema(minimum = 0)]
    credits: i64,
}

/// What `keymeter admin create-account --json` prints, plus the account.
#[derive(Serialize, ToSchema)]
pub struct AdminCreatedAccount {
    account_id: Uuid,
    /// The account's first key (all scopes). Shown only here.
    #[schema(example = "km_live_a1B2c3D4e5F6_…")]
    api_key: String,
    account: Account,
}

const ID: &str = "The account id (a UUID).";

#[utoipa::path(
    post,
    path = "/admin/accounts",
    operation_id = "admin_create_account",
    tag = "admin",
    summary = "Create an account",
    request_body = CreateAccount,
    responses(
        crate::openapi::JsonBody,
        (status = 201, description = "The account and its first key.", body = AdminCreatedAccount),
        (status = 409, description = "`email_taken`: an account with this email exists."),
        (status = 422, description = "`validation_failed`: a bad email, an unknown tier, \
            negative credits, or an unknown field."),
    ),
    security(("AdminToken" = [])),
)]
pub async fn create_account(
    _: AdminToken,
    state: web::Data<AppState>,
    body: web::Json<CreateAccount>,
) -> ApiResult<HttpResponse> {
    let b = body.into_inner();
    let (account, key) = operator::create_account(
        &state.db,
        &state.tiers,
        &Actor::AdminToken,
        &b.email,
        b.tier.as_deref(),
        b.credits,
    )
    .await?;
    tracing::info!(account_id = %account.id, "admin: account created");
    Ok(HttpResponse::Created().json(AdminCreatedAccount {
        account_id: account.id,
        api_key: key.key,
        account,
    }))
}

#[utoipa::path(
    get,
    path = "/admin/accounts/{id}",
    operation_id = "admin_get_account",
    tag = "admin",
    summary = "One account",
    params(("id" = String, Path, description = ID)),
    responses(
        (status = 200, description = "The account.", body = Account),
        (status = 404, description = "`not_found`: no account with that id."),
    ),
    security(("AdminToken" = [])),
)]
pub async fn get_account(
    _: AdminToken,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let id = account_id(&path)?;
    let account = operator::get_account(&state.db, id).await?;
    Ok(HttpResponse::Ok().json(account))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = AdminNewKey)]
pub struct CreateKey {
    /// 1 to 100 characters, not only spaces, no control characters (default `default`).
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"
    )]
    name: Option<String>,
    /// At least one scope (default `scrape`, `read`).
    #[schema(value_type = Option<Vec<Scope>>, min_items = 1)]
    scopes: Option<Vec<String>>,
    /// When the key stops working; must be in the future.
    expires_at: Option<DateTime<Utc>>,
    /// What the key may spend per UTC calendar day or month (see `POST /v1/keys`).
    spend_limit: Option<crate::credits::key_caps::SpendLimit>,
}

#[utoipa::path(
    post,
    path = "/admin/accounts/{id}/keys",
    operation_id = "admin_create_key",
    tag = "admin",
    summary = "Create a key for an account",
    params(("id" = String, Path, description = ID)),
    request_body = CreateKey,
    responses(
        crate::openapi::JsonBody,
        (status = 201, description = "The new key, with its plaintext.", body = CreatedKey),
        (status = 404, description = "`not_found`: no account with that id."),
        (status = 422, description = "`validation_failed`: a bad name, an unknown scope, an \
            expiry in the past, or an unknown field."),
    ),
    security(("AdminToken" = [])),
)]
pub async fn create_key(
    _: AdminToken,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<CreateKey>,
) -> ApiResult<HttpResponse> {
    let id = account_id(&path)?;
    let b = body.into_inner();
    let spec = KeySpec::parse(b.name, b.scopes, b.expires_at)?;
    let key = operator::create_key(&state.db, &Actor::AdminToken, id, &spec, b.spend_limit).await?;
    Ok(HttpResponse::Created().json(key))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetTier {
    /// A configured tier.
    #[schema(example = "pro")]
    tier: String,
}

#[utoipa::path(
    put,
    path = "/admin/accounts/{id}/tier",
    operation_id = "admin_set_tier",
    tag = "admin",
    summary = "Set an account's tier",
    description = "Also accepted as `POST`. Takes effect on every instance within a second.",
    params(("id" = String, Path, description = ID)),
    request_body = SetTier,
    responses(
        crate::openapi::JsonBody,
        (status = 200, description = "The account.", body = Account),
        (status = 404, description = "`not_found`: no account with that id."),
        (status = 422, description = "`validation_failed`: an unknown tier or field."),
    ),
    security(("AdminToken" = [])),
)]
pub async fn set_tier(
    _: AdminToken,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<SetTier>,
) -> ApiResult<HttpResponse> {
    let id = account_id(&path)?;
    let a = operator::set_tier(&state.db, &state.tiers, &Actor::AdminToken, id, &body.tier).await?;
    state.auth.cache.invalidate_account(id);
    Ok(HttpResponse::Ok().json(a))
}

/// `POST /admin/accounts/{id}/tier`: the same as `PUT`, for clients that only `POST`.
#[utoipa::path(
    post,
    path = "/admin/accounts/{id}/tier",
    operation_id = "admin_set_tier_post",
    tag = "admin",
    summary = "Set an account's tier (POST form)",
    description = "The same as `PUT /admin/accounts/{id}/tier`.",
    params(("id" = String, Path, description = ID)),
    request_body = SetTier,
    responses(
        crate::openapi::JsonBody,
        (status = 200, description = "The account.", body = Account),
        (status = 404, description = "`not_found`: no account with that id."),
        (status = 422, description = "`validation_failed`: an unknown tier or field."),
    ),
    security(("AdminToken" = [])),
)]
pub async fn set_tier_post(
    token: AdminToken,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<SetTier>,
) -> ApiResult<HttpResponse> {
    set_tier(token, state, path, body).await
}

#[utoipa::path(
    post,
    path = "/admin/accounts/{id}/suspend",
    operation_id = "admin_suspend",
    tag = "admin",
    summary = "Suspend an account",
    description = "Its keys are refused (401) on every instance within a second.",
    params(("id" = String, Path, description = ID)),
    responses(
        (status = 200, description = "The account.", body = Account),
        (status = 404, description = "`not_found`: no account with that id."),
    ),
    security(("AdminToken" = [])),
)]
pub async fn suspend(
    _: AdminToken,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let id = account_id(&path)?;
    let a = operator::set_active(&state.db, &Actor::AdminToken, id, false).await?;
    state.auth.cache.invalidate_account(id);
    Ok(HttpResponse::Ok().json(a))
}

#[utoipa::path(
    post,
    path = "/admin/accounts/{id}/unsuspend",
    operation_id = "admin_unsuspend",
    tag = "admin",
    summary = "Reactivate a suspended account",
    params(("id" = String, Path, description = ID)),
    responses(
        (status = 200, description = "The account.", body = Account),
        (status = 404, description = "`not_found`: no account with that id."),
    ),
    security(("AdminToken" = [])),
)]
pub async fn unsuspend(
    _: AdminToken,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let id = account_id(&path)?;
    let a = operator::set_active(&state.db, &Actor::AdminToken, id, true).await?;
    state.auth.cache.invalidate_account(id);
    Ok(HttpResponse::Ok().json(a))
}

#[utoipa::path(
    post,
    path = "/admin/keys/{id}/revoke",
    operation_id = "admin_revoke_key",
    tag = "admin",
    summary = "Revoke any account's key",
    params(("id" = String, Path, description = "The key id (12 characters).")),
    responses(
        (status = 200, description = "The revoked key.", body = KeyView),
        (status = 404, description = "`not_found`: no key with that id."),
    ),
    security(("AdminToken" = [])),
)]
pub async fn revoke_key(
    _: AdminToken,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let k = operator::revoke_key(&state.db, &Actor::AdminToken, &path).await?;
    state.auth.cache.invalidate_key(&k.id).await;
    Ok(HttpResponse::Ok().json(k))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// Positive: a `grant`; negative: an `adjustment`, refused if it would take the balance
    /// below zero. Not zero.
    #[schema(example = 100)]
    amount: i64,
    /// 1 to 500 characters (not only spaces, no NUL), kept on the ledger entry.
    #[schema(
        min_length = 1,
        max_length = 500,
        pattern = r"^[^\x00]*[^\s\x00][^\x00]*$"
    )]
    reason: String,
    /// The grant expires then (RFC 3339, in the future): its unspent rest leaves the balance
    /// within a minute as an `expiry` entry. Only with a positive `amount`.
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

#[utoipa::path(
    post,
    path = "/admin/accounts/{id}/credits",
    operation_id = "admin_grant_credits",
    tag = "admin",
    summary = "Grant or adjust credits",
    params(("id" = String, Path, description = ID)),
    request_body = Grant,
    responses(
        crate::openapi::JsonBody,
        (status = 201, description = "The ledger entry.", body = Movement),
        (status = 404, description = "`not_found`: no account with that id."),
        (status = 422, description = "`validation_failed`: a zero amount, a bad reason, an \
            adjustment below zero, a balance past 2^63 − 1, an `expires_at` not in the \
            future or with a negative amount, or an unknown field."),
    ),
    security(("AdminToken" = [])),
)]
pub async fn grant_credits(
    _: AdminToken,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<Grant>,
) -> ApiResult<HttpResponse> {
    let id = account_id(&path)?;
    let m = operator::grant_credits(
        &state.db,
        &Actor::AdminToken,
        id,
        body.amount,
        &body.reason,
        body.expires_at,
    )
    .await?;
    Ok(HttpResponse::Created().json(m))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Events per page, 1 to 100 (default 20).
    #[param(value_type = Option<i64>, minimum = 1, maximum = 100)]
    limit: Option<String>,
    /// `next_cursor` from the previous page.
    #[param(pattern = "^-?[0-9]{1,16}_[A-Za-z0-9-]{1,64}$")]
    cursor: Option<String>,
    /// Only events about this account (a UUID).
    #[param(value_type = Option<String>, format = Uuid)]
    account: Option<String>,
    /// Only events of this action.
    #[param(inline, value_type = Option<audit::Action>)]
    action: Option<String>,
    /// Only events by this actor: `admin_token`, an OS user (CLI), a key id, or a client
    /// address (logins).
    #[param(max_length = 200)]
    actor: Option<String>,
    /// Events at or after this time: a date (`2026-11-23`, midnight UTC) or an RFC 3339 time.
    #[param(schema_with = crate::pagination::time_param_schema)]
    from: Option<String>,
    /// Events before this time: a date or an RFC 3339 time.
    #[param(schema_with = crate::pagination::time_param_schema)]
    to: Option<String>,
}

/// `GET /admin/audit`: the audit trail, newest first.
#[utoipa::path(
    get,
    path = "/admin/audit",
    operation_id = "admin_audit",
    tag = "admin",
    summary = "The audit trail",
    description = "Every operator action (this API and `keymeter admin …`) and every \
        security-relevant customer action (keys created, revoked, rotated; logins, failed \
        logins, lockouts): who, what, which account, when, and the request id. Newest first, \
        cursor-paginated; `from` is inclusive, `to` exclusive. The trail is append-only.",
    params(AuditQuery),
    responses(
        (status = 200, description = "A page of audit events.", body = Page<AuditEvent>),
        (status = 400, description = "`invalid_request`: a malformed query string, an unknown \
            parameter or a cursor this API did not return."),
        (status = 422, description = "`validation_failed`: `limit`, `account`, `action`, \
            `actor`, `from` or `to` is not acceptable."),
    ),
    security(("AdminToken" = [])),
)]
pub async fn audit_trail(
    _: AdminToken,
    state: web::Data<AppState>,
    q: web::Query<AuditQuery>,
) -> ApiResult<HttpResponse> {
    let q = q.into_inner();
    let (limit, cursor) = crate::pagination::page(q.limit.as_deref(), q.cursor.as_deref())?;
    let range = crate::pagination::TimeRange::parse(q.from.as_deref(), q.to.as_deref())?;
    let filter = audit::Filter {
        account_id: q
            .account
            .as_deref()
            .map(|s| {
                s.parse::<Uuid>()
                    .map_err(|_| ApiError::validation("account", "account must be a UUID."))
            })
            .transpose()?,
        action: q
            .action
            .as_deref()
            .map(|s| {
                audit::Action::parse(s).ok_or_else(|| {
                    let known: Vec<&str> = audit::Action::ALL.iter().map(|a| a.as_str()).collect();
                    ApiError::validation(
                        "action",
                        format!("action must be one of {}.", known.join(", ")),
                    )
                })
            })
            .transpose()?,
        actor: match q.actor {
            Some(a) if a.is_empty() || a.chars().count() > 200 || a.contains('\0') => {
                return Err(ApiError::validation(
                    "actor",
                    "actor must be 1 to 200 characters, without NUL characters.",
                ))
            }
            other => other,
        },
        from: range.from,
        to: range.to,
    };
    let client = state.db.get().await?;
    let rows = audit::list(&client, &filter, limit, cursor).await?;
    Ok(
        HttpResponse::Ok().json(Page::from_overfetch(rows, limit, |e| {
            (e.at, e.id.to_string())
        })),
    )
}
