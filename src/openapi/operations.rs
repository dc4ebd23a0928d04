//! What every operation shares, added in one place instead of on each `#[utoipa::path]`:
//! the responses the gates and the edge add (by the route's [`Access`] in the route table),
//! the problem+json body of every 4xx/5xx narrowed to the types its description names, the
//! response headers, and the `X-Request-Id` request header.
//!
//! Convention this relies on: the description of an error response names its problem
//! `type`s in backticks (`` `not_found`: … ``). Those names narrow that response's `type` to
//! an `enum`, so a client (or a fuzzer) can check a `404` really is one of the documented
//! problems. A unit test fails when an error response names none, or names a type that is
//! not a [`ProblemType`].

use std::collections::{BTreeMap, BTreeSet};

use actix_web::http::Method;
use serde_json::{json, Map, Value};
use utoipa::openapi::extensions::Extensions;
use utoipa::openapi::path::{Operation, ParameterIn, PathItem};
use utoipa::openapi::schema::{AllOfBuilder, ObjectBuilder, Schema, SchemaType, Type};
use utoipa::openapi::{Content, OpenApi, Ref, RefOr, Required, Response};
use utoipa::{IntoResponses, Modify};

use super::components::{
    const_schema, idempotency_key_parameter, request_id_parameter, required_retry_after,
};
use crate::http::problem::ProblemType;
use crate::routes::{self, Access};

/// The rate-limit headers a limited response carries.
const RATE_LIMIT_HEADERS: [&str; 5] = [
    "RateLimit-Policy",
    "RateLimit",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
];

/// Operations that answer without the database, so never `503 database_unavailable`.
const WITHOUT_DATABASE: [&str; 4] = [
    "health_live",
    "health_ready",
    "openapi_document",
    "docs_page",
];

/// The refusals of the `web::Json` body extractor, as `http::extractors::json_config`
/// configures it: a handler that reads its body with `web::Json<T>` names this in its
/// `responses(…)` (other handlers read raw bytes and never answer 415). Its 422s depend on
/// the body's fields, so each handler still describes its own.
pub struct JsonBody;

impl IntoResponses for JsonBody {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        [
            (
                "400",
                "`invalid_json`: the body is not JSON; `invalid_request`: it could not be read.",
            ),
            (
                "415",
                "`unsupported_media_type`: send `Content-Type: application/json`.",
            ),
        ]
        .into_iter()
        .map(|(status, text)| (status.to_owned(), RefOr::T(Response::new(text))))
        .collect()
    }
}

/// Adds the shared parts to every operation; see the module comment.
pub struct OperationDefaults;

impl Modify for OperationDefaults {
    fn modify(&self, openapi: &mut OpenApi) {
        let table = routes::table();
        for (path, item) in openapi.paths.paths.iter_mut() {
            for (method, op) in operations_mut(item) {
                let access = table
                    .iter()
                    .find(|r| r.method == method && r.path == path.as_str())
                    .map_or(Access::Open, |r| r.access);
                decorate(op, access);
            }
        }
    }
}

/// The operations of a path item, with their methods.
pub fn operations_mut(item: &mut PathItem) -> impl Iterator<Item = (Method, &mut Operation)> {
    [
        (Method::GET, &mut item.get),
        (Method::PUT, &mut item.put),
        (Method::POST, &mut item.post),
        (Method::DELETE, &mut item.delete),
        (Method::OPTIONS, &mut item.options),
        (Method::HEAD, &mut item.head),
        (Method::PATCH, &mut item.patch),
        (Method::TRACE, &mut item.trace),
    ]
    .into_iter()
    .filter_map(|(m, op)| op.as_mut().map(|op| (m, op)))
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

/// What the gates and the edge can answer for a route with this access, besides the handler.
fn gate_responses(access: Access, touches_db: bool) -> Vec<(u16, &'static str)> {
    let mut extra = vec![
        (
            500,
            "`internal_error`: an unexpected error; quote `request_id` when reporting it.",
        ),
        (
            504,
            "`request_timeout`: the request took longer than the server allows.",
        ),
    ];
    if touches_db {
        extra.push((503, "`database_unavailable`: retry after `Retry-After`."));
    }
    match access {
        Access::Key => extra.extend([
            (
                401,
                "`invalid_api_key`: the key is missing, malformed, unknown, expired or revoked, \
                 or its account is suspended (the same body in every case).",
            ),
            (
                403,
                "`insufficient_scope`: the key lacks the scope this operation needs \
                 (`required_scope`).",
            ),
            (
                429,
                "`rate_limited`: the tier's limit for this account (shared by all its keys), \
                 the key's own `rate_limit`, or too many failed authentications from this \
                 address.",
            ),
            (
                503,
                "`rate_limiter_unavailable`: the shared rate-limit store is unreachable and \
                 the server refuses rather than fall back.",
            ),
        ]),
        Access::Admin => extra.extend([
            (
                401,
                "`invalid_admin_token`: the admin token is missing or wrong.",
            ),
            (
                404,
                "`not_found`: what every admin route answers while the server has no admin \
                 token.",
            ),
            (
                429,
                "`rate_limited`: too many failed authentications from this address.",
            ),
        ]),
        Access::PerIp => extra.push((429, "`rate_limited`: too many requests from this address.")),
        Access::Gateway => extra.extend([
            (
                401,
                "`invalid_api_key`: the key is missing, malformed, unknown, expired or revoked, \
                 or its account is suspended (the same body in every case).",
            ),
            (
                403,
                "`insufficient_scope`: the key lacks the scope of the original request's route \
                 (`required_scope`).",
            ),
            (
                429,
                "`rate_limited`: the tier's limit for this account (shared by all its keys, \
                 across proxied and API calls), the key's own `rate_limit`, or too many failed \
                 authentications from this address.",
            ),
            (
                503,
                "`rate_limiter_unavailable`: the shared rate-limit store is unreachable and \
                 the server refuses rather than fall back.",
            ),
        ]),
        Access::Service => extra.extend([
            (
                401,
                "`invalid_service_token`: the service token is missing or wrong.",
            ),
            (
                429,
                "`rate_limited`: too many failed authentications from this address.",
            ),
        ]),
        Access::Open | Access::Signed => {}
    }
    extra
}

fn decorate(op: &mut Operation, access: Access) {
    let op_id = op.operation_id.clone().unwrap_or_default();
    unwrap_optional_body(op);

    let rate_limit = match access {
        Access::Key | Access::Gateway => Some("key"),
        Access::PerIp => Some("ip"),
        _ => None,
    };
    if let Some(kind) = rate_limit {
        op.extensions
            .get_or_insert_with(Extensions::default)
            .insert("x-rate-limit".into(), json!(kind));
    }

    let params = op.parameters.get_or_insert_with(Vec::new);
    let mut idempotent = false;
    for p in params.iter_mut() {
        if p.parameter_in == ParameterIn::Header && p.name == "Idempotency-Key" {
            *p = idempotency_key_parameter();
            idempotent = true;
        }
    }
    params.push(request_id_parameter());

    // Every body passes the edge's size limit first.
    let mut extra = Vec::new();
    if op.request_body.is_some() {
        extra.push((413, "`payload_too_large`"));
    }
    extra.extend(gate_responses(
        access,
        !WITHOUT_DATABASE.contains(&op_id.as_str()),
    ));
    let responses = &mut op.responses.responses;
    for (status, text) in extra {
        let entry = responses
            .entry(status.to_string())
            .or_insert_with(|| RefOr::T(Response::new("")));
        if let RefOr::T(r) = entry {
            r.description = if r.description.is_empty() {
                text.to_owned()
            } else {
                format!("{} {text}", r.description)
            };
        }
    }

    // A `Key` route is limited except when the key was refused before the limit applied.
    let limited = |code: u16| match access {
        Access::Key | Access::Gateway => code != 401,
        Access::PerIp => true,
        Access::Open | Access::Signed | Access::Admin | Access::Service => false,
    };
    for (status, response) in responses.iter_mut() {
        let RefOr::T(response) = response else {
            continue;
        };
        let code: u16 = status.parse().unwrap_or(0);
        let mut headers = Map::new();
        headers.insert("X-Request-Id".into(), header_ref("X-Request-Id"));
        if limited(code) {
            for h in RATE_LIMIT_HEADERS {
                headers.insert(h.into(), header_ref(h));
            }
        }
        match code {
            429 => {
                headers.insert("Retry-After".into(), required_retry_after());
            }
            503 => {
                headers.insert("Retry-After".into(), header_ref("Retry-After"));
            }
            401 if matches!(access, Access::Key | Access::Admin | Access::Gateway) => {
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
        // Headers an annotation declares (e.g. `Location` on a 202) stay, after the shared
        // ones. They are ones the handler always sends with that status, which utoipa's
        // `headers(…)` cannot say.
        for (name, header) in std::mem::take(&mut response.headers) {
            let mut h = serde_json::to_value(header).unwrap_or_else(|_| json!({}));
            if let Some(h) = h.as_object_mut() {
                h.entry("required").or_insert(json!(true));
            }
            headers.insert(name, h);
        }
        if code >= 400 {
            response.content = [(
                "application/problem+json".to_owned(),
                Content::new(Some(problem_body(code, &response.description))),
            )]
            .into_iter()
            .collect();
        }
        // utoipa 5's response headers are neither references nor `required`; the shared
        // definitions are in `components.headers` (see `super::components`).
        response
            .extensions
            .get_or_insert_with(Extensions::default)
            .insert("headers".into(), Value::Object(headers));
    }
}

/// A `Problem` whose `status` is `code` and whose `type` is one the description names.
fn problem_body(code: u16, description: &str) -> Schema {
    let types: BTreeSet<&str> = named_problem_types(description).into_iter().collect();
    let mut narrowed = ObjectBuilder::new()
        .schema_type(SchemaType::AnyValue)
        .property("status", const_schema(code));
    if !types.is_empty() {
        narrowed = narrowed.property(
            "type",
            ObjectBuilder::new()
                .schema_type(SchemaType::AnyValue)
                .enum_values(Some(types)),
        );
    }
    AllOfBuilder::new()
        .item(Ref::from_schema_name("Problem"))
        .item(narrowed)
        .into()
}

/// utoipa spells an optional body (`Option<T>`) as "T or null"; the server reads an
/// optional body as absent or T, and JSON `null` is not T.
fn unwrap_optional_body(op: &mut Operation) {
    let Some(body) = op.request_body.as_mut() else {
        return;
    };
    if matches!(body.required, Some(Required::True)) {
        return;
    }
    for media in body.content.values_mut() {
        let Some(RefOr::T(Schema::OneOf(one_of))) = &media.schema else {
            continue;
        };
        let is_null = |s: &RefOr<Schema>| matches!(s, RefOr::T(Schema::Object(o)) if o.schema_type == SchemaType::Type(Type::Null));
        let rest: Vec<&RefOr<Schema>> = one_of.items.iter().filter(|s| !is_null(s)).collect();
        if rest.len() == 1 && rest.len() < one_of.items.len() {
            media.schema = Some(rest[0].clone());
        }
    }
}

fn header_ref(name: &str) -> Value {
    json!({ "$ref": format!("#/components/headers/{name}") })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn operations(doc: &Value) -> Vec<(String, String, Value)> {
        let mut out = Vec::new();
        for (path, item) in doc["paths"].as_object().into_iter().flatten() {
            for method in [
                "get", "put", "post", "delete", "options", "head", "patch", "trace",
            ] {
                if let Some(op) = item.get(method) {
                    out.push((method.to_owned(), path.clone(), op.clone()));
                }
            }
        }
        out
    }

    #[test]
    fn the_document_is_openapi_3_1_with_unique_operation_ids() {
        let doc = super::super::document();
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
        walk(&super::super::document(), "");
    }

    #[test]
    fn every_error_response_names_known_problem_types() {
        let doc = super::super::document();
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
    fn the_documented_operations_are_the_route_table_and_their_security_matches_its_access() {
        let doc = super::super::document();
        let documented: BTreeSet<(String, String)> = operations(&doc)
            .into_iter()
            .map(|(m, p, _)| (m.to_uppercase(), p))
            .collect();
        let registered: BTreeSet<(String, String)> = routes::table()
            .into_iter()
            .map(|r| (r.method.to_string(), r.path.to_owned()))
            .collect();
        assert_eq!(documented, registered);
        for r in routes::table() {
            let op = &doc["paths"][r.path][r.method.as_str().to_lowercase()];
            let schemes: BTreeSet<&str> = op["security"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_object)
                .flat_map(|o| o.keys().map(String::as_str))
                .collect();
            let expected: &[&str] = match r.access {
                Access::Key | Access::Gateway => &["ApiKey", "ApiKeyHeader"],
                Access::Admin => &["AdminToken"],
                Access::Service => &["ServiceToken"],
                Access::Open | Access::PerIp | Access::Signed => &[],
            };
            assert_eq!(
                schemes,
                expected.iter().copied().collect(),
                "{} {} is {:?}",
                r.method,
                r.path,
                r.access
            );
        }
    }

    #[test]
    fn keyed_operations_name_a_scope_and_document_the_gate() {
        let doc = super::super::document();
        for r in routes::table() {
            if r.access != Access::Key {
                continue;
            }
            let op = &doc["paths"][r.path][r.method.as_str().to_lowercase()];
            for req in op["security"].as_array().unwrap() {
                for (_, scopes) in req.as_object().unwrap() {
                    assert_eq!(
                        scopes.as_array().unwrap().len(),
                        1,
                        "{} {}",
                        r.method,
                        r.path
                    );
                }
            }
            for status in ["401", "403", "429"] {
                assert!(
                    op["responses"][status].is_object(),
                    "{} {} {status}",
                    r.method,
                    r.path
                );
            }
        }
    }
}
