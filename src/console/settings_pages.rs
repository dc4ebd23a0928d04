//! The settings page: the account, the password (`auth_pages`), the low-balance threshold
//! (`credits::alerts`, as `PUT /v1/account/alerts`) and the webhook endpoints
//! (`events::endpoints`, as `/v1/webhook-endpoints`): create (the signing secret shown once),
//! list, an endpoint's page with its deliveries (`events::reads`), rotate the secret (the new
//! one shown once), and delete after a confirmation page.
//!
//! The endpoint URL goes through the same SSRF check as the API's (`endpoints::check_url`),
//! and the secret is derived, never stored: the page that shows it is the answer to the POST
//! itself, never a redirect target, so it sits in no URL and no history entry.

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use maud::{html, Markup};
use serde::Deserialize;

use super::auth_pages::{account_section, password_section, FormErrors};
use super::format::{maybe_time, parse_whole, thousands, time};
use super::layout::{confirm_page, notices, page, respond, secret_once, Confirm, Nav, Notice};
use super::{see_other, state, ConsoleError, NoFields, Owner, Posted, Result, BASE};
use crate::credits::alerts::{self, AlertSettings};
use crate::events::endpoints::{self, EndpointView, Error as EndpointError};
use crate::events::{reads, EventType};
use crate::startup::AppState;

/// How many endpoints the page lists (an account holds at most `max_endpoints`, 16 by default).
const ENDPOINTS_LISTED: i64 = 100;
/// How many deliveries an endpoint's page lists (the newest); the API pages through all.
const DELIVERIES_LISTED: i64 = 50;

/// What one render of the settings page says besides the stored settings.
#[derive(Default)]
pub struct Messages {
    pub password: FormErrors,
    /// The threshold form's outcome (in its section, where its `#alerts` address scrolls).
    pub alerts: Vec<Notice>,
    /// The threshold as typed, and why it was refused.
    pub threshold: Option<(String, String)>,
    pub webhook: WebhookForm,
}

/// The create-endpoint form as posted, with its messages.
#[derive(Default)]
pub struct WebhookForm {
    url: String,
    events: Vec<String>,
    top: Vec<Notice>,
    url_error: Option<String>,
    events_error: Option<String>,
    /// The endpoint just created and its secret, shown once.
    created: Option<(EndpointView, String)>,
}

fn event_field_id(t: EventType) -> String {
    format!("ev-{}", t.as_str().replace(['.', '_'], "-"))
}

fn err(id: &str, e: &Option<String>) -> Markup {
    html! { @if let Some(m) = e { p.field-error id=(id) { (m) } } }
}

fn alerts_section(
    owner: &Owner,
    a: &AlertSettings,
    top: &[Notice],
    typed: Option<&(String, String)>,
) -> Markup {
    let own = (a.low_balance_threshold_source == "account").then_some(a.low_balance_threshold);
    let (value, error) = match typed {
        Some((v, e)) => (v.clone(), Some(e.clone())),
        None => (own.map(thousands).unwrap_or_default(), None),
    };
    html! {
        section.card #alerts aria-labelledby="alerts-title" {
            h2 #alerts-title { "Low-balance alert" }
            (notices(top))
            p.muted { "When a charge takes the balance below this, keymeter sends the "
                code { "balance.low" } " event (to your webhook endpoints below) and the overview "
                "shows a warning. Empty: your tier's default, " (thousands(a.tier_default)) " credits. 0: never." }
            dl.facts {
                dt { "Threshold in force" } dd #threshold-now {
                    (thousands(a.low_balance_threshold)) " credits"
                    @if a.low_balance_threshold_source == "tier" { " (the tier's default)" }
                }
            }
            form method="post" action={(BASE) "/settings/alerts#alerts"} novalidate {
                input type="hidden" name="csrf" value=(owner.csrf());
                div.field {
                    label for="f-threshold" { "Threshold (credits)" }
                    input #f-threshold name="threshold" type="text" inputmode="numeric" autocomplete="off"
                        value=(value) aria-invalid=[error.as_ref().map(|_| "true")]
                        aria-describedby="f-threshold-error";
                    (err("f-threshold-error", &error))
                }
                button type="submit" { "Save threshold" }
            }
        }
    }
}

fn endpoint_created(e: &EndpointView, secret: &str) -> Markup {
    secret_once(
        "new-secret",
        &format!("Signing secret of {}", e.url),
        "secret",
        secret,
        html! {
            p.muted { "Check each delivery's " code { "Keymeter-Signature" } " header with it: "
                "HMAC-SHA256 of " code { "<t>.<body>" } " keyed with the whole secret — see "
                a href="/docs" { "the API reference" } "." }
        },
    )
}

fn webhooks_section(
    owner: &Owner,
    state: &AppState,
    list: &[EndpointView],
    form: &WebhookForm,
) -> Markup {
    let sender = &state.event_sender;
    let on = sender.signing_key().is_some();
    let max = sender.settings().max_endpoints;
    html! {
        section.card #webhooks aria-labelledby="webhooks-title" {
            h2 #webhooks-title { "Webhook endpoints" }
            @if let Some((e, secret)) = &form.created {
                (endpoint_created(e, secret))
            }
            (notices(&form.top))
            @if !on {
                p { "Webhook endpoints are off on this server (no " code { "KEYMETER_EVENT_SIGNING_KEY" } " is configured)." }
            }
            @if list.is_empty() {
                p { "No endpoints yet." }
            } @else {
                div.table-wrap {
                    table #endpoints {
                        thead { tr {
                            th scope="col" { "URL" } th scope="col" { "Events" } th scope="col" { "Created" }
                            th scope="col" { "Actions" }
                        } }
                        tbody {
                            @for e in list {
                                tr data-endpoint=(e.id) {
                                    td.url { (e.url) }
                                    td { (e.events.join(", ")) }
                                    td { (time(e.created_at)) }
                                    td.actions {
                                        a.button.secondary href={(BASE) "/settings/webhooks/" (e.id)} { "Deliveries and secret" }
                                        " "
                                        a.button.danger href={(BASE) "/settings/webhooks/" (e.id) "/delete"} { "Delete…" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            @if on {
                h3 { "Add an endpoint" }
                p.muted { "keymeter POSTs each chosen event to the URL, signed, retrying for a day. "
                    "At most " (thousands(max)) " endpoints." }
                form #webhook-form method="post" action={(BASE) "/settings/webhooks#webhooks"} novalidate {
                    input type="hidden" name="csrf" value=(owner.csrf());
                    div.field {
                        label for="f-url" { "URL" }
                        input #f-url name="url" type="url" inputmode="url" autocomplete="off" maxlength="2048"
                            placeholder="https://example.com/keymeter-events" value=(form.url)
                            aria-invalid=[form.url_error.as_ref().map(|_| "true")] aria-describedby="f-url-error";
                        (err("f-url-error", &form.url_error))
                    }
                    fieldset.field aria-describedby="f-events-error" {
                        legend { "Events" }
                        div.event-grid {
                            @for t in EventType::ALL {
                                div.check {
                                    input id=(event_field_id(t)) type="checkbox" name="event" value=(t.as_str())
                                        checked[form.events.iter().any(|e| e == t.as_str())];
                                    label for=(event_field_id(t)) { code { (t.as_str()) } }
                                }
                            }
                        }
                        (err("f-events-error", &form.events_error))
                    }
                    button type="submit" { "Add endpoint" }
                }
            }
        }
    }
}

/// The whole settings page, with `m`'s messages.
pub async fn render(
    req: &HttpRequest,
    owner: &Owner,
    status: StatusCode,
    m: Messages,
) -> Result<HttpResponse> {
    let state = state(req)?;
    let client = state.db.get().await.map_err(crate::db::Error::from)?;
    let alert = alerts::get(&client, &state.tiers, owner.account.id)
        .await
        .map_err(|e| ConsoleError::Internal(anyhow::Error::new(e)))?;
    let mut list = endpoints::list(&client, owner.account.id, ENDPOINTS_LISTED, None)
        .await
        .map_err(internal)?;
    list.truncate(ENDPOINTS_LISTED as usize);
    let body = html! {
        h1 { "Settings" }
        (notices(&m.password.top))
        (account_section(owner, &state))
        (alerts_section(owner, &alert, &m.alerts, m.threshold.as_ref()))
        (webhooks_section(owner, &state, &list, &m.webhook))
        (password_section(owner, &m.password))
    };
    Ok(respond(
        status,
        page("Settings", Some(owner), Nav::Settings, body),
    ))
}

fn internal(e: EndpointError) -> ConsoleError {
    ConsoleError::Internal(anyhow::Error::new(e))
}

#[derive(Deserialize)]
pub struct SettingsQuery {
    done: Option<String>,
}

/// `GET /console/settings`
pub async fn settings(
    req: HttpRequest,
    owner: Owner,
    q: web::Query<SettingsQuery>,
) -> Result<HttpResponse> {
    let top = match q.done.as_deref() {
        Some("webhook-deleted") => vec![Notice::Ok(
            "The endpoint was deleted; nothing more is sent to it.".into(),
        )],
        _ => vec![],
    };
    render(
        &req,
        &owner,
        StatusCode::OK,
        Messages {
            webhook: WebhookForm {
                top,
                ..WebhookForm::default()
            },
            ..Messages::default()
        },
    )
    .await
}

#[derive(Deserialize)]
pub struct ThresholdForm {
    #[serde(default)]
    threshold: String,
}

/// `POST /console/settings/alerts`: empty follows the tier's default again.
pub async fn save_threshold(
    req: HttpRequest,
    owner: Owner,
    form: Posted<ThresholdForm>,
) -> Result<HttpResponse> {
    let state = state(&req)?;
    let Posted(f) = form;
    let refused = |msg: String| Messages {
        alerts: vec![Notice::Error("The threshold was not changed.".into())],
        threshold: Some((f.threshold.clone(), msg)),
        ..Messages::default()
    };
    let threshold = match parse_whole(&f.threshold) {
        Ok(t) => t,
        Err(_) => {
            let m = refused("Enter a whole number of credits, or leave it empty.".into());
            return render(&req, &owner, StatusCode::UNPROCESSABLE_ENTITY, m).await;
        }
    };
    let client = state.db.get().await.map_err(crate::db::Error::from)?;
    match alerts::set(&client, &state.tiers, owner.account.id, threshold).await {
        Ok(a) => {
            let msg = match a.low_balance_threshold_source {
                "tier" => format!(
                    "The threshold follows your tier's default again: {} credits.",
                    thousands(a.low_balance_threshold)
                ),
                _ => format!(
                    "The low-balance threshold is now {} credits.",
                    thousands(a.low_balance_threshold)
                ),
            };
            let m = Messages {
                alerts: vec![Notice::Ok(msg)],
                ..Messages::default()
            };
            render(&req, &owner, StatusCode::OK, m).await
        }
        Err(crate::credits::Error::ThresholdOutOfRange) => {
            let m = refused(format!(
                "Enter 0 to {} credits.",
                thousands(alerts::MAX_THRESHOLD)
            ));
            render(&req, &owner, StatusCode::UNPROCESSABLE_ENTITY, m).await
        }
        Err(e) => Err(ConsoleError::Internal(anyhow::Error::new(e))),
    }
}

/// `POST /console/settings/webhooks`: the fields as pairs, since `event` repeats (one per
/// ticked box).
pub async fn create_webhook(
    req: HttpRequest,
    owner: Owner,
    form: Posted<Vec<(String, String)>>,
) -> Result<HttpResponse> {
    let state = state(&req)?;
    let Posted(pairs) = form;
    let mut w = WebhookForm::default();
    for (k, v) in pairs {
        match k.as_str() {
            "url" => w.url = v,
            "event" => w.events.push(v),
            _ => {}
        }
    }
    let sender = &state.event_sender;
    let url = endpoints::check_url(sender.guard(), &w.url).await;
    let events = endpoints::parse_events(&w.events);
    let (url, events) = match (url, events) {
        (Ok(url), Ok(events)) => (url, events),
        (url, events) => {
            if let Err(e) = url {
                place(&mut w, e)?;
            }
            if let Err(e) = events {
                place(&mut w, e)?;
            }
            return webhook_refused(&req, &owner, w).await;
        }
    };
    let created = endpoints::create(
        &state.db,
        sender.signing_key(),
        sender.settings().max_endpoints,
        owner.account.id,
        &url,
        &events,
    )
    .await;
    match created {
        Ok(c) => {
            let m = Messages {
                webhook: WebhookForm {
                    created: Some((c.endpoint, c.secret)),
                    ..WebhookForm::default()
                },
                ..Messages::default()
            };
            render(&req, &owner, StatusCode::OK, m).await
        }
        Err(e) => {
            place(&mut w, e)?;
            webhook_refused(&req, &owner, w).await
        }
    }
}

async fn webhook_refused(
    req: &HttpRequest,
    owner: &Owner,
    mut w: WebhookForm,
) -> Result<HttpResponse> {
    w.top.insert(
        0,
        Notice::Error("The endpoint was not added; see the form below.".into()),
    );
    let m = Messages {
        webhook: w,
        ..Messages::default()
    };
    render(req, owner, StatusCode::UNPROCESSABLE_ENTITY, m).await
}

/// Puts an endpoint refusal by the field it is about, or at the section's top.
fn place(w: &mut WebhookForm, e: EndpointError) -> Result<()> {
    match e {
        EndpointError::BadUrl => {
            w.url_error =
                Some("Enter an http:// or https:// address of at most 2,048 characters.".into())
        }
        EndpointError::UrlNotAllowed(_) => {
            w.url_error = Some(format!("{}.", capitalise_first(&e.to_string())))
        }
        EndpointError::NoEvents | EndpointError::UnknownEvent { .. } => {
            w.events_error = Some("Choose at least one event.".into())
        }
        EndpointError::Off | EndpointError::LimitReached { .. } => {
            w.top.push(Notice::Error(e.to_string()))
        }
        EndpointError::NotFound => return Err(ConsoleError::NotFound),
        EndpointError::Db(e) => return Err(ConsoleError::from(e)),
    }
    Ok(())
}

fn capitalise_first(s: &str) -> String {
    let s = s.strip_prefix("url: ").unwrap_or(s);
    let s = s.trim_end_matches('.');
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

/// One of the account's endpoints, or the console's 404.
async fn endpoint_of(state: &AppState, owner: &Owner, id: &str) -> Result<EndpointView> {
    let client = state.db.get().await.map_err(crate::db::Error::from)?;
    match endpoints::get(&client, owner.account.id, id).await {
        Ok(e) => Ok(e),
        Err(EndpointError::NotFound) => Err(ConsoleError::NotFound),
        Err(e) => Err(internal(e)),
    }
}

/// An endpoint's page: what it receives, its secret's rotation, its newest deliveries.
async fn endpoint_page(
    state: &AppState,
    owner: &Owner,
    e: &EndpointView,
    top: Markup,
) -> Result<HttpResponse> {
    let client = state.db.get().await.map_err(crate::db::Error::from)?;
    let mut deliveries =
        reads::list_deliveries(&client, owner.account.id, &e.id, None, DELIVERIES_LISTED)
            .await
            .map_err(internal)?;
    deliveries.truncate(DELIVERIES_LISTED as usize);
    let body = html! {
        h1 { "Webhook endpoint" }
        (top)
        section.card {
            dl.facts {
                dt { "Id" } dd { code { (e.id) } }
                dt { "URL" } dd.url { (e.url) }
                dt { "Events" } dd { (e.events.join(", ")) }
                dt { "Created" } dd { (time(e.created_at)) }
                @if let Some(t) = e.previous_secret_expires_at {
                    dt { "Previous secret" } dd { "still signs until " (time(t)) }
                }
            }
            form.inline method="post" action={(BASE) "/settings/webhooks/" (e.id) "/rotate"} {
                input type="hidden" name="csrf" value=(owner.csrf());
                button.secondary type="submit" { "Rotate the signing secret" }
            }
            " "
            a.button.danger href={(BASE) "/settings/webhooks/" (e.id) "/delete"} { "Delete…" }
            p.muted { "After a rotation the old secret keeps signing for "
                (endpoints::ROTATION_OVERLAP_HOURS) " hours (both signatures are sent), so your receiver can switch without losing a delivery." }
        }
        section.card {
            h2 { "Deliveries" }
            @if deliveries.is_empty() {
                p { "Nothing was sent to this endpoint yet." }
            } @else {
                div.table-wrap {
                    table #deliveries {
                        thead { tr {
                            th scope="col" { "Created" } th scope="col" { "Event" } th scope="col" { "Status" }
                            th.num scope="col" { "Attempts" } th scope="col" { "Last answer" } th scope="col" { "Delivered / next try" }
                        } }
                        tbody {
                            @for d in &deliveries {
                                tr {
                                    td { (time(d.created_at)) }
                                    td { code { (d.event_type) } br; span.muted { (d.event_id) } }
                                    td { span class={"state " (match d.status { "delivered" => "succeeded", "failed" => "failed", _ => "queued" })} { (d.status) } }
                                    td.num { (thousands(d.attempts.into())) }
                                    td {
                                        @if let Some(c) = d.last_response_code { "HTTP " (c) }
                                        @if let Some(e) = &d.last_error { " " span.muted { (e) } }
                                    }
                                    td { @if d.delivered_at.is_some() { (maybe_time(d.delivered_at)) } @else { (maybe_time(d.next_attempt_at)) } }
                                }
                            }
                        }
                    }
                }
                @if deliveries.len() as i64 >= DELIVERIES_LISTED {
                    p.muted { "The newest " (DELIVERIES_LISTED) " are shown; " code { "GET /v1/webhook-endpoints/" (e.id) "/deliveries" } " pages through all." }
                }
            }
        }
        p { a href={(BASE) "/settings#webhooks"} { "Back to settings" } }
    };
    Ok(respond(
        StatusCode::OK,
        page("Webhook endpoint", Some(owner), Nav::Settings, body),
    ))
}

/// `GET /console/settings/webhooks/{id}`
pub async fn webhook(
    req: HttpRequest,
    owner: Owner,
    id: web::Path<String>,
) -> Result<HttpResponse> {
    let state = state(&req)?;
    let e = endpoint_of(&state, &owner, &id).await?;
    endpoint_page(&state, &owner, &e, html! {}).await
}

/// `POST /console/settings/webhooks/{id}/rotate`: the new secret, shown once.
pub async fn rotate_webhook(
    req: HttpRequest,
    owner: Owner,
    id: web::Path<String>,
    _: Posted<NoFields>,
) -> Result<HttpResponse> {
    let state = state(&req)?;
    let client = state.db.get().await.map_err(crate::db::Error::from)?;
    let rotated = endpoints::rotate_secret(
        &client,
        state.event_sender.signing_key(),
        owner.account.id,
        &id,
    )
    .await;
    match rotated {
        Ok(r) => {
            let top = html! {
                (notices(&[Notice::Ok(format!(
                    "Rotated. The previous secret keeps signing for {} hours.",
                    endpoints::ROTATION_OVERLAP_HOURS
                ))]))
                (endpoint_created(&r.endpoint, &r.secret))
            };
            endpoint_page(&state, &owner, &r.endpoint, top).await
        }
        Err(EndpointError::NotFound) => Err(ConsoleError::NotFound),
        Err(EndpointError::Off) => {
            let e = endpoint_of(&state, &owner, &id).await?;
            let top = notices(&[Notice::Error(EndpointError::Off.to_string())]);
            endpoint_page(&state, &owner, &e, top).await
        }
        Err(e) => Err(internal(e)),
    }
}

/// `GET /console/settings/webhooks/{id}/delete`: the confirmation, as its own page.
pub async fn confirm_delete_webhook(
    req: HttpRequest,
    owner: Owner,
    id: web::Path<String>,
) -> Result<HttpResponse> {
    let state = state(&req)?;
    let e = endpoint_of(&state, &owner, &id).await?;
    Ok(confirm_page(
        &owner,
        Confirm {
            title: "Delete webhook endpoint",
            heading: html! { "Delete this endpoint?" },
            message: html! {
                "keymeter stops sending events to " strong.url { (e.url) } ", and its pending deliveries "
                "are dropped (one being sent right now may still arrive). This cannot be undone."
            },
            action: format!("{BASE}/settings/webhooks/{}/delete", e.id),
            button: "Delete the endpoint",
            cancel: format!("{BASE}/settings#webhooks"),
            nav: Nav::Settings,
        },
    ))
}

/// `POST /console/settings/webhooks/{id}/delete`
pub async fn delete_webhook(
    req: HttpRequest,
    owner: Owner,
    id: web::Path<String>,
    _: Posted<NoFields>,
) -> Result<HttpResponse> {
    let state = state(&req)?;
    let client = state.db.get().await.map_err(crate::db::Error::from)?;
    match endpoints::delete(&client, owner.account.id, &id).await {
        Ok(()) => Ok(see_other(&format!(
            "{BASE}/settings?done=webhook-deleted#webhooks"
        ))),
        Err(EndpointError::NotFound) => Err(ConsoleError::NotFound),
        Err(e) => Err(internal(e)),
    }
}
