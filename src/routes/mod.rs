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
