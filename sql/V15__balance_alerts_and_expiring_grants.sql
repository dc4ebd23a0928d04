-- Issue 16 §2 and §3: low-balance alerts and expiring credit grants.

-- §2. The account's own low-balance threshold; NULL follows its tier's default, which every
-- instance writes into `tier_alert_defaults` from its tiers configuration at start-up (so a
-- charge reads the threshold in its own statement, without a round trip for the tier).
-- No separate "armed" flag: a charge fires `balance.low` exactly when it takes the balance
-- from >= threshold to < threshold, decided under the account's row lock in the statement
-- that moves the balance — the balance itself is the arm state, so it cannot drift from it.
ALTER TABLE accounts
    ADD COLUMN low_balance_threshold bigint
        CONSTRAINT accounts_low_balance_threshold_range
        CHECK (low_balance_threshold BETWEEN 0 AND 1000000000000000);

CREATE TABLE tier_alert_defaults (
    tier                   text PRIMARY KEY,
    low_balance_threshold  bigint NOT NULL CHECK (low_balance_threshold >= 0),
    updated_at             timestamptz NOT NULL DEFAULT now()
);

-- §3. Expiring grants. `expiring_credits` is what is left of the account's open expiring
-- grants; a charge spends it first (in the statement that moves the balance), so accounts
-- without expiring grants (0) never touch `credit_grants` on the hot path. How a charge's
-- share is spread over the grants (earliest expiry first) is settled under the account's
-- row lock when the set of open grants changes — a new grant, an expiry — see
-- `credits::grants`.
ALTER TABLE accounts
    ADD COLUMN expiring_credits bigint NOT NULL DEFAULT 0
        CONSTRAINT accounts_expiring_credits_not_negative CHECK (expiring_credits >= 0);

ALTER TABLE credit_ledger DROP CONSTRAINT credit_ledger_kind_check;
ALTER TABLE credit_ledger ADD CONSTRAINT credit_ledger_kind_check
    CHECK (kind IN ('grant', 'purchase', 'charge', 'refund', 'adjustment', 'clawback',
                    'dispute', 'dispute_won', 'auto_recharge', 'expiry'));

CREATE TABLE credit_grants (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id      uuid NOT NULL REFERENCES accounts (id),
    -- The `grant` ledger row that added the credits.
    ledger_id       bigint NOT NULL,
    amount          bigint NOT NULL CHECK (amount > 0),
    -- As of the last settlement (see above); exact once the grant is closed.
    remaining       bigint NOT NULL CHECK (remaining BETWEEN 0 AND amount),
    expires_at      timestamptz NOT NULL,
    -- Set when the sweeper closed the grant; `expired_amount` is what its `expiry` row took.
    expired_at      timestamptz,
    expired_amount  bigint,
    expiry_ledger_id bigint,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- The open grants of an account, in the order charges spend them.
CREATE INDEX credit_grants_open ON credit_grants (account_id, expires_at, id)
    WHERE expired_at IS NULL;
-- What the sweeper looks for.
CREATE INDEX credit_grants_due ON credit_grants (expires_at) WHERE expired_at IS NULL;
