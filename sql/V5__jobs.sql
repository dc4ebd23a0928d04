-- Scrape jobs: the durable queue every instance's workers share.
--
-- A job's cost is reserved (a `charge` ledger row with its job_id) in the transaction that
-- inserts it; the ledger's partial unique indexes keep it to one charge and one refund per
-- job whatever retries or instances do. Workers claim with FOR UPDATE SKIP LOCKED and hold
-- a lease (lease_owner, lease_expires_at) they renew while running; an expired lease means
-- the instance died, and the job is queued again (up to max_attempts) or failed and refunded.

CREATE TABLE jobs (
    id               uuid PRIMARY KEY,
    account_id       uuid NOT NULL REFERENCES accounts (id),
    status           text NOT NULL DEFAULT 'queued'
                     CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    -- `sync` jobs have an HTTP request waiting on them (POST /v1/scrape), `async` ones not.
    mode             text NOT NULL CHECK (mode IN ('sync', 'async')),
    url              text NOT NULL,
    formats          text[] NOT NULL,
    -- The customer's allow-listed request headers (cookies among them): cleared when the job
    -- finishes, so they are kept only while a worker may still need them.
    headers          jsonb,
    timeout_ms       integer NOT NULL CHECK (timeout_ms > 0),
    webhook_url      text,
    cost             bigint NOT NULL CHECK (cost > 0),
    -- The instance that took a sync job's request: while it drains for shutdown it still
    -- runs its own waiting requests' jobs.
    origin           uuid,
    attempts         integer NOT NULL DEFAULT 0,
    lease_owner      uuid,
    lease_expires_at timestamptz,
    result           jsonb,
    error            jsonb,
    upstream_status  integer,
    idempotency_key  text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz
);

-- The queue, oldest first.
CREATE INDEX jobs_queued ON jobs (created_at) WHERE status = 'queued';
-- Running jobs per account (the concurrency limit) and expired leases (the reaper).
CREATE INDEX jobs_running ON jobs (account_id) WHERE status = 'running';
CREATE INDEX jobs_leases ON jobs (lease_expires_at) WHERE status = 'running';
-- GET /v1/jobs: an account's jobs, newest first.
CREATE INDEX jobs_account ON jobs (account_id, created_at DESC, id DESC);

-- Webhook deliveries of finished jobs, written in the transaction that finishes the job, and
-- sent by any instance (FOR UPDATE SKIP LOCKED), retried with backoff.
CREATE TABLE job_webhooks (
    job_id           uuid PRIMARY KEY REFERENCES jobs (id),
    account_id       uuid NOT NULL REFERENCES accounts (id),
    url              text NOT NULL,
    event_id         uuid NOT NULL,
    event_type       text NOT NULL,
    payload          jsonb NOT NULL,
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    failed_at        timestamptz,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX job_webhooks_due ON job_webhooks (next_attempt_at)
    WHERE delivered_at IS NULL AND failed_at IS NULL;

-- The per-account webhook signing secret is derived from the server's signing key and this
-- version (HMAC), so no secret is stored here; bumping the version rotates it.
ALTER TABLE accounts ADD COLUMN webhook_secret_version integer NOT NULL DEFAULT 1;
