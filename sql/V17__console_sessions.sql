-- The customer console's sessions (src/console/session.rs). The cookie holds a random
-- 256-bit id; only its SHA-256 is stored, so a copy of this table cannot be replayed as a
-- login. A session ends at `expires_at` (absolute) or when it has not been seen for the idle
-- timeout, whichever comes first; logging out deletes the row.
CREATE TABLE console_sessions (
    id_hash      bytea PRIMARY KEY CHECK (length(id_hash) = 32),
    account_id   uuid NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL
);
CREATE INDEX console_sessions_account ON console_sessions (account_id);
CREATE INDEX console_sessions_expires ON console_sessions (expires_at);

-- What a customer does in the console is on the audit trail as done from the console
-- (actor = the client address), not as an API key's doing.
ALTER TABLE audit_events DROP CONSTRAINT audit_events_actor_type_check;
ALTER TABLE audit_events ADD CONSTRAINT audit_events_actor_type_check
    CHECK (actor_type IN ('admin_token', 'cli', 'api_key', 'login', 'console'));
