//! Stripe webhook signatures: `Stripe-Signature: t=<unix>,v1=<hex>,v1=<hex>,…` where each
//! `v1` is HMAC-SHA256 of `"{t}.{raw body}"` under an endpoint secret.
//!
//! Written here rather than taken from async-stripe because its `construct_event` keeps only
//! the last `v1` and fixes the tolerance; Stripe sends several signatures while a secret
//! rolls, and its own SDKs accept a match on any of them — so do we, against any of the
//! configured secrets. Comparisons are of fixed 32-byte MACs in constant time. Every failure
//! is the same opaque error: nothing in the answer helps a forger.

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use subtle::ConstantTimeEq;

pub const TOLERANCE_SECS: i64 = 300;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing or malformed signature header")]
    Malformed,
    #[error("timestamp outside the tolerance")]
    Stale,
    #[error("no signature matches")]
    Mismatch,
}

fn mac(secret: &str, t: &str, body: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail; fall back to zeros (which can
    // never match a real signature) rather than panic.
    let Ok(mut m) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return [0u8; 32];
    };
    m.update(t.as_bytes());
    m.update(b".");
    m.update(body);
    m.finalize().into_bytes().into()
}

/// Verifies `header` for `body` against any of `secrets` at time `now` (unix seconds).
/// Returns the signed timestamp.
pub fn verify(
    header: &str,
    body: &[u8],
    secrets: &[SecretString],
    now: i64,
) -> Result<i64, SignatureError> {
    let mut t: Option<&str> = None;
    let mut candidates: Vec<[u8; 32]> = Vec::new();
    for part in header.split(',') {
        let Some((k, v)) = part.trim().split_once('=') else {
            continue;
        };
        match k {
            "t" => t = Some(v),
            "v1" => {
                let mut buf = [0u8; 32];
                if hex::decode_to_slice(v, &mut buf).is_ok() {
                    candidates.push(buf);
                }
            }
            _ => {}
        }
    }
    let t = t.ok_or(SignatureError::Malformed)?;
    let ts: i64 = t.parse().map_err(|_| SignatureError::Malformed)?;
    if candidates.is_empty() || secrets.is_empty() {
        return Err(SignatureError::Malformed);
    }
    // `abs_diff` cannot overflow: `t` is the sender's, so `now - ts` could (t=i64::MIN), and
    // an overflow panics in a debug build and wraps into "fresh" in a release one.
    if now.abs_diff(ts) > TOLERANCE_SECS.unsigned_abs() {
        return Err(SignatureError::Stale);
    }
    let mut ok = subtle::Choice::from(0u8);
    for secret in secrets {
        let expected = mac(secret.expose_secret(), t, body);
        for c in &candidates {
            ok |= expected.ct_eq(c);
        }
    }
    if bool::from(ok) {
        Ok(ts)
    } else {
        Err(SignatureError::Mismatch)
    }
}

/// Builds a header the way Stripe does (used by `keymeter`'s own tooling, e.g. load tests).
pub fn sign(secret: &str, t: i64, body: &[u8]) -> String {
    format!(
        "t={t},v1={}",
        hex::encode(mac(secret, &t.to_string(), body))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets(s: &[&str]) -> Vec<SecretString> {
        s.iter()
            .map(|x| SecretString::from((*x).to_owned()))
            .collect()
    }

    #[test]
    fn a_match_on_any_v1_under_any_secret_passes() {
        let body = br#"{"id":"evt_1"}"#;
        let good = sign("whsec_new", 1000, body);
        let v1 = good.split("v1=").nth(1).unwrap();
        let header = format!("t=1000,v1={},v1={v1}", "ab".repeat(32));
        assert_eq!(
            verify(&header, body, &secrets(&["whsec_old", "whsec_new"]), 1000),
            Ok(1000)
        );
        // Order does not matter either.
        let header = format!("t=1000,v1={v1},v1={}", "ab".repeat(32));
        assert_eq!(
            verify(&header, body, &secrets(&["whsec_new"]), 1100),
            Ok(1000)
        );
    }

    #[test]
    fn forged_stale_and_malformed_headers_fail() {
        let body = br#"{"id":"evt_1"}"#;
        let s = secrets(&["whsec_a"]);
        assert_eq!(
            verify(&sign("whsec_b", 1000, body), body, &s, 1000),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(&sign("whsec_a", 1000, body), b"{}", &s, 1000),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(&sign("whsec_a", 1000, body), body, &s, 1301),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            verify(&sign("whsec_a", 1000, body), body, &s, 699),
            Err(SignatureError::Stale)
        );
        assert_eq!(verify("", body, &s, 1000), Err(SignatureError::Malformed));
        assert_eq!(
            verify("t=abc,v1=00", body, &s, 1000),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            verify("v1=00", body, &s, 1000),
            Err(SignatureError::Malformed)
        );
    }

    #[test]
    fn extreme_timestamps_are_stale_not_an_overflow() {
        let body = br#"{"id":"evt_1"}"#;
        let s = secrets(&["whsec_a"]);
        for t in [i64::MIN, i64::MIN + 1, i64::MAX] {
            let header = sign("whsec_a", t, body);
            for now in [0, 1_700_000_000, -1_700_000_000] {
                assert_eq!(
                    verify(&header, body, &s, now),
                    Err(SignatureError::Stale),
                    "t={t} now={now}"
                );
            }
            assert_eq!(verify(&header, body, &s, t), Ok(t), "t={t} at its own time");
        }
    }
}
