//! Tenant isolation, tried as a hostile customer would: one test per attack, each named as the
//! guarantee it proves. Whatever one account sends — failing jobs, many keys, forged headers,
//! slow webhook endpoints, password guesses, out-of-range input — another account's service,
//! limits and money stay its own.
//!
//! Grouped by the shared thing under attack, one file each:
//! - `breakers`: circuit breakers per origin, one account cannot open one for others;
//! - `limits`: tier limits per account (not per key), key caps, client addresses behind proxies,
//!   keys that cannot mint more power than they have;
//! - `webhooks`: fair job-webhook delivery, login and signup under attack;
//! - `input`: no client input reaches a 500, and the smaller leaks and fences.

mod breakers;
mod input;
mod limits;
mod webhooks;
