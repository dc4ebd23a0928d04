//! A real browser for the console's tests: Debian's `chromium`, headless, driven through
//! `chromedriver` (the `chromium-driver` package) over the W3C WebDriver protocol.
//!
//! The protocol is JSON over HTTP, and the handful of commands the tests use (navigate, find,
//! click, type, read, screenshot, run a script) are a few lines each on the reqwest client
//! the tests already have — so no WebDriver crate (fantoccini would add its own hyper client
//! stack and cookie/webdriver crates for the same dozen calls).
//!
//! `scripts/test.sh` installs both packages when they are missing. The browser is kept
//! off the internet (`--host-resolver-rules`): only loopback resolves, so a redirect to
//! Stripe's real Checkout page fails fast instead of leaving the machine.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

/// The key W3C WebDriver names an element reference by.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    http: reqwest::Client,
    driver_url: String,
    session: String,
    driver: Child,
}

fn which(names: &[&str]) -> Option<String> {
    for n in names {
        for dir in ["/usr/bin", "/usr/local/bin", "/usr/lib/chromium"] {
            let p = format!("{dir}/{n}");
            if std::path::Path::new(&p).exists() {
                return Some(p);
            }
        }
    }
    None
}

/// Where the tests leave their screenshots: `target/console-screenshots/`.
pub fn screenshot_dir() -> PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("console-screenshots")
}

impl Browser {
    /// Starts chromedriver on a free port and a headless chromium session of `width` ×
    /// `height` pixels.
    pub async fn start(width: u32, height: u32) -> Browser {
        let driver_bin = which(&["chromedriver"]).expect(
            "chromedriver not found: install Debian's chromium and chromium-driver \
             (scripts/test.sh does it with apt-get)",
        );
        let chromium = which(&["chromium", "chromium-browser"]).expect("chromium not found");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new(driver_bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let driver_url = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        loop {
            let ready = http
                .get(format!("{driver_url}/status"))
                .send()
                .await
                .ok()
                .filter(|r| r.status().is_success());
            if let Some(r) = ready {
                let v: Value = r.json().await.unwrap_or_default();
                if v["value"]["ready"] == true {
                    break;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "chromedriver did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-extensions", "--no-first-run", "--hide-scrollbars",
                    format!("--window-size={width},{height}"),
                    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
                ],
            },
        }}});
        let res: Value = http
            .post(format!("{driver_url}/session"))
            .json(&caps)
            .send()
            .await
            .expect("new session")
            .json()
            .await
            .unwrap();
        let session = res["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no browser session: {res}"))
            .to_owned();
        Browser {
            http,
            driver_url,
            session,
            driver,
        }
    }

    async fn cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{path}", self.driver_url, self.session);
        let mut req = self.http.request(method, url);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.expect("webdriver command sent");
        let status = res.status();
        let v: Value = res.json().await.unwrap_or_default();
        assert!(status.is_success(), "webdriver {path}: {status} {v}");
        v["value"].clone()
    }

    pub async fn goto(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await;
    }

    pub async fn url(&self) -> String {
        self.cmd(reqwest::Method::GET, "/url", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// The element `css` selects, if any (no waiting: pages here are server-rendered).
    pub async fn try_find(&self, css: &str) -> Option<String> {
        let url = format!("{}/session/{}/element", self.driver_url, self.session);
        let res = self
            .http
            .post(url)
            .json(&json!({"using": "css selector", "value": css}))
            .send()
            .await
            .expect("find sent");
        let ok = res.status().is_success();
        let v: Value = res.json().await.unwrap_or_default();
        if !ok {
            let error = v["value"]["error"].as_str().unwrap_or_default();
            assert_eq!(error, "no such element", "finding {css:?}: {v}");
            return None;
        }
        let found = v["value"][ELEMENT].as_str().map(str::to_owned);
        assert!(found.is_some(), "finding {css:?}: {v}");
        found
    }

    pub async fn find(&self, css: &str) -> String {
        match self.try_find(css).await {
            Some(e) => e,
            None => panic!(
                "no element {css:?} on {}:\n{}",
                self.url().await,
                self.source().await
            ),
        }
    }

    /// Clicks a link or a form's button and waits for the next page to have loaded (the
    /// old document is marked first, so its lingering presence is not taken for the new).
    pub async fn click(&self, css: &str) {
        self.exec("window.__kmOld = true; return true;").await;
        self.press(css).await;
        let started = Instant::now();
        loop {
            let done = self
                .exec("return !window.__kmOld && document.readyState === 'complete';")
                .await;
            if done == true {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "clicking {css:?} led to no new page"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Clicks something that stays on the page (a script's button).
    pub async fn press(&self, css: &str) {
        let e = self.find(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{e}/click"),
            Some(json!({})),
        )
        .await;
    }

    /// Types `text` into the field `css` (after clearing it), as a person would.
    pub async fn fill(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{e}/clear"),
            Some(json!({})),
        )
        .await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{e}/value"),
            Some(json!({"text": text})),
        )
        .await;
    }

    /// The rendered text of `css`.
    pub async fn text(&self, css: &str) -> String {
        let e = self.find(css).await;
        self.cmd(reqwest::Method::GET, &format!("/element/{e}/text"), None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// A DOM property of `css` (`value` of an input).
    pub async fn property(&self, css: &str, name: &str) -> Value {
        let e = self.find(css).await;
        self.cmd(
            reqwest::Method::GET,
            &format!("/element/{e}/property/{name}"),
            None,
        )
        .await
    }

    pub async fn source(&self) -> String {
        self.cmd(reqwest::Method::GET, "/source", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Runs `script` in the page (its `return` value comes back).
    pub async fn exec(&self, script: &str) -> Value {
        self.cmd(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
        .await
    }

    pub async fn set_size(&self, width: u32, height: u32) {
        self.cmd(
            reqwest::Method::POST,
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )
        .await;
    }

    /// The value of the browser's cookie `name` for the current page, if set.
    pub async fn cookie(&self, name: &str) -> Option<String> {
        let all = self.cmd(reqwest::Method::GET, "/cookie", None).await;
        all.as_array()?
            .iter()
            .find(|c| c["name"] == name)
            .and_then(|c| c["value"].as_str().map(str::to_owned))
    }

    /// Saves the viewport as `target/console-screenshots/<name>.png` and returns the path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let b64 = self.cmd(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap_or_default())
            .expect("screenshot is base64");
        assert!(png.starts_with(b"\x89PNG"), "screenshot is a PNG");
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }

    /// Waits until `cond` holds for the text of `css` (a script's change, a redirect).
    pub async fn wait_text(&self, css: &str, cond: impl Fn(&str) -> bool) -> String {
        let started = Instant::now();
        loop {
            if self.try_find(css).await.is_some() {
                let t = self.text(css).await;
                if cond(&t) {
                    return t;
                }
                if started.elapsed() > Duration::from_secs(10) {
                    panic!("{css:?} still reads {t:?}");
                }
            } else if started.elapsed() > Duration::from_secs(10) {
                panic!("no {css:?} on {}", self.url().await);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Ends the browser session and the driver.
    pub async fn quit(mut self) {
        let _ = self
            .http
            .delete(format!("{}/session/{}", self.driver_url, self.session))
            .send()
            .await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // A failed test still ends its driver (its browser exits with it).
        let _ = self.driver.kill();
    }
}
