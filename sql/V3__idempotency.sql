-- Idempotency records: one per (account, Idempotency-Key), kept 24 hours.
--
-- A record is claimed (status NULL) in its own statement before the work starts, so a
-- concurrent duplicate sees it at once and gets 409 instead of waiting; it is completed in
-- the same transaction as the work's own writes (a charge and its stored response commit
-- together or not at all). A claim whose request died is reclaimable after a timeout.

CREATE TABLE idempotency_keys (
    account_id     uuid NOT NULL REFERENCES accounts (id),
    key            text NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    request_hash   bytea NOT NULL,
    status         smallint,
    response_body  bytea,
    location       text,
    claimed_at     timestamptz NOT NULL DEFAULT now(),
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, key)
);

CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
