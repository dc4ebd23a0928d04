//! Billing through Stripe: Checkout Sessions for credit packs and plans, and the webhook that
//! turns Stripe's events into ledger rows and tier changes — each exactly once.
//!
//! This module owns `billing_customers`, `billing_checkouts`, `billing_subscriptions` and
//! `stripe_events`; balances move only through `credits`, tiers only through `accounts`.

pub mod events;
pub mod signature;
pub mod stripe_api;

use deadpool_postgres::{GenericClient, Pool};
use serde::Serialize;
use uuid::Uuid;

use crate::accounts;
use crate::config::BillingSettings;
use crate::idempotency::Guard;
use stripe_api::{Created, StripeApi};

/// Why a billing request or a Stripe event was refused, in billing's words;
/// `http::problem` gives each its status. The message of a refusal is the client's `detail`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No Stripe secret key is configured.
    #[error("Billing is not configured on this server.")]
    NotConfigured,
    /// No webhook secret is configured.
    #[error("Billing webhooks are not configured on this server.")]
    WebhooksNotConfigured,
    #[error("unknown pack {name:?}; available: {available}.")]
    UnknownPack { name: String, available: String },
    #[error("unknown plan {name:?}; available: {available}.")]
    UnknownPlan { name: String, available: String },
    #[error("name exactly one of `pack` or `plan`.")]
    PackOrPlan,
    #[error("{field} must be an absolute http(s) URL.")]
    InvalidUrl { field: &'static str },
    /// A webhook delivery whose signature does not verify; nothing is written.
    #[error("The signature could not be verified.")]
    InvalidSignature(#[source] signature::SignatureError),
    /// A verified webhook body that is not JSON.
    #[error("{0}")]
    InvalidJson(String),
    /// A verified webhook body that is JSON but not a usable event.
    #[error("Not a usable Stripe event: {0}.")]
    InvalidEvent(&'static str),
    /// Stripe could not be reached or is failing; the client may retry.
    #[error("{detail}")]
    PaymentProviderUnavailable { detail: &'static str },
    #[error("No account with that id.")]
    AccountNotFound,
    /// The account could not be read or its tier set.
    #[error(transparent)]
    Accounts(#[from] crate::accounts::Error),
    #[error(transparent)]
    Credits(#[from] crate::credits::Error),
    #[error(transparent)]
    Idempotency(#[from] crate::idempotency::Error),
    #[error(transparent)]
    Db(#[from] crate::db::Error),
    /// Something a client cannot cause or fix (Stripe refusing our own request, a bug).
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}
crate::impl_db_error_from!(Error);

impl Error {
    /// The request value a refusal is about, when it is one.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            Error::UnknownPack { .. } | Error::PackOrPlan => Some("pack"),
            Error::UnknownPlan { .. } => Some("plan"),
            Error::InvalidUrl { field } => Some(field),
            _ => None,
        }
    }
}

/// What a checkout buys.
#[derive(Debug, Clone)]
pub enum Item {
    Pack {
        name: String,
        price_id: String,
        credits: i64,
    },
    Plan {
        name: String,
        price_id: String,
    },
}

impl Item {
    pub fn resolve(
        settings: &BillingSettings,
        pack: Option<&str>,
        plan: Option<&str>,
    ) -> Result<Item, Error> {
        match (pack, plan) {
            (Some(p), None) => settings
                .pack(p)
                .map(|p| Item::Pack {
                    name: p.name.clone(),
                    price_id: p.price_id.clone(),
                    credits: p.credits,
                })
                .ok_or_else(|| Error::UnknownPack {
                    name: p.to_owned(),
                    available: settings
                        .packs
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                }),
            (None, Some(p)) => settings
                .plan(p)
                .map(|p| Item::Plan {
                    name: p.name.clone(),
                    price_id: p.price_id.clone(),
                })
                .ok_or_else(|| Error::UnknownPlan {
                    name: p.to_owned(),
                    available: settings
                        .plans
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                }),
            _ => Err(Error::PackOrPlan),
        }
    }
}

/// The account's Stripe customer, created once (Stripe's idempotency key makes concurrent
/// first checkouts create one customer; the unique constraint keeps one mapping).
pub async fn customer_for(db: &Pool, api: &StripeApi, account_id: Uuid) -> Result<String, Error> {
    let client = db.get().await?;
    if let Some(row) = client
        .query_opt(
            "SELECT customer_id FROM billing_customers WHERE account_id = $1",
            &[&account_id],
        )
        .await?
    {
        return Ok(row.get(0));
    }
    let account = accounts::get(&client, account_id)
        .await?
        .ok_or(Error::AccountNotFound)?;
    drop(client);
    let created = api
        .create_customer(&account.email, &account_id.to_string())
        .await?;
    let client = db.get().await?;
    // Concurrent first checkouts get the same customer from Stripe (same idempotency key)
    // and race to insert the same row. With `ON CONFLICT (account_id)` only that index
    // arbitrates; the loser can trip the unique customer_id index instead and fail with a
    // 500. Without a target, either conflict is a no-op and the SELECT below reads the row.
    client
        .execute(
            "INSERT INTO billing_customers (account_id, customer_id) VALUES ($1, $2)
             ON CONFLICT DO NOTHING",
            &[&account_id, &created.id],
        )
        .await?;
    let row = client
        .query_one(
            "SELECT customer_id FROM billing_customers WHERE account_id = $1",
            &[&account_id],
        )
        .await?;
    Ok(row.get(0))
}

/// A checkout a customer asked for, checked: what it buys and where Stripe sends them after.
#[derive(Debug, Clone)]
pub struct Checkout {
    item: Item,
    success_url: String,
    cancel_url: String,
}

impl Checkout {
    /// Exactly one of `pack` or `plan`, known to `settings`; both URLs absolute http(s)
    /// (checked in that order, so the first refusal is always the same).
    pub fn new(
        settings: &BillingSettings,
        pack: Option<&str>,
        plan: Option<&str>,
        success_url: String,
        cancel_url: String,
    ) -> Result<Checkout, Error> {
        let item = Item::resolve(settings, pack, plan)?;
        check_url("success_url", &success_url)?;
        check_url("cancel_url", &cancel_url)?;
        Ok(Checkout {
            item,
            success_url,
            cancel_url,
        })
    }
}

fn check_url(field: &'static str, u: &str) -> Result<(), Error> {
    let ok = (u.starts_with("https://") || u.starts_with("http://"))
        && u.len() <= 2048
        && !u.contains(|c: char| c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidUrl { field })
    }
}

/// A Stripe Checkout Session to send the customer to.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CheckoutSession {
    #[schema(value_type = String, example = "checkout_session")]
    pub object: &'static str,
    /// Stripe's session id.
    pub id: String,
    /// The page to send the customer to.
    pub url: Option<String>,
}

/// Opens a Checkout Session for `order`. Stripe gets an idempotency key of its own — derived
/// from the client's `Idempotency-Key` when there is one (`guard`), so a retry cannot open a
/// second session — and, with a `guard`, the answer is recorded for replays once Stripe has
/// answered.
pub async fn checkout(
    db: &Pool,
    api: &StripeApi,
    account_id: Uuid,
    order: &Checkout,
    guard: Option<Guard>,
) -> Result<CheckoutSession, Error> {
    let stripe_key = match &guard {
        Some(g) => format!("keymeter-checkout-{account_id}-{}", g.key().as_str()),
        None => format!("keymeter-checkout-{}", Uuid::now_v7()),
    };
    let created = create_checkout(
        db,
        api,
        account_id,
        CheckoutRequest {
            item: &order.item,
            success_url: &order.success_url,
            cancel_url: &order.cancel_url,
            idempotency_key: stripe_key,
        },
    )
    .await?;
    let session = CheckoutSession {
        object: "checkout_session",
        id: created.id,
        url: created.url,
    };
    if let Some(g) = &guard {
        g.record_alone(db, &session, None).await?;
    }
    Ok(session)
}

pub struct CheckoutRequest<'a> {
    pub item: &'a Item,
    pub success_url: &'a str,
    pub cancel_url: &'a str,
    /// Passed on to Stripe so a retried request cannot open a second session.
    pub idempotency_key: String,
}

/// Creates the Checkout Session and records what it sells, so the webhook credits from our
/// own record and configuration rather than from metadata.
pub async fn create_checkout(
    db: &Pool,
    api: &StripeApi,
    account_id: Uuid,
    req: CheckoutRequest<'_>,
) -> Result<Created, Error> {
    let customer = customer_for(db, api, account_id).await?;
    let account = account_id.to_string();
    let (mode, name, price_id, credits) = match req.item {
        Item::Pack {
            name,
            price_id,
            credits,
        } => ("payment", name, price_id, *credits),
        Item::Plan { name, price_id } => ("subscription", name, price_id, 0),
    };
    let mut form: Vec<(String, String)> = vec![
        ("mode".into(), mode.into()),
        ("customer".into(), customer),
        ("client_reference_id".into(), account.clone()),
        ("line_items[0][price]".into(), price_id.clone()),
        ("line_items[0][quantity]".into(), "1".into()),
        ("success_url".into(), req.success_url.into()),
        ("cancel_url".into(), req.cancel_url.into()),
        ("metadata[account_id]".into(), account.clone()),
    ];
    match req.item {
        Item::Pack { .. } => form.push(("metadata[pack]".into(), name.clone())),
        Item::Plan { .. } => {
            form.push(("metadata[plan]".into(), name.clone()));
            form.push((
                "subscription_data[metadata][account_id]".into(),
                account.clone(),
            ));
            form.push(("subscription_data[metadata][plan]".into(), name.clone()));
        }
    }
    let created = api
        .create_checkout_session(&req.idempotency_key, &form)
        .await?;
    let client = db.get().await?;
    client
        .execute(
            "INSERT INTO billing_checkouts (session_id, account_id, mode, item, credits)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (session_id) DO NOTHING",
            &[&created.id, &account_id, &mode, name, &credits],
        )
        .await?;
    Ok(created)
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = BillingSummary)]
pub struct Summary {
    #[schema(value_type = String, example = "billing")]
    pub object: &'static str,
    pub tier: String,
    pub plan: Option<String>,
    pub subscription_status: Option<String>,
    pub stripe_customer: Option<String>,
    /// The last 20 purchases and clawbacks, newest first.
    pub purchases: Vec<crate::credits::Movement>,
}

pub async fn summary(db: &impl GenericClient, account_id: Uuid) -> Result<Summary, Error> {
    let account = accounts::get(db, account_id)
        .await?
        .ok_or(Error::AccountNotFound)?;
    let customer: Option<String> = db
        .query_opt(
            "SELECT customer_id FROM billing_customers WHERE account_id = $1",
            &[&account_id],
        )
        .await?
        .map(|r| r.get(0));
    let sub = db
        .query_opt(
            "SELECT plan, status FROM billing_subscriptions WHERE account_id = $1
              ORDER BY last_event_created DESC LIMIT 1",
            &[&account_id],
        )
        .await?;
    let purchases = db
        .query(
            &format!(
                "SELECT {} FROM credit_ledger WHERE account_id = $1 AND kind IN ('purchase', 'clawback')
                  ORDER BY id DESC LIMIT 20",
                crate::credits::ledger::MOVEMENT_COLUMNS
            ),
            &[&account_id],
        )
        .await?
        .iter()
        .map(crate::credits::ledger::movement)
        .collect();
    Ok(Summary {
        object: "billing",
        tier: account.tier,
        plan: sub.as_ref().and_then(|r| r.get(0)),
        subscription_status: sub.as_ref().map(|r| r.get(1)),
        stripe_customer: customer,
        purchases,
    })
}
