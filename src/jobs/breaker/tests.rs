use super::*;

const FAIL: Signal = Signal::SiteFailure { egress: true };

fn quick(min_accounts: u32) -> BreakerSettings {
    BreakerSettings {
        consecutive_failures: 3,
        open_for: Duration::from_secs(1),
        max_open: Duration::from_secs(2),
        min_accounts,
        ..BreakerSettings::default()
    }
}

fn fail(b: &Breakers, account: Uuid, origin: &str, n: usize) {
    for _ in 0..n {
        b.acquire(account, origin).expect("closed").record(FAIL);
    }
}

fn shared_state(b: &Breakers, origin: &str) -> Option<State> {
    b.origins
        .get(&Arc::<str>::from(origin))
        .map(|e| e.breaker.state())
}

#[test]
fn opens_after_consecutive_failures_and_refuses_fast() {
    let b = Breakers::new("direct", quick(1));
    let a = Uuid::new_v4();
    fail(&b, a, "http://a.example", 3);
    let refused = b.acquire(a, "http://a.example").err().expect("open");
    assert_eq!(refused.kind, Kind::Host);
    assert!(b.check(Uuid::new_v4(), "http://a.example").is_err());
    // Another origin, even on the same host, is unaffected.
    assert!(b.check(a, "http://a.example:8080").is_ok());
    assert!(b.check(a, "http://b.example").is_ok());
    let snap = b.snapshot();
    assert!(snap.iter().any(|s| s.name == "http://a.example"
        && s.scope == Scope::Shared
        && s.state == State::Open));
}

#[test]
fn one_accounts_failures_open_only_its_own_breaker() {
    let b = Breakers::new("direct", quick(3));
    let (a, other) = (Uuid::new_v4(), Uuid::new_v4());
    fail(&b, a, "http://a.example", 3);
    let refused = b.check(a, "http://a.example").expect_err("a's own breaker");
    assert_eq!(refused.scope, Scope::Account);
    assert!(b.check(other, "http://a.example").is_ok());
    assert_eq!(shared_state(&b, "http://a.example"), Some(State::Closed));
}

#[test]
fn failures_from_enough_accounts_open_the_shared_breaker_at_once() {
    let b = Breakers::new("direct", quick(3));
    for _ in 0..3 {
        fail(&b, Uuid::new_v4(), "http://down.example", 1);
    }
    assert_eq!(shared_state(&b, "http://down.example"), Some(State::Open));
    let refused = b
        .check(Uuid::new_v4(), "http://down.example")
        .expect_err("open for everyone");
    assert_eq!(refused.scope, Scope::Shared);
}

#[test]
fn a_burst_from_one_account_weighs_as_one_failure() {
    let b = Breakers::new("direct", quick(2));
    fail(&b, Uuid::new_v4(), "http://x.example", 1);
    fail(&b, Uuid::new_v4(), "http://x.example", 1);
    // Two accounts, one failure each: counted as two, under the three needed.
    assert_eq!(shared_state(&b, "http://x.example"), Some(State::Closed));
    let b = Breakers::new("direct", quick(2));
    let attacker = Uuid::new_v4();
    fail(&b, attacker, "http://y.example", 2);
    // Before another account's failure the attacker's two were not counted; with it,
    // they count as one (plus the other account's one): still closed.
    fail(&b, Uuid::new_v4(), "http://y.example", 1);
    assert_eq!(shared_state(&b, "http://y.example"), Some(State::Closed));
}

#[test]
fn one_probe_at_a_time_then_closes_on_success() {
    let b = Breakers::new("direct", quick(1));
    let a = Uuid::new_v4();
    fail(&b, a, "http://a.example", 3);
    std::thread::sleep(Duration::from_millis(1100));
    let probe = b.acquire(a, "http://a.example").expect("half-open probe");
    assert!(
        b.acquire(a, "http://a.example").is_err(),
        "a second caller waits for the probe"
    );
    probe.record(Signal::Healthy);
    assert!(b.acquire(a, "http://a.example").is_ok(), "closed again");
    assert_eq!(shared_state(&b, "http://a.example"), Some(State::Closed));
}

#[test]
fn a_failed_probe_reopens_and_a_dropped_one_frees_the_slot() {
    let b = Breakers::new("direct", quick(1));
    let a = Uuid::new_v4();
    fail(&b, a, "http://a.example", 3);
    std::thread::sleep(Duration::from_millis(1100));
    drop(b.acquire(a, "http://a.example").expect("probe"));
    let probe = b
        .acquire(a, "http://a.example")
        .expect("slot freed by the drop");
    probe.record(FAIL);
    assert_eq!(shared_state(&b, "http://a.example"), Some(State::Open));
    assert!(b.acquire(a, "http://a.example").is_err());
}

#[test]
fn non_failures_keep_it_closed() {
    let b = Breakers::new("direct", quick(1));
    let a = Uuid::new_v4();
    for _ in 0..10 {
        fail(&b, a, "http://a.example", 1);
        b.acquire(a, "http://a.example")
            .expect("closed")
            .record(Signal::Healthy);
    }
    assert_eq!(shared_state(&b, "http://a.example"), Some(State::Closed));
}

#[test]
fn short_timeouts_and_our_refusals_say_nothing_about_the_site() {
    let b = Breakers::new("direct", BreakerSettings::default());
    let timeout = Err(FetchError::Timeout("late".into()));
    assert_eq!(
        b.signal(&timeout, Duration::from_millis(100)),
        Signal::Unknown
    );
    assert_eq!(b.signal(&timeout, Duration::from_secs(5)), FAIL);
    assert_eq!(
        b.signal(&Err(FetchError::Dns("no such host".into())), Duration::ZERO),
        Signal::SiteFailure { egress: false }
    );
    let refusal = Err(FetchError::NotAllowed(
        super::super::ssrf::check_ip("10.0.0.1".parse().expect("ip")).expect_err("private"),
    ));
    assert_eq!(b.signal(&refusal, Duration::from_secs(30)), Signal::Unknown);
    // Unknown outcomes never open anything, however many.
    let s = Breakers::new("direct", quick(1));
    for _ in 0..20 {
        s.acquire(Uuid::new_v4(), "http://a.example")
            .expect("closed")
            .record(Signal::Unknown);
    }
    assert!(s.check(Uuid::new_v4(), "http://a.example").is_ok());
    assert_eq!(
        s.tracked_origins(),
        0,
        "nothing is kept for an origin that never failed"
    );
}

fn provider_settings(min_accounts: u32) -> BreakerSettings {
    BreakerSettings {
        min_requests: 2, // the provider needs 10 within the window
        provider_min_origins: 3,
        ..quick(min_accounts)
    }
}

/// A provider breaker past its first (1 s) window: failsafe's rate policy judges only then,
/// so a closed provider below means "not counted", not "too early".
fn provider(min_accounts: u32) -> Breakers {
    let b = Breakers::new(
        "direct",
        BreakerSettings {
            window: Duration::from_secs(1),
            ..provider_settings(min_accounts)
        },
    );
    std::thread::sleep(Duration::from_millis(1100));
    b
}

/// Takes every permission first, then records the outcomes: what opens meanwhile does
/// not stop the rest from being recorded.
fn outcomes(b: &Breakers, calls: &[(Uuid, String, Signal)]) {
    let tickets: Vec<(Tickets, Signal)> = calls
        .iter()
        .map(|(a, o, s)| (b.acquire(*a, o).expect("closed"), *s))
        .collect();
    for (t, s) in tickets {
        t.record(s);
    }
}

#[test]
fn the_provider_counts_only_egress_failures_across_origins_and_accounts() {
    let port = |n: usize| format!("http://127.0.0.1:{}", 1000 + n);
    // One account's failures across many origins (dead ports): never the provider.
    let b = provider(2);
    let a = Uuid::new_v4();
    outcomes(&b, &(0..30).map(|n| (a, port(n), FAIL)).collect::<Vec<_>>());
    assert_eq!(b.provider.state(), State::Closed);
    // Many accounts failing on one origin: that origin's breaker, not the provider.
    let b = provider(2);
    let one: Vec<_> = (0..30)
        .map(|_| (Uuid::new_v4(), "http://one.example".to_owned(), FAIL))
        .collect();
    outcomes(&b, &one);
    assert_eq!(b.provider.state(), State::Closed);
    assert_eq!(shared_state(&b, "http://one.example"), Some(State::Open));
    // Failures that are not the egress path's (DNS, HTTP answers), however spread.
    let b = provider(2);
    let dns = Signal::SiteFailure { egress: false };
    outcomes(
        &b,
        &(0..30)
            .map(|n| (Uuid::new_v4(), port(n), dns))
            .collect::<Vec<_>>(),
    );
    assert_eq!(b.provider.state(), State::Closed);
    // Egress failing for many accounts and origins: the provider opens (failsafe's rate
    // policy judges only once its first window has passed).
    let b = provider(2);
    outcomes(
        &b,
        &(0..30)
            .map(|n| (Uuid::new_v4(), port(n), FAIL))
            .collect::<Vec<_>>(),
    );
    assert_eq!(b.provider.state(), State::Open);
}

fn host_series(origin: &str) -> Option<i64> {
    metrics::host_breaker_series(origin)
}

#[test]
fn an_evicted_origin_breaker_takes_its_metric_series_with_it() {
    let settings = BreakerSettings {
        idle: Duration::from_millis(300),
        ..quick(1)
    };
    let b = Breakers::new("direct", settings);
    let origin = format!("http://evicted-{}.example", Uuid::new_v4().simple());
    fail(&b, Uuid::new_v4(), &origin, 3);
    assert_eq!(host_series(&origin), Some(2), "open while it is held");
    std::thread::sleep(Duration::from_millis(600));
    b.origins.run_pending_tasks();
    assert_eq!(b.tracked_origins(), 0);
    assert_eq!(host_series(&origin), None, "forgotten with its breaker");
}
