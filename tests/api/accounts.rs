//! Signup, login and its lockout, the account view, and the admin API's guard.

use serde_json::{json, Value};

use crate::support::{assert_problem, spawn_app, spawn_app_with};

#[tokio::test]
async fn signup_creates_an_account_with_starting_credits_and_a_working_key() {
    let app = spawn_app_with(|c| c.signup_credits = 25).await;
    let res = app.signup("new@example.com", "correct horse battery").await;
    assert_eq!(res.status(), 201);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["account"]["tier"], "free");
    assert_eq!(body["account"]["credit_balance"], 25);
    let key = body["api_key"]["key"].as_str().unwrap();
    assert!(key.starts_with("km_live_") && key.len() == 70);
    assert_eq!(
        body["api_key"]["scopes"],
        json!(["scrape", "read", "keys:manage", "billing"])
    );

    let res = app.get_with_key("/v1/account", key).await;
    assert_eq!(res.status(), 200);
    let acct: Value = res.json().await.unwrap();
    assert_eq!(acct["email"], "new@example.com");
    assert_eq!(acct["credit_balance"], 25);
    assert_eq!(acct["limits"]["requests_per_minute"], 10);
    assert_eq!(acct["limits"]["max_concurrent_jobs"], 2);

    // The starting credits went through the ledger.
    let row = app
        .db
        .query_one(
            "SELECT kind, delta, balance_after FROM credit_ledger WHERE account_id = $1",
            &[&acct["id"].as_str().unwrap().parse::<uuid::Uuid>().unwrap()],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "grant");
    assert_eq!(row.get::<_, i64>(1), 25);
    assert_eq!(row.get::<_, i64>(2), 25);

    // The password is stored as Argon2id, the key as a digest: neither in plaintext.
    let dump = app.dump_all_rows().await;
    assert!(!dump.contains("correct horse battery"));
    assert!(!dump.contains(key));
    assert!(
        !dump.contains(&key[21..64]),
        "the secret part is not stored"
    );
    assert!(dump.contains("$argon2id$v=19$m=19456,t=2,p=1$"));
}

#[tokio::test]
async fn signup_refuses_bad_input_with_422_and_writes_nothing() {
    let app = spawn_app().await;
    let p = assert_problem(
        app.signup("not-an-email", "long enough pw").await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(p["field"], "email");
    let p = assert_problem(
        app.signup("ok@example.com", "short").await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(p["field"], "password");
    assert_problem(
        app.signup("ok@example.com", &"x".repeat(129)).await,
        422,
        "validation_failed",
    )
    .await;
    let res = app
        .client
        .post(app.url("/v1/signup"))
        .json(&json!({"email": "ok@example.com"}))
        .send()
        .await
        .unwrap();
    assert_problem(res, 422, "validation_failed").await;
    let res = app
        .client
        .post(app.url("/v1/signup"))
        .header("content-type", "application/json")
        .body("{\"email\": ")
        .send()
        .await
        .unwrap();
    assert_problem(res, 400, "invalid_json").await;
    let n: i64 = app
        .db
        .query_one("SELECT count(*) FROM accounts", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn a_chunked_signup_body_over_the_limit_is_413() {
    let app = spawn_app().await;
    let big = format!(
        "{{\"email\":\"a@example.com\",\"password\":\"{}\"}}",
        "x".repeat(70_000)
    );
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = big
        .into_bytes()
        .chunks(8192)
        .map(|c| Ok(c.to_vec()))
        .collect();
    let res = app
        .client
        .post(app.url("/v1/signup"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_problem(res, 413, "payload_too_large").await;
}

#[tokio::test]
async fn emails_are_unique_regardless_of_case() {
    let app = spawn_app().await;
    assert_eq!(
        app.signup("Dup@Example.com", "password123").await.status(),
        201
    );
    assert_problem(
        app.signup("dup@example.COM", "password456").await,
        409,
        "email_taken",
    )
    .await;
}

#[tokio::test]
async fn signup_can_be_disabled() {
    let app = spawn_app_with(|c| c.signup_enabled = false).await;
    assert_problem(
        app.signup("x@example.com", "password123").await,
        404,
        "feature_disabled",
    )
    .await;
}

#[tokio::test]
async fn login_issues_a_twelve_hour_key_that_can_manage_keys_and_read() {
    let app = spawn_app().await;
    assert_eq!(
        app.signup("me@example.com", "password123").await.status(),
        201
    );
    let res = app.login("ME@example.com", "password123").await;
    assert_eq!(res.status(), 201);
    let body: Value = res.json().await.unwrap();
    let k = &body["api_key"];
    assert_eq!(k["scopes"], json!(["keys:manage", "read"]));
    assert!(k["name"].as_str().unwrap().starts_with("login "));
    let expires: chrono::DateTime<chrono::Utc> = k["expires_at"].as_str().unwrap().parse().unwrap();
    let hours = (expires - chrono::Utc::now()).num_minutes() as f64 / 60.0;
    assert!((11.9..=12.0).contains(&hours), "{hours}");
    let key = k["key"].as_str().unwrap();
    assert_eq!(app.get_with_key("/v1/account", key).await.status(), 200);
    // It can create keys, but none with more than it has (a scrape key is the signup
    // key's to make; see isolation::limits).
    let res = app
        .post_json("/v1/keys", key, json!({"name": "ci", "scopes": ["read"]}))
        .await;
    assert_eq!(res.status(), 201);
    let res = app
        .post_json("/v1/keys", key, json!({"name": "ci", "scopes": ["scrape"]}))
        .await;
    assert_problem(res, 403, "insufficient_scope").await;
}

#[tokio::test]
async fn five_failed_logins_lock_the_email_for_fifteen_minutes_whether_or_not_it_exists() {
    let app = spawn_app_with(|c| {
        // Keep the per-IP failure throttle out of the way: this test is about the email.
        c.auth_failures_per_minute = 1000;
        c.ip_rate_per_minute = 1000;
        c.ip_burst = 1000;
    })
    .await;
    assert_eq!(
        app.signup("victim@example.com", "password123")
            .await
            .status(),
        201
    );
    for email in ["victim@example.com", "nobody@example.com"] {
        for _ in 0..5 {
            assert_problem(
                app.login(email, "wrong-password").await,
                401,
                "invalid_credentials",
            )
            .await;
        }
        // Locked now, even with the right password, and the answer looks the same for both.
        let res = app.login(email, "password123").await;
        let retry: u64 = res.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((14 * 60..=15 * 60).contains(&retry), "{retry}");
        let p = assert_problem(res, 429, "rate_limited").await;
        assert_eq!(
            p["detail"],
            "Too many failed logins for this email; try again later."
        );
    }
}

#[tokio::test]
async fn failed_logins_are_also_throttled_per_client_ip() {
    let app = spawn_app_with(|c| c.auth_failures_per_minute = 3).await;
    // Spread over different emails so the per-email lockout does not kick in.
    for i in 0..4 {
        let _ = app
            .login(&format!("u{i}@example.com"), "wrong-password")
            .await;
    }
    // The address is now throttled even for key-authenticated routes.
    let res = app.get_with_key("/v1/account", "km_live_garbage").await;
    assert!(res.headers().contains_key("retry-after"));
    assert_problem(res, 429, "rate_limited").await;
}

#[tokio::test]
async fn the_admin_api_needs_the_admin_token_and_is_absent_without_one() {
    let app = spawn_app().await;
    let res = app
        .client
        .post(app.url("/admin/accounts"))
        .json(&json!({"email": "x@example.com"}))
        .send()
        .await
        .unwrap();
    assert_problem(res, 401, "invalid_admin_token").await;
    let res = app
        .client
        .post(app.url("/admin/accounts"))
        .bearer_auth("test-admin-token-0123456789abcdef012X")
        .json(&json!({"email": "x@example.com"}))
        .send()
        .await
        .unwrap();
    assert_problem(res, 401, "invalid_admin_token").await;

    let off = spawn_app_with(|c| c.admin_token = None).await;
    let res = off
        .client
        .post(off.url("/admin/accounts"))
        .bearer_auth("anything")
        .json(&json!({"email": "x@example.com"}))
        .send()
        .await
        .unwrap();
    assert_problem(res, 404, "not_found").await;
}

#[tokio::test]
async fn operators_manage_accounts_over_the_admin_api() {
    let app = spawn_app().await;
    let (account, key) = app.create_account("pro", 100).await;
    let acct: Value = app
        .get_with_key("/v1/account", &key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(acct["tier"], "pro");
    assert_eq!(acct["credit_balance"], 100);

    let res = app
        .admin_post(
            &format!("/admin/accounts/{account}/tier"),
            json!({"tier": "business"}),
        )
        .await;
    assert_eq!(res.status(), 200);
    let res = app.get_with_key("/v1/account", &key).await;
    assert_eq!(res.headers()["x-ratelimit-limit"], "1200");

    let res = app
        .admin_post(
            &format!("/admin/accounts/{account}/tier"),
            json!({"tier": "platinum"}),
        )
        .await;
    assert_problem(res, 422, "validation_failed").await;

    assert_eq!(
        app.admin_post(&format!("/admin/accounts/{account}/suspend"), json!({}))
            .await
            .status(),
        200
    );
    assert_problem(
        app.get_with_key("/v1/account", &key).await,
        401,
        "invalid_api_key",
    )
    .await;
    assert_eq!(
        app.admin_post(&format!("/admin/accounts/{account}/unsuspend"), json!({}))
            .await
            .status(),
        200
    );
    assert_eq!(app.get_with_key("/v1/account", &key).await.status(), 200);

    let res = app
        .admin_post(
            &format!("/admin/accounts/{}/tier", uuid::Uuid::now_v7()),
            json!({"tier": "pro"}),
        )
        .await;
    assert_problem(res, 404, "not_found").await;
}

#[tokio::test]
async fn concurrent_account_reads_each_get_their_own_fresh_account() {
    let app = spawn_app().await;
    let mut accounts = Vec::new();
    for i in 0..8 {
        accounts.push(app.create_account("internal", 100 + i).await);
    }
    let reads = (0..64).map(|n| {
        let (id, key) = accounts[n % accounts.len()].clone();
        let app = &app;
        async move {
            let body: serde_json::Value = app
                .get_with_key("/v1/account", &key)
                .await
                .json()
                .await
                .unwrap();
            (id, body)
        }
    });
    for (id, body) in futures_util::future::join_all(reads).await {
        assert_eq!(body["id"], id.to_string());
        let i = accounts.iter().position(|(a, _)| *a == id).unwrap() as i64;
        assert_eq!(body["credit_balance"], 100 + i);
    }
    // A charge is visible to the very next read.
    let (id, key) = accounts[0].clone();
    let res = app
        .post_json("/v1/credits/charge", &key, serde_json::json!({"amount": 7}))
        .await;
    assert_eq!(res.status(), 201);
    let body: serde_json::Value = app
        .get_with_key("/v1/account", &key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(body["id"], id.to_string());
    assert_eq!(body["credit_balance"], 93);
}
