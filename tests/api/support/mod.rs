//! What the integration tests share, one file per kind of thing:
//!
//! - `app`: [`spawn_app`] and friends start the real application on a fresh database and a
//!   random port; [`TestApp`] is the handle (client, database connection, request helpers).
//!   Settings are changed on the typed [`keymeter::config::Config`]
//!   (`spawn_app_with(|c| c.body_limit = 100)`); only tests of the variables' parsing start
//!   from the environment map ([`app::base_env`]).
//! - `db`: test databases (create, connect, drop) and the ledger checks ([`db::balance`],
//!   [`db::assert_ledger_invariant`]).
//! - `keys`: API keys forged by the format's rules (a valid checksum, a wrong id or secret).
//! - `problem`: [`assert_problem`], the shape every error body must have.
//! - `upstream`: local sites for scrape jobs and webhooks ([`upstream::Upstream`]), ports
//!   that refuse, reset or never answer, and an OTLP collector.
//! - `stripe`: Stripe's published fixtures, signed deliveries, a local Stripe API.
//! - `prometheus`: a strict parser of the `/metrics` text format.
//! - `process`: the real `keymeter` binary, run as an operator would.

pub mod app;
pub mod browser;
pub mod db;
pub mod keys;
pub mod problem;
pub mod process;
pub mod prometheus;
pub mod stripe;
pub mod upstream;

pub use app::{spawn_app, spawn_app_on, spawn_app_with, TestApp, ADMIN_TOKEN};
pub use problem::assert_problem;
