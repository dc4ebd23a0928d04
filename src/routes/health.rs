//! Liveness and readiness, for load balancers and orchestrators. Neither needs a key.

use std::time::Duration;

use actix_web::{web, HttpResponse};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::{ApiError, ApiResult};
use crate::startup::AppState;

#[derive(Serialize, ToSchema)]
pub struct Live {
    #[schema(value_type = String, example = "ok")]
    status: &'static str,
}

#[derive(Serialize, ToSchema)]
pub struct Ready {
    #[schema(value_type = String, example = "ready")]
    status: &'static str,
    #[schema(value_type = String, example = "ok")]
    database: &'static str,
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
/// rotation until it recovers.
#[utoipa::path(
    get,
    path = "/health/ready",
    operation_id = "health_ready",
    tag = "health",
    summary = "Readiness",
    description = "200 when the database answers a ping within 1 s, else 503.",
    responses(
        (status = 200, description = "Ready to serve.", body = Ready),
        (status = 503, description = "`not_ready`: the database did not answer."),
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
    match tokio::time::timeout(Duration::from_secs(1), ping).await {
        Ok(Ok(())) => Ok(HttpResponse::Ok().json(Ready {
            status: "ready",
            database: "ok",
        })),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: database ping failed");
            Err(ApiError::NotReady("The database did not answer.".into()))
        }
        Err(_) => {
            tracing::warn!("readiness: database ping timed out");
            Err(ApiError::NotReady(
                "The database did not answer within 1 s.".into(),
            ))
        }
    }
}
