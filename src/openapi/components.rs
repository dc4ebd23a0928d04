//! The document's shared components: the security schemes, the `Problem` schema and
//! `ProblemType`'s, the response headers every operation refers to, and the two request headers
//! every (or every idempotent) operation takes.
//!
//! Two things utoipa 5's typed model cannot say are written through its `extensions` maps,
//! which serialize flattened into their parent object: JSON Schema's `const` (see
//! [`const_schema`]) and reusable response headers, `components.headers` with `$ref`s to
//! them that carry `required` (see [`HEADERS`] and `super::operations`).

use std::borrow::Cow;

use serde_json::{json, Value};
use utoipa::openapi::extensions::Extensions;
use utoipa::openapi::path::{Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{
    AdditionalProperties, ArrayBuilder, KnownFormat, ObjectBuilder, OneOfBuilder, Schema,
    SchemaFormat, SchemaType, Type,
};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{Components, OpenApi, RefOr, Required};
use utoipa::{Modify, PartialSchema, ToSchema};

use crate::http::problem::ProblemType;

/// The description of the `Idempotency-Key` request header (used by the annotations).
pub const IDEMPOTENCY_KEY: &str = "1 to 255 printable ASCII characters, no spaces. The same key \
    and body within 24 h replays the stored response (`Idempotent-Replayed: true`) and charges \
    nothing; the same key with another body is `422 idempotency_key_reused`; a duplicate while \
    the first is running is `409 idempotency_conflict`. Only successful outcomes are stored. A \
    claim left by a request that died is taken over by a retry once it is older than the \
    server's request timeout plus a fifth; an attempt that outlives its claim is undone.";

/// Adds the shared components; see the module comment.
pub struct SharedComponents;

impl Modify for SharedComponents {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Components::new);
        for (name, scheme) in security_schemes() {
            components.security_schemes.insert(name.into(), scheme);
        }
        components
            .schemas
            .insert("Problem".into(), problem_schema().into());
        components
            .extensions
            .get_or_insert_with(Extensions::default)
            .insert("headers".into(), headers());
    }
}

/// A schema that is exactly `value` (JSON Schema's `const`, which utoipa 5 lacks).
pub fn const_schema(value: impl Into<Value>) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(SchemaType::AnyValue)
        .extensions(Some(Extensions::from_iter([("const", value.into())])))
}

fn security_schemes() -> [(&'static str, SecurityScheme); 4] {
    let mut api_key = Http::new(HttpAuthScheme::Bearer);
    api_key.bearer_format =
        Some("km_live_<12-char key id>_<43-char secret><6-char checksum>".into());
    api_key.description = Some(
        "An API key in `Authorization: Bearer km_live_…`: 70 characters, `km_live_`, a \
         12-character key id, `_`, a 43-character secret and a 6-character CRC-32 checksum, \
         all base62 (`0-9A-Za-z`). The requirement's list names the scope the operation needs."
            .into(),
    );
    let mut admin = Http::new(HttpAuthScheme::Bearer);
    admin.description = Some(
        "The operator's token, `KEYMETER_ADMIN_TOKEN`, in `Authorization: Bearer <token>`. \
         While it is unset the admin API answers 404."
            .into(),
    );
    [
        ("ApiKey", SecurityScheme::Http(api_key)),
        (
            "ApiKeyHeader",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-API-Key",
                "The same API key in `X-API-Key: km_live_…`, for clients that cannot set \
                 `Authorization`.",
            ))),
        ),
        ("AdminToken", SecurityScheme::Http(admin)),
        ("ServiceToken", SecurityScheme::Http(service_token())),
    ]
}

/// Gateway mode's service tokens, for the operator's own servers.
fn service_token() -> Http {
    let mut token = Http::new(HttpAuthScheme::Bearer);
    token.description = Some(
        "One of the operator's service tokens, `KEYMETER_SERVICE_TOKENS`, in `Authorization: \
         Bearer <token>`: for the upstream behind the gateway (refunds) and servers that verify \
         keys in code."
            .into(),
    );
    token
}

/// The response headers operations refer to as `#/components/headers/<name>`.
pub const HEADERS: [&str; 9] = [
    "X-Request-Id",
    "RateLimit-Policy",
    "RateLimit",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
    "Retry-After",
    "WWW-Authenticate",
    "Idempotent-Replayed",
];

/// The definitions of [`HEADERS`], in that order. Plain JSON: utoipa 5 has no reusable
/// headers, and its `Header` has no `required`.
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

/// `Retry-After` on a 429, where the server always sends it.
pub fn required_retry_after() -> Value {
    json!({
        "description": "Seconds to wait before retrying.",
        "required": true,
        "schema": { "type": "string", "pattern": "^[0-9]+$" },
    })
}

/// The `X-Request-Id` request header every operation takes.
pub fn request_id_parameter() -> Parameter {
    ParameterBuilder::new()
        .name("X-Request-Id")
        .parameter_in(ParameterIn::Header)
        .required(Required::False)
        .description(Some(
            "Your id for this request, echoed in the response's `X-Request-Id` and in the \
             logs when it is 1–64 characters of `[A-Za-z0-9._-]` (otherwise the server makes \
             one).",
        ))
        .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
        .build()
}

/// The `Idempotency-Key` request header, with the constraints the server checks (the
/// annotations name it with its description only).
pub fn idempotency_key_parameter() -> Parameter {
    ParameterBuilder::new()
        .name("Idempotency-Key")
        .parameter_in(ParameterIn::Header)
        .required(Required::False)
        .description(Some(IDEMPOTENCY_KEY))
        .schema(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(255))
                .pattern(Some("^[!-~]+$")),
        ))
        .build()
}

fn text(description: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(description))
}

fn integer(description: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .description(Some(description))
}

/// An RFC 9457 problem document with every extension member some type carries.
fn problem_schema() -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some(
            "An RFC 9457 problem document (`application/problem+json`). Members beyond the \
             standard ones are extensions some types carry.",
        ))
        .required("type")
        .required("title")
        .required("status")
        .required("detail")
        .property(
            "type",
            text("A stable slug to match on; see `ProblemType` for the list.")
                .examples(["insufficient_credits"]),
        )
        .property("title", text("A short summary of the type."))
        .property(
            "status",
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(400))
                .maximum(Some(599)),
        )
        .property(
            "detail",
            text("What went wrong this time, for people (not for matching)."),
        )
        .property("request_id", text("The response's `X-Request-Id`."))
        .property(
            "field",
            text("`validation_failed`: the request field at fault, when known."),
        )
        .property(
            "required_scope",
            text("`insufficient_scope`: the scope the operation needs."),
        )
        .property(
            "missing_scopes",
            ArrayBuilder::new()
                .items(ObjectBuilder::new().schema_type(Type::String))
                .description(Some(
                    "`insufficient_scope` from creating or rotating a key: the scopes the new \
                     key would carry that the calling key lacks.",
                )),
        )
        .property(
            "max_keys",
            integer("`key_limit_reached`: the tier's cap on active keys."),
        )
        .property(
            "retry_after",
            integer("`rate_limited`: seconds to wait (as `Retry-After`).").minimum(Some(0)),
        )
        .property("balance", integer("`insufficient_credits`: the balance."))
        .property(
            "key_id",
            text("`key_spend_limit_exceeded`: the key whose spend limit refused the charge."),
        )
        .property(
            "limit",
            integer("`key_spend_limit_exceeded`: the key's limit, credits per period."),
        )
        .property(
            "period",
            text("`key_spend_limit_exceeded`: the limit's period, `day` or `month` (UTC)."),
        )
        .property(
            "spent",
            integer("`key_spend_limit_exceeded`: what the key spent in the current period."),
        )
        .property(
            "resets_at",
            text("`key_spend_limit_exceeded`: when the period ends (RFC 3339, UTC).")
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime))),
        )
        .property(
            "cost",
            integer(
                "`insufficient_credits`, and a scrape job's problems: what the request (the \
                 job) costs.",
            ),
        )
        .property(
            "job_id",
            text(
                "A `POST /v1/scrape` problem after the job was queued (`upstream_failed`, \
                 `job_timeout`, `url_not_allowed`, `upstream_unavailable`, `job_cancelled`, \
                 `database_unavailable`): the job; `GET /v1/jobs/{id}` shows it.",
            )
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Uuid))),
        )
        .property(
            "reason",
            text(
                "With `job_id`: the job's `error.reason` (e.g. `server_error`, `timeout`, \
                 `circuit_open`, `cancelled`).",
            ),
        )
        .property(
            "refunded",
            ObjectBuilder::new()
                .schema_type(Type::Boolean)
                .description(Some("With `job_id`: the job's cost was given back.")),
        )
        .property(
            "upstream_status",
            ObjectBuilder::new()
                .schema_type(SchemaType::from_iter([Type::Integer, Type::Null]))
                .description(Some(
                    "With `job_id`: the site's HTTP status when it answered, `null` when it \
                     did not (absent from `job_cancelled`).",
                )),
        )
        .property(
            "breaker",
            text("`upstream_unavailable` before any charge: which circuit breaker is open.")
                .enum_values(Some(["provider", "host"])),
        )
        .property(
            "scope",
            text(
                "`upstream_unavailable` before any charge: `shared` when the breaker refuses \
                 every account's jobs to that origin, `account` when only this account's (its \
                 own recent jobs there failed).",
            )
            .enum_values(Some(["shared", "account"])),
        )
        .property(
            "max_queued_jobs",
            integer("`queue_full`: the tier's queued-jobs cap."),
        )
        .property(
            "job_status",
            text("`job_not_cancellable`: the job's status."),
        )
        .additional_properties(Some(AdditionalProperties::<Schema>::FreeForm(true)))
        .into()
}

/// `ProblemType`'s schema is the list itself: every type this server sends, straight from
/// [`ProblemType::ALL`], with its slug, its description and (as `x-status`) the statuses it
/// comes with. A derived schema would carry only the slugs.
impl PartialSchema for ProblemType {
    fn schema() -> RefOr<Schema> {
        problem_type_schema().into()
    }
}

impl ToSchema for ProblemType {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("ProblemType")
    }
}

fn problem_type_schema() -> Schema {
    let mut one_of = OneOfBuilder::new()
        .schema_type(Type::String)
        .description(Some(
            "The problem types this server sends: the value of a problem's `type`, with the \
             status(es) each comes with. New types may be added; treat an unknown one by its \
             status.",
        ));
    for t in ProblemType::ALL {
        one_of = one_of.item(
            ObjectBuilder::new()
                .schema_type(SchemaType::AnyValue)
                .description(Some(t.description()))
                .extensions(Some(Extensions::from_iter([
                    ("const", json!(t.slug())),
                    ("x-status", json!(t.statuses())),
                ]))),
        );
    }
    one_of.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shared_headers_are_defined_and_every_reference_resolves() {
        let defined = headers();
        let names: Vec<&str> = defined
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(names, HEADERS);

        fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
            match v {
                Value::Object(o) => {
                    if let Some(Value::String(r)) = o.get("$ref") {
                        out.push(r);
                    }
                    o.values().for_each(|x| refs(x, out));
                }
                Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
                _ => {}
            }
        }
        let doc = super::super::document();
        let mut all = Vec::new();
        refs(&doc, &mut all);
        assert!(all.iter().any(|r| r.starts_with("#/components/headers/")));
        for r in all {
            let mut at = &doc;
            for part in r.trim_start_matches("#/").split('/') {
                at = &at[part];
            }
            assert!(at.is_object(), "{r} does not resolve");
        }
    }

    #[test]
    fn the_problem_type_schema_lists_every_type_with_its_statuses() {
        let schema = serde_json::to_value(ProblemType::schema()).unwrap();
        let items = schema["oneOf"].as_array().unwrap();
        assert_eq!(items.len(), ProblemType::ALL.len());
        for (item, t) in items.iter().zip(ProblemType::ALL) {
            assert_eq!(item["const"], t.slug());
            assert_eq!(item["x-status"], json!(t.statuses()));
            assert_eq!(item["description"], t.description());
        }
    }
}
