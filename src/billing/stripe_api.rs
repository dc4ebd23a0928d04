//! Every Stripe API call keymeter makes, through stripe-rust (`async-stripe`, the 1.0 line):
//! create a customer, create and retrieve a Checkout Session, open a billing-portal session,
//! read a pack's price, and start an auto-recharge's off-session PaymentIntent.
//!
//! Only the resource crates and request features used are compiled in (checkout sessions,
//! customers, billing-portal sessions, payment intents); the client speaks rustls with the ring provider
//! already in the build. `STRIPE_API_BASE` points the client at a local stand-in in tests.
//! Every creating call carries an idempotency key of ours, so a retried request can never
//! create a second customer or session.

use std::collections::HashMap;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use stripe::{Client, ClientBuilder, IdempotencyKey, RequestStrategy, StripeError, StripeRequest};
use stripe_billing::billing_portal_session::CreateBillingPortalSession;
use stripe_checkout::checkout_session::{
    CreateCheckoutSession, CreateCheckoutSessionLineItems, CreateCheckoutSessionPaymentIntentData,
    CreateCheckoutSessionPaymentIntentDataSetupFutureUsage, CreateCheckoutSessionSubscriptionData,
    RetrieveCheckoutSession,
};
use stripe_checkout::{CheckoutSession, CheckoutSessionMode};
use stripe_client_core::{RequestBuilder, StripeMethod};
use stripe_core::customer::CreateCustomer;
use stripe_core::payment_intent::{CreatePaymentIntent, CreatePaymentIntentOffSession};
use stripe_shared::{PaymentIntent, Price};

use super::Error;

#[derive(Clone)]
pub struct StripeApi {
    client: Client,
}

/// What a creating call hands back: Stripe's id and, for sessions, the page to send the
/// customer to.
#[derive(Debug)]
pub struct Created {
    pub id: String,
    pub url: Option<String>,
}

/// A Checkout Session to create: mode, what it sells, whose it is.
pub struct NewSession<'a> {
    pub subscription: bool,
    pub customer: &'a str,
    pub account_id: &'a str,
    pub price_id: &'a str,
    pub success_url: &'a str,
    pub cancel_url: &'a str,
    /// `("pack", name)` or `("plan", name)`: informational only, never trusted on the way back.
    pub item: (&'static str, &'a str),
    /// A plan session's end (Unix time): the one open plan checkout is released by then.
    pub expires_at: Option<i64>,
}

/// An off-session PaymentIntent to create and confirm for an auto-recharge.
pub struct NewRecharge<'a> {
    /// Our recharge id: the Stripe idempotency key, and `keymeter_recharge` in metadata.
    pub id: &'a str,
    pub customer: &'a str,
    pub payment_method: &'a str,
    pub account_id: &'a str,
    pub price: &'a Price,
    pub pack: &'a str,
}

/// What Stripe answered a recharge's PaymentIntent.
#[derive(Debug)]
pub enum RechargeAnswer {
    /// Created; its status says whether it needs the customer (`requires_action`…).
    Created(Box<PaymentIntent>),
    /// The card was declined or needs authentication (Stripe's 402 `card_error`): the reason
    /// (`authentication_required`, `card_declined: insufficient_funds`…) and the intent, if any.
    Declined {
        reason: String,
        payment_intent: Option<String>,
    },
}

impl StripeApi {
    /// `base` is `STRIPE_API_BASE` without a trailing slash; the client appends `/v1/…`.
    pub fn new(base: &str, secret: SecretString) -> anyhow::Result<StripeApi> {
        let client = ClientBuilder::new(secret.expose_secret())
            .url(format!("{}/", base.trim_end_matches('/')))
            .timeout(Duration::from_secs(20))
            .app_info("keymeter", Some(env!("CARGO_PKG_VERSION").to_owned()), None)
            .build()
            .map_err(|e| anyhow::anyhow!("Stripe client: {e}"))?;
        Ok(StripeApi { client })
    }

    pub async fn create_customer(&self, email: &str, account_id: &str) -> Result<Created, Error> {
        let c = CreateCustomer::new()
            .email(email)
            .metadata(HashMap::from([(
                "account_id".to_owned(),
                account_id.to_owned(),
            )]))
            .customize()
            .request_strategy(idempotent(&format!("keymeter-customer-{account_id}"))?)
            .send(&self.client)
            .await
            .map_err(|e| refused("/v1/customers", e))?;
        Ok(Created {
            id: c.id.to_string(),
            url: None,
        })
    }

    pub async fn create_checkout_session(
        &self,
        idempotency_key: &str,
        s: NewSession<'_>,
    ) -> Result<Created, Error> {
        let metadata = HashMap::from([
            ("account_id".to_owned(), s.account_id.to_owned()),
            (s.item.0.to_owned(), s.item.1.to_owned()),
        ]);
        let mut line = CreateCheckoutSessionLineItems::new();
        line.price = Some(s.price_id.to_owned());
        line.quantity = Some(1);
        let mut req = CreateCheckoutSession::new()
            .mode(if s.subscription {
                CheckoutSessionMode::Subscription
            } else {
                CheckoutSessionMode::Payment
            })
            .customer(s.customer)
            .client_reference_id(s.account_id)
            .line_items(vec![line])
            .success_url(s.success_url)
            .cancel_url(s.cancel_url)
            .metadata(metadata.clone());
        if s.subscription {
            let mut data = CreateCheckoutSessionSubscriptionData::new();
            data.metadata = Some(metadata);
            req = req.subscription_data(data);
        } else {
            // The card is kept for auto-recharge: Stripe attaches it to the customer for
            // off-session use, and the completed session names it.
            let mut data = CreateCheckoutSessionPaymentIntentData::new();
            data.setup_future_usage =
                Some(CreateCheckoutSessionPaymentIntentDataSetupFutureUsage::OffSession);
            data.metadata = Some(metadata);
            req = req.payment_intent_data(data);
        }
        if let Some(t) = s.expires_at {
            req = req.expires_at(t);
        }
        let session = req
            .customize()
            .request_strategy(idempotent(idempotency_key)?)
            .send(&self.client)
            .await
            .map_err(|e| refused("/v1/checkout/sessions", e))?;
        Ok(Created {
            id: session.id.to_string(),
            url: session.url,
        })
    }

    /// The session with its line items, as Stripe holds it: what was really bought (`None`
    /// when Stripe has no such session).
    pub async fn checkout_session_with_items(
        &self,
        id: &str,
    ) -> Result<Option<CheckoutSession>, Error> {
        match RetrieveCheckoutSession::new(id)
            .expand(vec!["line_items".to_owned()])
            .send(&self.client)
            .await
        {
            Ok(s) => Ok(Some(s)),
            Err(StripeError::Stripe(_, 404)) => Ok(None),
            Err(e) => Err(refused("/v1/checkout/sessions/{id}", e)),
        }
    }

    /// A Checkout Session in `setup` mode: the customer saves a card for auto-recharge without
    /// buying anything. `currency` is a pack price's (Stripe needs one in setup mode to offer
    /// the payment methods that fit it).
    pub async fn create_setup_session(
        &self,
        idempotency_key: &str,
        customer: &str,
        account_id: &str,
        currency: stripe_types::Currency,
        success_url: &str,
        cancel_url: &str,
    ) -> Result<Created, Error> {
        let session = CreateCheckoutSession::new()
            .mode(CheckoutSessionMode::Setup)
            .customer(customer)
            .client_reference_id(account_id)
            .currency(currency)
            .success_url(success_url)
            .cancel_url(cancel_url)
            .metadata(HashMap::from([
                ("account_id".to_owned(), account_id.to_owned()),
                ("purpose".to_owned(), "auto_recharge".to_owned()),
            ]))
            .customize()
            .request_strategy(idempotent(idempotency_key)?)
            .send(&self.client)
            .await
            .map_err(|e| refused("/v1/checkout/sessions", e))?;
        Ok(Created {
            id: session.id.to_string(),
            url: session.url,
        })
    }

    /// The session with its PaymentIntent and SetupIntent expanded: the card a completed
    /// session saved is `payment_intent.payment_method` (a pack bought with
    /// `setup_future_usage`) or `setup_intent.payment_method` (setup mode).
    pub async fn checkout_session_with_intents(
        &self,
        id: &str,
    ) -> Result<Option<CheckoutSession>, Error> {
        match RetrieveCheckoutSession::new(id)
            .expand(vec!["payment_intent".to_owned(), "setup_intent".to_owned()])
            .send(&self.client)
            .await
        {
            Ok(s) => Ok(Some(s)),
            Err(StripeError::Stripe(_, 404)) => Ok(None),
            Err(e) => Err(refused("/v1/checkout/sessions/{id}", e)),
        }
    }

    /// A price, as Stripe holds it: what a pack costs (amount and currency), for the
    /// PaymentIntent of an auto-recharge. The price crate is not compiled in for this one
    /// read; the request is stripe-rust's generic one, typed into stripe-shared's `Price`.
    pub async fn price(&self, id: &str) -> Result<Price, Error> {
        RequestBuilder::new(StripeMethod::Get, format!("/prices/{id}"))
            .customize::<Price>()
            .send(&self.client)
            .await
            .map_err(|e| refused("/v1/prices/{id}", e))
    }

    /// Creates and confirms an off-session PaymentIntent for a recharge, under its own id as
    /// the idempotency key: instances and retries of one recharge can never charge twice.
    pub async fn create_recharge(&self, r: NewRecharge<'_>) -> Result<RechargeAnswer, Error> {
        let amount = r.price.unit_amount.ok_or_else(|| {
            Error::Internal(anyhow::anyhow!(
                "price {} has no unit_amount",
                r.price.id.as_str()
            ))
        })?;
        let res = CreatePaymentIntent::new(amount, r.price.currency.clone())
            .customer(r.customer)
            .payment_method(r.payment_method)
            .confirm(true)
            .off_session(CreatePaymentIntentOffSession::Bool(true))
            .description(format!("keymeter auto-recharge: pack {}", r.pack))
            .metadata(HashMap::from([
                ("account_id".to_owned(), r.account_id.to_owned()),
                ("keymeter_recharge".to_owned(), r.id.to_owned()),
                ("pack".to_owned(), r.pack.to_owned()),
            ]))
            .customize()
            .request_strategy(idempotent(r.id)?)
            .send(&self.client)
            .await;
        match res {
            Ok(pi) => Ok(RechargeAnswer::Created(Box::new(pi))),
            Err(StripeError::Stripe(err, 402)) => {
                let code = err.code.as_ref().map(|c| c.as_str().to_owned());
                let reason = match (code, err.decline_code.clone()) {
                    (Some(c), Some(d)) => format!("{c}: {d}"),
                    (Some(c), None) => c,
                    (None, Some(d)) => d,
                    (None, None) => "card_error".to_owned(),
                };
                Ok(RechargeAnswer::Declined {
                    reason,
                    payment_intent: err.payment_intent.as_ref().map(|p| p.id.to_string()),
                })
            }
            Err(e) => Err(refused("/v1/payment_intents", e)),
        }
    }

    /// A billing-portal session for `customer`, returning to `return_url`.
    pub async fn create_portal_session(
        &self,
        customer: &str,
        return_url: &str,
    ) -> Result<Created, Error> {
        let s = CreateBillingPortalSession::new()
            .customer(customer)
            .return_url(return_url)
            .send(&self.client)
            .await
            .map_err(|e| refused("/v1/billing_portal/sessions", e))?;
        Ok(Created {
            id: s.id.to_string(),
            url: Some(s.url),
        })
    }
}

fn idempotent(key: &str) -> Result<RequestStrategy, Error> {
    IdempotencyKey::new(key)
        .map(RequestStrategy::Idempotent)
        .map_err(|e| Error::Internal(anyhow::anyhow!("Stripe idempotency key: {e:?}")))
}

/// Stripe's failures in billing's words: unreachable or failing (5xx, 429) is
/// `PaymentProviderUnavailable`, so the client retries; Stripe refusing our own request is
/// internal.
fn refused(path: &str, e: StripeError) -> Error {
    match e {
        StripeError::ClientError(msg) => {
            tracing::warn!(error = %msg, path, "Stripe API unreachable");
            Error::PaymentProviderUnavailable {
                detail: "The payment provider could not be reached; retry shortly.",
            }
        }
        StripeError::Timeout => {
            tracing::warn!(path, "Stripe API timed out");
            Error::PaymentProviderUnavailable {
                detail: "The payment provider's answer was cut off; retry shortly.",
            }
        }
        StripeError::Stripe(err, status) => {
            tracing::warn!(status, kind = ?err.type_, message = ?err.message, path, "Stripe refused a request");
            if status >= 500 || status == 429 {
                Error::PaymentProviderUnavailable {
                    detail: "The payment provider is unavailable; retry shortly.",
                }
            } else {
                Error::Internal(anyhow::anyhow!(
                    "Stripe refused {path} with {status}: {}",
                    err.message.unwrap_or_default()
                ))
            }
        }
        other => Error::Internal(anyhow::anyhow!(
            "unexpected Stripe answer to {path}: {other}"
        )),
    }
}
