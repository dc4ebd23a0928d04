//! Fetching a customer's URL: one shared HTTP client, redirects followed by hand through the
//! outbound guard, a body cap, and errors the job runner can settle on.
//!
//! Why it is shaped this way:
//!
//! - **One `reqwest::Client` for the process** ([`Fetcher`]): it owns the connection pool and
//!   the TLS configuration, both costly to rebuild per job. Its resolver is the guard's
//!   [`VettingResolver`](super::ssrf::VettingResolver), so it can only connect to vetted
//!   addresses; reqwest's own redirect handling is off (it would follow a `Location` to
//!   169.254.169.254 without asking), and so is the system proxy from the environment (a
//!   proxy resolves names itself, around the guard). Only HTTP/1.1 is compiled in.
//! - **The body is streamed and cut at a cap** (5 MiB by default) rather than refused: a page
//!   that is too long still has a usable head, and the customer was charged for a fetch that
//!   worked. Nothing beyond the cap is read, so a 50 GiB response costs 5 MiB of memory.
//! - **One deadline for the whole fetch** — every hop, DNS, connect, headers and body — so a
//!   job holds a worker for at most the time it was given.
//! - **Customers may set a few request headers, no more** ([`CustomerHeaders`]): `Accept`,
//!   `Accept-Language` (content negotiation), `Cookie` (consent walls, sessions the customer
//!   owns) and `Referer`. The rest stay ours: `User-Agent` identifies us to sites, `Host`,
//!   framing and `Proxy-*` headers would let a request smuggle itself elsewhere, and
//!   `X-Forwarded-*` could borrow trust a site gives its own proxies. `Cookie` is dropped when a
//!   redirect leaves the origin, as browsers and reqwest do.
//! - **[`classify`] is the settlement rule in one place**: what the customer pays for, what is
//!   refunded, and what the upstream's circuit breaker counts against it.
//! - The proxy URL may carry credentials: it is a [`SecretString`] in the configuration, and
//!   `Fetcher`'s `Debug` shows only its scheme, host and port.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, COOKIE, LOCATION};
use reqwest::redirect::Policy;
use reqwest::{Proxy, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use url::Url;

use super::ssrf::{AllowList, DnsError, Guard, GuardError, UrlNotAllowed};

/// Longest URL accepted, in bytes (a common server limit; a longer one is not a web page).
pub const MAX_URL_LEN: usize = 8 * 1024;

/// Settings for the one [`Fetcher`] the process builds.
#[derive(Debug, Clone)]
pub struct FetcherConfig {
    pub user_agent: String,
    pub connect_timeout: Duration,
    /// Bytes of body kept; the rest is not read and the result is marked `truncated`.
    pub max_body_bytes: usize,
    /// Redirects followed before giving up with [`FetchError::TooManyRedirects`].
    pub max_redirects: usize,
    /// `http://[user:password@]host:port` or `https://…` (`KEYMETER_PROXY_URL`).
    pub proxy_url: Option<SecretString>,
    /// `host:port` pairs exempt from the address check; tests and development only.
    pub allow: AllowList,
}

impl Default for FetcherConfig {
    fn default() -> Self {
        Self {
            user_agent: concat!("keymeter/", env!("CARGO_PKG_VERSION")).to_owned(),
            connect_timeout: Duration::from_secs(10),
            max_body_bytes: 5 * 1024 * 1024,
            max_redirects: 5,
            proxy_url: None,
            allow: AllowList::none(),
        }
    }
}

/// Why a [`Fetcher`] could not be built. Never echoes the proxy URL (it may hold a password).
#[derive(Debug, thiserror::Error)]
pub enum FetcherBuildError {
    #[error("proxy URL: {0}")]
    Proxy(&'static str),
    #[error("user agent is not a valid header value")]
    UserAgent,
    #[error("could not build the HTTP client: {0}")]
    Client(String),
}

/// A fetch that failed, in classes the job runner can settle on (see [`classify`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// The guard refused the URL or an address it resolves to (also a redirect target).
    #[error(transparent)]
    NotAllowed(#[from] UrlNotAllowed),
    #[error("invalid URL: {0}")]
    InvalidUrl(String),
    #[error("more than {max} redirects")]
    TooManyRedirects { max: usize },
    /// The fetch's deadline or the connect timeout ran out.
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("DNS lookup failed: {0}")]
    Dns(String),
    #[error("could not connect: {0}")]
    Connect(String),
    #[error("TLS error: {0}")]
    Tls(String),
    /// The connection failed after it was made: reset, closed mid-answer, malformed HTTP.
    #[error("network error: {0}")]
    Network(String),
}

impl From<GuardError> for FetchError {
    fn from(e: GuardError) -> Self {
        match e {
            GuardError::NotAllowed(e) => FetchError::NotAllowed(e),
            GuardError::Dns(e) => FetchError::Dns(e.to_string()),
        }
    }
}

/// One redirect followed: the URL that answered with it, and its status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedirectHop {
    pub url: String,
    pub status: u16,
}

/// A response, after redirects.
#[derive(Clone)]
pub struct Fetched {
    /// The URL that gave this answer (the last hop).
    pub url: Url,
    pub status: u16,
    /// The `Content-Type` header as sent, if it was readable text.
    pub content_type: Option<String>,
    pub body: Bytes,
    /// The body was longer than the cap and was cut there.
    pub truncated: bool,
    /// Redirects followed to get here, in order.
    pub redirects: Vec<RedirectHop>,
}

impl fmt::Debug for Fetched {
    // The body can be megabytes: its size says enough in a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fetched")
            .field("url", &self.url.as_str())
            .field("status", &self.status)
            .field("content_type", &self.content_type)
            .field("body_len", &self.body.len())
            .field("truncated", &self.truncated)
            .field("redirects", &self.redirects)
            .finish()
    }
}

/// Request headers a customer may set.
pub const ALLOWED_HEADERS: &[&str] = &["accept", "accept-language", "cookie", "referer"];
const MAX_CUSTOMER_HEADERS: usize = 16;
const MAX_CUSTOMER_HEADER_BYTES: usize = 8 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("header {0:?} cannot be set; allowed: Accept, Accept-Language, Cookie, Referer")]
    NotAllowed(String),
    #[error("header {0} has an invalid value (control characters are not allowed)")]
    InvalidValue(String),
    #[error("too many headers: at most {MAX_CUSTOMER_HEADERS}, {MAX_CUSTOMER_HEADER_BYTES} bytes in total")]
    TooLarge,
}

/// Validated customer request headers; only [`CustomerHeaders::new`] makes them, so a
/// header outside [`ALLOWED_HEADERS`] can never reach an upstream.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct CustomerHeaders(HeaderMap);

impl fmt::Debug for CustomerHeaders {
    // Cookie values are the customer's sessions: names only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries(self.0.keys().map(HeaderName::as_str))
            .finish()
    }
}

impl CustomerHeaders {
    pub fn none() -> Self {
        Self::default()
    }

    /// Checks names against [`ALLOWED_HEADERS`] (case-insensitively), values for control
    /// characters, and the total size. Repeated names are all sent.
    pub fn new<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, HeaderError> {
        let mut map = HeaderMap::new();
        let (mut count, mut bytes) = (0usize, 0usize);
        for (name, value) in pairs {
            count += 1;
            bytes += name.len() + value.len();
            if count > MAX_CUSTOMER_HEADERS || bytes > MAX_CUSTOMER_HEADER_BYTES {
                return Err(HeaderError::TooLarge);
            }
            let lower = name.trim().to_ascii_lowercase();
            if !ALLOWED_HEADERS.contains(&lower.as_str()) {
                return Err(HeaderError::NotAllowed(name.to_owned()));
            }
            let name = HeaderName::from_bytes(lower.as_bytes())
                .map_err(|_| HeaderError::NotAllowed(lower.clone()))?;
            let value = HeaderValue::from_str(value.trim())
                .map_err(|_| HeaderError::InvalidValue(lower.clone()))?;
            map.append(name, value);
        }
        Ok(Self(map))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The process's HTTP client for scrape jobs. Build it once and share it (it is cheap to
/// clone: the client and guard are reference-counted).
#[derive(Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    guard: Guard,
    max_body_bytes: usize,
    max_redirects: usize,
    user_agent: String,
    /// `scheme://host:port` of the proxy, for `Debug`: never the credentials.
    proxy_display: Option<String>,
}

impl fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fetcher")
            .field("user_agent", &self.user_agent)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_redirects", &self.max_redirects)
            .field("proxy", &self.proxy_display)
            .field("guard", &self.guard)
            .finish_non_exhaustive()
    }
}

impl Fetcher {
    pub fn new(config: FetcherConfig) -> Result<Self, FetcherBuildError> {
        let user_agent =
            HeaderValue::from_str(&config.user_agent).map_err(|_| FetcherBuildError::UserAgent)?;

        let mut proxy = None;
        let mut proxy_display = None;
        let mut proxy_host = None;
        if let Some(secret) = &config.proxy_url {
            let raw = secret.expose_secret();
            let url = Url::parse(raw)
                .map_err(|_| FetcherBuildError::Proxy("not a valid URL (http://host:port)"))?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(FetcherBuildError::Proxy(
                    "only http:// and https:// proxies",
                ));
            }
            let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
                return Err(FetcherBuildError::Proxy("the URL has no host"));
            };
            proxy_display = Some(format!("{}://{host}:{port}", url.scheme()));
            proxy_host = Some(host.to_owned());
            // reqwest takes user:password from the URL and sends it as Proxy-Authorization.
            proxy =
                Some(Proxy::all(raw).map_err(|_| FetcherBuildError::Proxy("reqwest refused it"))?);
        }

        let guard = Guard::new(config.allow, proxy_host.as_deref());
        let builder = reqwest::Client::builder()
            .user_agent(user_agent)
            .connect_timeout(config.connect_timeout)
            .redirect(Policy::none())
            .referer(false)
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(4)
            .dns_resolver(guard.resolver());
        let builder = match proxy {
            Some(p) => builder.proxy(p),
            None => builder.no_proxy(),
        };
        let client = builder
            .build()
            .map_err(|e| FetcherBuildError::Client(e.to_string()))?;
        Ok(Self {
            client,
            guard,
            max_body_bytes: config.max_body_bytes,
            max_redirects: config.max_redirects,
            user_agent: config.user_agent,
            proxy_display,
        })
    }

    /// The egress path jobs take, naming its circuit breaker: `direct`, or the proxy's
    /// `scheme://host:port` (never its credentials).
    pub fn provider(&self) -> String {
        self.proxy_display
            .clone()
            .unwrap_or_else(|| "direct".to_owned())
    }

    /// Resolves the URL's host and refuses it if any address is off limits, so submission can
    /// refuse it before charging. A DNS failure is not a refusal (the job then fails and is
    /// refunded).
    pub async fn precheck(&self, url: &Url) -> Result<(), UrlNotAllowed> {
        match self.guard.precheck(url).await {
            Err(GuardError::NotAllowed(e)) => Err(e),
            _ => Ok(()),
        }
    }

    /// Parses a customer's URL and runs the checks that need no network, so a route can
    /// refuse it before charging anything.
    pub fn validate(&self, input: &str) -> Result<Url, FetchError> {
        if input.len() > MAX_URL_LEN {
            return Err(FetchError::InvalidUrl(format!(
                "longer than {MAX_URL_LEN} bytes"
            )));
        }
        let url = Url::parse(input.trim()).map_err(|e| FetchError::InvalidUrl(e.to_string()))?;
        self.guard.check_syntax(&url)?;
        Ok(url)
    }

    /// GETs `url`, following up to `max_redirects` redirects, every hop checked by the guard,
    /// all within `total_timeout`.
    pub async fn fetch(
        &self,
        url: &Url,
        total_timeout: Duration,
        headers: &CustomerHeaders,
    ) -> Result<Fetched, FetchError> {
        match tokio::time::timeout(total_timeout, self.follow(url.clone(), headers)).await {
            Ok(result) => result,
            Err(_) => Err(FetchError::Timeout(format!(
                "no complete answer within {total_timeout:?}"
            ))),
        }
    }

    async fn follow(&self, mut url: Url, headers: &CustomerHeaders) -> Result<Fetched, FetchError> {
        let mut headers = headers.0.clone();
        let mut redirects = Vec::new();
        loop {
            self.guard.check(&url).await?;
            let response = self
                .client
                .get(url.clone())
                .headers(headers.clone())
                .send()
                .await
                .map_err(map_reqwest_error)?;
            let status = response.status();

            if let Some(location) = redirect_location(status, response.headers()) {
                if redirects.len() >= self.max_redirects {
                    return Err(FetchError::TooManyRedirects {
                        max: self.max_redirects,
                    });
                }
                let next = location.and_then(|l| url.join(l).ok()).ok_or_else(|| {
                    FetchError::InvalidUrl("a redirect's Location is not a valid URL".into())
                })?;
                if next.origin() != url.origin() {
                    headers.remove(COOKIE);
                }
                redirects.push(RedirectHop {
                    url: url.to_string(),
                    status: status.as_u16(),
                });
                url = next;
                continue;
            }

            let content_type = response
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let (body, truncated) = read_capped(response, self.max_body_bytes).await?;
            return Ok(Fetched {
                url,
                status: status.as_u16(),
                content_type,
                body,
                truncated,
                redirects,
            });
        }
    }
}

/// `Some(location)` when the response is a redirect to follow; the inner `None` when its
/// `Location` is not readable text. A 3xx without `Location` (300, 304) is a final answer.
fn redirect_location(status: StatusCode, headers: &HeaderMap) -> Option<Option<&str>> {
    let followed = matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308);
    let location = headers.get(LOCATION)?;
    followed.then(|| location.to_str().ok())
}

/// Reads at most `cap` bytes of body. Past the cap nothing more is read and the connection
/// is dropped with the response.
async fn read_capped(
    mut response: reqwest::Response,
    cap: usize,
) -> Result<(Bytes, bool), FetchError> {
    let expected = response.content_length().unwrap_or(0);
    let mut body = BytesMut::with_capacity(expected.min(cap as u64) as usize);
    while let Some(chunk) = response.chunk().await.map_err(map_reqwest_error)? {
        let room = cap - body.len();
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            return Ok((body.freeze(), true));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((body.freeze(), false))
}

/// Sorts a reqwest error into a [`FetchError`]. The guard's refusals and DNS failures come
/// back from inside reqwest's connector (the resolver raised them), so the error chain is
/// searched for them; TLS failures are recognised by rustls's error type.
fn map_reqwest_error(e: reqwest::Error) -> FetchError {
    let mut cause: Option<&(dyn StdError + 'static)> = Some(&e);
    while let Some(err) = cause {
        // TLS failures arrive as a rustls error inside an io::Error, sometimes inside another
        // io::Error, and io::Error's `source()` skips the error it wraps: unwrap by hand.
        let mut candidate = Some(err);
        while let Some(c) = candidate {
            if let Some(refusal) = c.downcast_ref::<UrlNotAllowed>() {
                return FetchError::NotAllowed(refusal.clone());
            }
            if let Some(dns) = c.downcast_ref::<DnsError>() {
                return FetchError::Dns(dns.to_string());
            }
            if let Some(tls) = c.downcast_ref::<rustls::Error>() {
                return FetchError::Tls(tls.to_string());
            }
            candidate = c
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .map(|inner| inner as &(dyn StdError + 'static));
        }
        cause = err.source();
    }

    let (timeout, connect, builder) = (e.is_timeout(), e.is_connect(), e.is_builder());
    let detail = error_chain(&e.without_url());
    if timeout {
        FetchError::Timeout(detail)
    } else if connect {
        FetchError::Connect(detail)
    } else if builder {
        FetchError::InvalidUrl(detail)
    } else {
        FetchError::Network(detail)
    }
}

/// `outer: inner: innermost`, skipping a message its parent already contains.
fn error_chain(e: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cause = Some(e);
    while let Some(err) = cause {
        let text = err.to_string();
        if !parts.last().is_some_and(|p| p.contains(&text)) {
            parts.push(text);
        }
        cause = err.source();
    }
    parts.join(": ")
}

/// Why a fetch is refunded. Stable names: stored with jobs and shown to customers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureReason {
    /// The guard refused the URL or a redirect target.
    NotAllowed,
    InvalidUrl,
    TooManyRedirects,
    Timeout,
    Dns,
    Connect,
    Tls,
    Network,
    /// 5xx.
    ServerError,
    /// 429.
    RateLimited,
    /// 401, 403, 407, 451: the site refused us.
    Blocked,
    /// Any other final status: a 3xx without `Location`, or a 4xx other than 404/410.
    UnexpectedStatus,
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            FailureReason::NotAllowed => "not_allowed",
            FailureReason::InvalidUrl => "invalid_url",
            FailureReason::TooManyRedirects => "too_many_redirects",
            FailureReason::Timeout => "timeout",
            FailureReason::Dns => "dns",
            FailureReason::Connect => "connect",
            FailureReason::Tls => "tls",
            FailureReason::Network => "network",
            FailureReason::ServerError => "server_error",
            FailureReason::RateLimited => "rate_limited",
            FailureReason::Blocked => "blocked",
            FailureReason::UnexpectedStatus => "unexpected_status",
        };
        f.write_str(s)
    }
}

/// How a fetch settles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// The site gave a real answer: the customer keeps paying for it.
    Usable,
    /// Refunded. `counts_as_breaker_failure`: the upstream looked unhealthy (could not be
    /// reached, too slow, 5xx or 429), as opposed to refusing this one request.
    Failed {
        reason: FailureReason,
        counts_as_breaker_failure: bool,
    },
}

impl Outcome {
    pub fn is_usable(&self) -> bool {
        matches!(self, Outcome::Usable)
    }

    fn failed(reason: FailureReason, counts_as_breaker_failure: bool) -> Self {
        Outcome::Failed {
            reason,
            counts_as_breaker_failure,
        }
    }
}

/// The settlement rule. Usable: 2xx, and 404/410 (a definitive "there is no such page" is
/// an answer the customer asked for). Everything else is refunded. The breaker counts only
/// what says the upstream is unwell: failing to reach it, timeouts, 5xx and 429 (and 408,
/// its own timeout). A TLS failure is not counted: a bad certificate is a property of the
/// site, not a sign of load, and no retry later will fix it. Whom a counted failure is
/// held against (the account, the origin, the egress provider) and when a timeout counts at
/// all is the breakers' rule: `breaker::Breakers::signal`.
pub fn classify(result: &Result<Fetched, FetchError>) -> Outcome {
    use FailureReason as R;
    match result {
        Ok(f) => match f.status {
            200..=299 | 404 | 410 => Outcome::Usable,
            429 => Outcome::failed(R::RateLimited, true),
            408 => Outcome::failed(R::Timeout, true),
            500..=599 => Outcome::failed(R::ServerError, true),
            401 | 403 | 407 | 451 => Outcome::failed(R::Blocked, false),
            _ => Outcome::failed(R::UnexpectedStatus, false),
        },
        Err(e) => match e {
            FetchError::NotAllowed(_) => Outcome::failed(R::NotAllowed, false),
            FetchError::InvalidUrl(_) => Outcome::failed(R::InvalidUrl, false),
            FetchError::TooManyRedirects { .. } => Outcome::failed(R::TooManyRedirects, false),
            FetchError::Tls(_) => Outcome::failed(R::Tls, false),
            FetchError::Timeout(_) => Outcome::failed(R::Timeout, true),
            FetchError::Dns(_) => Outcome::failed(R::Dns, true),
            FetchError::Connect(_) => Outcome::failed(R::Connect, true),
            FetchError::Network(_) => Outcome::failed(R::Network, true),
        },
    }
}

#[cfg(test)]
mod tests;
