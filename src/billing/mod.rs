//! Billing through Stripe: Checkout Sessions for credit packs and plans, and the webhook that
//! turns Stripe's events into ledger rows and tier changes — each exactly once.
//!
//! This module owns `billing_customers`, `billing_checkouts`, `billing_subscriptions`,
//! `billing_auto_recharge`, `billing_recharges` and `stripe_events` (and the
//! `accounts.recharge_*` arming columns it writes for the charge statements to test); balances move only through `credits`, tiers only through `accounts`.

pub mod auto_recharge;
pub mod events;
pub mod signature;
pub mod stripe_api;

use deadpool_postgres::{GenericClient, Pool};
use serde::Serialize;
use uuid::Uuid;

use crate::accounts;
use crate::config::BillingSettings;
use crate::idempotency::Guard;
use stripe_api::{Created, NewSession, StripeApi};

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
    /// A second plan while one is live: plans change (or end) through the customer portal.
    #[error("The account already has a plan ({subscription}); change or cancel it through the customer portal.")]
    PlanActive { subscription: String },
    /// A plan checkout opened while another one is still open: pay or abandon that one
    /// first (its session expires within 30 minutes).
    #[error("A plan checkout is already open for this account ({session}); complete it, or retry once it expires.")]
    PlanCheckoutOpen { session: String },
    /// Auto-recharge enabled without a card saved for off-session payments.
    #[error("Auto-recharge needs a saved card: buy a pack through Checkout, or save one with POST /v1/billing/auto-recharge/setup.")]
    PaymentMethodRequired,
    /// An auto-recharge setting out of range.
    #[error("{detail}")]
    InvalidSetting { field: &'static str, detail: String },
    /// A card can be saved only against a pack's currency, and none is configured.
    #[error("No credit pack is configured on this server.")]
    NoPacks,
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
            Error::InvalidSetting { field, .. } => Some(field),
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

/// The account's live subscription, if any: one that is not over (`canceled`,
/// `incomplete_expired`). A plan checkout is refused while there is one, so an account never
/// pays for two plans at once.
pub async fn live_plan(db: &impl GenericClient, account_id: Uuid) -> Result<Option<String>, Error> {
    Ok(db
        .query_opt(
            "SELECT subscription_id FROM billing_subscriptions
              WHERE account_id = $1 AND status NOT IN ('canceled', 'incomplete_expired')
              ORDER BY current DESC, last_event_created DESC LIMIT 1",
            &[&account_id],
        )
        .await?
        .map(|r| r.get(0)))
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
    let (subscription, kind, name, price_id, credits) = match req.item {
        Item::Pack {
            name,
            price_id,
            credits,
        } => (false, "pack", name, price_id, *credits),
        Item::Plan { name, price_id } => (true, "plan", name, price_id, 0),
    };
    let claim = if subscription {
        Some(claim_plan_checkout(db, account_id, name).await?)
    } else {
        None
    };
    let created = open_session(
        db,
        api,
        account_id,
        &req,
        subscription,
        (kind, name.as_str(), price_id.as_str()),
    )
    .await;
    let created = match (created, &claim) {
        (Ok(c), _) => c,
        (Err(e), Some(claim)) => {
            // Stripe did not open it: release the claim so the customer can try again.
            db.get()
                .await?
                .execute(
                    "DELETE FROM billing_checkouts WHERE session_id = $1",
                    &[claim],
                )
                .await?;
            return Err(e);
        }
        (Err(e), None) => return Err(e),
    };
    let client = db.get().await?;
    match &claim {
        Some(claim) => {
            client
                .execute(
                    "UPDATE billing_checkouts SET session_id = $2 WHERE session_id = $1",
                    &[claim, &created.id],
                )
                .await?;
        }
        None => {
            client
                .execute(
                    "INSERT INTO billing_checkouts (session_id, account_id, mode, item, credits)
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (session_id) DO NOTHING",
                    &[&created.id, &account_id, &"payment", name, &credits],
                )
                .await?;
        }
    }
    Ok(created)
}

/// How long a plan checkout stays open (Stripe's shortest session life): the account's one
/// open plan checkout is released by then even if `checkout.session.expired` never arrives.
const PLAN_CHECKOUT_MINUTES: i64 = 30;

/// Claims the account's one open plan checkout, exactly: in one transaction, expired claims
/// are released, a live plan refuses (`plan_active`), and the claim row is inserted under the
/// unique index `billing_checkouts_one_open_plan` — of two racing requests (on any
/// instances) one inserts, the other waits on the index and is refused. No lock is held
/// while Stripe answers. Returns the claim's placeholder session id.
async fn claim_plan_checkout(db: &Pool, account_id: Uuid, plan: &str) -> Result<String, Error> {
    let mut client = db.get().await?;
    let tx = client.transaction().await?;
    tx.execute(
        "UPDATE billing_checkouts SET plan_open = false
          WHERE account_id = $1 AND plan_open AND expires_at < now()",
        &[&account_id],
    )
    .await?;
    if let Some(current) = live_plan(&tx, account_id).await? {
        return Err(Error::PlanActive {
            subscription: current,
        });
    }
    let claim = format!("claim_{}", Uuid::now_v7().simple());
    let inserted = tx
        .execute(
            &format!(
                "INSERT INTO billing_checkouts (session_id, account_id, mode, item, credits, plan_open, expires_at)
                 VALUES ($1, $2, 'subscription', $3, 0, true, now() + interval '{PLAN_CHECKOUT_MINUTES} minutes')
                 ON CONFLICT (account_id) WHERE plan_open DO NOTHING"
            ),
            &[&claim, &account_id, &plan],
        )
        .await?;
    if inserted == 0 {
        let open: String = tx
            .query_opt(
                "SELECT session_id FROM billing_checkouts WHERE account_id = $1 AND plan_open",
                &[&account_id],
            )
            .await?
            .map(|r| r.get(0))
            .unwrap_or_default();
        return Err(Error::PlanCheckoutOpen { session: open });
    }
    tx.commit().await?;
    Ok(claim)
}

async fn open_session(
    db: &Pool,
    api: &StripeApi,
    account_id: Uuid,
    req: &CheckoutRequest<'_>,
    subscription: bool,
    (kind, name, price_id): (&'static str, &str, &str),
) -> Result<Created, Error> {
    let customer = customer_for(db, api, account_id).await?;
    let account = account_id.to_string();
    api.create_checkout_session(
        &req.idempotency_key,
        NewSession {
            subscription,
            customer: &customer,
            account_id: &account,
            price_id,
            success_url: req.success_url,
            cancel_url: req.cancel_url,
            item: (kind, name),
            expires_at: subscription
                .then(|| chrono::Utc::now().timestamp() + PLAN_CHECKOUT_MINUTES * 60),
        },
    )
    .await
}

/// Opens a Checkout Session in `setup` mode: the customer saves a card for auto-recharge
/// without buying anything (a pack bought through Checkout saves one too). Its currency is
/// the first configured pack's, read from Stripe.
pub async fn setup_checkout(
    db: &Pool,
    api: &StripeApi,
    settings: &BillingSettings,
    account_id: Uuid,
    success_url: &str,
    cancel_url: &str,
) -> Result<CheckoutSession, Error> {
    check_url("success_url", success_url)?;
    check_url("cancel_url", cancel_url)?;
    let pack = settings.packs.first().ok_or(Error::NoPacks)?;
    let price = api.price(&pack.price_id).await?;
    let customer = customer_for(db, api, account_id).await?;
    let created = api
        .create_setup_session(
            &format!("keymeter-setup-{}", Uuid::now_v7()),
            &customer,
            &account_id.to_string(),
            price.currency,
            success_url,
            cancel_url,
        )
        .await?;
    Ok(CheckoutSession {
        object: "checkout_session",
        id: created.id,
        url: created.url,
    })
}

/// A Stripe billing-portal session: where the customer updates their card, sees invoices
/// and changes or cancels their plan (which flows back through the subscription webhooks).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PortalSession {
    #[schema(value_type = String, example = "billing_portal_session")]
    pub object: &'static str,
    /// Stripe's session id.
    pub id: String,
    /// The page to send the customer to.
    pub url: Option<String>,
}

/// Opens a billing-portal session for the account, creating its Stripe customer first if it
/// has none (as checkout does). `return_url` must be an absolute http(s) URL.
pub async fn portal(
    db: &Pool,
    api: &StripeApi,
    account_id: Uuid,
    return_url: &str,
) -> Result<PortalSession, Error> {
    check_url("return_url", return_url)?;
    let customer = customer_for(db, api, account_id).await?;
    let created = api.create_portal_session(&customer, return_url).await?;
    Ok(PortalSession {
        object: "billing_portal_session",
        id: created.id,
        url: created.url,
    })
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
    /// The last 20 purchases, auto-recharges, clawbacks and dispute movements, newest first.
    pub purchases: Vec<crate::credits::Movement>,
    /// Auto-recharge, with why keymeter turned it off (`disabled_reason`) if it did.
    pub auto_recharge: auto_recharge::Settings,
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
              ORDER BY current DESC, last_event_created DESC LIMIT 1",
            &[&account_id],
        )
        .await?;
    let purchases = db
        .query(
            &format!(
                "SELECT {} FROM credit_ledger WHERE account_id = $1 AND kind IN ('purchase', 'auto_recharge', 'clawback', 'dispute', 'dispute_won')
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
        auto_recharge: auto_recharge::get(db, account_id).await?,
    })
}
