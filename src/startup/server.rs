//! The HTTP servers: the public one (edge middleware, CORS, extractor settings around the
//! route table of `routes::configure`) and, with `KEYMETER_METRICS_BIND`, the `/metrics`-only
//! one. Both are built bound and not yet running; `Application::run_until` drives them.

use std::net::TcpListener;
use std::sync::Arc;

use actix_cors::Cors;
use actix_web::dev::Server;
use actix_web::middleware::{from_fn, Condition};
use actix_web::{web, App, HttpServer};

use super::AppState;
use crate::http::problem::ApiError;
use crate::http::{edge, extractors};
use crate::metrics::Metrics;
use crate::routes;

pub(super) fn build_server(listener: TcpListener, state: AppState) -> anyhow::Result<Server> {
    let config = state.config.clone();
    let edge_settings = web::Data::new(edge::EdgeSettings {
        body_limit: config.body_limit,
        webhook_body_limit: config.webhook_body_limit,
        request_timeout: config.request_timeout,
        production: config.env.is_production(),
    });
    let data = web::Data::new(state);
    let cors_origins = config.cors_origins.clone();
    let body_limit = config.body_limit;
    let metrics_on_main = config.metrics_bind.is_none();
    let mut server = HttpServer::new(move || {
        let mut cors = Cors::default()
            .allow_any_method()
            .allow_any_header()
            .expose_any_header()
            .max_age(600);
        for origin in &cors_origins {
            cors = cors.allowed_origin(origin);
        }
        App::new()
            .app_data(data.clone())
            .app_data(edge_settings.clone())
            .app_data(extractors::json_config(body_limit))
            .app_data(web::PayloadConfig::new(body_limit))
            .app_data(extractors::path_config())
            .app_data(extractors::query_config())
            .configure(crate::console::configure)
            .configure(routes::configure)
            .configure(|cfg| metrics_route(cfg, metrics_on_main))
            .default_service(web::to(not_found))
            .wrap(from_fn(crate::http::compress::compress))
            .wrap(Condition::new(!cors_origins.is_empty(), cors))
            .wrap(from_fn(edge::edge))
    })
    .disable_signals()
    .shutdown_timeout(config.shutdown_timeout.as_secs())
    .listen(listener)?;
    if let Some(n) = config.http_workers {
        server = server.workers(n);
    }
    Ok(server.run())
}

/// `/metrics` on the public listener, behind the admin token — unless it has a listener of
/// its own, in which case the public one does not have the route.
fn metrics_route(cfg: &mut web::ServiceConfig, on_main_listener: bool) {
    if on_main_listener {
        cfg.service(
            web::resource("/metrics").route(web::get().to(routes::metrics::with_admin_token)),
        );
    }
}

/// The `KEYMETER_METRICS_BIND` listener: `GET /metrics` and nothing else, one worker.
pub(super) fn build_metrics_server(
    listener: TcpListener,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Server> {
    let data = web::Data::from(metrics);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .service(
                web::resource("/metrics")
                    .route(web::get().to(routes::metrics::on_metrics_listener)),
            )
            .default_service(web::to(not_found))
    })
    .disable_signals()
    .workers(1)
    // A scrape is quick; the shutdown budget leaves it a second after the main drain.
    .shutdown_timeout(1)
    .listen(listener)?;
    Ok(server.run())
}

async fn not_found() -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::NotFound("No route matches this path.".into()))
}
