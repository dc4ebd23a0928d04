//! Each default tier gets exactly its burst, then 429 with Retry-After; every limited
//! response carries the limit headers.

use futures_util::future::join_all;

use crate::support::app::{redis_backend, redis_url, tiers_file};
use crate::support::{assert_problem, spawn_app, spawn_app_on, spawn_app_with};

#[tokio::test]
async fn each_default_tier_refuses_exactly_after_its_burst() {
    let app = spawn_app().await;
    for (tier, rpm, burst, retry_after) in [
        ("free", 10, 5, 6),
        ("pro", 120, 30, 1),
        ("business", 1200, 200, 1),
    ] {
        let (_, key) = app.create_account(tier, 0).await;
        // Sequential, so the limiter sees them in order; a burst is served well within the
        // time one cell takes to replenish for free (6 s) and pro (0.5 s) — for business
        // (50 ms per cell) a few may replenish while we go, so allow that.
        let mut allowed = 0;
        let mut refused = None;
        for _ in 0..(burst + 50) {
            let res = app.get_with_key("/v1/account", &key).await;
            let h = res.headers();
            assert_eq!(h["x-ratelimit-limit"], rpm.to_string().as_str());
            assert_eq!(
                h["ratelimit-policy"],
                format!("\"{tier}\";q={rpm};w=60").as_str()
            );
            assert!(h.contains_key("ratelimit") && h.contains_key("x-ratelimit-reset"));
            if res.status() == 429 {
                refused = Some(res);
                break;
            }
            assert_eq!(res.status(), 200);
            if tier != "business" {
                assert_eq!(
                    h["x-ratelimit-remaining"],
                    (burst - 1 - allowed).to_string().as_str()
                );
            }
            allowed += 1;
        }
        let res = refused.unwrap_or_else(|| panic!("{tier}: never refused"));
        if tier == "business" {
            assert!((burst..burst + 50).contains(&allowed), "{tier}: {allowed}");
        } else {
            assert_eq!(allowed, burst, "{tier}");
        }
        assert_eq!(
            res.headers()["retry-after"],
            retry_after.to_string().as_str(),
            "{tier}"
        );
        assert_eq!(res.headers()["x-ratelimit-remaining"], "0");
        let p = assert_problem(res, 429, "rate_limited").await;
        assert_eq!(p["retry_after"], retry_after);
    }
}

#[tokio::test]
async fn limits_are_per_account_and_headers_ride_on_errors_too() {
    let app = spawn_app().await;
    let (account, key1) = app.create_account("free", 0).await;
    let (_, key2) = app.create_key(account, &["scrape"]).await;
    let (other_account, _) = app.create_account("free", 0).await;
    let (_, other) = app.create_key(other_account, &["scrape"]).await;
    for _ in 0..5 {
        assert_eq!(app.get_with_key("/v1/account", &key1).await.status(), 200);
    }
    assert_eq!(app.get_with_key("/v1/account", &key1).await.status(), 429);
    // The account's other key shares its budget.
    assert_eq!(app.get_with_key("/v1/account", &key2).await.status(), 429);
    // Another account has its own, and a handler's own refusal (403) still carries the
    // limit headers.
    let res = app.get_with_key("/v1/account", &other).await;
    assert_eq!(res.headers()["x-ratelimit-remaining"], "4");
    assert_problem(res, 403, "insufficient_scope").await;
}

#[tokio::test]
async fn the_internal_tier_is_unlimited() {
    let app = spawn_app().await;
    let (_, key) = app.create_account("internal", 0).await;
    let results = join_all((0..300).map(|_| app.get_with_key("/v1/account", &key))).await;
    assert!(results.iter().all(|r| r.status() == 200));
    assert!(results[0].headers().get("x-ratelimit-limit").is_none());
}

#[tokio::test]
async fn unauthenticated_routes_are_limited_per_ip() {
    let app = spawn_app_with(|c| {
        c.ip_rate_per_minute = 60;
        c.ip_burst = 3;
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let res = app.login("a@example.com", "whatever123").await;
        assert_eq!(res.headers()["ratelimit-policy"], "\"ip\";q=60;w=60");
        statuses.push(res.status().as_u16());
    }
    assert_eq!(statuses, vec![401, 401, 401, 429]);
}

#[tokio::test]
async fn a_tiers_file_changes_the_limits() {
    let tiers = tiers_file(
        "[tiers.free]\nrequests_per_minute = 60\nburst = 2\nmax_concurrent_jobs = 1\nmax_queued_jobs = 1\n",
    );
    let app = spawn_app_with(|c| c.tiers_path = Some(tiers.clone())).await;
    let (_, key) = app.create_account("free", 0).await;
    assert_eq!(app.get_with_key("/v1/account", &key).await.status(), 200);
    assert_eq!(app.get_with_key("/v1/account", &key).await.status(), 200);
    let res = app.get_with_key("/v1/account", &key).await;
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["retry-after"], "1");
    let _ = std::fs::remove_file(tiers);
}

#[tokio::test]
async fn two_instances_with_the_redis_backend_share_one_limit() {
    let a = spawn_app_with(|c| redis_backend(c, &redis_url(), true)).await;
    let b = spawn_app_on(a.db_name.clone(), |c| redis_backend(c, &redis_url(), true)).await;
    let (_, key) = a.create_account("free", 0).await;
    // Wait until both are connected to Redis (refuse mode answers 503 until then).
    for app in [&a, &b] {
        app.wait_for_redis().await;
    }
    let mut statuses = Vec::new();
    for i in 0..6 {
        let app = if i % 2 == 0 { &a } else { &b };
        let res = app.get_with_key("/v1/account", &key).await;
        if res.status() == 200 {
            assert_eq!(
                res.headers()["x-ratelimit-remaining"],
                (4 - i).to_string().as_str()
            );
        }
        statuses.push(res.status().as_u16());
    }
    assert_eq!(
        statuses,
        vec![200, 200, 200, 200, 200, 429],
        "the burst of 5 is shared"
    );
}

#[tokio::test]
async fn without_redis_the_limiter_falls_back_to_memory_or_refuses_as_configured() {
    let fallback = spawn_app_with(|c| redis_backend(c, "redis://127.0.0.1:1/", false)).await;
    let (_, key) = fallback.create_account("free", 0).await;
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(
            fallback
                .get_with_key("/v1/account", &key)
                .await
                .status()
                .as_u16(),
        );
    }
    assert_eq!(statuses, vec![200, 200, 200, 200, 200, 429]);

    let strict = spawn_app_with(|c| redis_backend(c, "redis://127.0.0.1:1/", true)).await;
    let (_, key) = strict.create_account("free", 0).await;
    assert_problem(
        strict.get_with_key("/v1/account", &key).await,
        503,
        "rate_limiter_unavailable",
    )
    .await;
    // Unlimited tiers never consult the limiter.
    let (_, internal) = strict.create_account("internal", 0).await;
    assert_eq!(
        strict.get_with_key("/v1/account", &internal).await.status(),
        200
    );
}
