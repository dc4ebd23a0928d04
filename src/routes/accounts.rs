//! Self-serve accounts: signup, login, and the account a key belongs to.

use actix_web::{web, HttpRequest, HttpResponse};
use chrono::{Duration, Utc};
use secrecy::SecretString;
use serde::Deserialize;
use serde_json::json;

use crate::accounts::password::{self, Password};
use crate::accounts::{self, login, Email, NewAccount};
use crate::auth::keys::{self, KeySpec};
use crate::auth::{Authenticated, Scope};
use crate::error::{ApiError, ApiResult};
use crate::ratelimit::tiers::{Tier, DEFAULT_TIER};
use crate::startup::AppState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    email: String,
    password: SecretString,
}

/// `POST /v1/signup`: an account on the default tier with the configured starting credits,
/// and its first key (all scopes) — the only time that key is shown.
#[tracing::instrument(name = "signup", skip_all)]
pub async fn signup(
    state: web::Data<AppState>,
    body: web::Json<Credentials>,
) -> ApiResult<HttpResponse> {
    if !state.config.signup_enabled {
        return Err(ApiError::Disabled(
            "Self-serve signup is disabled on this server.".into(),
        ));
    }
    let Credentials { email, password } = body.into_inner();
    let email = Email::parse(&email)?;
    let password = Password::parse(password)?;
    let hash = password::hash(password).await?;
    let mut client = state.db.get().await?;
    let tx = client.transaction().await?;
    let (account, key) = accounts::create(
        &tx,
        &state.tiers,
        NewAccount {
            email,
            password_hash: Some(hash),
            tier: DEFAULT_TIER.to_owned(),
            credits: state.config.signup_credits,
        },
        &KeySpec::full_access("default"),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(account_id = %account.id, key_id = %key.view.id, "account created");
    Ok(HttpResponse::Created().json(json!({ "account": account, "api_key": key })))
}

/// `POST /v1/login`: a new 12-hour key with `keys:manage` and `read`, for the dashboard or
/// CLI to manage the account's keys with.
#[tracing::instrument(name = "login", skip_all)]
pub async fn login(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Json<Credentials>,
) -> ApiResult<HttpResponse> {
    let Credentials { email, password } = body.into_inner();
    let email = Email::parse(&email)?;
    let email_key = email.key();
    let found = {
        let client = state.db.get().await?;
        if let Some(secs) = login::locked_for(&client, &email_key).await? {
            return Err(ApiError::RateLimited {
                retry_after_secs: secs,
                detail: "Too many failed logins for this email; try again later.".into(),
            });
        }
        accounts::password_hash_for(&client, &email).await?
    };
    let (account_id, stored, status) = match found {
        Some((id, hash, status)) => (Some(id), hash, status),
        None => (None, None, String::new()),
    };
    // No pooled connection is held during the deliberately slow hash.
    let ok = password::verify(password, stored).await? && status == "active";
    let mut client = state.db.get().await?;
    let Some(account_id) = account_id.filter(|_| ok) else {
        login::record_failure(&client, &email_key).await?;
        state.limits.note_auth_failure(&req);
        return Err(ApiError::InvalidCredentials);
    };
    login::clear(&client, &email_key).await?;
    let tx = client.transaction().await?;
    let spec = KeySpec {
        name: format!("login {}", Utc::now().format("%Y-%m-%dT%H:%M:%SZ")),
        scopes: vec![Scope::KeysManage, Scope::Read],
        expires_at: Some(Utc::now() + Duration::hours(12)),
    };
    let key = keys::insert(&tx, account_id, &spec).await?;
    tx.commit().await?;
    Ok(HttpResponse::Created().json(json!({ "api_key": key })))
}

pub fn limits_json(tier: &Tier) -> serde_json::Value {
    if tier.unlimited {
        return json!({ "unlimited": true, "prices": tier.prices });
    }
    json!({
        "requests_per_minute": tier.requests_per_minute,
        "burst": tier.burst,
        "max_concurrent_jobs": tier.max_concurrent_jobs,
        "max_queued_jobs": tier.max_queued_jobs,
        "prices": tier.prices,
    })
}

/// `GET /v1/account` (`read`).
pub async fn get_account(
    state: web::Data<AppState>,
    caller: Authenticated,
) -> ApiResult<HttpResponse> {
    caller.require(Scope::Read)?;
    let client = state.db.get().await?;
    let account = accounts::get(&client, caller.account_id)
        .await?
        .ok_or_else(accounts::not_found)?;
    let tier = state.tiers.get_or_default(&account.tier);
    let mut body = serde_json::to_value(&account).map_err(anyhow::Error::from)?;
    body["limits"] = limits_json(tier);
    // Verifies the `Keymeter-Signature` of this account's job webhooks (null while off).
    body["webhook_secret"] = state
        .jobs
        .webhooks
        .secret(account.id, account.webhook_secret_version)
        .into();
    Ok(HttpResponse::Ok().json(body))
}
