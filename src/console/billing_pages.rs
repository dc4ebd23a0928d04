//! The billing page: the current tier and plan, the packs and plans on sale (each a form that
//! opens a Stripe Checkout Session through `billing::checkout` and redirects the browser to
//! it), the purchase and clawback history (`billing::summary`), and the Stripe customer
//! portal (`billing::portal`). Credits arrive through Stripe's webhook, as for the API.

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use maud::html;
use serde::Deserialize;

use super::format::{thousands, time};
use super::layout::{notices, page, respond, Nav, Notice};
use super::{state, ConsoleError, Owner, Posted, Result, BASE};
use crate::billing::{self, Checkout, Error as BillingError};
use crate::startup::AppState;

/// This console's own address as the browser reached it, for Stripe's return URLs.
fn origin(req: &HttpRequest) -> String {
    let info = req.connection_info();
    format!("{}://{}", info.scheme(), info.host())
}

async fn render(
    owner: &Owner,
    state: &AppState,
    status: StatusCode,
    top: Vec<Notice>,
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
        _ => vec![],
    };
    render(&owner, &state, StatusCode::OK, top).await
}

/// A billing refusal as a message at the top, or the error it really is.
fn refusal(e: BillingError) -> Result<(StatusCode, Notice)> {
    let status = match &e {
        BillingError::NotConfigured => StatusCode::NOT_FOUND,
        BillingError::PlanActive { .. } => StatusCode::CONFLICT,
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

#[derive(Deserialize)]
pub struct NoFields {}

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
