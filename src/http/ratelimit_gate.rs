//! The gates in front of `/v1`: the hot path after the edge, top to bottom.
//!
//! `keyed` ([`admit`], shared with the gateway authorizer): failed-auth throttle for the client IP → verify the key (see `auth`) → the key's
//! own limit, if it has one, and the account's tier limit (shared by all its keys) → the
//! handler, with the verified caller in the
//! request's extensions → rate-limit headers on whatever the handler answered.
//!
//! `public`: the per-IP limit, for routes that take no key (signup, login).

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{web, HttpMessage, HttpRequest};

use crate::auth::extractor::presented_key;
use crate::auth::Authenticated;
use crate::http::problem::ApiError;
use crate::metrics::{self, Limit};
use crate::ratelimit::{Decision, Subject, KEY_POLICY};
use crate::startup::AppState;

fn state_of(req: &ServiceRequest) -> Result<web::Data<AppState>, ApiError> {
    req.app_data::<web::Data<AppState>>()
        .cloned()
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("application state missing")))
}

fn refuse(req: ServiceRequest, err: ApiError) -> ServiceResponse<BoxBody> {
    req.error_response(err).map_into_boxed_body()
}

/// A request that passed the keyed checks: the verified caller, and the limit decision its
/// response reports (`None`: nothing limits it), borrowed from the application's limits.
pub struct Admitted<'s> {
    pub caller: Authenticated,
    pub decision: Option<Decision<'s>>,
}

/// A request the keyed checks refused, with the limit decision to report when there is one.
pub struct Refused<'s> {
    pub error: ApiError,
    pub decision: Option<Decision<'s>>,
}

impl From<ApiError> for Refused<'_> {
    fn from(error: ApiError) -> Self {
        Refused {
            error,
            decision: None,
        }
    }
}

/// The keyed checks, in order: failed-auth throttle for the client IP → verify the key →
/// the key's own limit and the account's tier limit. Shared by the `/v1` gate and the gateway
/// authorizer (`routes::gateway`), so a proxied call is held to exactly what an API call is.
pub async fn admit<'s>(
    state: &'s AppState,
    req: &HttpRequest,
) -> Result<Admitted<'s>, Refused<'s>> {
    let ip = state.limits.client_ip(req);
    if let Some(wait) = ip.and_then(|ip| state.limits.ip_blocked(ip)) {
        metrics::rate_limited(Limit::AuthFailures);
        return Err(ApiError::RateLimited {
            retry_after_secs: wait,
            detail: "Too many failed authentication attempts from this address.".into(),
        }
        .into());
    }
    let caller = match state.auth.authenticate(presented_key(req.headers())).await {
        Ok(a) => a,
        Err(e) => {
            if matches!(e, crate::auth::Error::InvalidApiKey) {
                if let Some(ip) = ip {
                    state.limits.note_auth_failure_from(ip);
                }
            }
            return Err(ApiError::from(e).into());
        }
    };
    tracing::Span::current().record("key_id", caller.key_id.as_str());
    let tier = state.tiers.get_or_default(&caller.tier);
    let who = Subject {
        account_id: caller.account_id,
        key_id: &caller.key_id,
        key_rate_limit: caller.rate_limit,
    };
    let decision = state.limits.check(who, tier).await?;
    if let Some(d) = decision.as_ref().filter(|d| !d.allowed) {
        metrics::rate_limited(Limit::Tier(&tier.name));
        let detail = if d.policy == KEY_POLICY {
            format!("This key allows {} requests per minute.", d.limit)
        } else {
            format!(
                "The {} tier allows {} requests per minute (burst {}) for the whole account, \
                 across all its keys.",
                tier.name, tier.requests_per_minute, tier.burst
            )
        };
        return Err(Refused {
            error: ApiError::RateLimited {
                retry_after_secs: d.retry_after_secs,
                detail,
            },
            decision,
        });
    }
    Ok(Admitted { caller, decision })
}

pub async fn keyed(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let state = match state_of(&req) {
        Ok(s) => s,
        Err(e) => return Ok(refuse(req, e)),
    };
    let Admitted { caller, decision } = match admit(&state, req.request()).await {
        Ok(a) => a,
        Err(Refused { error, decision }) => {
            let mut res = refuse(req, error);
            if let Some(d) = decision {
                d.write_headers(res.headers_mut());
            }
            return Ok(res);
        }
    };
    req.extensions_mut().insert(caller);
    let mut res = next.call(req).await?.map_into_boxed_body();
    if let Some(d) = decision {
        d.write_headers(res.headers_mut());
    }
    Ok(res)
}

pub async fn public(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let state = match state_of(&req) {
        Ok(s) => s,
        Err(e) => return Ok(refuse(req, e)),
    };
    let Some(ip) = state.limits.client_ip(req.request()) else {
        return Ok(next.call(req).await?.map_into_boxed_body());
    };
    let d = state.limits.check_ip(ip);
    if !d.allowed {
        metrics::rate_limited(Limit::Ip);
        let mut res = refuse(
            req,
            ApiError::RateLimited {
                retry_after_secs: d.retry_after_secs,
                detail: "Too many requests from this address.".into(),
            },
        );
        d.write_headers(res.headers_mut());
        return Ok(res);
    }
    let mut res = next.call(req).await?.map_into_boxed_body();
    d.write_headers(res.headers_mut());
    Ok(res)
}
