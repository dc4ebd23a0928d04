//! `/admin`: the operator API, behind `Authorization: Bearer $KEYMETER_ADMIN_TOKEN`. The
//! same operations as `keymeter admin …` (both call `crate::admin`).

use actix_web::{web, HttpResponse};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use crate::accounts;
use crate::admin;
use crate::auth::admin::AdminToken;
use crate::auth::keys::KeySpec;
use crate::error::{ApiError, ApiResult};
use crate::startup::AppState;

fn account_id(raw: &str) -> Result<Uuid, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::NotFound("No account with that id.".into()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateAccount {
    email: String,
    tier: Option<String>,
    #[serde(default)]
    credits: i64,
}

pub async fn create_account(
    _: AdminToken,
    state: web::Data<AppState>,
    body: web::Json<CreateAccount>,
) -> ApiResult<HttpResponse> {
    let b = body.into_inner();
    let (account, key) = admin::create_account(
        &state.db,
        &state.tiers,
        &b.email,
        b.tier.as_deref(),
        b.credits,
    )
    .await?;
    tracing::info!(account_id = %account.id, "admin: account created");
    Ok(HttpResponse::Created().json(json!({
        "account_id": account.id,
        "api_key": key.key,
        "account": account,
    })))
}

pub async fn get_account(
    _: AdminToken,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let id = account_id(&path)?;
    let client = state.db.get().await?;
    let account = accounts::get(&client, id)
        .await?
        .ok_or_else(accounts::not_found)?;
    Ok(HttpResponse::Ok().json(account))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    name: Option<String>,
    scopes: Option<Vec<String>>,
    expires_at: Option<DateTime<Utc>>,
}

pub async fn create_key(
    _: AdminToken,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<CreateKey>,
) -> ApiResult<HttpResponse> {
    let id = account_id(&path)?;
    let b = body.into_inner();
    let spec = KeySpec::parse(b.name, b.scopes, b.expires_at)?;
    let key = admin::create_key(&state.db, id, &spec).await?;
    Ok(HttpResponse::Created().json(key))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetTier {
    tier: String,
}

pub async fn set_tier(
    _: AdminToken,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<SetTier>,
) -> ApiResult<HttpResponse> {
    let id = account_id(&path)?;
    let a = admin::set_tier(&state.db, &state.tiers, id, &body.tier).await?;
    state.auth.cache.invalidate_account(id);
    Ok(HttpResponse::Ok().json(a))
}

pub async fn suspend(
    _: AdminToken,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let id = account_id(&path)?;
    let a = admin::set_active(&state.db, id, false).await?;
    state.auth.cache.invalidate_account(id);
    Ok(HttpResponse::Ok().json(a))
}

pub async fn unsuspend(
    _: AdminToken,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let id = account_id(&path)?;
    let a = admin::set_active(&state.db, id, true).await?;
    state.auth.cache.invalidate_account(id);
    Ok(HttpResponse::Ok().json(a))
}

pub async fn revoke_key(
    _: AdminToken,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    let k = admin::revoke_key(&state.db, &path).await?;
    state.auth.cache.invalidate_key(&k.id).await;
    Ok(HttpResponse::Ok().json(k))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    amount: i64,
    reason: String,
}

pub async fn grant_credits(
    _: AdminToken,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<Grant>,
) -> ApiResult<HttpResponse> {
    let id = account_id(&path)?;
    let m = admin::grant_credits(&state.db, id, body.amount, &body.reason).await?;
    Ok(HttpResponse::Created().json(m))
}
