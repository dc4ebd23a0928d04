//! The outbound guard: scrape jobs fetch URLs that customers choose, so every connection the
//! fetcher makes must go to a public address and never to this machine, our network, or a
//! cloud metadata service (169.254.169.254 hands out credentials to whoever asks).
//!
//! Why it is shaped this way:
//!
//! - **The address that was checked is the address that is connected to.** Checking a name
//!   and then letting the HTTP client resolve it again is the DNS-rebinding hole: the
//!   attacker's name answers with a public address for the check and with 127.0.0.1 for the
//!   connection. [`VettingResolver`] is installed as reqwest's resolver, so the only addresses
//!   reqwest can ever connect to are the ones this module just vetted, from one lookup.
//!   IP-literal hosts never reach a resolver (hyper connects to the literal), so
//!   [`Guard::check`] vets those itself before the request is sent.
//! - **A name is refused if any of its addresses is refused**, rather than filtering: a name
//!   with one public and one private record would otherwise still reach the private one when
//!   the public one fails to connect.
//! - **Every redirect hop goes through the same check** (the fetcher follows redirects itself).
//! - **The allow-list is exact `host:port` pairs** and exists for tests and development
//!   (`KEYMETER_SCRAPE_ALLOW`): production refuses to configure it. reqwest hands a resolver
//!   only the host name, not the port, so for a *name* on the allow-list the port is enforced
//!   here in [`Guard::check`] (which resolves and vets the name itself when the port is not the
//!   allowed one) and the resolver lets that name through. Names that are not on the list —
//!   every name, in production — are vetted by the resolver alone.
//! - **Through an HTTP proxy** the proxy resolves the target, not us. [`Guard::check`] then
//!   resolves and vets the name itself before the request (best effort: the proxy's own lookup
//!   could differ, so a proxy on our own network should refuse private destinations too), and
//!   the resolver lets the proxy's own host through.
//! - Ports are not restricted: public sites on :8080 are legitimate targets, and what makes a
//!   destination dangerous is its address, not its port.
//!
//! A refusal is a [`UrlNotAllowed`], never a network error, so a job can tell "we refused"
//! from "the site is down".

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::{Host, Url};

/// The guard refused a URL or an address. `reason` is safe to show to the customer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("URL not allowed: {reason}")]
pub struct UrlNotAllowed {
    pub reason: String,
}

impl UrlNotAllowed {
    fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }
}

/// Why an IP address may not be fetched from, or `None` when it is publicly routable.
///
/// The ranges are IANA's special-purpose registries (RFC 6890 and successors). IPv6 addresses
/// that embed an IPv4 address a connection would end up at — IPv4-mapped (`::ffff:a.b.c.d`),
/// NAT64 (`64:ff9b::/96`) and 6to4 (`2002::/16`) — are judged by that IPv4 address.
pub fn refused_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => refused_v4(v4),
        IpAddr::V6(v6) => refused_v6(v6),
    }
}

/// `(network, prefix length, description)`, most specific first where they overlap.
const V4_REFUSED: &[(u32, u32, &str)] = &[
    (0x0000_0000, 32, "unspecified (0.0.0.0)"),
    (0x0000_0000, 8, "\"this network\" (0.0.0.0/8)"),
    (0x0A00_0000, 8, "private (10.0.0.0/8)"),
    (0x6440_0000, 10, "carrier-grade NAT (100.64.0.0/10)"),
    (0x7F00_0000, 8, "loopback (127.0.0.0/8)"),
    (0xA9FE_0000, 16, "link-local (169.254.0.0/16)"),
    (0xAC10_0000, 12, "private (172.16.0.0/12)"),
    (0xC000_0000, 24, "IETF protocol assignments (192.0.0.0/24)"),
    (0xC000_0200, 24, "documentation (192.0.2.0/24)"),
    (0xC058_6300, 24, "6to4 relay anycast (192.88.99.0/24)"),
    (0xC0A8_0000, 16, "private (192.168.0.0/16)"),
    (0xC612_0000, 15, "benchmarking (198.18.0.0/15)"),
    (0xC633_6400, 24, "documentation (198.51.100.0/24)"),
    (0xCB00_7100, 24, "documentation (203.0.113.0/24)"),
    (0xE000_0000, 4, "multicast (224.0.0.0/4)"),
    (0xFFFF_FFFF, 32, "broadcast (255.255.255.255)"),
    (0xF000_0000, 4, "reserved (240.0.0.0/4)"),
];

fn refused_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let n = u32::from(ip);
    V4_REFUSED
        .iter()
        .find(|(net, len, _)| n >> (32 - len) == net >> (32 - len))
        .map(|(_, _, why)| *why)
}

const V6_REFUSED: &[(u128, u32, &str)] = &[
    (0, 128, "unspecified (::)"),
    (1, 128, "loopback (::1)"),
    (
        0x0064_ff9b_0001_0000_0000_0000_0000_0000,
        48,
        "local-use NAT64 (64:ff9b:1::/48)",
    ),
    (0, 96, "IPv4-compatible, deprecated (::/96)"),
    (
        0x0100_0000_0000_0000_0000_0000_0000_0000,
        64,
        "discard-only (100::/64)",
    ),
    (
        0x2001_0000_0000_0000_0000_0000_0000_0000,
        32,
        "Teredo (2001::/32)",
    ),
    (
        0x2001_0db8_0000_0000_0000_0000_0000_0000,
        32,
        "documentation (2001:db8::/32)",
    ),
    (
        0x2001_0000_0000_0000_0000_0000_0000_0000,
        23,
        "IETF protocol assignments (2001::/23)",
    ),
    (
        0x3fff_0000_0000_0000_0000_0000_0000_0000,
        20,
        "documentation (3fff::/20)",
    ),
    (
        0xfc00_0000_0000_0000_0000_0000_0000_0000,
        7,
        "unique local (fc00::/7)",
    ),
    (
        0xfe80_0000_0000_0000_0000_0000_0000_0000,
        10,
        "link-local (fe80::/10)",
    ),
    (
        0xfec0_0000_0000_0000_0000_0000_0000_0000,
        10,
        "site-local, deprecated (fec0::/10)",
    ),
    (
        0xff00_0000_0000_0000_0000_0000_0000_0000,
        8,
        "multicast (ff00::/8)",
    ),
];

fn refused_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let n = u128::from(ip);
    let in_net = |net: u128, len: u32| n >> (128 - len) == net >> (128 - len);

    // Forms a connection would deliver to an IPv4 address: judge that address. (A refused
    // embedded address gets its own, more useful, description.)
    let embedded = if in_net(0xffff_0000_0000, 96) {
        Some(("IPv4-mapped", Ipv4Addr::from(n as u32)))
    } else if in_net(0x0064_ff9b_0000_0000_0000_0000_0000_0000, 96) {
        Some(("NAT64", Ipv4Addr::from(n as u32)))
    } else if in_net(0x2002_0000_0000_0000_0000_0000_0000_0000, 16) {
        Some(("6to4", Ipv4Addr::from((n >> 80) as u32)))
    } else {
        None
    };
    if let Some((form, v4)) = embedded {
        return refused_v4(v4).map(|_| match form {
            "IPv4-mapped" => "IPv4-mapped form of a refused IPv4 address (::ffff:0:0/96)",
            "NAT64" => "NAT64 form of a refused IPv4 address (64:ff9b::/96)",
            _ => "6to4 form of a refused IPv4 address (2002::/16)",
        });
    }

    if let Some((_, _, why)) = V6_REFUSED.iter().find(|(net, len, _)| in_net(*net, *len)) {
        return Some(why);
    }
    // Only 2000::/3 is allocated for global unicast; everything else is reserved.
    if !in_net(0x2000_0000_0000_0000_0000_0000_0000_0000, 3) {
        return Some("reserved, not global unicast (outside 2000::/3)");
    }
    None
}

/// Refuses `ip` unless it is publicly routable.
pub fn check_ip(ip: IpAddr) -> Result<(), UrlNotAllowed> {
    match refused_range(ip) {
        None => Ok(()),
        Some(range) => Err(UrlNotAllowed::new(format!(
            "{ip} is not a public address: {range}"
        ))),
    }
}

/// Exact `host:port` pairs that bypass the address check. For tests and development only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    /// `host:port`, host lower-case, IPv6 in brackets (see `authority`).
    pairs: HashSet<String>,
    /// Host names (not IP literals) that appear in `pairs`, with any port.
    names: HashSet<String>,
}

impl fmt::Debug for AllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut pairs: Vec<&String> = self.pairs.iter().collect();
        pairs.sort();
        f.debug_tuple("AllowList").field(&pairs).finish()
    }
}

/// The allow-list entry that failed to parse, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid allow-list entry {entry:?}: {problem}")]
pub struct AllowListError {
    pub entry: String,
    pub problem: &'static str,
}

impl AllowList {
    /// An empty list: every URL is checked. What production uses.
    pub fn none() -> Self {
        Self::default()
    }

    /// Parses a comma-separated list of `host:port` (the `KEYMETER_SCRAPE_ALLOW` format),
    /// e.g. `127.0.0.1:8080,localhost:3000,[::1]:9000`. Every entry needs an explicit port.
    pub fn parse(list: &str) -> Result<Self, AllowListError> {
        let mut allow = Self::default();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let err = |problem| AllowListError {
                entry: entry.to_owned(),
                problem,
            };
            if entry.contains(['/', '@', '?', '#']) {
                return Err(err("expected host:port, not a URL"));
            }
            let url = Url::parse(&format!("http://{entry}")).map_err(|_| err("not host:port"))?;
            if url.port().is_none() && !entry.ends_with(":80") {
                return Err(err("a port is required, e.g. 127.0.0.1:8080"));
            }
            let (Some(host), Some(port)) = (url.host(), url.port_or_known_default()) else {
                return Err(err("not host:port"));
            };
            allow.insert(&host, port);
        }
        Ok(allow)
    }

    fn insert(&mut self, host: &Host<&str>, port: u16) {
        if let Host::Domain(name) = host {
            self.names.insert(name.to_ascii_lowercase());
        }
        self.pairs.insert(authority(host, port));
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// Whether `url`'s exact host and port are on the list.
    pub fn allows(&self, url: &Url) -> bool {
        match (url.host(), url.port_or_known_default()) {
            (Some(host), Some(port)) => self.pairs.contains(&authority(&host, port)),
            _ => false,
        }
    }
}

fn authority(host: &Host<&str>, port: u16) -> String {
    match host {
        Host::Domain(d) => format!("{}:{port}", d.to_ascii_lowercase()),
        Host::Ipv4(ip) => format!("{ip}:{port}"),
        Host::Ipv6(ip) => format!("[{ip}]:{port}"),
    }
}

/// Checks URLs before each request; owns the resolver the HTTP client connects through.
#[derive(Debug, Clone)]
pub struct Guard {
    allow: AllowList,
    /// When requests go through a proxy, the proxy resolves targets, so the guard must.
    proxied: bool,
    resolver: Arc<VettingResolver>,
}

impl Guard {
    /// `proxy_host`: the host of the configured HTTP proxy, if any; the resolver lets it
    /// through (an operator's proxy may well live on a private address).
    pub fn new(allow: AllowList, proxy_host: Option<&str>) -> Self {
        let mut trusted = allow.names.clone();
        if let Some(h) = proxy_host {
            trusted.insert(h.trim_matches(['[', ']']).to_ascii_lowercase());
        }
        Self {
            allow,
            proxied: proxy_host.is_some(),
            resolver: Arc::new(VettingResolver { trusted }),
        }
    }

    /// The resolver to install with `reqwest::ClientBuilder::dns_resolver`.
    pub fn resolver(&self) -> Arc<VettingResolver> {
        Arc::clone(&self.resolver)
    }

    /// The checks that need no DNS: scheme, host present, no embedded credentials, and the
    /// address when the host is an IP literal. Cheap enough for a route to call on input.
    pub fn check_syntax(&self, url: &Url) -> Result<(), UrlNotAllowed> {
        match url.scheme() {
            "http" | "https" => {}
            other => {
                return Err(UrlNotAllowed::new(format!(
                    "only http and https URLs can be fetched, not {other}:"
                )))
            }
        }
        if !url.username().is_empty() || url.password().is_some() {
            // They would travel as a Basic header to whatever host a redirect names, and
            // the URL is stored with the job and logged.
            return Err(UrlNotAllowed::new(
                "URLs with embedded credentials (user:password@) are not accepted",
            ));
        }
        let Some(host) = url.host() else {
            return Err(UrlNotAllowed::new("the URL has no host"));
        };
        if self.allow.allows(url) {
            return Ok(());
        }
        match host {
            Host::Ipv4(ip) => check_ip(IpAddr::V4(ip)),
            Host::Ipv6(ip) => check_ip(IpAddr::V6(ip)),
            Host::Domain(_) => Ok(()),
        }
    }

    /// Everything [`Guard::check_syntax`] checks, plus a DNS lookup of host names whenever
    /// the resolver will not be the one to vet them (see the module doc). Called before every
    /// request, including each redirect hop.
    pub async fn check(&self, url: &Url) -> Result<(), GuardError> {
        self.check_syntax(url)?;
        if self.allow.allows(url) {
            return Ok(());
        }
        if let Some(Host::Domain(name)) = url.host() {
            let trusted_name = self.resolver.trusted.contains(&name.to_ascii_lowercase());
            if self.proxied || trusted_name {
                vetted_lookup(name).await?;
            }
        }
        Ok(())
    }
}

impl Guard {
    /// Like [`Guard::check`], and also resolves a host name the resolver would vet later,
    /// so a name pointing at a private address is refused before a job is created (and
    /// charged). The connection is still vetted again at connect time (DNS may change).
    pub async fn precheck(&self, url: &Url) -> Result<(), GuardError> {
        self.check(url).await?;
        if self.allow.allows(url) || self.proxied {
            return Ok(());
        }
        if let Some(Host::Domain(name)) = url.host() {
            if !self.resolver.trusted.contains(&name.to_ascii_lowercase()) {
                vetted_lookup(name).await?;
            }
        }
        Ok(())
    }
}

/// reqwest's resolver for the fetcher: one lookup, every address vetted, only vetted
/// addresses returned. A refusal travels up reqwest's error chain as a [`UrlNotAllowed`].
#[derive(Debug)]
pub struct VettingResolver {
    /// Names whose addresses are not vetted: allow-listed names (their port is enforced by
    /// [`Guard::check`]) and the proxy's host.
    trusted: HashSet<String>,
}

impl Resolve for VettingResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let name = name.as_str().to_ascii_lowercase();
        let trusted = self.trusted.contains(&name);
        Box::pin(async move {
            let result = if trusted {
                lookup(&name).await
            } else {
                vetted_lookup(&name).await
            };
            // The bare error, not the enum, goes up reqwest's chain: the fetcher finds it
            // there by downcasting.
            let addrs: Addrs = match result {
                Ok(addrs) => Box::new(addrs.into_iter()),
                Err(GuardError::NotAllowed(e)) => return Err(Box::new(e) as _),
                Err(GuardError::Dns(e)) => return Err(Box::new(e) as _),
            };
            Ok(addrs)
        })
    }
}

/// A host name that could not be resolved: the site is unreachable, not forbidden.
#[derive(Debug, thiserror::Error)]
#[error("could not resolve {name}: {source}")]
pub struct DnsError {
    pub name: String,
    #[source]
    pub source: std::io::Error,
}

/// What [`Guard::check`] can report.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error(transparent)]
    NotAllowed(#[from] UrlNotAllowed),
    #[error(transparent)]
    Dns(#[from] DnsError),
}

/// getaddrinfo on tokio's blocking pool (`lookup_host`), so a slow DNS server never stalls
/// an async worker thread.
async fn lookup(name: &str) -> Result<Vec<SocketAddr>, GuardError> {
    let dns_error = |source| DnsError {
        name: name.to_owned(),
        source,
    };
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name, 0))
        .await
        .map_err(dns_error)?
        .collect();
    if addrs.is_empty() {
        return Err(dns_error(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no addresses",
        ))
        .into());
    }
    Ok(addrs)
}

/// What a refusal of a *name* says: that it resolves somewhere we do not fetch from, in
/// general terms. Never the address or its range: the customer would learn our internal DNS
/// (which names exist inside, and where they point) one refused job at a time. An IP literal
/// the customer (or a site's redirect) wrote is named with its range (see [`check_ip`]): that
/// tells them nothing they did not send.
pub const NAME_NOT_PUBLIC: &str = "resolves to a non-public (private or reserved) address";

/// Resolves `name` and refuses it if any address is not public.
async fn vetted_lookup(name: &str) -> Result<Vec<SocketAddr>, GuardError> {
    let addrs = lookup(name).await?;
    for a in &addrs {
        if let Some(range) = refused_range(a.ip()) {
            // Operators may need the address; only the log gets it.
            tracing::debug!(%name, address = %a.ip(), range, "refused a name resolving to a non-public address");
            return Err(UrlNotAllowed::new(format!("{name} {NAME_NOT_PUBLIC}")).into());
        }
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests;
