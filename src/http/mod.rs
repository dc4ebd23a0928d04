//! HTTP plumbing shared by every route: the edge middleware (request id, span, limits,
//! timeout, panic guard, problem rendering, security headers) and the extractor
//! configuration that turns bad input into problem+json instead of actix's plain text, and
//! gzip for large responses.

pub mod admin_token;
pub mod compress;
pub mod edge;
pub mod extractors;
pub mod idempotent;
pub mod problem;
pub mod ratelimit_gate;
pub mod request_id;
pub mod service_token;
