-- Auto-recharge (issue 15 §3): an off-session PaymentIntent for a pack when a charge takes
-- the balance below the account's threshold; and one plan checkout at a time.

-- Credits bought by an auto-recharge move under their own ledger kind.
ALTER TABLE credit_ledger DROP CONSTRAINT credit_ledger_kind_check;
ALTER TABLE credit_ledger ADD CONSTRAINT credit_ledger_kind_check
    CHECK (kind IN ('grant', 'purchase', 'charge', 'refund', 'adjustment', 'clawback',
                    'dispute', 'dispute_won', 'auto_recharge'));

-- What the charge statements test, on the row they already update, so the hot path needs no
-- extra query: a charge whose balance_after is below `recharge_below` while
-- `recharge_after` has passed wakes the recharger (NOTIFY, delivered at commit). NULL when
-- auto-recharge is off; `recharge_after` holds back the cool-down, the monthly cap and a
-- recharge in flight so a burst of charges below the threshold wakes it once, not per charge.
ALTER TABLE accounts ADD COLUMN recharge_below bigint;
ALTER TABLE accounts ADD COLUMN recharge_after timestamptz NOT NULL DEFAULT '-infinity';
CREATE INDEX accounts_recharge_armed ON accounts (id) WHERE recharge_below IS NOT NULL;

-- The card Stripe saved for off-session use (from a pack Checkout with
-- setup_future_usage=off_session, or a Checkout in setup mode).
ALTER TABLE billing_customers ADD COLUMN payment_method text;

-- An account's auto-recharge settings and the state that keeps recharges exact across
-- instances: a claim is a conditional UPDATE of this row (one in flight, cool-down, cap).
CREATE TABLE billing_auto_recharge (
    account_id       uuid PRIMARY KEY REFERENCES accounts (id),
    enabled          boolean NOT NULL,
    threshold        bigint NOT NULL CHECK (threshold >= 0),
    pack             text NOT NULL,
    max_per_month    integer NOT NULL CHECK (max_per_month BETWEEN 1 AND 1000),
    -- Why it was turned off by keymeter (a failed or unauthenticated payment), for GET /v1/billing.
    disabled_reason  text,
    disabled_at      timestamptz,
    in_flight        text,
    last_started_at  timestamptz,
    month            text,
    month_count      integer NOT NULL DEFAULT 0,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- Every recharge started: the id is the Stripe idempotency key, derived from the ledger row
-- whose charge triggered it. Credits are granted from this row, once (status).
CREATE TABLE billing_recharges (
    id              text PRIMARY KEY,
    account_id      uuid NOT NULL REFERENCES accounts (id),
    trigger_entry   bigint NOT NULL,
    pack            text NOT NULL,
    credits         bigint NOT NULL CHECK (credits > 0),
    payment_intent  text UNIQUE,
    status          text NOT NULL CHECK (status IN ('claimed', 'pending', 'succeeded', 'failed')),
    failure         text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    settled_at      timestamptz
);
CREATE INDEX billing_recharges_account ON billing_recharges (account_id, created_at DESC);

-- One plan checkout at a time (issue 15 §2, the race two concurrent plan checkouts won):
-- a plan checkout is claimed here, before Stripe is asked, and stays open until its session
-- completes or expires. The unique index makes the claim exact across requests and instances
-- without holding a lock (or a connection) while Stripe answers.
ALTER TABLE billing_checkouts ADD COLUMN plan_open boolean NOT NULL DEFAULT false;
ALTER TABLE billing_checkouts ADD COLUMN expires_at timestamptz;
CREATE UNIQUE INDEX billing_checkouts_one_open_plan ON billing_checkouts (account_id) WHERE plan_open;
