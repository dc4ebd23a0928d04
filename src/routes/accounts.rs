//! Self-serve accounts: signup, login, and the account a key belongs to.

use actix_web::{web, HttpRequest, HttpResponse};
use std::collections::BTreeMap;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::accounts::{self, Account};
use crate::audit::Actor;
use crate::auth::key_store::CreatedKey;
use crate::auth::{Authenticated, Scope};
use crate::http::problem::{ApiError, ApiResult};
use crate::routes::{Access, Routes};
use crate::startup::AppState;
use crate::tiers::Tier;

/// `/v1/signup` and `/v1/login` are open to anyone behind the per-IP gate; the account
/// itself needs a key.
pub fn configure(routes: &mut Routes) {
    routes
        .post(Access::PerIp, "/v1/signup", signup)
        .post(Access::PerIp, "/v1/login", login)
        .get(Access::Key, "/v1/account", get_account);
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// An address like `name@example.com` (at most 254 characters).
    #[schema(example = "ada@example.com", format = Email, max_length = 254)]
    email: String,
    /// 8 to 128 characters.
    #[schema(value_type = String, format = Password, min_length = 8, max_length = 128)]
    password: SecretString,
}

#[derive(Serialize, ToSchema)]
pub struct SignupResponse {
    account: Account,
    /// The account's first key, with every scope. Shown only here.
    api_key: CreatedKey,
}

#[derive(Serialize, ToSchema)]
pub struct LoginResponse {
    /// A key with `keys:manage` and `read` that expires in 12 hours.
    api_key: CreatedKey,
}

/// `POST /v1/signup`: an account on the default tier with the configured starting credits,
/// and its first key (all scopes) — the only time that key is shown.
#[utoipa::path(
    post,
    path = "/v1/signup",
    operation_id = "signup",
    tag = "accounts",
    summary = "Create an account",
    description = "An account on the `free` tier with the server's starting credits, and its \
        first key (all scopes) — the only time that key is shown. Limited per client IP.",
    request_body = Credentials,
    responses(
        crate::openapi::JsonBody,
        (status = 201, description = "The account and its first key.", body = SignupResponse),
        (status = 404, description = "`feature_disabled`: self-serve signup is off on this server."),
        (status = 409, description = "`email_taken`: an account with this email exists."),
        (status = 422, description = "`validation_failed`: a bad email or password, an unknown \
            field, or a field of the wrong type (`field` names it when known)."),
        (status = 503, description = "`password_hashing_busy`: this server is hashing as many \
            passwords as it allows at once; retry after `Retry-After` seconds. Nothing was \
            created."),
    ),
)]
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
    let (account, key) = accounts::signup(
        &state.db,
        &state.tiers,
        &state.passwords,
        &email,
        password,
        state.config.signup_credits,
        state.config.signup_credits_ttl,
    )
    .await?;
    Ok(HttpResponse::Created().json(SignupResponse {
        account,
        api_key: key,
    }))
}

/// `POST /v1/login`: a new 12-hour key with `keys:manage` and `read`, for the dashboard or
/// CLI to manage the account's keys with.
#[utoipa::path(
    post,
    path = "/v1/login",
    operation_id = "login",
    tag = "accounts",
    summary = "Log in with email and password",
    description = "A new key with `keys:manage` and `read` that expires in 12 hours. Five \
        failures within the lockout window (15 minutes by default) lock the email for as long \
        again; attempts sent at once are counted before their passwords are checked, so no \
        more than five are ever checked. Limited per client IP.",
    request_body = Credentials,
    responses(
        crate::openapi::JsonBody,
        (status = 201, description = "A 12-hour key.", body = LoginResponse),
        (status = 401, description = "`invalid_credentials`: wrong email or password (the same \
            answer for an unknown email or a suspended account)."),
        (status = 422, description = "`validation_failed`: a malformed email, an unknown field, \
            or a field of the wrong type."),
        (status = 429, description = "`rate_limited`: too many failed logins for this email \
            (`Retry-After` says for how long)."),
        (status = 503, description = "`password_hashing_busy`: this server is checking as many \
            passwords as it allows at once; retry after `Retry-After` seconds. The attempt was \
            not counted against the email."),
    ),
)]
#[tracing::instrument(name = "login", skip_all)]
pub async fn login(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Json<Credentials>,
) -> ApiResult<HttpResponse> {
    let Credentials { email, password } = body.into_inner();
    let who = Actor::login(state.limits.client_ip(&req));
    let window = state.config.login_lockout;
    let key = accounts::password_login(&state.db, &state.passwords, &email, password, window, &who)
        .await
        .inspect_err(|e| {
            // A wrong password also counts against the client's address, like a wrong key.
            if matches!(e, accounts::Error::InvalidCredentials) {
                state.limits.note_auth_failure(&req);
            }
        })?;
    Ok(HttpResponse::Created().json(LoginResponse { api_key: key }))
}

/// The limits of the account's tier.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum TierLimits {
    Limited {
        requests_per_minute: u32,
        burst: u32,
        max_concurrent_jobs: u32,
        max_queued_jobs: u32,
        /// Active keys the account may hold.
        max_keys: u32,
        /// Credits per job format.
        prices: BTreeMap<String, i64>,
    },
    /// The `internal` tier: no request or job limits at all.
    Unlimited {
        unlimited: bool,
        /// Credits per job format.
        prices: BTreeMap<String, i64>,
    },
}

impl TierLimits {
    pub fn of(tier: &Tier) -> TierLimits {
        if tier.unlimited {
            return TierLimits::Unlimited {
                unlimited: true,
                prices: tier.prices.clone(),
            };
        }
        TierLimits::Limited {
            requests_per_minute: tier.requests_per_minute,
            burst: tier.burst,
            max_concurrent_jobs: tier.max_concurrent_jobs,
            max_queued_jobs: tier.max_queued_jobs,
            max_keys: tier.max_keys.unwrap_or(u32::MAX),
            prices: tier.prices.clone(),
        }
    }
}

/// The account, with its tier's limits.
#[derive(Serialize, ToSchema)]
pub struct AccountWithLimits {
    #[serde(flatten)]
    account: Account,
    limits: TierLimits,
    /// Verifies the `Keymeter-Signature` header of this account's job webhooks; `null`
    /// while the server has job webhooks off. Shown only to keys with `keys:manage` (absent
    /// otherwise): whoever holds the secret can forge this account's webhooks, so a
    /// read-only key handed to a dashboard or a partner must not reveal it.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, required = false)]
    webhook_secret: Option<Option<String>>,
}

/// `GET /v1/account` (`read`).
#[utoipa::path(
    get,
    path = "/v1/account",
    operation_id = "get_account",
    tag = "accounts",
    summary = "The account this key belongs to",
    description = "The account and its tier's limits; the job-webhook signing secret only \
        for a key with `keys:manage`.",
    responses(
        (status = 200, description = "The account and its tier's limits.", body = AccountWithLimits),
    ),
    security(("ApiKey" = ["read"]), ("ApiKeyHeader" = ["read"])),
)]
pub async fn get_account(
    state: web::Data<AppState>,
    caller: Authenticated,
) -> ApiResult<HttpResponse> {
    caller.require(Scope::Read)?;
    let account = state
        .account_reads
        .get(&state.db, caller.account_id)
        .await?
        .ok_or_else(accounts::not_found)?;
    let limits = TierLimits::of(state.tiers.get_or_default(&account.tier));
    // Verifies the `Keymeter-Signature` of this account's job webhooks (null while off);
    // only for keys that manage keys.
    let webhook_secret = caller.scopes.contains(Scope::KeysManage).then(|| {
        state
            .jobs
            .webhooks
            .secret(account.id, account.webhook_secret_version)
    });
    Ok(HttpResponse::Ok().json(AccountWithLimits {
        account,
        limits,
        webhook_secret,
    }))
}
