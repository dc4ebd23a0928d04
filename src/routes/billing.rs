//! `/v1/billing`: buying credits and plans through Stripe Checkout, and Stripe's webhook.

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::{Authenticated, Scope};
use crate::billing::events::{self, Processed};
use crate::billing::{self, Checkout, CheckoutSession, PortalSession};
use crate::http::idempotent;
use crate::http::problem::{ApiError, ApiResult};
use crate::idempotency;
use crate::metrics;
use crate::routes::{Access, Routes};
use crate::startup::AppState;

/// The webhook is Stripe's, authenticated by its signature; the rest needs a key.
pub fn configure(routes: &mut Routes) {
    routes
        .post(Access::Signed, "/v1/billing/webhook", webhook)
        .get(Access::Key, "/v1/billing", summary)
        .post(Access::Key, "/v1/billing/checkout", checkout)
        .post(Access::Key, "/v1/billing/portal", portal)
        .get(Access::Key, "/v1/billing/auto-recharge", get_auto_recharge)
        .put(Access::Key, "/v1/billing/auto-recharge", put_auto_recharge)
        .post(
            Access::Key,
            "/v1/billing/auto-recharge/setup",
            setup_auto_recharge,
        );
}

/// Auto-recharge settings. `enabled` is required; the others keep their stored values when
/// left out, and all three are needed to enable.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = AutoRechargeUpdate)]
struct AutoRechargeBody {
    enabled: bool,
    /// A charge leaving the balance below this starts a recharge (0 to 10^12).
    #[schema(example = 100)]
    threshold: Option<i64>,
    /// The credit pack bought (`KEYMETER_CREDIT_PACKS`).
    #[schema(example = "small")]
    pack: Option<String>,
    /// At most this many recharges per calendar month, UTC (1 to 1000).
    #[schema(example = 4)]
    max_per_month: Option<i32>,
}

/// Where Stripe sends the customer after saving a card, or on cancel.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = AutoRechargeSetup)]
struct SetupBody {
    #[schema(max_length = 2048, example = "https://example.com/card-saved")]
    success_url: String,
    #[schema(max_length = 2048, example = "https://example.com/cancelled")]
    cancel_url: String,
}

/// `GET /v1/billing/auto-recharge` (`billing`).
#[utoipa::path(
    get,
    path = "/v1/billing/auto-recharge",
    operation_id = "get_auto_recharge",
    tag = "billing",
    summary = "Auto-recharge settings",
    responses(
        (status = 200, description = "The account's auto-recharge.", body = crate::billing::auto_recharge::Settings),
    ),
    security(("ApiKey" = ["billing"]), ("ApiKeyHeader" = ["billing"])),
)]
pub async fn get_auto_recharge(
    state: web::Data<AppState>,
    caller: Authenticated,
) -> ApiResult<HttpResponse> {
    caller.require(Scope::Billing)?;
    let client = state.db.get().await?;
    let settings = billing::auto_recharge::get(&client, caller.account_id).await?;
    Ok(HttpResponse::Ok().json(settings))
}

/// `PUT /v1/billing/auto-recharge` (`billing`) {enabled, threshold, pack, max_per_month}.
#[utoipa::path(
    put,
    path = "/v1/billing/auto-recharge",
    operation_id = "set_auto_recharge",
    tag = "billing",
    summary = "Turn auto-recharge on or off",
    description = "When a charge (metered, or a job's reservation) leaves the balance below \
        `threshold`, keymeter buys `pack` with the card saved for off-session payments (an \
        off-session Stripe PaymentIntent), at most once every 10 minutes and `max_per_month` \
        times a calendar month (UTC), one at a time. The credits arrive with Stripe's \
        `payment_intent.succeeded` (ledger kind `auto_recharge`, event `credits.granted`). A \
        declined payment or one that needs the customer (`authentication_required`) turns it \
        off, with the reason in `disabled_reason` here and in `GET /v1/billing`; enabling it \
        again clears that. A balance already below the threshold recharges at the next charge.",
    request_body = AutoRechargeBody,
    responses(
        (status = 200, description = "The settings now in force.", body = crate::billing::auto_recharge::Settings),
        (status = 400, description = "`invalid_json`: the body is not JSON."),
        (status = 404, description = "`feature_disabled`: billing is not configured on this server."),
        (status = 409, description = "`payment_method_required`: enabling with no card saved \
            for off-session payments (buy a pack through Checkout, or `POST \
            /v1/billing/auto-recharge/setup`)."),
        (status = 422, description = "`validation_failed`: an unknown pack, a threshold or \
            `max_per_month` out of range, enabling without all three, or an unknown field."),
    ),
    security(("ApiKey" = ["billing"]), ("ApiKeyHeader" = ["billing"])),
)]
pub async fn put_auto_recharge(
    state: web::Data<AppState>,
    caller: Authenticated,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    caller.require(Scope::Billing)?;
    state.stripe.as_ref().ok_or(billing::Error::NotConfigured)?;
    let (_, b): (serde_json::Value, AutoRechargeBody) = crate::http::extractors::json_body(&body)?;
    let settings = billing::auto_recharge::set(
        &state.db,
        &state.config.billing,
        caller.account_id,
        billing::auto_recharge::Update {
            enabled: b.enabled,
            threshold: b.threshold,
            pack: b.pack,
            max_per_month: b.max_per_month,
        },
    )
    .await?;
    Ok(HttpResponse::Ok().json(settings))
}

/// `POST /v1/billing/auto-recharge/setup` (`billing`) {success_url, cancel_url} → a
/// Checkout Session in `setup` mode.
#[utoipa::path(
    post,
    path = "/v1/billing/auto-recharge/setup",
    operation_id = "setup_auto_recharge",
    tag = "billing",
    summary = "Save a card for auto-recharge",
    description = "Opens a Stripe Checkout Session in `setup` mode: the customer saves a card \
        for off-session payments without buying anything. Once Stripe reports the session \
        complete (`checkout.session.completed`), the card is the one auto-recharge uses. A \
        pack bought through `POST /v1/billing/checkout` saves its card the same way.",
    request_body = SetupBody,
    responses(
        (status = 201, description = "The Checkout Session.", body = CheckoutSession),
        (status = 400, description = "`invalid_json`: the body is not JSON."),
        (status = 404, description = "`feature_disabled`: billing (or any credit pack) is not \
            configured on this server."),
        (status = 422, description = "`validation_failed`: a URL that is not absolute \
            http(s), or an unknown field."),
        (status = 503, description = "`payment_provider_unavailable`: Stripe did not answer; retry."),
    ),
    security(("ApiKey" = ["billing"]), ("ApiKeyHeader" = ["billing"])),
)]
pub async fn setup_auto_recharge(
    state: web::Data<AppState>,
    caller: Authenticated,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    caller.require(Scope::Billing)?;
    let api = state.stripe.as_ref().ok_or(billing::Error::NotConfigured)?;
    let (_, b): (serde_json::Value, SetupBody) = crate::http::extractors::json_body(&body)?;
    let session = billing::setup_checkout(
        &state.db,
        api,
        &state.config.billing,
        caller.account_id,
        &b.success_url,
        &b.cancel_url,
    )
    .await?;
    Ok(HttpResponse::Created().json(session))
}

/// Name exactly one of `pack` or `plan`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Checkout)]
struct CheckoutBody {
    /// A credit pack configured on this server (`KEYMETER_CREDIT_PACKS`).
    pack: Option<String>,
    /// A plan configured on this server (`KEYMETER_PLANS`).
    plan: Option<String>,
    /// Where Stripe sends the customer after paying: an absolute http(s) URL.
    #[schema(max_length = 2048, example = "https://example.com/paid")]
    success_url: String,
    /// Where Stripe sends the customer on cancel: an absolute http(s) URL.
    #[schema(max_length = 2048, example = "https://example.com/cancelled")]
    cancel_url: String,
}

/// Where Stripe's portal sends the customer back to.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = Portal)]
struct PortalBody {
    /// An absolute http(s) URL.
    #[schema(max_length = 2048, example = "https://example.com/account")]
    return_url: String,
}

/// What the webhook answers Stripe.
#[derive(Serialize, ToSchema)]
pub struct WebhookAck {
    received: bool,
    /// Present (true) when this event was already processed; nothing changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    duplicate: Option<bool>,
    /// What processing did (`credits_purchased`, `plan_period_paid`,
    /// `plan_invoice_without_credits`, `invoice_already_credited`, `tier_set`, `tier_reset`,
    /// `not_current_plan`, `credits_clawed_back`, `credits_disputed`, `credits_restored`,
    /// `payment_method_saved`, `auto_recharged`, `already_recharged`,
    /// `auto_recharge_disabled`, `plan_checkout_closed`, `ignored`, `unmatched`, …), for a
    /// first delivery.
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome: Option<&'static str>,
}

/// A Stripe event, as Stripe sends it (only the members keymeter reads are listed).
#[derive(ToSchema)]
#[allow(dead_code)] // Only describes the body; the raw bytes are verified, then parsed.
pub struct StripeEvent {
    #[schema(example = "evt_1")]
    id: String,
    #[schema(rename = "type", example = "checkout.session.completed")]
    kind: String,
    /// Unix time of the event.
    created: i64,
    data: StripeEventData,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct StripeEventData {
    object: serde_json::Map<String, serde_json::Value>,
}

/// `POST /v1/billing/checkout` (`billing`) {pack | plan, success_url, cancel_url} → `{id, url}`.
#[utoipa::path(
    post,
    path = "/v1/billing/checkout",
    operation_id = "create_checkout",
    tag = "billing",
    summary = "Buy a credit pack or a plan",
    description = "Opens a Stripe Checkout Session; send the customer to its `url`. Credits \
        arrive through Stripe's webhook once paid. Honours `Idempotency-Key`.",
    params(("Idempotency-Key" = Option<String>, Header, description = crate::openapi::IDEMPOTENCY_KEY)),
    request_body = CheckoutBody,
    responses(
        (status = 201, description = "The Checkout Session.", body = CheckoutSession),
        (status = 400, description = "`invalid_json`: the body is not JSON; \
            `invalid_request`: a malformed `Idempotency-Key`; `bad_request`: the body could not \
            be read."),
        (status = 404, description = "`feature_disabled`: billing is not configured on this server."),
        (status = 409, description = "`plan_active`: a plan checkout while the account already \
            has a live plan (`subscription`; change it through `POST /v1/billing/portal`) or \
            another plan checkout still open (`checkout`; open 30 minutes at most); \
            `idempotency_conflict`: a request with this \
            `Idempotency-Key` is still running, or this one outlived its claim and a retry took \
            it over (this attempt was undone)."),
        (status = 422, description = "`validation_failed`: an unknown pack or plan, both or \
            neither, a bad URL, or an unknown field; `idempotency_key_reused`."),
        (status = 503, description = "`payment_provider_unavailable`: Stripe did not answer; retry."),
    ),
    security(("ApiKey" = ["billing"]), ("ApiKeyHeader" = ["billing"])),
)]
pub async fn checkout(
    state: web::Data<AppState>,
    caller: Authenticated,
    req: HttpRequest,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    caller.require(Scope::Billing)?;
    let api = state.stripe.as_ref().ok_or(billing::Error::NotConfigured)?;
    let (raw, b): (serde_json::Value, CheckoutBody) = crate::http::extractors::json_body(&body)?;
    let order = Checkout::new(
        &state.config.billing,
        b.pack.as_deref(),
        b.plan.as_deref(),
        b.success_url,
        b.cancel_url,
    )?;
    let request = idempotent::request(&req, caller.account_id, &raw, StatusCode::CREATED)?;
    let outcome = idempotency::run(&state.db, state.config.request_timeout, request, |guard| {
        billing::checkout(&state.db, api, caller.account_id, &order, guard)
    })
    .await?;
    Ok(idempotent::respond(outcome, |session| {
        HttpResponse::Created().json(session)
    }))
}

/// `POST /v1/billing/portal` (`billing`) {return_url} → `{id, url}` of a Stripe
/// billing-portal session.
#[utoipa::path(
    post,
    path = "/v1/billing/portal",
    operation_id = "create_portal_session",
    tag = "billing",
    summary = "Open the customer portal",
    description = "Opens a Stripe billing-portal session for the account (creating its Stripe \
        customer first if it has none); send the customer to its `url` to update their card, \
        see invoices, or change or cancel their plan. Plan changes and cancellations made \
        there arrive through Stripe's subscription webhooks.",
    request_body = PortalBody,
    responses(
        (status = 201, description = "The portal session.", body = PortalSession),
        (status = 400, description = "`invalid_json`: the body is not JSON; `bad_request`: \
            the body could not be read."),
        (status = 404, description = "`feature_disabled`: billing is not configured on this server."),
        (status = 422, description = "`validation_failed`: `return_url` is not an absolute \
            http(s) URL, or an unknown field."),
        (status = 503, description = "`payment_provider_unavailable`: Stripe did not answer; retry."),
    ),
    security(("ApiKey" = ["billing"]), ("ApiKeyHeader" = ["billing"])),
)]
pub async fn portal(
    state: web::Data<AppState>,
    caller: Authenticated,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    caller.require(Scope::Billing)?;
    let api = state.stripe.as_ref().ok_or(billing::Error::NotConfigured)?;
    let (_, b): (serde_json::Value, PortalBody) = crate::http::extractors::json_body(&body)?;
    let session = billing::portal(&state.db, api, caller.account_id, &b.return_url).await?;
    Ok(HttpResponse::Created().json(session))
}

/// `GET /v1/billing` (`read`): plan, tier, Stripe customer, recent purchases.
#[utoipa::path(
    get,
    path = "/v1/billing",
    operation_id = "billing_summary",
    tag = "billing",
    summary = "Plan, tier and purchases",
    responses(
        (status = 200, description = "The account's billing state.", body = crate::billing::Summary),
    ),
    security(("ApiKey" = ["read"]), ("ApiKeyHeader" = ["read"])),
)]
pub async fn summary(state: web::Data<AppState>, caller: Authenticated) -> ApiResult<HttpResponse> {
    caller.require(Scope::Read)?;
    let client = state.db.get().await?;
    Ok(HttpResponse::Ok().json(billing::summary(&client, caller.account_id).await?))
}

/// `POST /v1/billing/webhook`: the raw body is verified before anything parses it. A bad
/// or missing signature is 400 with nothing written; a processing failure is 5xx with
/// nothing written, so Stripe retries; a duplicate is 200 and changes nothing.
#[utoipa::path(
    post,
    path = "/v1/billing/webhook",
    operation_id = "stripe_webhook",
    tag = "billing",
    summary = "Stripe's webhook",
    description = "For Stripe, not for API clients: authenticated by `Stripe-Signature` (any \
        `v1` under any configured secret, 300 s tolerance), not by key. Each event is applied \
        exactly once; a redelivery answers 200 and changes nothing; a processing failure \
        answers 5xx so Stripe retries. Acted on: `checkout.session.completed`, \
        `checkout.session.async_payment_succeeded`, `invoice.paid`, \
        `customer.subscription.created`, `.updated`, `.deleted`, `charge.refunded`, \
        `charge.dispute.created`, `charge.dispute.closed`, `checkout.session.expired`, \
        `payment_intent.succeeded`, `payment_intent.payment_failed`, \
        `payment_intent.requires_action` (auto-recharge); every other type is recorded and \
        ignored.",
    params(("Stripe-Signature" = String, Header, description = "`t=<unix time>,v1=<hex HMAC-SHA256>`, as Stripe signs.")),
    request_body = StripeEvent,
    responses(
        (status = 200, description = "Received (and applied, or recognised as a duplicate).", body = WebhookAck),
        (status = 400, description = "`invalid_signature`: missing, malformed, stale or wrong \
            signature (nothing is written); `invalid_json`, `invalid_request`: a signed body \
            that is not a usable event; `bad_request`: the body could not be read."),
        (status = 404, description = "`feature_disabled`: no webhook secret is configured."),
    ),
)]
pub async fn webhook(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Bytes,
) -> ApiResult<HttpResponse> {
    let header = req
        .headers()
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let now = chrono::Utc::now().timestamp();
    let event = events::verified_event(&state.config.billing.webhook_secrets, header, &body, now)?;
    let processed = events::process(
        &state.db,
        state.stripe.as_ref(),
        &state.config.billing,
        &state.tiers,
        &event,
    )
    .await
    .map_err(ApiError::from);
    metrics::webhook_event(
        &event.kind,
        match &processed {
            Ok(Processed::Duplicate) => "duplicate",
            Ok(Processed::Applied(outcome)) => outcome,
            Err(e) if e.status_code().is_client_error() => "invalid",
            Err(_) => "error",
        },
    );
    match processed? {
        Processed::Duplicate => Ok(HttpResponse::Ok().json(WebhookAck {
            received: true,
            duplicate: Some(true),
            outcome: None,
        })),
        Processed::Applied(outcome) => Ok(HttpResponse::Ok().json(WebhookAck {
            received: true,
            duplicate: None,
            outcome: Some(outcome),
        })),
    }
}
