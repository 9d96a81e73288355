-- Orders: order.placed (reserve every line or none), order.cancelled, order.completed, each
-- one by one and, where that gives exactly the same, as set-based runs.

-- A stored order's lines, with its products locked (in product_id order) and their figures.
-- apply_events() locked them already, unless the order was placed by a transaction that
-- committed after that: then this takes the locks.
CREATE OR REPLACE FUNCTION locked_lines(p_order_id text,
    OUT product_ids text[], OUT quantities bigint[], OUT lines jsonb, OUT shortages jsonb)
LANGUAGE plpgsql AS $$
BEGIN
    SELECT array_agg(l.product_id ORDER BY l.product_id),
           array_agg(l.quantity::bigint ORDER BY l.product_id),
           jsonb_agg(jsonb_build_object('product_id', l.product_id, 'quantity', l.quantity) ORDER BY l.line_no),
           -- What re-reserving the lines would lack (order.completed after expiry).
           jsonb_agg(jsonb_build_object('product_id', l.product_id, 'requested', l.quantity,
                                        'available', l.available) ORDER BY l.line_no)
               FILTER (WHERE l.available < l.quantity)
      INTO product_ids, quantities, lines, shortages
      FROM (SELECT ol.product_id, ol.quantity, ol.line_no, p.on_hand - p.reserved AS available
              FROM order_lines ol JOIN products p ON p.product_id = ol.product_id
             WHERE ol.order_id = p_order_id
             ORDER BY ol.product_id FOR UPDATE OF p) l;
END $$;

-- order.placed: reserve every line or none.
CREATE OR REPLACE FUNCTION place_order(p_event_id uuid, p_data jsonb, p_default_ttl integer) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_order_id text := p_data->>'order_id';
    v_expires  timestamptz := now() + make_interval(
                   secs => coalesce((p_data->>'reservation_ttl_seconds')::integer, p_default_ttl));
    v_status   text;
    v_check    record;
    v_moved    jsonb;
BEGIN
    -- The orders row is the meeting point of every event of one order: a concurrent
    -- order.cancelled or a second order.placed waits here for us, and we for them.
    INSERT INTO orders (order_id, status, placed_event_id, expires_at)
    VALUES (v_order_id, 'reserved', p_event_id, v_expires)
        ON CONFLICT (order_id) DO NOTHING;
    IF NOT FOUND THEN
        SELECT status INTO v_status FROM orders WHERE order_id = v_order_id FOR UPDATE;
        IF v_status = 'cancelled' THEN
            RETURN rejected(p_event_id, v_order_id, 'order_cancelled');
        END IF;
        -- Already reserved (or done) under another message id: never reserve twice.
        RETURN jsonb_build_object('outcome', 'duplicate_order', 'order_id', v_order_id,
                                  'status', v_status, 'messages', '[]'::jsonb, 'products', '[]'::jsonb);
    END IF;

    SELECT array_agg(l.product_id ORDER BY l.product_id) AS product_ids,
           array_agg(l.quantity ORDER BY l.product_id) AS quantities,
           jsonb_agg(jsonb_build_object('product_id', l.product_id, 'requested', l.quantity,
                                        'available', coalesce(p.on_hand - p.reserved, 0)) ORDER BY l.ord)
               FILTER (WHERE p.product_id IS NULL OR p.on_hand - p.reserved < l.quantity) AS shortages,
           bool_or(p.product_id IS NULL) AS unknown
      INTO v_check
      FROM (SELECT x->>'product_id' AS product_id, (x->>'quantity')::bigint AS quantity, ord
              FROM jsonb_array_elements(p_data->'lines') WITH ORDINALITY AS t(x, ord)) l
      -- One primary-key lookup per line (OFFSET 0 keeps the planner from hashing the table).
      LEFT JOIN LATERAL (SELECT on_hand, reserved, product_id FROM products
                          WHERE product_id = l.product_id OFFSET 0) p ON true;
    IF v_check.shortages IS NOT NULL THEN
        DELETE FROM orders WHERE order_id = v_order_id;  -- a rejected order may be placed again
        RETURN rejected(p_event_id, v_order_id,
                        CASE WHEN v_check.unknown THEN 'unknown_product' ELSE 'insufficient_stock' END,
                        v_check.shortages);
    END IF;

    INSERT INTO order_lines (order_id, product_id, line_no, quantity)
    SELECT v_order_id, x->>'product_id', ord, (x->>'quantity')::integer
      FROM jsonb_array_elements(p_data->'lines') WITH ORDINALITY AS t(x, ord);
    v_moved := move_stock(v_check.product_ids, array_fill(0::bigint, ARRAY[cardinality(v_check.product_ids)]),
                          v_check.quantities, 'reserve', v_order_id, p_event_id);
    RETURN jsonb_build_object('outcome', 'reserved', 'order_id', v_order_id, 'products', v_moved->'figures',
        'messages', jsonb_build_array(new_message(p_event_id, 'inventory.reserved', jsonb_build_object(
            -- the lines as placed: the checks admit only {product_id, quantity} in each
            'order_id', v_order_id, 'lines', p_data->'lines', 'expires_at', rfc3339(v_expires))))
            || (v_moved->'messages'));
END $$;

-- A run of order.placed events (consecutive in a batch, all new), applied in a few statements
-- instead of a few per order: only when that gives exactly what one by one would, which is
-- when no order id repeats and every product has stock for all of the run's orders together
-- (then none is rejected, and each event's figures are the running sums computed below).
-- Returns one result per event, or NULL when the run must be applied one by one.
-- force_generic_plan: its statements are planned once per session. Left to choose, PostgreSQL
-- planned them again on every call of a short run (a custom plan looked cheaper for a few
-- rows), which cost about 300 us per call, more than the run's own work below 5 orders.
CREATE OR REPLACE FUNCTION place_orders(p_ids uuid[], p_datas jsonb[], p_default_ttl integer) RETURNS jsonb[]
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_ok      boolean;
    v_placed  text[];
    v_results jsonb[] := array_fill(NULL::jsonb, ARRAY[cardinality(p_ids)]);
    r         record;
BEGIN
    WITH ev AS (
        SELECT d->>'order_id' AS order_id, d->'lines' AS lines FROM unnest(p_datas) AS d
    ), need AS (  -- what the orders not stored yet ask of each product
        SELECT x->>'product_id' AS product_id, sum((x->>'quantity')::bigint) AS quantity
          FROM ev, jsonb_array_elements(ev.lines) x
         WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.order_id = ev.order_id)
         GROUP BY 1
    )
    SELECT (SELECT count(DISTINCT order_id) = count(*) FROM ev)
           AND NOT EXISTS (SELECT 1 FROM need LEFT JOIN products p ON p.product_id = need.product_id
                            WHERE p.product_id IS NULL OR p.on_hand - p.reserved < need.quantity)
      INTO v_ok;
    IF NOT v_ok THEN
        RETURN NULL;
    END IF;

    -- Orders rows in order_id order, the order concurrent runs lock them in. An order stored
    -- meanwhile by another transaction is left out here and answered by place_order() below.
    WITH ins AS (
        INSERT INTO orders (order_id, status, placed_event_id, expires_at)
        SELECT d->>'order_id', 'reserved', p_ids[ord],
               now() + make_interval(secs => coalesce((d->>'reservation_ttl_seconds')::integer, p_default_ttl))
          FROM unnest(p_datas) WITH ORDINALITY AS t(d, ord)
         ORDER BY d->>'order_id'
            ON CONFLICT (order_id) DO NOTHING
        RETURNING order_id)
    SELECT array_agg(order_id) INTO v_placed FROM ins;

    FOR r IN
        WITH l AS (  -- every line of the placed orders, with its product's figures before the run
            SELECT t.ord, p_ids[t.ord] AS event_id, t.d->>'order_id' AS order_id, x.line_no,
                   x.line->>'product_id' AS product_id, (x.line->>'quantity')::bigint AS quantity,
                   p.on_hand, p.reserved, p.low_stock_threshold AS threshold, p.version
              FROM unnest(p_datas) WITH ORDINALITY AS t(d, ord)
             CROSS JOIN LATERAL jsonb_array_elements(t.d->'lines') WITH ORDINALITY AS x(line, line_no)
              JOIN products p ON p.product_id = x.line->>'product_id'
             WHERE t.d->>'order_id' = ANY(v_placed)
        ), after_each AS (  -- each product's figures right after each event, as one by one would leave them
            SELECT l.*, l.reserved + sum(l.quantity) OVER w AS reserved_after,
                   l.version + count(*) OVER w AS version_after
              FROM l WINDOW w AS (PARTITION BY l.product_id ORDER BY l.ord)
        ), moved AS (
            UPDATE products p
               SET reserved = p.reserved + s.quantity, version = p.version + s.events, updated_at = now()
              FROM (SELECT product_id, sum(quantity) AS quantity, count(*) AS events FROM l GROUP BY product_id) s
             WHERE p.product_id = s.product_id
        ), stored_lines AS (
            INSERT INTO order_lines (order_id, product_id, line_no, quantity)
            SELECT order_id, product_id, line_no, quantity FROM l
        ), ledger AS (
            INSERT INTO stock_movements (product_id, order_id, event_id, on_hand_delta, reserved_delta, reason)
            SELECT product_id, order_id, event_id, 0, quantity, 'reserve' FROM l ORDER BY ord, product_id
        )
        SELECT a.ord, a.event_id, a.order_id,
               jsonb_agg(jsonb_build_object('product_id', a.product_id, 'on_hand', a.on_hand,
                                            'reserved', a.reserved_after, 'available', a.on_hand - a.reserved_after,
                                            'version', a.version_after) ORDER BY a.product_id) AS figures,
               coalesce(jsonb_agg(new_message(a.event_id, 'inventory.low_stock', jsonb_build_object(
                                      'product_id', a.product_id, 'available', a.on_hand - a.reserved_after,
                                      'threshold', a.threshold)) ORDER BY a.product_id)
                            FILTER (WHERE a.on_hand - a.reserved_after <= a.threshold
                                      AND a.on_hand - a.reserved_after + a.quantity > a.threshold),
                        '[]'::jsonb) AS low_stock
          FROM after_each a GROUP BY a.ord, a.event_id, a.order_id
    LOOP
        v_results[r.ord] := jsonb_build_object('outcome', 'reserved', 'order_id', r.order_id, 'products', r.figures,
            'messages', jsonb_build_array(new_message(r.event_id, 'inventory.reserved', jsonb_build_object(
                'order_id', r.order_id, 'lines', p_datas[r.ord]->'lines',
                'expires_at', rfc3339(now() + make_interval(secs => coalesce(
                    (p_datas[r.ord]->>'reservation_ttl_seconds')::integer, p_default_ttl)))))) || r.low_stock);
    END LOOP;
    FOR i IN 1 .. cardinality(p_ids) LOOP
        IF v_results[i] IS NULL THEN  -- stored before: a duplicate order or a cancelled one
            v_results[i] := place_order(p_ids[i], p_datas[i], p_default_ttl);
        END IF;
    END LOOP;
    RETURN v_results;
END $$;

-- order.cancelled: release the reservation; remember a cancel that came before its order.
CREATE OR REPLACE FUNCTION cancel_order(p_event_id uuid, p_data jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_order_id text := p_data->>'order_id';
    v_status   text;
    v_lines    record;
    v_moved    jsonb;
BEGIN
    INSERT INTO orders (order_id, status) VALUES (v_order_id, 'cancelled')
        ON CONFLICT (order_id) DO NOTHING;
    IF FOUND THEN
        RETURN jsonb_build_object('outcome', 'cancel_recorded', 'order_id', v_order_id,
                                  'messages', '[]'::jsonb, 'products', '[]'::jsonb);
    END IF;
    SELECT status INTO v_status FROM orders WHERE order_id = v_order_id FOR UPDATE;
    IF v_status <> 'reserved' THEN
        -- committed: too late to cancel; released/cancelled/expired: nothing left to release.
        RETURN jsonb_build_object('outcome', 'ignored', 'order_id', v_order_id, 'status', v_status,
                                  'messages', '[]'::jsonb, 'products', '[]'::jsonb);
    END IF;
    v_lines := locked_lines(v_order_id);
    v_moved := move_stock(v_lines.product_ids, array_fill(0::bigint, ARRAY[cardinality(v_lines.product_ids)]),
                          ARRAY(SELECT -q FROM unnest(v_lines.quantities) q), 'release', v_order_id, p_event_id);
    UPDATE orders SET status = 'released', updated_at = now() WHERE order_id = v_order_id;
    RETURN jsonb_build_object('outcome', 'released', 'order_id', v_order_id, 'products', v_moved->'figures',
        'messages', jsonb_build_array(new_message(p_event_id, 'inventory.released', jsonb_build_object(
            'order_id', v_order_id, 'lines', v_lines.lines, 'reason', 'cancelled'))) || (v_moved->'messages'));
END $$;

-- order.completed: commit the reservation (on_hand and reserved both fall). After expiry,
-- commit only if the stock is still there, taking it again and committing in one step.
CREATE OR REPLACE FUNCTION complete_order(p_event_id uuid, p_data jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_order_id text := p_data->>'order_id';
    v_status   text;
    v_lines    record;
    v_taken    jsonb := '[]'::jsonb;
    v_moved    jsonb;
BEGIN
    SELECT status INTO v_status FROM orders WHERE order_id = v_order_id FOR UPDATE;
    IF v_status IS NULL OR v_status IN ('placing', 'cancelled', 'released', 'committed') THEN
        IF v_status IN ('cancelled', 'released') THEN
            RETURN rejected(p_event_id, v_order_id, 'order_cancelled') || jsonb_build_object('outcome', 'ignored',
                                                                                          'status', v_status);
        END IF;
        RETURN jsonb_build_object('outcome', 'ignored', 'order_id', v_order_id, 'status', coalesce(v_status, 'unknown'),
                                  'messages', '[]'::jsonb, 'products', '[]'::jsonb);
    END IF;
    v_lines := locked_lines(v_order_id);
    IF v_status = 'expired' THEN
        IF v_lines.shortages IS NOT NULL THEN
            RETURN rejected(p_event_id, v_order_id, 'reservation_expired', v_lines.shortages);
        END IF;
        v_taken := move_stock(v_lines.product_ids, array_fill(0::bigint, ARRAY[cardinality(v_lines.product_ids)]),
                              v_lines.quantities, 'reserve', v_order_id, p_event_id, 'taken again after expiry')->'messages';
    END IF;
    v_moved := move_stock(v_lines.product_ids, ARRAY(SELECT -q FROM unnest(v_lines.quantities) q),
                          ARRAY(SELECT -q FROM unnest(v_lines.quantities) q), 'commit', v_order_id, p_event_id);
    UPDATE orders SET status = 'committed', updated_at = now() WHERE order_id = v_order_id;
    RETURN jsonb_build_object('outcome', 'committed', 'order_id', v_order_id, 'products', v_moved->'figures',
        'messages', jsonb_build_array(new_message(p_event_id, 'inventory.committed', jsonb_build_object(
            'order_id', v_order_id, 'lines', v_lines.lines))) || v_taken || (v_moved->'messages'));
END $$;

-- A run of order.completed events (consecutive in a batch, all new) in a few statements, when
-- that gives exactly what one by one would: every order is distinct and holds its reservation.
-- Then no commit can fail, and none changes `available` (so none emits inventory.low_stock);
-- each event's figures are running sums, as in place_orders(). Returns one result per event,
-- or NULL when the run must be applied one by one (an expired, cancelled or unknown order).
-- force_generic_plan: as place_orders().
CREATE OR REPLACE FUNCTION complete_orders(p_ids uuid[], p_datas jsonb[]) RETURNS jsonb[]
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_order_ids text[] := ARRAY(SELECT d->>'order_id' FROM unnest(p_datas) AS d);
    v_ok        boolean;
    v_results   jsonb[] := array_fill(NULL::jsonb, ARRAY[cardinality(p_ids)]);
    r           record;
BEGIN
    SELECT count(DISTINCT id) = count(*) INTO v_ok FROM unnest(v_order_ids) AS id;
    IF NOT v_ok THEN
        RETURN NULL;
    END IF;
    SELECT count(*) = cardinality(v_order_ids) AND bool_and(status = 'reserved') INTO v_ok
      FROM (SELECT status FROM orders WHERE order_id = ANY(v_order_ids) ORDER BY order_id FOR UPDATE) o;
    IF NOT v_ok THEN
        RETURN NULL;
    END IF;
    -- Locked up front by apply_events(), unless an order was placed by a transaction that
    -- committed after that (as in locked_lines()).
    PERFORM 1 FROM products WHERE product_id = ANY(ARRAY(
        SELECT product_id FROM order_lines WHERE order_id = ANY(v_order_ids)))
     ORDER BY product_id FOR UPDATE;

    FOR r IN
        WITH l AS (  -- every line of the orders, with its product's figures before the run
            SELECT t.ord, p_ids[t.ord] AS event_id, ol.order_id, ol.product_id, ol.line_no,
                   ol.quantity::bigint AS quantity, p.on_hand, p.reserved, p.version
              FROM unnest(v_order_ids) WITH ORDINALITY AS t(order_id, ord)
              JOIN order_lines ol ON ol.order_id = t.order_id
              JOIN products p ON p.product_id = ol.product_id
        ), after_each AS (  -- each product's figures right after each event
            SELECT l.*, l.on_hand - sum(l.quantity) OVER w AS on_hand_after,
                   l.reserved - sum(l.quantity) OVER w AS reserved_after, l.version + count(*) OVER w AS version_after
              FROM l WINDOW w AS (PARTITION BY l.product_id ORDER BY l.ord)
        ), moved AS (
            UPDATE products p
               SET on_hand = p.on_hand - s.quantity, reserved = p.reserved - s.quantity,
                   version = p.version + s.events, updated_at = now()
              FROM (SELECT product_id, sum(quantity) AS quantity, count(*) AS events FROM l GROUP BY product_id) s
             WHERE p.product_id = s.product_id
        ), ledger AS (
            INSERT INTO stock_movements (product_id, order_id, event_id, on_hand_delta, reserved_delta, reason)
            SELECT product_id, order_id, event_id, -quantity, -quantity, 'commit' FROM l ORDER BY ord, product_id
        ), committed AS (
            UPDATE orders SET status = 'committed', updated_at = now()
             WHERE order_id = ANY(ARRAY(SELECT DISTINCT order_id FROM l))
        )
        SELECT a.ord, a.event_id, a.order_id,
               jsonb_agg(jsonb_build_object('product_id', a.product_id, 'on_hand', a.on_hand_after,
                                            'reserved', a.reserved_after, 'available', a.on_hand_after - a.reserved_after,
                                            'version', a.version_after) ORDER BY a.product_id) AS figures,
               jsonb_agg(jsonb_build_object('product_id', a.product_id, 'quantity', a.quantity)
                         ORDER BY a.line_no) AS lines
          FROM after_each a GROUP BY a.ord, a.event_id, a.order_id
    LOOP
        v_results[r.ord] := jsonb_build_object('outcome', 'committed', 'order_id', r.order_id, 'products', r.figures,
            'messages', jsonb_build_array(new_message(r.event_id, 'inventory.committed', jsonb_build_object(
                'order_id', r.order_id, 'lines', r.lines))));
    END LOOP;
    FOR i IN 1 .. cardinality(p_ids) LOOP
        IF v_results[i] IS NULL THEN  -- an order without lines (none is made so): as one by one
            v_results[i] := complete_order(p_ids[i], p_datas[i]);
        END IF;
    END LOOP;
    RETURN v_results;
END $$;
