-- Stripe billing. Every webhook effect is written in the same transaction as the event's id
-- in stripe_events, so a redelivered event changes nothing.

-- The Stripe customer of an account, created once.
CREATE TABLE billing_customers (
    account_id   uuid PRIMARY KEY REFERENCES accounts (id),
    customer_id  text NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- Checkout Sessions keymeter created: what was bought is taken from here (and the
-- configuration), never from metadata alone.
CREATE TABLE billing_checkouts (
    session_id      text PRIMARY KEY,
    account_id      uuid NOT NULL REFERENCES accounts (id),
    mode            text NOT NULL CHECK (mode IN ('payment', 'subscription')),
    item            text NOT NULL,
    credits         bigint NOT NULL CHECK (credits >= 0),
    payment_intent  text,
    fulfilled_at    timestamptz,
    clawed_back     bigint NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX billing_checkouts_payment_intent ON billing_checkouts (payment_intent);

-- The subscription state last applied, with the Stripe event time it came from, so an
-- older delivery arriving late never overwrites a newer state.
CREATE TABLE billing_subscriptions (
    subscription_id     text PRIMARY KEY,
    account_id          uuid NOT NULL REFERENCES accounts (id),
    plan                text,
    status              text NOT NULL,
    last_event_created  bigint NOT NULL,
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX billing_subscriptions_account ON billing_subscriptions (account_id);

-- Every verified event, once.
CREATE TABLE stripe_events (
    id           text PRIMARY KEY,
    type         text NOT NULL,
    created      bigint NOT NULL,
    account_id   uuid,
    outcome      text NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now()
);
