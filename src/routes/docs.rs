//! `/openapi.json` and `/docs`: the API's own description, for programs and for people.
//! Neither needs a key; the document is built once per process (see `crate::openapi`).

use std::sync::OnceLock;

use actix_web::http::header::{self, HeaderValue};
use actix_web::HttpResponse;

use crate::http::problem::{ApiError, ApiResult};
use crate::openapi::page::{docs_csp, DOCS_HTML};
use crate::routes::{Access, Routes};

pub fn configure(routes: &mut Routes) {
    routes
        .get(Access::Open, "/openapi.json", openapi_json)
        .get(Access::Open, "/docs", docs_page);
}

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
        serde_json::to_string(&crate::openapi::document())
            .map_err(|e| format!("rendering the document: {e}"))
    });
    match rendered {
        Ok(body) => Ok(HttpResponse::Ok()
            .content_type("application/json")
            .insert_header((header::CACHE_CONTROL, "no-cache"))
            .body(body.clone())),
        Err(e) => Err(ApiError::Internal(anyhow::anyhow!("{e}"))),
    }
}

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
