//! `/v1/keys`: an account manages its own keys. A key only ever sees its own account's keys;
//! another account's key id is simply not found.

use actix_web::{web, HttpResponse};
use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::auth::keys::{self, KeySpec, DEFAULT_GRACE_SECONDS};
use crate::auth::{key, Authenticated, Scope};
use crate::error::{ApiError, ApiResult};
use crate::pagination::{Page, PageQuery};
use crate::startup::AppState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    name: Option<String>,
    scopes: Option<Vec<String>>,
    expires_at: Option<DateTime<Utc>>,
}

pub async fn create(
    state: web::Data<AppState>,
    caller: Authenticated,
    body: web::Json<CreateKey>,
) -> ApiResult<HttpResponse> {
    caller.require(Scope::KeysManage)?;
    let b = body.into_inner();
    let spec = KeySpec::parse(b.name, b.scopes, b.expires_at)?;
    let mut client = state.db.get().await?;
    let tx = client.transaction().await?;
    let created = keys::insert(&tx, caller.account_id, &spec).await?;
    tx.commit().await?;
    tracing::info!(new_key_id = %created.view.id, "key created");
    Ok(HttpResponse::Created().json(created))
}

pub async fn list(
    state: web::Data<AppState>,
    caller: Authenticated,
    query: web::Query<PageQuery>,
) -> ApiResult<HttpResponse> {
    caller.require(Scope::Read)?;
    let limit = query.limit()?;
    let cursor = query.cursor()?;
    let client = state.db.get().await?;
    let rows = keys::list(&client, caller.account_id, limit, cursor).await?;
    Ok(
        HttpResponse::Ok().json(Page::from_overfetch(rows, limit, |k| {
            (k.created_at, k.id.clone())
        })),
    )
}

pub async fn get(
    state: web::Data<AppState>,
    caller: Authenticated,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    caller.require(Scope::Read)?;
    let id = path.into_inner();
    if !key::is_key_id(&id) {
        return Err(ApiError::NotFound(
            "No API key with that id on this account.".into(),
        ));
    }
    let client = state.db.get().await?;
    let k = keys::get(&client, caller.account_id, &id)
        .await?
        .ok_or_else(|| ApiError::NotFound("No API key with that id on this account.".into()))?;
    Ok(HttpResponse::Ok().json(k))
}

pub async fn revoke(
    state: web::Data<AppState>,
    caller: Authenticated,
    path: web::Path<String>,
) -> ApiResult<HttpResponse> {
    caller.require(Scope::KeysManage)?;
    let id = path.into_inner();
    let mut client = state.db.get().await?;
    let tx = client.transaction().await?;
    let k = keys::revoke(&tx, Some(caller.account_id), &id).await?;
    tx.commit().await?;
    // This instance need not wait for its own NOTIFY to come back.
    state.auth.cache.invalidate_key(&id).await;
    tracing::info!(revoked_key_id = %id, "key revoked");
    Ok(HttpResponse::Ok().json(k))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Rotate {
    grace_seconds: Option<i64>,
}

pub async fn rotate(
    state: web::Data<AppState>,
    caller: Authenticated,
    path: web::Path<String>,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    caller.require(Scope::KeysManage)?;
    let id = path.into_inner();
    let body: Rotate = crate::http::extractors::json_or_default(&body)?;
    let grace = body.grace_seconds.unwrap_or(DEFAULT_GRACE_SECONDS);
    let mut client = state.db.get().await?;
    let tx = client.transaction().await?;
    let created = keys::rotate(&tx, caller.account_id, &id, grace).await?;
    tx.commit().await?;
    state.auth.cache.invalidate_key(&id).await;
    tracing::info!(old_key_id = %id, new_key_id = %created.view.id, grace_seconds = grace, "key rotated");
    Ok(HttpResponse::Created().json(created))
}
