//! `GET /metrics`: the Prometheus text exposition (see `crate::metrics`).
//!
//! Served one of two ways. With `KEYMETER_METRICS_BIND` set, on that separate listener and
//! without a token: bind it to an address only the monitoring network reaches, and the
//! public listener does not have the route at all. Otherwise on the public listener behind
//! the admin token, like `/admin`; with neither configured it does not exist (404
//! `feature_disabled`).

use actix_web::http::header::{CacheControl, CacheDirective};
use actix_web::{web, FromRequest, HttpRequest, HttpResponse};

use crate::http::admin_token::AdminToken;
use crate::http::problem::{ApiError, ApiResult};
use crate::metrics::{self, Metrics};
use crate::startup::AppState;

/// On the public listener: the admin token is required.
pub async fn with_admin_token(
    state: web::Data<AppState>,
    req: HttpRequest,
) -> ApiResult<HttpResponse> {
    if state.config.admin_token.is_none() {
        return Err(ApiError::Disabled(
            "Metrics are served with KEYMETER_ADMIN_TOKEN set, or on KEYMETER_METRICS_BIND.".into(),
        ));
    }
    AdminToken::extract(&req).await?;
    exposition(&state.metrics).await
}

/// On the metrics listener (`KEYMETER_METRICS_BIND`).
pub async fn on_metrics_listener(metrics: web::Data<Metrics>) -> ApiResult<HttpResponse> {
    exposition(&metrics).await
}

async fn exposition(m: &Metrics) -> ApiResult<HttpResponse> {
    let body = m.render().await.map_err(ApiError::Internal)?;
    Ok(HttpResponse::Ok()
        .content_type(metrics::CONTENT_TYPE)
        .insert_header(CacheControl(vec![CacheDirective::NoStore]))
        .body(body))
}
