//! The audit trail: every operator action and every security-relevant customer action leaves
//! exactly one row, in the same transaction as the action; the table is append-only; the
//! trail is readable through `GET /admin/audit` and `keymeter admin audit`.

use std::process::Command;

use serde_json::{json, Value};
use uuid::Uuid;

use crate::support::db::{create_database, drop_database_blocking};
use crate::support::process::keymeter_on;
use crate::support::{assert_problem, spawn_app, TestApp, ADMIN_TOKEN};

/// One audit row as the tests read it straight from the table.
#[derive(Debug)]
struct Row {
    actor_type: String,
    actor: String,
    action: String,
    account_id: Option<Uuid>,
    target: Option<String>,
    request_id: Option<String>,
    detail: Value,
}

async fn rows(app: &TestApp) -> Vec<Row> {
    app.db
        .query(
            "SELECT actor_type, actor, action, account_id, target, request_id, detail
               FROM audit_events ORDER BY at, id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| Row {
            actor_type: r.get(0),
            actor: r.get(1),
            action: r.get(2),
            account_id: r.get(3),
            target: r.get(4),
            request_id: r.get(5),
            detail: r.get(6),
        })
        .collect()
}

/// Sends an admin request with a chosen request id.
async fn admin(
    app: &TestApp,
    method: &str,
    path: &str,
    body: Option<Value>,
    rid: &str,
) -> reqwest::Response {
    let mut req = app
        .client
        .request(method.parse().unwrap(), app.url(path))
        .bearer_auth(ADMIN_TOKEN)
        .header("x-request-id", rid);
    if let Some(b) = body {
        req = req.json(&b);
    }
    req.send().await.unwrap()
}

/// Asserts the last action added exactly one row to the `before` already there; returns it.
async fn one_new_row(app: &TestApp, before: usize) -> Row {
    let mut all = rows(app).await;
    assert_eq!(all.len(), before + 1, "exactly one new audit row: {all:?}");
    all.pop().unwrap()
}

#[tokio::test]
async fn each_admin_action_leaves_one_row_with_actor_target_and_request_id() {
    let app = spawn_app().await;

    let res = admin(
        &app,
        "POST",
        "/admin/accounts",
        Some(json!({"email": "ops@example.com", "credits": 10})),
        "rid-create",
    )
    .await;
    assert_eq!(res.status(), 201);
    let created: Value = res.json().await.unwrap();
    let account: Uuid = created["account_id"].as_str().unwrap().parse().unwrap();
    let api_key = created["api_key"].as_str().unwrap().to_owned();
    let r = one_new_row(&app, 0).await;
    assert_eq!(
        (r.actor_type.as_str(), r.actor.as_str(), r.action.as_str()),
        ("admin_token", "admin_token", "account.create")
    );
    assert_eq!(r.account_id, Some(account));
    assert_eq!(r.request_id.as_deref(), Some("rid-create"));
    assert_eq!(r.detail["email"], "ops@example.com");
    assert_eq!(r.detail["credits"], 10);
    assert!(
        !r.detail.to_string().contains(&api_key[21..]),
        "never the key's secret: {}",
        r.detail
    );

    let res = admin(
        &app,
        "POST",
        &format!("/admin/accounts/{account}/keys"),
        Some(json!({"scopes": ["read"]})),
        "rid-key",
    )
    .await;
    assert_eq!(res.status(), 201);
    let key: Value = res.json().await.unwrap();
    let key_id = key["id"].as_str().unwrap().to_owned();
    let r = one_new_row(&app, 1).await;
    assert_eq!(r.action, "key.create");
    assert_eq!(r.target.as_deref(), Some(key_id.as_str()));
    assert_eq!(r.detail["scopes"], json!(["read"]));
    assert_eq!(r.request_id.as_deref(), Some("rid-key"));
    assert!(!r.detail.to_string().contains(key["key"].as_str().unwrap()));

    let res = admin(
        &app,
        "PUT",
        &format!("/admin/accounts/{account}/tier"),
        Some(json!({"tier": "pro"})),
        "rid-tier",
    )
    .await;
    assert_eq!(res.status(), 200);
    let r = one_new_row(&app, 2).await;
    assert_eq!(r.action, "account.set_tier");
    assert_eq!(r.detail, json!({"from": "free", "to": "pro"}));
    assert_eq!(r.request_id.as_deref(), Some("rid-tier"));

    assert_eq!(
        admin(
            &app,
            "POST",
            &format!("/admin/accounts/{account}/suspend"),
            None,
            "rid-susp"
        )
        .await
        .status(),
        200
    );
    let r = one_new_row(&app, 3).await;
    assert_eq!(r.action, "account.suspend");
    assert_eq!(r.detail, json!({"from": "active", "to": "suspended"}));
    assert_eq!(r.account_id, Some(account));

    assert_eq!(
        admin(
            &app,
            "POST",
            &format!("/admin/accounts/{account}/unsuspend"),
            None,
            "rid-unsusp"
        )
        .await
        .status(),
        200
    );
    let r = one_new_row(&app, 4).await;
    assert_eq!(r.action, "account.unsuspend");
    assert_eq!(r.request_id.as_deref(), Some("rid-unsusp"));

    let res = admin(
        &app,
        "POST",
        &format!("/admin/accounts/{account}/credits"),
        Some(json!({"amount": 5, "reason": "goodwill"})),
        "rid-grant",
    )
    .await;
    assert_eq!(res.status(), 201);
    let r = one_new_row(&app, 5).await;
    assert_eq!(r.action, "credits.grant");
    assert_eq!(r.detail["amount"], 5);
    assert_eq!(r.detail["reason"], "goodwill");
    assert_eq!(r.detail["balance_after"], 15);

    let res = admin(
        &app,
        "POST",
        &format!("/admin/accounts/{account}/credits"),
        Some(json!({"amount": -3, "reason": "correction"})),
        "rid-adjust",
    )
    .await;
    assert_eq!(res.status(), 201);
    let r = one_new_row(&app, 6).await;
    assert_eq!(r.action, "credits.adjust");
    assert_eq!(r.detail["balance_after"], 12);
    assert_eq!(r.request_id.as_deref(), Some("rid-adjust"));

    assert_eq!(
        admin(
            &app,
            "POST",
            &format!("/admin/keys/{key_id}/revoke"),
            None,
            "rid-revoke"
        )
        .await
        .status(),
        200
    );
    let r = one_new_row(&app, 7).await;
    assert_eq!(r.action, "key.revoke");
    assert_eq!(r.target.as_deref(), Some(key_id.as_str()));
    assert_eq!(r.account_id, Some(account));
    assert_eq!(r.request_id.as_deref(), Some("rid-revoke"));

    // Reads are not actions: nothing recorded.
    assert_eq!(
        admin(
            &app,
            "GET",
            &format!("/admin/accounts/{account}"),
            None,
            "rid-read"
        )
        .await
        .status(),
        200
    );
    assert_eq!(rows(&app).await.len(), 8);
}

#[tokio::test]
async fn customer_key_actions_are_recorded_with_the_acting_key() {
    let app = spawn_app().await;
    let (account, _) = app.create_account("free", 0).await;
    // The manager holds `scrape` too: a key may only mint scopes it has.
    let (manager_id, manager) = app
        .create_key(account, &["keys:manage", "read", "scrape"])
        .await;
    let before = rows(&app).await.len();

    let res = app
        .client
        .post(app.url("/v1/keys"))
        .bearer_auth(&manager)
        .header("x-request-id", "cust-create")
        .json(&json!({"name": "ci", "scopes": ["scrape"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let new_id = res.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = one_new_row(&app, before).await;
    assert_eq!(
        (r.actor_type.as_str(), r.actor.as_str()),
        ("api_key", manager_id.as_str())
    );
    assert_eq!(r.action, "key.create");
    assert_eq!(r.account_id, Some(account));
    assert_eq!(r.target.as_deref(), Some(new_id.as_str()));
    assert_eq!(r.request_id.as_deref(), Some("cust-create"));
    assert_eq!(r.detail["name"], "ci");

    let res = app
        .client
        .post(app.url(&format!("/v1/keys/{new_id}/rotate")))
        .bearer_auth(&manager)
        .header("x-request-id", "cust-rotate")
        .json(&json!({"grace_seconds": 60}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let successor = res.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = one_new_row(&app, before + 1).await;
    assert_eq!(r.action, "key.rotate");
    assert_eq!(r.target.as_deref(), Some(new_id.as_str()));
    assert_eq!(
        r.detail,
        json!({"new_key_id": successor, "grace_seconds": 60})
    );
    assert_eq!(r.request_id.as_deref(), Some("cust-rotate"));

    let res = app
        .client
        .delete(app.url(&format!("/v1/keys/{successor}")))
        .bearer_auth(&manager)
        .header("x-request-id", "cust-revoke")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let r = one_new_row(&app, before + 2).await;
    assert_eq!(r.action, "key.revoke");
    assert_eq!(r.actor, manager_id);
    assert_eq!(r.target.as_deref(), Some(successor.as_str()));
    assert_eq!(r.request_id.as_deref(), Some("cust-revoke"));
}

async fn login(app: &TestApp, email: &str, password: &str, rid: &str) -> reqwest::Response {
    app.client
        .post(app.url("/v1/login"))
        .header("x-request-id", rid)
        .json(&json!({"email": email, "password": password}))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn logins_failures_and_the_lockout_are_recorded() {
    let app = spawn_app().await;
    let res = app.signup("who@example.com", "correct horse battery").await;
    assert_eq!(res.status(), 201);
    let account: Uuid = res.json::<Value>().await.unwrap()["account"]["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let before = rows(&app).await.len();

    let res = login(&app, "who@example.com", "correct horse battery", "login-ok").await;
    assert_eq!(res.status(), 201);
    let key_id = res.json::<Value>().await.unwrap()["api_key"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = one_new_row(&app, before).await;
    assert_eq!(
        (r.actor_type.as_str(), r.actor.as_str()),
        ("login", "127.0.0.1")
    );
    assert_eq!(r.action, "login.success");
    assert_eq!(r.account_id, Some(account));
    assert_eq!(r.target.as_deref(), Some(key_id.as_str()));
    assert_eq!(r.request_id.as_deref(), Some("login-ok"));

    // An unknown email: recorded without an account, and without the email itself.
    assert_eq!(
        login(&app, "nobody@example.com", "whatever123", "login-unknown")
            .await
            .status(),
        401
    );
    let r = one_new_row(&app, before + 1).await;
    assert_eq!(r.action, "login.failure");
    assert_eq!(r.account_id, None);
    assert_eq!(r.detail, json!({"known_account": false}));
    assert!(!format!("{r:?}").contains("nobody"));

    // Four wrong passwords: four failures; the fifth also locks the email.
    for n in 1..=4 {
        assert_eq!(
            login(
                &app,
                "who@example.com",
                "wrong password",
                &format!("bad-{n}")
            )
            .await
            .status(),
            401
        );
        let r = one_new_row(&app, before + 1 + n).await;
        assert_eq!(r.action, "login.failure");
        assert_eq!(r.account_id, Some(account));
        assert!(
            !format!("{r:?}").contains("wrong password"),
            "no password recorded"
        );
    }
    assert_eq!(
        login(&app, "who@example.com", "wrong password", "bad-5")
            .await
            .status(),
        401
    );
    let all = rows(&app).await;
    assert_eq!(all.len(), before + 8, "{all:?}");
    let (failure, lockout) = (&all[before + 6], &all[before + 7]);
    assert_eq!(failure.action, "login.failure");
    assert_eq!(lockout.action, "login.lockout");
    assert_eq!(lockout.account_id, Some(account));
    assert_eq!(lockout.request_id.as_deref(), Some("bad-5"));

    // Refused while locked: the lockout is on record already, nothing more.
    assert_eq!(
        login(&app, "who@example.com", "correct horse battery", "locked")
            .await
            .status(),
        429
    );
    assert_eq!(rows(&app).await.len(), before + 8);
}

#[tokio::test]
async fn a_failed_action_leaves_no_row() {
    let app = spawn_app().await;
    let (account, _) = app.create_account("free", 2).await;
    let before = rows(&app).await.len();
    let res = app
        .admin_post(
            &format!("/admin/accounts/{account}/credits"),
            json!({"amount": -5, "reason": "too much"}),
        )
        .await;
    assert_problem(res, 422, "validation_failed").await;
    let res = app
        .admin_post("/admin/accounts", json!({"email": "dup@example.com"}))
        .await;
    assert_eq!(res.status(), 201);
    let res = app
        .admin_post("/admin/accounts", json!({"email": "DUP@example.com"}))
        .await;
    assert_problem(res, 409, "email_taken").await;
    let res = app
        .client
        .put(app.url(&format!("/admin/accounts/{account}/tier")))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"tier": "platinum"}))
        .send()
        .await
        .unwrap();
    assert_problem(res, 422, "validation_failed").await;
    let res = app
        .admin_post("/admin/keys/AAAAAAAAAAAA/revoke", json!({}))
        .await;
    assert_problem(res, 404, "not_found").await;
    // Only the one successful account creation.
    let all = rows(&app).await;
    assert_eq!(all.len(), before + 1, "{all:?}");
    assert_eq!(all[before].action, "account.create");
}

#[tokio::test]
async fn an_action_whose_row_cannot_be_written_does_not_happen() {
    let app = spawn_app().await;
    let (account, _) = app.create_account("free", 10).await;
    // Make the audit insert fail for two actions, as a full disk or a broken constraint would.
    app.db
        .batch_execute(
            "CREATE FUNCTION refuse_audit() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'audit write failed'; END; $$;
             CREATE TRIGGER refuse_some BEFORE INSERT ON audit_events FOR EACH ROW
               WHEN (NEW.action IN ('account.set_tier', 'credits.grant', 'key.revoke'))
               EXECUTE FUNCTION refuse_audit();",
        )
        .await
        .unwrap();
    let res = app
        .client
        .put(app.url(&format!("/admin/accounts/{account}/tier")))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"tier": "pro"}))
        .send()
        .await
        .unwrap();
    assert_problem(res, 500, "internal_error").await;
    let res = app
        .admin_post(
            &format!("/admin/accounts/{account}/credits"),
            json!({"amount": 50, "reason": "lost"}),
        )
        .await;
    assert_problem(res, 500, "internal_error").await;
    let (key_id, key) = app.create_key(account, &["read"]).await;
    let res = app
        .admin_post(&format!("/admin/keys/{key_id}/revoke"), json!({}))
        .await;
    assert_problem(res, 500, "internal_error").await;

    let row = app
        .db
        .query_one(
            "SELECT tier, credit_balance, (SELECT count(*) FROM credit_ledger WHERE account_id = $1)
               FROM accounts WHERE id = $1",
            &[&account],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, String>(0),
        "free",
        "the tier change rolled back"
    );
    assert_eq!(row.get::<_, i64>(1), 10, "the grant rolled back");
    assert_eq!(row.get::<_, i64>(2), 1, "no ledger row for it either");
    assert_eq!(
        app.get_with_key("/v1/account", &key).await.status(),
        200,
        "the key still works"
    );
}

#[tokio::test]
async fn the_trail_refuses_update_delete_and_truncate() {
    let app = spawn_app().await;
    app.create_account("free", 0).await;
    assert_eq!(rows(&app).await.len(), 1);
    for sql in [
        "UPDATE audit_events SET actor = 'someone else'",
        "DELETE FROM audit_events",
        "TRUNCATE audit_events",
    ] {
        let err = app.db.batch_execute(sql).await.expect_err(sql);
        assert!(
            err.as_db_error()
                .is_some_and(|e| e.message().contains("append-only")),
            "{sql}: {err:?}"
        );
    }
    let all = rows(&app).await;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].actor, "admin_token");
}

async fn audit_page(app: &TestApp, query: &str) -> Value {
    let res = app.admin_get(&format!("/admin/audit{query}")).await;
    assert_eq!(res.status(), 200, "{query}");
    res.json().await.unwrap()
}

#[tokio::test]
async fn get_admin_audit_filters_and_pages() {
    let app = spawn_app().await;
    let (a, _) = app.create_account("free", 0).await;
    let (b, _) = app.create_account("free", 0).await;
    for tier in ["pro", "business", "free"] {
        let res = app
            .client
            .put(app.url(&format!("/admin/accounts/{a}/tier")))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({"tier": tier}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    // Default scopes (`scrape`, `read`) need a creator that holds them.
    let (key_id, key) = app.create_key(b, &["keys:manage", "scrape", "read"]).await;
    let res = app
        .client
        .post(app.url("/v1/keys"))
        .bearer_auth(&key)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);

    // Everything, newest first.
    let all = audit_page(&app, "").await;
    let data = all["data"].as_array().unwrap();
    assert_eq!(data.len(), 7);
    assert_eq!(data[0]["action"], "key.create");
    assert_eq!(data[0]["actor"], key_id.as_str());
    assert_eq!(data[0]["object"], "audit_event");
    assert_eq!(data[6]["action"], "account.create");
    assert_eq!(all["has_more"], false);

    let only_a = audit_page(&app, &format!("?account={a}")).await;
    assert_eq!(only_a["data"].as_array().unwrap().len(), 4);
    assert!(only_a["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["account_id"] == a.to_string()));

    let tiers = audit_page(&app, "?action=account.set_tier").await;
    let tiers = tiers["data"].as_array().unwrap();
    assert_eq!(tiers.len(), 3);
    assert_eq!(
        tiers[0]["detail"],
        json!({"from": "business", "to": "free"})
    );

    let by_key = audit_page(&app, &format!("?actor={key_id}")).await;
    assert_eq!(by_key["data"].as_array().unwrap().len(), 1);
    let by_admin = audit_page(&app, "?actor=admin_token").await;
    assert_eq!(by_admin["data"].as_array().unwrap().len(), 6);

    // A time window: everything is from today, nothing from tomorrow on.
    let tomorrow = (chrono::Utc::now() + chrono::Duration::days(1))
        .format("%Y-%m-%d")
        .to_string();
    assert_eq!(
        audit_page(&app, &format!("?from={tomorrow}")).await["data"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert_eq!(
        audit_page(&app, &format!("?to={tomorrow}")).await["data"]
            .as_array()
            .unwrap()
            .len(),
        7
    );

    // Pages of 3 walk the same 7 events, each once, in order.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let q = match &cursor {
            Some(c) => format!("?limit=3&cursor={c}"),
            None => "?limit=3".to_owned(),
        };
        let page = audit_page(&app, &q).await;
        for e in page["data"].as_array().unwrap() {
            seen.push(e["id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let expected: Vec<String> = data
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(seen, expected);

    // Bad filters are problems, not 500s.
    for (q, field) in [
        ("?action=key.delete", "action"),
        ("?account=nope", "account"),
        ("?limit=0", "limit"),
        ("?from=yesterday", "from"),
    ] {
        let res = app
            .client
            .get(app.url(&format!("/admin/audit{q}")))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        let body = assert_problem(res, 422, "validation_failed").await;
        assert_eq!(body["field"], field, "{q}");
    }
    let res = app
        .client
        .get(app.url("/admin/audit?cursor=1_x&limit=2&bogus=1"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_problem(res, 400, "invalid_request").await;
    // Operators only.
    let res = app.get_with_key("/admin/audit", &key).await;
    assert_problem(res, 401, "invalid_admin_token").await;
}

fn run(db: &str, args: &[&str]) -> String {
    let out = keymeter_on(db).args(args).output().expect("run keymeter");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn the_cli_records_the_os_user_and_prints_the_trail() {
    let db = create_database().await;
    run(&db, &["migrate"]);
    let created: Value = serde_json::from_str(&run(
        &db,
        &[
            "admin",
            "create-account",
            "--email",
            "cli@example.com",
            "--json",
        ],
    ))
    .unwrap();
    let account = created["account_id"].as_str().unwrap().to_owned();
    run(&db, &["admin", "suspend", "--account", &account]);
    run(
        &db,
        &[
            "admin",
            "grant-credits",
            "--account",
            &account,
            "--amount",
            "7",
            "--reason",
            "trial",
        ],
    );

    let me = Command::new("id").arg("-un").output().unwrap();
    let me = String::from_utf8(me.stdout).unwrap().trim().to_owned();

    let lines = run(&db, &["admin", "audit", "--account", &account, "--json"]);
    let events: Vec<Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let actions: Vec<&str> = events
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["credits.grant", "account.suspend", "account.create"]
    );
    for e in &events {
        assert_eq!(e["actor_type"], "cli");
        assert!(
            e["actor"].as_str().unwrap().starts_with(&me),
            "actor {} is the OS user {me}",
            e["actor"]
        );
        assert_eq!(
            e["request_id"],
            Value::Null,
            "no request behind a CLI action"
        );
        assert_eq!(e["account_id"], account.as_str());
    }

    let limited = run(
        &db,
        &[
            "admin",
            "audit",
            "--action",
            "account.suspend",
            "--limit",
            "5",
            "--json",
        ],
    );
    assert_eq!(limited.lines().count(), 1);
    let table = run(&db, &["admin", "audit", "--limit", "2"]);
    let table: Vec<&str> = table.lines().collect();
    assert_eq!(table.len(), 3, "a header and two events: {table:?}");
    assert!(table[1].contains("credits.grant") && table[1].contains(&format!("cli:{me}")));
    assert!(table[2].contains("account.suspend"));

    let bad = keymeter_on(&db)
        .args(["admin", "audit", "--action", "nope"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--action"));
    drop_database_blocking(&db);
}
