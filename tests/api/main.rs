//! Integration tests: the real application on a random port, a fresh PostgreSQL database per
//! test, real HTTP over loopback. One test binary, so it links once.
//!
//! One file per area of the API; what they share (starting an app, databases, stub servers,
//! Stripe signing, the Prometheus parser, the binary) is in `support/`, described in
//! `support/mod.rs`.

mod support;

mod accounts;
mod alerts;
mod audit;
mod auto_recharge;
mod billing;
mod console;
mod credits;
mod db_tls;
mod events;
mod expiring_grants;
mod foundation;
mod gateway;
mod gateway_nginx;
mod isolation;
mod jobs;
mod jobs_finish;
mod key_caps;
mod keys;
mod metrics;
mod openapi;
mod operations;
mod process;
mod ratelimits;
