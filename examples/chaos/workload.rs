//! The clients: many accounts across tiers doing what customers do, each request and its
//! answer recorded on the client side, which is all the checker trusts besides the database.
//!
//! A client retries like a real client library: on a timeout, a connection error, a 5xx that
//! is not a job's own definitive answer, a `408`, or `409 idempotency_conflict`, it sends the same
//! request again with the same `Idempotency-Key` — to any instance, as a load balancer
//! would — and only when it sent one. A request without a key is sent once: if its answer is
//! lost, its outcome is unknown, and the checker counts it as such.
//!
//! Every metered charge carries a `reason` unique to its operation (`chaos op <n>`), so the
//! checker can find its ledger row even when the client never saw the answer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::sync::mpsc;

#[derive(Debug, Clone, Serialize)]
pub struct Attempt {
    pub inst: usize,
    pub t0: u64,
    pub t1: u64,
    /// 0: no HTTP answer (connection refused or reset, timeout).
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ptype: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub replayed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Charge,
    Scrape,
    Job,
    Cancel,
    KeyCreate,
    KeyRevoke,
    KeyRotate,
    Checkout,
    StripeDelivery,
    Read,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A 2xx answer.
    Acked,
    /// A definitive refusal (4xx, or a job's own failure answer).
    Refused,
    /// No definitive answer: every attempt met a fault.
    Lost,
}

/// One revocation's probe of one instance.
#[derive(Debug, Clone, Serialize, Default)]
pub struct InstanceProbe {
    pub inst: usize,
    /// Milliseconds after the revocation's acknowledgement that the first refusing probe was
    /// sent; `None`: the instance never answered (down or stalled).
    pub first_refusal_ms: Option<u64>,
    /// The latest send time (ms after the acknowledgement) of a probe it still accepted.
    pub last_acceptance_ms: Option<u64>,
    pub probes: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Op {
    pub id: u64,
    pub kind: Kind,
    pub account: usize,
    pub t0: u64,
    pub t1: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idem: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub amount: i64,
    pub outcome: Outcome,
    /// The ledger entry id of every 2xx answer (a charge's; all must be the same).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ledger_ids: Vec<i64>,
    /// The job id of every answer naming one (all must be the same).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub job_ids: Vec<String>,
    /// The job's status as the final answer gave it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub probe: Vec<InstanceProbe>,
    /// An acknowledged idempotent charge sent again: how that answer ended (`replayed`, or
    /// the status and type of the last answer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay: Option<String>,
    pub attempts: Vec<Attempt>,
}

#[derive(Clone)]
pub struct Account {
    pub id: String,
    pub tier: String,
    pub key: String,
}

/// A purchase handed to the Stripe deliverer: the session keymeter created, for an account.
pub struct Purchase {
    pub session: String,
    pub account: usize,
}

pub struct Ctx {
    pub t0: Instant,
    pub seed: u64,
    pub bases: Vec<String>,
    pub http: reqwest::Client,
    pub accounts: Vec<Account>,
    pub upstream_port: u16,
    pub stripe_secret: String,
    /// No new operation starts after this (ms since t0).
    pub stop_ms: u64,
    /// No retry starts after this.
    pub retry_until_ms: u64,
    pub ops: Mutex<Vec<Op>>,
    next_id: AtomicU64,
    pub stripe_fixture_event: Value,
    pub stripe_fixture_session: Value,
}

const MAX_RETRY_MS: u64 = 45_000;

impl Ctx {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        t0: Instant,
        seed: u64,
        bases: Vec<String>,
        accounts: Vec<Account>,
        upstream_port: u16,
        stripe_secret: String,
        stop_ms: u64,
        retry_until_ms: u64,
    ) -> anyhow::Result<Self> {
        Ok(Ctx {
            t0,
            seed,
            bases,
            // Longer than keymeter's own request timeout (10 s), so a slow answer is an
            // answer; a stalled instance makes it a timeout.
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(12))
                .connect_timeout(Duration::from_secs(2))
                .pool_idle_timeout(Duration::from_secs(5))
                .build()?,
            accounts,
            upstream_port,
            stripe_secret,
            stop_ms,
            retry_until_ms,
            ops: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
            stripe_fixture_event: serde_json::from_str(include_str!(
                "../../tests/fixtures/stripe/event.json"
            ))?,
            stripe_fixture_session: serde_json::from_str(include_str!(
                "../../tests/fixtures/stripe/checkout.session.json"
            ))?,
        })
    }

    pub fn now(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }

    fn op(&self, kind: Kind, account: usize) -> Op {
        Op {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            kind,
            account,
            t0: self.now(),
            t1: 0,
            idem: None,
            reason: None,
            amount: 0,
            outcome: Outcome::Lost,
            ledger_ids: Vec::new(),
            job_ids: Vec::new(),
            job_status: None,
            key_id: None,
            session: None,
            event: None,
            probe: Vec::new(),
            replay: None,
            attempts: Vec::new(),
        }
    }

    fn finish(&self, mut op: Op) {
        op.t1 = self.now();
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).push(op);
    }

    /// One HTTP exchange with instance `inst`, recorded as an attempt of `op`.
    async fn send(
        &self,
        op: &mut Op,
        inst: usize,
        req: reqwest::RequestBuilder,
    ) -> Option<(u16, Value)> {
        let t0 = self.now();
        let res = req.send().await;
        let mut a = Attempt {
            inst,
            t0,
            t1: 0,
            status: 0,
            ptype: None,
            error: None,
            replayed: false,
        };
        let out = match res {
            Ok(r) => {
                a.status = r.status().as_u16();
                a.replayed = r.headers().contains_key("idempotent-replayed");
                match r.bytes().await {
                    Ok(b) => {
                        let v: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
                        if a.status >= 400 {
                            a.ptype = v["type"].as_str().map(str::to_owned);
                        }
                        Some((a.status, v))
                    }
                    Err(e) => {
                        a.error = Some(format!("body: {e}"));
                        a.status = 0;
                        None
                    }
                }
            }
            Err(e) => {
                a.error = Some(if e.is_timeout() {
                    "timeout".to_owned()
                } else if e.is_connect() {
                    "connect".to_owned()
                } else {
                    "transport".to_owned()
                });
                None
            }
        };
        a.t1 = self.now();
        op.attempts.push(a);
        out
    }

    /// Sends the request built by `build` for instance `inst` until it has a definitive
    /// answer, retrying (with `retry`) what a client library would retry. Returns the final
    /// answer, and sets `op.outcome`.
    async fn call<F>(
        &self,
        op: &mut Op,
        rng: &mut StdRng,
        retry: bool,
        build: F,
    ) -> Option<(u16, Value)>
    where
        F: Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    {
        let mut backoff = 100u64;
        loop {
            let inst = rng.gen_range(0..self.bases.len());
            let answer = self
                .send(op, inst, build(&self.http, &self.bases[inst]))
                .await;
            let retriable = match &answer {
                None => true,
                Some((s, v)) => {
                    let t = v["type"].as_str().unwrap_or("");
                    match s {
                        200..=299 => {
                            op.outcome = Outcome::Acked;
                            return answer;
                        }
                        // A job's own end (refunded): final, like its 200.
                        502 | 504 if v.get("job_id").is_some() => false,
                        503 if t == "upstream_unavailable" => false,
                        500..=599 => true,
                        409 if t == "idempotency_conflict" => true,
                        // actix's own answer when a request's head was not read in time (a
                        // stalled instance, resumed): the request was never looked at.
                        408 => true,
                        _ => false,
                    }
                }
            };
            if !retriable {
                op.outcome = Outcome::Refused;
                return answer;
            }
            let now = self.now();
            if !retry || now > op.t0 + MAX_RETRY_MS || now > self.retry_until_ms {
                op.outcome = Outcome::Lost;
                return answer;
            }
            tokio::time::sleep(Duration::from_millis(backoff + rng.gen_range(0..100))).await;
            backoff = (backoff * 2).min(2_000);
        }
    }

    /// POSTs `body` to `path` with account `a`'s key and the operation's `Idempotency-Key`
    /// (if it has one) through [`Self::call`]; retried only when it has a key, as a client
    /// library would.
    async fn post(
        &self,
        op: &mut Op,
        rng: &mut StdRng,
        a: usize,
        path: &str,
        body: &Value,
    ) -> Option<(u16, Value)> {
        let key = self.accounts[a].key.clone();
        let idem = op.idem.clone();
        let retry = idem.is_some();
        self.call(op, rng, retry, |c, base| {
            let r = c.post(format!("{base}{path}")).bearer_auth(&key).json(body);
            match &idem {
                Some(k) => r.header("Idempotency-Key", k),
                None => r,
            }
        })
        .await
    }

    fn idem_key(&self, op: &Op) -> String {
        format!("chaos-{}-{}", self.seed, op.id)
    }

    // --- operations ---------------------------------------------------------------------

    async fn charge(&self, rng: &mut StdRng, a: usize) {
        let mut op = self.op(Kind::Charge, a);
        op.amount = rng.gen_range(1..=5);
        let reason = format!("chaos op {}", op.id);
        op.reason = Some(reason.clone());
        if rng.gen_bool(0.6) {
            op.idem = Some(self.idem_key(&op));
        }
        let body = json!({"amount": op.amount, "reason": reason});
        let retry = op.idem.is_some();
        let path = "/v1/credits/charge";
        let ans = self.post(&mut op, rng, a, path, &body).await;
        if let (Outcome::Acked, Some((_, v))) = (op.outcome, &ans) {
            if let Some(id) = v["id"].as_i64() {
                op.ledger_ids.push(id);
            }
            // Sometimes the same request again after its success (a client that did not
            // notice it had its answer): it must replay the same ledger entry, charging
            // nothing.
            if retry && rng.gen_bool(0.2) {
                let again = self.post(&mut op, rng, a, path, &body).await;
                op.replay = Some(match &again {
                    Some((s, v)) if (200..300).contains(s) => {
                        if let Some(id) = v["id"].as_i64() {
                            op.ledger_ids.push(id);
                        }
                        "replayed".to_owned()
                    }
                    Some((s, v)) => format!("{s} {}", v["type"].as_str().unwrap_or("")),
                    None => "no answer".to_owned(),
                });
                op.outcome = Outcome::Acked;
            }
        }
        self.finish(op);
    }

    fn job_url(&self, rng: &mut StdRng, timeout_ms: u64) -> String {
        let p = self.upstream_port;
        match rng.gen_range(0..100) {
            0..=54 => format!("http://127.0.0.1:{p}/page"),
            55..=64 => format!("http://127.0.0.1:{p}/slow/300"),
            65..=74 => format!("http://localhost:{p}/status/500"),
            75..=79 => format!("http://127.0.0.1:{p}/status/404"),
            80..=89 => format!("http://localhost:{p}/slow/{}", timeout_ms + 1_500),
            _ => format!("http://localhost:{p}/status/503"),
        }
    }

    fn note_job(op: &mut Op, v: &Value) {
        let id = v["job_id"].as_str().or(v["id"].as_str());
        if let Some(id) = id {
            op.job_ids.push(id.to_owned());
        }
        op.job_status = v["status"]
            .as_str()
            .filter(|_| v.get("job_id").is_none())
            .map(str::to_owned)
            .or_else(|| v["reason"].as_str().map(|r| format!("problem:{r}")));
    }

    async fn scrape(&self, rng: &mut StdRng, a: usize) {
        let mut op = self.op(Kind::Scrape, a);
        let timeout_ms = 3_000;
        let body = json!({"url": self.job_url(rng, timeout_ms), "formats": ["metadata"], "timeout_ms": timeout_ms});
        if rng.gen_bool(0.5) {
            op.idem = Some(self.idem_key(&op));
        }
        let ans = self.post(&mut op, rng, a, "/v1/scrape", &body).await;
        if let Some((_, v)) = &ans {
            Self::note_job(&mut op, v);
        }
        self.finish(op);
    }

    async fn job(&self, rng: &mut StdRng, a: usize) {
        let mut op = self.op(Kind::Job, a);
        // One in three async jobs fetches a flaky page (see upstream::once) with time to
        // spare: enough of them are in flight when an instance stalls for the lease fence to
        // be tested in a 60 s run.
        let (url, timeout_ms) = if rng.gen_bool(0.35) {
            let token = format!("{}-{}", self.seed, op.id);
            (
                format!("http://127.0.0.1:{}/once/{token}", self.upstream_port),
                15_000,
            )
        } else {
            (self.job_url(rng, 4_000), 4_000)
        };
        let body = json!({
            "url": url, "formats": ["metadata"], "timeout_ms": timeout_ms,
            "webhook_url": format!("http://127.0.0.1:{}/hook", self.upstream_port),
        });
        if rng.gen_bool(0.5) {
            op.idem = Some(self.idem_key(&op));
        }
        let ans = self.post(&mut op, rng, a, "/v1/jobs", &body).await;
        let mut cancel = None;
        if let (Outcome::Acked, Some((_, v))) = (op.outcome, &ans) {
            Self::note_job(&mut op, v);
            if rng.gen_bool(0.35) {
                cancel = op.job_ids.last().cloned();
            }
        }
        self.finish(op);
        if let Some(job) = cancel {
            let mut op = self.op(Kind::Cancel, a);
            op.job_ids.push(job.clone());
            let key = self.accounts[a].key.clone();
            // A DELETE is safe to repeat: a second one finds the job cancelled (409).
            let ans = self
                .call(&mut op, rng, true, |c, base| {
                    c.delete(format!("{base}/v1/jobs/{job}")).bearer_auth(&key)
                })
                .await;
            if let Some((_, v)) = &ans {
                op.job_status = v["status"].as_str().map(str::to_owned);
            }
            self.finish(op);
        }
    }

    async fn read(&self, rng: &mut StdRng, a: usize) {
        let mut op = self.op(Kind::Read, a);
        let key = self.accounts[a].key.clone();
        self.call(&mut op, rng, false, |c, base| {
            c.get(format!("{base}/v1/account")).bearer_auth(&key)
        })
        .await;
        self.finish(op);
    }

    /// Create a key, use it on every instance (so each has it cached), then revoke it or
    /// rotate it away with no grace, and probe every instance until each refuses it.
    async fn keys(&self, rng: &mut StdRng, a: usize) {
        let mut op = self.op(Kind::KeyCreate, a);
        let key = self.accounts[a].key.clone();
        let name = format!("chaos {}", op.id);
        let ans = self
            .call(&mut op, rng, false, |c, base| {
                c.post(format!("{base}/v1/keys"))
                    .bearer_auth(&key)
                    .json(&json!({"name": name, "scopes": ["read", "scrape"]}))
            })
            .await;
        let created = match (&op.outcome, &ans) {
            (Outcome::Acked, Some((_, v))) => v["id"]
                .as_str()
                .zip(v["key"].as_str())
                .map(|(i, k)| (i.to_owned(), k.to_owned())),
            _ => None,
        };
        op.key_id = created.as_ref().map(|c| c.0.clone());
        self.finish(op);
        let Some((key_id, secret)) = created else {
            return;
        };
        for base in &self.bases {
            let _ = self
                .http
                .get(format!("{base}/v1/account"))
                .bearer_auth(&secret)
                .timeout(Duration::from_secs(2))
                .send()
                .await;
        }
        let rotate = rng.gen_bool(0.4);
        let mut op = self.op(
            if rotate {
                Kind::KeyRotate
            } else {
                Kind::KeyRevoke
            },
            a,
        );
        op.key_id = Some(key_id.clone());
        let ans = if rotate {
            // Not retried: a rotation is not idempotent (a lost answer leaves a successor).
            self.call(&mut op, rng, false, |c, base| {
                c.post(format!("{base}/v1/keys/{key_id}/rotate"))
                    .bearer_auth(&key)
                    .json(&json!({"grace_seconds": 0}))
            })
            .await
        } else {
            self.call(&mut op, rng, true, |c, base| {
                c.delete(format!("{base}/v1/keys/{key_id}"))
                    .bearer_auth(&key)
            })
            .await
        };
        let successor = ans.as_ref().and_then(|(_, v)| {
            rotate
                .then(|| v["id"].as_str().map(str::to_owned))
                .flatten()
        });
        if op.outcome == Outcome::Acked {
            let acked = op.attempts.last().map_or(self.now(), |a| a.t1);
            op.probe = self.probe(&secret, acked).await;
        }
        self.finish(op);
        // The successor is revoked too (not probed), so the account stays under max_keys.
        if let Some(s) = successor {
            let mut op = self.op(Kind::KeyRevoke, a);
            op.key_id = Some(s.clone());
            self.call(&mut op, rng, true, |c, base| {
                c.delete(format!("{base}/v1/keys/{s}")).bearer_auth(&key)
            })
            .await;
            self.finish(op);
        }
    }

    /// Probes every instance with `secret` from `acked` on: every 100 ms until 1.2 s after the
    /// acknowledgement and the instance has refused it once (at most 6 s).
    async fn probe(&self, secret: &str, acked: u64) -> Vec<InstanceProbe> {
        let tasks = (0..self.bases.len()).map(|inst| {
            let base = self.bases[inst].clone();
            async move {
                let mut p = InstanceProbe {
                    inst,
                    ..Default::default()
                };
                loop {
                    let sent = self.now().saturating_sub(acked);
                    let r = self
                        .http
                        .get(format!("{base}/v1/account"))
                        .bearer_auth(secret)
                        .timeout(Duration::from_millis(800))
                        .send()
                        .await;
                    p.probes += 1;
                    // An answer that took over 500 ms is a stalled instance's: the request
                    // waited in its socket while it was stopped, and was answered at
                    // SIGCONT, possibly before it read the revocation waiting on its LISTEN
                    // connection. The rule is about live instances, so it does not count as
                    // an acceptance (it is no refusal either).
                    let prompt = self.now().saturating_sub(acked).saturating_sub(sent) < 500;
                    match r.map(|r| r.status().as_u16()) {
                        Ok(s) if (200..300).contains(&s) && prompt => {
                            p.last_acceptance_ms = Some(sent)
                        }
                        Ok(401) => {
                            p.first_refusal_ms.get_or_insert(sent);
                        }
                        _ => {}
                    }
                    let since = self.now().saturating_sub(acked);
                    if (since >= 1_200 && p.first_refusal_ms.is_some()) || since >= 6_000 {
                        return p;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
        futures_util::future::join_all(tasks).await
    }

    async fn checkout(&self, rng: &mut StdRng, a: usize, stripe: &mpsc::UnboundedSender<Purchase>) {
        let mut op = self.op(Kind::Checkout, a);
        op.idem = Some(self.idem_key(&op));
        let key = self.accounts[a].key.clone();
        let idem = op.idem.clone().unwrap_or_default();
        let ans = self
            .call(&mut op, rng, true, |c, base| {
                c.post(format!("{base}/v1/billing/checkout"))
                    .bearer_auth(&key)
                    .header("Idempotency-Key", &idem)
                    .json(
                        &json!({"pack": "chaos", "success_url": "https://example.com/ok",
                                  "cancel_url": "https://example.com/cancel"}),
                    )
            })
            .await;
        if let (Outcome::Acked, Some((_, v))) = (op.outcome, &ans) {
            if let Some(s) = v["id"].as_str() {
                op.session = Some(s.to_owned());
                let _ = stripe.send(Purchase {
                    session: s.to_owned(),
                    account: a,
                });
            }
        }
        self.finish(op);
    }

    /// One client: operations drawn at random until the workload stops.
    pub async fn client(self: Arc<Self>, n: u64, stripe: mpsc::UnboundedSender<Purchase>) {
        let mut rng =
            StdRng::seed_from_u64(self.seed ^ (n + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        while self.now() < self.stop_ms {
            let a = rng.gen_range(0..self.accounts.len());
            match rng.gen_range(0..100) {
                0..=39 => self.charge(&mut rng, a).await,
                40..=51 => self.scrape(&mut rng, a).await,
                52..=69 => self.job(&mut rng, a).await,
                70..=76 => self.keys(&mut rng, a).await,
                77..=81 => self.checkout(&mut rng, a, &stripe).await,
                _ => self.read(&mut rng, a).await,
            }
            tokio::time::sleep(Duration::from_millis(rng.gen_range(50..250))).await;
        }
    }

    // --- Stripe -------------------------------------------------------------------------

    fn event(&self, id: &str, kind: &str, session: &str, account: usize, paid: bool) -> Value {
        let created = unix_now();
        let mut s = self.stripe_fixture_session.clone();
        s["id"] = json!(session);
        s["mode"] = json!("payment");
        s["status"] = json!("complete");
        s["payment_status"] = json!(if paid { "paid" } else { "unpaid" });
        s["client_reference_id"] = json!(self.accounts[account].id);
        s["customer"] = Value::Null;
        s["metadata"] = json!({"account_id": self.accounts[account].id, "pack": "chaos"});
        s["payment_intent"] = json!(format!("pi_chaos_{session}"));
        s["created"] = json!(created);
        s["url"] = Value::Null;
        let mut e = self.stripe_fixture_event.clone();
        e["id"] = json!(id);
        e["type"] = json!(kind);
        e["created"] = json!(created);
        e["data"] = json!({"object": s});
        e
    }

    /// Delivers one event as Stripe does: signed at each attempt, retried until a 2xx.
    async fn deliver(
        self: Arc<Self>,
        account: usize,
        session: String,
        event: Value,
        delay_ms: u64,
        n: u64,
    ) {
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        let mut rng = StdRng::seed_from_u64(self.seed ^ n.wrapping_mul(0xD6E8_FEB8_6659_FD93));
        let mut op = self.op(Kind::StripeDelivery, account);
        op.session = Some(session);
        op.event = event["id"].as_str().map(str::to_owned);
        let body = serde_json::to_vec(&event).unwrap_or_default();
        let secret = self.stripe_secret.clone();
        self.call(&mut op, &mut rng, true, |c, base| {
            let t = unix_now();
            c.post(format!("{base}/v1/billing/webhook"))
                .header("Content-Type", "application/json")
                .header("Stripe-Signature", signature_header(&secret, t, &body))
                .body(body.clone())
        })
        .await;
        self.finish(op);
    }

    /// The Stripe side: each purchase's events delivered duplicated, delayed and reordered.
    /// Half the sessions complete paid (one event, 1–3 copies); the other half complete
    /// unpaid and then succeed asynchronously (two events, each 1–2 copies), the two sent in
    /// a random order — exactly one of all of them may credit the pack.
    pub async fn stripe(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Purchase>) {
        let mut rng = StdRng::seed_from_u64(self.seed ^ 0x5712_1BE5);
        let mut tasks = Vec::new();
        let mut n = 0u64;
        while let Some(p) = rx.recv().await {
            let mut events = Vec::new();
            let tag = format!("{}_{}", self.seed, p.session);
            if rng.gen_bool(0.5) {
                let e = self.event(
                    &format!("evt_chaos_{tag}_c"),
                    "checkout.session.completed",
                    &p.session,
                    p.account,
                    true,
                );
                for _ in 0..rng.gen_range(1..=3) {
                    events.push(e.clone());
                }
            } else {
                let unpaid = self.event(
                    &format!("evt_chaos_{tag}_u"),
                    "checkout.session.completed",
                    &p.session,
                    p.account,
                    false,
                );
                let paid = self.event(
                    &format!("evt_chaos_{tag}_a"),
                    "checkout.session.async_payment_succeeded",
                    &p.session,
                    p.account,
                    true,
                );
                for _ in 0..rng.gen_range(1..=2) {
                    events.push(unpaid.clone());
                }
                for _ in 0..rng.gen_range(1..=2) {
                    events.push(paid.clone());
                }
            }
            for e in events {
                n += 1;
                let delay = rng.gen_range(0..4_000);
                tasks.push(tokio::spawn(self.clone().deliver(
                    p.account,
                    p.session.clone(),
                    e,
                    delay,
                    n,
                )));
            }
        }
        for t in tasks {
            let _ = t.await;
        }
    }
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `Stripe-Signature: t=<t>,v1=<hex HMAC-SHA256(secret, "t.body")>`, as Stripe signs.
pub fn signature_header(secret: &str, t: i64, body: &[u8]) -> String {
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}
