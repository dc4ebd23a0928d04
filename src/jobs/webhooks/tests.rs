use super::*;

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
