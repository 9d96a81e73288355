-- An order's life after placement (spec Part B): reservation.extended (4.2). Each takes the
-- orders row lock first; that lock decides races with the sweeper (expire_reservations()
-- re-checks status and deadline under it).

-- Options the worker passes to apply_events() (p_options): its settings the procedures need.
CREATE OR REPLACE FUNCTION option_seconds(p_options jsonb, p_name text, p_default integer) RETURNS interval
LANGUAGE sql IMMUTABLE AS $$
    SELECT make_interval(secs => coalesce((p_options->>p_name)::integer, p_default))
$$;

-- Why an order cannot be changed any more (it is not `reserved`, or its hold lapsed), as the
-- reason of inventory.rejected; NULL when it can. A due hold not yet swept counts as expired.
CREATE OR REPLACE FUNCTION order_refusal(p_status text, p_expires_at timestamptz) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN p_status IS NULL OR p_status = 'placing' THEN 'unknown_order'
        WHEN p_status IN ('cancelled', 'released') THEN 'order_cancelled'
        WHEN p_status = 'committed' THEN 'order_completed'
        WHEN p_status = 'expired' OR p_expires_at <= now() THEN 'reservation_expired'
    END
$$;

-- reservation.extended: a later deadline (never past created_at + the longest lifetime) or
-- none (held until fulfilled or cancelled: expires_at NULL, which the sweeper never takes).
CREATE OR REPLACE FUNCTION extend_reservation(p_event_id uuid, p_data jsonb, p_options jsonb DEFAULT '{}')
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_order_id text := p_data->>'order_id';
    o          record;
    v_reason   text;
    v_new      timestamptz;
BEGIN
    -- Nothing is remembered for an unknown order (no tombstone, unlike order.cancelled).
    SELECT status, expires_at, created_at INTO o FROM orders WHERE order_id = v_order_id FOR UPDATE;
    v_reason := order_refusal(o.status, o.expires_at);
    IF v_reason IS NOT NULL THEN
        RETURN rejected(p_event_id, v_order_id, v_reason);
    END IF;
    IF o.expires_at IS NULL THEN  -- held until fulfilled already: nothing to lengthen
        RETURN jsonb_build_object('outcome', 'ignored', 'order_id', v_order_id, 'status', o.status,
                                  'messages', '[]'::jsonb, 'products', '[]'::jsonb);
    END IF;
    IF NOT (p_data ? 'until_fulfilled') THEN
        v_new := least(greatest(o.expires_at, now() + make_interval(secs => (p_data->>'extend_by_seconds')::integer)),
                       o.created_at + option_seconds(p_options, 'max_reservation_lifetime_seconds', 604800));
        IF v_new <= o.expires_at THEN
            RETURN rejected(p_event_id, v_order_id, 'extension_limit');
        END IF;
    END IF;
    UPDATE orders SET expires_at = v_new, updated_at = now() WHERE order_id = v_order_id;
    RETURN jsonb_build_object('outcome', 'extended', 'order_id', v_order_id, 'products', '[]'::jsonb,
        'messages', jsonb_build_array(new_message(p_event_id, 'inventory.reservation_extended', jsonb_build_object(
            'order_id', v_order_id, 'expires_at', rfc3339(v_new), 'previous_expires_at', rfc3339(o.expires_at)))));
END $$;

