-- Each claim of an Idempotency-Key carries a token, new on every claim and on every takeover
-- of an abandoned one. A request completes (stores its response) or releases the key only
-- while the row still holds its own token, in the transaction that does its work; so when a
-- retry has taken over from a slow first attempt, the first attempt's completion matches no
-- row, its transaction (and the charge in it) is rolled back, and only one of them charges.
--
-- Nullable and without a default, so adding it rewrites nothing: rows claimed before this
-- migration have no token and are completed only by the instance that claimed them.

ALTER TABLE idempotency_keys ADD COLUMN token uuid;
