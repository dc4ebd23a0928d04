//! The OpenAPI 3.1 document at `GET /openapi.json`, and the human docs page at `GET /docs`.
//!
//! The document is generated from the code in two steps:
//!
//! 1. utoipa derives the operations from the `#[utoipa::path]` annotations on the handlers in
//!    `routes/`, and the schemas from `ToSchema`/`IntoParams` on the very types the handlers
//!    deserialize and serialize (so `deny_unknown_fields`, defaults and renames are the real
//!    ones);
//! 2. [`decorate`] adds what every operation shares and utoipa cannot say once: the security
//!    schemes, the problem+json body of every 4xx/5xx, the responses the gates and the edge
//!    add (401/403/429 by the kind of authentication, 500/503/504 everywhere), and the
//!    headers (`X-Request-Id` on every response, the rate-limit headers where a limit
//!    applies, `Retry-After`, `WWW-Authenticate`, `Idempotent-Replayed`).
//!
//! Convention the second step relies on: the description of an error response in a
//! `#[utoipa::path]` names its problem `type`s in backticks (`` `not_found`: … ``). Those
//! names narrow that response's `type` to an `enum`, so a client (or a fuzzer) can check a
//! `404` really is one of the documented problems. A unit test fails when an error response
//! names none, or names a type that is not a [`ProblemType`].
//!
//! The docs page is a static file compiled into the binary: no CDN, no external script or
//! font; it fetches `/openapi.json` and renders it. It is served with a Content-Security-Policy
//! that allows exactly its own inline script and style (by hash) and `connect-src 'self'`.

use std::collections::BTreeSet;
use std::sync::OnceLock;

use actix_web::http::header::{self, HeaderValue};
use actix_web::HttpResponse;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use utoipa::OpenApi;

use crate::http::problem::{ApiError, ApiResult, ProblemType};
use crate::routes::{accounts, admin, billing, credits, health, jobs, keys};

/// The description of the `Idempotency-Key` request header (used by the annotations).
pub const IDEMPOTENCY_KEY: &str = "1 to 255 printable ASCII characters, no spaces. The same key \
    and body within 24 h replays the stored response (`Idempotent-Replayed: true`) and charges \
    nothing; the same key with another body is `422 idempotency_key_reused`; a duplicate while \
    the first is running is `409 idempotency_conflict`. Only successful outcomes are stored. A \
    claim left by a request that died is taken over by a retry once it is older than the \
    server's request timeout plus a fifth; an attempt that outlives its claim is undone.";

const DESCRIPTION: &str = "\
A credit-metered API: every call is authenticated with an API key, rate-limited by the \
account's tier, and paid work is charged from a prepaid credit balance.

**Keys** look like `km_live_<12-char id>_<43-char secret><6-char checksum>` (70 characters of \
`0-9A-Za-z` after the prefix) and go in `Authorization: Bearer <key>` or `X-API-Key: <key>`. \
Each operation names the scope it needs (`scrape`, `read`, `keys:manage`, `billing`) in its \
security requirement. `/admin/*` takes the operator's token (`KEYMETER_ADMIN_TOKEN`) instead.

**Errors** are RFC 9457 `application/problem+json` with a stable `type` slug, `title`, \
`status`, `detail` and `request_id` (see the `Problem` and `ProblemType` schemas). Client code \
should match on `type`, never on `detail`.

**Rate limits.** The tier's limit counts per account, across all its keys; a key may carry a \
lower `rate_limit` of its own. Responses carry `RateLimit-Policy`, `RateLimit` (IETF httpapi \
draft) and `X-RateLimit-Limit/Remaining/Reset` for whichever limit binds (the policy is the \
tier's name, or `key`); a refusal is `429 rate_limited` with `Retry-After`.

**Idempotency.** Operations that charge or create money-moving state accept \
`Idempotency-Key`.

**Pagination.** Lists are newest first: `?limit=1..100&cursor=…` → \
`{data, has_more, next_cursor}`.

Every response carries `X-Request-Id` (the caller's, when it is 1–64 characters of \
`[A-Za-z0-9._-]`, else a fresh one).";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "keymeter API",
        description = DESCRIPTION,
        license(name = "MIT", identifier = "MIT"),
    ),
    paths(
        health::live,
        health::ready,
        openapi_json,
        docs_page,
        accounts::signup,
        accounts::login,
        accounts::get_account,
        keys::list,
        keys::create,
        keys::get,
        keys::revoke,
        keys::rotate,
        credits::summary,
        credits::ledger_page,
        credits::usage,
        credits::charge,
        billing::summary,
        billing::checkout,
        billing::webhook,
        jobs::scrape,
        jobs::create_job,
        jobs::list,
        jobs::get,
        jobs::cancel,
        admin::create_account,
        admin::get_account,
        admin::create_key,
        admin::set_tier,
        admin::set_tier_post,
        admin::suspend,
        admin::unsuspend,
        admin::grant_credits,
        admin::revoke_key,
        admin::audit_trail,
        jobs::breakers,
    ),
    tags(
        (name = "health", description = "Liveness and readiness, for load balancers. No key."),
        (name = "accounts", description = "Signup, login and the account a key belongs to."),
        (name = "keys", description = "An account's API keys: create, list, revoke, rotate."),
        (name = "credits", description = "The balance, the ledger, usage, and metered charges."),
        (name = "billing", description = "Buying credits and plans through Stripe, and Stripe's webhook."),
        (name = "jobs", description = "Scrape jobs: run one and wait for its result, or queue \
            it and follow it by id or webhook. The cost is reserved when the job is queued and \
            refunded unless the site gave a usable answer."),
        (name = "admin", description = "The operator's API, behind `KEYMETER_ADMIN_TOKEN`. \
            It does not exist (404) while no token is configured."),
        (name = "meta", description = "This document and its human-readable page."),
    ),
)]
struct ApiDoc;

/// `GET /openapi.json`: the document, built once per process.
#[utoipa::path(
    get,
    path = "/openapi.json",
    operation_id = "openapi_document",
    tag = "meta",
    summary = "This OpenAPI document",
    responses((status = 200, description = "The OpenAPI 3.1 document.", body = Object, content_type = "application/json")),
)]
pub async fn openapi_json() -> ApiResult<HttpResponse> {
    static RENDERED: OnceLock<Result<String, String>> = OnceLock::new();
    let rendered = RENDERED.get_or_init(|| {
        serde_json::to_string(&document()).map_err(|e| format!("rendering the document: {e}"))
    });
    match rendered {
        Ok(body) => Ok(HttpResponse::Ok()
            .content_type("application/json")
            .insert_header((header::CACHE_CONTROL, "no-cache"))
            .body(body.clone())),
        Err(e) => Err(ApiError::Internal(anyhow::anyhow!("{e}"))),
    }
}

const DOCS_HTML: &str = include_str!("../assets/docs.html");

/// `GET /docs`: the static docs page, with a CSP that admits only its own inline code.
#[utoipa::path(
    get,
    path = "/docs",
    operation_id = "docs_page",
    tag = "meta",
    summary = "The API reference, for people",
    description = "A static page compiled into the binary that renders `/openapi.json`: \
        operations, parameters, schemas and problem types. No external resources.",
    responses((status = 200, description = "An HTML page.", body = String, content_type = "text/html")),
)]
pub async fn docs_page() -> HttpResponse {
    static CSP: OnceLock<String> = OnceLock::new();
    let csp = CSP.get_or_init(|| docs_csp(DOCS_HTML));
    let mut res = HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(DOCS_HTML);
    if let Ok(v) = HeaderValue::from_str(csp) {
        res.headers_mut().insert(header::CONTENT_SECURITY_POLICY, v);
    }
    res
}

/// A CSP naming the page's inline `<script>` and `<style>` blocks by their SHA-256, so
/// nothing else — injected or fetched — can run or style it.
fn docs_csp(html: &str) -> String {
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

/// The whole document, as JSON.
pub fn document() -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_else(|e| {
        tracing::error!(error = %e, "the OpenAPI document did not serialize");
        json!({})
    });
    decorate(&mut doc);
    doc
}

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// How an operation authenticates, read from its security requirement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Auth {
    /// An API key, through the keyed gate (tier limit per key).
    Key,
    /// The operator's admin token.
    Admin,
    /// None; `ip_limited` when the per-IP gate is in front (`x-rate-limit: ip`).
    Public { ip_limited: bool },
}

fn auth_of(op: &Value) -> Auth {
    let names: BTreeSet<&str> = op["security"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_object)
        .flat_map(|o| o.keys().map(String::as_str))
        .collect();
    if names.contains("ApiKey") {
        Auth::Key
    } else if names.contains("AdminToken") {
        Auth::Admin
    } else {
        Auth::Public {
            ip_limited: op["x-rate-limit"] == "ip",
        }
    }
}

/// The problem types an error response's description names in backticks.
pub fn named_problem_types(description: &str) -> Vec<&str> {
    description
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| ProblemType::from_slug(w).is_some())
        .collect()
}

fn header_ref(name: &str) -> Value {
    json!({ "$ref": format!("#/components/headers/{name}") })
}

/// Adds the shared parts to the utoipa output; see the module comment.
pub fn decorate(doc: &mut Value) {
    doc["components"]["securitySchemes"] = security_schemes();
    doc["components"]["headers"] = headers();
    doc["components"]["parameters"] = parameters();
    doc["components"]["schemas"]["Problem"] = problem_schema();
    doc["components"]["schemas"]["ProblemType"] = problem_type_schema();

    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for item in paths.values_mut() {
        for method in METHODS {
            if let Some(op) = item.get_mut(method) {
                decorate_operation(op);
            }
        }
    }
}

fn decorate_operation(op: &mut Value) {
    let auth = auth_of(op);
    let op_id = op["operationId"].as_str().unwrap_or_default().to_owned();
    // utoipa spells an optional body (`Option<T>`) as "T or null"; the server reads an
    // optional body as absent or T, and JSON `null` is not T.
    // (`get_mut`, not indexing: indexing a missing member mutably would insert a null.)
    let body = op.get_mut("requestBody");
    if let Some(body) = body.filter(|b| b["required"] != json!(true)) {
        if let Some(content) = body.get_mut("content").and_then(Value::as_object_mut) {
            for media in content.values_mut() {
                let schema = &mut media["schema"];
                let inner = schema["oneOf"].as_array().and_then(|alts| {
                    let rest: Vec<&Value> = alts.iter().filter(|a| a["type"] != "null").collect();
                    (rest.len() == 1 && rest.len() < alts.len()).then(|| rest[0].clone())
                });
                if let Some(inner) = inner {
                    *schema = inner;
                }
            }
        }
    }
    if auth == Auth::Key {
        op["x-rate-limit"] = json!("key");
    }
    let params = op
        .as_object_mut()
        .map(|o| o.entry("parameters").or_insert_with(|| json!([])));
    let mut idempotent = false;
    if let Some(Value::Array(params)) = params {
        for p in params.iter_mut() {
            if p["in"] == "header" && p["name"] == "Idempotency-Key" {
                *p = json!({ "$ref": "#/components/parameters/IdempotencyKey" });
                idempotent = true;
            }
        }
        params.push(json!({ "$ref": "#/components/parameters/RequestId" }));
    }

    // What the gates and the edge can answer, besides the handler.
    let mut extra: Vec<(u16, &str)> = vec![
        (
            500,
            "`internal_error`: an unexpected error; quote `request_id` when reporting it.",
        ),
        (
            504,
            "`request_timeout`: the request took longer than the server allows.",
        ),
    ];
    let touches_db = !matches!(
        op["operationId"].as_str(),
        Some("health_live" | "health_ready" | "openapi_document" | "docs_page")
    );
    if touches_db {
        extra.push((503, "`database_unavailable`: retry after `Retry-After`."));
    }
    match auth {
        Auth::Key => {
            extra.push((
                401,
                "`invalid_api_key`: the key is missing, malformed, unknown, expired or revoked, \
                 or its account is suspended (the same body in every case).",
            ));
            extra.push((
                403,
                "`insufficient_scope`: the key lacks the scope this operation needs \
                 (`required_scope`).",
            ));
            extra.push((
                429,
                "`rate_limited`: the tier's limit for this account (shared by all its keys), \
                 the key's own `rate_limit`, or too many failed authentications from this \
                 address.",
            ));
            extra.push((
                503,
                "`rate_limiter_unavailable`: the shared rate-limit store is unreachable and \
                 the server refuses rather than fall back.",
            ));
        }
        Auth::Admin => {
            extra.push((
                401,
                "`invalid_admin_token`: the admin token is missing or wrong.",
            ));
            extra.push((
                404,
                "`not_found`: what every admin route answers while the server has no admin \
                 token.",
            ));
            extra.push((
                429,
                "`rate_limited`: too many failed authentications from this address.",
            ));
        }
        Auth::Public { ip_limited: true } => {
            extra.push((429, "`rate_limited`: too many requests from this address."));
        }
        Auth::Public { ip_limited: false } => {}
    }
    let Some(responses) = op["responses"].as_object_mut() else {
        return;
    };
    for (status, text) in extra {
        let entry = responses
            .entry(status.to_string())
            .or_insert_with(|| json!({ "description": "" }));
        let old = entry["description"].as_str().unwrap_or_default();
        entry["description"] = json!(if old.is_empty() {
            text.to_owned()
        } else {
            format!("{old} {text}")
        });
    }

    for (status, response) in responses.iter_mut() {
        let code: u16 = status.parse().unwrap_or(0);
        // Headers an annotation declares (e.g. `Location` on a 202) stay, after the shared
        // ones. They are ones the handler always sends with that status, which utoipa's
        // `headers(…)` cannot say.
        let mut declared = response
            .get("headers")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        for header in declared.values_mut() {
            if let Some(h) = header.as_object_mut() {
                h.entry("required").or_insert(json!(true));
            }
        }
        let mut headers = Map::new();
        headers.insert("X-Request-Id".into(), header_ref("X-Request-Id"));
        let limited = match auth {
            Auth::Key => code != 401,
            Auth::Public { ip_limited } => ip_limited,
            Auth::Admin => false,
        };
        if limited {
            for h in [
                "RateLimit-Policy",
                "RateLimit",
                "X-RateLimit-Limit",
                "X-RateLimit-Remaining",
                "X-RateLimit-Reset",
            ] {
                headers.insert(h.into(), header_ref(h));
            }
        }
        match code {
            429 => {
                headers.insert(
                    "Retry-After".into(),
                    json!({
                        "description": "Seconds to wait before retrying.",
                        "required": true,
                        "schema": { "type": "string", "pattern": "^[0-9]+$" },
                    }),
                );
            }
            503 => {
                headers.insert("Retry-After".into(), header_ref("Retry-After"));
            }
            401 if matches!(auth, Auth::Key | Auth::Admin) => {
                headers.insert("WWW-Authenticate".into(), header_ref("WWW-Authenticate"));
            }
            // `POST /v1/scrape` stores the queued job under the key: a retry waits for that
            // job and answers afresh, so its answer never says `Idempotent-Replayed`.
            200..=299 if idempotent && op_id != "scrape" => {
                headers.insert(
                    "Idempotent-Replayed".into(),
                    header_ref("Idempotent-Replayed"),
                );
            }
            _ => {}
        }
        if code >= 400 {
            let types = named_problem_types(response["description"].as_str().unwrap_or_default());
            let types: BTreeSet<&str> = types.into_iter().collect();
            let mut narrowed = json!({ "status": { "const": code } });
            if !types.is_empty() {
                narrowed["type"] = json!({ "enum": types });
            }
            response["content"] = json!({
                "application/problem+json": {
                    "schema": {
                        "allOf": [
                            { "$ref": "#/components/schemas/Problem" },
                            { "properties": narrowed },
                        ]
                    }
                }
            });
        }
        headers.extend(declared);
        if let Some(obj) = response.as_object_mut() {
            obj.insert("headers".into(), Value::Object(headers));
        }
    }
}

fn security_schemes() -> Value {
    json!({
        "ApiKey": {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "km_live_<12-char key id>_<43-char secret><6-char checksum>",
            "description": "An API key in `Authorization: Bearer km_live_…`: 70 characters, \
                `km_live_`, a 12-character key id, `_`, a 43-character secret and a \
                6-character CRC-32 checksum, all base62 (`0-9A-Za-z`). The requirement's list \
                names the scope the operation needs.",
        },
        "ApiKeyHeader": {
            "type": "apiKey",
            "in": "header",
            "name": "X-API-Key",
            "description": "The same API key in `X-API-Key: km_live_…`, for clients that cannot \
                set `Authorization`.",
        },
        "AdminToken": {
            "type": "http",
            "scheme": "bearer",
            "description": "The operator's token, `KEYMETER_ADMIN_TOKEN`, in \
                `Authorization: Bearer <token>`. While it is unset the admin API answers 404.",
        },
    })
}

fn headers() -> Value {
    let digits = json!({ "type": "string", "pattern": "^[0-9]+$" });
    json!({
        "X-Request-Id": {
            "description": "The request's id: the caller's `X-Request-Id` when it is 1–64 \
                characters of `[A-Za-z0-9._-]`, else a fresh UUID v7. Problem bodies carry it \
                as `request_id`; quote it when reporting a problem.",
            "required": true,
            "schema": { "type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$" },
        },
        "RateLimit-Policy": {
            "description": "The limit that applies (IETF httpapi draft): the policy (the \
                tier's name, or `ip`), its quota per window and the window in seconds.",
            "schema": { "type": "string", "examples": ["\"pro\";q=120;w=60"] },
        },
        "RateLimit": {
            "description": "The policy's state (IETF httpapi draft): requests remaining and \
                seconds until the full burst is available again.",
            "schema": { "type": "string", "examples": ["\"pro\";r=29;t=1"] },
        },
        "X-RateLimit-Limit": {
            "description": "Requests per minute the policy allows.",
            "schema": digits,
        },
        "X-RateLimit-Remaining": {
            "description": "Requests left in the current burst.",
            "schema": digits,
        },
        "X-RateLimit-Reset": {
            "description": "Seconds until the full burst is available again.",
            "schema": digits,
        },
        "Retry-After": {
            "description": "Seconds to wait before retrying.",
            "schema": digits,
        },
        "WWW-Authenticate": {
            "description": "`Bearer`: the credentials this server takes.",
            "schema": { "type": "string", "examples": ["Bearer"] },
        },
        "Idempotent-Replayed": {
            "description": "`true` when this is the stored response of an earlier request \
                with the same `Idempotency-Key` and body (nothing ran again).",
            "schema": { "type": "string", "enum": ["true"] },
        },
    })
}

fn parameters() -> Value {
    json!({
        "RequestId": {
            "name": "X-Request-Id",
            "in": "header",
            "required": false,
            "description": "Your id for this request, echoed in the response's `X-Request-Id` \
                and in the logs when it is 1–64 characters of `[A-Za-z0-9._-]` (otherwise \
                the server makes one).",
            "schema": { "type": "string" },
        },
        "IdempotencyKey": {
            "name": "Idempotency-Key",
            "in": "header",
            "required": false,
            "description": IDEMPOTENCY_KEY,
            "schema": { "type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]+$" },
        },
    })
}

fn problem_schema() -> Value {
    json!({
        "type": "object",
        "description": "An RFC 9457 problem document (`application/problem+json`). Members \
            beyond the standard ones are extensions some types carry.",
        "required": ["type", "title", "status", "detail"],
        "properties": {
            "type": {
                "type": "string",
                "description": "A stable slug to match on; see `ProblemType` for the list.",
                "examples": ["insufficient_credits"],
            },
            "title": { "type": "string", "description": "A short summary of the type." },
            "status": { "type": "integer", "minimum": 400, "maximum": 599 },
            "detail": {
                "type": "string",
                "description": "What went wrong this time, for people (not for matching).",
            },
            "request_id": {
                "type": "string",
                "description": "The response's `X-Request-Id`.",
            },
            "field": {
                "type": "string",
                "description": "`validation_failed`: the request field at fault, when known.",
            },
            "required_scope": {
                "type": "string",
                "description": "`insufficient_scope`: the scope the operation needs.",
            },
            "missing_scopes": {
                "type": "array",
                "items": { "type": "string" },
                "description": "`insufficient_scope` from creating or rotating a key: the \
                    scopes the new key would carry that the calling key lacks.",
            },
            "max_keys": {
                "type": "integer",
                "description": "`key_limit_reached`: the tier's cap on active keys.",
            },
            "retry_after": {
                "type": "integer",
                "minimum": 0,
                "description": "`rate_limited`: seconds to wait (as `Retry-After`).",
            },
            "balance": {
                "type": "integer",
                "description": "`insufficient_credits`: the balance.",
            },
            "cost": {
                "type": "integer",
                "description": "`insufficient_credits`, and a scrape job's problems: what the \
                    request (the job) costs.",
            },
            "job_id": {
                "type": "string",
                "format": "uuid",
                "description": "A `POST /v1/scrape` problem after the job was queued \
                    (`upstream_failed`, `job_timeout`, `url_not_allowed`, \
                    `upstream_unavailable`, `job_cancelled`, `database_unavailable`): the job; \
                    `GET /v1/jobs/{id}` shows it.",
            },
            "reason": {
                "type": "string",
                "description": "With `job_id`: the job's `error.reason` (e.g. `server_error`, \
                    `timeout`, `circuit_open`, `cancelled`).",
            },
            "refunded": {
                "type": "boolean",
                "description": "With `job_id`: the job's cost was given back.",
            },
            "upstream_status": {
                "type": ["integer", "null"],
                "description": "With `job_id`: the site's HTTP status when it answered, \
                    `null` when it did not (absent from `job_cancelled`).",
            },
            "breaker": {
                "type": "string",
                "enum": ["provider", "host"],
                "description": "`upstream_unavailable` before any charge: which circuit \
                    breaker is open.",
            },
            "scope": {
                "type": "string",
                "enum": ["shared", "account"],
                "description": "`upstream_unavailable` before any charge: `shared` when the \
                    breaker refuses every account's jobs to that origin, `account` when only \
                    this account's (its own recent jobs there failed).",
            },
            "max_queued_jobs": {
                "type": "integer",
                "description": "`queue_full`: the tier's queued-jobs cap.",
            },
            "job_status": {
                "type": "string",
                "description": "`job_not_cancellable`: the job's status.",
            },
        },
        "additionalProperties": true,
    })
}

fn problem_type_schema() -> Value {
    let one_of: Vec<Value> = ProblemType::ALL
        .iter()
        .map(|t| {
            json!({ "const": t.slug(), "description": t.description(), "x-status": t.statuses() })
        })
        .collect();
    json!({
        "type": "string",
        "description": "The problem types this server sends: the value of a problem's \
            `type`, with the status(es) each comes with. New types may be added; treat an \
            unknown one by its status.",
        "oneOf": one_of,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn operations(doc: &Value) -> Vec<(String, String, Value)> {
        let mut out = Vec::new();
        for (path, item) in doc["paths"].as_object().into_iter().flatten() {
            for method in METHODS {
                if let Some(op) = item.get(method) {
                    out.push((method.to_owned(), path.clone(), op.clone()));
                }
            }
        }
        out
    }

    #[test]
    fn the_document_is_openapi_3_1_with_unique_operation_ids() {
        let doc = document();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
        let mut ids = BTreeSet::new();
        for (method, path, op) in operations(&doc) {
            let id = op["operationId"].as_str().unwrap_or_default().to_owned();
            assert!(!id.is_empty(), "{method} {path} has no operationId");
            assert!(ids.insert(id.clone()), "operationId {id} is used twice");
        }
    }

    #[test]
    fn the_document_holds_no_nulls() {
        // A null is never meaningful in an OpenAPI document, and one slipped in once (by
        // mutable indexing of a missing member), which made validators reject the document.
        fn walk(v: &Value, at: &str) {
            match v {
                Value::Null => panic!("null at {at}"),
                Value::Array(a) => a
                    .iter()
                    .enumerate()
                    .for_each(|(i, x)| walk(x, &format!("{at}/{i}"))),
                Value::Object(o) => o.iter().for_each(|(k, x)| walk(x, &format!("{at}/{k}"))),
                _ => {}
            }
        }
        walk(&document(), "");
    }

    #[test]
    fn every_error_response_names_known_problem_types() {
        let doc = document();
        for (method, path, op) in operations(&doc) {
            for (status, res) in op["responses"].as_object().unwrap() {
                let code: u16 = status.parse().unwrap();
                if code < 400 {
                    continue;
                }
                let description = res["description"].as_str().unwrap();
                let named = named_problem_types(description);
                assert!(
                    !named.is_empty(),
                    "{method} {path} {status}: the description names no problem type: {description}"
                );
                for slug in named {
                    let statuses = ProblemType::from_slug(slug).unwrap().statuses();
                    assert!(
                        statuses.contains(&code),
                        "{method} {path} {status}: `{slug}` does not come with {code}"
                    );
                }
            }
        }
    }

    #[test]
    fn keyed_operations_name_a_scope_and_document_the_gate() {
        let doc = document();
        for (method, path, op) in operations(&doc) {
            if auth_of(&op) != Auth::Key {
                continue;
            }
            for req in op["security"].as_array().unwrap() {
                for (_, scopes) in req.as_object().unwrap() {
                    assert_eq!(scopes.as_array().unwrap().len(), 1, "{method} {path}");
                }
            }
            for status in ["401", "403", "429"] {
                assert!(
                    op["responses"][status].is_object(),
                    "{method} {path} {status}"
                );
            }
        }
    }

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
