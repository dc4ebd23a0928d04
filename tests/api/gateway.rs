//! Gateway mode (#18): `/v1/authz` as the proxies call it, refunds and verification as the
//! operator's servers call them. nginx itself in front of keymeter: `gateway_nginx.rs`.

use std::collections::HashSet;
use std::time::Duration;

use keymeter::gateway::RouteTable;
use reqwest::header::HeaderMap;
use secrecy::SecretString;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::support::db::{assert_ledger_invariant, balance};
use crate::support::process::{keymeter_on, run_to_end};
use crate::support::{assert_problem, spawn_app_on, spawn_app_with, TestApp};

pub const SERVICE_TOKEN: &str = "svc-token-0123456789abcdef0123456789abcdef";

pub const ROUTES: &str = r#"
[[routes]]
method = "GET"
path = "/v1/search/*"
cost = 2
scope = "read"

[[routes]]
method = "*"
path = "/v1/free"
cost = 0
scope = "read"

[[routes]]
method = "POST"
path = "/v1/scrape-it"
cost = 1
scope = "scrape"

[[routes]]
method = "*"
path = "/v1/one/*"
cost = 1
scope = "read"
"#;

/// The gateway's settings on a test configuration.
pub fn gateway(c: &mut keymeter::config::Config) {
    c.gateway_routes = RouteTable::parse(ROUTES).expect("the test routes parse");
    c.service_tokens = vec![SecretString::from(SERVICE_TOKEN.to_owned())];
}

async fn spawn() -> TestApp {
    spawn_app_with(gateway).await
}

/// nginx's way of asking: `X-Original-Method` + `X-Original-URI`.
async fn authz(app: &TestApp, key: Option<&str>, method: &str, uri: &str) -> reqwest::Response {
    authz_with(app, key, method, uri, None).await
}

async fn authz_with(
    app: &TestApp,
    key: Option<&str>,
    method: &str,
    uri: &str,
    request_id: Option<&str>,
) -> reqwest::Response {
    let mut req = app
        .client
        .get(app.url("/v1/authz"))
        .header("X-Original-Method", method)
        .header("X-Original-URI", uri);
    if let Some(k) = key {
        req = req.header("X-API-Key", k);
    }
    if let Some(id) = request_id {
        req = req.header("X-Request-Id", id);
    }
    req.send().await.expect("authz answered")
}

fn h<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The refusal's `X-Keymeter-Problem` is its body, to the byte.
async fn problem_in_header_and_body(res: reqwest::Response, status: u16, slug: &str) -> Value {
    let header: Value = serde_json::from_str(
        h(res.headers(), "x-keymeter-problem").expect("X-Keymeter-Problem on a refusal"),
    )
    .expect("X-Keymeter-Problem is JSON");
    let body = assert_problem(res, status, slug).await;
    assert_eq!(header, body);
    body
}

#[tokio::test]
async fn a_priced_route_is_allowed_with_the_callers_identity_and_charged() {
    let app = spawn().await;
    let (account, key) = app.create_account("pro", 10).await;
    let res = authz(&app, Some(&key), "GET", "/v1/search/cats?q=1").await;
    assert_eq!(res.status(), 200);
    let hd = res.headers().clone();
    assert_eq!(
        h(&hd, "x-keymeter-account"),
        Some(account.to_string().as_str())
    );
    assert_eq!(h(&hd, "x-keymeter-key"), key.get(8..20));
    assert_eq!(h(&hd, "x-keymeter-tier"), Some("pro"));
    assert_eq!(h(&hd, "x-keymeter-route"), Some("GET /v1/search/*"));
    assert_eq!(h(&hd, "x-keymeter-cost"), Some("2"));
    assert_eq!(h(&hd, "x-keymeter-credits-remaining"), Some("8"));
    assert!(h(&hd, "x-keymeter-charge").unwrap().parse::<i64>().unwrap() > 0);
    assert!(h(&hd, "ratelimit-policy").unwrap().contains("\"pro\""));
    assert!(h(&hd, "x-ratelimit-remaining").is_some());
    assert!(res.bytes().await.unwrap().is_empty(), "an empty body");
    assert_eq!(balance(&app, account).await.credits, 8);

    // Bearer works as well, and a free route is authenticated but charges nothing.
    let res = app
        .client
        .post(app.url("/v1/authz"))
        .bearer_auth(&key)
        .header("X-Original-Method", "DELETE")
        .header("X-Original-URI", "/v1/free")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers().get("x-keymeter-charge").is_none());
    assert_eq!(balance(&app, account).await.credits, 8);
    assert_ledger_invariant(&app).await;
}

#[tokio::test]
async fn every_refusal_is_a_problem_with_its_status_also_in_a_header() {
    let app = spawn().await;
    let (account, key) = app.create_account("pro", 3).await;

    let res = authz(&app, None, "GET", "/v1/search/x").await;
    assert_eq!(h(res.headers(), "www-authenticate"), Some("Bearer"));
    problem_in_header_and_body(res, 401, "invalid_api_key").await;

    let res = app
        .client
        .get(app.url("/v1/authz"))
        .header("X-API-Key", &key)
        .send()
        .await
        .unwrap();
    problem_in_header_and_body(res, 400, "invalid_request").await;

    let res = authz(&app, Some(&key), "GET", "/v1/private").await;
    let body = problem_in_header_and_body(res, 404, "route_not_metered").await;
    assert_eq!(
        (body["method"].as_str(), body["path"].as_str()),
        (Some("GET"), Some("/v1/private"))
    );

    // Walking out of a cheap prefix prices the path the upstream will serve.
    let res = authz(&app, Some(&key), "GET", "/v1/free/../private").await;
    problem_in_header_and_body(res, 404, "route_not_metered").await;

    let (_, read_only) = app.create_key(account, &["read"]).await;
    let res = authz(&app, Some(&read_only), "POST", "/v1/scrape-it").await;
    let body = problem_in_header_and_body(res, 403, "insufficient_scope").await;
    assert_eq!(body["required_scope"], "scrape");

    let res = authz(&app, Some(&key), "GET", "/v1/search/a").await;
    assert_eq!(res.status(), 200);
    let res = authz(&app, Some(&key), "GET", "/v1/search/b").await;
    assert!(h(res.headers(), "ratelimit-policy")
        .unwrap()
        .contains("\"pro\""));
    let body = problem_in_header_and_body(res, 402, "insufficient_credits").await;
    assert_eq!(
        (body["balance"].as_i64(), body["cost"].as_i64()),
        (Some(1), Some(2))
    );
    assert_eq!(balance(&app, account).await.credits, 1);

    // The free tier allows a burst of 5; the sixth request is over.
    let (_, free_key) = app.create_account("free", 0).await;
    for _ in 0..5 {
        assert_eq!(
            authz(&app, Some(&free_key), "GET", "/v1/free")
                .await
                .status(),
            200
        );
    }
    let res = authz(&app, Some(&free_key), "GET", "/v1/free").await;
    let retry: u64 = h(res.headers(), "retry-after").unwrap().parse().unwrap();
    assert!(retry >= 1);
    assert!(h(res.headers(), "ratelimit-policy")
        .unwrap()
        .contains("\"free\""));
    problem_in_header_and_body(res, 429, "rate_limited").await;
    assert_ledger_invariant(&app).await;
}

#[tokio::test]
async fn traefik_and_envoy_name_the_original_request_their_own_way() {
    let app = spawn().await;
    let (account, key) = app.create_account("pro", 10).await;
    // Traefik forwardAuth.
    let res = app
        .client
        .get(app.url("/v1/authz"))
        .bearer_auth(&key)
        .header("X-Forwarded-Method", "GET")
        .header("X-Forwarded-Uri", "/v1/search/traefik")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(h(res.headers(), "x-keymeter-cost"), Some("2"));
    // Envoy ext_authz: the original method and path, under path_prefix /v1/authz.
    let res = app
        .client
        .post(app.url("/v1/authz/v1/scrape-it?x=1"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        h(res.headers(), "x-keymeter-route"),
        Some("POST /v1/scrape-it")
    );
    let res = app
        .client
        .get(app.url("/v1/authz/v1/scrape-it"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    problem_in_header_and_body(res, 404, "route_not_metered").await;
    // A client header naming a cheaper route than the proxy's is refused, not priced.
    let res = app
        .client
        .get(app.url("/v1/authz"))
        .bearer_auth(&key)
        .header("X-Forwarded-Method", "GET")
        .header("X-Forwarded-Uri", "/v1/search/x")
        .header("X-Original-URI", "/v1/free")
        .send()
        .await
        .unwrap();
    problem_in_header_and_body(res, 400, "invalid_request").await;
    assert_eq!(balance(&app, account).await.credits, 7);
}

#[tokio::test]
async fn a_request_id_is_charged_once_even_when_two_instances_race_for_it() {
    let first = spawn().await;
    let second = spawn_app_on(first.db_name.clone(), gateway).await;
    let (account, key) = first.create_account("internal", 1_000).await;
    // 40 request ids, each sent 5 times to each instance at once.
    let mut tasks = Vec::new();
    for i in 0..40 {
        let id = format!("req-{i}-{}", Uuid::new_v4().simple());
        for n in 0..10 {
            let app = if n % 2 == 0 { &first } else { &second };
            let (client, url, key, id) = (
                app.client.clone(),
                app.url("/v1/authz"),
                key.clone(),
                id.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let res = client
                    .get(url)
                    .header("X-API-Key", key)
                    .header("X-Original-Method", "GET")
                    .header("X-Original-URI", "/v1/one/thing")
                    .header("X-Request-Id", &id)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(res.status(), 200);
                (
                    id,
                    h(res.headers(), "x-keymeter-charge").unwrap().to_owned(),
                )
            }));
        }
    }
    let mut charge_of: std::collections::HashMap<String, String> = Default::default();
    for t in tasks {
        let (id, charge) = t.await.unwrap();
        let seen = charge_of.entry(id).or_insert_with(|| charge.clone());
        assert_eq!(
            *seen, charge,
            "every answer for one request id names the one charge"
        );
    }
    let b = balance(&first, account).await;
    assert_eq!((b.credits, b.charges), (960, 40));
    assert_eq!(charge_of.values().collect::<HashSet<_>>().len(), 40);
    // Without a request id every authorization is a charge of its own.
    for _ in 0..3 {
        assert_eq!(
            authz(&first, Some(&key), "GET", "/v1/one/x").await.status(),
            200
        );
    }
    assert_eq!(balance(&first, account).await.credits, 957);
    assert_ledger_invariant(&first).await;
}

#[tokio::test]
async fn two_hundred_concurrent_authorizations_against_fifty_credits() {
    let first = spawn().await;
    let second = spawn_app_on(first.db_name.clone(), gateway).await;
    let (account, key) = first.create_account("internal", 50).await;
    let (other, other_key) = first.create_account("internal", 1_000).await;
    let mut tasks = Vec::new();
    for n in 0..200 {
        let app = if n % 2 == 0 { &first } else { &second };
        for (k, uri) in [(&key, "/v1/one/a"), (&other_key, "/v1/search/b")] {
            let (client, url, k) = (app.client.clone(), app.url("/v1/authz"), k.clone());
            tasks.push(tokio::spawn(async move {
                client
                    .get(url)
                    .header("X-API-Key", k)
                    .header("X-Original-Method", "GET")
                    .header("X-Original-URI", uri)
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            }));
        }
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let short = statuses.iter().filter(|s| **s == 402).count();
    // The other account (1,000 credits, 2 each) is never short: 200 allowed; this one 50.
    assert_eq!((ok, short), (250, 150), "{statuses:?}");
    assert_eq!(balance(&first, account).await.credits, 0);
    assert_eq!(balance(&first, other).await.credits, 600);
    assert_ledger_invariant(&first).await;
}

async fn refund(app: &TestApp, token: &str, body: Value) -> reqwest::Response {
    app.client
        .post(app.url("/v1/gateway/refunds"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_upstream_refunds_a_charge_at_most_once() {
    let first = spawn().await;
    let second = spawn_app_on(first.db_name.clone(), gateway).await;
    let (account, key) = first.create_account("pro", 10).await;
    let res = authz(&first, Some(&key), "GET", "/v1/search/x").await;
    let charge: i64 = h(res.headers(), "x-keymeter-charge")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(balance(&first, account).await.credits, 8);

    let res = refund(&first, "not-the-token", json!({"charge": charge})).await;
    assert_problem(res, 401, "invalid_service_token").await;
    let res = refund(&first, &key, json!({"charge": charge})).await;
    assert_problem(res, 401, "invalid_service_token").await;
    assert_eq!(balance(&first, account).await.credits, 8);

    let mut tasks = Vec::new();
    for n in 0..10 {
        let app = if n % 2 == 0 { &first } else { &second };
        let (client, url) = (app.client.clone(), app.url("/v1/gateway/refunds"));
        tasks.push(tokio::spawn(async move {
            client
                .post(url)
                .bearer_auth(SERVICE_TOKEN)
                .json(&json!({"charge": charge}))
                .send()
                .await
                .unwrap()
        }));
    }
    let (mut refunded, mut already) = (Vec::new(), 0);
    for t in tasks {
        let res = t.await.unwrap();
        match res.status().as_u16() {
            201 => refunded.push(res.json::<Value>().await.unwrap()),
            409 => {
                let body = assert_problem(res, 409, "charge_already_refunded").await;
                assert!(body["refund"].as_i64().is_some());
                already += 1;
            }
            s => panic!("refund answered {s}"),
        }
    }
    assert_eq!((refunded.len(), already), (1, 9));
    let r = &refunded[0];
    assert_eq!(
        (
            r["charge"].as_i64(),
            r["amount"].as_i64(),
            r["balance_after"].as_i64()
        ),
        (Some(charge), Some(2), Some(10))
    );
    assert_eq!(r["account_id"], account.to_string());
    assert_eq!(balance(&first, account).await.credits, 10);

    let res = refund(&first, SERVICE_TOKEN, json!({"charge": charge + 1_000_000})).await;
    assert_problem(res, 404, "gateway_charge_not_found").await;
    // A charge that is not the gateway's (a metered API charge) is not the upstream's to refund.
    let res = first
        .post_json("/v1/credits/charge", &key, json!({"amount": 1}))
        .await;
    let api_charge = res.json::<Value>().await.unwrap()["id"].as_i64().unwrap();
    let res = refund(&first, SERVICE_TOKEN, json!({"charge": api_charge})).await;
    assert_problem(res, 404, "gateway_charge_not_found").await;
    let res = refund(&first, SERVICE_TOKEN, json!({"charge": "x"})).await;
    assert_eq!(res.status(), 422);
    assert_ledger_invariant(&first).await;
}

async fn verify(app: &TestApp, body: Value) -> Value {
    let res = app
        .client
        .post(app.url("/v1/keys/verify"))
        .bearer_auth(SERVICE_TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    res.json().await.unwrap()
}

#[tokio::test]
async fn servers_verify_keys_in_code_with_the_same_checks() {
    let app = spawn().await;
    let (account, key) = app.create_account("free", 3).await;

    let v = verify(&app, json!({"key": key, "route": "GET /v1/search/x"})).await;
    assert_eq!(
        (v["valid"].as_bool(), v["code"].as_str()),
        (Some(true), Some("valid"))
    );
    assert_eq!(v["account_id"], account.to_string());
    assert_eq!(v["key_id"].as_str(), key.get(8..20));
    assert_eq!(v["tier"], "free");
    assert_eq!(v["credits_remaining"], 1);
    assert!(v["charge"].as_i64().is_some());
    assert_eq!(v["ratelimit"]["policy"], "free");
    assert!(v["scopes"].as_array().unwrap().contains(&json!("read")));

    let v = verify(&app, json!({"key": key, "route": "GET /v1/search/x"})).await;
    assert_eq!(
        (v["valid"].as_bool(), v["code"].as_str()),
        (Some(false), Some("insufficient_credits"))
    );
    assert_eq!(v["credits_remaining"], 1);
    let v = verify(&app, json!({"key": key, "route": "GET /nope"})).await;
    assert_eq!(v["code"], "route_not_metered");
    let (_, read_only) = app.create_key(account, &["read"]).await;
    let v = verify(
        &app,
        json!({"key": read_only, "route": "POST /v1/scrape-it"}),
    )
    .await;
    assert_eq!(v["code"], "insufficient_scope");
    let v = verify(&app, json!({"key": key, "cost": 1})).await;
    assert_eq!(
        (v["code"].as_str(), v["credits_remaining"].as_i64()),
        (Some("valid"), Some(0))
    );
    // Six checks so far against the free tier's burst of five.
    let v = verify(&app, json!({"key": key})).await;
    assert_eq!(v["code"], "rate_limited");
    assert!(v["ratelimit"]["retry_after"].as_u64().unwrap() >= 1);

    let v = verify(&app, json!({"key": "km_live_nope"})).await;
    assert_eq!(
        (v["valid"].as_bool(), v["code"].as_str()),
        (Some(false), Some("invalid_api_key"))
    );
    assert!(v.get("account_id").is_none());

    let res = app
        .client
        .post(app.url("/v1/keys/verify"))
        .bearer_auth(SERVICE_TOKEN)
        .json(&json!({"key": key, "route": "search"}))
        .send()
        .await
        .unwrap();
    assert_problem(res, 422, "validation_failed").await;
    let res = app
        .client
        .post(app.url("/v1/keys/verify"))
        .bearer_auth(&key)
        .json(&json!({"key": key}))
        .send()
        .await
        .unwrap();
    assert_problem(res, 401, "invalid_service_token").await;
    assert_eq!(balance(&app, account).await.credits, 0);
    assert_ledger_invariant(&app).await;
}

#[tokio::test]
async fn one_accounts_gateway_traffic_never_spends_anothers_limit_or_credits() {
    let app = spawn().await;
    let (a, key_a) = app.create_account("free", 100).await;
    let (b, key_b) = app.create_account("free", 100).await;
    // A spends its whole burst (and more) through the gateway …
    for _ in 0..8 {
        authz(&app, Some(&key_a), "GET", "/v1/one/x").await;
    }
    assert_eq!(
        authz(&app, Some(&key_a), "GET", "/v1/one/x").await.status(),
        429
    );
    // … and reusing B's would-be request id charges A, never B.
    let res = authz_with(&app, Some(&key_b), "GET", "/v1/one/x", Some("shared-id")).await;
    assert_eq!(res.status(), 200);
    assert_eq!(balance(&app, b).await.credits, 99);
    assert_eq!(balance(&app, a).await.credits, 95);
    // The gateway and the API share the account's tier limit.
    let res = app.get_with_key("/v1/account", &key_a).await;
    assert_eq!(res.status(), 429);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_ledger_invariant(&app).await;
}

#[tokio::test]
async fn serve_refuses_a_bad_routes_file_naming_its_line() {
    let path = std::env::temp_dir().join(format!("keymeter-routes-{}.toml", Uuid::new_v4()));
    std::fs::write(
        &path,
        "[[routes]]\nmethod = \"GET\"\npath = \"/v1/*\"\ncost = 1\nscope = \"admin\"\n",
    )
    .unwrap();
    let mut c = keymeter_on("postgres");
    c.arg("serve")
        .env("KEYMETER_BIND", "127.0.0.1:0")
        .env("KEYMETER_GATEWAY_ROUTES", &path);
    let (code, _, stderr) = run_to_end(c, Duration::from_secs(20));
    let _ = std::fs::remove_file(&path);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("KEYMETER_GATEWAY_ROUTES"), "{stderr}");
    assert!(stderr.contains("line 5: scope \"admin\""), "{stderr}");
}

/// The key recorded on each ledger row of `ids` (charges or refunds), in the same order.
async fn keys_of(app: &TestApp, ids: &[i64]) -> Vec<Option<String>> {
    let mut out = Vec::new();
    for id in ids {
        let row = app
            .db
            .query_one("SELECT key_id FROM credit_ledger WHERE id = $1", &[id])
            .await
            .unwrap();
        out.push(row.get(0));
    }
    out
}

#[tokio::test]
async fn gateway_charges_and_their_refunds_record_the_key_that_caused_them() {
    let app = spawn().await;
    let (account, key) = app.create_account("internal", 1_000).await;
    let (other_id, other) = app.create_key(account, &["read"]).await;
    let key_id = key.get(8..20).unwrap().to_owned();

    // Alone (one statement), then 40 at once on two keys and two prices, a third with a
    // request id (group-committed batches that mix them).
    let res = authz_with(&app, Some(&key), "GET", "/v1/one/a", Some("lone-1")).await;
    assert_eq!(res.status(), 200);
    let lone: i64 = h(res.headers(), "x-keymeter-charge")
        .unwrap()
        .parse()
        .unwrap();
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let (client, url) = (app.client.clone(), app.url("/v1/authz"));
            let (k, uri) = if i % 2 == 0 {
                (key.clone(), "/v1/search/q")
            } else {
                (other.clone(), "/v1/one/q")
            };
            let request_id = (i % 3 == 0).then(|| format!("batch-{i}"));
            tokio::spawn(async move {
                let mut req = client
                    .get(url)
                    .header("X-API-Key", &k)
                    .header("X-Original-Method", "GET")
                    .header("X-Original-URI", uri);
                if let Some(id) = &request_id {
                    req = req.header("X-Request-Id", id);
                }
                let res = req.send().await.unwrap();
                assert_eq!(res.status(), 200);
                let charge: i64 = h(res.headers(), "x-keymeter-charge")
                    .unwrap()
                    .parse()
                    .unwrap();
                (k, request_id, charge)
            })
        })
        .collect();
    let mut charged = Vec::new();
    for t in tasks {
        charged.push(t.await.unwrap());
    }
    let ids: Vec<i64> = charged.iter().map(|(_, _, c)| *c).collect();
    let want: Vec<Option<String>> = charged
        .iter()
        .map(|(k, _, _)| Some(k.get(8..20).unwrap().to_owned()))
        .collect();
    assert_eq!(keys_of(&app, &ids).await, want);
    assert_eq!(keys_of(&app, &[lone]).await, [Some(key_id.clone())]);
    // Each charge's refundable record is its own: its route, its price, its request id.
    let mismatched: i64 = app
        .db
        .query_one(
            "SELECT count(*) FROM credit_ledger l LEFT JOIN gateway_charges g ON g.ledger_id = l.id
              WHERE l.account_id = $1 AND l.kind = 'charge'
                AND (g.ledger_id IS NULL OR g.amount <> -l.delta OR l.reason <> 'gateway ' || g.route)",
            &[&account],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(mismatched, 0);
    for (k, request_id, charge) in &charged {
        if let Some(id) = request_id {
            let uri = if *k == key {
                "/v1/search/q"
            } else {
                "/v1/one/q"
            };
            let res = authz_with(&app, Some(k), "GET", uri, Some(id)).await;
            assert_eq!(h(res.headers(), "x-keymeter-replayed"), Some("true"));
            assert_eq!(
                h(res.headers(), "x-keymeter-charge"),
                Some(charge.to_string().as_str())
            );
        }
    }
    // The usage by key sees them, like the API's charges.
    let usage: Value = app
        .get_with_key(&format!("/v1/usage?key_id={other_id}"), &key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(usage["total"]["charged"], 20, "{usage}");

    // A refund names the charge's key, on its ledger row and in its answer.
    let res = refund(&app, SERVICE_TOKEN, json!({"charge": lone})).await;
    assert_eq!(res.status(), 201);
    let r: Value = res.json().await.unwrap();
    assert_eq!(r["key_id"], key_id.as_str());
    let refund_id = r["refund"].as_i64().unwrap();
    assert_eq!(keys_of(&app, &[refund_id]).await, [Some(key_id.clone())]);

    // A server's verification charges for the key it verified.
    let v = verify(&app, json!({"key": other, "route": "GET /v1/search/z"})).await;
    assert_eq!(v["code"], "valid", "{v}");
    let charge = v["charge"].as_i64().unwrap();
    assert_eq!(keys_of(&app, &[charge]).await, [Some(other_id.clone())]);
    assert_eq!(
        balance(&app, account).await.credits,
        1_000 - 1 - (20 * 2 + 20) + 1 - 2
    );
    assert_ledger_invariant(&app).await;
}

#[tokio::test]
async fn gateway_charges_past_their_retention_are_purged_and_no_longer_refundable() {
    let app = spawn_app_with(|c| {
        gateway(c);
        c.gateway_charge_retention = Duration::from_secs(3);
        c.gateway_charge_purge_every = Duration::from_millis(200);
    })
    .await;
    let (account, key) = app.create_account("internal", 100).await;
    let charge_of = |res: &reqwest::Response| -> i64 {
        h(res.headers(), "x-keymeter-charge")
            .unwrap()
            .parse()
            .unwrap()
    };
    let old = charge_of(&authz_with(&app, Some(&key), "GET", "/v1/one/a", Some("old-1")).await);
    let kept = |id: i64| {
        let db = &app.db;
        async move {
            db.query_one(
                "SELECT count(*) FROM gateway_charges WHERE ledger_id = $1",
                &[&id],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
                == 1
        }
    };
    // Young: kept and refundable.
    let young = charge_of(&authz(&app, Some(&key), "GET", "/v1/one/b").await);
    assert!(kept(old).await && kept(young).await);
    assert_eq!(
        refund(&app, SERVICE_TOKEN, json!({"charge": young}))
            .await
            .status(),
        201
    );
    let mut purged = false;
    for _ in 0..100 {
        if !kept(old).await {
            purged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(purged, "the old gateway charge was not purged");
    // Past the window: no refund, and the request id is a new call.
    let res = refund(&app, SERVICE_TOKEN, json!({"charge": old})).await;
    assert_problem(res, 404, "gateway_charge_not_found").await;
    let res = authz_with(&app, Some(&key), "GET", "/v1/one/a", Some("old-1")).await;
    assert_eq!(res.status(), 200);
    assert!(h(res.headers(), "x-keymeter-replayed").is_none());
    assert_ne!(charge_of(&res), old);
    // The money is the ledger's, which keeps every row.
    let b = balance(&app, account).await;
    assert_eq!((b.credits, b.charges), (100 - 1 - 1 + 1 - 1, 3));
    assert_ledger_invariant(&app).await;
}
