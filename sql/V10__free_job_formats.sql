-- A tier may price a format at 0 (a free format). A job whose formats are all free costs 0:
-- it reserves nothing and so has no `charge` ledger row (the ledger records credit
-- movements, and a zero-delta row would be none), and nothing to refund. Every other job
-- still reserves its cost as before.
ALTER TABLE jobs DROP CONSTRAINT jobs_cost_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_cost_check CHECK (cost >= 0);
