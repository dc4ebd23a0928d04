-- Webhook endpoints: where an account wants its events (`events`, V12) POSTed, and one
-- delivery row per (event, endpoint) that the senders of every instance work through.
--
-- No secret is stored: an endpoint's signing secret is derived from the server's key
-- (KEYMETER_EVENT_SIGNING_KEY) with HMAC over the endpoint id and `secret_generation`; a
-- rotation bumps the generation and keeps the previous one signing until
-- `previous_secret_expires_at`.

CREATE TABLE webhook_endpoints (
    id                          uuid PRIMARY KEY,
    account_id                  uuid NOT NULL REFERENCES accounts (id),
    url                         text NOT NULL CHECK (length(url) <= 2048),
    -- scheme://host[:port] of `url`, written by the server: the sender bounds what is in
    -- flight per destination, whichever accounts point at it.
    origin                      text NOT NULL,
    event_types                 text[] NOT NULL CHECK (cardinality(event_types) > 0),
    secret_generation           integer NOT NULL DEFAULT 1,
    previous_secret_expires_at  timestamptz,
    created_at                  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_endpoints_account ON webhook_endpoints (account_id, created_at DESC, id DESC);

-- One row per event and subscribed endpoint. Written by the trigger below in the transaction
-- that records the event, so a committed event always has its deliveries and the senders
-- never scan `events` by `seq` (whose order is not commit order).
CREATE TABLE event_deliveries (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    endpoint_id         uuid NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    account_id          uuid NOT NULL,
    event_id            text NOT NULL REFERENCES events (id),
    origin              text NOT NULL,
    attempts            integer NOT NULL DEFAULT 0,
    next_attempt_at     timestamptz NOT NULL DEFAULT now(),
    delivered_at        timestamptz,
    failed_at           timestamptz,
    last_status         integer,
    last_error          text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    UNIQUE (endpoint_id, event_id)
);
-- The fair claim walks the accounts with pending deliveries (a skip scan, one probe per
-- account) and takes each one's oldest due row, as the job webhooks' claim does (V7).
CREATE INDEX event_deliveries_pending ON event_deliveries (account_id, next_attempt_at)
    WHERE delivered_at IS NULL AND failed_at IS NULL;
-- GET /v1/webhook-endpoints/{id}/deliveries, newest first.
CREATE INDEX event_deliveries_endpoint ON event_deliveries (endpoint_id, id DESC);
CREATE INDEX event_deliveries_event ON event_deliveries (event_id);

-- Fan-out, per statement (a group commit's `record_many` is one statement): one join of the
-- new events with their accounts' endpoints, and a NOTIFY only when it queued something, so
-- an account without endpoints costs one index probe per statement and nothing else.
CREATE FUNCTION event_deliveries_fan_out() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    queued bigint;
BEGIN
    INSERT INTO event_deliveries (endpoint_id, account_id, event_id, origin)
    SELECT w.id, e.account_id, e.id, w.origin
      FROM new_events e
      JOIN webhook_endpoints w ON w.account_id = e.account_id AND e.type = ANY (w.event_types);
    GET DIAGNOSTICS queued = ROW_COUNT;
    IF queued > 0 THEN
        PERFORM pg_notify('keymeter_event_deliveries', '');
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER events_fan_out AFTER INSERT ON events
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION event_deliveries_fan_out();
