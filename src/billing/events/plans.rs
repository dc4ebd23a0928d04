//! Plans: paid invoices (a period's credits, once per invoice) and subscription changes (the
//! tier follows the account's one current subscription, and nothing else).
//!
//! **Which invoices credit.** A plan invoice grants its plan's `monthly_credits` when it
//! starts a subscription or renews it (`billing_reason` `subscription_create` or
//! `subscription_cycle`) and something was paid (`amount_paid > 0`). A $0 invoice (a trial,
//! a full discount) and a proration invoice (`subscription_update`, a plan change mid-period)
//! credit nothing: the new plan's credits arrive with its next renewal. The grant is keyed by
//! the invoice id (with its period recorded), so two events about one invoice credit once.

use stripe_shared::{Invoice, InvoiceBillingReason, Subscription};
use uuid::Uuid;

use super::{invalid, Ctx, Error, Outcome};
use crate::accounts;
use crate::credits::ledger::{self, Kind};
use crate::tiers::DEFAULT_TIER;

/// Whether a paid plan invoice grants the plan's credits (see the module doc).
fn credits_due(inv: &Invoice) -> bool {
    inv.amount_paid > 0
        && matches!(
            inv.billing_reason,
            Some(
                InvoiceBillingReason::SubscriptionCreate | InvoiceBillingReason::SubscriptionCycle
            )
        )
}

impl Ctx<'_, '_> {
    /// A paid plan invoice: the period's credits (once per invoice) and, when it belongs to
    /// the account's current subscription, the plan's tier.
    pub(super) async fn invoice_paid(&self, inv: &Invoice) -> Result<Outcome, Error> {
        let invoice_id = inv
            .id
            .as_ref()
            .map(|i| i.as_str())
            .ok_or_else(|| invalid("invoice without id"))?;
        let plan = inv
            .lines
            .data
            .iter()
            .filter_map(|line| {
                line.pricing
                    .as_ref()
                    .and_then(|p| p.price_details.as_ref())
                    .map(|d| d.price.id().as_str())
            })
            .find_map(|price| self.billing.plan_by_price(price));
        let Some(plan) = plan else {
            return Ok((None, "not_a_plan_invoice"));
        };
        let sub_parent = inv
            .parent
            .as_ref()
            .and_then(|p| p.subscription_details.as_ref());
        let subscription = sub_parent
            .map(|d| d.subscription.id().as_str().to_owned())
            .or_else(|| {
                inv.lines
                    .data
                    .iter()
                    .find_map(|l| l.subscription.as_ref().map(|s| s.id().as_str().to_owned()))
            });
        let subscription = subscription.as_deref();
        let mut account = self
            .account_by_customer(inv.customer.as_ref().map(|c| c.id().as_str()))
            .await?;
        if account.is_none() {
            if let Some(sub) = subscription {
                account = self
                    .tx
                    .query_opt(
                        "SELECT account_id FROM billing_subscriptions WHERE subscription_id = $1",
                        &[&sub],
                    )
                    .await?
                    .map(|r| r.get(0));
            }
        }
        if account.is_none() {
            let meta = sub_parent
                .and_then(|d| d.metadata.as_ref())
                .and_then(|m| m.get("account_id"));
            account = self.existing_account(meta.map(String::as_str)).await?;
        }
        let Some(account) = account else {
            return Ok((None, "unmatched"));
        };
        let credits = if credits_due(inv) {
            plan.monthly_credits
        } else {
            0
        };
        // The invoice is the key: a second event about it (invoice.paid redelivered under a
        // new id, invoice.payment_succeeded…) finds it and grants nothing.
        let first = self
            .tx
            .query_opt(
                "INSERT INTO billing_invoices
                     (invoice_id, account_id, subscription_id, period_start, period_end, amount_paid, credits)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (invoice_id) DO NOTHING RETURNING 1",
                &[
                    &invoice_id,
                    &account,
                    &subscription,
                    &inv.period_start,
                    &inv.period_end,
                    &inv.amount_paid,
                    &credits,
                ],
            )
            .await?
            .is_some();
        if !first {
            return Ok((Some(account), "invoice_already_credited"));
        }
        if credits > 0 {
            let m = ledger::credit(
                self.tx,
                account,
                credits,
                Kind::Purchase,
                Some(&format!("plan {} period", plan.name)),
                Some(self.event_id),
            )
            .await?;
            self.granted(&m, "plan", Some(invoice_id)).await?;
            // Recorded like a checkout, so a refund or dispute of this invoice's payment can
            // take the credits back.
            let payment_intent = inv.payments.as_ref().and_then(|p| {
                p.data.iter().find_map(|p| {
                    p.payment
                        .payment_intent
                        .as_ref()
                        .map(|pi| pi.id().as_str().to_owned())
                })
            });
            self.tx
                .execute(
                    "INSERT INTO billing_checkouts (session_id, account_id, mode, item, credits, payment_intent, fulfilled_at)
                     VALUES ($1, $2, 'subscription', $3, $4, $5, now()) ON CONFLICT (session_id) DO NOTHING",
                    &[&invoice_id, &account, &plan.name, &credits, &payment_intent],
                )
                .await?;
        }
        // The tier follows the plan unless a newer event already ended the subscription, or
        // another subscription is the account's current plan.
        let ended_later = match subscription {
            Some(sub) => self
                .tx
                .query_opt(
                    "SELECT 1 FROM billing_subscriptions
                      WHERE subscription_id = $1 AND status = 'canceled' AND last_event_created > $2",
                    &[&sub, &self.created],
                )
                .await?
                .is_some(),
            None => false,
        };
        if !ended_later {
            let current = match subscription {
                Some(sub) => {
                    self.record_subscription(sub, account, Some(&plan.name), "active")
                        .await?;
                    self.make_current(account, sub).await?
                }
                None => true,
            };
            if current {
                self.apply_tier(account, &plan.tier).await?;
            }
        }
        Ok((
            Some(account),
            if credits > 0 {
                "plan_period_paid"
            } else {
                "plan_invoice_without_credits"
            },
        ))
    }

    async fn record_subscription(
        &self,
        sub: &str,
        account: Uuid,
        plan: Option<&str>,
        status: &str,
    ) -> Result<(), Error> {
        self.tx
            .execute(
                "INSERT INTO billing_subscriptions (subscription_id, account_id, plan, status, last_event_created)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (subscription_id) DO UPDATE
                    SET plan = COALESCE(EXCLUDED.plan, billing_subscriptions.plan), status = EXCLUDED.status,
                        last_event_created = EXCLUDED.last_event_created, updated_at = now()
                  WHERE billing_subscriptions.last_event_created <= EXCLUDED.last_event_created",
                &[&sub, &account, &plan, &status, &self.created],
            )
            .await?;
        Ok(())
    }

    /// Makes `sub` the account's current plan unless another subscription already is;
    /// answers whether `sub` is the current one. The account's row lock orders concurrent
    /// events of one account, so two subscriptions can never both become current.
    async fn make_current(&self, account: Uuid, sub: &str) -> Result<bool, Error> {
        self.tx
            .execute(
                "SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE",
                &[&account],
            )
            .await?;
        // A live subscription is what the open plan checkout was for (its
        // `checkout.session.completed` may come later, or never): release the claim, so the
        // account can buy a plan again once this one ends.
        self.tx
            .execute(
                "UPDATE billing_checkouts SET plan_open = false WHERE account_id = $1 AND plan_open",
                &[&account],
            )
            .await?;
        let current: Option<String> = self
            .tx
            .query_opt(
                "SELECT subscription_id FROM billing_subscriptions WHERE account_id = $1 AND current",
                &[&account],
            )
            .await?
            .map(|r| r.get(0));
        match current {
            Some(c) => Ok(c == sub),
            None => {
                self.tx
                    .execute(
                        "UPDATE billing_subscriptions SET current = true
                          WHERE subscription_id = $1 AND account_id = $2",
                        &[&sub, &account],
                    )
                    .await?;
                Ok(true)
            }
        }
    }

    async fn apply_tier(&self, account: Uuid, tier: &str) -> Result<(), Error> {
        let tier = if self.tiers.get(tier).is_some() {
            tier
        } else {
            DEFAULT_TIER
        };
        let current = accounts::get(self.tx, account)
            .await?
            .ok_or(Error::AccountNotFound)?;
        if current.tier != tier {
            accounts::set_tier(self.tx, self.tiers, account, tier).await?;
        }
        Ok(())
    }

    /// Plan changes and cancellations. An event older than the state we hold is ignored, and
    /// so (for the tier) is an event about a subscription that is not the account's current
    /// plan: its state is recorded, the tier stays that of the current plan.
    pub(super) async fn subscription_changed(
        &self,
        kind: &str,
        sub: &Subscription,
    ) -> Result<Outcome, Error> {
        let sub_id = sub.id.as_str();
        let status = if kind == "customer.subscription.deleted" {
            "canceled"
        } else {
            sub.status.as_str()
        };
        let existing = self
            .tx
            .query_opt(
                "SELECT account_id, status, last_event_created FROM billing_subscriptions
                  WHERE subscription_id = $1 FOR UPDATE",
                &[&sub_id],
            )
            .await?;
        let mut account: Option<Uuid> = existing.as_ref().map(|r| r.get(0));
        if let Some(r) = &existing {
            let (held_status, held_at): (String, i64) = (r.get(1), r.get(2));
            let older = held_at > self.created;
            // Same second: cancellation is final, nothing at that instant may undo it.
            let undoes_cancel =
                held_at == self.created && held_status == "canceled" && status != "canceled";
            if older || undoes_cancel {
                return Ok((account, "stale_ignored"));
            }
        }
        if account.is_none() {
            account = self
                .account_by_customer(Some(sub.customer.id().as_str()))
                .await?;
        }
        if account.is_none() {
            account = self
                .existing_account(sub.metadata.get("account_id").map(String::as_str))
                .await?;
        }
        let Some(account) = account else {
            return Ok((None, "unmatched"));
        };
        let plan = sub
            .items
            .data
            .iter()
            .find_map(|item| self.billing.plan_by_price(item.price.id.as_str()));
        self.record_subscription(sub_id, account, plan.map(|p| p.name.as_str()), status)
            .await?;
        let current = match status {
            "active" | "trialing" => self.make_current(account, sub_id).await?,
            _ => self
                .tx
                .query_opt(
                    "SELECT 1 FROM billing_subscriptions WHERE subscription_id = $1 AND current",
                    &[&sub_id],
                )
                .await?
                .is_some(),
        };
        if !current {
            return Ok((Some(account), "not_current_plan"));
        }
        match status {
            "active" | "trialing" => {
                if let Some(p) = plan {
                    self.apply_tier(account, &p.tier).await?;
                    return Ok((Some(account), "tier_set"));
                }
                Ok((Some(account), "no_plan_matched"))
            }
            "canceled" | "unpaid" | "incomplete_expired" => {
                self.tx
                    .execute(
                        "UPDATE billing_subscriptions SET current = false WHERE subscription_id = $1",
                        &[&sub_id],
                    )
                    .await?;
                self.apply_tier(account, DEFAULT_TIER).await?;
                Ok((Some(account), "tier_reset"))
            }
            // past_due, incomplete, paused: keep the tier while Stripe retries the payment.
            _ => Ok((Some(account), "status_recorded")),
        }
    }
}
