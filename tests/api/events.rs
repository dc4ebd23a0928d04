//! Account events and webhook endpoints (issue #16 §1): real local receivers over loopback,
//! the app's SSRF guard letting only them through.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use keymeter::config::Config;
use serde_json::{json, Value};
use sha2::Sha256;

use crate::support::app::{allow_scraping, spawn_jobs_app};
use crate::support::upstream::{black_hole, loopback, Delivery, Upstream};
use crate::support::{assert_problem, spawn_app_on, spawn_app_with, TestApp};

/// An app whose guard lets `allow` through, retrying failed deliveries after 100 ms.
async fn events_app(allow: &[String], customise: impl FnOnce(&mut Config)) -> TestApp {
    let allow = allow.to_vec();
    spawn_app_with(move |c| {
        allow_scraping(c, &allow);
        c.events.retry_base = Duration::from_millis(100);
        customise(c);
    })
    .await
}

async fn create_endpoint(app: &TestApp, key: &str, url: &str, events: &[&str]) -> Value {
    let res = app
        .post_json(
            "/v1/webhook-endpoints",
            key,
            json!({"url": url, "events": events}),
        )
        .await;
    assert_eq!(res.status(), 201, "create endpoint");
    res.json().await.unwrap()
}

/// The `v1` signatures of a `Keymeter-Signature` that verify with `secret`, as a receiver
/// following the README would check them: HMAC-SHA256 keyed with the secret as shown, over
/// `t.body`, hex.
fn matching_signatures(d: &Delivery, secret: &str) -> usize {
    let header = &d.headers["keymeter-signature"];
    let mut t = None;
    let mut sigs = Vec::new();
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = Some(v.to_owned()),
            Some(("v1", v)) => sigs.push(v.to_owned()),
            _ => panic!("unexpected part {part:?} in {header}"),
        }
    }
    let t = t.expect("a timestamp");
    let now = chrono::Utc::now().timestamp();
    assert!(
        (now - t.parse::<i64>().unwrap()).abs() < 300,
        "a fresh timestamp"
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(d.body.as_bytes());
    let want = hex::encode(mac.finalize().into_bytes());
    sigs.iter().filter(|s| **s == want).count()
}

/// Waits until `site` has received `n` deliveries (at most `within`).
async fn wait_for_hooks(site: &Upstream, n: usize, within: Duration) -> Vec<Delivery> {
    let deadline = Instant::now() + within;
    loop {
        let hooks = site.hooks();
        if hooks.len() >= n {
            return hooks;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} deliveries within {within:?}",
            hooks.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn create_key(app: &TestApp, key: &str, name: &str) -> Value {
    let res = app.post_json("/v1/keys", key, json!({"name": name})).await;
    assert_eq!(res.status(), 201, "create key");
    res.json().await.unwrap()
}

async fn grant(app: &TestApp, account: uuid::Uuid, amount: i64) -> reqwest::Response {
    app.admin_post(
        &format!("/admin/accounts/{account}/credits"),
        json!({"amount": amount, "reason": "test grant"}),
    )
    .await
}

async fn events_of(app: &TestApp, key: &str, query: &str) -> Value {
    let res = app.get_with_key(&format!("/v1/events{query}"), key).await;
    assert_eq!(res.status(), 200, "list events");
    res.json().await.unwrap()
}

#[tokio::test]
async fn a_delivery_arrives_within_two_seconds_signed_with_the_secret_shown_once() {
    let site = Upstream::start().await;
    let app = events_app(&site.allow(), |_| {}).await;
    let (account, key) = app.create_account("pro", 0).await;
    let ep = create_endpoint(&app, &key, &site.url("/hook"), &["key.created"]).await;
    let secret = ep["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"), "{secret}");
    assert!(ep["id"].as_str().unwrap().starts_with("we_"));

    let started = Instant::now();
    let created = create_key(&app, &key, "ci").await;
    let hooks = wait_for_hooks(&site, 1, Duration::from_secs(2)).await;
    assert!(started.elapsed() < Duration::from_secs(2));
    let d = &hooks[0];
    assert_eq!(matching_signatures(d, &secret), 1, "{:?}", d.headers);
    let event = d.event();
    assert_eq!(event["type"], "key.created");
    assert_eq!(event["account_id"], account.to_string());
    assert_eq!(event["data"]["key_id"], created["id"]);
    assert!(event["created_at"].is_string());
    let id = event["id"].as_str().unwrap();
    assert!(id.starts_with("evt_"));
    assert_eq!(d.headers["keymeter-event-id"], id);
    // Only what the endpoint subscribed to: a grant is not sent there.
    assert_eq!(grant(&app, account, 5).await.status(), 201);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(site.hooks().len(), 1);

    // The secret is never shown again, and never stored.
    let path = format!("/v1/webhook-endpoints/{}", ep["id"].as_str().unwrap());
    let got: Value = app.get_with_key(&path, &key).await.json().await.unwrap();
    assert_eq!(got["url"], site.url("/hook"));
    assert!(got.get("secret").is_none(), "{got}");
    let listed = app.get_with_key("/v1/webhook-endpoints", &key).await;
    assert!(!listed.text().await.unwrap().contains(&secret));
    let dump = app.dump_all_rows().await;
    assert!(
        !dump.contains(&secret[6..]),
        "the secret is in the database"
    );
}

#[tokio::test]
async fn during_a_rotation_both_secrets_sign_and_the_new_one_is_shown_once() {
    let site = Upstream::start().await;
    let app = events_app(&site.allow(), |_| {}).await;
    let (_, key) = app.create_account("pro", 0).await;
    let ep = create_endpoint(&app, &key, &site.url("/hook"), &["key.created"]).await;
    let old = ep["secret"].as_str().unwrap().to_owned();
    let id = ep["id"].as_str().unwrap();

    let res = app
        .post_json(
            &format!("/v1/webhook-endpoints/{id}/rotate-secret"),
            &key,
            json!({}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let rotated: Value = res.json().await.unwrap();
    let new = rotated["secret"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    assert!(rotated["previous_secret_expires_at"].is_string());

    create_key(&app, &key, "after rotation").await;
    let hooks = wait_for_hooks(&site, 1, Duration::from_secs(3)).await;
    let d = &hooks[0];
    assert_eq!(d.headers["keymeter-signature"].matches("v1=").count(), 2);
    assert_eq!(matching_signatures(d, &new), 1);
    assert_eq!(matching_signatures(d, &old), 1);
    // The new secret's signature comes first.
    let first_v1 = Delivery {
        headers: HashMap::from([(
            "keymeter-signature".to_owned(),
            d.headers["keymeter-signature"]
                .rsplit_once(',')
                .unwrap()
                .0
                .to_owned(),
        )]),
        ..d.clone()
    };
    assert_eq!(matching_signatures(&first_v1, &new), 1);

    // Once the overlap is over (moved into the past here), only the new secret signs.
    app.db
        .execute(
            "UPDATE webhook_endpoints SET previous_secret_expires_at = now() - interval '1 second'",
            &[],
        )
        .await
        .unwrap();
    create_key(&app, &key, "after the overlap").await;
    let hooks = wait_for_hooks(&site, 2, Duration::from_secs(3)).await;
    let d = &hooks[1];
    assert_eq!(d.headers["keymeter-signature"].matches("v1=").count(), 1);
    assert_eq!(matching_signatures(d, &new), 1);
    assert_eq!(matching_signatures(d, &old), 0);
}

#[tokio::test]
async fn a_500_is_retried_until_it_succeeds_with_the_same_event_id() {
    let site = Upstream::start().await;
    let app = events_app(&site.allow(), |_| {}).await;
    let (account, key) = app.create_account("pro", 0).await;
    let ep = create_endpoint(&app, &key, &site.url("/hook"), &["credits.granted"]).await;
    site.fail_next_hooks(2);
    assert_eq!(grant(&app, account, 25).await.status(), 201);
    let hooks = wait_for_hooks(&site, 3, Duration::from_secs(10)).await;
    let ids: Vec<String> = hooks
        .iter()
        .map(|h| h.event()["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(ids.iter().all(|i| *i == ids[0]), "{ids:?}");
    assert!(
        hooks.iter().all(|h| h.body == hooks[0].body),
        "the same body each time"
    );
    assert_eq!(hooks[0].event()["data"]["amount"], 25);
    let secret = ep["secret"].as_str().unwrap();
    assert!(hooks.iter().all(|h| matching_signatures(h, secret) == 1));

    // The delivery's record: delivered after three attempts, the last answer a 200.
    let path = format!(
        "/v1/webhook-endpoints/{}/deliveries",
        ep["id"].as_str().unwrap()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let d = loop {
        let page: Value = app.get_with_key(&path, &key).await.json().await.unwrap();
        let d = page["data"][0].clone();
        if d["status"] == "delivered" || Instant::now() > deadline {
            break d;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(d["status"], "delivered", "{d}");
    assert_eq!(d["attempts"], 3);
    assert_eq!(d["last_response_code"], 200);
    assert_eq!(d["event_id"], ids[0].as_str());
    assert!(d["next_attempt_at"].is_null());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(site.hooks().len(), 3, "nothing more after the success");
}

#[tokio::test]
async fn a_failing_delivery_is_pending_with_its_last_code_and_next_attempt() {
    let site = Upstream::start().await;
    let app = events_app(&site.allow(), |c| {
        c.events.retry_base = Duration::from_secs(60);
    })
    .await;
    let (account, key) = app.create_account("pro", 0).await;
    let ep = create_endpoint(&app, &key, &site.url("/status/503"), &["credits.granted"]).await;
    assert_eq!(grant(&app, account, 1).await.status(), 201);
    let path = format!(
        "/v1/webhook-endpoints/{}/deliveries",
        ep["id"].as_str().unwrap()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let d = loop {
        let page: Value = app.get_with_key(&path, &key).await.json().await.unwrap();
        let d = page["data"][0].clone();
        if d["last_response_code"] == 503 || Instant::now() > deadline {
            break d;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(d["status"], "pending", "{d}");
    assert_eq!(d["attempts"], 1);
    assert_eq!(d["last_response_code"], 503);
    let next: chrono::DateTime<chrono::Utc> =
        d["next_attempt_at"].as_str().unwrap().parse().unwrap();
    let wait = next - chrono::Utc::now();
    assert!(
        wait > chrono::Duration::seconds(50),
        "retried with backoff: {wait}"
    );
}

#[tokio::test]
async fn a_flooding_tenant_with_a_receiver_that_never_answers_does_not_delay_another() {
    let site = Upstream::start().await;
    let hole = black_hole().await;
    let app = events_app(&loopback(&[site.port, hole.port]), |_| {}).await;
    let (attacker, attacker_key) = app.create_account("pro", 0).await;
    let (_, victim_key) = app.create_account("pro", 0).await;
    // The attacker: 16 endpoints (the most it may hold), all at a black hole, and a flood of
    // events for each.
    for _ in 0..16 {
        create_endpoint(
            &app,
            &attacker_key,
            &format!("http://127.0.0.1:{}/hook", hole.port),
            &["credits.granted"],
        )
        .await;
    }
    let grants = (0..40).map(|_| grant(&app, attacker, 1));
    for res in futures_util::future::join_all(grants).await {
        assert_eq!(res.status(), 201);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while hole.open.load(Ordering::SeqCst) < 4 {
        assert!(
            Instant::now() < deadline,
            "the attacker's deliveries never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pending: i64 = app
        .db
        .query_one(
            "SELECT count(*) FROM event_deliveries WHERE delivered_at IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(pending, 640, "16 endpoints × 40 events queued");

    // The victim: one event, delivered promptly while the attacker's hang.
    create_endpoint(&app, &victim_key, &site.url("/hook"), &["key.created"]).await;
    let started = Instant::now();
    create_key(&app, &victim_key, "victim").await;
    wait_for_hooks(&site, 1, Duration::from_secs(2)).await;
    assert!(started.elapsed() < Duration::from_secs(2));
    // The attacker never held more than its per-account bound of connections at once.
    assert!(
        hole.max_open.load(Ordering::SeqCst) <= 4,
        "{} at once",
        hole.max_open.load(Ordering::SeqCst)
    );
}

#[tokio::test]
async fn urls_at_internal_addresses_unknown_types_and_too_many_endpoints_are_refused() {
    let site = Upstream::start().await;
    // Only the site's port is allowed: other loopback ports are refused like any internal
    // address.
    let app = events_app(&loopback(&[site.port]), |_| {}).await;
    // An unlimited tier: the tier's rate limit is not what this test is about.
    let (_, key) = app.create_account("internal", 0).await;
    for url in [
        "http://127.0.0.1:9/hook".to_owned(),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://10.0.0.1/hook".to_owned(),
        "http://[::1]:8080/hook".to_owned(),
        format!("http://user:pw@127.0.0.1:{}/hook", site.port),
    ] {
        let res = app
            .post_json(
                "/v1/webhook-endpoints",
                &key,
                json!({"url": url, "events": ["key.created"]}),
            )
            .await;
        let body = assert_problem(res, 422, "url_not_allowed").await;
        assert_eq!(body["field"], "url", "{url}");
    }
    for (body, field) in [
        (
            json!({"url": "ftp://example.com/x", "events": ["key.created"]}),
            "url",
        ),
        (
            json!({"url": "not a url", "events": ["key.created"]}),
            "url",
        ),
        (json!({"url": site.url("/hook"), "events": []}), "events"),
        (
            json!({"url": site.url("/hook"), "events": ["key.exploded"]}),
            "events",
        ),
    ] {
        let res = app.post_json("/v1/webhook-endpoints", &key, body).await;
        let problem = assert_problem(res, 422, "validation_failed").await;
        assert_eq!(problem["field"], field);
    }
    let res = app
        .post_json(
            "/v1/webhook-endpoints",
            &key,
            json!({"url": site.url("/hook"), "events": ["key.created"], "extra": 1}),
        )
        .await;
    assert!(res.status().is_client_error());
    let count: i64 = app
        .db
        .query_one("SELECT count(*) FROM webhook_endpoints", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 0, "nothing refused was written");

    // At most 16 per account, also when creates race.
    let creates = (0..20).map(|_| {
        app.post_json(
            "/v1/webhook-endpoints",
            &key,
            json!({"url": site.url("/hook"), "events": ["key.created"]}),
        )
    });
    let statuses: Vec<u16> = futures_util::future::join_all(creates)
        .await
        .iter()
        .map(|r| r.status().as_u16())
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        16,
        "{statuses:?}"
    );
    let res = app
        .post_json(
            "/v1/webhook-endpoints",
            &key,
            json!({"url": site.url("/hook"), "events": ["key.created"]}),
        )
        .await;
    let body = assert_problem(res, 409, "webhook_endpoint_limit_reached").await;
    assert_eq!(body["max_endpoints"], 16);
}

#[tokio::test]
async fn endpoints_are_per_account_and_need_the_right_scopes() {
    let site = Upstream::start().await;
    let app = events_app(&site.allow(), |_| {}).await;
    let (a, key_a) = app.create_account("pro", 0).await;
    let (_, key_b) = app.create_account("pro", 0).await;
    let ep = create_endpoint(&app, &key_a, &site.url("/hook"), &["key.created"]).await;
    let id = ep["id"].as_str().unwrap();
    let path = format!("/v1/webhook-endpoints/{id}");
    // Another account's endpoint does not exist for it.
    assert_eq!(app.get_with_key(&path, &key_b).await.status(), 404);
    let res = app
        .client
        .delete(app.url(&path))
        .bearer_auth(&key_b)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    let res = app
        .post_json(&format!("{path}/rotate-secret"), &key_b, json!({}))
        .await;
    assert_eq!(res.status(), 404);
    assert_eq!(
        app.get_with_key(&format!("{path}/deliveries"), &key_b)
            .await
            .status(),
        404
    );
    let listed: Value = app
        .get_with_key("/v1/webhook-endpoints", &key_b)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["data"].as_array().unwrap().len(), 0);

    // A read-only key reads but does not create.
    let (_, reader) = app.create_key(a, &["read"]).await;
    assert_eq!(app.get_with_key(&path, &reader).await.status(), 200);
    let res = app
        .post_json(
            "/v1/webhook-endpoints",
            &reader,
            json!({"url": site.url("/hook"), "events": ["key.created"]}),
        )
        .await;
    assert_problem(res, 403, "insufficient_scope").await;

    // Deleted: gone, and no more deliveries (the read key's own `key.created` arrived before).
    wait_for_hooks(&site, 1, Duration::from_secs(3)).await;
    let res = app
        .client
        .delete(app.url(&path))
        .bearer_auth(&key_a)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    assert_eq!(app.get_with_key(&path, &key_a).await.status(), 404);
    create_key(&app, &key_a, "after delete").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(site.hooks().len(), 1);
}

#[tokio::test]
async fn two_instances_deliver_each_event_exactly_once() {
    let site = Upstream::start().await;
    let allow = site.allow();
    let first = events_app(&allow, |_| {}).await;
    let allow2 = allow.clone();
    let second = spawn_app_on(first.db_name.clone(), move |c| {
        allow_scraping(c, &allow2);
        c.events.retry_base = Duration::from_millis(100);
    })
    .await;
    let (account, key) = first.create_account("pro", 0).await;
    create_endpoint(&first, &key, &site.url("/hook"), &["credits.granted"]).await;
    create_endpoint(&second, &key, &site.url("/hook"), &["credits.granted"]).await;
    let grants = (0..30).map(|i| {
        let app = if i % 2 == 0 { &first } else { &second };
        grant(app, account, 1)
    });
    for res in futures_util::future::join_all(grants).await {
        assert_eq!(res.status(), 201);
    }
    let hooks = wait_for_hooks(&site, 60, Duration::from_secs(15)).await;
    // Settle: anything sent twice would arrive now.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let hooks = if site.hooks().len() > hooks.len() {
        site.hooks()
    } else {
        hooks
    };
    assert_eq!(hooks.len(), 60, "30 events × 2 endpoints, each once");
    let mut per_signature: HashMap<String, usize> = HashMap::new();
    for h in &hooks {
        *per_signature
            .entry(h.headers["keymeter-signature"].clone())
            .or_default() += 1;
    }
    let mut per_event: HashMap<String, usize> = HashMap::new();
    for h in &hooks {
        *per_event
            .entry(h.event()["id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(per_event.len(), 30);
    assert!(per_event.values().all(|n| *n == 2), "{per_event:?}");
    let delivered: i64 = first
        .db
        .query_one(
            "SELECT count(*) FROM event_deliveries WHERE delivered_at IS NOT NULL AND attempts = 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        delivered, 60,
        "each delivered on its first and only attempt"
    );
}

#[tokio::test]
async fn the_event_list_pages_newest_first_and_filters_by_type() {
    let app = spawn_app_with(|_| {}).await;
    let (account, key) = app.create_account("pro", 0).await;
    for i in 0..5 {
        create_key(&app, &key, &format!("k{i}")).await;
        assert_eq!(grant(&app, account, 1).await.status(), 201);
    }
    let mut seen = Vec::new();
    let mut query = "?limit=3".to_owned();
    loop {
        let page = events_of(&app, &key, &query).await;
        for e in page["data"].as_array().unwrap() {
            seen.push((
                e["id"].as_str().unwrap().to_owned(),
                e["type"].as_str().unwrap().to_owned(),
            ));
        }
        match page["next_cursor"].as_str() {
            Some(c) => query = format!("?limit=3&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(seen.len(), 10);
    // Newest first: the last thing done (a grant) leads, the first key trails.
    assert_eq!(seen[0].1, "credits.granted");
    assert_eq!(seen[9].1, "key.created");
    let mut ids: Vec<&String> = seen.iter().map(|(i, _)| i).collect();
    ids.dedup();
    assert_eq!(ids.len(), 10, "no event twice across pages");

    let only = events_of(&app, &key, "?type=key.created&limit=100").await;
    let data = only["data"].as_array().unwrap();
    assert_eq!(data.len(), 5);
    assert!(data.iter().all(|e| e["type"] == "key.created"));
    assert_eq!(data[0]["data"]["name"], "k4");

    let res = app.get_with_key("/v1/events?type=key.exploded", &key).await;
    let p = assert_problem(res, 422, "validation_failed").await;
    assert_eq!(p["field"], "type");
    let res = app.get_with_key("/v1/events?cursor=garbage", &key).await;
    assert_problem(res, 400, "invalid_request").await;
    // Another account sees none of them.
    let (_, other) = app.create_account("pro", 0).await;
    let theirs = events_of(&app, &other, "").await;
    assert_eq!(theirs["data"].as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn key_and_grant_events_are_recorded_once_and_never_for_what_rolled_back() {
    // A tier with few keys and a generous rate, so the cap is reached quickly.
    let tiers = crate::support::app::tiers_file(
        "[tiers.few]\nrequests_per_minute = 6000\nburst = 1000\n\
         max_concurrent_jobs = 2\nmax_queued_jobs = 2\nmax_keys = 4\n",
    );
    let app = spawn_app_with(|c| c.tiers_path = Some(tiers.clone())).await;
    let (account, key) = app.create_account("few", 0).await;
    let created = create_key(&app, &key, "temp").await;
    let id = created["id"].as_str().unwrap();
    // Revoked twice: one event.
    for _ in 0..2 {
        let res = app
            .client
            .delete(app.url(&format!("/v1/keys/{id}")))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    // Refused changes write no event: a negative adjustment beyond the balance, a key beyond
    // the tier's cap (created until refused).
    let res = grant(&app, account, -1_000).await;
    assert!(res.status().is_client_error());
    let mut made = 1;
    loop {
        let res = app
            .post_json("/v1/keys", &key, json!({"name": format!("fill{made}")}))
            .await;
        if res.status() == 409 {
            break;
        }
        assert_eq!(res.status(), 201);
        made += 1;
        assert!(made < 200, "the tier caps keys");
    }
    assert_eq!(grant(&app, account, 7).await.status(), 201);

    let all = events_of(&app, &key, "?limit=100").await;
    let count = |t: &str| {
        all["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["type"] == t)
            .count()
    };
    assert_eq!(count("key.created"), made, "one per key that exists");
    assert_eq!(count("key.revoked"), 1);
    assert_eq!(count("credits.granted"), 1);
    let keys: i64 = app
        .db
        .query_one(
            "SELECT count(*) FROM api_keys WHERE account_id = $1",
            &[&account],
        )
        .await
        .unwrap()
        .get(0);
    // The account's first key came with the account itself (no endpoint could exist yet to
    // hear of it); every key created since has its one event.
    assert_eq!(keys as usize, made + 1);
    let revoked = all["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "key.revoked")
        .unwrap()
        .clone();
    assert_eq!(revoked["data"]["key_id"], id);
    let granted = all["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "credits.granted")
        .unwrap()
        .clone();
    assert_eq!(granted["data"]["amount"], 7);
    assert_eq!(granted["data"]["balance_after"], 7);
    assert_eq!(granted["data"]["source"], "grant");
}

#[tokio::test]
async fn finished_jobs_record_one_event_each_and_a_receiver_gets_it() {
    let site = Upstream::start().await;
    let app = spawn_jobs_app(&site.allow(), |c| {
        c.events.retry_base = Duration::from_millis(100);
    })
    .await;
    let (_, key) = app.create_account("pro", 100).await;
    create_endpoint(
        &app,
        &key,
        &site.url("/hook"),
        &["job.succeeded", "job.failed"],
    )
    .await;
    let mut ids = Vec::new();
    for path in ["/page", "/status/500", "/page"] {
        let res = app
            .post_json("/v1/jobs", &key, json!({"url": site.url(path)}))
            .await;
        assert_eq!(res.status(), 202);
        let job: Value = res.json().await.unwrap();
        ids.push(job["id"].as_str().unwrap().to_owned());
    }
    for id in &ids {
        app.wait_for_job(&key, id, &["succeeded", "failed"]).await;
    }
    let hooks = wait_for_hooks(&site, 3, Duration::from_secs(5)).await;
    let mut by_job: HashMap<String, String> = HashMap::new();
    for h in &hooks {
        let e = h.event();
        let prev = by_job.insert(
            e["data"]["job_id"].as_str().unwrap().to_owned(),
            e["type"].as_str().unwrap().to_owned(),
        );
        assert!(prev.is_none(), "one event per job");
    }
    assert_eq!(by_job[&ids[0]], "job.succeeded");
    assert_eq!(by_job[&ids[1]], "job.failed");
    assert_eq!(by_job[&ids[2]], "job.succeeded");
    let listed = events_of(&app, &key, "?type=job.failed").await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 1);
    assert_eq!(listed["data"][0]["data"]["refunded"], true);
}

/// A second connection to the app's database, for transactions the test holds open.
async fn connect(app: &TestApp) -> tokio_postgres::Client {
    let url = crate::support::db::database_url(&app.db_name);
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

const INSERT_EVENT: &str = "INSERT INTO events (id, account_id, type, payload)
     VALUES ('evt_' || md5(random()::text), $1, 'credits.granted', jsonb_build_object('tag', $2::text))";

#[tokio::test]
async fn a_rolled_back_event_is_never_sent_and_a_late_commit_with_a_lower_seq_still_is() {
    let site = Upstream::start().await;
    let app = events_app(&site.allow(), |_| {}).await;
    let (account, key) = app.create_account("pro", 0).await;
    create_endpoint(&app, &key, &site.url("/hook"), &["credits.granted"]).await;

    // Rolled back: as if the change it described had failed.
    let mut c = connect(&app).await;
    let tx = c.transaction().await.unwrap();
    tx.execute(INSERT_EVENT, &[&account, &"rolled back"])
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    // A slow transaction takes the lower seq and commits after a faster one with a higher seq.
    let mut slow = connect(&app).await;
    let slow_tx = slow.transaction().await.unwrap();
    slow_tx
        .execute(INSERT_EVENT, &[&account, &"slow"])
        .await
        .unwrap();
    let mut fast = connect(&app).await;
    let fast_tx = fast.transaction().await.unwrap();
    fast_tx
        .execute(INSERT_EVENT, &[&account, &"fast"])
        .await
        .unwrap();
    fast_tx.commit().await.unwrap();
    wait_for_hooks(&site, 1, Duration::from_secs(2)).await;
    // The fast one is delivered while the slow one is still open…
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(site.hooks().len(), 1);
    slow_tx.commit().await.unwrap();
    // …and the slow one once it commits, though its seq is lower.
    let hooks = wait_for_hooks(&site, 2, Duration::from_secs(2)).await;
    let tags: Vec<String> = hooks
        .iter()
        .map(|h| h.event()["data"]["tag"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(tags, vec!["fast", "slow"]);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(site.hooks().len(), 2, "the rolled-back event never arrives");
    let seqs: Vec<i64> = app
        .db
        .query(
            "SELECT seq FROM events WHERE payload ? 'tag' ORDER BY payload->>'tag' DESC",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(seqs[0] < seqs[1], "slow took the lower seq: {seqs:?}");
}
