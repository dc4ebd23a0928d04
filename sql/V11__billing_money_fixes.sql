-- Billing on stripe-rust (issue 15): one plan per account, an invoice credits once,
-- disputes.

-- Disputes move credits under their own ledger kinds.
ALTER TABLE credit_ledger DROP CONSTRAINT credit_ledger_kind_check;
ALTER TABLE credit_ledger ADD CONSTRAINT credit_ledger_kind_check
    CHECK (kind IN ('grant', 'purchase', 'charge', 'refund', 'adjustment', 'clawback',
                    'dispute', 'dispute_won'));

-- The account's one current plan: the tier follows this subscription only, and an event
-- about any other subscription of the account never moves the tier.
ALTER TABLE billing_subscriptions ADD COLUMN current boolean NOT NULL DEFAULT false;
UPDATE billing_subscriptions SET current = true
 WHERE subscription_id IN (
     SELECT DISTINCT ON (account_id) subscription_id FROM billing_subscriptions
      WHERE status NOT IN ('canceled', 'incomplete_expired')
      ORDER BY account_id, last_event_created DESC);
CREATE UNIQUE INDEX billing_subscriptions_one_current
    ON billing_subscriptions (account_id) WHERE current;

-- Plan invoices whose credits were granted: the key is the invoice (with its period), so
-- two different events about one invoice credit once.
CREATE TABLE billing_invoices (
    invoice_id       text PRIMARY KEY,
    account_id       uuid NOT NULL REFERENCES accounts (id),
    subscription_id  text,
    period_start     bigint NOT NULL,
    period_end       bigint NOT NULL,
    amount_paid      bigint NOT NULL,
    credits          bigint NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now()
);

-- What an open dispute took back, so a won dispute restores exactly that, once.
ALTER TABLE billing_checkouts ADD COLUMN dispute_clawed bigint NOT NULL DEFAULT 0;
