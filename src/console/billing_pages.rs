//! The billing page: the current tier and plan, the packs and plans on sale (each a form that
//! opens a Stripe Checkout Session through `billing::checkout` and redirects the browser to
//! it), the purchase and clawback history (`billing::summary`), the Stripe customer portal
//! (`billing::portal`), and auto-recharge (`billing::auto_recharge`, with a card saved through
//! a `setup` Checkout Session, `billing::setup_checkout`). Credits arrive through Stripe's webhook, as for the API.

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use maud::{html, Markup};
use serde::Deserialize;

use super::format::{maybe_time, parse_whole, thousands, time};
use super::layout::{notices, page, respond, Nav, Notice};
use super::{state, ConsoleError, NoFields, Owner, Posted, Result, BASE};
use crate::billing::{self, auto_recharge, Checkout, Error as BillingError};
use crate::startup::AppState;

/// This console's own address as the browser reached it, for Stripe's return URLs.
fn origin(req: &HttpRequest) -> String {
    let info = req.connection_info();
    format!("{}://{}", info.scheme(), info.host())
}

/// The auto-recharge form as posted, with its messages (empty when the page shows the stored
/// settings).
#[derive(Default)]
struct RechargeForm {
    /// The posted values, shown again on a refusal; `None`: show the stored settings.
    posted: Option<RechargeFields>,
    top: Vec<Notice>,
    threshold: Option<String>,
    pack: Option<String>,
    max: Option<String>,
}

fn recharge_section(
    owner: &Owner,
    settings: &crate::config::BillingSettings,
    ar: &auto_recharge::Settings,
    form: &RechargeForm,
) -> Markup {
    let err = |id: &str, e: &Option<String>| {
        html! { @if let Some(m) = e { p.field-error id=(id) { (m) } } }
    };
    let (enabled, threshold, pack, max) = match &form.posted {
        Some(p) => (
            p.enabled.is_some(),
            p.threshold.clone(),
            p.pack.clone(),
            p.max_per_month.clone(),
        ),
        None => (
            ar.enabled,
            ar.threshold.map(thousands).unwrap_or_default(),
            ar.pack.clone().unwrap_or_default(),
            ar.max_per_month
                .map(|m| thousands(m.into()))
                .unwrap_or_else(|| "4".into()),
        ),
    };
    html! {
        section.card #auto-recharge aria-labelledby="ar-title" {
            h2 #ar-title { "Auto-recharge" }
            p.muted { "When a charge leaves the balance below the threshold, keymeter buys the chosen pack "
                "with your saved card, at most this many times a calendar month (UTC) and at most "
                "once every 10 minutes." }
            (notices(&form.top))
            dl.facts {
                dt { "State" } dd #ar-state {
                    @if ar.enabled { span.state.active { "on" } } @else { span.state { "off" } }
                    @if ar.in_flight { " — a recharge is being paid" }
                }
                dt { "Card" } dd #ar-card {
                    @if ar.payment_method_saved { "saved for off-session payments" }
                    @else { "none saved yet" }
                }
                @if let Some(why) = &ar.disabled_reason {
                    dt { "Turned off" } dd { (why) " " (maybe_time(ar.disabled_at)) }
                }
                dt { "This month" } dd { (thousands(ar.recharges_this_month.into())) " recharge(s)"
                    @if let Some(t) = ar.last_started_at { ", the last " (time(t)) } }
            }
            @if !ar.payment_method_saved {
                form.setup-card method="post" action={(BASE) "/billing/auto-recharge/setup"} {
                    input type="hidden" name="csrf" value=(owner.csrf());
                    p { "Auto-recharge needs a card saved with Stripe. Buying a pack saves its card too. " }
                    button.secondary type="submit" { "Save a card with Stripe" }
                }
            }
            form #ar-form method="post" action={(BASE) "/billing/auto-recharge#auto-recharge"} novalidate {
                input type="hidden" name="csrf" value=(owner.csrf());
                div.field.check {
                    input #ar-enabled type="checkbox" name="enabled" value="on" checked[enabled];
                    label for="ar-enabled" { "Recharge automatically" }
                }
                div.field {
                    label for="ar-threshold" { "When the balance is below (credits)" }
                    input #ar-threshold name="threshold" type="text" inputmode="numeric" value=(threshold)
                        aria-invalid=[form.threshold.as_ref().map(|_| "true")] aria-describedby="ar-threshold-error";
                    (err("ar-threshold-error", &form.threshold))
                }
                div.field {
                    label for="ar-pack" { "Buy the pack" }
                    select #ar-pack name="pack" aria-describedby="ar-pack-error" {
                        @for p in &settings.packs {
                            option value=(p.name) selected[p.name == pack] { (p.name) " — " (thousands(p.credits)) " credits" }
                        }
                    }
                    (err("ar-pack-error", &form.pack))
                }
                div.field {
                    label for="ar-max" { "At most, per month" }
                    input #ar-max name="max_per_month" type="text" inputmode="numeric" value=(max)
                        aria-invalid=[form.max.as_ref().map(|_| "true")] aria-describedby="ar-max-error";
                    (err("ar-max-error", &form.max))
                }
                button type="submit" { "Save auto-recharge" }
            }
        }
    }
}

async fn render(
    owner: &Owner,
    state: &AppState,
    status: StatusCode,
    top: Vec<Notice>,
) -> Result<HttpResponse> {
    render_with(owner, state, status, top, &RechargeForm::default()).await
}

async fn render_with(
    owner: &Owner,
    state: &AppState,
    status: StatusCode,
    top: Vec<Notice>,
    recharge: &RechargeForm,
) -> Result<HttpResponse> {
    let client = state.db.get().await.map_err(crate::db::Error::from)?;
    let summary = billing::summary(&client, owner.account.id)
        .await
        .map_err(|e| ConsoleError::Internal(anyhow::Error::new(e)))?;
    let settings = &state.config.billing;
    let on_sale = state.stripe.is_some();
    let body = html! {
        h1 { "Billing" }
        (notices(&top))
        section.card {
            h2 { "Current plan" }
            dl.facts {
                dt { "Tier" } dd { (summary.tier) }
                dt { "Plan" } dd { (summary.plan.as_deref().unwrap_or("none (pay as you go)")) }
                @if let Some(s) = &summary.subscription_status { dt { "Subscription" } dd { (s) } }
                dt { "Balance" } dd { (thousands(owner.account.credit_balance)) " credits" }
            }
            @if on_sale {
                form method="post" action={(BASE) "/billing/portal"} {
                    input type="hidden" name="csrf" value=(owner.csrf());
                    button.secondary type="submit" { "Manage card, invoices and plan in Stripe" }
                }
            }
        }
        @if !on_sale {
            section.card { p { "Buying credits is not configured on this server." } }
        } @else {
            @if !settings.packs.is_empty() {
                section.card {
                    h2 { "Buy credits" }
                    ul.offers {
                        @for p in &settings.packs {
                            li.offer {
                                p.offer-name { (p.name) }
                                p { strong { (thousands(p.credits)) } " credits, once" }
                                form method="post" action={(BASE) "/billing/checkout"} {
                                    input type="hidden" name="csrf" value=(owner.csrf());
                                    input type="hidden" name="pack" value=(p.name);
                                    button type="submit" aria-label={"Buy the " (p.name) " pack"} { "Buy" }
                                }
                            }
                        }
                    }
                    p.muted { "You pay on Stripe's page; the credits arrive when Stripe confirms the payment." }
                }
            }
            @if !settings.plans.is_empty() {
                section.card {
                    h2 { "Plans" }
                    ul.offers {
                        @for p in &settings.plans {
                            li.offer {
                                p.offer-name { (p.name) }
                                p { "Tier " strong { (p.tier) } ", " strong { (thousands(p.monthly_credits)) } " credits a month" }
                                form method="post" action={(BASE) "/billing/checkout"} {
                                    input type="hidden" name="csrf" value=(owner.csrf());
                                    input type="hidden" name="plan" value=(p.name);
                                    button type="submit" aria-label={"Subscribe to " (p.name)} { "Subscribe" }
                                }
                            }
                        }
                    }
                }
            }
        }
        @if on_sale && !settings.packs.is_empty() {
            (recharge_section(owner, settings, &summary.auto_recharge, recharge))
        }
        section.card {
            h2 { "Purchases and clawbacks" }
            @if summary.purchases.is_empty() {
                p { "Nothing yet." }
            } @else {
                div.table-wrap {
                    table #purchases {
                        thead { tr { th scope="col" { "When" } th scope="col" { "What" } th.num scope="col" { "Credits" } th.num scope="col" { "Balance after" } } }
                        tbody {
                            @for m in &summary.purchases {
                                tr {
                                    td { (time(m.created_at)) }
                                    td { (m.kind) @if let Some(r) = &m.reason { " — " (r) } }
                                    td.num { @if m.delta > 0 { "+" } (thousands(m.delta)) }
                                    td.num { (thousands(m.balance_after)) }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(respond(
        status,
        page("Billing", Some(owner), Nav::Billing, body),
    ))
}

#[derive(Deserialize)]
pub struct BillingQuery {
    checkout: Option<String>,
    card: Option<String>,
}

/// `GET /console/billing`
pub async fn billing(
    req: HttpRequest,
    owner: Owner,
    q: web::Query<BillingQuery>,
) -> Result<HttpResponse> {
    let state = state(&req)?;
    let top = match q.checkout.as_deref() {
        Some("done") => vec![Notice::Ok(
            "Thank you. Your credits appear here as soon as Stripe confirms the payment.".into(),
        )],
        Some("cancelled") => vec![Notice::Ok(
            "Checkout was cancelled; nothing was charged.".into(),
        )],
        _ => match q.card.as_deref() {
            Some("saved") => vec![Notice::Ok(
                "Your card is saved as soon as Stripe confirms it; then auto-recharge can be turned on."
                    .into(),
            )],
            Some("cancelled") => vec![Notice::Ok("No card was saved.".into())],
            _ => vec![],
        },
    };
    render(&owner, &state, StatusCode::OK, top).await
}

/// A billing refusal as a message at the top, or the error it really is.
fn refusal(e: BillingError) -> Result<(StatusCode, Notice)> {
    let status = match &e {
        BillingError::NotConfigured | BillingError::NoPacks => StatusCode::NOT_FOUND,
        BillingError::PlanActive { .. } | BillingError::PlanCheckoutOpen { .. } => {
            StatusCode::CONFLICT
        }
        BillingError::UnknownPack { .. }
        | BillingError::UnknownPlan { .. }
        | BillingError::PackOrPlan => StatusCode::UNPROCESSABLE_ENTITY,
        BillingError::PaymentProviderUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        _ => return Err(ConsoleError::Internal(anyhow::Error::new(e))),
    };
    let msg = match &e {
        BillingError::PaymentProviderUnavailable { .. } => {
            "Stripe cannot be reached right now; nothing was charged. Try again in a minute.".into()
        }
        other => other.to_string(),
    };
    Ok((status, Notice::Error(msg)))
}

#[derive(Deserialize)]
pub struct CheckoutForm {
    pack: Option<String>,
    plan: Option<String>,
}

/// `POST /console/billing/checkout`: a Checkout Session, then a 303 to Stripe's page.
pub async fn checkout(
    req: HttpRequest,
    owner: Owner,
    form: Posted<CheckoutForm>,
) -> Result<HttpResponse> {
    let state = state(&req)?;
    let Posted(f) = form;
    let base = origin(&req);
    let opened = match state.stripe.as_ref() {
        None => Err(BillingError::NotConfigured),
        Some(api) => match Checkout::new(
            &state.config.billing,
            f.pack.as_deref().filter(|s| !s.is_empty()),
            f.plan.as_deref().filter(|s| !s.is_empty()),
            format!("{base}{BASE}/billing?checkout=done"),
            format!("{base}{BASE}/billing?checkout=cancelled"),
        ) {
            Ok(order) => billing::checkout(&state.db, api, owner.account.id, &order, None).await,
            Err(e) => Err(e),
        },
    };
    match opened {
        Ok(session) => match session.url {
            Some(url) => Ok(HttpResponse::SeeOther()
                .insert_header((actix_web::http::header::LOCATION, url))
                .finish()),
            None => Err(ConsoleError::Internal(anyhow::anyhow!(
                "Stripe answered a Checkout Session without a URL"
            ))),
        },
        Err(e) => {
            let (status, notice) = refusal(e)?;
            render(&owner, &state, status, vec![notice]).await
        }
    }
}

/// `POST /console/billing/portal`: a Stripe billing-portal session, then a 303 to it.
pub async fn portal(req: HttpRequest, owner: Owner, _: Posted<NoFields>) -> Result<HttpResponse> {
    let state = state(&req)?;
    let back = format!("{}{BASE}/billing", origin(&req));
    let opened = match state.stripe.as_ref() {
        None => Err(BillingError::NotConfigured),
        Some(api) => billing::portal(&state.db, api, owner.account.id, &back).await,
    };
    match opened {
        Ok(s) => match s.url {
            Some(url) => Ok(HttpResponse::SeeOther()
                .insert_header((actix_web::http::header::LOCATION, url))
                .finish()),
            None => Err(ConsoleError::Internal(anyhow::anyhow!(
                "Stripe answered a portal session without a URL"
            ))),
        },
        Err(e) => {
            let (status, notice) = refusal(e)?;
            render(&owner, &state, status, vec![notice]).await
        }
    }
}

#[derive(Deserialize, Clone, Default)]
pub struct RechargeFields {
    enabled: Option<String>,
    #[serde(default)]
    threshold: String,
    #[serde(default)]
    pack: String,
    #[serde(default)]
    max_per_month: String,
}

/// `POST /console/billing/auto-recharge`: through `billing::auto_recharge::set`, as `PUT
/// /v1/billing/auto-recharge`; its refusals by their fields, or at the section's top.
pub async fn save_auto_recharge(
    req: HttpRequest,
    owner: Owner,
    form: Posted<RechargeFields>,
) -> Result<HttpResponse> {
    let state = state(&req)?;
    let Posted(f) = form;
    let mut out = RechargeForm {
        posted: Some(f.clone()),
        ..RechargeForm::default()
    };
    let threshold = parse_whole(&f.threshold).unwrap_or_else(|_| {
        out.threshold = Some("Enter a whole number of credits.".into());
        None
    });
    let max = match parse_whole(&f.max_per_month) {
        Ok(m) => m.map(|m| i32::try_from(m).unwrap_or(i32::MAX)),
        Err(_) => {
            out.max = Some("Enter a whole number of recharges.".into());
            None
        }
    };
    if out.threshold.is_none() && out.max.is_none() {
        let saved = match state.stripe.as_ref() {
            None => Err(BillingError::NotConfigured),
            Some(_) => {
                auto_recharge::set(
                    &state.db,
                    &state.config.billing,
                    owner.account.id,
                    auto_recharge::Update {
                        enabled: f.enabled.is_some(),
                        threshold,
                        pack: Some(f.pack.trim().to_owned()).filter(|p| !p.is_empty()),
                        max_per_month: max,
                    },
                )
                .await
            }
        };
        match saved {
            Ok(s) => {
                let msg = if s.enabled {
                    "Auto-recharge is on."
                } else {
                    "Auto-recharge is off."
                };
                let done = RechargeForm {
                    top: vec![Notice::Ok(msg.into())],
                    ..RechargeForm::default()
                };
                return render_with(&owner, &state, StatusCode::OK, vec![], &done).await;
            }
            Err(BillingError::PaymentMethodRequired) => out.top.push(Notice::Error(
                "Auto-recharge needs a card saved for payments made without you: save one with \
                 the button above (or buy a pack, which saves its card), then turn it on."
                    .into(),
            )),
            Err(BillingError::InvalidSetting {
                field: "max_per_month",
                ..
            }) => {
                out.max = Some(format!(
                    "Enter 1 to {} recharges a month.",
                    thousands(auto_recharge::MAX_PER_MONTH.into())
                ))
            }
            Err(BillingError::InvalidSetting {
                field: "threshold", ..
            }) if threshold.is_some_and(|t| !(0..=auto_recharge::MAX_THRESHOLD).contains(&t)) => {
                out.threshold = Some(format!(
                    "Enter 0 to {} credits.",
                    thousands(auto_recharge::MAX_THRESHOLD)
                ))
            }
            // The only other refusal of a setting: turning it on with a value missing.
            Err(BillingError::InvalidSetting { .. }) => out.top.push(Notice::Error(
                "Fill in the threshold, the pack and the monthly maximum to turn auto-recharge on."
                    .into(),
            )),
            Err(BillingError::UnknownPack { .. }) => {
                out.pack = Some("Choose one of the packs on sale.".into())
            }
            Err(e) => {
                let (_, notice) = refusal(e)?;
                out.top.push(notice);
            }
        }
    }
    // The messages are in the section, where the form's address (`#auto-recharge`) scrolls.
    render_with(
        &owner,
        &state,
        StatusCode::UNPROCESSABLE_ENTITY,
        vec![],
        &out,
    )
    .await
}

/// `POST /console/billing/auto-recharge/setup`: a Checkout Session in `setup` mode (a card
/// saved, nothing bought), then a 303 to Stripe's page.
pub async fn setup_card(
    req: HttpRequest,
    owner: Owner,
    _: Posted<NoFields>,
) -> Result<HttpResponse> {
    let state = state(&req)?;
    let base = origin(&req);
    let opened = match state.stripe.as_ref() {
        None => Err(BillingError::NotConfigured),
        Some(api) => {
            billing::setup_checkout(
                &state.db,
                api,
                &state.config.billing,
                owner.account.id,
                &format!("{base}{BASE}/billing?card=saved"),
                &format!("{base}{BASE}/billing?card=cancelled"),
            )
            .await
        }
    };
    match opened {
        Ok(session) => match session.url {
            Some(url) => Ok(HttpResponse::SeeOther()
                .insert_header((actix_web::http::header::LOCATION, url))
                .finish()),
            None => Err(ConsoleError::Internal(anyhow::anyhow!(
                "Stripe answered a setup Checkout Session without a URL"
            ))),
        },
        Err(e) => {
            let (status, notice) = refusal(e)?;
            render(&owner, &state, status, vec![notice]).await
        }
    }
}
