-- Housekeeping: deletes up to p_limit rows of what nothing needs any more, oldest first, in the
-- caller's (short) transaction: published outbox rows older than p_outbox_age, and idempotency
-- keys older than p_events_age. A key must outlive any redelivery or replay of its message:
-- once deleted, that message would apply again (a stock.adjusted delta twice).
-- Returns {outbox, processed_events}: rows deleted by this call.
CREATE OR REPLACE FUNCTION prune_housekeeping(p_outbox_age interval, p_events_age interval,
                                              p_limit integer DEFAULT 10000) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_outbox bigint;
    v_events bigint;
BEGIN
    PERFORM check_arg(p_events_age >= interval '1 day', 'idempotency keys are kept at least a day');
    DELETE FROM outbox WHERE id IN (
        SELECT id FROM outbox WHERE published_at IS NOT NULL AND created_at < now() - p_outbox_age
         ORDER BY id LIMIT p_limit FOR UPDATE SKIP LOCKED);
    GET DIAGNOSTICS v_outbox = ROW_COUNT;
    DELETE FROM processed_events WHERE event_id IN (
        SELECT event_id FROM processed_events WHERE processed_at < now() - p_events_age
         ORDER BY processed_at LIMIT p_limit FOR UPDATE SKIP LOCKED);
    GET DIAGNOSTICS v_events = ROW_COUNT;
    RETURN jsonb_build_object('outbox', v_outbox, 'processed_events', v_events);
END $$;
