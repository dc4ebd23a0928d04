//! Scrape jobs: fetch a customer's URL safely, then turn the page into the formats they asked
//! for. This layer knows nothing of credits, queues or HTTP routes; the job runner wires it up:
//!
//! ```text
//! validate input ─ Guard::check_syntax / CustomerHeaders::new   (refused before any charge)
//! run the job    ─ Fetcher::fetch(url, timeout, &headers)       (behind the origin's breakers)
//! settle         ─ classify(&result) → Outcome::Usable keeps the charge, Failed refunds;
//!                  Breakers::signal(&result, budget) tells the breakers
//! answer         ─ extract(&fetched, &formats, &limits)         (CPU-bound: spawn_blocking)
//! ```
//!
//! - [`ssrf`]: the outbound guard. Every connection goes to an address it vetted.
//! - [`fetch`]: one shared HTTP client, manual redirects, a body cap, typed errors, and the
//!   charge/refund/breaker classification.
//! - [`extract`]: metadata, readable text, Markdown, links and raw HTML from a fetched page.
//! - [`queue`]: the `jobs` table — create (cost reserved in the same transaction, sent as
//!   one pipelined flight and group-committed with concurrent submits), claim (SKIP LOCKED,
//!   per-account concurrency), lease, finish (refund and webhook in the same transaction,
//!   group-committed too), reap.
//! - [`submit`]: checking and queueing a job for `POST /v1/jobs` and `POST /v1/scrape` (a
//!   sync job whose account has a free running slot is inserted running and leased to the
//!   request's instance instead, and run there at once: no queue hop, no claim — within the
//!   instance's bound on inline runs, fair per account: `runner::MAX_INLINE`);
//!   [`wait`]: the sync request's wait for its job's end, and why it did not succeed.
//! - [`runner`]: the workers; [`breaker`]: failsafe circuit breakers per provider, origin,
//!   and account and origin;
//!   [`wakeups`]: in-process wake-ups; [`webhooks`]: signed job webhooks with retries.

pub mod breaker;
pub mod extract;
pub mod fetch;
pub mod queue;
pub mod runner;
pub mod ssrf;
pub mod submit;
pub mod wait;
pub mod wakeups;
pub mod webhooks;

#[cfg(test)]
mod test_server;

pub use extract::{extract, ExtractLimits, Extracted, Format, Metadata, OpenGraph};
pub use fetch::{
    classify, CustomerHeaders, FailureReason, FetchError, Fetched, Fetcher, FetcherBuildError,
    FetcherConfig, HeaderError, Outcome, RedirectHop,
};
pub use queue::QueueError;
pub use runner::{JobSettings, Jobs};
pub use ssrf::{AllowList, Guard, UrlNotAllowed};
pub use submit::{InvalidJob, SubmitError};
pub use wait::{JobFailed, WaitError};
pub use webhooks::WebhookUrlError;
