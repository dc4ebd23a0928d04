//! Gateway mode over HTTP: `/v1/authz` for the proxies, the refund and verify routes for the
//! operator's servers. The decisions are `gateway`'s and the keyed gate's (`admit`); this file
//! speaks each proxy's dialect:
//!
//! - allowed: `200`, empty body, `X-Keymeter-*` headers for the upstream and the rate-limit
//!   headers;
//! - refused: the problem+json a keymeter route would answer, with its status — plus the same
//!   problem in one header, `X-Keymeter-Problem` (JSON, ASCII). nginx's `auth_request` lets
//!   only 2xx/401/403 through and drops every body; with that header (and `$upstream_status`)
//!   the recipe's `error_page` location can answer the client keymeter's exact status and
//!   body without asking keymeter again, so nothing is charged or counted twice.

use actix_web::body::MessageBody;
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::Scope;
use crate::gateway::{self, routes_file, Original, Refunded};
use crate::http::problem::{ApiError, ApiResult};
use crate::http::ratelimit_gate::{admit, Admitted, Refused};
use crate::http::request_id;
use crate::http::service_token::ServiceToken;
use crate::ratelimit::{Decision, Subject};
use crate::routes::{Access, Routes};
use crate::startup::AppState;

/// The methods `/v1/authz` answers: proxies send the original request's (Envoy) or GET.
macro_rules! authz_routes {
    ($($method:ident / $m:ident => $at:ident, $under:ident, $id:literal, $under_id:literal;)*) => {
        pub fn configure(routes: &mut Routes) {
            use actix_web::http::Method;
            $(
                routes
                    .add(Access::Gateway, Method::$m, "/v1/authz", $at)
                    .add(Access::Gateway, Method::$m, "/v1/authz/{path}", $under);
            )*
            routes
                .post(Access::Service, "/v1/gateway/refunds", refund)
                .post(Access::Service, "/v1/keys/verify", verify);
        }

        $(
            #[utoipa::path(
                $method,
                path = "/v1/authz",
                operation_id = $id,
                tag = "gateway",
                summary = "Authorize a proxied request (nginx, Traefik)",
                description = AUTHZ_DESCRIPTION,
                params(
                    ("X-Original-Method" = Option<String>, Header, description = "nginx: the original request's method."),
                    ("X-Original-URI" = Option<String>, Header, description = "nginx: the original request's target (`$request_uri`)."),
                    ("X-Forwarded-Method" = Option<String>, Header, description = "Traefik: the original request's method."),
                    ("X-Forwarded-Uri" = Option<String>, Header, description = "Traefik: the original request's target."),
                ),
                responses(
                    (status = 200, description = ALLOWED),
                    (status = 400, description = BAD_ORIGINAL),
                    (status = 402, description = NO_CREDITS),
                    (status = 404, description = NOT_METERED),
                ),
                security(("ApiKey" = []), ("ApiKeyHeader" = [])),
            )]
            pub async fn $at(state: web::Data<AppState>, req: HttpRequest) -> HttpResponse {
                authz(&state, &req, None).await
            }

            #[utoipa::path(
                $method,
                path = "/v1/authz/{path}",
                operation_id = $under_id,
                tag = "gateway",
                summary = "Authorize a proxied request (Envoy ext_authz)",
                description = AUTHZ_UNDER_DESCRIPTION,
                params(("path" = String, Path, description = "The original request's path, after `/v1/authz` (Envoy's `path_prefix`); may hold slashes.")),
                responses(
                    (status = 200, description = ALLOWED),
                    (status = 400, description = BAD_ORIGINAL),
                    (status = 402, description = NO_CREDITS),
                    (status = 404, description = NOT_METERED),
                ),
                security(("ApiKey" = []), ("ApiKeyHeader" = [])),
            )]
            pub async fn $under(state: web::Data<AppState>, req: HttpRequest) -> HttpResponse {
                let tail = req.match_info().get("path").map(|p| format!("/{p}"));
                authz(&state, &req, tail.as_deref()).await
            }
        )*
    };
}

const AUTHZ_DESCRIPTION: &str = "The authorizer for nginx `auth_request` and Traefik \
    `forwardAuth` (any method is accepted). The customer's key comes in `Authorization` or \
    `X-API-Key`, the original request in `X-Original-Method` + `X-Original-URI` (nginx) or \
    `X-Forwarded-Method` + `X-Forwarded-Uri` (Traefik). The key is verified and the account's \
    tier limit applied as on every keyed route, then the original path (normalized: query \
    dropped, dot segments resolved) is priced by `KEYMETER_GATEWAY_ROUTES`, the route's scope \
    checked and its cost charged — once per `X-Request-Id`, which only the proxy may set. \
    Refusals carry the problem also in `X-Keymeter-Problem` (see the nginx recipe).";

const AUTHZ_UNDER_DESCRIPTION: &str = "The same authorizer for Envoy's `ext_authz` HTTP \
    service with `path_prefix: /v1/authz`: Envoy sends the original method and path under the \
    prefix, so the request line itself says which request to authorize (explicit \
    `X-Original-*`/`X-Forwarded-*` headers still win).";

const ALLOWED: &str = "Allowed; empty body. For the upstream: `X-Keymeter-Account`, \
    `X-Keymeter-Key` (the key id), `X-Keymeter-Tier`, `X-Keymeter-Route`; on a priced route \
    also `X-Keymeter-Charge` (the charge id a refund names), `X-Keymeter-Cost` and \
    `X-Keymeter-Credits-Remaining`, and `X-Keymeter-Replayed: true` when this `X-Request-Id` \
    had been charged already (nothing was charged again).";
const BAD_ORIGINAL: &str = "`invalid_request`: the proxy did not say which request (no or a \
    malformed original method or path).";
const NO_CREDITS: &str = "`insufficient_credits`: the balance does not cover the route's cost \
    (`balance`, `cost`); or `key_spend_limit_exceeded`: the charge would take the key's spend \
    in its period past the key's `spend_limit` (`key_id`, `limit`, `period`, `spent`, `cost`, \
    `resets_at`). Nothing was charged.";
const NOT_METERED: &str = "`route_not_metered`: no priced route covers the original request \
    (`method`, `path`).";

authz_routes! {
    get / GET => authz_get, authz_under_get, "authz_get", "authz_under_get";
    head / HEAD => authz_head, authz_under_head, "authz_head", "authz_under_head";
    post / POST => authz_post, authz_under_post, "authz_post", "authz_under_post";
    put / PUT => authz_put, authz_under_put, "authz_put", "authz_under_put";
    patch / PATCH => authz_patch, authz_under_patch, "authz_patch", "authz_under_patch";
    delete / DELETE => authz_delete, authz_under_delete, "authz_delete", "authz_under_delete";
    options / OPTIONS => authz_options, authz_under_options, "authz_options", "authz_under_options";
}

/// The proxy's request id, when it sent one we would accept as ours: what makes a retried
/// authorization charge once.
fn proxy_request_id(req: &HttpRequest) -> Option<&str> {
    req.headers()
        .get(request_id::HEADER_NAME)
        .and_then(|v| v.to_str().ok())
        .filter(|v| request_id::is_acceptable(v))
}

/// The request headers the authorizer reads, as constants: a lookup by `&str` parses the
/// name (and allocates it, for a non-standard one) on every request.
const X_ORIGINAL_URI: HeaderName = HeaderName::from_static("x-original-uri");
const X_FORWARDED_URI: HeaderName = HeaderName::from_static("x-forwarded-uri");
const X_ORIGINAL_METHOD: HeaderName = HeaderName::from_static("x-original-method");
const X_FORWARDED_METHOD: HeaderName = HeaderName::from_static("x-forwarded-method");

/// The headers it answers with.
const X_KEYMETER_ACCOUNT: HeaderName = HeaderName::from_static("x-keymeter-account");
const X_KEYMETER_KEY: HeaderName = HeaderName::from_static("x-keymeter-key");
const X_KEYMETER_TIER: HeaderName = HeaderName::from_static("x-keymeter-tier");
const X_KEYMETER_ROUTE: HeaderName = HeaderName::from_static("x-keymeter-route");

/// A request header [`Original::from_parts`] asks for, borrowed; blank counts as absent.
fn header<'r>(req: &'r HttpRequest, name: &str) -> Option<&'r str> {
    let name = match name {
        "x-original-uri" => X_ORIGINAL_URI,
        "x-forwarded-uri" => X_FORWARDED_URI,
        "x-original-method" => X_ORIGINAL_METHOD,
        "x-forwarded-method" => X_FORWARDED_METHOD,
        other => HeaderName::from_bytes(other.as_bytes()).ok()?,
    };
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.trim().is_empty())
}

async fn authz(state: &AppState, req: &HttpRequest, tail: Option<&str>) -> HttpResponse {
    match authorize(state, req, tail).await {
        Ok(res) => res,
        Err(Refused { error, decision }) => refusal(error, decision.as_ref()),
    }
}

/// Key, limit (`admit`) → route → scope → charge; see the module comment.
async fn authorize<'s>(
    state: &'s AppState,
    req: &HttpRequest,
    tail: Option<&str>,
) -> Result<HttpResponse, Refused<'s>> {
    let Admitted { caller, decision } = admit(state, req).await?;
    let with_limit = |error: ApiError| Refused {
        error,
        decision: decision.clone(),
    };
    let original = Original::from_parts(|n| header(req, n), req.method().as_str(), tail)
        .map_err(|e| with_limit(e.into()))?;
    let route = state
        .gateway
        .routes
        .find(&original.method, &original.path)
        .ok_or_else(|| {
            with_limit(
                gateway::Error::RouteNotMetered {
                    method: original.method.clone(),
                    path: original.path.clone(),
                }
                .into(),
            )
        })?;
    caller
        .require(route.scope)
        .map_err(|e| with_limit(e.into()))?;
    let charged = if route.cost > 0 {
        // Boxed: the charge's future (the lane or a transaction) is large, and unboxed it
        // would be part of every authorization's future — which actix allocates and moves
        // per request — free routes included.
        let c = Box::pin(gateway::charge(
            &state.db,
            state.config.charge_coalescing.then_some(&*state.charges),
            caller.account_id,
            &caller.key_id,
            route.cost,
            &route.label,
            proxy_request_id(req),
        ))
        .await
        .map_err(|e| with_limit(e.into()))?;
        Some(c)
    } else {
        None
    };
    let mut res = HttpResponse::Ok();
    let mut uuid = Uuid::encode_buffer();
    res.insert_header((
        X_KEYMETER_ACCOUNT,
        caller.account_id.hyphenated().encode_lower(&mut uuid) as &str,
    ))
    .insert_header((X_KEYMETER_KEY, caller.key_id.as_str()))
    .insert_header((X_KEYMETER_TIER, caller.tier.as_str()))
    .insert_header((X_KEYMETER_ROUTE, route.label_header.clone()));
    if let Some(c) = &charged {
        res.insert_header(("x-keymeter-charge", c.charge_id.to_string()))
            .insert_header(("x-keymeter-cost", route.cost.to_string()))
            .insert_header(("x-keymeter-credits-remaining", c.balance.to_string()));
        if c.replayed {
            res.insert_header(("x-keymeter-replayed", "true"));
        }
    }
    let mut res = res.finish();
    if let Some(d) = &decision {
        d.write_headers(res.headers_mut());
    }
    Ok(res)
}

/// A refusal as every keymeter route renders it, plus `X-Keymeter-Problem` and the
/// rate-limit headers when a limit was checked.
fn refusal(error: ApiError, decision: Option<&Decision<'_>>) -> HttpResponse {
    let res = error.error_response();
    let (mut res, body) = res.into_parts();
    let bytes = body.try_into_bytes().unwrap_or_default();
    if let Ok(text) = std::str::from_utf8(&bytes) {
        if let Ok(v) = HeaderValue::from_str(&ascii(text)) {
            res.headers_mut()
                .insert(HeaderName::from_static("x-keymeter-problem"), v);
        }
    }
    if let Some(d) = decision {
        d.write_headers(res.headers_mut());
    }
    res.set_body(bytes).map_into_boxed_body()
}

/// `text` with every non-ASCII character as a JSON `\uXXXX` escape (UTF-16), so JSON stays
/// the same JSON and becomes a valid header value.
fn ascii(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_ascii() && !c.is_ascii_control() {
            out.push(c);
        } else if c.is_ascii_control() {
            // serde_json already escapes control characters inside strings; outside them
            // (pretty-printing) they are whitespace.
            out.push(' ');
        } else {
            let mut buf = [0u16; 2];
            for unit in c.encode_utf16(&mut buf) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

// ---- the operator's servers -------------------------------------------------------------

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = GatewayRefund)]
pub struct RefundBody {
    /// The charge to give back: `X-Keymeter-Charge` of the allowed request.
    #[schema(minimum = 1)]
    charge: i64,
}

/// `POST /v1/gateway/refunds {charge}` (service token): the upstream failed the call, so the
/// customer gets the charge back — at most once.
#[utoipa::path(
    post,
    path = "/v1/gateway/refunds",
    operation_id = "gateway_refund",
    tag = "gateway",
    summary = "Refund a gateway charge",
    description = "For the upstream, when it failed a call keymeter charged for: gives the \
        charge back as a `refund` ledger row. A charge is refunded at most once, whatever \
        retries or instances do; the second attempt is `409 charge_already_refunded`.",
    request_body = RefundBody,
    responses(
        crate::openapi::JsonBody,
        (status = 201, description = "The refund.", body = Refunded),
        (status = 404, description = "`gateway_charge_not_found`: no gateway charge has this id."),
        (status = 409, description = "`charge_already_refunded`: refunded already (`refund`)."),
        (status = 422, description = "`validation_failed`: `charge` is not a positive integer, \
            or an unknown field."),
    ),
    security(("ServiceToken" = [])),
)]
pub async fn refund(
    state: web::Data<AppState>,
    _service: ServiceToken,
    body: web::Json<RefundBody>,
) -> ApiResult<HttpResponse> {
    if body.charge < 1 {
        return Err(ApiError::validation(
            "charge",
            "charge must be a positive id.",
        ));
    }
    let refunded = gateway::refund(&state.db, body.charge).await?;
    Ok(HttpResponse::Created().json(refunded))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = VerifyKey)]
pub struct VerifyBody {
    /// The customer's API key, as presented to your server.
    key: String,
    /// The request to price and check the scope of, as `METHOD /path` (e.g.
    /// `GET /v1/search/x`), by `KEYMETER_GATEWAY_ROUTES`.
    #[schema(max_length = 8192)]
    route: Option<String>,
    /// Credits to charge, 0 to 1,000,000; default the route's cost, or 0 without a route.
    #[schema(minimum = 0, maximum = 1_000_000)]
    cost: Option<i64>,
}

/// Why a verification failed, or `valid`. The same slugs as the problem types.
#[derive(Debug, Clone, Copy, Serialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum VerifyCode {
    Valid,
    InvalidApiKey,
    RateLimited,
    RouteNotMetered,
    InsufficientScope,
    InsufficientCredits,
    /// The key's spend limit for the period would be exceeded (nothing was charged).
    KeySpendLimitExceeded,
}

#[derive(Serialize, ToSchema)]
pub struct VerifyRateLimit {
    /// The binding policy: the tier's name, or `key`.
    policy: String,
    /// Requests per minute it allows.
    limit: u32,
    remaining: u32,
    /// Seconds until the full burst is back.
    reset: u64,
    /// When refused: seconds until one more request would be allowed.
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after: Option<u64>,
}

#[derive(Serialize, ToSchema)]
pub struct Verification {
    valid: bool,
    code: VerifyCode,
    /// Absent for an invalid key (as for every field below).
    #[serde(skip_serializing_if = "Option::is_none")]
    account_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tier: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Scope>>)]
    scopes: Option<Vec<&'static str>>,
    /// The balance after this verification's charge (if any).
    #[serde(skip_serializing_if = "Option::is_none")]
    credits_remaining: Option<i64>,
    /// The id of the charge made (a refund names it); absent when nothing was charged.
    #[serde(skip_serializing_if = "Option::is_none")]
    charge: Option<i64>,
    /// The binding rate limit; absent for an invalid key or an unlimited tier.
    #[serde(skip_serializing_if = "Option::is_none")]
    ratelimit: Option<VerifyRateLimit>,
}

/// `POST /v1/keys/verify {key, route?, cost?}` (service token): the authorizer's checks for a
/// server that verifies keys in code (Unkey's `verifyKey` is the model).
#[utoipa::path(
    post,
    path = "/v1/keys/verify",
    operation_id = "verify_key",
    tag = "gateway",
    summary = "Verify a key (for your servers)",
    description = "Runs the authorizer's checks for a key your server received: the key, the \
        account's tier limit (the request counts against it), the route's scope, and the \
        charge (`cost`, else the route's). Always `200` for a verdict: `valid` and `code` say \
        which check failed. Charges once per `X-Request-Id` when you send one.",
    request_body = VerifyBody,
    responses(
        crate::openapi::JsonBody,
        (status = 200, description = "The verdict.", body = Verification),
        (status = 422, description = "`validation_failed`: a `route` that is not `METHOD \
            /path`, a `cost` out of range, or an unknown field."),
    ),
    security(("ServiceToken" = [])),
)]
pub async fn verify(
    state: web::Data<AppState>,
    _service: ServiceToken,
    req: HttpRequest,
    body: web::Json<VerifyBody>,
) -> ApiResult<HttpResponse> {
    let body = body.into_inner();
    if let Some(c) = body.cost {
        if !(0..=routes_file::MAX_COST).contains(&c) {
            return Err(ApiError::validation(
                "cost",
                format!("cost must be between 0 and {}.", routes_file::MAX_COST),
            ));
        }
    }
    let original = body
        .route
        .as_deref()
        .map(|r| {
            let (m, p) = r.trim().split_once(' ').unwrap_or(("", ""));
            Original::from_parts(
                |n| match n {
                    "x-original-method" => Some(m),
                    "x-original-uri" => Some(p.trim()),
                    _ => None,
                },
                "GET",
                None,
            )
            .map_err(|_| ApiError::validation("route", "route must be `METHOD /path`."))
        })
        .transpose()?;
    let mut v = Verification {
        valid: false,
        code: VerifyCode::InvalidApiKey,
        account_id: None,
        key_id: None,
        tier: None,
        scopes: None,
        credits_remaining: None,
        charge: None,
        ratelimit: None,
    };
    let caller = match state.auth.authenticate(Some(body.key.trim())).await {
        Ok(c) => c,
        Err(crate::auth::Error::InvalidApiKey) => return Ok(HttpResponse::Ok().json(v)),
        Err(e) => return Err(e.into()),
    };
    v.account_id = Some(caller.account_id);
    v.key_id = Some(caller.key_id.clone());
    v.tier = Some(caller.tier.clone());
    v.scopes = Some(caller.scopes.to_vec());
    let tier = state.tiers.get_or_default(&caller.tier);
    let decision = state
        .limits
        .check(
            Subject {
                account_id: caller.account_id,
                key_id: &caller.key_id,
                key_rate_limit: caller.rate_limit,
            },
            tier,
        )
        .await?;
    v.ratelimit = decision.as_ref().map(|d| VerifyRateLimit {
        policy: d.policy.to_owned(),
        limit: d.limit,
        remaining: d.remaining,
        reset: d.reset_secs,
        retry_after: (!d.allowed).then_some(d.retry_after_secs),
    });
    let code = verdict(
        &state,
        &caller,
        &req,
        original.as_ref(),
        body.cost,
        decision.as_ref(),
        &mut v,
    )
    .await?;
    v.valid = code == VerifyCode::Valid;
    v.code = code;
    if v.credits_remaining.is_none() {
        let client = state.db.get().await?;
        v.credits_remaining = client
            .query_opt(
                "SELECT credit_balance FROM accounts WHERE id = $1",
                &[&caller.account_id],
            )
            .await?
            .map(|r| r.get(0));
    }
    Ok(HttpResponse::Ok().json(v))
}

/// The checks after the key, in the authorizer's order; fills in the charge.
async fn verdict(
    state: &AppState,
    caller: &crate::auth::Authenticated,
    req: &HttpRequest,
    original: Option<&Original>,
    cost: Option<i64>,
    decision: Option<&Decision<'_>>,
    v: &mut Verification,
) -> ApiResult<VerifyCode> {
    if decision.is_some_and(|d| !d.allowed) {
        return Ok(VerifyCode::RateLimited);
    }
    let route = match original {
        None => None,
        Some(o) => match state.gateway.routes.find(&o.method, &o.path) {
            Some(r) => Some(r),
            None => return Ok(VerifyCode::RouteNotMetered),
        },
    };
    if let Some(r) = route {
        if caller.require(r.scope).is_err() {
            return Ok(VerifyCode::InsufficientScope);
        }
    }
    let cost = cost.or(route.map(|r| r.cost)).unwrap_or(0);
    if cost > 0 {
        let label = route.map_or("verify", |r| r.label.as_str());
        match gateway::charge(
            &state.db,
            state.config.charge_coalescing.then_some(&*state.charges),
            caller.account_id,
            &caller.key_id,
            cost,
            label,
            proxy_request_id(req),
        )
        .await
        {
            Ok(c) => {
                v.charge = Some(c.charge_id);
                v.credits_remaining = Some(c.balance);
            }
            Err(gateway::Error::Credits(crate::credits::Error::InsufficientCredits {
                balance,
                ..
            })) => {
                v.credits_remaining = Some(balance);
                return Ok(VerifyCode::InsufficientCredits);
            }
            Err(gateway::Error::Credits(crate::credits::Error::KeySpendLimitExceeded {
                ..
            })) => return Ok(VerifyCode::KeySpendLimitExceeded),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(VerifyCode::Valid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_become_ascii_json_header_values() {
        let s = ascii(r#"{"detail":"caf\u00e9 é 🎉"}"#);
        assert!(s.is_ascii());
        assert!(HeaderValue::from_str(&s).is_ok());
        let back: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(back["detail"], "caf\u{e9} é 🎉");
    }
}
