//! The human docs page at `GET /docs`: a static file compiled into the binary, with no CDN
//! and no external script or font; it fetches `/openapi.json` and renders it. It is served
//! with a Content-Security-Policy that allows exactly its own inline script and style (by
//! hash) and `connect-src 'self'`, so nothing injected into it could run.

use sha2::{Digest, Sha256};

/// The page itself.
pub const DOCS_HTML: &str = include_str!("../../assets/docs.html");

/// A CSP naming the page's inline `<script>` and `<style>` blocks by their SHA-256, so
/// nothing else — injected or fetched — can run or style it.
pub fn docs_csp(html: &str) -> String {
    let hashes = |tag: &str| -> String {
        inline_blocks(html, tag)
            .map(|body| format!(" 'sha256-{}'", base64(&Sha256::digest(body.as_bytes()))))
            .collect()
    };
    format!(
        "default-src 'none'; script-src{}; style-src{}; connect-src 'self'; img-src 'self' data:; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hashes("script"),
        hashes("style"),
    )
}

/// The contents of each `<tag>…</tag>` block (the page's own, attribute-free tags).
fn inline_blocks<'a>(html: &'a str, tag: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let mut rest = html;
    std::iter::from_fn(move || {
        let start = rest.find(&open)? + open.len();
        let len = rest[start..].find(&close)?;
        let body = &rest[start..start + len];
        rest = &rest[start + len + close.len()..];
        Some(body)
    })
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_alphabet_and_padding() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn the_docs_page_is_self_contained_and_its_code_is_pinned_by_the_csp() {
        let lower = DOCS_HTML.to_ascii_lowercase();
        for banned in [
            "<script src",
            "<link",
            "@import",
            "http://",
            "https://",
            "url(",
        ] {
            assert!(!lower.contains(banned), "docs.html contains {banned:?}");
        }
        let csp = docs_csp(DOCS_HTML);
        assert_eq!(inline_blocks(DOCS_HTML, "script").count(), 1);
        assert!(csp.contains("script-src 'sha256-"), "{csp}");
        assert!(csp.contains("style-src 'sha256-"), "{csp}");
        assert!(!csp.contains("unsafe-inline"));
    }
}
