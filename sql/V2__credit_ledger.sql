-- The credit ledger: every change of an account's balance is one row here, written in the
-- same transaction (usually the same statement) as the balance update. Invariant for every
-- account, always: accounts.credit_balance = sum(credit_ledger.delta).

CREATE TABLE credit_ledger (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id       uuid NOT NULL REFERENCES accounts (id),
    delta            bigint NOT NULL CHECK (delta <> 0),
    balance_after    bigint NOT NULL,
    kind             text NOT NULL CHECK (kind IN ('grant', 'purchase', 'charge', 'refund', 'adjustment', 'clawback')),
    reason           text,
    job_id           uuid,
    idempotency_key  text,
    stripe_event_id  text,
    created_at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX credit_ledger_account_id ON credit_ledger (account_id, id DESC);
CREATE INDEX credit_ledger_account_time ON credit_ledger (account_id, created_at);

-- A job is charged at most once and refunded at most once, whatever retries or instances do.
CREATE UNIQUE INDEX credit_ledger_one_charge_per_job ON credit_ledger (job_id) WHERE kind = 'charge';
CREATE UNIQUE INDEX credit_ledger_one_refund_per_job ON credit_ledger (job_id) WHERE kind = 'refund';
-- A Stripe event moves a balance at most once per kind.
CREATE UNIQUE INDEX credit_ledger_one_row_per_event ON credit_ledger (stripe_event_id, kind)
    WHERE stripe_event_id IS NOT NULL;

-- Append-only: history is corrected by new rows (adjustments), never rewritten.
CREATE FUNCTION credit_ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'credit_ledger is append-only';
END;
$$;
CREATE TRIGGER credit_ledger_no_update_or_delete
    BEFORE UPDATE OR DELETE ON credit_ledger
    FOR EACH ROW EXECUTE FUNCTION credit_ledger_append_only();

-- The balance stays >= 0 unless a Stripe refund clawed back credits already spent; then
-- charges are refused until it is positive again.
ALTER TABLE accounts
    ADD COLUMN clawback_debt boolean NOT NULL DEFAULT false,
    ADD CONSTRAINT accounts_balance_not_negative CHECK (credit_balance >= 0 OR clawback_debt);
