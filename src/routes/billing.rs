//! `/v1/billing`: buying credits and plans through Stripe Checkout, and Stripe's webhook.

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use serde::Deserialize;
use serde_json::json;

use crate::auth::{Authenticated, Scope};
use crate::billing::events::{self, Processed};
use crate::billing::signature;
use crate::billing::{self, CheckoutRequest, Item};
use crate::error::{ApiError, ApiResult};
use crate::idempotency::{self, Start};
use crate::metrics;
use crate::startup::AppState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckoutBody {
    pack: Option<String>,
    plan: Option<String>,
    success_url: String,
    cancel_url: String,
}

fn check_url(field: &'static str, u: &str) -> Result<(), ApiError> {
    let ok = (u.starts_with("https://") || u.starts_with("http://"))
        && u.len() <= 2048
        && !u.contains(char::is_whitespace);
    if ok {
        Ok(())
    } else {
        Err(ApiError::validation(
            field,
            format!("{field} must be an absolute http(s) URL."),
        ))
    }
}

/// `POST /v1/billing/checkout` (`billing`) {pack | plan, success_url, cancel_url} → `{id, url}`.
pub async fn checkout(
    state: web::Data<AppState>,
    caller: Authenticated,
    req: HttpRequest,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    caller.require(Scope::Billing)?;
    let api = state
        .stripe
        .as_ref()
        .ok_or_else(|| ApiError::Disabled("Billing is not configured on this server.".into()))?;
    let (raw, b): (serde_json::Value, CheckoutBody) = crate::http::extractors::json_body(&body)?;
    let item = Item::resolve(&state.config.billing, b.pack.as_deref(), b.plan.as_deref())?;
    check_url("success_url", &b.success_url)?;
    check_url("cancel_url", &b.cancel_url)?;

    let (key, guard) = match idempotency::start(&state.db, caller.account_id, &req, &raw).await? {
        (_, Start::Replay(res)) => return Ok(res),
        (key, Start::Run(guard)) => (key, guard),
    };
    let stripe_key = match &key {
        Some(k) => format!("keymeter-checkout-{}-{}", caller.account_id, k.as_str()),
        None => format!("keymeter-checkout-{}", uuid::Uuid::now_v7()),
    };
    let result = async {
        let created = billing::create_checkout(
            &state.db,
            api,
            caller.account_id,
            CheckoutRequest {
                item: &item,
                success_url: &b.success_url,
                cancel_url: &b.cancel_url,
                idempotency_key: stripe_key,
            },
        )
        .await?;
        let body = json!({"object": "checkout_session", "id": created.id, "url": created.url});
        if let Some(g) = &guard {
            let mut client = state.db.get().await?;
            let tx = client.transaction().await?;
            g.complete(&tx, StatusCode::CREATED, &body, None).await?;
            tx.commit().await?;
        }
        Ok::<_, ApiError>(body)
    }
    .await;
    match result {
        Ok(body) => Ok(HttpResponse::Created().json(body)),
        Err(e) => {
            if let Some(g) = guard {
                g.release(&state.db).await;
            }
            Err(e)
        }
    }
}

/// `GET /v1/billing` (`read`): plan, tier, Stripe customer, recent purchases.
pub async fn summary(state: web::Data<AppState>, caller: Authenticated) -> ApiResult<HttpResponse> {
    caller.require(Scope::Read)?;
    let client = state.db.get().await?;
    Ok(HttpResponse::Ok().json(billing::summary(&client, caller.account_id).await?))
}

/// `POST /v1/billing/webhook`: the raw body is verified before anything parses it. A bad
/// or missing signature is 400 with nothing written; a processing failure is 5xx with
/// nothing written, so Stripe retries; a duplicate is 200 and changes nothing.
pub async fn webhook(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    let secrets = &state.config.billing.webhook_secrets;
    if secrets.is_empty() {
        return Err(ApiError::Disabled(
            "Billing webhooks are not configured on this server.".into(),
        ));
    }
    let header = req
        .headers()
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let now = chrono::Utc::now().timestamp();
    if let Err(e) = signature::verify(header, &body, secrets, now) {
        tracing::warn!(reason = %e, "refused a webhook delivery");
        metrics::webhook_event("unverified", "bad_signature");
        return Err(ApiError::InvalidSignature);
    }
    let event: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
        metrics::webhook_event("unknown", "invalid");
        ApiError::InvalidJson(e.to_string())
    })?;
    let processed = events::process(&state.db, &state.config.billing, &state.tiers, &event).await;
    metrics::webhook_event(
        event
            .get("type")
            .and_then(|t| t.as_str())
            .unwrap_or("unknown"),
        match &processed {
            Ok(Processed::Duplicate) => "duplicate",
            Ok(Processed::Applied(outcome)) => outcome,
            Err(e) if e.status_code().is_client_error() => "invalid",
            Err(_) => "error",
        },
    );
    match processed? {
        Processed::Duplicate => {
            Ok(HttpResponse::Ok().json(json!({"received": true, "duplicate": true})))
        }
        Processed::Applied(outcome) => {
            Ok(HttpResponse::Ok().json(json!({"received": true, "outcome": outcome})))
        }
    }
}
