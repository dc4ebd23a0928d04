-- Per-key spend caps and usage by key (#16 §4).
--
-- Every charge and refund names the key that caused it. Rows written before this migration
-- have no key (NULL). No foreign key: keys are never deleted, and a foreign-key check on the
-- charge hot path would cost an index probe and a share lock on the key's row per charge.
ALTER TABLE credit_ledger ADD COLUMN key_id text;

-- A key's spend limit and its counter for the current period. A row exists only while the
-- key has a limit; `spent` is the credits the key's charges took in the period starting at
-- `period_start` (a UTC calendar day or month), net of refunds given back in that period.
-- The counter is moved under this row's lock in the transaction of each charge, so it is as
-- exact as the balance. `reached_period` is the `period_start` of the last period whose
-- `key.spend_limit_reached` event was recorded (once per period).
CREATE TABLE key_spend_limits (
    key_id          text PRIMARY KEY REFERENCES api_keys (id),
    account_id      uuid NOT NULL REFERENCES accounts (id),
    credits         bigint NOT NULL CHECK (credits > 0),
    period          text NOT NULL CHECK (period IN ('day', 'month')),
    period_start    timestamptz NOT NULL,
    spent           bigint NOT NULL DEFAULT 0 CHECK (spent >= 0),
    reached_period  timestamptz
);
CREATE INDEX key_spend_limits_account ON key_spend_limits (account_id);

-- True while any key of the account has a spend limit. Every charge already locks and
-- updates the account row, so this flag, checked in the charge's own WHERE clause, is what
-- lets accounts without limited keys pay nothing for the feature: their charges never look
-- at key_spend_limits. Setting or removing a limit updates the flag under the same row
-- lock, so a charge can never slip past a limit set concurrently (its recheck sees the flag).
ALTER TABLE accounts ADD COLUMN key_spend_limits boolean NOT NULL DEFAULT false;
