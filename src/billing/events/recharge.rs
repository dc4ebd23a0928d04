//! Auto-recharge outcomes (see `billing::auto_recharge`) and the saved card.
//!
//! A PaymentIntent is an auto-recharge's when its metadata names one of *our* recharge rows
//! (`keymeter_recharge`) and its customer is that account's: the row, not the event, says
//! how many credits. Every other PaymentIntent (a Checkout purchase's) is ignored here.

use stripe_shared::{CheckoutSession, PaymentIntent};
use uuid::Uuid;

use super::{Ctx, Error, Outcome};
use crate::billing::auto_recharge;
use crate::credits::ledger::{self, Kind};
use crate::events::EventType;

fn recharge_id(pi: &PaymentIntent) -> Option<&str> {
    pi.metadata
        .get("keymeter_recharge")
        .map(String::as_str)
        .filter(|k| k.starts_with("keymeter-recharge-"))
}

/// Why a PaymentIntent failed, in Stripe's words (`card_declined: insufficient_funds`…).
fn failure(pi: &PaymentIntent) -> String {
    match pi.last_payment_error.as_deref() {
        Some(e) => match (
            e.code.as_ref().map(|c| c.as_str().to_owned()),
            e.decline_code.clone(),
        ) {
            (Some(c), Some(d)) => format!("{c}: {d}"),
            (Some(c), None) => c,
            (None, Some(d)) => d,
            (None, None) => "payment_failed".to_owned(),
        },
        None => "payment_failed".to_owned(),
    }
}

impl Ctx<'_, '_> {
    /// A recharge paid: its pack's credits, once.
    pub(super) async fn recharge_succeeded(&self, pi: &PaymentIntent) -> Result<Outcome, Error> {
        let Some(id) = recharge_id(pi) else {
            return Ok((None, "ignored"));
        };
        let customer = pi.customer.as_ref().map(|c| c.id().as_str());
        let row = self
            .tx
            .query_opt(
                "UPDATE billing_recharges r
                    SET status = 'succeeded', payment_intent = $2, failure = NULL, settled_at = now()
                  WHERE r.id = $1 AND r.status <> 'succeeded'
                    AND EXISTS (SELECT 1 FROM billing_customers c
                                 WHERE c.account_id = r.account_id AND c.customer_id = $3)
              RETURNING r.account_id, r.credits, r.pack",
                &[&id, &pi.id.as_str(), &customer],
            )
            .await?;
        let Some(row) = row else {
            let known = self
                .tx
                .query_opt(
                    "SELECT account_id FROM billing_recharges WHERE id = $1 AND status = 'succeeded'",
                    &[&id],
                )
                .await?;
            return Ok(match known {
                Some(r) => (Some(r.get(0)), "already_recharged"),
                None => (None, "unmatched"),
            });
        };
        let (account, credits, pack): (Uuid, i64, String) = (row.get(0), row.get(1), row.get(2));
        let m = ledger::credit(
            self.tx,
            account,
            credits,
            Kind::AutoRecharge,
            Some(&format!("auto-recharge pack {pack}")),
            Some(self.event_id),
        )
        .await?;
        // Recorded like a purchase, so a refund or dispute of this payment takes it back.
        self.tx
            .execute(
                "INSERT INTO billing_checkouts (session_id, account_id, mode, item, credits, payment_intent, fulfilled_at)
                 VALUES ($1, $2, 'payment', $3, $4, $5, now()) ON CONFLICT (session_id) DO NOTHING",
                &[&id, &account, &format!("auto-recharge {pack}"), &credits, &pi.id.as_str()],
            )
            .await?;
        self.tx
            .execute(
                "UPDATE billing_auto_recharge SET in_flight = NULL, updated_at = now()
                  WHERE account_id = $1 AND in_flight = $2",
                &[&account, &id],
            )
            .await?;
        self.granted(&m, "auto_recharge", Some(pi.id.as_str()))
            .await?;
        Ok((Some(account), "auto_recharged"))
    }

    /// A recharge that failed or needs the customer: auto-recharge goes off, with why.
    pub(super) async fn recharge_failed(
        &self,
        kind: &str,
        pi: &PaymentIntent,
    ) -> Result<Outcome, Error> {
        let Some(id) = recharge_id(pi) else {
            return Ok((None, "ignored"));
        };
        let why = if kind == "payment_intent.requires_action" {
            "authentication_required".to_owned()
        } else {
            failure(pi)
        };
        match auto_recharge::fail(self.tx, id, &why, Some(pi.id.as_str())).await? {
            Some(account) => Ok((Some(account), "auto_recharge_disabled")),
            None => Ok((None, "recharge_already_settled")),
        }
    }

    /// The card a completed session saved (`saved`, read from Stripe's copy before the
    /// transaction) becomes the customer's card for auto-recharge.
    pub(super) async fn save_card(
        &self,
        s: &CheckoutSession,
        saved: Option<&str>,
    ) -> Result<Option<Uuid>, Error> {
        let (Some(customer), Some(pm)) = (s.customer.as_ref().map(|c| c.id().as_str()), saved)
        else {
            return Ok(None);
        };
        Ok(self
            .tx
            .query_opt(
                "UPDATE billing_customers SET payment_method = $2 WHERE customer_id = $1 RETURNING account_id",
                &[&customer, &pm],
            )
            .await?
            .map(|r| r.get(0)))
    }

    /// `credits.granted` for a movement just written, on the event's transaction.
    pub(super) async fn granted(
        &self,
        m: &ledger::Movement,
        source: &str,
        reference: Option<&str>,
    ) -> Result<(), Error> {
        crate::events::record(
            self.tx,
            m.account_id,
            EventType::CreditsGranted,
            serde_json::json!({
                "amount": m.delta,
                "source": source,
                "ledger_entry": m.id,
                "balance_after": m.balance_after,
                "reference": reference,
            }),
        )
        .await?;
        Ok(())
    }

    /// `credits.clawed_back` for a movement just written, on the event's transaction.
    pub(super) async fn clawed_back(
        &self,
        m: &ledger::Movement,
        source: &str,
        reference: &str,
    ) -> Result<(), Error> {
        crate::events::record(
            self.tx,
            m.account_id,
            EventType::CreditsClawedBack,
            serde_json::json!({
                "amount": -m.delta,
                "source": source,
                "ledger_entry": m.id,
                "balance_after": m.balance_after,
                "reference": reference,
            }),
        )
        .await?;
        Ok(())
    }
}
