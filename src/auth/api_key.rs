//! The API key format: `km_live_<key id>_<secret><checksum>`, 70 characters of base62.
//!
//! - key id: 12 random characters — public, the primary key of `api_keys`, safe to log;
//! - secret: 43 characters drawn uniformly from 62 (≈ 256 bits);
//! - checksum: CRC-32 (IEEE) of everything before it, base62, 6 characters.
//!
//! The checksum lets us refuse a mistyped or truncated key without touching the cache or the
//! database (so garbage costs microseconds), and lets secret scanners recognise a leaked key.
//! Only the SHA-256 of the whole key is stored: keys are 256-bit random, so a fast hash is
//! right here — a slow KDF per request would only hand attackers a CPU amplifier.

use rand::distributions::{Distribution, Uniform};
use rand::rngs::OsRng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const PREFIX: &str = "km_live_";
/// Reserved for test-mode keys; refused until test mode exists.
pub const TEST_PREFIX: &str = "km_test_";
pub const KEY_ID_LEN: usize = 12;
pub const SECRET_LEN: usize = 43;
pub const CHECKSUM_LEN: usize = 6;
pub const KEY_LEN: usize = PREFIX.len() + KEY_ID_LEN + 1 + SECRET_LEN + CHECKSUM_LEN;

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A SHA-256 digest of a whole key. `Debug` is redacted: even a digest is not for logs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyDigest(pub [u8; 32]);

impl std::fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyDigest([REDACTED])")
    }
}

impl KeyDigest {
    pub fn of(key: &str) -> KeyDigest {
        KeyDigest(Sha256::digest(key.as_bytes()).into())
    }

    /// Constant-time equality: both sides are 32 bytes, so not even the length leaks.
    pub fn matches(&self, other: &KeyDigest) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

/// A freshly generated key. The plaintext exists only here and in the one response that
/// shows it; `Debug` is redacted so it cannot slip into a log line.
pub struct NewKey {
    pub id: String,
    pub plaintext: String,
    pub digest: KeyDigest,
}

impl std::fmt::Debug for NewKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewKey")
            .field("id", &self.id)
            .field("plaintext", &"[REDACTED]")
            .finish()
    }
}

/// A key that passed the format and checksum checks. Holds the digest, not the plaintext.
#[derive(Debug, Clone)]
pub struct ParsedKey {
    pub id: String,
    pub digest: KeyDigest,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyFormatError {
    #[error("wrong length")]
    Length,
    #[error("unknown prefix")]
    Prefix,
    #[error("invalid character")]
    Character,
    #[error("checksum mismatch")]
    Checksum,
}

fn random_base62(n: usize) -> String {
    let dist = Uniform::from(0..ALPHABET.len());
    let mut rng = OsRng;
    (0..n)
        .map(|_| ALPHABET[dist.sample(&mut rng)] as char)
        .collect()
}

/// CRC-32 of `body`, in base62, most significant digit first, padded to 6 characters.
fn checksum(body: &str) -> [u8; CHECKSUM_LEN] {
    let mut n = crc32fast::hash(body.as_bytes()) as u64;
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(n % 62) as usize];
        n /= 62;
    }
    out
}

pub fn generate() -> NewKey {
    let id = random_base62(KEY_ID_LEN);
    let secret = random_base62(SECRET_LEN);
    let body = format!("{PREFIX}{id}_{secret}");
    let sum = checksum(&body);
    let mut plaintext = body;
    plaintext.push_str(std::str::from_utf8(&sum).unwrap_or("000000"));
    let digest = KeyDigest::of(&plaintext);
    NewKey {
        id,
        plaintext,
        digest,
    }
}

/// Checks the format and checksum; computes the digest. No I/O.
pub fn parse(candidate: &str) -> Result<ParsedKey, KeyFormatError> {
    let bytes = candidate.as_bytes();
    if bytes.len() != KEY_LEN {
        return Err(KeyFormatError::Length);
    }
    if !candidate.starts_with(PREFIX) {
        return Err(KeyFormatError::Prefix);
    }
    let id_start = PREFIX.len();
    let sep = id_start + KEY_ID_LEN;
    if bytes[sep] != b'_' {
        return Err(KeyFormatError::Character);
    }
    let alnum = |s: &[u8]| s.iter().all(u8::is_ascii_alphanumeric);
    if !alnum(&bytes[id_start..sep]) || !alnum(&bytes[sep + 1..]) {
        return Err(KeyFormatError::Character);
    }
    let body_end = KEY_LEN - CHECKSUM_LEN;
    let expected = checksum(&candidate[..body_end]);
    if !bool::from(expected.ct_eq(&bytes[body_end..])) {
        return Err(KeyFormatError::Checksum);
    }
    Ok(ParsedKey {
        id: candidate[id_start..sep].to_owned(),
        digest: KeyDigest::of(candidate),
    })
}

/// Is this string shaped like a key id (for routes that take one)?
pub fn is_key_id(s: &str) -> bool {
    s.len() == KEY_ID_LEN && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_have_the_documented_shape_and_parse() {
        for _ in 0..200 {
            let k = generate();
            assert_eq!(k.plaintext.len(), 70);
            assert!(k.plaintext.starts_with("km_live_"));
            assert_eq!(&k.plaintext[8..20], k.id);
            assert_eq!(k.plaintext.as_bytes()[20], b'_');
            let p = parse(&k.plaintext).expect("parses");
            assert_eq!(p.id, k.id);
            assert!(p.digest.matches(&k.digest));
        }
    }

    #[test]
    fn checksum_is_zlib_crc32_in_padded_base62() {
        // CRC-32("123456789") = 0xCBF43926 = 3421780262 = base62 "3jtJ3M" (62^5 = 916132832).
        let crc = crc32fast::hash(b"123456789");
        assert_eq!(crc, 0xCBF4_3926);
        let mut n = crc as u64;
        let mut digits = Vec::new();
        while n > 0 {
            digits.push(ALPHABET[(n % 62) as usize]);
            n /= 62;
        }
        digits.reverse();
        let expected = format!("{:0>6}", String::from_utf8(digits).unwrap());
        assert_eq!(
            std::str::from_utf8(&checksum("123456789")).unwrap(),
            expected
        );
        // A tiny CRC is left-padded with zeros.
        assert_eq!(&checksum("")[..], b"000000");
    }

    #[test]
    fn a_single_changed_character_is_caught_by_the_checksum() {
        let k = generate();
        let mut bytes = k.plaintext.clone().into_bytes();
        bytes[30] = if bytes[30] == b'a' { b'b' } else { b'a' };
        let typo = String::from_utf8(bytes).unwrap();
        assert_eq!(parse(&typo).unwrap_err(), KeyFormatError::Checksum);
    }

    #[test]
    fn malformed_keys_are_refused_by_shape() {
        let k = generate();
        assert_eq!(parse("").unwrap_err(), KeyFormatError::Length);
        assert_eq!(
            parse(&k.plaintext[..69]).unwrap_err(),
            KeyFormatError::Length
        );
        let test_mode = k.plaintext.replacen("km_live_", "km_test_", 1);
        assert_eq!(parse(&test_mode).unwrap_err(), KeyFormatError::Prefix);
        let bad_char = format!("{}!{}", &k.plaintext[..30], &k.plaintext[31..]);
        assert_eq!(parse(&bad_char).unwrap_err(), KeyFormatError::Character);
    }

    #[test]
    fn secrets_never_appear_in_debug_output() {
        let k = generate();
        let dbg = format!("{k:?} {:?}", parse(&k.plaintext).unwrap());
        assert!(!dbg.contains(&k.plaintext[21..64]), "{dbg}");
    }

    #[test]
    fn characters_are_spread_over_the_whole_alphabet() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            seen.extend(random_base62(43).bytes());
        }
        assert_eq!(seen.len(), 62);
    }
}
