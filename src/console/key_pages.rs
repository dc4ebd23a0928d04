//! The keys page: list (with each key's own rate and spend limits), create (name, scopes,
//! expiry, the per-key rate and spend limits; the key shown once), revoke (after a
//! confirmation page) and rotate (with a grace period) — through `auth::key_actions`, as `/v1/keys` does, with the
//! owner's power and the console as the audit trail's actor.

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use chrono::{NaiveDate, Utc};
use maud::{html, Markup};
use serde::Deserialize;

use super::format::{maybe_time, parse_whole, thousands, time};
use super::layout::{confirm_page, notices, page, respond, secret_once, Confirm, Nav, Notice};
use super::{see_other, state, ConsoleError, Owner, Posted, Result, BASE};
use crate::auth::key_actions;
use crate::auth::key_store::{KeySpec, KeyView, MAX_GRACE_SECONDS};
use crate::auth::Error as KeyError;
use crate::credits::key_caps::{Period, SpendLimit};

/// How many keys the page lists (the newest); the API pages through the rest.
const LIST_LIMIT: i64 = 100;

/// The whole key, once (see [`secret_once`]): keymeter keeps only its digest.
pub fn shown_once(key: &str, name: &str) -> Markup {
    secret_once(
        "new-key",
        &format!("Your new key “{name}”"),
        "key",
        key,
        html! {
            p.muted { "Use it as " code { "Authorization: Bearer <key>" } " or " code { "X-API-Key: <key>" } "." }
        },
    )
}

fn state_of(k: &KeyView) -> (&'static str, Markup) {
    let now = Utc::now();
    if k.revoked_at.is_some() {
        return ("revoked", html! { "revoked" });
    }
    if let Some(next) = &k.rotated_to {
        return match k.grace_until {
            Some(until) if until > now => (
                "grace",
                html! { "rotated to " code { (next) } ", works until " (time(until)) },
            ),
            _ => ("revoked", html! { "rotated to " code { (next) } }),
        };
    }
    match k.expires_at {
        Some(t) if t <= now => ("revoked", html! { "expired" }),
        _ => ("active", html! { "active" }),
    }
}

/// Messages for the create form, by field.
#[derive(Default)]
struct CreateErrors {
    top: Vec<Notice>,
    name: Option<String>,
    scopes: Option<String>,
    expires: Option<String>,
    rate: Option<String>,
    spend: Option<String>,
}

fn create_form(owner: &Owner, errors: &CreateErrors, max_rpm: Option<u32>) -> Markup {
    let err = |id: &str, e: &Option<String>| {
        html! { @if let Some(m) = e { p.field-error id=(id) { (m) } } }
    };
    html! {
        section.card #create {
            h2 { "Create a key" }
            (notices(&errors.top))
            form method="post" action={(BASE) "/keys"} novalidate {
                input type="hidden" name="csrf" value=(owner.csrf());
                div.field {
                    label for="f-name" { "Name" }
                    input #f-name name="name" type="text" maxlength="100" placeholder="production server"
                        aria-describedby="f-name-error";
                    (err("f-name-error", &errors.name))
                }
                fieldset.field aria-describedby="f-scopes-error" {
                    legend { "Scopes" }
                    @for (field, scope, checked, what) in [
                        ("scope_scrape", "scrape", true, "run scrape jobs and metered charges"),
                        ("scope_read", "read", true, "read the account, keys, usage and jobs"),
                        ("scope_keys_manage", "keys:manage", false, "create, revoke and rotate keys"),
                        ("scope_billing", "billing", false, "open Stripe Checkout and the portal"),
                    ] {
                        div.check {
                            @if checked {
                                input id={"f-" (field)} type="checkbox" name=(field) value="on" checked;
                            } @else {
                                input id={"f-" (field)} type="checkbox" name=(field) value="on";
                            }
                            label for={"f-" (field)} { code { (scope) } " — " (what) }
                        }
                    }
                    (err("f-scopes-error", &errors.scopes))
                }
                div.field {
                    label for="f-expires" { "Expires on (UTC, optional)" }
                    input #f-expires name="expires_on" type="date" aria-describedby="f-expires-error";
                    (err("f-expires-error", &errors.expires))
                }
                div.field {
                    label for="f-rate" {
                        "Own rate limit, requests per minute (optional"
                        @if let Some(m) = max_rpm { ", at most " (thousands(m.into())) }
                        ")"
                    }
                    input #f-rate name="rate_limit" type="number" min="1" inputmode="numeric"
                        aria-describedby="f-rate-error";
                    (err("f-rate-error", &errors.rate))
                }
                fieldset.field aria-describedby="f-spend-error" {
                    legend { "Own spend limit (optional)" }
                    p.muted.hint { "Charges past it are refused with " code { "402" } ", whatever the balance. "
                        "Periods are UTC calendar days or months." }
                    div.inline-fields {
                        div {
                            label for="f-spend" { "Credits" }
                            input #f-spend name="spend_credits" type="text" inputmode="numeric"
                                autocomplete="off" aria-describedby="f-spend-error";
                        }
                        div {
                            label for="f-spend-period" { "per" }
                            select #f-spend-period name="spend_period" {
                                option value="day" selected { "day" }
                                option value="month" { "month" }
                            }
                        }
                    }
                    (err("f-spend-error", &errors.spend))
                }
                button type="submit" { "Create key" }
            }
        }
    }
}

/// A key's own limits: its rate, and its spend with what it spent in the current period.
fn limits(k: &KeyView) -> Markup {
    html! {
        @if k.rate_limit.is_none() && k.spend_limit.is_none() {
            span.muted { "the account's" }
        }
        @if let Some(r) = k.rate_limit {
            span.limit { (thousands(r.into())) " requests/min" }
        }
        @if let Some(s) = &k.spend_limit {
            span.limit.spend {
                (thousands(s.credits)) " credits per " (s.period.as_str())
                span.muted { " (" (thousands(s.spent)) " spent, resets " (time(s.resets_at)) ")" }
            }
        }
    }
}

fn keys_table(owner: &Owner, keys: &[KeyView]) -> Markup {
    html! {
        section.card {
            h2 { "Your keys" }
            @if keys.is_empty() {
                p { "No keys yet." }
            } @else {
                div.table-wrap {
                    table {
                        thead { tr {
                            th scope="col" { "Name" } th scope="col" { "Key" } th scope="col" { "Scopes" }
                            th scope="col" { "Created" } th scope="col" { "Last used" }
                            th scope="col" { "Expires" } th scope="col" { "Limits" }
                            th scope="col" { "State" } th scope="col" { "Actions" }
                        } }
                        tbody {
                            @for k in keys {
                                @let (class, label) = state_of(k);
                                tr data-key=(k.id) {
                                    td { (k.name) }
                                    td { code { "km_live_" (k.id) "_…" } }
                                    td { (k.scopes.join(", ")) }
                                    td { (time(k.created_at)) }
                                    td { (maybe_time(k.last_used_at)) }
                                    td { (maybe_time(k.expires_at)) }
                                    td.limits { (limits(k)) }
                                    td { span class={"state " (class)} { (label) } }
                                    td.actions {
                                        @if class == "active" {
                                            form.inline method="post" action={(BASE) "/keys/" (k.id) "/rotate"} {
                                                input type="hidden" name="csrf" value=(owner.csrf());
                                                label for={"grace-" (k.id)} { "Old key works for" }
                                                select id={"grace-" (k.id)} name="grace_seconds" {
                                                    option value="0" { "no grace" }
                                                    option value="3600" selected { "1 hour" }
                                                    option value="86400" { "24 hours" }
                                                }
                                                button type="submit" { "Rotate" }
                                            }
                                            a.button.danger href={(BASE) "/keys/" (k.id) "/revoke"} { "Revoke…" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                @if keys.len() as i64 >= LIST_LIMIT {
                    p.muted { "The newest " (LIST_LIMIT) " keys are shown; " code { "GET /v1/keys" } " pages through all." }
                }
            }
        }
    }
}

async fn render(
    req: &HttpRequest,
    owner: &Owner,
    status: StatusCode,
    top: Markup,
    errors: &CreateErrors,
) -> Result<HttpResponse> {
    let state = state(req)?;
    let mut keys = key_actions::list(&state.db, owner.account.id, LIST_LIMIT, None).await?;
    keys.truncate(LIST_LIMIT as usize);
    let tier = state.tiers.get_or_default(&owner.account.tier);
    let max_rpm = (!tier.unlimited).then_some(tier.requests_per_minute);
    let body = html! {
        h1 { "API keys" }
        (top)
        (keys_table(owner, &keys))
        (create_form(owner, errors, max_rpm))
    };
    Ok(respond(status, page("Keys", Some(owner), Nav::Keys, body)))
}

#[derive(Deserialize)]
pub struct Done {
    done: Option<String>,
}

/// `GET /console/keys`
pub async fn list(req: HttpRequest, owner: Owner, q: web::Query<Done>) -> Result<HttpResponse> {
    let top = match q.done.as_deref() {
        Some("revoked") => notices(&[Notice::Ok(
            "The key was revoked. Every instance refuses it within a second.".into(),
        )]),
        _ => html! {},
    };
    render(&req, &owner, StatusCode::OK, top, &CreateErrors::default()).await
}

#[derive(Deserialize)]
pub struct NewKeyForm {
    #[serde(default)]
    name: String,
    scope_scrape: Option<String>,
    scope_read: Option<String>,
    scope_keys_manage: Option<String>,
    scope_billing: Option<String>,
    #[serde(default)]
    expires_on: String,
    #[serde(default)]
    rate_limit: String,
    #[serde(default)]
    spend_credits: String,
    #[serde(default)]
    spend_period: String,
}

/// `POST /console/keys`: the new key is on the answer itself (not behind a redirect), so it
/// never sits in a URL or the history.
pub async fn create(
    req: HttpRequest,
    owner: Owner,
    form: Posted<NewKeyForm>,
) -> Result<HttpResponse> {
    let state = state(&req)?;
    let Posted(f) = form;
    let mut errors = CreateErrors::default();
    let scopes: Vec<String> = [
        (&f.scope_scrape, "scrape"),
        (&f.scope_read, "read"),
        (&f.scope_keys_manage, "keys:manage"),
        (&f.scope_billing, "billing"),
    ]
    .into_iter()
    .filter(|(on, _)| on.is_some())
    .map(|(_, s)| s.to_owned())
    .collect();
    let expires_at = match f.expires_on.trim() {
        "" => None,
        d => match NaiveDate::parse_from_str(d, "%Y-%m-%d")
            .ok()
            .and_then(|d| d.and_hms_opt(0, 0, 0))
        {
            Some(t) => Some(t.and_utc()),
            None => {
                errors.expires = Some("Enter a date like 2027-01-31.".into());
                None
            }
        },
    };
    let rate_limit = match f.rate_limit.trim() {
        "" => None,
        r => match r.parse::<i64>() {
            Ok(n) => Some(n),
            Err(_) => {
                errors.rate = Some("Enter a whole number of requests per minute.".into());
                None
            }
        },
    };
    let spend_limit = match (
        parse_whole(&f.spend_credits),
        Period::parse(f.spend_period.trim()),
    ) {
        (Ok(None), _) => None,
        (Ok(Some(credits)), Some(period)) => Some(SpendLimit { credits, period }),
        (Ok(Some(_)), None) => {
            errors.spend = Some("Choose a day or a month.".into());
            None
        }
        (Err(_), _) => {
            errors.spend = Some("Enter a whole number of credits, or leave it empty.".into());
            None
        }
    };
    let name = match f.name.trim() {
        "" => None,
        n => Some(n.to_owned()),
    };
    if errors.expires.is_none() && errors.rate.is_none() && errors.spend.is_none() {
        let created = match KeySpec::parse(name, Some(scopes), expires_at) {
            Ok(spec) => {
                key_actions::create_by(
                    &state.db,
                    &state.tiers,
                    &owner.as_caller(),
                    &owner.actor,
                    spec,
                    rate_limit,
                    spend_limit,
                )
                .await
            }
            Err(e) => Err(e),
        };
        match created {
            Ok(key) => {
                return render(
                    &req,
                    &owner,
                    StatusCode::OK,
                    shown_once(&key.key, &key.view.name),
                    &CreateErrors::default(),
                )
                .await;
            }
            Err(e) => place(&mut errors, e)?,
        }
    }
    render(
        &req,
        &owner,
        StatusCode::UNPROCESSABLE_ENTITY,
        html! { p.notice.error role="alert" { "The key was not created; see the form below." } },
        &errors,
    )
    .await
}

/// Puts a key refusal by the field it is about, or at the top.
fn place(errors: &mut CreateErrors, e: KeyError) -> Result<()> {
    let msg = e.to_string();
    match e {
        KeyError::InvalidName => errors.name = Some(msg),
        KeyError::UnknownScope(_) | KeyError::NoScopes => {
            errors.scopes = Some("Choose at least one scope.".into())
        }
        KeyError::ExpiryNotInFuture => errors.expires = Some("Choose a date in the future.".into()),
        KeyError::RateLimitOutOfRange { max } => {
            errors.rate = Some(format!(
                "Enter 1 to {} requests per minute.",
                thousands(max)
            ))
        }
        KeyError::Credits(crate::credits::Error::SpendLimitOutOfRange) => {
            errors.spend = Some(format!(
                "Enter 1 to {} credits, or leave it empty for no limit.",
                thousands(crate::credits::key_caps::MAX_LIMIT)
            ))
        }
        KeyError::KeyLimitReached { .. } => errors.top.push(Notice::Error(msg)),
        KeyError::Db(e) => return Err(ConsoleError::from(e)),
        other => errors.top.push(Notice::Error(other.to_string())),
    }
    Ok(())
}

/// `GET /console/keys/{id}/revoke`: the confirmation, as its own page so it needs no script.
pub async fn confirm_revoke(
    req: HttpRequest,
    owner: Owner,
    id: web::Path<String>,
) -> Result<HttpResponse> {
    let state = state(&req)?;
    let key = match key_actions::get(&state.db, owner.account.id, &id).await {
        Ok(k) => k,
        Err(KeyError::KeyNotFound) => return Err(ConsoleError::NotFound),
        Err(e) => return Err(ConsoleError::Internal(anyhow::Error::new(e))),
    };
    Ok(confirm_page(
        &owner,
        Confirm {
            title: "Revoke key",
            heading: html! { "Revoke “" (key.name) "”?" },
            message: html! {
                "Key " code { "km_live_" (key.id) "_…" } " will stop working on every instance within a second. "
                "Programs using it will get " code { "401 invalid_api_key" } ". This cannot be undone."
            },
            action: format!("{BASE}/keys/{}/revoke", key.id),
            button: "Revoke the key",
            cancel: format!("{BASE}/keys"),
            nav: Nav::Keys,
        },
    ))
}

#[derive(Deserialize)]
pub struct NoFields {}

/// `POST /console/keys/{id}/revoke`
pub async fn revoke(
    req: HttpRequest,
    owner: Owner,
    id: web::Path<String>,
    _: Posted<NoFields>,
) -> Result<HttpResponse> {
    let state = state(&req)?;
    match key_actions::revoke_by(
        &state.db,
        &state.auth.cache,
        &owner.as_caller(),
        &owner.actor,
        &id,
    )
    .await
    {
        Ok(_) => Ok(see_other(&format!("{BASE}/keys?done=revoked"))),
        Err(KeyError::KeyNotFound) => Err(ConsoleError::NotFound),
        Err(e) => Err(ConsoleError::Internal(anyhow::Error::new(e))),
    }
}

#[derive(Deserialize)]
pub struct RotateForm {
    #[serde(default)]
    grace_seconds: String,
}

/// `POST /console/keys/{id}/rotate`: the successor, shown once.
pub async fn rotate(
    req: HttpRequest,
    owner: Owner,
    id: web::Path<String>,
    form: Posted<RotateForm>,
) -> Result<HttpResponse> {
    let state = state(&req)?;
    let grace = form
        .0
        .grace_seconds
        .trim()
        .parse::<i64>()
        .ok()
        .filter(|g| (0..=MAX_GRACE_SECONDS).contains(g));
    let Some(grace) = grace else {
        let top = notices(&[Notice::Error(format!(
            "Choose a grace period between 0 and {} seconds.",
            thousands(MAX_GRACE_SECONDS)
        ))]);
        return render(
            &req,
            &owner,
            StatusCode::UNPROCESSABLE_ENTITY,
            top,
            &CreateErrors::default(),
        )
        .await;
    };
    let rotated = key_actions::rotate_by(
        &state.db,
        &state.auth.cache,
        &owner.as_caller(),
        &owner.actor,
        &id,
        Some(grace),
    )
    .await;
    match rotated {
        Ok(key) => {
            let top = html! {
                (notices(&[Notice::Ok(format!(
                    "Rotated. The old key works for {} more second(s).", thousands(grace)
                ))]))
                (shown_once(&key.key, &key.view.name))
            };
            render(&req, &owner, StatusCode::OK, top, &CreateErrors::default()).await
        }
        Err(KeyError::KeyNotFound) => Err(ConsoleError::NotFound),
        Err(KeyError::Db(e)) => Err(ConsoleError::from(e)),
        Err(e) => {
            let top = notices(&[Notice::Error(e.to_string())]);
            render(
                &req,
                &owner,
                StatusCode::CONFLICT,
                top,
                &CreateErrors::default(),
            )
            .await
        }
    }
}
