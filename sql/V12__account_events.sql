-- Account events: the outbox behind webhook endpoints and `GET /v1/events`. Every row is
-- written in the same transaction as the ledger row or state change it describes, so a
-- committed change always has its event and a rolled-back one never does.
--
-- `seq` orders events for cursors and for the sender that fans them out to endpoints (it is
-- assigned at insert; a sender reading "seq > last seen" must allow for a transaction that
-- took a lower seq and commits later — see `events::delivery`). `id` is the public,
-- stable identifier receivers deduplicate on.

CREATE TABLE events (
    id          text PRIMARY KEY CHECK (id ~ '^evt_[0-9a-f]{32}$'),
    seq         bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    account_id  uuid NOT NULL REFERENCES accounts (id),
    type        text NOT NULL CHECK (type ~ '^[a-z_]+\.[a-z_]+$'),
    payload     jsonb NOT NULL CHECK (jsonb_typeof(payload) = 'object'),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- GET /v1/events: newest first per account, optionally one type.
CREATE INDEX events_account_seq ON events (account_id, seq DESC);
CREATE INDEX events_account_type_seq ON events (account_id, type, seq DESC);
