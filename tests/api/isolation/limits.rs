//! Limits belong to the account, and a key never creates more power than it has.
//!
//! Tried as a hostile customer would: many keys to multiply the tier, more keys than the tier
//! allows (also all at once), a forged `X-Forwarded-For` hop or a fresh IPv6 address per
//! request to escape the per-IP limit, a short-lived login key minting a stronger or longer
//! lived key (directly or by rotating one), and a read-only key reading the webhook secret.

use chrono::{DateTime, Utc};
use futures_util::future::join_all;
use keymeter::config::Config;
use serde_json::{json, Value};

use crate::support::app::{redis_backend, redis_url, tiers_file};
use crate::support::{assert_problem, spawn_app, spawn_app_on, spawn_app_with, TestApp};

/// The test Redis as the rate-limit store; refusing rather than falling back, so a pass
/// cannot come from the in-memory limiter.
fn with_redis(c: &mut Config) {
    redis_backend(c, &redis_url(), true);
}

async fn json_of(res: reqwest::Response) -> Value {
    res.json().await.expect("JSON body")
}

/// A key made by `creator` through `POST /v1/keys`: (the response status, its body).
async fn create_via_api(app: &TestApp, creator: &str, body: Value) -> (u16, Value) {
    let res = app.post_json("/v1/keys", creator, body).await;
    let status = res.status().as_u16();
    (status, json_of(res).await)
}

fn at(v: &Value) -> DateTime<Utc> {
    v.as_str()
        .unwrap_or_else(|| panic!("a timestamp, got {v}"))
        .parse()
        .unwrap()
}

/// A self-serve account (on `pro`, so these tests do not run into the free tier's burst) with
/// its signup key (all scopes, never expires) and a login key (`keys:manage` + `read`, 12 h).
async fn signup_and_login(app: &TestApp) -> (String, String) {
    let email = format!("{}@example.com", uuid::Uuid::new_v4().simple());
    let password = "correct horse battery";
    let res = app.signup(&email, password).await;
    assert_eq!(res.status(), 201);
    let signed_up = json_of(res).await;
    let signup_key = signed_up["api_key"]["key"].as_str().unwrap().to_owned();
    let account = signed_up["account"]["id"].as_str().unwrap();
    let res = app
        .admin_post(
            &format!("/admin/accounts/{account}/tier"),
            json!({"tier": "pro"}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let res = app.login(&email, password).await;
    assert_eq!(res.status(), 201);
    let login_key = json_of(res).await["api_key"]["key"]
        .as_str()
        .unwrap()
        .to_owned();
    (signup_key, login_key)
}

#[tokio::test]
async fn many_keys_of_one_account_share_one_tier_limit() {
    let memory = spawn_app().await;
    let redis_a = spawn_app_with(with_redis).await;
    let redis_b = spawn_app_on(redis_a.db_name.clone(), with_redis).await;
    redis_a.wait_for_redis().await;
    redis_b.wait_for_redis().await;

    for (backend, apps) in [
        ("memory", vec![&memory]),
        ("redis", vec![&redis_a, &redis_b]),
    ] {
        // A free account (10/min, burst 5) and three more keys: four keys, one account.
        let (account, first) = apps[0].create_account("free", 0).await;
        let mut keys = vec![first];
        for _ in 0..3 {
            keys.push(apps[0].create_key(account, &["read"]).await.1);
        }
        let mut allowed = 0;
        for i in 0..20 {
            let app = apps[i % apps.len()];
            let res = app.get_with_key("/v1/account", &keys[i % keys.len()]).await;
            match res.status().as_u16() {
                200 => allowed += 1,
                429 => {
                    assert_eq!(res.headers()["ratelimit-policy"], "\"free\";q=10;w=60");
                    let p = assert_problem(res, 429, "rate_limited").await;
                    assert!(
                        p["detail"]
                            .as_str()
                            .unwrap()
                            .contains("across all its keys"),
                        "{p}"
                    );
                }
                s => panic!("{backend}: unexpected {s}"),
            }
        }
        // The burst of 5 is the account's; one more cell replenishes every 6 s, so a slow
        // machine may see a sixth — never the 20 that four per-key budgets gave.
        assert!(
            (5..=6).contains(&allowed),
            "{backend}: four keys of one free account got {allowed} of 20"
        );
        // Another account's budget is untouched.
        let (_, other) = apps[0].create_account("free", 0).await;
        assert_eq!(
            apps[0].get_with_key("/v1/account", &other).await.status(),
            200,
            "{backend}"
        );
    }
}

#[tokio::test]
async fn a_key_rate_limit_below_the_tier_is_enforced() {
    let app = spawn_app().await;
    // Pro: 120/min, burst 30.
    let (_, admin_key) = app.create_account("pro", 0).await;
    for bad in [json!(0), json!(121), json!(-1)] {
        let (status, p) = create_via_api(
            &app,
            &admin_key,
            json!({"scopes": ["read"], "rate_limit": bad}),
        )
        .await;
        assert_eq!(
            (status, &p["type"], &p["field"]),
            (422, &json!("validation_failed"), &json!("rate_limit")),
            "{bad}: {p}"
        );
    }
    let (status, slow) = create_via_api(
        &app,
        &admin_key,
        json!({"scopes": ["read"], "rate_limit": 3}),
    )
    .await;
    assert_eq!(status, 201, "{slow}");
    assert_eq!(slow["rate_limit"], 3, "shown in the key's JSON");
    let slow_key = slow["key"].as_str().unwrap();
    let shown = json_of(
        app.get_with_key(
            &format!("/v1/keys/{}", slow["id"].as_str().unwrap()),
            &admin_key,
        )
        .await,
    )
    .await;
    assert_eq!(shown["rate_limit"], 3);

    for i in 0..3 {
        let res = app.get_with_key("/v1/account", slow_key).await;
        assert_eq!(res.status(), 200, "request {i}");
        // The key's own limit binds (it has less left than the account), so it is reported.
        assert_eq!(res.headers()["ratelimit-policy"], "\"key\";q=3;w=60");
        assert_eq!(
            res.headers()["x-ratelimit-remaining"],
            (2 - i).to_string().as_str()
        );
    }
    for _ in 0..5 {
        let res = app.get_with_key("/v1/account", slow_key).await;
        assert_eq!(res.headers()["ratelimit-policy"], "\"key\";q=3;w=60");
        assert_eq!(res.headers()["retry-after"], "20", "3/min: one every 20 s");
        let p = assert_problem(res, 429, "rate_limited").await;
        assert!(
            p["detail"].as_str().unwrap().contains("This key allows 3"),
            "{p}"
        );
    }
    // The account's other keys are unaffected, and the five refused requests did not spend
    // the account's budget: nine requests passed its gate (this one included), so at least
    // 30 - 9 are left (more if cells replenished meanwhile, at 2 a second).
    let res = app.get_with_key("/v1/account", &admin_key).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["ratelimit-policy"], "\"pro\";q=120;w=60");
    let left: u32 = res.headers()["x-ratelimit-remaining"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(left >= 21, "{left} left");
}

#[tokio::test]
async fn an_account_cannot_hold_more_active_keys_than_its_tier_allows() {
    let tiers = tiers_file(
        "[tiers.small]\nrequests_per_minute = 6000\nburst = 1000\nmax_concurrent_jobs = 1\n\
         max_queued_jobs = 1\nmax_keys = 4\n",
    );
    let app = spawn_app_with(|c| c.tiers_path = Some(tiers.clone())).await;

    // The defaults are the documented ones, and shown with the account.
    for (tier, max) in [("free", 10), ("pro", 100), ("business", 1000)] {
        let (_, key) = app.create_account(tier, 0).await;
        let acct = json_of(app.get_with_key("/v1/account", &key).await).await;
        assert_eq!(acct["limits"]["max_keys"], max, "{tier}");
    }

    // One key from the account's creation, two more: three of four.
    let (account, owner) = app.create_account("small", 0).await;
    for _ in 0..2 {
        assert_eq!(
            create_via_api(&app, &owner, json!({"scopes": ["read"]}))
                .await
                .0,
            201
        );
    }
    // Eight at once for the last place: exactly one gets it.
    let racers =
        join_all((0..8).map(|_| app.post_json("/v1/keys", &owner, json!({"scopes": ["read"]}))))
            .await;
    let mut created = 0;
    for res in racers {
        match res.status().as_u16() {
            201 => created += 1,
            409 => {
                let p = assert_problem(res, 409, "key_limit_reached").await;
                assert_eq!(p["max_keys"], 4, "{p}");
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert_eq!(created, 1, "two creates at the cap must not both succeed");
    let active: i64 = app
        .db
        .query_one(
            "SELECT count(*) FROM api_keys WHERE account_id = $1 AND revoked_at IS NULL",
            &[&account],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(active, 4);

    // Rotation replaces a key, so it works at the cap and the old key leaves the count.
    let res = app
        .post_json(
            &format!("/v1/keys/{}/rotate", &owner[8..20]),
            &owner,
            json!({}),
        )
        .await;
    assert_eq!(res.status(), 201);
    let owner = json_of(res).await["key"].as_str().unwrap().to_owned();
    assert_problem(
        app.post_json("/v1/keys", &owner, json!({"scopes": ["read"]}))
            .await,
        409,
        "key_limit_reached",
    )
    .await;

    // Revoking one makes room again.
    let list = json_of(app.get_with_key("/v1/keys?limit=100", &owner).await).await;
    let victim = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["scopes"] == json!(["read"]) && k["revoked_at"].is_null())
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let res = app
        .client
        .delete(app.url(&format!("/v1/keys/{victim}")))
        .bearer_auth(&owner)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        create_via_api(&app, &owner, json!({"scopes": ["read"]}))
            .await
            .0,
        201
    );

    // Operators may go beyond the cap (the admin API is theirs, not the customer's).
    app.create_key(account, &["read"]).await;
    let _ = std::fs::remove_file(tiers);
}

/// `POST /v1/signup` with a body the handler refuses (422) — only the per-IP gate in front of
/// it matters here, and it answers without hashing a password.
async fn from_address(app: &TestApp, xff: &str, forwarded: Option<&str>) -> u16 {
    let mut req = app
        .client
        .post(app.url("/v1/signup"))
        .header("X-Forwarded-For", xff)
        .json(&json!({"email": "not-an-email", "password": "x"}));
    if let Some(f) = forwarded {
        req = req.header("Forwarded", f);
    }
    req.send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn a_forged_forwarded_for_hop_does_not_change_the_client_address() {
    // Our proxies: the test client (127.0.0.1, the TCP peer) and 10.0.0.0/8 behind it.
    let app = spawn_app_with(|c| {
        c.trust_forwarded = true;
        c.trusted_proxies = vec![
            "127.0.0.1/32".parse().unwrap(),
            "10.0.0.0/8".parse().unwrap(),
        ];
        // One cell a minute: no replenishing while the test runs, however slow the machine.
        c.ip_rate_per_minute = 1;
        c.ip_burst = 3;
    })
    .await;
    // The client 203.0.113.7 writes a fresh first hop (and a `Forwarded: for=`) each time;
    // our proxies append what they saw.
    let mut statuses = Vec::new();
    for i in 0..5 {
        let forged = format!("198.51.100.{i}");
        statuses.push(
            from_address(
                &app,
                &format!("{forged}, 203.0.113.7, 10.0.0.5"),
                Some(&format!("for={forged}")),
            )
            .await,
        );
    }
    assert_eq!(
        statuses,
        vec![422, 422, 422, 429, 429],
        "one client, one budget"
    );
    // Another client behind the same proxies has its own.
    assert_eq!(from_address(&app, "203.0.113.8, 10.0.0.5", None).await, 422);
}

#[tokio::test]
async fn ipv6_clients_share_one_limit_per_64() {
    let app = spawn_app_with(|c| {
        c.trust_forwarded = true;
        // One cell a minute: no replenishing while the test runs, however slow the machine.
        c.ip_rate_per_minute = 1;
        c.ip_burst = 3;
    })
    .await;
    let mut statuses = Vec::new();
    for addr in [
        "2001:db8:1:2::1",
        "2001:db8:1:2::2",
        "2001:db8:1:2:ffff:ffff:ffff:fffe",
        "2001:db8:1:2:abcd::4",
    ] {
        statuses.push(from_address(&app, addr, None).await);
    }
    assert_eq!(statuses, vec![422, 422, 422, 429], "one /64, one budget");
    // The neighbouring /64 is another client.
    assert_eq!(from_address(&app, "2001:db8:1:3::1", None).await, 422);
}

#[tokio::test]
async fn a_login_key_cannot_mint_a_key_with_more_scopes() {
    let app = spawn_app().await;
    let (_, login_key) = signup_and_login(&app).await;
    let (status, p) = create_via_api(
        &app,
        &login_key,
        json!({"name": "escalate", "scopes": ["read", "scrape", "billing"]}),
    )
    .await;
    assert_eq!(status, 403, "{p}");
    assert_eq!(p["type"], "insufficient_scope");
    assert_eq!(p["missing_scopes"], json!(["scrape", "billing"]));
    let detail = p["detail"].as_str().unwrap();
    assert!(
        detail.contains("scrape") && detail.contains("billing"),
        "{detail}"
    );
    // The default scopes (`scrape`, `read`) are more than a login key has, too.
    let (status, p) = create_via_api(&app, &login_key, json!({})).await;
    assert_eq!(
        (status, &p["missing_scopes"]),
        (403, &json!(["scrape"])),
        "{p}"
    );
    // What it has, it may hand on.
    let (status, k) = create_via_api(&app, &login_key, json!({"scopes": ["read"]})).await;
    assert_eq!(status, 201, "{k}");
    assert_eq!(k["scopes"], json!(["read"]));
}

#[tokio::test]
async fn a_key_cannot_outlive_its_creator() {
    let app = spawn_app().await;
    let (_, owner) = app.create_account("pro", 0).await;
    let in_an_hour = Utc::now() + chrono::Duration::hours(1);
    let (status, creator) = create_via_api(
        &app,
        &owner,
        json!({"scopes": ["keys:manage", "read"], "expires_at": in_an_hour}),
    )
    .await;
    assert_eq!(status, 201, "{creator}");
    let creator_key = creator["key"].as_str().unwrap();
    let creator_end = at(&creator["expires_at"]);

    // Asked for a later expiry: refused.
    let (status, p) = create_via_api(
        &app,
        creator_key,
        json!({"scopes": ["read"], "expires_at": Utc::now() + chrono::Duration::days(30)}),
    )
    .await;
    assert_eq!(
        (status, &p["type"]),
        (403, &json!("insufficient_scope")),
        "{p}"
    );
    assert_eq!(p["missing_scopes"], json!([]));
    // No expiry asked: it inherits its creator's.
    let (status, k) = create_via_api(&app, creator_key, json!({"scopes": ["read"]})).await;
    assert_eq!(status, 201, "{k}");
    assert_eq!(at(&k["expires_at"]), creator_end);
    // An earlier one is fine.
    let sooner = Utc::now() + chrono::Duration::minutes(30);
    let (status, k) = create_via_api(
        &app,
        creator_key,
        json!({"scopes": ["read"], "expires_at": sooner}),
    )
    .await;
    assert_eq!(status, 201, "{k}");
    assert!(at(&k["expires_at"]) < creator_end);

    // A key in its rotation grace ends with the grace: what it creates ends then too.
    let (_, never) = create_via_api(&app, &owner, json!({"scopes": ["keys:manage", "read"]})).await;
    let never_key = never["key"].as_str().unwrap();
    let res = app
        .post_json(
            &format!("/v1/keys/{}/rotate", &never_key[8..20]),
            &owner,
            json!({"grace_seconds": 600}),
        )
        .await;
    assert_eq!(res.status(), 201);
    let (status, k) = create_via_api(&app, never_key, json!({"scopes": ["read"]})).await;
    assert_eq!(status, 201, "{k}");
    let grace_until = at(&json_of(
        app.get_with_key(&format!("/v1/keys/{}", &never_key[8..20]), &owner)
            .await,
    )
    .await["grace_until"]);
    assert_eq!(at(&k["expires_at"]), grace_until);
}

#[tokio::test]
async fn rotation_keeps_the_old_keys_scopes_and_expiry() {
    let app = spawn_app().await;
    let (signup_key, login_key) = signup_and_login(&app).await;

    // A login key (keys:manage + read, 12 hours) rotating the never-expiring signup key would
    // be handed a full-power successor: refused.
    let res = app
        .post_json(
            &format!("/v1/keys/{}/rotate", &signup_key[8..20]),
            &login_key,
            json!({}),
        )
        .await;
    let p = assert_problem(res, 403, "insufficient_scope").await;
    assert_eq!(p["missing_scopes"], json!(["scrape", "billing"]));
    // The signup key was not touched.
    assert_eq!(
        app.get_with_key("/v1/account", &signup_key).await.status(),
        200
    );

    // A key it could have made itself, it may rotate: the successor keeps the old key's
    // scopes, expiry and rate limit, and a body asking for others is refused.
    let in_an_hour = Utc::now() + chrono::Duration::hours(1);
    let (status, old) = create_via_api(
        &app,
        &login_key,
        json!({"scopes": ["read"], "expires_at": in_an_hour, "rate_limit": 4}),
    )
    .await;
    assert_eq!(status, 201, "{old}");
    let rotate = format!("/v1/keys/{}/rotate", old["id"].as_str().unwrap());
    for body in [
        json!({"scopes": ["read", "scrape", "billing", "keys:manage"]}),
        json!({"expires_at": null}),
    ] {
        assert_problem(
            app.post_json(&rotate, &login_key, body).await,
            422,
            "validation_failed",
        )
        .await;
    }
    let res = app.post_json(&rotate, &login_key, json!({})).await;
    assert_eq!(res.status(), 201);
    let new = json_of(res).await;
    assert_eq!(new["scopes"], json!(["read"]));
    assert_eq!(at(&new["expires_at"]), at(&old["expires_at"]));
    assert_eq!(new["rate_limit"], 4);
}

#[tokio::test]
async fn the_webhook_secret_is_shown_only_to_keys_that_manage_keys() {
    let app = spawn_app().await;
    let (account, manager) = app.create_account("pro", 0).await;
    let (_, reader) = app.create_key(account, &["read", "scrape"]).await;
    let full = json_of(app.get_with_key("/v1/account", &manager).await).await;
    assert!(
        full["webhook_secret"]
            .as_str()
            .is_some_and(|s| s.starts_with("whsec_")),
        "{full}"
    );
    let res = app.get_with_key("/v1/account", &reader).await;
    assert_eq!(res.status(), 200);
    let limited = json_of(res).await;
    assert!(
        limited.get("webhook_secret").is_none(),
        "a key without keys:manage never sees it: {limited}"
    );
    assert_eq!(limited["id"], full["id"]);
}
