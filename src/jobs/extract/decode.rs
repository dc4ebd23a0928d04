//! From bytes to text: what kind of content a page is (its `Content-Type`, else a sniff for
//! HTML), and its charset (the `Content-Type` parameter, else a byte-order mark, else
//! `<meta charset>` in the first 1024 bytes, else UTF-8).

use encoding_rs::{Encoding, UTF_16BE, UTF_16LE, UTF_8};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ContentKind {
    Html,
    Text,
    Other,
}

impl ContentKind {
    pub(super) fn of(content_type: Option<&str>, body: &[u8]) -> Self {
        let essence = content_type
            .and_then(|ct| ct.split(';').next())
            .map(|m| m.trim().to_ascii_lowercase())
            .unwrap_or_default();
        match essence.as_str() {
            "text/html" | "application/xhtml+xml" => ContentKind::Html,
            m if m.starts_with("text/") => ContentKind::Text,
            // No type given: sniff, as browsers do, for the one case that matters here.
            "" if looks_like_html(body) => ContentKind::Html,
            _ => ContentKind::Other,
        }
    }
}

fn looks_like_html(body: &[u8]) -> bool {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let start = body
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(body.len());
    let head: Vec<u8> = body[start..]
        .iter()
        .take(14)
        .map(u8::to_ascii_lowercase)
        .collect();
    head.starts_with(b"<!doctype html") || head.starts_with(b"<html")
}

/// Decodes the body by its declared charset; a byte-order mark wins, as in browsers.
pub(super) fn decode(content_type: Option<&str>, body: &[u8], sniff_meta: bool) -> String {
    let declared = content_type
        .and_then(charset_param)
        .and_then(|l| Encoding::for_label(l.as_bytes()));
    let encoding = declared
        .or_else(|| {
            sniff_meta
                .then(|| meta_charset(&body[..body.len().min(1024)]))
                .flatten()
                .and_then(|l| Encoding::for_label(l.as_bytes()))
                // A page that could declare UTF-16 in ASCII is not UTF-16 (HTML spec).
                .map(|e| {
                    if e == UTF_16LE || e == UTF_16BE {
                        UTF_8
                    } else {
                        e
                    }
                })
        })
        .unwrap_or(UTF_8);
    let (text, _, _) = encoding.decode(body);
    text.into_owned()
}

fn charset_param(content_type: &str) -> Option<String> {
    content_type.split(';').skip(1).find_map(|param| {
        let (k, v) = param.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("charset")
            .then(|| v.trim().trim_matches(['"', '\'']).to_owned())
    })
}

/// `<meta charset=…>` or `<meta http-equiv=… content="…; charset=…">` in the prefix.
fn meta_charset(prefix: &[u8]) -> Option<String> {
    let lower = String::from_utf8_lossy(prefix).to_ascii_lowercase();
    let mut rest = lower.as_str();
    while let Some(at) = rest.find("<meta") {
        let tag = &rest[at..];
        let tag = &tag[..tag.find('>').unwrap_or(tag.len())];
        if let Some(pos) = tag.find("charset") {
            let value = tag[pos + "charset".len()..]
                .trim_start()
                .strip_prefix('=')
                .map(|v| v.trim_start().trim_start_matches(['"', '\'']));
            if let Some(v) = value {
                let label: String = v
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || "-_:.".contains(*c))
                    .collect();
                if !label.is_empty() {
                    return Some(label);
                }
            }
        }
        rest = &rest[at + 5..];
    }
    None
}
