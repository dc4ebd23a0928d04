use super::*;

fn delivery(account_id: Uuid, origin: &str) -> Delivery {
    Delivery {
        job_id: Uuid::now_v7(),
        account_id,
        url: format!("{origin}/hook"),
        origin: origin.to_owned(),
        event_id: Uuid::now_v7(),
        payload: serde_json::Value::Null,
        attempt: 1,
        secret_version: 1,
    }
}

#[test]
fn accounts_and_origins_are_busy_at_their_limits_and_free_again_when_a_slot_ends() {
    let in_flight = Arc::new(InFlight::default());
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let first = in_flight.take(&delivery(a, "http://slow.example"));
    let _second = in_flight.take(&delivery(a, "http://slow.example"));
    let other = in_flight.take(&delivery(b, "https://fast.example"));
    assert_eq!(in_flight.total(), 3);
    let (accounts, origins) = in_flight.busy(2, 2);
    assert_eq!(accounts, vec![a]);
    assert_eq!(origins, vec!["http://slow.example".to_owned()]);
    drop(first);
    assert_eq!(in_flight.total(), 2);
    assert_eq!(in_flight.busy(2, 2), (vec![], vec![]));
    // Only what is in flight is remembered: the maps shrink back with it.
    drop(other);
    assert!(!in_flight.lock().accounts.contains_key(&b));
    assert!(!in_flight
        .lock()
        .origins
        .contains_key("https://fast.example"));
}

#[test]
fn secrets_differ_per_account_and_version_and_are_stable() {
    let key = SecretString::from("k".repeat(32));
    let a = Uuid::now_v7();
    let b = Uuid::now_v7();
    assert_eq!(secret_for(&key, a, 1), secret_for(&key, a, 1));
    assert_ne!(secret_for(&key, a, 1), secret_for(&key, b, 1));
    assert_ne!(secret_for(&key, a, 1), secret_for(&key, a, 2));
    assert!(secret_for(&key, a, 1).starts_with("whsec_"));
}

#[test]
fn long_keys_are_hashed_as_hmac_requires() {
    let long = "x".repeat(100);
    let mut ours = hmac_sha256(long.as_bytes());
    ours.update(b"m");
    let mut reference = <Hmac<Sha256> as Mac>::new_from_slice(long.as_bytes()).expect("any length");
    reference.update(b"m");
    assert_eq!(
        ours.finalize().into_bytes(),
        reference.finalize().into_bytes()
    );
}

#[test]
fn signature_matches_an_independent_hmac() {
    // echo -n '1700000000.{"a":1}' | openssl dgst -sha256 -hmac whsec_test
    let h = signature_header("whsec_test", 1_700_000_000, br#"{"a":1}"#);
    assert_eq!(
        h,
        "t=1700000000,v1=38877139021993b830af32feea6e18a8da83eb2f6e49ee50bd9e4cf4ca4d3789"
    );
}
