//! keymeter: a credit-metered API-key platform.
//!
//! The crate is a library with a thin binary on top (`main.rs`), so integration tests can
//! start the real application in-process on a random port. The README describes the shape
//! (the API, the configuration, the layout); each module's doc comment says why it is the way
//! it is.

pub mod accounts;
pub mod audit;
pub mod auth;
pub mod billing;
pub mod cli;
pub mod config;
pub mod console;
pub mod credits;
pub mod db;
pub mod dev;
pub mod events;
pub mod gateway;
pub mod http;
pub mod idempotency;
pub mod jobs;
pub mod metrics;
pub mod openapi;
pub mod operator;
pub mod outbox;
pub mod pagination;
pub mod ratelimit;
pub mod routes;
pub mod startup;
pub mod telemetry;
pub mod tiers;
