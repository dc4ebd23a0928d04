use super::*;

fn refused(ip: &str) -> bool {
    refused_range(ip.parse().expect("test IPs parse")).is_some()
}

#[test]
fn every_refused_ipv4_range_is_refused() {
    for ip in [
        "0.0.0.0",
        "0.1.2.3",
        "10.0.0.1",
        "10.255.255.255",
        "100.64.0.1",
        "100.127.255.254",
        "127.0.0.1",
        "127.255.0.9",
        "169.254.169.254",
        "172.16.0.1",
        "172.31.255.255",
        "192.0.0.8",
        "192.0.2.1",
        "192.88.99.1",
        "192.168.1.1",
        "198.18.0.1",
        "198.19.255.255",
        "198.51.100.7",
        "203.0.113.9",
        "224.0.0.1",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
    ] {
        assert!(refused(ip), "{ip} should be refused");
    }
}

#[test]
fn public_ipv4_addresses_pass_including_range_neighbours() {
    for ip in [
        "1.1.1.1",
        "8.8.8.8",
        "9.255.255.255",
        "11.0.0.0",
        "100.63.255.255",
        "100.128.0.0",
        "126.255.255.255",
        "128.0.0.0",
        "169.253.255.255",
        "172.15.255.255",
        "172.32.0.0",
        "192.0.3.1",
        "192.167.255.255",
        "192.169.0.0",
        "198.17.255.255",
        "198.20.0.0",
        "223.255.255.255",
    ] {
        assert!(!refused(ip), "{ip} should pass");
    }
}

#[test]
fn the_reason_names_the_range() {
    assert_eq!(
        refused_range("169.254.169.254".parse().expect("ip")),
        Some("link-local (169.254.0.0/16)")
    );
    assert_eq!(
        refused_range("255.255.255.255".parse().expect("ip")),
        Some("broadcast (255.255.255.255)")
    );
    let e = check_ip("10.0.0.1".parse().expect("ip")).expect_err("private");
    assert!(e.reason.contains("10.0.0.0/8"), "{e}");
}

#[test]
fn every_refused_ipv6_range_is_refused() {
    for ip in [
        "::",
        "::1",
        "fe80::1",
        "febf:ffff::1",
        "fec0::1",
        "fc00::1",
        "fd12:3456::1",
        "ff02::1",
        "ff0e::1",
        "2001:db8::1",
        "2001::1",      // Teredo
        "2001:2::1",    // benchmarking, in 2001::/23
        "3fff::1",      // documentation (RFC 9637)
        "100::1",       // discard-only
        "64:ff9b:1::1", // local-use NAT64
        "::1.2.3.4",    // IPv4-compatible (deprecated) even for a public v4
        "4000::1",      // outside 2000::/3
        "::ffff:0:1.2.3.4",
    ] {
        assert!(refused(ip), "{ip} should be refused");
    }
}

#[test]
fn ipv4_mapped_nat64_and_6to4_forms_follow_their_ipv4_address() {
    for ip in [
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "::ffff:192.168.0.1",
        "::ffff:100.64.0.1",
        "::ffff:0.0.0.0",
        "::ffff:255.255.255.255",
        "64:ff9b::127.0.0.1",
        "64:ff9b::a9fe:a9fe", // 169.254.169.254
        "2002:7f00:1::1",     // 6to4 of 127.0.0.1
        "2002:a00:1::",       // 6to4 of 10.0.0.1
    ] {
        assert!(refused(ip), "{ip} should be refused");
    }
    for ip in ["::ffff:1.1.1.1", "64:ff9b::808:808", "2002:808:808::1"] {
        assert!(!refused(ip), "{ip} should pass");
    }
    assert_eq!(
        refused_range("::ffff:127.0.0.1".parse().expect("ip")),
        Some("IPv4-mapped form of a refused IPv4 address (::ffff:0:0/96)")
    );
}

#[test]
fn public_ipv6_addresses_pass() {
    for ip in [
        "2606:4700:4700::1111",
        "2a00:1450:4001:80b::200e",
        "2001:4860::8888",
    ] {
        assert!(!refused(ip), "{ip} should pass");
    }
}

fn url(s: &str) -> Url {
    Url::parse(s).expect("test URLs parse")
}

#[test]
fn only_http_and_https_without_credentials() {
    let g = Guard::new(AllowList::none(), None);
    for bad in [
        "ftp://example.com/",
        "file:///etc/passwd",
        "gopher://example.com/",
        "http://user:pw@example.com/",
        "http://user@example.com/",
    ] {
        assert!(g.check_syntax(&url(bad)).is_err(), "{bad}");
    }
    assert!(g.check_syntax(&url("https://example.com/")).is_ok());
    assert!(g.check_syntax(&url("http://example.com:8080/x")).is_ok());
}

#[test]
fn ip_literals_in_any_spelling_are_checked_without_dns() {
    let g = Guard::new(AllowList::none(), None);
    for bad in [
        "http://127.0.0.1/",
        "http://2130706433/", // 127.0.0.1 as one number
        "http://0x7f.1/",
        "http://0/",
        "http://[::1]/",
        "http://[::ffff:169.254.169.254]/",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1:8080/",
    ] {
        let e = g.check_syntax(&url(bad)).expect_err(bad);
        assert!(e.reason.contains("not a public address"), "{bad}: {e}");
    }
    assert!(g.check_syntax(&url("http://93.184.215.14/")).is_ok());
}

#[test]
fn the_allow_list_is_exact_host_and_port() {
    let allow = AllowList::parse("127.0.0.1:8080, localhost:3000,[::1]:9000").expect("parses");
    let g = Guard::new(allow, None);
    assert!(g.check_syntax(&url("http://127.0.0.1:8080/x")).is_ok());
    assert!(g.check_syntax(&url("http://[::1]:9000/")).is_ok());
    assert!(g.check_syntax(&url("http://127.0.0.1:8081/")).is_err());
    assert!(g.check_syntax(&url("http://127.0.0.2:8080/")).is_err());
    assert!(g.check_syntax(&url("http://[::1]:9001/")).is_err());
}

#[test]
fn allow_list_entries_need_a_port() {
    assert!(AllowList::parse("127.0.0.1").is_err());
    assert!(AllowList::parse("http://127.0.0.1:80/").is_err());
    assert!(AllowList::parse("a b:1").is_err());
    assert!(AllowList::parse("").expect("empty is fine").is_empty());
    let l = AllowList::parse("Example.COM:80").expect("explicit default port");
    assert!(l.allows(&url("http://example.com/")));
}

#[tokio::test]
async fn an_allow_listed_name_on_another_port_is_resolved_and_refused() {
    let g = Guard::new(AllowList::parse("localhost:3000").expect("parses"), None);
    assert!(g.check(&url("http://localhost:3000/")).await.is_ok());
    let e = g
        .check(&url("http://localhost:3001/"))
        .await
        .expect_err("other port");
    assert!(
        matches!(&e, GuardError::NotAllowed(r) if r.reason == format!("localhost {NAME_NOT_PUBLIC}")),
        "{e}"
    );
}

#[tokio::test]
async fn the_resolver_refuses_names_that_resolve_to_refused_addresses() {
    let g = Guard::new(AllowList::none(), None);
    let name: Name = "localhost".parse().expect("valid name");
    let err = match g.resolver().resolve(name).await {
        Ok(_) => panic!("localhost must be refused"),
        Err(e) => e,
    };
    let refusal = err
        .downcast_ref::<UrlNotAllowed>()
        .expect("a typed refusal");
    assert_eq!(refusal.reason, format!("localhost {NAME_NOT_PUBLIC}"));
}

#[tokio::test]
async fn the_resolver_lets_allow_listed_and_proxy_names_through() {
    let g = Guard::new(
        AllowList::parse("localhost:3000").expect("parses"),
        Some("proxy.internal"),
    );
    let name: Name = "localhost".parse().expect("valid name");
    let addrs: Vec<SocketAddr> = match g.resolver().resolve(name).await {
        Ok(a) => a.collect(),
        Err(e) => panic!("allow-listed name refused: {e}"),
    };
    assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
    assert!(g.resolver.trusted.contains("proxy.internal"));
}
