//! Gateway mode behind a real nginx: Debian's `nginx` (installed with apt-get when missing, as
//! scripts/lib.sh installs PostgreSQL) runs `deploy/nginx/keymeter.conf` as shipped — only its
//! `listen` line changed — in front of a local upstream, with keymeter as the authorizer.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use serde_json::{json, Value};

use super::gateway::gateway;
use crate::support::{assert_problem, spawn_app_with, TestApp};

fn nginx_binary() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Debian's nginx, installed when missing (as root, or through sudo).
fn ensure_nginx() -> PathBuf {
    if let Some(p) = nginx_binary() {
        return p;
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    let run = |args: &[&str]| {
        let mut c = if root {
            Command::new(args[0])
        } else {
            let mut c = Command::new("sudo");
            c.arg(args[0]);
            c
        };
        c.args(&args[1..]).env("DEBIAN_FRONTEND", "noninteractive");
        let status = c.status().expect("run apt-get");
        assert!(status.success(), "{args:?} failed");
    };
    run(&["apt-get", "update", "-qq"]);
    run(&["apt-get", "install", "-y", "-qq", "nginx"]);
    nginx_binary().expect("nginx installed")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The upstream API: answers every request with what it received from nginx.
async fn upstream() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = HttpServer::new(|| {
        App::new().default_service(web::to(|req: HttpRequest| async move {
            let headers: serde_json::Map<String, Value> = req
                .headers()
                .iter()
                .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or("?"))))
                .collect();
            HttpResponse::Ok().json(json!({
                "upstream": true,
                "method": req.method().as_str(),
                "path": req.path(),
                "headers": headers,
            }))
        }))
    })
    .workers(1)
    .disable_signals()
    .listen(listener)
    .unwrap()
    .run();
    tokio::spawn(server);
    port
}

struct Nginx {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Drop for Nginx {
    /// SIGTERM, not SIGKILL: the master stops its workers on TERM, while a killed master
    /// leaves its worker running, orphaned, after the test. SIGKILL only if it hangs.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Nginx {
    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

/// nginx with the repository's recipe, `keymeter` and `api` pointing at the local servers.
fn start_nginx(keymeter_port: u16, api_port: u16) -> Nginx {
    let bin = ensure_nginx();
    let dir = std::env::temp_dir().join(format!("keymeter-nginx-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let recipe = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/nginx/keymeter.conf"),
    )
    .expect("deploy/nginx/keymeter.conf");
    assert!(recipe.contains("    listen 80;\n"));
    std::fs::write(
        dir.join("keymeter.conf"),
        recipe.replace(
            "    listen 80;\n",
            &format!("    listen 127.0.0.1:{port};\n"),
        ),
    )
    .unwrap();
    let d = dir.display();
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout == b"0\n")
        .unwrap_or(false);
    let conf = format!(
        "{user}worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         upstream keymeter {{ server 127.0.0.1:{keymeter_port}; keepalive 16; }}\n\
         upstream api {{ server 127.0.0.1:{api_port}; keepalive 16; }}\n\
         include {d}/keymeter.conf;\n}}\n",
        user = if root { "user root;\n" } else { "" },
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let child = Command::new(bin)
        .args([
            "-p",
            &d.to_string(),
            "-c",
            &format!("{d}/nginx.conf"),
            "-g",
            "daemon off;",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx");
    let nginx = Nginx { child, dir, port };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nginx did not start: {}",
            nginx.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    nginx
}

async fn through(app: &TestApp, nginx: &Nginx, key: Option<&str>, path: &str) -> reqwest::Response {
    let mut req = app.client.get(nginx.url(path));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    req.send().await.expect("nginx answered")
}

#[tokio::test]
async fn nginx_with_the_recipe_meters_an_api_it_does_not_serve() {
    let app = spawn_app_with(|c| {
        gateway(c);
        c.trust_forwarded = true;
    })
    .await;
    let nginx = start_nginx(app.port, upstream().await);

    // No key: keymeter's 401 and its problem, not nginx's page.
    let res = through(&app, &nginx, None, "/v1/search/x").await;
    assert_eq!(res.headers()["www-authenticate"], "Bearer");
    assert_problem(res, 401, "invalid_api_key").await;

    // A valid key: the upstream's own answer, and the upstream saw who called (not the key).
    let (account, key) = app.create_account("pro", 3).await;
    let res = through(&app, &nginx, Some(&key), "/v1/search/cats?q=1").await;
    assert_eq!(res.status(), 200, "{}", nginx.log());
    assert!(res.headers()["ratelimit-policy"]
        .to_str()
        .unwrap()
        .contains("\"pro\""));
    let seen: Value = res.json().await.unwrap();
    assert_eq!(seen["upstream"], true);
    assert_eq!(seen["path"], "/v1/search/cats");
    let h = &seen["headers"];
    assert_eq!(h["x-keymeter-account"], account.to_string());
    assert_eq!(h["x-keymeter-key"].as_str(), key.get(8..20));
    assert_eq!(h["x-keymeter-tier"], "pro");
    assert_eq!(h["x-keymeter-credits-remaining"], "1");
    assert_eq!(h["x-keymeter-cost"], "2");
    assert!(h["x-keymeter-charge"]
        .as_str()
        .unwrap()
        .parse::<i64>()
        .is_ok());
    assert!(
        h.get("authorization").is_none(),
        "the key stops at nginx: {h}"
    );

    // Credits exhausted: 402 and keymeter's problem body, through auth_request.
    let res = through(&app, &nginx, Some(&key), "/v1/search/dogs").await;
    let body = assert_problem(res, 402, "insufficient_credits").await;
    assert_eq!(
        (body["balance"].as_i64(), body["cost"].as_i64()),
        (Some(1), Some(2))
    );

    // A route keymeter does not meter: its 404, not the upstream's page.
    let res = through(&app, &nginx, Some(&key), "/v1/private").await;
    assert_problem(res, 404, "route_not_metered").await;

    // Over the tier: 429 with Retry-After (the free tier's burst is 5).
    let (_, free_key) = app.create_account("free", 0).await;
    for _ in 0..5 {
        let res = through(&app, &nginx, Some(&free_key), "/v1/free").await;
        assert_eq!(res.status(), 200);
        assert!(res.headers().contains_key("x-ratelimit-remaining"));
    }
    let res = through(&app, &nginx, Some(&free_key), "/v1/free").await;
    let retry: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    let body = assert_problem(res, 429, "rate_limited").await;
    assert_eq!(body["retry_after"].as_u64(), Some(retry));

    // A revoked key is refused within a second.
    let (_, fresh) = app.create_account("pro", 100).await;
    assert_eq!(
        through(&app, &nginx, Some(&fresh), "/v1/free")
            .await
            .status(),
        200
    );
    let key_id = fresh.get(8..20).unwrap().to_owned();
    let res = app
        .admin_post(&format!("/admin/keys/{key_id}/revoke"), json!({}))
        .await;
    assert!(res.status().is_success(), "revoke: {}", res.status());
    let revoked = Instant::now();
    loop {
        let res = through(&app, &nginx, Some(&fresh), "/v1/free").await;
        if res.status() == 401 {
            assert_problem(res, 401, "invalid_api_key").await;
            break;
        }
        assert_eq!(res.status(), 200);
        assert!(
            revoked.elapsed() < Duration::from_secs(1),
            "still allowed after a second"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(revoked.elapsed() < Duration::from_secs(1));
    crate::support::db::assert_ledger_invariant(&app).await;
}
