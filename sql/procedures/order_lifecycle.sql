-- An order's life after placement (spec Part B): reservation.extended (4.2), order.fulfilled
-- (4.4), partial order.cancelled (4.6), order.returned (4.7); order.completed (4.5) and the
-- whole cancel are in orders.sql. Each takes the
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

-- ==== order.fulfilled (4.4) =====================================================================

-- Where an order holds its units: its allocation rows, or (held implicitly, orders.allocated
-- = false) every tracked line whole at `default`.
CREATE OR REPLACE FUNCTION order_holdings(p_order_id text, p_allocated boolean)
RETURNS TABLE (product_id text, location_id text, "position" integer, reserved bigint)
LANGUAGE sql STABLE AS $$
    SELECT a.product_id, a.location_id, a.position, a.reserved
      FROM order_allocations a WHERE p_allocated AND a.order_id = p_order_id
    UNION ALL
    SELECT ol.product_id, 'default', 1, ol.quantity
      FROM order_lines ol WHERE NOT p_allocated AND ol.order_id = p_order_id AND ol.tracked
$$;

-- Gives an implicitly held order its allocation rows (one per tracked line, at `default`),
-- so that per-line counters can be kept: done when an order first needs them (its first
-- fulfilment), never on the default-only fast paths.
CREATE OR REPLACE FUNCTION make_allocated(p_order_id text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO order_allocations (order_id, product_id, location_id, position, reserved)
    SELECT order_id, product_id, 'default', 1, quantity FROM order_lines WHERE order_id = p_order_id AND tracked;
    UPDATE orders SET allocated = true WHERE order_id = p_order_id;
END $$;

-- The lines of an allocated order with what each still holds: `reserved` = the sum of its
-- allocations (an untracked line holds without stock: its units neither fulfilled,
-- released nor backordered).
CREATE OR REPLACE FUNCTION order_line_state(p_order_id text)
RETURNS TABLE (product_id text, line_no integer, quantity bigint, reserved bigint, fulfilled bigint,
               backordered bigint, released bigint)
LANGUAGE sql STABLE AS $$
    SELECT ol.product_id, ol.line_no, ol.quantity,
           CASE WHEN ol.tracked
                THEN (SELECT coalesce(sum(a.reserved), 0) FROM order_allocations a
                       WHERE a.order_id = ol.order_id AND a.product_id = ol.product_id)
                ELSE ol.quantity - ol.fulfilled - ol.released - ol.backordered END::bigint,
           ol.fulfilled, ol.backordered, ol.released
      FROM order_lines ol WHERE ol.order_id = p_order_id
$$;

-- inventory.committed of an order closed after partial changes: each line's fulfilled total.
CREATE OR REPLACE FUNCTION fulfilled_lines(p_order_id text) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT coalesce(jsonb_agg(jsonb_build_object('product_id', product_id, 'quantity', fulfilled) ORDER BY line_no)
                        FILTER (WHERE fulfilled > 0), '[]'::jsonb)
      FROM order_lines WHERE order_id = p_order_id);
END $$;

-- Each line of an order.fulfilled (n = its position, from 1) with what it may take: a line
-- pinned to a location, what the order holds there; another, what the order holds of that
-- product less what its pinned lines ask; an untracked line, its open units (never pinned).
CREATE OR REPLACE FUNCTION fulfilment_asks(p_order_id text, p_allocated boolean, p_lines jsonb)
RETURNS TABLE (n bigint, product_id text, location_id text, quantity bigint, known boolean, tracked boolean,
               may_take bigint)
LANGUAGE sql STABLE AS $$
    WITH asks AS (
        SELECT t.n, t.x->>'product_id' AS product_id, t.x->>'location_id' AS location_id,
               (t.x->>'quantity')::bigint AS quantity, ol.product_id IS NOT NULL AS known,
               coalesce(ol.tracked, true) AS tracked,
               ol.quantity - ol.fulfilled - ol.released - ol.backordered AS untracked_open
          FROM jsonb_array_elements(p_lines) WITH ORDINALITY AS t(x, n)
          LEFT JOIN order_lines ol ON ol.order_id = p_order_id AND ol.product_id = t.x->>'product_id'
    )
    SELECT a.n, a.product_id, a.location_id, a.quantity, a.known, a.tracked,
           CASE WHEN NOT a.known THEN 0
                WHEN NOT a.tracked THEN CASE WHEN a.location_id IS NULL THEN a.untracked_open ELSE 0 END
                WHEN a.location_id IS NOT NULL THEN
                     (SELECT coalesce(sum(h.reserved), 0) FROM order_holdings(p_order_id, p_allocated) h
                       WHERE h.product_id = a.product_id AND h.location_id = a.location_id)
                ELSE greatest(0, (SELECT coalesce(sum(h.reserved), 0) FROM order_holdings(p_order_id, p_allocated) h
                                   WHERE h.product_id = a.product_id)
                                 - (SELECT coalesce(sum(b.quantity), 0) FROM asks b
                                     WHERE b.product_id = a.product_id AND b.location_id IS NOT NULL)) END::bigint
      FROM asks a
$$;

-- order.fulfilled: a shipment of some reserved units, all lines or none. A line without
-- location_id consumes the order's allocations of that product in allocation order; with
-- it, that location's only. The first fulfilment ends the deadline (expires_at NULL); the
-- one that leaves nothing open commits the order (inventory.committed too).
CREATE OR REPLACE FUNCTION fulfil_order(p_event_id uuid, p_data jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_order_id text := p_data->>'order_id';
    v_fid      text := p_data->>'fulfilment_id';
    o          record;
    v_reason   text;
    v_refusal  record;
    x          record;
    a          record;
    v_left     bigint;
    n          bigint;
    v_taken    jsonb := '[]';
    v_open     jsonb;
    v_messages jsonb;
BEGIN
    SELECT status, allocated, expires_at INTO o FROM orders WHERE order_id = v_order_id FOR UPDATE;
    IF EXISTS (SELECT 1 FROM fulfilments f WHERE f.order_id = v_order_id AND f.fulfilment_id = v_fid) THEN
        RETURN jsonb_build_object('outcome', 'duplicate_fulfilment', 'order_id', v_order_id,
                                  'fulfilment_id', v_fid, 'messages', '[]'::jsonb, 'products', '[]'::jsonb);
    END IF;
    v_reason := order_refusal(o.status, o.expires_at);
    IF v_reason IS NOT NULL THEN
        RETURN rejected(p_event_id, v_order_id, v_reason);
    END IF;
    PERFORM locked_order_lines(v_order_id);  -- its products, locked (if this batch did not yet)

    -- What each line asks and what it may take: pinned lines from their location, the others
    -- from what the product's pinned lines leave.
    SELECT r.reason, r.shortages INTO v_refusal FROM (
        SELECT 1 AS step, 'unknown_line' AS reason,
               jsonb_agg(jsonb_build_object('product_id', s.product_id, 'requested', s.quantity, 'available', 0)
                         ORDER BY s.n) FILTER (WHERE NOT s.known) AS shortages,
               bool_or(NOT s.known) AS fails
          FROM fulfilment_asks(v_order_id, o.allocated, p_data->'lines') s
        UNION ALL
        SELECT 2, 'exceeds_reserved',
               jsonb_agg(jsonb_build_object('product_id', s.product_id, 'requested', s.quantity, 'available', s.may_take)
                         ORDER BY s.n) FILTER (WHERE s.quantity > s.may_take),
               bool_or(s.quantity > s.may_take)
          FROM fulfilment_asks(v_order_id, o.allocated, p_data->'lines') s) r
     WHERE r.fails ORDER BY r.step LIMIT 1;
    IF FOUND THEN
        RETURN rejected(p_event_id, v_order_id, v_refusal.reason, v_refusal.shortages);
    END IF;

    IF NOT o.allocated THEN
        PERFORM make_allocated(v_order_id);
    END IF;
    INSERT INTO fulfilments (order_id, fulfilment_id, event_id) VALUES (v_order_id, v_fid, p_event_id);
    FOR x IN SELECT s.n, s.product_id, s.location_id, s.quantity, s.tracked
               FROM fulfilment_asks(v_order_id, true, p_data->'lines') s
              ORDER BY s.product_id, s.location_id NULLS LAST LOOP
        UPDATE order_lines SET fulfilled = fulfilled + x.quantity
         WHERE order_id = v_order_id AND product_id = x.product_id;
        IF NOT x.tracked THEN  -- held without stock: nothing moves
            v_taken := v_taken || jsonb_build_array(jsonb_build_object(
                'n', x.n, 'product_id', x.product_id, 'location_id', x.location_id, 'quantity', x.quantity));
            CONTINUE;
        END IF;
        v_left := x.quantity;
        FOR a IN SELECT al.location_id, al.reserved FROM order_allocations al
                  WHERE al.order_id = v_order_id AND al.product_id = x.product_id AND al.reserved > 0
                    AND (x.location_id IS NULL OR al.location_id = x.location_id)
                  ORDER BY al.position LOOP
            EXIT WHEN v_left = 0;
            n := least(v_left, a.reserved);
            -- on_hand and reserved fall alike: `available` does not change (no messages).
            PERFORM change_level(x.product_id, a.location_id, -n, -n, 0, 0, 0, 'fulfil', v_order_id, p_event_id,
                                 NULL, v_fid, NULL, true);
            UPDATE order_allocations SET reserved = reserved - n, fulfilled = fulfilled + n
             WHERE order_id = v_order_id AND product_id = x.product_id AND location_id = a.location_id;
            v_taken := v_taken || jsonb_build_array(jsonb_build_object(
                'n', x.n, 'product_id', x.product_id, 'location_id', a.location_id, 'quantity', n));
            v_left := v_left - n;
        END LOOP;
    END LOOP;

    -- Taken in the lock order; reported in the order of the message's lines.
    SELECT jsonb_agg(t - 'n' ORDER BY (t->>'n')::integer, k) INTO v_taken
      FROM jsonb_array_elements(v_taken) WITH ORDINALITY AS e(t, k);
    UPDATE orders SET expires_at = NULL, updated_at = now() WHERE order_id = v_order_id;
    SELECT jsonb_agg(jsonb_build_object('product_id', s.product_id, 'reserved', s.reserved,
                                        'backordered', s.backordered) ORDER BY s.line_no)
               FILTER (WHERE s.reserved + s.backordered > 0)
      INTO v_open FROM order_line_state(v_order_id) s;
    v_messages := jsonb_build_array(new_message(p_event_id, 'inventory.fulfilled', jsonb_build_object(
        'order_id', v_order_id, 'fulfilment_id', v_fid, 'lines', v_taken, 'open', coalesce(v_open, '[]'::jsonb))));
    IF v_open IS NULL THEN
        UPDATE orders SET status = 'committed', updated_at = now() WHERE order_id = v_order_id;
        v_messages := v_messages || jsonb_build_array(new_message(p_event_id, 'inventory.committed',
            jsonb_build_object('order_id', v_order_id, 'lines', fulfilled_lines(v_order_id))));
    END IF;
    RETURN jsonb_build_object('outcome', 'fulfilled', 'order_id', v_order_id, 'messages', v_messages,
        'products', (SELECT coalesce(jsonb_agg(product_figures(p) ORDER BY p.product_id), '[]'::jsonb)
                       FROM products p WHERE p.product_id = ANY(ARRAY(
                           SELECT t->>'product_id' FROM jsonb_array_elements(v_taken) t
                            WHERE t->>'location_id' IS NOT NULL))));
END $$;

-- ==== partial order.cancelled (4.6) ===============================================================

-- Releases units of a live order: p_lines ({product_id, quantity} each), or NULL for every
-- unit still open (a whole cancel of an order partly fulfilled or cancelled already). Per
-- line, backordered units first, then reserved ones in reverse allocation order (the preferred
-- location keeps its hold). When nothing stays open the order ends `committed` if anything
-- was fulfilled (inventory.committed follows), else `released`.
-- The caller checked the order (locked, `reserved`); this checks the lines.
CREATE OR REPLACE FUNCTION release_order_lines(p_event_id uuid, p_order_id text, p_allocated boolean, p_lines jsonb)
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_lines    jsonb := p_lines;
    v_refusal  record;
    x          record;
    a          record;
    v_left     bigint;
    n          bigint;
    v_changed  jsonb;
    v_before   bigint;
    v_figures  jsonb := '[]';
    v_stock    jsonb := '[]';
    v_open     boolean;
    v_messages jsonb;
BEGIN
    PERFORM locked_order_lines(p_order_id);  -- its products, locked (if this batch did not yet)
    IF v_lines IS NULL THEN
        SELECT jsonb_agg(jsonb_build_object('product_id', s.product_id, 'quantity', s.reserved + s.backordered)
                         ORDER BY s.line_no) FILTER (WHERE s.reserved + s.backordered > 0)
          INTO v_lines FROM order_line_state(p_order_id) s;
        v_lines := coalesce(v_lines, '[]');
    END IF;
    -- What each line may release: what it holds (an implicitly held order: all of it) and
    -- what it has backordered.
    SELECT r.reason, r.shortages INTO v_refusal FROM (
        SELECT 1 AS step, 'unknown_line' AS reason,
               jsonb_agg(jsonb_build_object('product_id', s.product_id, 'requested', s.quantity, 'available', 0)
                         ORDER BY s.n) FILTER (WHERE s.open IS NULL) AS shortages,
               bool_or(s.open IS NULL) AS fails
          FROM cancel_asks(p_order_id, p_allocated, v_lines) s
        UNION ALL
        SELECT 2, 'exceeds_open_quantity',
               jsonb_agg(jsonb_build_object('product_id', s.product_id, 'requested', s.quantity, 'available', s.open)
                         ORDER BY s.n) FILTER (WHERE s.quantity > s.open),
               bool_or(s.quantity > s.open)
          FROM cancel_asks(p_order_id, p_allocated, v_lines) s) r
     WHERE r.fails ORDER BY r.step LIMIT 1;
    IF FOUND THEN
        RETURN rejected(p_event_id, p_order_id, v_refusal.reason, v_refusal.shortages);
    END IF;

    IF NOT p_allocated THEN
        PERFORM make_allocated(p_order_id);
    END IF;
    FOR x IN SELECT ol.product_id, ol.tracked, ol.backordered, (l->>'quantity')::bigint AS quantity
               FROM jsonb_array_elements(v_lines) l
               JOIN order_lines ol ON ol.order_id = p_order_id AND ol.product_id = l->>'product_id'
              ORDER BY ol.product_id LOOP
        -- Backordered units first: they hold no stock; the product's `backordered` falls with
        -- the line's (its own ledger row, at no location).
        n := least(x.quantity, x.backordered);
        v_left := x.quantity - n;
        UPDATE order_lines SET backordered = backordered - n, released = released + x.quantity
         WHERE order_id = p_order_id AND product_id = x.product_id;
        IF n > 0 THEN
            v_figures := v_figures || jsonb_build_array(
                change_backordered(x.product_id, -n, 'release', p_order_id, p_event_id));
        END IF;
        CONTINUE WHEN NOT x.tracked OR v_left = 0;  -- an untracked line holds no stock
        v_before := NULL;
        FOR a IN SELECT al.location_id, al.reserved FROM order_allocations al
                  WHERE al.order_id = p_order_id AND al.product_id = x.product_id AND al.reserved > 0
                  ORDER BY al.position DESC LOOP
            EXIT WHEN v_left = 0;
            n := least(v_left, a.reserved);
            v_changed := change_level(x.product_id, a.location_id, 0, -n, 0, 0, 0, 'release', p_order_id, p_event_id,
                                      NULL, NULL, NULL, true);
            v_before := coalesce(v_before, (v_changed->>'available_before')::bigint);
            UPDATE order_allocations SET reserved = reserved - n
             WHERE order_id = p_order_id AND product_id = x.product_id AND location_id = a.location_id;
            v_left := v_left - n;
        END LOOP;
        v_figures := v_figures || jsonb_build_array(v_changed->'figures');
        -- One transition per product however many of its levels changed (back_in_stock).
        v_stock := v_stock || to_jsonb(stock_messages(p_event_id, x.product_id, v_before,
            (v_changed->>'available_after')::bigint, (v_changed->>'threshold')::integer, true));
    END LOOP;

    v_messages := jsonb_build_array(new_message(p_event_id, 'inventory.released', jsonb_build_object(
        'order_id', p_order_id,
        'lines', (SELECT jsonb_agg(jsonb_build_object('product_id', l->'product_id', 'quantity', l->'quantity')
                                   ORDER BY k) FROM jsonb_array_elements(v_lines) WITH ORDINALITY AS t(l, k)),
        'reason', 'cancelled')));
    SELECT bool_or(s.reserved + s.backordered > 0) INTO v_open FROM order_line_state(p_order_id) s;
    IF NOT coalesce(v_open, false) THEN
        IF EXISTS (SELECT 1 FROM order_lines WHERE order_id = p_order_id AND fulfilled > 0) THEN
            UPDATE orders SET status = 'committed', updated_at = now() WHERE order_id = p_order_id;
            v_messages := v_messages || jsonb_build_array(new_message(p_event_id, 'inventory.committed',
                jsonb_build_object('order_id', p_order_id, 'lines', fulfilled_lines(p_order_id))));
        ELSE
            UPDATE orders SET status = 'released', updated_at = now() WHERE order_id = p_order_id;
        END IF;
    END IF;
    RETURN jsonb_build_object('outcome', 'released', 'order_id', p_order_id, 'products', v_figures,
                              'messages', v_messages || v_stock);
END $$;

-- Each line of a partial cancel (n = its position, from 1) with what its order line has open
-- (reserved + backordered; NULL: the product is not in the order).
CREATE OR REPLACE FUNCTION cancel_asks(p_order_id text, p_allocated boolean, p_lines jsonb)
RETURNS TABLE (n bigint, product_id text, quantity bigint, open bigint)
LANGUAGE sql STABLE AS $$
    SELECT t.n, t.x->>'product_id', (t.x->>'quantity')::bigint,
           CASE WHEN ol.product_id IS NULL THEN NULL
                WHEN NOT ol.tracked THEN ol.quantity - ol.fulfilled - ol.released
                ELSE (SELECT coalesce(sum(h.reserved), 0) FROM order_holdings(p_order_id, p_allocated) h
                       WHERE h.product_id = ol.product_id) + ol.backordered END::bigint
      FROM jsonb_array_elements(p_lines) WITH ORDINALITY AS t(x, n)
      LEFT JOIN order_lines ol ON ol.order_id = p_order_id AND ol.product_id = t.x->>'product_id'
$$;

-- order.cancelled with `lines`: refusals first (nothing is remembered for an unknown order).
CREATE OR REPLACE FUNCTION cancel_order_lines(p_event_id uuid, p_data jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_order_id text := p_data->>'order_id';
    o          record;
    v_reason   text;
BEGIN
    SELECT status, allocated, expires_at INTO o FROM orders WHERE order_id = v_order_id FOR UPDATE;
    v_reason := order_refusal(o.status, o.expires_at);
    IF v_reason IS NOT NULL THEN
        RETURN rejected(p_event_id, v_order_id, v_reason);
    END IF;
    RETURN release_order_lines(p_event_id, v_order_id, o.allocated, p_data->'lines');
END $$;

-- ==== order.returned (4.7) ========================================================================

-- Each line of an order.returned (n = its position, from 1) with its order line: known (the
-- product is in the order), what the line has fulfilled and returned (an order committed
-- while held implicitly keeps no counters: all of it was fulfilled), where it was first
-- fulfilled from (the default location of a return), and whether the location given exists.
CREATE OR REPLACE FUNCTION return_asks(p_order_id text, p_status text, p_allocated boolean, p_lines jsonb)
RETURNS TABLE (n bigint, product_id text, quantity bigint, condition text, location_id text, known boolean,
               tracked boolean, fulfilled bigint, returned bigint, location_known boolean)
LANGUAGE sql STABLE AS $$
    SELECT t.n, t.x->>'product_id', (t.x->>'quantity')::bigint, t.x->>'condition',
           coalesce(t.x->>'location_id', CASE WHEN ol.tracked THEN coalesce(
               (SELECT a.location_id FROM order_allocations a
                 WHERE p_allocated AND a.order_id = p_order_id AND a.product_id = ol.product_id AND a.fulfilled > 0
                 ORDER BY a.position LIMIT 1), 'default') END),
           ol.product_id IS NOT NULL, coalesce(ol.tracked, true),
           (CASE WHEN p_allocated OR NOT ol.tracked THEN ol.fulfilled
                 WHEN p_status = 'committed' THEN ol.quantity ELSE 0 END)::bigint,
           ol.returned::bigint,
           t.x->>'location_id' IS NULL OR EXISTS (SELECT 1 FROM locations l WHERE l.location_id = t.x->>'location_id')
      FROM jsonb_array_elements(p_lines) WITH ORDINALITY AS t(x, n)
      LEFT JOIN order_lines ol ON ol.order_id = p_order_id AND ol.product_id = t.x->>'product_id'
$$;

-- order.returned: fulfilled units come back, all lines or none. `sellable` raises on_hand;
-- `damaged` / `quality_control` raise on_hand and that bucket; `disposed` changes no stock
-- (recorded on the line). Line and allocations `returned` grow (allocations in allocation
-- order, never beyond what each fulfilled).
CREATE OR REPLACE FUNCTION return_order(p_event_id uuid, p_data jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_order_id text := p_data->>'order_id';
    v_rid      text := p_data->>'return_id';
    o          record;
    v_refusal  record;
    v_lines    jsonb;
    x          record;
    a          record;
    v_left     bigint;
    n          bigint;
    v_changed  jsonb;
    v_before   jsonb := '{}';   -- product_id -> `available` before this return
    v_after    jsonb := '{}';   -- product_id -> the last change_level() result
    v_messages jsonb := '[]';
    k          text;
BEGIN
    SELECT status, allocated INTO o FROM orders WHERE order_id = v_order_id FOR UPDATE;
    IF EXISTS (SELECT 1 FROM returns r WHERE r.order_id = v_order_id AND r.return_id = v_rid) THEN
        RETURN jsonb_build_object('outcome', 'duplicate_return', 'order_id', v_order_id, 'return_id', v_rid,
                                  'messages', '[]'::jsonb, 'products', '[]'::jsonb);
    END IF;
    IF o.status IS NULL OR o.status = 'placing' THEN
        RETURN rejected(p_event_id, v_order_id, 'unknown_order');
    END IF;
    PERFORM locked_order_lines(v_order_id);  -- its products, locked (if this batch did not yet)

    SELECT r.reason, r.shortages INTO v_refusal FROM (
        SELECT 1 AS step, 'unknown_line' AS reason,
               jsonb_agg(jsonb_build_object('product_id', s.product_id, 'requested', s.quantity, 'available', 0)
                         ORDER BY s.n) FILTER (WHERE NOT s.known) AS shortages,
               bool_or(NOT s.known) AS fails
          FROM return_asks(v_order_id, o.status, o.allocated, p_data->'lines') s
        UNION ALL
        SELECT 2, 'unknown_location',
               jsonb_agg(jsonb_build_object('product_id', s.product_id, 'requested', s.quantity, 'available', 0)
                         ORDER BY s.n) FILTER (WHERE NOT s.location_known),
               bool_or(NOT s.location_known)
          FROM return_asks(v_order_id, o.status, o.allocated, p_data->'lines') s
        UNION ALL
        SELECT 3, 'exceeds_fulfilled',
               jsonb_agg(jsonb_build_object('product_id', p.product_id, 'requested', p.quantity,
                                            'available', p.fulfilled - p.returned) ORDER BY p.n)
                   FILTER (WHERE p.returned + p.quantity > p.fulfilled),
               bool_or(p.returned + p.quantity > p.fulfilled)
          FROM (SELECT s.product_id, min(s.n) AS n, sum(s.quantity) AS quantity, min(s.fulfilled) AS fulfilled,
                       min(s.returned) AS returned
                  FROM return_asks(v_order_id, o.status, o.allocated, p_data->'lines') s GROUP BY s.product_id) p) r
     WHERE r.fails ORDER BY r.step LIMIT 1;
    IF FOUND THEN
        RETURN rejected(p_event_id, v_order_id, v_refusal.reason, v_refusal.shortages);
    END IF;

    -- An order committed while held implicitly gets what it never kept: its allocation rows
    -- and fulfilled counters.
    IF NOT o.allocated AND o.status = 'committed' THEN
        INSERT INTO order_allocations (order_id, product_id, location_id, position, reserved, fulfilled)
        SELECT order_id, product_id, 'default', 1, 0, quantity FROM order_lines WHERE order_id = v_order_id AND tracked;
        UPDATE order_lines SET fulfilled = quantity WHERE order_id = v_order_id AND tracked;
        UPDATE orders SET allocated = true WHERE order_id = v_order_id;
    END IF;
    INSERT INTO returns (order_id, return_id, event_id) VALUES (v_order_id, v_rid, p_event_id);
    SELECT jsonb_agg(jsonb_build_object('product_id', s.product_id, 'location_id', s.location_id,
                                        'quantity', s.quantity, 'condition', s.condition) ORDER BY s.n)
      INTO v_lines FROM return_asks(v_order_id, o.status, o.allocated, p_data->'lines') s;
    FOR x IN SELECT s.product_id, s.location_id, s.quantity, s.condition, s.tracked
               FROM return_asks(v_order_id, o.status, o.allocated, p_data->'lines') s
              ORDER BY s.product_id, s.location_id, s.condition LOOP
        UPDATE order_lines SET returned = returned + x.quantity WHERE order_id = v_order_id AND product_id = x.product_id;
        v_left := x.quantity;
        FOR a IN SELECT al.location_id, al.fulfilled - al.returned AS remaining FROM order_allocations al
                  WHERE al.order_id = v_order_id AND al.product_id = x.product_id AND al.fulfilled > al.returned
                  ORDER BY al.position LOOP
            EXIT WHEN v_left = 0;
            n := least(v_left, a.remaining);
            UPDATE order_allocations SET returned = returned + n
             WHERE order_id = v_order_id AND product_id = x.product_id AND location_id = a.location_id;
            v_left := v_left - n;
        END LOOP;
        CONTINUE WHEN NOT x.tracked OR x.condition = 'disposed';  -- no stock moves
        v_changed := change_level(x.product_id, x.location_id, x.quantity, 0,
                                  CASE WHEN x.condition = 'damaged' THEN x.quantity ELSE 0 END,
                                  CASE WHEN x.condition = 'quality_control' THEN x.quantity ELSE 0 END, 0,
                                  'return', v_order_id, p_event_id, x.condition, v_rid, NULL, true);
        IF NOT v_before ? x.product_id THEN
            v_before := v_before || jsonb_build_object(x.product_id, v_changed->'available_before');
        END IF;
        v_after := v_after || jsonb_build_object(x.product_id, v_changed);
    END LOOP;
    -- One transition per product however many of its levels changed (back_in_stock).
    FOR k IN SELECT key FROM jsonb_object_keys(v_after) AS key ORDER BY key LOOP
        v_messages := v_messages || to_jsonb(stock_messages(p_event_id, k, (v_before->>k)::bigint,
            (v_after->k->>'available_after')::bigint, (v_after->k->>'threshold')::integer, true));
    END LOOP;
    RETURN jsonb_build_object('outcome', 'returned', 'order_id', v_order_id,
        'products', (SELECT coalesce(jsonb_agg(v_after->key->'figures' ORDER BY key), '[]'::jsonb)
                       FROM jsonb_object_keys(v_after) AS key),
        'messages', jsonb_build_array(new_message(p_event_id, 'inventory.returned', jsonb_build_object(
            'order_id', v_order_id, 'return_id', v_rid, 'lines', v_lines))) || v_messages);
END $$;
