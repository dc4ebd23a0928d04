//! API keys through HTTP: every refusal, scopes, listing, revocation, rotation, and a second
//! instance seeing a revocation.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::keys::forge_key;
use crate::support::{assert_problem, spawn_app, spawn_app_on};

async fn assert_invalid_key(res: reqwest::Response) -> Value {
    assert_eq!(res.headers()["www-authenticate"], "Bearer");
    let mut p = assert_problem(res, 401, "invalid_api_key").await;
    p.as_object_mut().unwrap().remove("request_id");
    p
}

#[tokio::test]
async fn every_bad_key_is_the_same_401() {
    let app = spawn_app().await;
    let (_, key) = app.create_account("internal", 0).await;

    let missing = app.client.get(app.url("/v1/account")).send().await.unwrap();
    let reference = assert_invalid_key(missing).await;

    let mut wrong_secret = key.clone().into_bytes();
    // Change the secret and recompute nothing: the checksum now fails.
    wrong_secret[30] = if wrong_secret[30] == b'A' { b'B' } else { b'A' };
    let bad_checksum = String::from_utf8(wrong_secret).unwrap();

    // A well-formed key (valid checksum) for an id that does not exist, and one with this
    // key's id but another secret: built with the key format's own rules.
    let other = {
        let (_, k2) = app.create_account("internal", 0).await;
        k2
    };
    let unknown_id = forge_key("ZZZZZZZZZZZZ", &other[21..64]);
    let wrong_secret = forge_key(&key[8..20], &other[21..64]);

    for candidate in [
        "not-a-key".to_owned(),
        key[..69].to_owned(),
        bad_checksum,
        unknown_id,
        wrong_secret,
        key.replacen("km_live_", "km_test_", 1),
    ] {
        let res = app.get_with_key("/v1/account", &candidate).await;
        assert_eq!(assert_invalid_key(res).await, reference, "{candidate}");
        let res = app
            .client
            .get(app.url("/v1/account"))
            .header("X-API-Key", &candidate)
            .send()
            .await
            .unwrap();
        assert_eq!(assert_invalid_key(res).await, reference, "{candidate}");
    }
    // The real key works through both headers.
    assert_eq!(app.get_with_key("/v1/account", &key).await.status(), 200);
    let res = app
        .client
        .get(app.url("/v1/account"))
        .header("X-API-Key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn a_key_without_the_scope_gets_403() {
    let app = spawn_app().await;
    let (account, _) = app.create_account("internal", 0).await;
    let (_, scrape_only) = app.create_key(account, &["scrape"]).await;
    let p = assert_problem(
        app.get_with_key("/v1/account", &scrape_only).await,
        403,
        "insufficient_scope",
    )
    .await;
    assert_eq!(p["required_scope"], "read");
    let (_, read_only) = app.create_key(account, &["read"]).await;
    assert_eq!(app.get_with_key("/v1/keys", &read_only).await.status(), 200);
    assert_problem(
        app.post_json("/v1/keys", &read_only, json!({"name": "x"}))
            .await,
        403,
        "insufficient_scope",
    )
    .await;
}

#[tokio::test]
async fn keys_are_created_once_listed_without_secrets_and_paginated() {
    let app = spawn_app().await;
    let (_, admin_key) = app.create_account("internal", 0).await;
    let mut created = Vec::new();
    for i in 0..5 {
        let res = app
            .post_json(
                "/v1/keys",
                &admin_key,
                json!({"name": format!("k{i}"), "scopes": ["scrape", "read"]}),
            )
            .await;
        assert_eq!(res.status(), 201);
        let body: Value = res.json().await.unwrap();
        created.push((
            body["id"].as_str().unwrap().to_owned(),
            body["key"].as_str().unwrap().to_owned(),
        ));
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/keys?limit=2&cursor={c}"),
            None => "/v1/keys?limit=2".to_owned(),
        };
        let page: Value = app
            .get_with_key(&path, &admin_key)
            .await
            .json()
            .await
            .unwrap();
        let text = page.to_string();
        for (_, plaintext) in &created {
            assert!(!text.contains(&plaintext[21..64]), "no secret in a listing");
        }
        assert!(page["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|k| k.get("key").is_none()));
        for k in page["data"].as_array().unwrap() {
            seen.push(k["id"].as_str().unwrap().to_owned());
        }
        if page["has_more"] == true {
            cursor = Some(page["next_cursor"].as_str().unwrap().to_owned());
        } else {
            break;
        }
    }
    assert_eq!(seen.len(), 6, "five created plus the first key");
    // Newest first.
    let newest: Vec<String> = created.iter().rev().map(|(id, _)| id.clone()).collect();
    assert_eq!(&seen[..5], &newest[..]);
    assert_problem(
        app.get_with_key("/v1/keys?limit=1000", &admin_key).await,
        422,
        "validation_failed",
    )
    .await;
    assert_problem(
        app.get_with_key("/v1/keys?cursor=garbage", &admin_key)
            .await,
        400,
        "invalid_request",
    )
    .await;
    let p = assert_problem(
        app.post_json("/v1/keys", &admin_key, json!({"scopes": ["root"]}))
            .await,
        422,
        "validation_failed",
    )
    .await;
    assert_eq!(p["field"], "scopes");
    assert_problem(
        app.post_json(
            "/v1/keys",
            &admin_key,
            json!({"expires_at": "2001-01-01T00:00:00Z"}),
        )
        .await,
        422,
        "validation_failed",
    )
    .await;
}

#[tokio::test]
async fn a_key_only_sees_its_own_accounts_keys() {
    let app = spawn_app().await;
    let (_, alice) = app.create_account("internal", 0).await;
    let (_, bob) = app.create_account("internal", 0).await;
    let bob_id = &bob[8..20];
    assert_problem(
        app.get_with_key(&format!("/v1/keys/{bob_id}"), &alice)
            .await,
        404,
        "not_found",
    )
    .await;
    let res = app
        .client
        .delete(app.url(&format!("/v1/keys/{bob_id}")))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_problem(res, 404, "not_found").await;
    assert_problem(
        app.post_json(&format!("/v1/keys/{bob_id}/rotate"), &alice, json!({}))
            .await,
        404,
        "not_found",
    )
    .await;
    assert_eq!(app.get_with_key("/v1/account", &bob).await.status(), 200);
}

#[tokio::test]
async fn a_revoked_key_is_refused_and_a_key_may_revoke_itself() {
    let app = spawn_app().await;
    let (_, key) = app.create_account("internal", 0).await;
    assert_eq!(app.get_with_key("/v1/account", &key).await.status(), 200);
    let res = app
        .client
        .delete(app.url(&format!("/v1/keys/{}", &key[8..20])))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert!(body["revoked_at"].is_string());
    assert_invalid_key(app.get_with_key("/v1/account", &key).await).await;
}

#[tokio::test]
async fn an_expired_key_is_refused() {
    let app = spawn_app().await;
    let (account, admin_key) = app.create_account("internal", 0).await;
    let expires = chrono::Utc::now() + chrono::Duration::milliseconds(1500);
    let res = app
        .post_json(
            "/v1/keys",
            &admin_key,
            json!({"scopes": ["read"], "expires_at": expires}),
        )
        .await;
    let short: Value = res.json().await.unwrap();
    let short_key = short["key"].as_str().unwrap();
    assert_eq!(
        app.get_with_key("/v1/account", short_key).await.status(),
        200
    );
    tokio::time::sleep(Duration::from_millis(1700)).await;
    assert_invalid_key(app.get_with_key("/v1/account", short_key).await).await;
    let _ = account;
}

#[tokio::test]
async fn rotation_keeps_the_old_key_working_until_the_grace_ends() {
    let app = spawn_app().await;
    let (_, old) = app.create_account("internal", 0).await;
    let res = app
        .post_json(
            &format!("/v1/keys/{}/rotate", &old[8..20]),
            &old,
            json!({"grace_seconds": 2}),
        )
        .await;
    assert_eq!(res.status(), 201);
    let new: Value = res.json().await.unwrap();
    let new_key = new["key"].as_str().unwrap();
    assert_eq!(
        new["scopes"],
        json!(["scrape", "read", "keys:manage", "billing"])
    );
    assert_eq!(
        app.get_with_key("/v1/account", &old).await.status(),
        200,
        "in grace"
    );
    assert_eq!(app.get_with_key("/v1/account", new_key).await.status(), 200);
    let listed: Value = app
        .get_with_key(&format!("/v1/keys/{}", &old[8..20]), new_key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(listed["rotated_to"], new["id"]);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_invalid_key(app.get_with_key("/v1/account", &old).await).await;
    assert_eq!(app.get_with_key("/v1/account", new_key).await.status(), 200);

    // A rotated key cannot be rotated again; the grace is bounded.
    assert_problem(
        app.post_json(
            &format!("/v1/keys/{}/rotate", &old[8..20]),
            new_key,
            json!({}),
        )
        .await,
        409,
        "key_already_rotated",
    )
    .await;
    assert_problem(
        app.post_json(
            &format!("/v1/keys/{}/rotate", &new_key[8..20]),
            new_key,
            json!({"grace_seconds": 86401}),
        )
        .await,
        422,
        "validation_failed",
    )
    .await;
    // No body at all uses the default grace.
    let res = app
        .client
        .post(app.url(&format!("/v1/keys/{}/rotate", &new_key[8..20])))
        .bearer_auth(new_key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let newest: Value = res.json().await.unwrap();
    let old_view: Value = app
        .get_with_key(
            &format!("/v1/keys/{}", &new_key[8..20]),
            newest["key"].as_str().unwrap(),
        )
        .await
        .json()
        .await
        .unwrap();
    let grace_until: chrono::DateTime<chrono::Utc> =
        old_view["grace_until"].as_str().unwrap().parse().unwrap();
    let secs = (grace_until - chrono::Utc::now()).num_seconds();
    assert!((3590..=3600).contains(&secs), "{secs}");
}

#[tokio::test]
async fn a_revocation_reaches_a_second_instance_within_a_second() {
    let a = spawn_app().await;
    let b = spawn_app_on(a.db_name.clone(), |_| {}).await;
    let (_, key) = a.create_account("internal", 0).await;
    // Warm B's cache with the key.
    assert_eq!(b.get_with_key("/v1/account", &key).await.status(), 200);
    assert_eq!(b.get_with_key("/v1/account", &key).await.status(), 200);
    let res = a
        .client
        .delete(a.url(&format!("/v1/keys/{}", &key[8..20])))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let revoked = Instant::now();
    loop {
        let status = b.get_with_key("/v1/account", &key).await.status();
        if status == 401 {
            break;
        }
        assert!(
            revoked.elapsed() < Duration::from_secs(1),
            "still accepted after 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Same for a tier change: B applies the new tier on the next request.
    let (account, key2) = a.create_account("pro", 0).await;
    assert_eq!(
        b.get_with_key("/v1/account", &key2).await.headers()["x-ratelimit-limit"],
        "120"
    );
    a.admin_post(
        &format!("/admin/accounts/{account}/tier"),
        json!({"tier": "business"}),
    )
    .await;
    let changed = Instant::now();
    loop {
        let res = b.get_with_key("/v1/account", &key2).await;
        if res.headers()["x-ratelimit-limit"] == "1200" {
            break;
        }
        assert!(
            changed.elapsed() < Duration::from_secs(1),
            "old tier after 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(b);
}

#[tokio::test]
async fn last_used_is_recorded_in_the_background() {
    let app = spawn_app().await;
    let (_, key) = app.create_account("internal", 0).await;
    let id = key[8..20].to_owned();
    let before: Option<chrono::DateTime<chrono::Utc>> = app
        .db
        .query_one("SELECT last_used_at FROM api_keys WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert!(before.is_none());
    assert_eq!(app.get_with_key("/v1/account", &key).await.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let after: Option<chrono::DateTime<chrono::Utc>> = app
            .db
            .query_one("SELECT last_used_at FROM api_keys WHERE id = $1", &[&id])
            .await
            .unwrap()
            .get(0);
        if after.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "last_used_at never written");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn unknown_paths_under_v1_need_a_key_then_are_404() {
    let app = spawn_app().await;
    let (_, key) = app.create_account("internal", 0).await;
    assert_invalid_key(app.get("/v1/nope").await).await;
    assert_problem(app.get_with_key("/v1/nope", &key).await, 404, "not_found").await;
}
