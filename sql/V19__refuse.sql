-- Lets a statement refuse from inside its own SQL, and so abort its transaction. A job's
-- creation is sent as one flight — BEGIN, the reservation, the insert and COMMIT together
-- (jobs::queue::create_at_once) — and when the insert finds the account's queue full after
-- the reservation was written, only an error can still roll that reservation back: the
-- COMMIT is already on its way. The code is keymeter's own (class KM), `reason` a stable
-- slug the server matches, `detail` what it needs to answer (the queued count).
-- VOLATILE, so the planner never folds a call with constant arguments into an error at plan
-- time: it runs only where a CASE reaches it.
CREATE FUNCTION keymeter_refuse(reason text, detail text) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'KM001', MESSAGE = reason, DETAIL = detail;
END
$$;
