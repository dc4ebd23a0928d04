use super::*;
use crate::jobs::test_server::{Reply, TestServer};
use std::net::SocketAddr;
use std::time::Instant;

const T: Duration = Duration::from_secs(10);

fn fetcher_allowing(servers: &[&TestServer]) -> Fetcher {
    let list: Vec<String> = servers.iter().map(|s| s.addr.to_string()).collect();
    Fetcher::new(FetcherConfig {
        allow: AllowList::parse(&list.join(",")).expect("allow-list parses"),
        ..FetcherConfig::default()
    })
    .expect("fetcher builds")
}

fn url(s: &str) -> Url {
    Url::parse(s).expect("test URLs parse")
}

fn none() -> CustomerHeaders {
    CustomerHeaders::none()
}

#[tokio::test]
async fn fetches_a_page_with_status_type_and_body() {
    let server =
        TestServer::start(|_, _| Reply::html("<html><title>Hi</title><p>hello</p></html>")).await;
    let f = fetcher_allowing(&[&server]);
    let page = f
        .fetch(&url(&server.url("/page")), T, &none())
        .await
        .expect("fetched");
    assert_eq!(page.status, 200);
    assert_eq!(
        page.content_type.as_deref(),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(
        &page.body[..],
        b"<html><title>Hi</title><p>hello</p></html>"
    );
    assert!(!page.truncated);
    assert!(page.redirects.is_empty());
    assert_eq!(page.url.as_str(), server.url("/page"));
    assert_eq!(classify(&Ok(page)), Outcome::Usable);
}

#[tokio::test]
async fn sends_our_user_agent_and_only_the_customers_allowed_headers() {
    let server = TestServer::start(|_, _| Reply::html("ok")).await;
    let f = fetcher_allowing(&[&server]);
    let headers = CustomerHeaders::new([("Accept-Language", "de-CH"), ("cookie", "consent=yes")])
        .expect("allowed");
    f.fetch(&url(&server.url("/")), T, &headers)
        .await
        .expect("fetched");
    let head = server
        .request_heads()
        .pop()
        .expect("one request")
        .to_lowercase();
    assert!(head.contains("user-agent: keymeter/"), "{head}");
    assert!(head.contains("accept-language: de-ch"), "{head}");
    assert!(head.contains("cookie: consent=yes"), "{head}");
}

#[test]
fn customers_cannot_set_other_headers() {
    for name in [
        "User-Agent",
        "Host",
        "Authorization",
        "X-Forwarded-For",
        "Proxy-Authorization",
        "Transfer-Encoding",
        "Content-Length",
    ] {
        assert_eq!(
            CustomerHeaders::new([(name, "x")]),
            Err(HeaderError::NotAllowed(name.to_owned())),
            "{name}"
        );
    }
    assert!(matches!(
        CustomerHeaders::new([("Referer", "a\r\nHost: evil")]),
        Err(HeaderError::InvalidValue(_))
    ));
    let many: Vec<(&str, &str)> = (0..17).map(|_| ("Accept", "*/*")).collect();
    assert_eq!(CustomerHeaders::new(many), Err(HeaderError::TooLarge));
    let h = CustomerHeaders::new([("Cookie", "session=secret")]).expect("allowed");
    assert!(!format!("{h:?}").contains("secret"));
}

/// `/r/N` redirects to `/r/N-1` (relative), `/r/0` is the page.
fn redirect_chain(path: &str, _: SocketAddr) -> Reply {
    match path.strip_prefix("/r/").and_then(|n| n.parse::<u32>().ok()) {
        Some(0) => Reply::html("<title>end</title>"),
        Some(n) => Reply::redirect(if n % 2 == 0 { 301 } else { 302 }, &format!("{}", n - 1)),
        None => Reply::status(404, "no"),
    }
}

#[tokio::test]
async fn follows_a_redirect_chain_resolving_relative_locations() {
    let server = TestServer::start(redirect_chain).await;
    let f = fetcher_allowing(&[&server]);
    let page = f
        .fetch(&url(&server.url("/r/3")), T, &none())
        .await
        .expect("fetched");
    assert_eq!(page.status, 200);
    assert_eq!(page.url.as_str(), server.url("/r/0"));
    let hops: Vec<(String, u16)> = page
        .redirects
        .iter()
        .map(|h| (h.url.clone(), h.status))
        .collect();
    assert_eq!(
        hops,
        vec![
            (server.url("/r/3"), 302),
            (server.url("/r/2"), 301),
            (server.url("/r/1"), 302)
        ]
    );
}

#[tokio::test]
async fn five_redirects_are_followed_and_a_sixth_is_refused() {
    let server = TestServer::start(redirect_chain).await;
    let f = fetcher_allowing(&[&server]);
    let page = f
        .fetch(&url(&server.url("/r/5")), T, &none())
        .await
        .expect("five hops are fine");
    assert_eq!(page.redirects.len(), 5);
    let result = f.fetch(&url(&server.url("/r/6")), T, &none()).await;
    assert_eq!(
        result.as_ref().err(),
        Some(&FetchError::TooManyRedirects { max: 5 })
    );
    assert_eq!(
        classify(&result),
        Outcome::failed(FailureReason::TooManyRedirects, false)
    );
}

#[tokio::test]
async fn redirects_to_refused_addresses_are_not_followed() {
    let other = TestServer::start(|_, _| Reply::html("secret")).await;
    let other_addr = other.addr;
    let server = TestServer::start(move |path, _| match path {
        "/to-other-port" => Reply::redirect(302, &format!("http://{other_addr}/")),
        "/to-metadata" => Reply::redirect(302, "http://169.254.169.254/latest/meta-data/iam/"),
        "/to-private" => Reply::redirect(307, "http://10.0.0.1/admin"),
        "/to-mapped" => Reply::redirect(308, "http://[::ffff:127.0.0.1]/"),
        "/to-localhost-name" => {
            Reply::redirect(302, &format!("http://localhost:{}/", other_addr.port()))
        }
        "/to-file" => Reply::redirect(302, "file:///etc/passwd"),
        _ => Reply::status(404, "no"),
    })
    .await;
    // Only the first server is allow-listed.
    let f = fetcher_allowing(&[&server]);
    for (path, expect) in [
        ("/to-other-port", "loopback"),
        ("/to-metadata", "169.254.0.0/16"),
        ("/to-private", "10.0.0.0/8"),
        ("/to-mapped", "IPv4-mapped"),
        ("/to-localhost-name", "localhost resolves to a non-public"),
        ("/to-file", "only http and https"),
    ] {
        let result = f.fetch(&url(&server.url(path)), T, &none()).await;
        match &result {
            Err(FetchError::NotAllowed(e)) => {
                assert!(e.reason.contains(expect), "{path}: {}", e.reason)
            }
            other => panic!("{path}: expected a refusal, got {other:?}"),
        }
        assert_eq!(
            classify(&result),
            Outcome::failed(FailureReason::NotAllowed, false)
        );
    }
    assert!(
        other.request_heads().is_empty(),
        "the refused server was reached"
    );
}

#[tokio::test]
async fn the_resolver_refuses_a_name_at_connect_time() {
    // No pre-check resolves `localhost` here: the refusal can only come from the
    // resolver reqwest connects through, carried up reqwest's error chain.
    let server = TestServer::start(|_, _| Reply::html("secret")).await;
    let f = Fetcher::new(FetcherConfig::default()).expect("builds");
    let result = f
        .fetch(
            &url(&format!("http://localhost:{}/", server.addr.port())),
            T,
            &none(),
        )
        .await;
    match result {
        Err(FetchError::NotAllowed(e)) => {
            assert!(e.reason.contains("resolves to a non-public"), "{e}");
            assert!(
                !e.reason.contains("127.0.0.1") && !e.reason.contains("::1"),
                "{e}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(server.request_heads().is_empty());
}

#[tokio::test]
async fn an_allow_listed_name_is_fetched_through_the_resolver() {
    let server = TestServer::start(|_, _| Reply::html("dev page")).await;
    let f = Fetcher::new(FetcherConfig {
        allow: AllowList::parse(&format!("localhost:{}", server.addr.port())).expect("ok"),
        ..FetcherConfig::default()
    })
    .expect("builds");
    let page = f
        .fetch(
            &url(&format!("http://localhost:{}/", server.addr.port())),
            T,
            &none(),
        )
        .await
        .expect("allow-listed");
    assert_eq!(&page.body[..], b"dev page");
}

#[tokio::test]
async fn cookies_do_not_follow_a_redirect_to_another_origin() {
    let other = TestServer::start(|_, _| Reply::html("other")).await;
    let other_addr = other.addr;
    let server = TestServer::start(move |path, _| match path {
        "/same" => Reply::redirect(302, "/final"),
        "/away" => Reply::redirect(302, &format!("http://{other_addr}/")),
        _ => Reply::html("final"),
    })
    .await;
    let f = fetcher_allowing(&[&server, &other]);
    let cookie = CustomerHeaders::new([("Cookie", "sid=1")]).expect("allowed");
    f.fetch(&url(&server.url("/same")), T, &cookie)
        .await
        .expect("fetched");
    let heads = server.request_heads();
    assert!(
        heads[1].to_lowercase().contains("cookie: sid=1"),
        "{heads:?}"
    );
    f.fetch(&url(&server.url("/away")), T, &cookie)
        .await
        .expect("fetched");
    let away = other.request_heads().pop().expect("reached").to_lowercase();
    assert!(!away.contains("cookie"), "{away}");
}

#[tokio::test]
async fn a_slow_page_hits_the_deadline() {
    let server = TestServer::start(|_, _| Reply::HeadersThenStall).await;
    let f = fetcher_allowing(&[&server]);
    let started = Instant::now();
    let result = f
        .fetch(&url(&server.url("/")), Duration::from_millis(300), &none())
        .await;
    assert!(matches!(result, Err(FetchError::Timeout(_))), "{result:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        classify(&result),
        Outcome::failed(FailureReason::Timeout, true)
    );
}

#[tokio::test]
async fn a_reset_connection_is_a_network_failure() {
    let server = TestServer::start(|_, _| Reply::Reset).await;
    let f = fetcher_allowing(&[&server]);
    let result = f.fetch(&url(&server.url("/")), T, &none()).await;
    assert!(matches!(result, Err(FetchError::Network(_))), "{result:?}");
    assert_eq!(
        classify(&result),
        Outcome::failed(FailureReason::Network, true)
    );
}

#[tokio::test]
async fn a_closed_port_is_a_connect_failure() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let f = Fetcher::new(FetcherConfig {
        allow: AllowList::parse(&addr.to_string()).expect("ok"),
        ..FetcherConfig::default()
    })
    .expect("builds");
    let result = f.fetch(&url(&format!("http://{addr}/")), T, &none()).await;
    assert!(matches!(result, Err(FetchError::Connect(_))), "{result:?}");
    assert_eq!(
        classify(&result),
        Outcome::failed(FailureReason::Connect, true)
    );
}

#[tokio::test]
async fn tls_to_a_plain_http_server_is_a_tls_failure() {
    // A server that answers a ClientHello with plain HTTP: rustls sees a corrupt record.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = stream
                .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                .await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let f = Fetcher::new(FetcherConfig {
        allow: AllowList::parse(&addr.to_string()).expect("ok"),
        ..FetcherConfig::default()
    })
    .expect("builds");
    let result = f.fetch(&url(&format!("https://{addr}/")), T, &none()).await;
    assert!(matches!(result, Err(FetchError::Tls(_))), "{result:?}");
    assert_eq!(
        classify(&result),
        Outcome::failed(FailureReason::Tls, false)
    );
}

#[tokio::test]
async fn a_huge_body_is_cut_at_the_cap_without_reading_the_rest() {
    const LEN: u64 = 50 * 1024 * 1024;
    let server = TestServer::start(|_, _| Reply::Huge { len: LEN }).await;
    let f = fetcher_allowing(&[&server]);
    let page = f
        .fetch(&url(&server.url("/big")), Duration::from_secs(30), &none())
        .await
        .expect("fetched");
    assert_eq!(page.body.len(), 5 * 1024 * 1024);
    assert!(page.truncated);
    assert_eq!(classify(&Ok(page)), Outcome::Usable);
    // Once we stop reading, the server can only fill the socket buffers, then its writes
    // fail: it never gets to send the whole 50 MiB.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = server.written();
    assert!(sent < LEN / 2, "server wrote {sent} bytes");
}

#[tokio::test]
async fn a_body_exactly_at_the_cap_is_not_truncated() {
    let server = TestServer::start(|_, _| Reply::Page {
        status: 200,
        headers: vec![],
        body: vec![b'x'; 1000],
    })
    .await;
    let f = Fetcher::new(FetcherConfig {
        max_body_bytes: 1000,
        allow: AllowList::parse(&server.addr.to_string()).expect("ok"),
        ..FetcherConfig::default()
    })
    .expect("builds");
    let page = f
        .fetch(&url(&server.url("/")), T, &none())
        .await
        .expect("fetched");
    assert_eq!((page.body.len(), page.truncated), (1000, false));
}

#[tokio::test]
async fn statuses_settle_as_the_design_says() {
    let server = TestServer::start(|path, _| {
        let code = path.trim_start_matches('/').parse().unwrap_or(500);
        Reply::status(code, "x")
    })
    .await;
    let f = fetcher_allowing(&[&server]);
    for (code, expected) in [
        (200, Outcome::Usable),
        (204, Outcome::Usable),
        (404, Outcome::Usable),
        (410, Outcome::Usable),
        (500, Outcome::failed(FailureReason::ServerError, true)),
        (503, Outcome::failed(FailureReason::ServerError, true)),
        (429, Outcome::failed(FailureReason::RateLimited, true)),
        (403, Outcome::failed(FailureReason::Blocked, false)),
        (401, Outcome::failed(FailureReason::Blocked, false)),
        (400, Outcome::failed(FailureReason::UnexpectedStatus, false)),
        (304, Outcome::failed(FailureReason::UnexpectedStatus, false)),
    ] {
        let result = f
            .fetch(&url(&server.url(&format!("/{code}"))), T, &none())
            .await;
        assert_eq!(
            result.as_ref().map(|p| p.status).ok(),
            Some(code),
            "{result:?}"
        );
        assert_eq!(classify(&result), expected, "{code}");
    }
}

#[test]
fn validate_refuses_before_any_network() {
    let f = Fetcher::new(FetcherConfig::default()).expect("builds");
    assert!(matches!(
        f.validate("not a url"),
        Err(FetchError::InvalidUrl(_))
    ));
    assert!(matches!(
        f.validate("http://169.254.169.254/"),
        Err(FetchError::NotAllowed(_))
    ));
    assert!(matches!(
        f.validate("javascript:alert(1)"),
        Err(FetchError::NotAllowed(_))
    ));
    let long = format!("https://example.com/{}", "a".repeat(MAX_URL_LEN));
    assert!(matches!(f.validate(&long), Err(FetchError::InvalidUrl(_))));
    assert_eq!(
        f.validate(" https://example.com/a?b#c ")
            .expect("valid")
            .as_str(),
        "https://example.com/a?b#c"
    );
}

#[test]
fn proxy_credentials_never_show() {
    let f = Fetcher::new(FetcherConfig {
        proxy_url: Some(SecretString::from("http://user:hunter2@proxy.example:3128")),
        ..FetcherConfig::default()
    })
    .expect("builds");
    let dbg = format!("{f:?}");
    assert!(!dbg.contains("hunter2"), "{dbg}");
    assert!(dbg.contains("http://proxy.example:3128"), "{dbg}");
    let cfg = FetcherConfig {
        proxy_url: Some(SecretString::from("http://user:hunter2@proxy.example:3128")),
        ..FetcherConfig::default()
    };
    assert!(!format!("{cfg:?}").contains("hunter2"));

    for bad in ["socks5://u:hunter2@p:1080", "u:hunter2@nohost", "http://"] {
        let e = Fetcher::new(FetcherConfig {
            proxy_url: Some(SecretString::from(bad)),
            ..FetcherConfig::default()
        })
        .expect_err(bad);
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }
}

#[tokio::test]
async fn through_a_proxy_targets_are_still_vetted_and_errors_hide_credentials() {
    // A proxy that is not listening: the refusal must come before any connection, and a
    // connect failure to the proxy must not print its password.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let proxy_addr = listener.local_addr().expect("addr");
    drop(listener);
    let f = Fetcher::new(FetcherConfig {
        proxy_url: Some(SecretString::from(format!(
            "http://user:hunter2@{proxy_addr}"
        ))),
        ..FetcherConfig::default()
    })
    .expect("builds");
    let refused = f.fetch(&url("http://localhost/"), T, &none()).await;
    assert!(
        matches!(refused, Err(FetchError::NotAllowed(_))),
        "{refused:?}"
    );
    let failed = f.fetch(&url("http://93.184.215.14/"), T, &none()).await;
    let err = failed.expect_err("proxy is down");
    assert!(matches!(err, FetchError::Connect(_)), "{err:?}");
    assert!(!format!("{err} {err:?}").contains("hunter2"), "{err:?}");
}
