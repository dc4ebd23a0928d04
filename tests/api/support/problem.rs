//! The one shape every error answer has: `application/problem+json` with `type`, `status`,
//! `title`, `detail`, and the request id of the `X-Request-Id` header.

/// Asserts a response is a problem document with the given status and type, and returns it.
pub async fn assert_problem(res: reqwest::Response, status: u16, type_: &str) -> serde_json::Value {
    assert_eq!(res.status().as_u16(), status, "status");
    let ct = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        ct.starts_with("application/problem+json"),
        "content-type {ct}"
    );
    let header_id = res
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body: serde_json::Value = res.json().await.expect("problem body is JSON");
    assert_eq!(body["type"], type_, "problem type in {body}");
    assert_eq!(body["status"], status, "problem status in {body}");
    assert!(body["title"].is_string(), "title in {body}");
    assert!(body["detail"].is_string(), "detail in {body}");
    assert_eq!(
        body["request_id"].as_str(),
        header_id.as_deref(),
        "request_id matches X-Request-Id in {body}"
    );
    body
}
