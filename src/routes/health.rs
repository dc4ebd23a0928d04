//! Liveness and readiness, for load balancers and orchestrators. Neither needs a key.

use std::time::Duration;

use actix_web::{web, HttpResponse};
use serde::Serialize;
use utoipa::ToSchema;

use crate::http::problem::{ApiError, ApiResult};
use crate::ratelimit::OnSharedFailure;
use crate::routes::{Access, Routes};
use crate::startup::AppState;

pub fn configure(routes: &mut Routes) {
    routes
        .get(Access::Open, "/health/live", live)
        .get(Access::Open, "/health/ready", ready);
}

#[derive(Serialize, ToSchema)]
pub struct Live {
    #[schema(value_type = String, example = "ok")]
    status: &'static str,
}

#[derive(Serialize, ToSchema)]
pub struct Ready {
    /// `ready`, or `degraded` while the instance serves with a fallback (the Redis rate-limit
    /// store is unreachable and limits are counted in this instance's memory meanwhile).
    #[schema(value_type = String, example = "ready")]
    status: &'static str,
    #[schema(value_type = String, example = "ok")]
    database: &'static str,
    /// `memory` (no shared store configured), `redis` (the shared store answers) or
    /// `unreachable` (configured, not answering).
    #[schema(value_type = String, example = "memory")]
    rate_limiter: &'static str,
}

/// 200 while the process can answer at all; it touches nothing else, so a database outage
/// does not get healthy instances restarted.
#[utoipa::path(
    get,
    path = "/health/live",
    operation_id = "health_live",
    tag = "health",
    summary = "Liveness",
    description = "200 while the process can answer at all; touches nothing else.",
    responses((status = 200, description = "Alive.", body = Live)),
)]
pub async fn live() -> HttpResponse {
    HttpResponse::Ok().json(Live { status: "ok" })
}

/// 200 when the database answers a ping within 1 s, else 503: take this instance out of
/// rotation until it recovers. With the Redis rate-limit store configured, an unreachable
/// Redis is 503 too when the policy is `refuse` (every keyed request would be refused, so the
/// instance cannot serve); with the `memory` fallback it still serves, and says `degraded`.
#[utoipa::path(
    get,
    path = "/health/ready",
    operation_id = "health_ready",
    tag = "health",
    summary = "Readiness",
    description = "200 when the database answers a ping within 1 s, else 503. With the Redis \
        rate-limit store configured and unreachable: 503 when \
        `KEYMETER_RATE_LIMIT_ON_REDIS_ERROR=refuse`, else 200 with `status: degraded` and \
        `rate_limiter: unreachable`.",
    responses(
        (status = 200, description = "Ready to serve (`status` is `ready` or `degraded`).", body = Ready),
        (status = 503, description = "`not_ready`: the database did not answer, or the Redis \
            rate-limit store did not and the server refuses requests without it."),
    ),
)]
pub async fn ready(state: web::Data<AppState>) -> ApiResult<HttpResponse> {
    let ping = async {
        let client = state.db.get().await.map_err(|e| e.to_string())?;
        client
            .simple_query("SELECT 1")
            .await
            .map_err(|e| e.to_string())?;
        Ok::<(), String>(())
    };
    let (db, shared) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(1), ping),
        state.limits.shared_health()
    );
    match db {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: database ping failed");
            return Err(ApiError::NotReady("The database did not answer.".into()));
        }
        Err(_) => {
            tracing::warn!("readiness: database ping timed out");
            return Err(ApiError::NotReady(
                "The database did not answer within 1 s.".into(),
            ));
        }
    }
    let (status, rate_limiter) = match shared {
        None => ("ready", "memory"),
        Some((true, _)) => ("ready", "redis"),
        Some((false, OnSharedFailure::Refuse)) => {
            tracing::warn!("readiness: the Redis rate-limit store is unreachable (policy: refuse)");
            return Err(ApiError::NotReady(
                "The shared rate-limit store did not answer.".into(),
            ));
        }
        Some((false, OnSharedFailure::Memory)) => ("degraded", "unreachable"),
    };
    Ok(HttpResponse::Ok().json(Ready {
        status,
        database: "ok",
        rate_limiter,
    }))
}
