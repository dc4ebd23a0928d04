-- Job webhooks are sent fairly: each pass of the sender takes at most one due delivery per
-- account (round robin over the accounts that have any) and per destination origin, and skips
-- accounts and origins that already have their bounded number in flight. So one account's
-- thousands of deliveries, or an endpoint that accepts and never answers, only ever delay
-- that account's or that endpoint's own deliveries.
--
-- The origin (scheme://host[:port], user info dropped) is derived from the stored URL, which
-- the server wrote normalised (lower-case scheme and host, default port omitted).
ALTER TABLE job_webhooks ADD COLUMN origin text GENERATED ALWAYS AS (
    lower(regexp_replace(url, '^([A-Za-z][A-Za-z0-9+.-]*://)([^@/?#]*@)?([^/?#]*).*$', '\1\3'))
) STORED;

-- The round robin walks the accounts with pending deliveries in id order (a skip scan: one
-- index probe per account, whatever it has queued), then takes each one's oldest due row.
CREATE INDEX job_webhooks_pending_by_account ON job_webhooks (account_id, next_attempt_at)
    WHERE delivered_at IS NULL AND failed_at IS NULL;
-- The global due index served the old oldest-first claim; left in place, the planner prefers it
-- for one account's oldest due row and walks every other account's backlog to find it.
DROP INDEX job_webhooks_due;

-- Expired login-failure windows are purged by their end (see accounts::login).
CREATE INDEX login_failures_window ON login_failures (window_start);
