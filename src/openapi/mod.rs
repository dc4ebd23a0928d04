//! The OpenAPI 3.1 document at `GET /openapi.json` (and the page at `GET /docs` that
//! renders it).
//!
//! The document is generated from the code:
//!
//! 1. utoipa derives the operations from the `#[utoipa::path]` annotations on the handlers in
//!    `routes/`, and the schemas from `ToSchema`/`IntoParams` on the very types the handlers
//!    deserialize and serialize (so `deny_unknown_fields`, defaults and renames are the real
//!    ones). An annotation says only what is particular to its handler;
//! 2. `ProblemType`'s schema is written from [`ProblemType::ALL`] (its `ToSchema` impl in
//!    `components.rs`), so the document, `/docs` and the problem bodies share one list;
//! 3. two `utoipa::Modify` impls add what is shared, in one place each:
//!    [`components::SharedComponents`] (security schemes, the `Problem` schema, the shared
//!    response headers) and [`operations::OperationDefaults`] (per operation, by
//!    the route's `Access` in `routes::table()`: the responses the gates and the edge add —
//!    413 for a body, 401/403/404/429 by authentication, 500/503/504 everywhere — the
//!    problem+json body narrowed to the types each response names, and the headers).
//!
//! The `paths(…)` list below is checked against `routes::table()` by a unit test
//! (`operations::tests`), in both directions, with each operation's security against its
//! route's `Access`.
//!
//! Why not `utoipa-actix-web` (which registers a route and its document together): it
//! collects only services made with actix's route macros (`#[get("…")]`), one resource per
//! method, not `web::resource(…).route(…)`. With a resource per method a wrong method on a
//! known path would be a 404 instead of today's 405, and the per-resource gates and the
//! webhook's payload limit would move into macro attributes on each handler. The route table
//! gives the same single source without either.
//!
//! Files: `components.rs` and `operations.rs` the last two steps above, `page.rs` the docs page.

pub mod components;
pub mod operations;
pub mod page;

use serde_json::{json, Value};
use utoipa::OpenApi;

use self::components::SharedComponents;
use self::operations::OperationDefaults;
use crate::http::problem::ProblemType;
use crate::routes::{
    accounts, admin, alerts, billing, credits, docs, events, gateway, health, jobs, keys,
};

pub use self::components::IDEMPOTENCY_KEY;
pub use self::operations::JsonBody;

const DESCRIPTION: &str = "\
A credit-metered API: every call is authenticated with an API key, rate-limited by the \
account's tier, and paid work is charged from a prepaid credit balance.

**Keys** look like `km_live_<12-char id>_<43-char secret><6-char checksum>` (70 characters of \
`0-9A-Za-z` after the prefix) and go in `Authorization: Bearer <key>` or `X-API-Key: <key>`. \
Each operation names the scope it needs (`scrape`, `read`, `keys:manage`, `billing`) in its \
security requirement. `/admin/*` takes the operator's token (`KEYMETER_ADMIN_TOKEN`) instead.

**Errors** are RFC 9457 `application/problem+json` with a stable `type` slug, `title`, \
`status`, `detail` and `request_id` (see the `Problem` and `ProblemType` schemas). Client code \
should match on `type`, never on `detail`.

**Rate limits.** The tier's limit counts per account, across all its keys; a key may carry a \
lower `rate_limit` of its own. Responses carry `RateLimit-Policy`, `RateLimit` (IETF httpapi \
draft) and `X-RateLimit-Limit/Remaining/Reset` for whichever limit binds (the policy is the \
tier's name, or `key`); a refusal is `429 rate_limited` with `Retry-After`.

**Idempotency.** Operations that charge or create money-moving state accept \
`Idempotency-Key`.

**Pagination.** Lists are newest first: `?limit=1..100&cursor=…` → \
`{data, has_more, next_cursor}`.

Every response carries `X-Request-Id` (the caller's, when it is 1–64 characters of \
`[A-Za-z0-9._-]`, else a fresh one).";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "keymeter API",
        description = DESCRIPTION,
        license(name = "MIT", identifier = "MIT"),
    ),
    paths(
        health::live,
        health::ready,
        docs::openapi_json,
        docs::docs_page,
        accounts::signup,
        accounts::login,
        accounts::get_account,
        alerts::get_alerts,
        alerts::put_alerts,
        keys::list,
        keys::create,
        keys::get,
        keys::update,
        keys::revoke,
        keys::rotate,
        credits::summary,
        credits::ledger_page,
        credits::usage,
        credits::charge,
        billing::summary,
        billing::checkout,
        billing::portal,
        billing::get_auto_recharge,
        billing::put_auto_recharge,
        billing::setup_auto_recharge,
        billing::webhook,
        jobs::scrape,
        jobs::create_job,
        jobs::list,
        jobs::get,
        jobs::cancel,
        admin::create_account,
        admin::get_account,
        admin::create_key,
        admin::set_tier,
        admin::set_tier_post,
        admin::suspend,
        admin::unsuspend,
        admin::grant_credits,
        admin::revoke_key,
        admin::audit_trail,
        jobs::breakers,
        gateway::authz_get,
        gateway::authz_head,
        gateway::authz_post,
        gateway::authz_put,
        gateway::authz_patch,
        gateway::authz_delete,
        gateway::authz_options,
        gateway::authz_under_get,
        gateway::authz_under_head,
        gateway::authz_under_post,
        gateway::authz_under_put,
        gateway::authz_under_patch,
        gateway::authz_under_delete,
        gateway::authz_under_options,
        gateway::refund,
        gateway::verify,
        events::list_events,
        events::list_endpoints,
        events::create_endpoint,
        events::get_endpoint,
        events::delete_endpoint,
        events::rotate_secret,
        events::list_deliveries,
    ),
    components(schemas(
        ProblemType,
        crate::credits::alerts::BalanceLowData,
        crate::credits::alerts::BalanceDepletedData,
        crate::credits::grants::CreditsExpiredData,
    )),
    modifiers(&SharedComponents, &OperationDefaults),
    tags(
        (name = "health", description = "Liveness and readiness, for load balancers. No key."),
        (name = "accounts", description = "Signup, login and the account a key belongs to."),
        (name = "keys", description = "An account's API keys: create, list, revoke, rotate."),
        (name = "credits", description = "The balance, the ledger, usage, and metered charges."),
        (name = "billing", description = "Buying credits and plans through Stripe, and Stripe's webhook."),
        (name = "jobs", description = "Scrape jobs: run one and wait for its result, or queue \
            it and follow it by id or webhook. The cost is reserved when the job is queued and \
            refunded unless the site gave a usable answer."),
        (name = "admin", description = "The operator's API, behind `KEYMETER_ADMIN_TOKEN`. \
            It does not exist (404) while no token is configured."),
        (name = "gateway", description = "Gateway mode: keymeter as the authorizer of nginx \
            `auth_request`, Traefik `forwardAuth` and Envoy `ext_authz` in front of your own API \
            (priced routes from `KEYMETER_GATEWAY_ROUTES`), refunds for the upstream, and key \
            verification for servers, both with a service token."),
        (name = "meta", description = "This document and its human-readable page."),
        (name = "events", description = "Account events (`GET /v1/events`) and the webhook \
            endpoints they are POSTed to, signed, at least once, retried for a day."),
    ),
)]
struct ApiDoc;

/// The whole document, as JSON.
pub fn document() -> Value {
    serde_json::to_value(ApiDoc::openapi()).unwrap_or_else(|e| {
        tracing::error!(error = %e, "the OpenAPI document did not serialize");
        json!({})
    })
}
