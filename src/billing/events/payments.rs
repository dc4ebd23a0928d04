//! One-off payments: packs bought through Checkout, and what takes their credits back
//! (refunds, disputes) or gives them back (a won dispute).
//!
//! **What a pack checkout grants.** A session keymeter created is fulfilled from our own
//! record (`billing_checkouts`) and configuration. A session keymeter did not record (e.g.
//! created while our insert failed) is fulfilled only from Stripe's own copy of it, retrieved
//! with its line items: paid, for an existing account, and each line a configured pack price.
//! The event's metadata never names what is granted.
//!
//! **Disputes.** `charge.dispute.created` takes back all of the purchase's credits not yet
//! taken back (ledger kind `dispute`), like a full refund: a later `charge.refunded` for the
//! same charge then finds nothing left to claw back. `charge.dispute.closed` with status
//! `won` gives back exactly what the dispute took (`dispute_won`), once.

use deadpool_postgres::Pool;
use stripe_shared::{
    Charge, CheckoutSession, CheckoutSessionMode, CheckoutSessionPaymentStatus, Dispute,
    DisputeStatus,
};
use uuid::Uuid;

use super::{Ctx, Error, Outcome, StripeApi};
use crate::credits::ledger::{self, Kind};

fn paid(s: &CheckoutSession) -> bool {
    matches!(s.payment_status, CheckoutSessionPaymentStatus::Paid)
}

/// Stripe's copy of a paid pack session keymeter has no record of (`None` when keymeter
/// created it, when it is not a paid pack session, or when Stripe does not know it). Asked
/// before the event's transaction; a Stripe failure fails the delivery so Stripe retries.
pub(super) async fn retrieve_if_unknown(
    db: &Pool,
    api: Option<&StripeApi>,
    s: &CheckoutSession,
) -> Result<Option<CheckoutSession>, Error> {
    if !paid(s) || !matches!(s.mode, CheckoutSessionMode::Payment) {
        return Ok(None);
    }
    let known = db
        .get()
        .await?
        .query_opt(
            "SELECT 1 FROM billing_checkouts WHERE session_id = $1",
            &[&s.id.as_str()],
        )
        .await?
        .is_some();
    match api {
        Some(api) if !known => api.checkout_session_with_items(s.id.as_str()).await,
        _ => Ok(None),
    }
}

/// The card a completed session saved for off-session use, from Stripe's copy of it with
/// its intents expanded (`None` without a Stripe client or a customer). A setup session
/// exists for nothing else, so a failure to read it fails the delivery (Stripe retries); for
/// a pack it is best effort — the credits must not wait on it, and the customer can still
/// save a card with a setup session.
pub(super) async fn saved_card(
    db: &Pool,
    api: Option<&StripeApi>,
    s: &CheckoutSession,
) -> Result<Option<String>, Error> {
    let Some(api) = api else { return Ok(None) };
    if s.customer.is_none() {
        return Ok(None);
    }
    let setup = matches!(s.mode, CheckoutSessionMode::Setup)
        && matches!(
            s.status,
            Some(stripe_shared::CheckoutSessionStatus::Complete)
        );
    let pack = matches!(s.mode, CheckoutSessionMode::Payment) && paid(s);
    if !setup && !pack {
        return Ok(None);
    }
    if pack {
        // A purchase already fulfilled (a redelivery) has had its card read: no second call.
        let fulfilled = db
            .get()
            .await?
            .query_opt(
                "SELECT fulfilled_at IS NOT NULL FROM billing_checkouts WHERE session_id = $1",
                &[&s.id.as_str()],
            )
            .await?
            .is_some_and(|r| r.get(0));
        if fulfilled {
            return Ok(None);
        }
    }
    let copy = match api.checkout_session_with_intents(s.id.as_str()).await {
        Ok(c) => c,
        Err(e) if !setup => {
            tracing::warn!(session = %s.id.as_str(), error = %e, "could not read the card a pack checkout saved");
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let Some(copy) = copy else { return Ok(None) };
    let pm = if setup {
        copy.setup_intent
            .as_ref()
            .and_then(|i| i.as_object())
            .and_then(|i| i.payment_method.as_ref())
    } else {
        copy.payment_intent
            .as_ref()
            .and_then(|i| i.as_object())
            .and_then(|i| i.payment_method.as_ref())
    };
    Ok(pm.map(|p| p.id().as_str().to_owned()))
}

impl Ctx<'_, '_> {
    /// The packs (by configured price) and credits Stripe's copy of a session sold, if it is
    /// paid and every credit it grants is a configured pack's.
    fn sold_packs(&self, s: &CheckoutSession) -> Option<(String, i64)> {
        if !paid(s) {
            return None;
        }
        let mut names = Vec::new();
        let mut credits: i64 = 0;
        for item in &s.line_items.as_ref()?.data {
            let Some(pack) = item
                .price
                .as_ref()
                .and_then(|p| self.billing.pack_by_price(p.id.as_str()))
            else {
                continue;
            };
            let quantity = i64::try_from(item.quantity.unwrap_or(1)).ok()?;
            credits = credits.checked_add(pack.credits.checked_mul(quantity)?)?;
            names.push(pack.name.as_str());
        }
        (credits > 0).then(|| (names.join("+"), credits))
    }

    /// A pack bought through Checkout, once paid (card payments arrive paid with
    /// `completed`; delayed methods with `async_payment_succeeded`). `retrieved` is Stripe's
    /// copy, for a session keymeter has no record of.
    pub(super) async fn checkout_paid(
        &self,
        kind: &str,
        s: &CheckoutSession,
        retrieved: Option<&CheckoutSession>,
    ) -> Result<Outcome, Error> {
        let session_id = s.id.as_str();
        if kind == "checkout.session.completed" && !paid(s) {
            return Ok((None, "awaiting_payment"));
        }
        let reference = s
            .client_reference_id
            .as_deref()
            .and_then(|r| r.parse::<Uuid>().ok());
        match s.mode {
            CheckoutSessionMode::Subscription => {
                // Credits and the tier come with invoice.paid; remember whose subscription it is.
                let account = match reference {
                    Some(a) if self.account_exists(a).await? => a,
                    _ => return Ok((None, "unmatched")),
                };
                self.tx
                    .execute(
                        "UPDATE billing_checkouts SET plan_open = false, fulfilled_at = now()
                          WHERE session_id = $1",
                        &[&session_id],
                    )
                    .await?;
                if let Some(sub) = &s.subscription {
                    let plan = s.metadata.as_ref().and_then(|m| m.get("plan"));
                    self.tx
                        .execute(
                            "INSERT INTO billing_subscriptions (subscription_id, account_id, plan, status, last_event_created)
                             VALUES ($1, $2, $3, 'incomplete', 0) ON CONFLICT (subscription_id) DO NOTHING",
                            &[&sub.id().as_str(), &account, &plan],
                        )
                        .await?;
                }
                return Ok((Some(account), "subscription_started"));
            }
            CheckoutSessionMode::Payment => {}
            _ => return Ok((reference, "ignored")),
        }
        let mut known = self
            .tx
            .query_opt(
                "SELECT 1 FROM billing_checkouts WHERE session_id = $1",
                &[&session_id],
            )
            .await?
            .is_some();
        if !known {
            let Some(r) = retrieved.filter(|r| r.id.as_str() == session_id) else {
                return Ok((reference, "unmatched"));
            };
            let account = self
                .existing_account(r.client_reference_id.as_deref())
                .await?;
            match (account, self.sold_packs(r)) {
                (Some(a), Some((item, credits))) => {
                    self.tx
                        .execute(
                            "INSERT INTO billing_checkouts (session_id, account_id, mode, item, credits)
                             VALUES ($1, $2, 'payment', $3, $4) ON CONFLICT (session_id) DO NOTHING",
                            &[&session_id, &a, &item, &credits],
                        )
                        .await?;
                    known = true;
                }
                _ => return Ok((reference, "unmatched")),
            }
        }
        debug_assert!(known);
        let payment_intent = s.payment_intent.as_ref().map(|p| p.id().as_str());
        let row = self
            .tx
            .query_opt(
                "UPDATE billing_checkouts SET fulfilled_at = now(), payment_intent = $2
                  WHERE session_id = $1 AND fulfilled_at IS NULL AND mode = 'payment'
              RETURNING account_id, credits, item",
                &[&session_id, &payment_intent],
            )
            .await?;
        let Some(row) = row else {
            return Ok((reference, "already_fulfilled"));
        };
        let (account, credits, item): (Uuid, i64, String) = (row.get(0), row.get(1), row.get(2));
        let m = ledger::credit(
            self.tx,
            account,
            credits,
            Kind::Purchase,
            Some(&format!("pack {item}")),
            Some(self.event_id),
        )
        .await?;
        self.granted(&m, "purchase", Some(session_id)).await?;
        Ok((Some(account), "credits_purchased"))
    }

    /// The fulfilled purchase paid by `payment_intent`, locked: (session, account, credits,
    /// clawed back, taken by a dispute).
    async fn purchase_by_payment(
        &self,
        payment_intent: &str,
    ) -> Result<Option<(String, Uuid, i64, i64, i64)>, Error> {
        Ok(self
            .tx
            .query_opt(
                "SELECT session_id, account_id, credits, clawed_back, dispute_clawed FROM billing_checkouts
                  WHERE payment_intent = $1 AND fulfilled_at IS NOT NULL
                  ORDER BY created_at LIMIT 1 FOR UPDATE",
                &[&payment_intent],
            )
            .await?
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))))
    }

    /// A refunded payment takes back the credits it bought, in proportion to the refunded
    /// amount (refunds are cumulative in `amount_refunded`, so only the difference is new).
    pub(super) async fn charge_refunded(&self, charge: &Charge) -> Result<Outcome, Error> {
        let Some(pi) = &charge.payment_intent else {
            return Ok((None, "unmatched"));
        };
        let (amount, refunded) = (charge.amount, charge.amount_refunded);
        if amount <= 0 || refunded <= 0 {
            return Ok((None, "nothing_refunded"));
        }
        let Some((session, account, credits, clawed, _)) =
            self.purchase_by_payment(pi.id().as_str()).await?
        else {
            return Ok((None, "unmatched"));
        };
        let target = ((credits as i128 * refunded.min(amount) as i128) / amount as i128) as i64;
        let claw = target - clawed;
        if claw <= 0 {
            return Ok((Some(account), "nothing_to_claw_back"));
        }
        let m = ledger::clawback(
            self.tx,
            account,
            claw,
            &format!("refund of {session}"),
            self.event_id,
        )
        .await?;
        self.clawed_back(&m, "refund", charge.id.as_str()).await?;
        self.tx
            .execute(
                "UPDATE billing_checkouts SET clawed_back = $2 WHERE session_id = $1",
                &[&session, &target],
            )
            .await?;
        Ok((Some(account), "credits_clawed_back"))
    }

    /// A disputed payment: everything not yet taken back is taken now.
    pub(super) async fn dispute_created(&self, d: &Dispute) -> Result<Outcome, Error> {
        let Some(pi) = &d.payment_intent else {
            return Ok((None, "unmatched"));
        };
        let Some((session, account, credits, clawed, _)) =
            self.purchase_by_payment(pi.id().as_str()).await?
        else {
            return Ok((None, "unmatched"));
        };
        let claw = credits - clawed;
        if claw <= 0 {
            return Ok((Some(account), "nothing_to_claw_back"));
        }
        let m = ledger::take_back(
            self.tx,
            account,
            claw,
            Kind::Dispute,
            &format!("dispute {} of {session}", d.id.as_str()),
            self.event_id,
        )
        .await?;
        self.clawed_back(&m, "dispute", d.id.as_str()).await?;
        self.tx
            .execute(
                "UPDATE billing_checkouts SET clawed_back = credits, dispute_clawed = dispute_clawed + $2
                  WHERE session_id = $1",
                &[&session, &claw],
            )
            .await?;
        Ok((Some(account), "credits_disputed"))
    }

    /// A closed dispute: won, what it took comes back; lost, it stays taken.
    pub(super) async fn dispute_closed(&self, d: &Dispute) -> Result<Outcome, Error> {
        if !matches!(d.status, DisputeStatus::Won) {
            return Ok((None, "dispute_not_won"));
        }
        let Some(pi) = &d.payment_intent else {
            return Ok((None, "unmatched"));
        };
        let Some((session, account, _, _, taken)) =
            self.purchase_by_payment(pi.id().as_str()).await?
        else {
            return Ok((None, "unmatched"));
        };
        if taken <= 0 {
            return Ok((Some(account), "nothing_to_restore"));
        }
        let m = ledger::credit(
            self.tx,
            account,
            taken,
            Kind::DisputeWon,
            Some(&format!("dispute {} of {session} won", d.id.as_str())),
            Some(self.event_id),
        )
        .await?;
        self.granted(&m, "dispute_won", Some(d.id.as_str())).await?;
        self.tx
            .execute(
                "UPDATE billing_checkouts SET clawed_back = clawed_back - dispute_clawed, dispute_clawed = 0
                  WHERE session_id = $1",
                &[&session],
            )
            .await?;
        Ok((Some(account), "credits_restored"))
    }
}
