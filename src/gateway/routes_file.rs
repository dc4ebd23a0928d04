//! `KEYMETER_GATEWAY_ROUTES`: the priced routes of the API keymeter sits in front of, and how a
//! proxied request finds its route.
//!
//! Parsed once at start-up, refusing the whole file on the first bad entry with its line, so a
//! typo never turns into a route that is silently free or silently refused.
//!
//! Matching: an exact path beats a prefix, a longer prefix beats a shorter one, and at the same
//! path a named method beats `*`. The path matched is the request's path *normalized* first
//! (query dropped, `%XX` of unreserved characters decoded, `.`/`..` segments resolved, `//`
//! collapsed): the upstream resolves `/v1/search/../admin` to `/admin`, so keymeter must price
//! it as `/admin` — matching the raw text would let a client buy an expensive route at a cheap
//! route's price.

use actix_web::http::header::HeaderValue;
use serde::Deserialize;
use toml::Spanned;

use crate::auth::Scope;

/// Credits one call may cost at most (as a metered charge).
pub const MAX_COST: i64 = 1_000_000;

/// One priced route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayRoute {
    /// Upper-case method, or `None` for `*`.
    pub method: Option<String>,
    pub path: PathPattern,
    pub cost: i64,
    pub scope: Scope,
    /// `METHOD path` as written in the file: what ledger rows and headers name the route by.
    pub label: String,
    /// `label` as the `X-Keymeter-Route` value, built once here rather than on every allowed
    /// request. A label is always a valid header value: the method is letters or `*`, and the
    /// path passed [`normalize`], which admits printable ASCII only.
    pub label_header: HeaderValue,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    Exact(String),
    /// The part before the `*` of `/prefix/*`, slash included (`/` for `/*`).
    Prefix(String),
}

impl PathPattern {
    fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Exact(p) => p == path,
            // `/v1/search/*` covers `/v1/search` itself too: a client adding or dropping the
            // trailing slash must not fall out of the route.
            PathPattern::Prefix(p) => {
                path.starts_with(p.as_str()) || path == p.trim_end_matches('/')
            }
        }
    }

    /// Higher wins: every exact path beats every prefix; longer prefixes beat shorter.
    fn specificity(&self) -> usize {
        match self {
            PathPattern::Exact(_) => usize::MAX,
            PathPattern::Prefix(p) => p.len(),
        }
    }
}

/// Every priced route, in the order matching prefers them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteTable {
    routes: Vec<GatewayRoute>,
}

/// A bad routes file: the line (1-based, when known) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{reason}", line.map(|l| format!("line {l}: ")).unwrap_or_default())]
pub struct FileError {
    pub line: Option<usize>,
    pub reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    routes: Vec<Spanned<RawRoute>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    method: Spanned<String>,
    path: Spanned<String>,
    cost: Spanned<i64>,
    scope: Spanned<String>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

impl RouteTable {
    /// Parses the file's text; the first bad entry is the error.
    pub fn parse(text: &str) -> Result<RouteTable, FileError> {
        let file: File = toml::from_str(text).map_err(|e| FileError {
            line: e.span().map(|s| line_of(text, s.start)),
            reason: e.message().trim().to_owned(),
        })?;
        let mut routes: Vec<GatewayRoute> = Vec::with_capacity(file.routes.len());
        for entry in file.routes {
            let raw = entry.into_inner();
            let bad = |span: std::ops::Range<usize>, reason: String| FileError {
                line: Some(line_of(text, span.start)),
                reason,
            };
            let method = raw.method.get_ref().trim();
            let method = if method == "*" {
                None
            } else if !method.is_empty() && method.bytes().all(|b| b.is_ascii_alphabetic()) {
                Some(method.to_ascii_uppercase())
            } else {
                return Err(bad(
                    raw.method.span(),
                    format!("method {method:?} is not an HTTP method or \"*\""),
                ));
            };
            let path = parse_pattern(raw.path.get_ref()).map_err(|r| bad(raw.path.span(), r))?;
            let cost = *raw.cost.get_ref();
            if !(0..=MAX_COST).contains(&cost) {
                return Err(bad(
                    raw.cost.span(),
                    format!("cost {cost} is not between 0 and {MAX_COST}"),
                ));
            }
            let scope = Scope::parse(raw.scope.get_ref().trim()).ok_or_else(|| {
                bad(
                    raw.scope.span(),
                    format!(
                        "scope {:?} is not one of {}",
                        raw.scope.get_ref(),
                        Scope::ALL.map(Scope::as_str).join(", ")
                    ),
                )
            })?;
            let label = format!(
                "{} {}",
                method.as_deref().unwrap_or("*"),
                raw.path.get_ref().trim()
            );
            if routes.iter().any(|r| r.method == method && r.path == path) {
                return Err(bad(
                    raw.method.span(),
                    format!("route {label} is listed twice"),
                ));
            }
            let label_header = HeaderValue::from_str(&label).map_err(|_| {
                bad(
                    raw.path.span(),
                    format!("route {label} is not printable ASCII"),
                )
            })?;
            routes.push(GatewayRoute {
                method,
                path,
                cost,
                scope,
                label,
                label_header,
            });
        }
        // Most specific first, so the first match is the one that wins.
        routes.sort_by_key(|r| (std::cmp::Reverse(r.path.specificity()), r.method.is_none()));
        Ok(RouteTable { routes })
    }

    /// Reads and parses the file at `path`.
    pub fn load(path: &str) -> Result<RouteTable, FileError> {
        let text = std::fs::read_to_string(path).map_err(|e| FileError {
            line: None,
            reason: format!("cannot read {path}: {e}"),
        })?;
        Self::parse(&text)
    }

    /// The route a request for `method` `path` (already [`normalize`]d) is priced by.
    pub fn find(&self, method: &str, path: &str) -> Option<&GatewayRoute> {
        self.routes.iter().find(|r| {
            r.method
                .as_deref()
                .is_none_or(|m| m.eq_ignore_ascii_case(method))
                && r.path.matches(path)
        })
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }
}

fn parse_pattern(raw: &str) -> Result<PathPattern, String> {
    let p = raw.trim();
    if !p.starts_with('/') {
        return Err(format!("path {p:?} must start with /"));
    }
    if p.contains(['?', '#', ' ']) {
        return Err(format!(
            "path {p:?} may not hold a query, a fragment or spaces"
        ));
    }
    let (body, prefix) = match p.strip_suffix('*') {
        Some(head) if head.ends_with('/') => (head, true),
        Some(_) => return Err(format!("path {p:?}: `*` may only end a path, after a /")),
        None => (p, false),
    };
    if body.contains('*') {
        return Err(format!("path {p:?}: `*` may only end a path, after a /"));
    }
    if normalize(body).as_deref() != Some(body) {
        return Err(format!(
            "path {p:?} is not in normal form (no `.` or `..` segments, no `//`, no %-escapes \
             of letters, digits or -._~)"
        ));
    }
    Ok(if prefix {
        PathPattern::Prefix(body.to_owned())
    } else {
        PathPattern::Exact(body.to_owned())
    })
}

/// The path of a request target (`/a/b?q`), as the upstream will resolve it; `None` when it is
/// not an origin-form path at all. See the module comment for why.
pub fn normalize(target: &str) -> Option<String> {
    let path = target.split(['?', '#']).next().unwrap_or("");
    if !path.starts_with('/') {
        return None;
    }
    if is_normal(path) {
        // The common case (every free-route authorization): one copy, no rewrite.
        return Some(path.to_owned());
    }
    normalize_slow(path)
}

/// Whether [`normalize_slow`] would return `path` unchanged: printable ASCII without a `%`
/// escape, an empty segment (`//`) or a dot segment. `path` starts with `/`. The unit test
/// `the_fast_path_agrees_with_the_full_normalization` holds the two to each other.
///
/// One pass over the bytes, segment by segment: a segment (the text after a `/`) may not be
/// `.` or `..`, nor empty unless it is the last (a trailing slash). Five substring searches
/// would say the same at several times the cost, on every authorization.
fn is_normal(path: &str) -> bool {
    let b = path.as_bytes();
    if b.first().is_none_or(|&c| c != b'/') {
        return false;
    }
    let mut start = 1;
    for i in 1..=b.len() {
        match b.get(i) {
            None | Some(b'/') => {
                let seg = &b[start..i];
                if (seg.is_empty() && i < b.len()) || seg == b"." || seg == b".." {
                    return false;
                }
                start = i + 1;
            }
            Some(&c) if !(0x20..0x7f).contains(&c) || c == b'%' => return false,
            Some(_) => {}
        }
    }
    true
}

/// The full normalization of an origin-form path (starting with `/`, query removed).
fn normalize_slow(path: &str) -> Option<String> {
    let decoded = decode_unreserved(path)?;
    let ends_with_slash =
        decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut joined = String::with_capacity(decoded.len());
    for seg in &out {
        joined.push('/');
        joined.push_str(seg);
    }
    if joined.is_empty() || (ends_with_slash && !joined.ends_with('/')) {
        joined.push('/');
    }
    Some(joined)
}

/// Decodes `%XX` escapes of unreserved characters (RFC 3986 §2.3, equivalent to the character
/// itself); other escapes stay as they are, upper-cased. A broken escape is `None`.
fn decode_unreserved(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let s = std::str::from_utf8(hex).ok()?;
            let v = u8::from_str_radix(s, 16).ok()?;
            if v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~') {
                out.push(v as char);
            } else {
                out.push('%');
                out.push_str(&s.to_ascii_uppercase());
            }
            i += 3;
        } else if b.is_ascii() && !b.is_ascii_control() {
            out.push(b as char);
            i += 1;
        } else {
            return None;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[[routes]]
method = "GET"
path = "/v1/search/*"
cost = 2
scope = "read"

[[routes]]
method = "*"
path = "/v1/search/free"
cost = 0
scope = "read"

[[routes]]
method = "POST"
path = "/v1/*"
cost = 5
scope = "scrape"

[[routes]]
method = "*"
path = "/v1/*"
cost = 1
scope = "read"
"#;

    #[test]
    fn the_most_specific_route_wins() {
        let t = RouteTable::parse(FILE).unwrap();
        let cost = |m: &str, p: &str| t.find(m, &normalize(p).unwrap()).map(|r| r.cost);
        assert_eq!(cost("GET", "/v1/search/abc?q=1"), Some(2));
        assert_eq!(cost("get", "/v1/search"), Some(2));
        assert_eq!(cost("GET", "/v1/search/free"), Some(0));
        assert_eq!(cost("POST", "/v1/search/free"), Some(0));
        assert_eq!(cost("POST", "/v1/other"), Some(5));
        assert_eq!(cost("DELETE", "/v1/other"), Some(1));
        assert_eq!(cost("GET", "/admin"), None);
    }

    #[test]
    fn paths_are_priced_as_the_upstream_resolves_them() {
        let t = RouteTable::parse(FILE).unwrap();
        let route = |p: &str| {
            t.find("GET", &normalize(p).unwrap())
                .map(|r| r.label.clone())
        };
        // Dot segments and encoded dots cannot walk from a cheap prefix to another route.
        assert_eq!(route("/v1/search/../../admin"), None);
        assert_eq!(route("/v1/search/%2e%2e/%2E%2E/admin"), None);
        assert_eq!(
            route("/v1/search/..%2Fx").as_deref(),
            Some("GET /v1/search/*")
        );
        assert_eq!(
            route("//v1//search//x").as_deref(),
            Some("GET /v1/search/*")
        );
        assert_eq!(route("/v1/%73earch/x").as_deref(), Some("GET /v1/search/*"));
        assert_eq!(normalize("/a/b/../c/./d/").as_deref(), Some("/a/c/d/"));
        assert_eq!(normalize("/..").as_deref(), Some("/"));
        assert_eq!(normalize("nope"), None);
        assert_eq!(normalize("/bad%zz"), None);
    }

    #[test]
    fn the_fast_path_agrees_with_the_full_normalization() {
        let parts = [
            "", "/", "a", ".", "..", "%2e", "%2F", "%41", "b c", "~", "\u{e9}", "\t", "?q", "#f",
        ];
        let mut checked = 0;
        for a in parts {
            for b in parts {
                for c in parts {
                    for sep in ["/", "//"] {
                        let target = format!("/{a}{sep}{b}/{c}");
                        let path = target.split(['?', '#']).next().unwrap();
                        assert_eq!(normalize(&target), normalize_slow(path), "{target:?}");
                        if is_normal(path) {
                            assert_eq!(normalize_slow(path).as_deref(), Some(path), "{path:?}");
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert!(checked > 100, "the fast path was taken {checked} times");
    }

    #[test]
    fn a_catch_all_route_meters_every_unlisted_path() {
        let t = RouteTable::parse(
            "[[routes]]\nmethod = \"*\"\npath = \"/*\"\ncost = 1\nscope = \"read\"\n",
        )
        .unwrap();
        assert_eq!(t.find("PATCH", "/anything/at/all").map(|r| r.cost), Some(1));
        assert_eq!(t.find("GET", "/").map(|r| r.cost), Some(1));
        assert!(RouteTable::parse("").unwrap().find("GET", "/").is_none());
    }

    #[test]
    fn a_bad_file_names_the_line_and_the_reason() {
        let cases = [
            ("[[routes]]\nmethod = \"GET\"\npath = \"v1\"\ncost = 1\nscope = \"read\"\n", 3, "must start with /"),
            ("[[routes]]\nmethod = \"GET\"\npath = \"/v1\"\ncost = -1\nscope = \"read\"\n", 4, "between 0"),
            ("[[routes]]\nmethod = \"GET\"\npath = \"/v1\"\ncost = 1\nscope = \"root\"\n", 5, "not one of"),
            ("[[routes]]\nmethod = \"G T\"\npath = \"/v1\"\ncost = 1\nscope = \"read\"\n", 2, "not an HTTP method"),
            ("[[routes]]\nmethod = \"GET\"\npath = \"/v1/*/x\"\ncost = 1\nscope = \"read\"\n", 3, "may only end"),
            ("[[routes]]\nmethod = \"GET\"\npath = \"/v1/../x\"\ncost = 1\nscope = \"read\"\n", 3, "normal form"),
            ("[[routes]]\nmethod = \"GET\"\npath = \"/v1\"\ncost = 1\n", 1, "scope"),
            ("[[routes]]\nmethod = \"GET\"\npath = \"/v1\"\ncost = 1\nscope = \"read\"\nprice = 3\n", 6, "price"),
            ("[[routes]]\nmethod = \"GET\"\npath = \"/v1\"\ncost = \"2\"\nscope = \"read\"\n", 4, "invalid type"),
            ("[[routes]]\nmethod = \"GET\"\npath = \"/a\"\ncost = 1\nscope = \"read\"\n\n[[routes]]\nmethod = \"get\"\npath = \"/a\"\ncost = 1\nscope = \"read\"\n", 8, "twice"),
            ("[[routes]\n", 1, ""),
        ];
        for (text, line, reason) in cases {
            let e = RouteTable::parse(text).unwrap_err();
            assert_eq!(e.line, Some(line), "{text}: {e}");
            assert!(e.reason.contains(reason), "{text}: {e}");
            assert!(e.to_string().starts_with(&format!("line {line}: ")), "{e}");
        }
    }
}
