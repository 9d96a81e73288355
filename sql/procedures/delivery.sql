-- Poison detection by the worker (see migration 050): an attempt is noted, and committed,
-- just before a redelivered message is applied on its own; only a message whose application
-- keeps being interrupted accumulates attempts. Returns the count per id.
CREATE OR REPLACE FUNCTION note_delivery_attempts(p_ids uuid[])
RETURNS TABLE (event_id uuid, attempts integer)
LANGUAGE sql AS $$
    INSERT INTO delivery_attempts AS d (event_id, attempts)
    SELECT DISTINCT id, 1 FROM unnest(p_ids) AS t(id)
    ON CONFLICT ON CONSTRAINT delivery_attempts_pkey
    DO UPDATE SET attempts = d.attempts + 1, last_attempt_at = now()
    RETURNING d.event_id, d.attempts
$$;

-- Once applied (or dead-lettered) a message needs no count; old rows are pruned anyway.
CREATE OR REPLACE FUNCTION forget_delivery_attempts(p_ids uuid[]) RETURNS void
LANGUAGE sql AS $$
    DELETE FROM delivery_attempts
     WHERE event_id = ANY(p_ids) OR last_attempt_at < now() - interval '7 days'
$$;
