-- The audit trail: one row per operator or security-relevant action, written in the same
-- transaction as the action itself, so a committed action always has its row and a rolled
-- back one never does.
--
-- Append-only in the database itself, not only by convention: a trigger refuses UPDATE and
-- DELETE row by row, and TRUNCATE for the table. Revoking privileges would not do it, since
-- keymeter usually connects as the table's owner and an owner may grant them back. The
-- triggers stop the application (and a mistaken hand-written query) from rewriting history;
-- a superuser can still drop them, which is a deliberate, visible act of its own.
--
-- No foreign key to accounts: a row must outlive whatever it describes.

CREATE TABLE audit_events (
    id          uuid PRIMARY KEY,
    -- The time of the transaction that did the action: the same instant as the action's own
    -- timestamps (a key's revoked_at, a ledger row's created_at).
    at          timestamptz NOT NULL DEFAULT now(),
    -- Who: 'admin_token' (the /admin API), 'cli' (`keymeter admin …`, actor = the OS user),
    -- 'api_key' (a customer's key, actor = its key id), 'login' (a password login attempt,
    -- actor = the client address).
    actor_type  text NOT NULL CHECK (actor_type IN ('admin_token', 'cli', 'api_key', 'login')),
    actor       text NOT NULL CHECK (length(actor) BETWEEN 1 AND 200),
    action      text NOT NULL CHECK (action ~ '^[a-z_]+\.[a-z_]+$'),
    -- What: the account concerned, and the key id when a key is the object.
    account_id  uuid,
    target      text CHECK (length(target) <= 200),
    -- The X-Request-Id of the HTTP request (none for the CLI).
    request_id  text CHECK (length(request_id) <= 64),
    -- A small JSON object of facts about the action; never a secret.
    detail      jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(detail) = 'object')
);

-- GET /admin/audit: newest first with a (at, id) cursor, optionally for one account.
CREATE INDEX audit_events_at ON audit_events (at DESC, id DESC);
CREATE INDEX audit_events_account_at ON audit_events (account_id, at DESC, id DESC);

CREATE FUNCTION audit_events_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER audit_events_no_update_or_delete
    BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();

CREATE TRIGGER audit_events_no_truncate
    BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();
