//! Liveness and readiness, for load balancers and orchestrators. Neither needs a key.

use std::time::Duration;

use actix_web::{web, HttpResponse};
use serde_json::json;

use crate::error::{ApiError, ApiResult};
use crate::startup::AppState;

/// 200 while the process can answer at all; it touches nothing else, so a database outage
/// does not get healthy instances restarted.
pub async fn live() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// 200 when the database answers a ping within 1 s, else 503: take this instance out of
/// rotation until it recovers.
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
        Ok(Ok(())) => Ok(HttpResponse::Ok().json(json!({"status": "ready", "database": "ok"}))),
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
