-- The stock rules. Re-applied by `inventory-worker migrate` whenever this file changes
-- (CREATE OR REPLACE), so it always holds the whole, current truth.
--
-- Locking discipline, which keeps concurrent transactions free of deadlocks:
--   1. product rows, in product_id order;  2. then order rows.
-- apply_events() locks every product a batch touches up front, so a batch of many
-- events obeys the same order as a single one.
--
-- Cost: an event is a handful of statements (plans cached per session, in PL/pgSQL), and what
-- a batch writes to processed_events and the outbox goes in one INSERT each at its end. Calls
-- to LANGUAGE sql functions from PL/pgSQL are avoided on the event path: PostgreSQL plans
-- them again on every call, which cost more than the work itself.

-- RFC 3339 in UTC, microseconds, as every message carries. STABLE, as to_char() is: a SQL
-- function is inlined into its caller only when it claims no more than its body does. Declared
-- IMMUTABLE it was called through the SQL-function executor instead, 1.4 us a call against 0.5.
CREATE OR REPLACE FUNCTION rfc3339(ts timestamptz) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
$$;

-- A result event as the worker publishes it: {outbox_id, message_id, routing_key, body}, the
-- body being the contract's envelope. Its outbox id is taken now; write_outbox() writes it.
CREATE OR REPLACE FUNCTION new_message(p_causation_id uuid, p_type text, p_data jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_id uuid := gen_random_uuid();
BEGIN
    RETURN jsonb_build_object(
        'outbox_id', nextval('outbox_id_seq'), 'message_id', v_id, 'routing_key', p_type,
        'body', jsonb_build_object('id', v_id, 'type', p_type, 'occurred_at', rfc3339(now()),
                                   'causation_id', p_causation_id, 'data', p_data));
END $$;

-- The outbox rows of messages made by new_message(), in one INSERT.
CREATE OR REPLACE FUNCTION write_outbox(p_messages jsonb[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO outbox (id, message_id, routing_key, body)
    SELECT (m->>'outbox_id')::bigint, (m->>'message_id')::uuid, m->>'routing_key', m->'body'
      FROM unnest(p_messages) AS m;
END $$;

CREATE OR REPLACE FUNCTION product_figures(p products) RETURNS jsonb
LANGUAGE sql STABLE AS $$  -- STABLE as jsonb_build_object() is, so that it is inlined
    SELECT jsonb_build_object('product_id', p.product_id, 'on_hand', p.on_hand,
        'reserved', p.reserved, 'available', p.on_hand - p.reserved, 'version', p.version)
$$;

-- Moves stock on some products: changes their figures, appends their ledger rows and, for
-- each product whose `available` falls to or below its threshold, makes an
-- inventory.low_stock message. The caller holds the row locks.
-- Returns {figures: [figures after, in the order given], messages: [low-stock messages]}.
-- (A loop of single-row statements: one UPDATE ... FROM unnest() with the ledger INSERT in a
-- CTE cost fifteen times as much per product, re-planned on every call.)
CREATE OR REPLACE FUNCTION move_stock(
    p_product_ids text[], p_on_hand_deltas bigint[], p_reserved_deltas bigint[], p_reason text,
    p_order_id text, p_event_id uuid, p_note text DEFAULT NULL, p_threshold integer DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_figures  jsonb[] := '{}';
    v_messages jsonb[] := '{}';
    p          record;
BEGIN
    FOR i IN 1 .. cardinality(p_product_ids) LOOP
        UPDATE products
           SET on_hand = on_hand + p_on_hand_deltas[i],
               reserved = reserved + p_reserved_deltas[i],
               low_stock_threshold = coalesce(p_threshold, low_stock_threshold),
               version = version + 1,
               updated_at = now()
         WHERE product_id = p_product_ids[i]
        RETURNING product_id, on_hand, reserved, on_hand - reserved AS available, low_stock_threshold, version
             INTO p;
        IF p_on_hand_deltas[i] <> 0 OR p_reserved_deltas[i] <> 0 THEN
            INSERT INTO stock_movements (product_id, order_id, event_id, on_hand_delta, reserved_delta, reason, note)
            VALUES (p.product_id, p_order_id, p_event_id, p_on_hand_deltas[i], p_reserved_deltas[i], p_reason, p_note);
        END IF;
        v_figures := array_append(v_figures, jsonb_build_object('product_id', p.product_id, 'on_hand', p.on_hand,
            'reserved', p.reserved, 'available', p.available, 'version', p.version));
        IF p.available <= p.low_stock_threshold
           AND p.available + p_reserved_deltas[i] - p_on_hand_deltas[i] > p.low_stock_threshold THEN
            v_messages := array_append(v_messages, new_message(p_event_id, 'inventory.low_stock', jsonb_build_object(
                'product_id', p.product_id, 'available', p.available, 'threshold', p.low_stock_threshold)));
        END IF;
    END LOOP;
    RETURN jsonb_build_object('figures', to_jsonb(v_figures), 'messages', to_jsonb(v_messages));
END $$;

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

CREATE OR REPLACE FUNCTION rejected(p_event_id uuid, p_order_id text, p_reason text,
                                    p_shortages jsonb DEFAULT '[]') RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
    RETURN jsonb_build_object('outcome', 'rejected', 'order_id', p_order_id, 'products', '[]'::jsonb,
        'messages', jsonb_build_array(new_message(p_event_id, 'inventory.rejected', jsonb_build_object(
            'order_id', p_order_id, 'reason', p_reason, 'shortages', p_shortages))));
END $$;

---------------------------------------------------------------------------------------------
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

---------------------------------------------------------------------------------------------
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

---------------------------------------------------------------------------------------------
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

---------------------------------------------------------------------------------------------
-- stock.adjusted: receive (delta > 0), correct (delta < 0) or count (on_hand = N).
-- This is how a product comes to exist.
CREATE OR REPLACE FUNCTION adjust_stock(p_event_id uuid, p_data jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_product_id text := p_data->>'product_id';
    v_created    boolean;
    v_row        products;
    v_target     bigint;
    v_reason     text;
    v_moved      jsonb;
    v_after      jsonb;
BEGIN
    INSERT INTO products (product_id) VALUES (v_product_id) ON CONFLICT DO NOTHING;
    v_created := FOUND;
    SELECT * INTO v_row FROM products WHERE product_id = v_product_id FOR UPDATE;
    v_target := CASE WHEN p_data ? 'delta' AND jsonb_typeof(p_data->'delta') = 'number'
                     THEN v_row.on_hand + (p_data->>'delta')::bigint
                     ELSE (p_data->>'on_hand')::bigint END;
    v_reason := CASE WHEN v_target < 0 THEN 'negative_on_hand'
                     WHEN v_target < v_row.reserved THEN 'below_reserved' END;
    IF v_reason IS NOT NULL THEN
        IF v_created THEN
            DELETE FROM products WHERE product_id = v_product_id;
        END IF;
        RETURN jsonb_build_object('outcome', 'rejected', 'product_id', v_product_id,
            'products', CASE WHEN v_created THEN '[]'::jsonb ELSE jsonb_build_array(product_figures(v_row)) END,
            'messages', jsonb_build_array(new_message(p_event_id, 'inventory.adjustment_rejected', jsonb_build_object(
                'product_id', v_product_id, 'reason', v_reason,
                'on_hand', v_row.on_hand, 'reserved', v_row.reserved, 'requested', v_target))));
    END IF;
    v_moved := move_stock(ARRAY[v_product_id], ARRAY[v_target - v_row.on_hand], ARRAY[0::bigint], 'adjust',
                          NULL, p_event_id, p_data->>'reason', (p_data->>'low_stock_threshold')::integer);
    v_after := v_moved->'figures'->0;
    RETURN jsonb_build_object('outcome', 'adjusted', 'product_id', v_product_id, 'products', v_moved->'figures',
        'messages', jsonb_build_array(new_message(p_event_id, 'inventory.adjusted', jsonb_build_object(
            'product_id', v_product_id, 'on_hand', v_after->'on_hand', 'reserved', v_after->'reserved',
            'available', v_after->'available'))) || (v_moved->'messages'));
END $$;

---------------------------------------------------------------------------------------------
-- Current figures of every product an event changed (or names): what a duplicate returns, so
-- that a redelivery after a crash between commit and cache write still refreshes the cache.
CREATE OR REPLACE FUNCTION touched_figures(p_event_id uuid, p_data jsonb) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(product_figures(p) ORDER BY p.product_id), '[]'::jsonb)
      FROM products p
     -- = ANY(ARRAY(...)): primary-key lookups. The planner turned IN (subquery), and
     -- IN ... OR ..., into a scan of every product for every event.
     WHERE p.product_id = ANY(ARRAY(SELECT product_id FROM stock_movements WHERE event_id = p_event_id
                                    UNION ALL SELECT p_data->>'product_id'))
$$;

-- The one entry point for input events: many events ({id, type, data}) in one transaction,
-- applied in the order given, each at most once ever (by id).
-- Returns one result per event: {outcome, messages: [to publish], products: [figures after]}.
-- An id met again with the same content is a 'duplicate' (changes nothing); with another type
-- or data it is 'id_reused' (changes nothing, recorded nowhere: the worker dead-letters it).
CREATE OR REPLACE FUNCTION apply_events(p_events jsonb, p_default_ttl integer DEFAULT 900) RETURNS jsonb
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off AS $$
DECLARE
    v_bad      record;
    v_fresh    boolean[];
    v_reused   boolean[];
    v_event_digests uuid[];
    v_event_ids   uuid[];
    v_event_types text[];
    v_event_data  jsonb[];
    i          integer := 1;
    j          integer;
    v_run      jsonb[];
    v_one_by_one_until integer := 0;
    v_result   jsonb;
    -- A jsonb[] grows in place; `jsonb || jsonb` re-encoded every earlier result on each
    -- append, which made a batch cost quadratic in its size.
    v_results  jsonb[] := '{}';
    v_ids      uuid[] := '{}';
    v_types    text[] := '{}';
    v_outcomes text[] := '{}';
    v_digests  uuid[] := '{}';
    v_written  bigint;
BEGIN
    -- 1. Every event is checked (checks.sql) before anything is written.
    SELECT ord, problem INTO v_bad FROM event_problems(p_events) WHERE problem IS NOT NULL ORDER BY ord LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'invalid event: %', v_bad.problem USING ERRCODE = 'invalid_parameter_value',
            DETAIL = format('event %s of %s in the batch', v_bad.ord, jsonb_array_length(p_events));
    END IF;

    -- 2. Every product the batch can touch, locked in product_id order.
    PERFORM 1 FROM products WHERE product_id = ANY(ARRAY(
        SELECT x->>'product_id' FROM jsonb_array_elements(p_events) ev, jsonb_array_elements(ev->'data'->'lines') x
         WHERE ev->>'type' = 'order.placed'
        UNION SELECT ev->'data'->>'product_id' FROM jsonb_array_elements(p_events) ev
         WHERE ev->>'type' = 'stock.adjusted'
        UNION SELECT ol.product_id FROM order_lines ol  -- = ANY(ARRAY(..)): index, not a scan
         WHERE ol.order_id = ANY(ARRAY(SELECT ev->'data'->>'order_id' FROM jsonb_array_elements(p_events) ev
                                        WHERE ev->>'type' IN ('order.cancelled', 'order.completed')))))
     ORDER BY product_id FOR UPDATE;

    -- 3. Which events are new: neither applied before nor met earlier in this batch; and of
    --    the others, which carry other content than their id did the first time (compared
    --    with the stored digest, else with the id's first event in this batch; a stored row
    --    from before digests were kept has none: a duplicate, as it always was).
    SELECT array_agg(e.n = 1 AND p.event_id IS NULL ORDER BY e.ord),
           array_agg(coalesce(CASE WHEN p.event_id IS NOT NULL THEN p.digest <> e.digest
                                   ELSE e.first_digest <> e.digest END, false) ORDER BY e.ord),
           array_agg(e.digest ORDER BY e.ord)
      INTO v_fresh, v_reused, v_event_digests
      FROM (SELECT ord, id, digest, row_number() OVER w AS n, first_value(digest) OVER w AS first_digest
              FROM (SELECT ord, (ev->>'id')::uuid AS id,
                           md5((ev->>'type') || ' ' || (ev->'data')::text)::uuid AS digest
                      FROM jsonb_array_elements(p_events) WITH ORDINALITY AS t(ev, ord)) i
            WINDOW w AS (PARTITION BY id ORDER BY ord)) e
      LEFT JOIN processed_events p ON p.event_id = e.id;

    -- 4. The events, in order; a run of new order.placed (or order.completed) events at once
    --    where place_orders() (or complete_orders()) can take it.
    SELECT array_agg((ev->>'id')::uuid ORDER BY ord), array_agg(ev->>'type' ORDER BY ord),
           array_agg(ev->'data' ORDER BY ord)
      INTO v_event_ids, v_event_types, v_event_data
      FROM jsonb_array_elements(p_events) WITH ORDINALITY AS t(ev, ord);
    WHILE i <= coalesce(cardinality(v_event_ids), 0) LOOP
        IF i > v_one_by_one_until AND v_fresh[i] AND v_event_types[i] IN ('order.placed', 'order.completed') THEN
            j := i;
            WHILE j < cardinality(v_event_ids) AND v_fresh[j + 1] AND v_event_types[j + 1] = v_event_types[i] LOOP
                j := j + 1;
            END LOOP;
            v_run := CASE WHEN j = i THEN NULL
                          WHEN v_event_types[i] = 'order.placed'
                          THEN place_orders(v_event_ids[i:j], v_event_data[i:j], p_default_ttl)
                          ELSE complete_orders(v_event_ids[i:j], v_event_data[i:j]) END;
            IF v_run IS NOT NULL THEN
                v_results := v_results || v_run;
                v_ids := v_ids || v_event_ids[i:j];
                v_types := v_types || v_event_types[i:j];
                v_digests := v_digests || v_event_digests[i:j];
                v_outcomes := v_outcomes || ARRAY(SELECT r->>'outcome' FROM unnest(v_run) r);
                i := j + 1;
                CONTINUE;
            END IF;
            v_one_by_one_until := j;
        END IF;
        IF v_fresh[i] THEN
            v_result := CASE v_event_types[i]
                WHEN 'order.placed'    THEN place_order(v_event_ids[i], v_event_data[i], p_default_ttl)
                WHEN 'order.cancelled' THEN cancel_order(v_event_ids[i], v_event_data[i])
                WHEN 'order.completed' THEN complete_order(v_event_ids[i], v_event_data[i])
                WHEN 'stock.adjusted'  THEN adjust_stock(v_event_ids[i], v_event_data[i])
            END;
            v_ids := array_append(v_ids, v_event_ids[i]);
            v_types := array_append(v_types, v_event_types[i]);
            v_digests := array_append(v_digests, v_event_digests[i]);
            v_outcomes := array_append(v_outcomes, v_result->>'outcome');
        ELSIF v_reused[i] THEN
            v_result := jsonb_build_object('outcome', 'id_reused', 'messages', '[]'::jsonb, 'products', '[]'::jsonb);
        ELSE
            -- Changes nothing, but returns the figures: a redelivery after a crash between
            -- commit and cache write must still bring the cache up to date.
            v_result := jsonb_build_object('outcome', 'duplicate', 'messages', '[]'::jsonb,
                                           'products', touched_figures(v_event_ids[i], v_event_data[i]));
        END IF;
        v_results := array_append(v_results, v_result);
        i := i + 1;
    END LOOP;

    -- 5. The batch's idempotency keys and outbox rows, one INSERT each.
    INSERT INTO processed_events (event_id, type, outcome, digest)
    SELECT * FROM unnest(v_ids, v_types, v_outcomes, v_digests) ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS v_written = ROW_COUNT;
    IF v_written < cardinality(v_ids) THEN
        -- Another transaction applied one of these events after step 3 (a redelivery racing
        -- its original). Undo it all; the worker retries and then finds a duplicate.
        RAISE EXCEPTION 'an event of this batch was applied concurrently' USING ERRCODE = 'serialization_failure';
    END IF;
    PERFORM write_outbox(ARRAY(SELECT m FROM unnest(v_results) r, jsonb_array_elements(r->'messages') m));
    RETURN to_jsonb(v_results);
END $$;

-- One event on its own (operators, tests): apply_events() with a batch of one.
CREATE OR REPLACE FUNCTION apply_event(p_event_id uuid, p_type text, p_data jsonb,
                                       p_default_ttl integer DEFAULT 900) RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
    RETURN apply_events(jsonb_build_array(jsonb_build_object('id', p_event_id, 'type', p_type, 'data', p_data)),
                        p_default_ttl)->0;
END $$;

-- Functions of earlier versions of this file, no longer used.
DROP FUNCTION IF EXISTS emit(uuid, text, jsonb);
DROP FUNCTION IF EXISTS event_body(uuid, uuid, text, jsonb);
DROP FUNCTION IF EXISTS move_stock(text, bigint, bigint, text, text, uuid, text, integer);
DROP FUNCTION IF EXISTS release_lines(text, text, uuid);
DROP FUNCTION IF EXISTS lock_order_products(text);
DROP FUNCTION IF EXISTS valid_order_id(text);

---------------------------------------------------------------------------------------------
-- Expiry.

-- Locks the given products in the one global order. Missing ids are simply skipped.
CREATE OR REPLACE FUNCTION lock_products(p_ids text[]) RETURNS void
LANGUAGE sql AS $$
    SELECT NULL::void FROM (
        SELECT 1 FROM products WHERE product_id = ANY(p_ids)
         ORDER BY product_id FOR UPDATE) locked
$$;

-- The lines of a stored order, in the order they were placed, as messages carry them.
CREATE OR REPLACE FUNCTION order_lines_json(p_order_id text) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object('product_id', product_id, 'quantity', quantity)
                              ORDER BY line_no), '[]'::jsonb)
      FROM order_lines WHERE order_id = p_order_id
$$;

-- The lines of the given orders (with the id of the order.placed that reserved them), each
-- order looked up through the primary keys. A plain join with unnest() or `= ANY` lets the
-- planner prefer scanning all of order_lines, which a sweep would pay once per batch, more
-- as the table grows; OFFSET 0 keeps the lookup per order.
CREATE OR REPLACE FUNCTION lines_of_orders(p_order_ids text[])
RETURNS TABLE (order_id text, product_id text, quantity integer, placed_event_id uuid)
LANGUAGE sql STABLE AS $$
    SELECT l.order_id, l.product_id, l.quantity, l.placed_event_id
      FROM unnest(p_order_ids) e(id)
     CROSS JOIN LATERAL (SELECT ol.order_id, ol.product_id, ol.quantity, o.placed_event_id
                           FROM order_lines ol JOIN orders o ON o.order_id = ol.order_id
                          WHERE ol.order_id = e.id AND o.order_id = e.id OFFSET 0) l
$$;

-- Expiry: releases up to p_limit reservations whose deadline (PostgreSQL's clock) passed,
-- oldest deadline first, found through the partial index orders_live_expiry.
-- One call is one short transaction holding the locks of its own orders and products only,
-- so a backlog of any size drains in bounded steps between the consumers' transactions.
-- Candidates are read without locks, then locked products-first like everyone else; an order
-- another transaction holds (a completion or cancellation in flight) is skipped, and taken by
-- the next sweep if still reserved. Set-based, because a backlog piles up on a few hot
-- products: one UPDATE per product however many orders hold it, one ledger row per order
-- line. (A release only raises `available`, so it never emits inventory.low_stock.)
-- Returns {expired, candidates, messages, products}; candidates = p_limit: more may be due.
CREATE OR REPLACE FUNCTION expire_reservations(p_limit integer DEFAULT 500) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_candidates text[];
    v_expired    text[];
    v_msgs       jsonb;
BEGIN
    SELECT array_agg(order_id) INTO v_candidates FROM (
        SELECT order_id FROM orders WHERE status = 'reserved' AND expires_at <= now()
         ORDER BY expires_at LIMIT p_limit) c;
    IF v_candidates IS NULL THEN
        RETURN jsonb_build_object('expired', 0, 'candidates', 0, 'messages', '[]'::jsonb, 'products', '[]'::jsonb);
    END IF;
    PERFORM lock_products(ARRAY(SELECT DISTINCT product_id FROM lines_of_orders(v_candidates)));
    -- Re-checked under the row lock: a completion or cancellation that committed meanwhile wins.
    SELECT array_agg(order_id) INTO v_expired FROM (
        SELECT o.order_id FROM unnest(v_candidates) c(order_id) JOIN orders o USING (order_id)
         WHERE o.status = 'reserved' AND o.expires_at <= now()
         ORDER BY o.order_id FOR UPDATE OF o SKIP LOCKED) o;
    IF v_expired IS NULL THEN
        RETURN jsonb_build_object('expired', 0, 'candidates', cardinality(v_candidates),
                                  'messages', '[]'::jsonb, 'products', '[]'::jsonb);
    END IF;
    UPDATE orders o SET status = 'expired', updated_at = now()
      FROM unnest(v_expired) e(order_id) WHERE o.order_id = e.order_id;
    INSERT INTO stock_movements (product_id, order_id, event_id, on_hand_delta, reserved_delta, reason)
    SELECT l.product_id, l.order_id, l.placed_event_id, 0, -l.quantity, 'expire'
      FROM lines_of_orders(v_expired) l
     ORDER BY l.order_id, l.product_id;
    UPDATE products p
       SET reserved = p.reserved - s.quantity, version = p.version + 1, updated_at = now()
      FROM (SELECT l.product_id, sum(l.quantity) AS quantity
              FROM lines_of_orders(v_expired) l GROUP BY l.product_id) s
     WHERE p.product_id = s.product_id;
    SELECT coalesce(jsonb_agg(m), '[]'::jsonb) INTO v_msgs FROM (
        SELECT new_message(o.placed_event_id, 'inventory.expired', jsonb_build_object(
                   'order_id', o.order_id, 'lines', order_lines_json(o.order_id),
                   'expired_at', rfc3339(o.expires_at))) AS m
          FROM unnest(v_expired) e(order_id) JOIN orders o USING (order_id)
         ORDER BY o.order_id) x;
    PERFORM write_outbox(ARRAY(SELECT jsonb_array_elements(v_msgs)));
    RETURN jsonb_build_object('expired', cardinality(v_expired), 'candidates', cardinality(v_candidates),
        'messages', v_msgs, 'products', (
        SELECT coalesce(jsonb_agg(product_figures(p) ORDER BY p.product_id), '[]'::jsonb)
          FROM products p WHERE p.product_id IN (
              SELECT l.product_id FROM lines_of_orders(v_expired) l)));
END $$;

-- Outbox rows nobody published yet (their worker died between commit and confirm).
CREATE OR REPLACE FUNCTION claim_unpublished(p_min_age interval, p_limit integer) RETURNS SETOF outbox
LANGUAGE sql AS $$
    SELECT * FROM outbox
     WHERE published_at IS NULL AND created_at <= now() - p_min_age
     ORDER BY id LIMIT p_limit FOR UPDATE SKIP LOCKED
$$;

CREATE OR REPLACE FUNCTION mark_published(p_ids bigint[]) RETURNS void
LANGUAGE sql AS $$
    UPDATE outbox SET published_at = now() WHERE id = ANY(p_ids) AND published_at IS NULL
$$;
