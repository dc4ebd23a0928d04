-- Gateway mode (#18): each charge keymeter makes for a proxied call to a customer's API, so the
-- upstream can refund it at most once and a proxy's retry (same X-Request-Id) is charged once.
-- The money itself is the ledger row `ledger_id` (kind 'charge'), written in the same
-- transaction as this row; a refund is another ledger row (kind 'refund'), `refund_id`.
CREATE TABLE gateway_charges (
    ledger_id   bigint PRIMARY KEY,
    account_id  uuid NOT NULL,
    -- The proxy's X-Request-Id, when it sent a usable one.
    request_id  text,
    -- The priced route, as the routes file names it (`GET /v1/search/*`).
    route       text NOT NULL,
    amount      bigint NOT NULL CHECK (amount > 0),
    refund_id   bigint UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- One charge per (account, request id), whatever instances or retries do.
CREATE UNIQUE INDEX gateway_charges_one_per_request ON gateway_charges (account_id, request_id)
    WHERE request_id IS NOT NULL;
