-- Accounts and their API keys.
--
-- Emails are unique case-insensitively through an index on lower(email), so no extension
-- (citext) is needed on the server. Keys are stored as their public 12-character id (the
-- primary key: the one indexed lookup on the hot path) and the SHA-256 of the whole key;
-- the plaintext never reaches this database.

CREATE TABLE accounts (
    id              uuid PRIMARY KEY,
    email           text NOT NULL,
    password_hash   text,
    tier            text NOT NULL DEFAULT 'free',
    credit_balance  bigint NOT NULL DEFAULT 0,
    status          text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE UNIQUE INDEX accounts_email_key ON accounts (lower(email));

CREATE TABLE api_keys (
    id            text PRIMARY KEY CHECK (id ~ '^[0-9A-Za-z]{12}$'),
    account_id    uuid NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    name          text NOT NULL,
    digest        bytea NOT NULL CHECK (length(digest) = 32),
    scopes        text[] NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz,
    revoked_at    timestamptz,
    last_used_at  timestamptz,
    rotated_to    text REFERENCES api_keys (id),
    grace_until   timestamptz
);

-- Listing an account's keys, newest first, with a (created_at, id) cursor.
CREATE INDEX api_keys_account_created ON api_keys (account_id, created_at DESC, id DESC);

-- Failed logins per email, shared by every instance, for the 5-failures/15-minutes lockout.
CREATE TABLE login_failures (
    email_key     text PRIMARY KEY,
    failures      integer NOT NULL,
    window_start  timestamptz NOT NULL,
    locked_until  timestamptz
);
