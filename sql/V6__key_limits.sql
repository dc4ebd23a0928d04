-- Limits belong to the account: a key may carry its own, lower request limit, and the number
-- of active keys an account holds is capped by its tier.

-- Requests per minute this key may make on its own (at most its tier's, checked when the key
-- is created); NULL: only the account's tier limit applies.
ALTER TABLE api_keys
    ADD COLUMN rate_limit integer CHECK (rate_limit IS NULL OR rate_limit > 0);

-- Counting an account's active keys when one is created, under the account's row lock.
-- A rotated key is counted by its successor, so it leaves the count when it is rotated.
CREATE INDEX api_keys_account_active ON api_keys (account_id, expires_at)
    WHERE revoked_at IS NULL AND rotated_to IS NULL;
