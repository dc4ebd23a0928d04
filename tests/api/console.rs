//! The customer console in a real browser (headless chromium through chromedriver, see
//! `support::browser`) against the real server on a fresh database, with the local Stripe
//! stand-in for Checkout and a signed webhook for the payment.
//!
//! One browser for the whole journey, as a customer would go through it: starting chromium
//! costs seconds, and the steps build on each other (the key made in one is revoked in the
//! next). Each page it visits is saved under `target/console-screenshots/`.

use std::time::Duration;

use keymeter::config::Pack;
use secrecy::SecretString;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::support::app::spawn_jobs_app;
use crate::support::browser::Browser;
use crate::support::db::{assert_ledger_invariant, balance};
use crate::support::stripe::{deliver, event, fixture, now, stand_in};
use crate::support::upstream::Upstream;
use crate::support::{spawn_app_with, TestApp};

const WEBHOOK_SECRET: &str = "whsec_console_test_0123456789";
const EMAIL: &str = "ada@example.com";
const PASSWORD: &str = "correct horse battery";

/// A client that neither follows redirects nor keeps cookies: requests exactly as sent.
fn raw_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

async fn account_id(app: &TestApp) -> Uuid {
    app.db
        .query_one("SELECT id FROM accounts WHERE email = $1", &[&EMAIL])
        .await
        .unwrap()
        .get(0)
}

async fn key_count(app: &TestApp) -> i64 {
    app.db
        .query_one("SELECT count(*) FROM api_keys", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_customer_signs_up_makes_a_key_uses_it_revokes_it_and_buys_credits_in_a_browser() {
    let stripe = stand_in().await;
    let stripe_base = stripe.base.clone();
    let app = spawn_app_with(move |c| {
        c.signup_credits = 1000;
        c.billing.secret_key = Some(SecretString::from("sk_test_keymeter".to_owned()));
        c.billing.webhook_secrets = vec![SecretString::from(WEBHOOK_SECRET.to_owned())];
        c.billing.api_base = stripe_base;
        c.billing.packs = vec![Pack {
            name: "small".into(),
            price_id: "price_small".into(),
            credits: 100,
        }];
    })
    .await;
    let console = |path: &str| app.url(&format!("/console{path}"));
    let b = Browser::start(1280, 1000).await;

    // Signed out, a console page sends the browser to the login page, and back afterwards.
    b.goto(&console("/keys")).await;
    let url = b.url().await;
    assert!(
        url.starts_with(&console("/login?next=")) && url.contains("keys"),
        "{url}"
    );
    b.screenshot("login").await;

    // Sign up: the account, its first key shown once, and a session.
    b.click("a[href='/console/signup']").await;
    b.screenshot("signup").await;
    b.fill("#f-email", EMAIL).await;
    b.fill("#f-password", "short").await;
    b.click("form button[type=submit]").await;
    // The domain's refusal, next to its field; nothing created.
    assert!(b.text("#f-password-error").await.contains("8 to 128"));
    assert_eq!(key_count(&app).await, 0);
    b.fill("#f-password", PASSWORD).await;
    b.click("form button[type=submit]").await;
    assert_eq!(b.text("h1").await, "Your account is ready");
    let first_key = b.property("#new-key", "value").await;
    assert!(first_key.as_str().unwrap().starts_with("km_live_"));
    b.screenshot("welcome").await;

    // The overview: the balance in large type, what it buys.
    b.click("main a.button").await;
    assert_eq!(b.url().await, console("/"));
    assert_eq!(b.text(".balance").await, "1,000 credits");
    assert!(b.text(".buys").await.contains("1,000 metadata jobs"));

    // Create a key: shown once, with a copy button that copies it.
    b.click("nav a[href='/console/keys']").await;
    b.fill("#f-name", "ci runner").await;
    b.click("#create button[type=submit]").await;
    assert!(b
        .text(".secret-box .warn")
        .await
        .contains("you will not see this key again"));
    let key = b.property("#new-key", "value").await;
    let key = key.as_str().unwrap().to_owned();
    assert_eq!(key.len(), 70, "{key}");
    b.press("button[data-copy='new-key']").await;
    b.wait_text("button[data-copy='new-key']", |t| t == "Copied")
        .await;
    // What the button put on the clipboard, pasted into a field by the keyboard.
    b.exec("const i = document.createElement('input'); i.id = 'paste'; document.body.prepend(i); i.focus(); return true;")
        .await;
    let pasted = b.exec(
        "return navigator.clipboard.readText().then(t => t, () => document.execCommand('paste') ? document.getElementById('paste').value : null);",
    )
    .await;
    if let Some(p) = pasted.as_str() {
        assert_eq!(p, key, "the clipboard holds the key");
    }
    b.screenshot("key-created").await;
    let key_id = key["km_live_".len().."km_live_".len() + 12].to_owned();

    // The key works over HTTP, and its metered call shows in usage.
    let res = app.get_with_key("/v1/account", &key).await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["email"], EMAIL);
    let res = app
        .post_json(
            "/v1/credits/charge",
            &key,
            json!({"amount": 234, "reason": "console test"}),
        )
        .await;
    assert_eq!(res.status(), 201);
    b.click("nav a[href='/console/usage']").await;
    let table = b.text("#usage-table").await;
    assert!(table.contains("234"), "{table}");
    b.screenshot("usage").await;
    // The CSV of the same range, with the browser's session.
    let csv_href = b
        .exec("return document.querySelector('a[download]').getAttribute('href');")
        .await;
    let session = b.cookie("km_console").await.expect("a session cookie");
    let csv = raw_client()
        .get(app.url(csv_href.as_str().unwrap()))
        .header("cookie", format!("km_console={session}"))
        .send()
        .await
        .unwrap();
    assert_eq!(csv.status(), 200);
    assert!(csv.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/csv"));
    let csv = csv.text().await.unwrap();
    assert!(csv.starts_with("start,charged,refunded,net,charges,refunds\r\n"));
    assert!(csv.contains(",234,0,234,1,0\r\n"), "{csv}");

    // The overview's chart has today's bar, focusable, with its numbers.
    b.click("nav a[href='/console/']").await;
    assert_eq!(b.text(".balance").await, "766 credits");
    let bars = b
        .exec("return Array.from(document.querySelectorAll('.chart g.bar')).map(g => [g.getAttribute('tabindex'), g.getAttribute('aria-label')]);")
        .await;
    let bars = bars.as_array().unwrap();
    assert_eq!(bars.len(), 30);
    assert!(bars.iter().all(|b| b[0] == "0"));
    assert!(bars[29][1]
        .as_str()
        .unwrap()
        .ends_with(": 234 charged, 0 refunded"));

    // Revoke, after a confirmation page; the API refuses the key at once.
    b.click("nav a[href='/console/keys']").await;
    b.click(&format!("tr[data-key='{key_id}'] a.danger")).await;
    assert!(b.text("h1").await.starts_with("Revoke"));
    b.screenshot("revoke-confirm").await;
    b.click("main form button.danger").await;
    assert!(b.text(".notice.ok").await.contains("revoked"));
    assert_eq!(
        b.text(&format!("tr[data-key='{key_id}'] .state")).await,
        "revoked"
    );
    b.screenshot("keys").await;
    let res = app.get_with_key("/v1/account", &key).await;
    assert_eq!(res.status(), 401);

    // A POST without the session's CSRF token (or with a made-up one) is refused, and
    // creates nothing — even with the session cookie.
    let before = key_count(&app).await;
    for body in [
        "name=forged&scope_read=on",
        "name=forged&scope_read=on&csrf=00ff",
    ] {
        let res = raw_client()
            .post(console("/keys"))
            .header("cookie", format!("km_console={session}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 403);
        assert!(res.text().await.unwrap().contains("This form has expired"));
    }
    assert_eq!(key_count(&app).await, before);

    // Every page: this CSP, and no inline script or style to need anything looser.
    let res = raw_client()
        .get(console("/"))
        .header("cookie", format!("km_console={session}"))
        .send()
        .await
        .unwrap();
    let csp = res.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.contains("default-src 'self'") && csp.contains("frame-ancestors 'none'"));
    let html = res.text().await.unwrap();
    assert!(
        !html.contains("<script>") && !html.contains("style="),
        "{html}"
    );
    assert!(html.contains("<script src=\"/console/assets/console."));

    // Buy a pack: the form opens a Checkout Session through the billing domain and sends the
    // browser to Stripe's page; Stripe's signed webhook then credits the account.
    b.click("nav a[href='/console/billing']").await;
    b.screenshot("billing-before").await;
    b.click("button[aria-label='Buy the small pack']").await;
    let started = std::time::Instant::now();
    while !b.url().await.contains("checkout.stripe.com") {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{}",
            b.url().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(stripe.requests_to("/v1/checkout/sessions").len(), 1);
    let account = account_id(&app).await;
    let session_id: String = app
        .db
        .query_one(
            "SELECT session_id FROM billing_checkouts WHERE account_id = $1",
            &[&account],
        )
        .await
        .unwrap()
        .get(0);
    let mut s = fixture("checkout.session");
    s["id"] = json!(session_id);
    s["mode"] = json!("payment");
    s["payment_status"] = json!("paid");
    s["status"] = json!("complete");
    s["client_reference_id"] = json!(account.to_string());
    s["payment_intent"] = json!(format!("pi_{}", Uuid::new_v4().simple()));
    let res = deliver(
        &app,
        WEBHOOK_SECRET,
        &event("checkout.session.completed", s, now()),
    )
    .await;
    assert_eq!(res.status(), 200);
    assert_eq!(balance(&app, account).await.credits, 1000 - 234 + 100);
    b.goto(&console("/billing?checkout=done")).await;
    assert!(b.text(".notice.ok").await.contains("Thank you"));
    assert!(b.text("#purchases").await.contains("+100"));
    b.screenshot("billing").await;
    b.click("nav a[href='/console/']").await;
    assert_eq!(b.text(".balance").await, "866 credits");

    // The other pages render for this account.
    b.click("nav a[href='/console/jobs']").await;
    assert_eq!(b.text("h1").await, "Jobs");
    b.screenshot("jobs").await;
    b.click("nav a[href='/console/settings']").await;
    assert!(b.text(".facts").await.contains(EMAIL));
    b.screenshot("settings").await;
    b.goto(&console("/no-such-page")).await;
    assert_eq!(b.text("h1").await, "Page not found");
    b.screenshot("not-found").await;

    // 375 px wide: nothing wider than the screen.
    b.set_size(375, 900).await;
    b.goto(&console("/")).await;
    let fits = b
        .exec("return document.documentElement.scrollWidth <= window.innerWidth;")
        .await;
    assert_eq!(fits, true);
    b.screenshot("overview-375px").await;
    b.set_size(1280, 1000).await;
    b.goto(&console("/")).await;
    b.screenshot("overview").await;

    // Sign out: the session is gone server-side, so the old cookie no longer works either.
    b.click("form.signout button").await;
    assert!(b.text(".notice.ok").await.contains("signed out"));
    b.goto(&console("/")).await;
    assert!(b.url().await.starts_with(&console("/login")));
    let res = raw_client()
        .get(console("/"))
        .header("cookie", format!("km_console={session}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 303);
    assert!(res.headers()["location"]
        .to_str()
        .unwrap()
        .starts_with("/console/login"));

    // Sign in again: a new session id.
    b.fill("#f-email", EMAIL).await;
    b.fill("#f-password", "wrong password").await;
    b.click("form button[type=submit]").await;
    assert!(b.text(".notice.error").await.contains("wrong"));
    b.fill("#f-password", PASSWORD).await;
    b.click("form button[type=submit]").await;
    assert_eq!(b.text("h1").await, "Overview");
    let again = b.cookie("km_console").await.expect("a new session");
    assert_ne!(again, session);

    b.quit().await;
    assert_ledger_invariant(&app).await;
}

#[tokio::test]
async fn console_sessions_are_http_only_lax_cookies_stored_as_digests() {
    let app = spawn_app_with(|_| {}).await;
    let client = raw_client();
    // The login form binds its token to a pre-session cookie.
    let res = client.get(app.url("/console/login")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let pre = res.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        pre.starts_with("km_console_pre=")
            && pre.contains("HttpOnly")
            && pre.contains("SameSite=Lax")
    );
    let pre_value = pre["km_console_pre=".len()..]
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let html = res.text().await.unwrap();
    let csrf = html
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap()
        .to_owned();
    // Signup with it: a session cookie, and only its SHA-256 in the database.
    let res = client
        .post(app.url("/console/signup"))
        .header("cookie", format!("km_console_pre={pre_value}"))
        .form(&[
            ("csrf", csrf.as_str()),
            ("email", "b@example.com"),
            ("password", PASSWORD),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let cookies: Vec<String> = res
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    let session = cookies
        .iter()
        .find(|c| c.starts_with("km_console="))
        .expect("session cookie");
    assert!(
        session.contains("HttpOnly")
            && session.contains("SameSite=Lax")
            && session.contains("Path=/console")
    );
    // Not Secure outside production (tests speak plain HTTP).
    assert!(!session.contains("Secure"));
    let value = session["km_console=".len()..].split(';').next().unwrap();
    assert_eq!(value.len(), 64);
    let stored: Vec<u8> = app
        .db
        .query_one("SELECT id_hash FROM console_sessions", &[])
        .await
        .unwrap()
        .get(0);
    use sha2::Digest;
    assert_eq!(stored, sha2::Sha256::digest(value.as_bytes()).to_vec());
    let n: i64 = app
        .db
        .query_one(
            "SELECT count(*) FROM console_sessions WHERE encode(id_hash, 'hex') = $1",
            &[&value],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "the plaintext id is not stored");
    // An idle session is over: aged past the idle timeout, it sends the browser to login.
    app.db
        .execute(
            "UPDATE console_sessions SET last_seen_at = now() - interval '3 hours'",
            &[],
        )
        .await
        .unwrap();
    let res = client
        .get(app.url("/console/"))
        .header("cookie", format!("km_console={value}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 303);
    // So is one past its absolute expiry, however recently used.
    app.db
        .execute(
            "UPDATE console_sessions SET last_seen_at = now(), expires_at = now() - interval '1 second'",
            &[],
        )
        .await
        .unwrap();
    let res = client
        .get(app.url("/console/"))
        .header("cookie", format!("km_console={value}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 303);
    // A login POST without the pre-session cookie's token is refused.
    let res = client
        .post(app.url("/console/login"))
        .form(&[("email", "b@example.com"), ("password", PASSWORD)])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
}

/// Waits until the browser is on a page whose address contains `part` (a redirect to
/// Stripe's page, which the browser cannot reach and so stays on as an error page).
async fn wait_for_url(b: &Browser, part: &str) {
    let started = std::time::Instant::now();
    while !b.url().await.contains(part) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{}",
            b.url().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `value` of an input, as a string.
async fn value(b: &Browser, css: &str) -> String {
    b.property(css, "value")
        .await
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Chooses `option` in the `<select>` `css`, as a person would (by clicking it).
async fn choose(b: &Browser, css: &str, option: &str) {
    b.press(&format!("{css} option[value='{option}']")).await;
}

/// Whether the page fits a 375 px wide screen (nothing scrolls sideways but tables in their
/// own scrolling box).
async fn fits_375(b: &Browser) -> bool {
    b.exec("return document.documentElement.scrollWidth <= window.innerWidth;")
        .await
        == true
}

#[tokio::test]
async fn a_customer_sets_limits_alerts_webhooks_and_auto_recharge_and_reads_usage_per_key_and_jobs_in_a_browser(
) {
    const EMAIL2: &str = "grace@example.com";
    let up = Upstream::start().await;
    let stripe = stand_in().await;
    let stripe_base = stripe.base.clone();
    let app = spawn_jobs_app(&up.allow(), move |c| {
        c.signup_credits = 1000;
        c.billing.secret_key = Some(SecretString::from("sk_test_keymeter".to_owned()));
        c.billing.webhook_secrets = vec![SecretString::from(WEBHOOK_SECRET.to_owned())];
        c.billing.api_base = stripe_base;
        c.billing.packs = vec![Pack {
            name: "small".into(),
            price_id: "price_small".into(),
            credits: 100,
        }];
    })
    .await;
    let console = |path: &str| app.url(&format!("/console{path}"));
    let b = Browser::start(1280, 1000).await;

    // Sign up; above the tier's default threshold (10), the overview warns of nothing.
    b.goto(&console("/signup")).await;
    b.fill("#f-email", EMAIL2).await;
    b.fill("#f-password", PASSWORD).await;
    b.click("form button[type=submit]").await;
    assert_eq!(b.text("h1").await, "Your account is ready");
    b.click("main a.button").await;
    assert_eq!(b.text(".balance").await, "1,000 credits");
    assert!(b.try_find("#low-balance").await.is_none());
    let account: Uuid = app
        .db
        .query_one("SELECT id FROM accounts WHERE email = $1", &[&EMAIL2])
        .await
        .unwrap()
        .get(0);

    // A key with a spend limit: a limit that is not a number is refused next to its field,
    // and nothing is created.
    b.click("nav a[href='/console/keys']").await;
    let keys_before = key_count(&app).await;
    b.fill("#f-name", "limited").await;
    b.fill("#f-spend", "lots").await;
    b.click("#create button[type=submit]").await;
    assert!(b
        .text("#f-spend-error")
        .await
        .contains("whole number of credits"));
    assert_eq!(key_count(&app).await, keys_before);
    // 1,500 a month, typed with its separator as the pages show numbers.
    b.fill("#f-name", "limited").await;
    b.fill("#f-spend", "1,500").await;
    choose(&b, "#f-spend-period", "month").await;
    b.click("#create button[type=submit]").await;
    let limited = value(&b, "#new-key").await;
    assert_eq!(limited.len(), 70);
    let limited_id = limited["km_live_".len().."km_live_".len() + 12].to_owned();
    let (credits, period): (i64, String) = {
        let r = app
            .db
            .query_one(
                "SELECT credits, period FROM key_spend_limits WHERE key_id = $1",
                &[&limited_id],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((credits, period.as_str()), (1500, "month"));
    let row = b
        .text(&format!("tr[data-key='{limited_id}'] .limits"))
        .await;
    assert!(row.contains("1,500 credits per month"), "{row}");
    assert!(row.contains("0 spent"), "{row}");
    b.screenshot("key-spend-limit").await;
    // A second key, without limits of its own.
    b.fill("#f-name", "other").await;
    b.click("#create button[type=submit]").await;
    let other = value(&b, "#new-key").await;
    let other_id = other["km_live_".len().."km_live_".len() + 12].to_owned();
    assert!(b
        .text(&format!("tr[data-key='{other_id}'] .limits"))
        .await
        .contains("the account's"));

    // Usage by the two keys: a job that succeeds and one the upstream fails (refunded), on
    // the limited key; a metered charge on the other.
    let ok = app.scrape(&limited, json!({"url": up.url("/page")})).await;
    assert_eq!(ok.status(), 200);
    let ok: Value = ok.json().await.unwrap();
    let failed = app
        .scrape(&limited, json!({"url": up.url("/status/500")}))
        .await;
    assert_eq!(failed.status(), 502);
    let failed_job: String = app
        .db
        .query_one(
            "SELECT id::text FROM jobs WHERE account_id = $1 AND status = 'failed'",
            &[&account],
        )
        .await
        .unwrap()
        .get(0);
    let cost = ok["cost"].as_i64().unwrap();
    let res = app
        .post_json(
            "/v1/credits/charge",
            &other,
            json!({"amount": 234, "reason": "per-key usage"}),
        )
        .await;
    assert_eq!(res.status(), 201);
    // The limited key's row now shows what it spent this month (the refund given back).
    b.goto(&console("/keys")).await;
    let row = b
        .text(&format!("tr[data-key='{limited_id}'] .limits"))
        .await;
    assert!(row.contains(&format!("({cost} spent")), "{row}");

    // Usage of one key: only its charges and refunds.
    b.click("nav a[href='/console/usage']").await;
    choose(&b, "#u-key", &limited_id).await;
    b.click("form.filters button[type=submit]").await;
    assert!(b.url().await.contains(&format!("key={limited_id}")));
    let totals = b.text("#usage-totals").await;
    assert_eq!(
        totals,
        format!("{} credits charged, {cost} refunded, {cost} net.", 2 * cost)
    );
    // Every key's, one row per key: the other key's 234 under its name.
    choose(&b, "#u-key", "").await;
    b.press("#u-split").await;
    b.click("form.filters button[type=submit]").await;
    let table = b.text("#usage-table").await;
    assert!(table.contains("Key"), "{table}");
    assert!(table.contains(&format!("other {other_id}")), "{table}");
    assert!(table.contains(&format!("limited {limited_id}")), "{table}");
    b.screenshot("usage-per-key").await;
    // Its CSV: the same function as the API's, with a key_id column.
    let href = b
        .exec("return document.querySelector('a[download]').getAttribute('href');")
        .await;
    let href = href.as_str().unwrap().to_owned();
    assert!(href.contains("split=key"), "{href}");
    let session = b.cookie("km_console").await.expect("a session cookie");
    let res = raw_client()
        .get(app.url(&href))
        .header("cookie", format!("km_console={session}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let disposition = res.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(disposition.starts_with("attachment; filename=\"keymeter-usage-day-"));
    let csv = res.text().await.unwrap();
    let lines: Vec<&str> = csv.split("\r\n").filter(|l| !l.is_empty()).collect();
    assert_eq!(
        lines[0], "start,key_id,charged,refunded,net,charges,refunds",
        "{csv}"
    );
    assert_eq!(lines.len(), 3, "{csv}");
    assert!(
        lines
            .iter()
            .any(|l| l.ends_with(&format!(",{other_id},234,0,234,1,0"))),
        "{csv}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.ends_with(&format!(",{limited_id},{},{cost},{cost},2,1", 2 * cost))),
        "{csv}"
    );
    // The API's CSV of the same range is the same file.
    let date = |name: &str| -> chrono::NaiveDate {
        let v = href
            .split(['?', '&'])
            .find_map(|p| p.strip_prefix(&format!("{name}=")))
            .unwrap();
        chrono::NaiveDate::parse_from_str(v, "%Y-%m-%d").unwrap()
    };
    let (from, to) = (date("from"), date("to") + chrono::Duration::days(1));
    let api = app
        .get_with_key(
            &format!("/v1/usage?group_by=key&format=csv&from={from}T00:00:00Z&to={to}T00:00:00Z"),
            &other,
        )
        .await;
    assert_eq!(api.status(), 200);
    assert_eq!(api.text().await.unwrap(), csv);

    // Jobs: the status filter, then a failed job's detail (error, charged then refunded).
    b.click("nav a[href='/console/jobs']").await;
    choose(&b, "#j-status", "failed").await;
    b.click("form.filters button[type=submit]").await;
    let rows = b
        .exec("return document.querySelectorAll('main tbody tr').length;")
        .await;
    assert_eq!(rows, 1);
    b.click(&format!("a[href='/console/jobs/{failed_job}']"))
        .await;
    let facts = b.text(".facts").await;
    assert!(facts.contains("failed"), "{facts}");
    assert!(facts.contains("charged, then refunded"), "{facts}");
    assert!(b.source().await.contains("<h2>Error</h2>"));
    b.screenshot("job-detail-failed").await;
    // The job that succeeded: its cost, timings and a preview of its result.
    b.goto(&console(&format!("/jobs/{}", ok["id"].as_str().unwrap())))
        .await;
    let facts = b.text(".facts").await;
    assert!(facts.contains(&format!("{cost} credit")), "{facts}");
    assert!(
        facts.contains("succeeded") && facts.contains("Ran for"),
        "{facts}"
    );
    assert!(b.text("pre.result").await.contains("Known Page"));
    b.screenshot("job-detail").await;
    b.set_size(375, 900).await;
    b.goto(&b.url().await).await;
    assert!(fits_375(&b).await, "a job's page at 375 px");
    b.set_size(1280, 1000).await;

    // The low-balance threshold: a refusal by its field, then 5,000 — above the balance,
    // so the overview warns.
    b.click("nav a[href='/console/settings']").await;
    b.fill("#f-threshold", "-5").await;
    b.click("#alerts button[type=submit]").await;
    assert!(b.text("#f-threshold-error").await.contains("Enter 0 to"));
    b.fill("#f-threshold", "5,000").await;
    b.click("#alerts button[type=submit]").await;
    assert!(b.text(".notice.ok").await.contains("5,000 credits"));
    assert!(b.text("#threshold-now").await.starts_with("5,000 credits"));
    let stored: Option<i64> = app
        .db
        .query_one(
            "SELECT low_balance_threshold FROM accounts WHERE id = $1",
            &[&account],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, Some(5000));
    b.screenshot("settings-threshold").await;
    b.click("nav a[href='/console/']").await;
    let balance_now = 1000 - cost - 234;
    let banner = b.text("#low-balance").await;
    assert!(
        banner.contains(&format!(
            "Your balance of {balance_now} credits is below your low-balance threshold of 5,000 credits"
        )),
        "{banner}"
    );
    b.screenshot("overview-low-balance").await;

    // Webhook endpoints: refusals by their fields, nothing created.
    b.click("nav a[href='/console/settings']").await;
    b.fill("#f-url", "http://127.0.0.1:1/hook").await;
    b.click("#webhook-form button[type=submit]").await;
    assert!(b
        .text("#f-events-error")
        .await
        .contains("at least one event"));
    assert!(b.text("#f-url-error").await.len() > 10);
    let endpoints = || async {
        app.db
            .query_one("SELECT count(*) FROM webhook_endpoints", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    assert_eq!(endpoints().await, 0);
    // Created: the secret shown once, with its copy button and the warning.
    b.fill("#f-url", &up.url("/hook")).await;
    b.press("#ev-key-created").await;
    b.click("#webhook-form button[type=submit]").await;
    let secret = value(&b, "#new-secret").await;
    assert!(
        secret.starts_with("whsec_") && secret.len() == 70,
        "{secret}"
    );
    assert!(b
        .text(".secret-box .warn")
        .await
        .contains("you will not see this secret again"));
    assert!(b.try_find("button[data-copy='new-secret']").await.is_some());
    assert_eq!(endpoints().await, 1);
    b.screenshot("webhook-created").await;
    // Listed, and never shown again.
    b.goto(&console("/settings")).await;
    assert!(b.text("#endpoints").await.contains(&up.url("/hook")));
    assert!(b.try_find("#new-secret").await.is_none());
    assert!(!b.source().await.contains(&secret));
    // A key made in the console fires key.created, delivered to the endpoint and listed.
    b.click("nav a[href='/console/keys']").await;
    b.fill("#f-name", "third").await;
    b.click("#create button[type=submit]").await;
    b.click("nav a[href='/console/settings']").await;
    b.click("#endpoints a.secondary").await;
    let endpoint_url = b.url().await;
    let started = std::time::Instant::now();
    loop {
        if b.try_find("#deliveries").await.is_some()
            && b.text("#deliveries").await.contains("delivered")
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no delivery listed: {}",
            b.source().await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        b.goto(&endpoint_url).await;
    }
    assert!(b.text("#deliveries").await.contains("key.created"));
    let hooks = up.hooks();
    assert_eq!(hooks.len(), 1);
    assert_eq!(hooks[0].headers["keymeter-event-type"], "key.created");
    b.screenshot("webhook-endpoint").await;
    // Rotate: a new secret, shown once.
    b.click("form.inline button.secondary").await;
    let rotated = value(&b, "#new-secret").await;
    assert!(rotated.starts_with("whsec_"));
    assert_ne!(rotated, secret);
    assert!(b.text(".facts").await.contains("still signs until"));
    // Delete, after a confirmation page.
    b.click("main a.danger").await;
    assert_eq!(b.text("h1").await, "Delete this endpoint?");
    b.screenshot("webhook-delete-confirm").await;
    b.click("main form button.danger").await;
    assert!(b.text(".notice.ok").await.contains("deleted"));
    assert!(b.try_find("#endpoints").await.is_none());
    assert_eq!(endpoints().await, 0);
    b.set_size(375, 900).await;
    b.goto(&console("/settings")).await;
    assert!(fits_375(&b).await, "settings at 375 px");
    b.screenshot("settings-375px").await;
    b.set_size(1280, 1000).await;

    // Auto-recharge without a saved card: refused, as a message in its section.
    b.click("nav a[href='/console/billing']").await;
    assert_eq!(b.text("#ar-card").await, "none saved yet");
    b.press("#ar-enabled").await;
    b.fill("#ar-threshold", "200").await;
    choose(&b, "#ar-pack", "small").await;
    b.fill("#ar-max", "3").await;
    b.click("#ar-form button[type=submit]").await;
    let msg = b.text("#auto-recharge .notice.error").await;
    assert!(msg.contains("needs a card saved"), "{msg}");
    // What was typed is still there to correct.
    assert_eq!(value(&b, "#ar-threshold").await, "200");
    let enabled: i64 = app
        .db
        .query_one(
            "SELECT count(*) FROM billing_auto_recharge WHERE enabled",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(enabled, 0);
    b.screenshot("billing-auto-recharge-refused").await;
    // Save a card: a setup-mode Checkout Session, and the browser sent to Stripe's page.
    b.click("#auto-recharge button.secondary").await;
    wait_for_url(&b, "checkout.stripe.com").await;
    let sessions = stripe.requests_to("/v1/checkout/sessions");
    let setup = crate::support::stripe::form(&sessions.last().unwrap().2);
    assert_eq!(setup.get("mode").map(String::as_str), Some("setup"));
    let customer: String = app
        .db
        .query_one(
            "SELECT customer_id FROM billing_customers WHERE account_id = $1",
            &[&account],
        )
        .await
        .unwrap()
        .get(0);
    let mut s = fixture("checkout.session");
    s["id"] = json!(format!("cs_test_{}", Uuid::new_v4().simple()));
    s["mode"] = json!("setup");
    s["status"] = json!("complete");
    s["payment_status"] = json!("no_payment_required");
    s["customer"] = json!(customer);
    s["client_reference_id"] = json!(account.to_string());
    s["payment_intent"] = Value::Null;
    s["setup_intent"] = json!("seti_console_1");
    stripe.knows_session_with_card(&s, "pm_card_console");
    let res = deliver(
        &app,
        WEBHOOK_SECRET,
        &event("checkout.session.completed", s, now()),
    )
    .await;
    assert_eq!(res.status(), 200);
    // With the card, the same settings turn it on.
    b.goto(&console("/billing?card=saved")).await;
    assert_eq!(b.text("#ar-card").await, "saved for off-session payments");
    b.press("#ar-enabled").await;
    b.fill("#ar-threshold", "200").await;
    b.fill("#ar-max", "3").await;
    b.click("#ar-form button[type=submit]").await;
    assert!(b.text(".notice.ok").await.contains("Auto-recharge is on"));
    assert_eq!(b.text("#ar-state").await, "on");
    let (threshold, max): (i64, i32) = {
        let r = app
            .db
            .query_one(
                "SELECT threshold, max_per_month FROM billing_auto_recharge WHERE account_id = $1 AND enabled",
                &[&account],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((threshold, max), (200, 3));
    b.screenshot("billing-auto-recharge").await;
    // The Stripe customer portal, for the card and invoices: a portal session for this
    // account's customer, coming back to the billing page.
    b.click("form[action='/console/billing/portal'] button")
        .await;
    wait_for_url(&b, "billing.stripe.com").await;
    let portal = stripe.requests_to("/v1/billing_portal/sessions");
    assert_eq!(portal.len(), 1);
    let portal = crate::support::stripe::form(&portal[0].2);
    assert_eq!(portal.get("customer"), Some(&customer));
    assert_eq!(
        portal.get("return_url").map(String::as_str),
        Some(console("/billing").as_str())
    );

    b.quit().await;
    assert_ledger_invariant(&app).await;
}
