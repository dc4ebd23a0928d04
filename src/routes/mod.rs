//! Routes translate HTTP into calls on the capability modules, and nothing more: parsing
//! and validation happen in extractors and domain types, decisions in the modules.

pub mod accounts;
pub mod admin;
pub mod billing;
pub mod credits;
pub mod health;
pub mod jobs;
pub mod keys;
pub mod metrics;

use actix_web::middleware::from_fn;
use actix_web::web;

/// The edge enforces the configured webhook limit before routing; this is only the
/// extractor's ceiling.
const WEBHOOK_BODY_LIMIT_MAX: usize = 16 * 1024 * 1024;

/// Every route, registered explicitly in one place. Routes without a key sit behind the
/// per-IP gate; everything else under `/v1` behind the keyed gate (authenticate, then the
/// tier's limit).
///
/// Each route must be documented in `crate::openapi` (`tests/api/openapi.rs` reads the
/// routes back from the router and fails on any the document lacks, or vice versa).
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/health/live").route(web::get().to(health::live)))
        .service(web::resource("/health/ready").route(web::get().to(health::ready)))
        .service(web::resource("/openapi.json").route(web::get().to(crate::openapi::openapi_json)))
        .service(web::resource("/docs").route(web::get().to(crate::openapi::docs_page)))
        .service(
            web::resource("/v1/signup")
                .wrap(from_fn(crate::http::ratelimit_gate::public))
                .route(web::post().to(accounts::signup)),
        )
        .service(
            web::resource("/v1/login")
                .wrap(from_fn(crate::http::ratelimit_gate::public))
                .route(web::post().to(accounts::login)),
        )
        .service(
            // Stripe authenticates by signature, not by key; its deliveries come in bursts
            // from Stripe's addresses, so no per-IP limit either.
            web::resource("/v1/billing/webhook")
                .app_data(web::PayloadConfig::new(WEBHOOK_BODY_LIMIT_MAX))
                .route(web::post().to(billing::webhook)),
        )
        .service(
            web::scope("/v1")
                .wrap(from_fn(crate::http::ratelimit_gate::keyed))
                .service(web::resource("/account").route(web::get().to(accounts::get_account)))
                .service(
                    web::resource("/keys")
                        .route(web::get().to(keys::list))
                        .route(web::post().to(keys::create)),
                )
                .service(
                    web::resource("/keys/{id}")
                        .route(web::get().to(keys::get))
                        .route(web::delete().to(keys::revoke)),
                )
                .service(web::resource("/keys/{id}/rotate").route(web::post().to(keys::rotate)))
                .service(web::resource("/credits").route(web::get().to(credits::summary)))
                .service(
                    web::resource("/credits/ledger").route(web::get().to(credits::ledger_page)),
                )
                .service(web::resource("/credits/charge").route(web::post().to(credits::charge)))
                .service(web::resource("/usage").route(web::get().to(credits::usage)))
                .service(web::resource("/billing").route(web::get().to(billing::summary)))
                .service(
                    web::resource("/billing/checkout").route(web::post().to(billing::checkout)),
                )
                .service(web::resource("/scrape").route(web::post().to(jobs::scrape)))
                .service(
                    web::resource("/jobs")
                        .route(web::get().to(jobs::list))
                        .route(web::post().to(jobs::create_job)),
                )
                .service(
                    web::resource("/jobs/{id}")
                        .route(web::get().to(jobs::get))
                        .route(web::delete().to(jobs::cancel)),
                ),
        )
        .service(
            web::scope("/admin")
                .service(web::resource("/accounts").route(web::post().to(admin::create_account)))
                .service(web::resource("/accounts/{id}").route(web::get().to(admin::get_account)))
                .service(
                    web::resource("/accounts/{id}/keys").route(web::post().to(admin::create_key)),
                )
                .service(
                    web::resource("/accounts/{id}/tier")
                        .route(web::put().to(admin::set_tier))
                        .route(web::post().to(admin::set_tier_post)),
                )
                .service(
                    web::resource("/accounts/{id}/suspend").route(web::post().to(admin::suspend)),
                )
                .service(
                    web::resource("/accounts/{id}/unsuspend")
                        .route(web::post().to(admin::unsuspend)),
                )
                .service(
                    web::resource("/accounts/{id}/credits")
                        .route(web::post().to(admin::grant_credits)),
                )
                .service(
                    web::resource("/keys/{id}/revoke").route(web::post().to(admin::revoke_key)),
                )
                .service(web::resource("/breakers").route(web::get().to(jobs::breakers)))
                .service(web::resource("/audit").route(web::get().to(admin::audit_trail))),
        );
}
