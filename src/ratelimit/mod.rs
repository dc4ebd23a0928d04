//! Rate limits: per account by its tier (GCRA), across all the account's keys, plus a key's
//! own lower limit when it carries one; per client IP for unauthenticated routes, and per
//! client IP for failed authentications — so key guessing is throttled before it costs a
//! cache lookup or a query.
//!
//! Why per account and not per key: keys are free to make, so a per-key limit would give an
//! account N times its tier with N keys. A key's own limit (`rate_limit`) is checked *before*
//! the account's, so a key that runs into its own limit never spends the budget the account's
//! other keys share.
//!
//! GCRA (governor) keeps one timestamp per account: no counters to reset, no window edges to
//! burst through. Keyed state never expires by itself, so a background task calls
//! `retain_recent()` and memory stays bounded by the accounts seen in the last minute or so.

pub mod client_ip;
pub mod redis;

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use actix_web::http::header::{HeaderMap, HeaderName, HeaderValue};
use actix_web::HttpRequest;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::{StateInformationMiddleware, StateSnapshot};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{NotUntil, Quota, RateLimiter};
use uuid::Uuid;

use crate::tiers::{Tier, Tiers};
use client_ip::{limit_key, ClientIpPolicy};

type Keyed<K> = RateLimiter<K, DefaultKeyedStateStore<K>, DefaultClock, StateInformationMiddleware>;
type Direct = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;
type ClockInstant = <DefaultClock as Clock>::Instant;

/// The policy name a key's own limit is reported under in the rate-limit headers.
pub const KEY_POLICY: &str = "key";

/// Who a request counts against: its account (the tier's limit) and its key (the key's own
/// limit, when it has one).
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub account_id: Uuid,
    pub key_id: &'a str,
    /// Requests per minute of the key's own limit.
    pub key_rate_limit: Option<u32>,
}

/// A key's own limit: its requests per minute, with a burst no larger than the tier's nor
/// than a minute's worth — so an idle key's bucket is full again within a minute.
pub fn key_quota(rate_limit: u32, tier: &Tier) -> (u32, u32) {
    let rpm = rate_limit.max(1);
    (rpm, tier.burst.min(rpm).max(1))
}

/// The outcome of one check, with what the response headers report.
///
/// It borrows its policy's name (a tier's, from the configuration, or a constant) and that
/// policy's pre-rendered headers from the limits it came from, which outlive every request:
/// a decision is made on every keyed request, and owning copies would cost allocations
/// there.
#[derive(Debug, Clone)]
pub struct Decision<'a> {
    pub allowed: bool,
    /// The policy's name (the tier, `key`, or `ip`).
    pub policy: &'a str,
    /// Requests per minute the policy allows.
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until the full burst is available again.
    pub reset_secs: u64,
    /// On refusal: seconds until one more request would be allowed.
    pub retry_after_secs: u64,
    /// The headers of `policy` at `limit` that never change, when they were rendered ahead
    /// (a tier's, see [`PolicyHeaders`]; used only if they are for this very policy and
    /// limit); `None`: rendered for this response.
    pub rendered: Option<&'a PolicyHeaders>,
}

/// What the rate-limit headers of one policy at one limit always say, rendered once when
/// the limits are built rather than on every response: `RateLimit-Policy`,
/// `X-RateLimit-Limit`, and the `"name";r=` that opens every `RateLimit` value. A tier's name
/// and rate are configuration, fixed for the process.
#[derive(Debug)]
pub struct PolicyHeaders {
    name: Box<str>,
    limit: u32,
    /// `None` when the name cannot be in a header (that header is left out, as always).
    policy: Option<HeaderValue>,
    limit_value: HeaderValue,
    ratelimit_prefix: Box<[u8]>,
}

impl PolicyHeaders {
    pub fn new(name: &str, limit: u32) -> PolicyHeaders {
        let mut digits = [0u8; 20];
        PolicyHeaders {
            name: name.into(),
            limit,
            policy: joined(&[
                b"\"",
                name.as_bytes(),
                b"\";q=",
                decimal(limit.into(), &mut digits),
                b";w=60",
            ]),
            limit_value: HeaderValue::from(limit),
            ratelimit_prefix: [b"\"", name.as_bytes(), b"\";r="].concat().into(),
        }
    }
}

/// `n` in decimal, in the tail of `buf` (what `format!` would print, without its machinery).
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// One header value made of `parts`, in a single allocation of exactly its size (`format!`
/// then `Bytes::from(String)` formats through `core::fmt` and, its capacity being larger than
/// its length, allocates a second time for the shared buffer). `None` when the bytes cannot
/// be a header value.
fn joined(parts: &[&[u8]]) -> Option<HeaderValue> {
    let mut v = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
    for p in parts {
        v.extend_from_slice(p);
    }
    HeaderValue::from_maybe_shared(bytes::Bytes::from(v)).ok()
}

impl Decision<'_> {
    /// Writes `RateLimit-Policy` / `RateLimit` (IETF httpapi draft, structured-field form) and
    /// the common `X-RateLimit-*` trio (`Reset` in seconds from now).
    ///
    /// On every keyed response and every allowed `/v1/authz`, so it is written for the hot
    /// path: constant header names, a tier's constant values rendered once
    /// ([`PolicyHeaders`]), and the values that change assembled without `format!`, one
    /// allocation each. The policy is a tier name from the configuration or `key`; a value
    /// that could not be a header is left out, as before.
    pub fn write_headers(&self, h: &mut HeaderMap) {
        const POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
        const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
        const LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
        const REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
        const RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
        let (mut a, mut b) = ([0u8; 20], [0u8; 20]);
        let remaining = decimal(self.remaining.into(), &mut a);
        let reset = decimal(self.reset_secs, &mut b);
        // A policy without its headers rendered ahead (a key's or an address's limit, a
        // tier falling back to the default's limiter) renders them here, the same way.
        let built;
        let r = match self
            .rendered
            .filter(|r| r.limit == self.limit && *r.name == *self.policy)
        {
            Some(r) => r,
            None => {
                built = PolicyHeaders::new(self.policy, self.limit);
                &built
            }
        };
        if let Some(v) = &r.policy {
            h.insert(POLICY, v.clone());
        }
        if let Some(v) = joined(&[&r.ratelimit_prefix, remaining, b";t=", reset]) {
            h.insert(RATELIMIT, v);
        }
        h.insert(LIMIT, r.limit_value.clone());
        if let Some(v) = joined(&[remaining]) {
            h.insert(REMAINING, v);
        }
        if let Some(v) = joined(&[reset]) {
            h.insert(RESET, v);
        }
    }
}

fn quota(per_minute: u32, burst: u32) -> Quota {
    let rpm = NonZeroU32::new(per_minute.max(1)).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(burst.max(1)).unwrap_or(NonZeroU32::MIN);
    Quota::per_minute(rpm).allow_burst(burst)
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

fn decision<'a>(
    outcome: Result<StateSnapshot, NotUntil<ClockInstant>>,
    policy: &'a str,
    per_minute: u32,
    rendered: Option<&'a PolicyHeaders>,
) -> Decision<'a> {
    match outcome {
        Ok(snapshot) => {
            let q = snapshot.quota();
            let remaining = snapshot.remaining_burst_capacity();
            let missing = q.burst_size().get().saturating_sub(remaining);
            Decision {
                allowed: true,
                policy,
                limit: per_minute,
                remaining,
                reset_secs: ceil_secs(q.replenish_interval() * missing),
                retry_after_secs: 0,
                rendered,
            }
        }
        Err(not_until) => {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            let q = not_until.quota();
            Decision {
                allowed: false,
                policy,
                limit: per_minute,
                remaining: 0,
                reset_secs: ceil_secs(q.burst_size_replenished_in()),
                retry_after_secs: ceil_secs(wait).max(1),
                rendered,
            }
        }
    }
}

fn decide<'a, K: std::hash::Hash + Eq + Clone>(
    limiter: &Keyed<K>,
    key: &K,
    policy: &'a str,
    per_minute: u32,
    rendered: Option<&'a PolicyHeaders>,
) -> Decision<'a> {
    decision(limiter.check_key(key), policy, per_minute, rendered)
}

/// Of two checks of one request, the one its headers report: a refusal over an allowance
/// (the longer wait of two refusals), else the one with less left.
pub fn binding<'a>(a: Decision<'a>, b: Decision<'a>) -> Decision<'a> {
    match (a.allowed, b.allowed) {
        (true, false) => b,
        (false, true) => a,
        (false, false) if b.retry_after_secs > a.retry_after_secs => b,
        (false, false) => a,
        (true, true) if b.remaining < a.remaining => b,
        (true, true) => a,
    }
}

/// Per-IP limit settings (requests per minute and burst).
#[derive(Debug, Clone, Copy)]
pub struct IpPolicy {
    pub per_minute: u32,
    pub burst: u32,
}

/// What to do when the shared (Redis) limiter cannot answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnSharedFailure {
    /// Limit with this instance's in-memory state (each instance then allows the full rate).
    Memory,
    /// Refuse with 503 until Redis answers again.
    Refuse,
}

pub struct Limits {
    tiers: Tiers,
    shared: Option<(redis::RedisLimiter, OnSharedFailure)>,
    degraded: AtomicBool,
    /// One limiter per tier, keyed by account, with the tier's constant headers.
    per_tier: HashMap<String, (Keyed<Uuid>, PolicyHeaders)>,
    /// Keys' own limits, by (key id, requests per minute, burst). An entry idle for two
    /// minutes is dropped: its bucket would be full again anyway (see [`key_quota`]).
    per_key: moka::sync::Cache<(String, u32, u32), std::sync::Arc<Direct>>,
    per_ip: Keyed<IpAddr>,
    ip_policy: IpPolicy,
    auth_failures: Keyed<IpAddr>,
    /// IPs whose failed-authentication budget ran out, and until when.
    blocked: moka::sync::Cache<IpAddr, Instant>,
    /// The latest `until` ever put in `blocked`, as nanoseconds after `started`: once that is
    /// past, no address can be blocked, and [`Limits::ip_blocked`] answers without a cache
    /// read (a moka read records itself for the eviction policy; this is one atomic load on
    /// every keyed request).
    block_horizon: AtomicU64,
    started: Instant,
    client_ip: ClientIpPolicy,
}

impl Limits {
    pub fn new(
        tiers: Tiers,
        ip: IpPolicy,
        auth_failures: IpPolicy,
        client_ip: ClientIpPolicy,
    ) -> Limits {
        let per_tier = tiers
            .names()
            .filter_map(|n| tiers.get(n))
            .filter(|t| !t.unlimited)
            .map(|t| {
                (
                    t.name.clone(),
                    (
                        RateLimiter::keyed(quota(t.requests_per_minute, t.burst))
                            .with_middleware::<StateInformationMiddleware>(),
                        PolicyHeaders::new(&t.name, t.requests_per_minute),
                    ),
                )
            })
            .collect();
        Limits {
            tiers,
            shared: None,
            degraded: AtomicBool::new(false),
            per_tier,
            per_key: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(120))
                .build(),
            per_ip: RateLimiter::keyed(quota(ip.per_minute, ip.burst))
                .with_middleware::<StateInformationMiddleware>(),
            ip_policy: ip,
            auth_failures: RateLimiter::keyed(quota(auth_failures.per_minute, auth_failures.burst))
                .with_middleware::<StateInformationMiddleware>(),
            blocked: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(300))
                .build(),
            block_horizon: AtomicU64::new(0),
            started: Instant::now(),
            client_ip,
        }
    }

    pub fn tiers(&self) -> &Tiers {
        &self.tiers
    }

    /// Makes the account and key limits global through Redis.
    pub fn with_shared(
        mut self,
        limiter: redis::RedisLimiter,
        on_failure: OnSharedFailure,
    ) -> Limits {
        self.shared = Some((limiter, on_failure));
        self
    }

    pub fn shared(&self) -> Option<&redis::RedisLimiter> {
        self.shared.as_ref().map(|(l, _)| l)
    }

    /// For readiness: `None` without a shared store; else whether Redis answers now, and what
    /// the checks do while it does not.
    pub async fn shared_health(&self) -> Option<(bool, OnSharedFailure)> {
        let (limiter, on_failure) = self.shared.as_ref()?;
        Some((limiter.ping().await, *on_failure))
    }

    /// The request's checks: the key's own limit (if any), then the account's tier limit —
    /// shared through Redis when configured (falling back as configured when it cannot
    /// answer), else in memory. Returns the binding decision; `Ok(None)` when nothing limits
    /// this request (an unlimited tier and no key limit); `Err` only when Redis is down and
    /// the operator chose to refuse.
    pub async fn check<'a>(
        &'a self,
        who: Subject<'_>,
        tier: &'a Tier,
    ) -> Result<Option<Decision<'a>>, crate::http::problem::ApiError> {
        if tier.unlimited && who.key_rate_limit.is_none() {
            return Ok(None);
        }
        if self.shared.is_some() {
            // Boxed: the Redis round trip's future is large, and every keyed request's
            // future (allocated and moved by actix per request) would carry its size even
            // when no shared store is configured.
            return Box::pin(self.check_shared(who, tier)).await;
        }
        Ok(self.check_local(who, tier))
    }

    /// [`Limits::check`] with the shared store configured.
    async fn check_shared<'a>(
        &'a self,
        who: Subject<'_>,
        tier: &'a Tier,
    ) -> Result<Option<Decision<'a>>, crate::http::problem::ApiError> {
        if let Some((shared, on_failure)) = &self.shared {
            match shared.check(who, tier).await {
                Ok(d) => {
                    if self.degraded.swap(false, Ordering::Relaxed) {
                        tracing::info!("Redis rate limiter answering again");
                    }
                    let rendered = self.per_tier.get(&tier.name).map(|(_, h)| h);
                    return Ok(d.map(|d| Decision { rendered, ..d }));
                }
                Err(e) => {
                    if !self.degraded.swap(true, Ordering::Relaxed) {
                        tracing::warn!(error = %e, fallback = ?on_failure, "Redis rate limiter unavailable");
                    }
                    if *on_failure == OnSharedFailure::Refuse {
                        return Err(crate::http::problem::ApiError::problem(
                            crate::http::problem::ProblemType::RateLimiterUnavailable,
                            "Rate limiting is temporarily unavailable; retry shortly.",
                        ));
                    }
                }
            }
        }
        Ok(self.check_local(who, tier))
    }

    /// The in-memory checks. The key's own limit goes first: a request it refuses never
    /// reaches (nor spends) the account's budget.
    pub fn check_local<'a>(&'a self, who: Subject<'_>, tier: &'a Tier) -> Option<Decision<'a>> {
        let key = who.key_rate_limit.map(|rl| {
            let (rpm, burst) = key_quota(rl, tier);
            let limiter = self
                .per_key
                .get_with((who.key_id.to_owned(), rpm, burst), || {
                    std::sync::Arc::new(
                        RateLimiter::direct(quota(rpm, burst))
                            .with_middleware::<StateInformationMiddleware>(),
                    )
                });
            decision(limiter.check(), KEY_POLICY, rpm, None)
        });
        if let Some(k) = key.as_ref().filter(|k| !k.allowed) {
            return Some(k.clone());
        }
        let account = (!tier.unlimited)
            .then(|| match self.per_tier.get(&tier.name) {
                Some((limiter, headers)) => Some((limiter, Some(headers))),
                // Its headers name the default tier, not this one: rendered per response.
                None => self
                    .per_tier
                    .get(crate::tiers::DEFAULT_TIER)
                    .map(|(limiter, _)| (limiter, None)),
            })
            .flatten()
            .map(|(limiter, headers)| {
                decide(
                    limiter,
                    &who.account_id,
                    &tier.name,
                    tier.requests_per_minute,
                    headers,
                )
            });
        match (key, account) {
            (Some(k), Some(a)) => Some(binding(a, k)),
            (k, a) => k.or(a),
        }
    }

    pub fn check_ip(&self, ip: IpAddr) -> Decision<'static> {
        decide(
            &self.per_ip,
            &limit_key(ip),
            "ip",
            self.ip_policy.per_minute,
            None,
        )
    }

    /// Seconds to wait if this IP has used up its failed-authentication budget.
    ///
    /// The horizon check is exact, not a heuristic: every block is inserted after the horizon
    /// has been raised to cover it (see [`Limits::note_auth_failure_from`]), so while any
    /// block is still running `now` is below the horizon and the cache is consulted as before.
    pub fn ip_blocked(&self, ip: IpAddr) -> Option<u64> {
        let now = Instant::now();
        if self.nanos_since_start(now) >= self.block_horizon.load(Ordering::Acquire) {
            return None;
        }
        let until = self.blocked.get(&limit_key(ip))?;
        (until > now).then(|| ceil_secs(until - now).max(1))
    }

    fn nanos_since_start(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.started).as_nanos()).unwrap_or(u64::MAX)
    }

    pub fn note_auth_failure_from(&self, ip: IpAddr) {
        let key = limit_key(ip);
        if let Err(not_until) = self.auth_failures.check_key(&key) {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            let until = Instant::now() + wait;
            // Horizon first, then the entry: a reader that sees the entry sees the horizon.
            self.block_horizon
                .fetch_max(self.nanos_since_start(until), Ordering::AcqRel);
            self.blocked.insert(key, until);
            tracing::warn!(client_ip = %ip, wait_s = wait.as_secs(), "too many failed authentications; throttling this address");
        }
    }

    pub fn note_auth_failure(&self, req: &HttpRequest) {
        if let Some(ip) = self.client_ip(req) {
            self.note_auth_failure_from(ip);
        }
    }

    /// The client's address: the TCP peer, or — with `KEYMETER_TRUST_FORWARDED=true` — the
    /// rightmost `X-Forwarded-For` hop that is not one of our proxies (see [`client_ip`]).
    pub fn client_ip(&self, req: &HttpRequest) -> Option<IpAddr> {
        let peer = req.peer_addr()?.ip();
        const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
        let xff = req.headers().get_all(XFF).filter_map(|v| v.to_str().ok());
        Some(self.client_ip.resolve(peer, xff))
    }

    /// Drops limiter state of keys and addresses not seen recently.
    pub fn housekeeping(&self) {
        for (l, _) in self.per_tier.values() {
            l.retain_recent();
            l.shrink_to_fit();
        }
        self.per_key.run_pending_tasks();
        self.per_ip.retain_recent();
        self.per_ip.shrink_to_fit();
        self.auth_failures.retain_recent();
        self.auth_failures.shrink_to_fit();
        self.blocked.run_pending_tasks();
    }

    pub async fn run_housekeeping(&self, stop: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = tick.tick() => self.housekeeping(),
                () = stop.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::new(
            Tiers::builtin(),
            IpPolicy {
                per_minute: 60,
                burst: 3,
            },
            IpPolicy {
                per_minute: 6,
                burst: 2,
            },
            ClientIpPolicy::default(),
        )
    }

    fn who(account: u128, key_id: &str, key_rate_limit: Option<u32>) -> Subject<'_> {
        Subject {
            account_id: Uuid::from_u128(account),
            key_id,
            key_rate_limit,
        }
    }

    #[test]
    fn the_free_tier_allows_its_burst_then_refuses_with_retry_after() {
        let l = limits();
        let free = l.tiers().get("free").unwrap().clone();
        for i in 0..5 {
            let d = l.check_local(who(1, "k1", None), &free).unwrap();
            assert!(d.allowed, "request {i}");
            assert_eq!(d.remaining, 4 - i);
        }
        let d = l.check_local(who(1, "k1", None), &free).unwrap();
        assert!(!d.allowed);
        assert_eq!(d.retry_after_secs, 6, "10/min = one every 6 s");
        // Another key of the same account shares its budget; another account has its own.
        assert!(!l.check_local(who(1, "k2", None), &free).unwrap().allowed);
        assert!(l.check_local(who(2, "k3", None), &free).unwrap().allowed);
    }

    #[test]
    fn a_keys_own_limit_binds_first_and_spares_the_accounts_budget() {
        let l = limits();
        let pro = l.tiers().get("pro").unwrap().clone();
        for i in 0..3 {
            let d = l.check_local(who(1, "slow", Some(3)), &pro).unwrap();
            assert!(d.allowed, "request {i}");
            assert_eq!((d.policy, d.limit), (KEY_POLICY, 3));
        }
        let d = l.check_local(who(1, "slow", Some(3)), &pro).unwrap();
        assert!(!d.allowed);
        assert_eq!(d.policy, KEY_POLICY);
        assert_eq!(d.retry_after_secs, 20, "3/min = one every 20 s");
        // The refused fourth request did not spend the account's burst of 30: the three
        // allowed ones and this one leave 26.
        let d = l.check_local(who(1, "other", None), &pro).unwrap();
        assert_eq!((d.policy, d.remaining), ("pro", 26));
    }

    #[test]
    fn internal_is_unlimited() {
        let l = limits();
        let internal = l.tiers().get("internal").unwrap().clone();
        for _ in 0..10_000 {
            assert!(l.check_local(who(1, "k", None), &internal).is_none());
        }
        // …unless a key carries its own limit.
        assert!(
            l.check_local(who(1, "k", Some(1)), &internal)
                .unwrap()
                .allowed
        );
        assert!(
            !l.check_local(who(1, "k", Some(1)), &internal)
                .unwrap()
                .allowed
        );
    }

    #[test]
    fn repeated_auth_failures_block_the_address() {
        let l = limits();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(l.ip_blocked(ip).is_none());
        for _ in 0..3 {
            l.note_auth_failure_from(ip);
        }
        assert!(l.ip_blocked(ip).is_some());
        assert!(l.ip_blocked("192.0.2.2".parse().unwrap()).is_none());
    }

    #[test]
    fn headers_follow_the_draft() {
        let pro = PolicyHeaders::new("pro", 120);
        let other_rate = PolicyHeaders::new("pro", 60);
        let other_name = PolicyHeaders::new("business", 120);
        // Pre-rendered or not (or rendered for another policy), the same headers.
        for rendered in [None, Some(&pro), Some(&other_rate), Some(&other_name)] {
            let d = Decision {
                allowed: true,
                policy: "pro",
                limit: 120,
                remaining: 29,
                reset_secs: 1,
                retry_after_secs: 0,
                rendered,
            };
            let mut h = HeaderMap::new();
            d.write_headers(&mut h);
            assert_eq!(h.get("ratelimit-policy").unwrap(), "\"pro\";q=120;w=60");
            assert_eq!(h.get("ratelimit").unwrap(), "\"pro\";r=29;t=1");
            assert_eq!(h.get("x-ratelimit-limit").unwrap(), "120");
            assert_eq!(h.get("x-ratelimit-remaining").unwrap(), "29");
            assert_eq!(h.get("x-ratelimit-reset").unwrap(), "1");
        }
        let mut buf = [0u8; 20];
        for n in [0, 7, 10, 4_294_967_295, u64::MAX] {
            assert_eq!(decimal(n, &mut buf), n.to_string().as_bytes());
        }
        // A name that cannot be in a header leaves its two headers out, as before.
        let d = Decision {
            allowed: true,
            policy: "bad\nname",
            limit: 5,
            remaining: 4,
            reset_secs: 12,
            retry_after_secs: 0,
            rendered: None,
        };
        let mut h = HeaderMap::new();
        d.write_headers(&mut h);
        assert!(h.get("ratelimit-policy").is_none() && h.get("ratelimit").is_none());
        assert_eq!(h.get("x-ratelimit-reset").unwrap(), "12");
    }
}
