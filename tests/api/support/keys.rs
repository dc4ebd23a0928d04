//! API keys forged by the key format's own rules (`km_live_`, a 12-character id, `_`, a
//! 43-character secret, a 6-character base-62 CRC-32 checksum), computed here rather than by
//! the server, so a test can build a key that passes the format check and must be refused
//! further in.

const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// `km_live_{id}_{secret}` with a correct checksum.
pub fn forge_key(id: &str, secret: &str) -> String {
    let body = format!("km_live_{id}_{secret}");
    let mut n = crc32fast::hash(body.as_bytes()) as u64;
    let mut sum = [b'0'; 6];
    for slot in sum.iter_mut().rev() {
        *slot = ALPHABET[(n % 62) as usize];
        n /= 62;
    }
    format!("{body}{}", std::str::from_utf8(&sum).unwrap())
}
