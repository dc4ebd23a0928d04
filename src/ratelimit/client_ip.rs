//! Which address a request counts against for the per-IP limits.
//!
//! Behind a proxy the TCP peer is the proxy, so the client is taken from `X-Forwarded-For`
//! (only with `KEYMETER_TRUST_FORWARDED=true`). Every hop in that header except the ones our
//! own proxies appended is whatever the client chose to send, so the client is the
//! *rightmost* hop that is not one of our proxies (`KEYMETER_TRUSTED_PROXIES`), never the
//! leftmost: otherwise a client that varies a made-up first hop gets a fresh budget per
//! request. `Forwarded: for=` is ignored for the same reason — the proxies we document set
//! `X-Forwarded-For`, so a `Forwarded` header reaching us is the client's own.
//!
//! An IPv6 client usually holds a whole /64 (one per home or VM) and can pick any address in
//! it, so IPv6 addresses are limited per /64; IPv4-mapped IPv6 addresses count as the IPv4
//! address they carry.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

/// How the client address is derived.
#[derive(Debug, Clone, Default)]
pub struct ClientIpPolicy {
    /// Read `X-Forwarded-For` at all.
    pub trust_forwarded: bool,
    /// Our own proxies. Empty: the TCP peer is the one proxy in front of us, and the rightmost
    /// hop is the client. Not empty: only a peer inside these sends a header we read, and hops
    /// inside these are skipped from the right.
    pub trusted_proxies: Vec<IpNet>,
}

impl ClientIpPolicy {
    fn is_proxy(&self, ip: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|n| n.contains(&ip))
    }

    /// The client address from the TCP peer and the `X-Forwarded-For` header values (in the
    /// order they arrived).
    pub fn resolve<'a>(
        &self,
        peer: IpAddr,
        forwarded_for: impl Iterator<Item = &'a str>,
    ) -> IpAddr {
        let peer = canonical(peer);
        if !self.trust_forwarded || (!self.trusted_proxies.is_empty() && !self.is_proxy(peer)) {
            // Not sent through one of our proxies: any header is the client's own.
            return peer;
        }
        let hops: Vec<&str> = forwarded_for
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .collect();
        // The nearest address known to be real so far, walking from us towards the client.
        let mut client = peer;
        for hop in hops.iter().rev() {
            let Some(ip) = parse_hop(hop) else {
                // Garbage where the client's address should be: count the request against
                // the last hop we trust rather than against something the client wrote.
                return client;
            };
            client = ip;
            if !self.is_proxy(ip) {
                return ip;
            }
        }
        client
    }
}

/// One `X-Forwarded-For` hop: an address, optionally with a port (`1.2.3.4:5`, `[::1]:5`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .map(canonical)
}

/// IPv4-mapped IPv6 as the IPv4 address it carries, so one client has one form.
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// What a per-IP limit is keyed by: the IPv4 address, or the /64 of an IPv6 address.
pub fn limit_key(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn policy(trusted: &[&str]) -> ClientIpPolicy {
        ClientIpPolicy {
            trust_forwarded: true,
            trusted_proxies: trusted.iter().map(|s| s.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn without_trust_the_peer_is_the_client() {
        let p = ClientIpPolicy::default();
        assert_eq!(
            p.resolve(ip("10.0.0.1"), ["203.0.113.9"].into_iter()),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn the_rightmost_untrusted_hop_is_the_client() {
        let p = policy(&["10.0.0.0/8"]);
        let xff = ["198.51.100.1, 203.0.113.7", "10.1.1.1"];
        assert_eq!(
            p.resolve(ip("10.0.0.2"), xff.into_iter()),
            ip("203.0.113.7")
        );
        // With no proxy list, the rightmost hop (what our one proxy saw) is the client.
        let p = policy(&[]);
        assert_eq!(
            p.resolve(ip("10.0.0.2"), ["198.51.100.1, 203.0.113.7"].into_iter()),
            ip("203.0.113.7")
        );
        // Ports and brackets are tolerated.
        assert_eq!(
            p.resolve(ip("10.0.0.2"), ["[2001:db8::1]:443"].into_iter()),
            ip("2001:db8::1")
        );
    }

    #[test]
    fn a_peer_outside_the_trusted_proxies_is_the_client() {
        let p = policy(&["10.0.0.0/8"]);
        assert_eq!(
            p.resolve(ip("192.0.2.5"), ["203.0.113.7"].into_iter()),
            ip("192.0.2.5")
        );
    }

    #[test]
    fn garbage_or_only_proxies_fall_back_to_the_nearest_trusted_hop() {
        let p = policy(&["10.0.0.0/8"]);
        assert_eq!(
            p.resolve(
                ip("10.0.0.2"),
                ["203.0.113.7, nonsense, 10.9.9.9"].into_iter()
            ),
            ip("10.9.9.9")
        );
        assert_eq!(
            p.resolve(ip("10.0.0.2"), std::iter::empty()),
            ip("10.0.0.2")
        );
    }

    #[test]
    fn ipv6_is_limited_per_64_and_mapped_ipv4_is_ipv4() {
        assert_eq!(limit_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            limit_key(ip("2001:db8:1:2::1")),
            limit_key(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"))
        );
        assert_ne!(
            limit_key(ip("2001:db8:1:2::1")),
            limit_key(ip("2001:db8:1:3::1"))
        );
        assert_eq!(limit_key(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
        assert_eq!(limit_key(ip("192.0.2.1")), ip("192.0.2.1"));
    }
}
