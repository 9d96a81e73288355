-- The stock rules. Re-applied by `inventory-worker migrate` whenever this file changes
-- (CREATE OR REPLACE), so it always holds the whole, current truth.
--
-- Locking discipline, which keeps concurrent transactions free of deadlocks:
--   1. product rows, in product_id order;  2. then order rows.
-- apply_events() locks every product a batch touches up front, so a batch of many
-- events obeys the same order as a single one.

-- RFC 3339 in UTC, microseconds, as every message carries.
CREATE OR REPLACE FUNCTION rfc3339(ts timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
$$;

-- The body of every result event (the contract's envelope).
CREATE OR REPLACE FUNCTION event_body(p_id uuid, p_causation_id uuid, p_type text, p_data jsonb) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object('id', p_id, 'type', p_type, 'occurred_at', rfc3339(now()),
                              'causation_id', p_causation_id, 'data', p_data)
$$;

-- Writes one result event to the outbox and returns what the worker needs to publish it.
CREATE OR REPLACE FUNCTION emit(p_causation_id uuid, p_type text, p_data jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_id   uuid := gen_random_uuid();
    v_body jsonb := event_body(v_id, p_causation_id, p_type, p_data);
    v_outbox_id bigint;
BEGIN
    INSERT INTO outbox (message_id, routing_key, body) VALUES (v_id, p_type, v_body)
    RETURNING id INTO v_outbox_id;
    RETURN jsonb_build_object('outbox_id', v_outbox_id, 'message_id', v_id,
                              'routing_key', p_type, 'body', v_body);
END $$;

CREATE OR REPLACE FUNCTION product_figures(p products) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('product_id', p.product_id, 'on_hand', p.on_hand,
        'reserved', p.reserved, 'available', p.on_hand - p.reserved, 'version', p.version)
$$;

-- Changes one product's figures, appends the ledger row and, when `available` falls to or
-- below the product's threshold, emits inventory.low_stock. Returns the messages emitted.
-- The caller holds the row lock.
CREATE OR REPLACE FUNCTION move_stock(
    p_product_id text, p_on_hand_delta bigint, p_reserved_delta bigint, p_reason text,
    p_order_id text, p_event_id uuid, p_note text DEFAULT NULL,
    p_threshold integer DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_before products;
    v_after  products;
BEGIN
    SELECT * INTO v_before FROM products WHERE product_id = p_product_id;
    UPDATE products
       SET on_hand = on_hand + p_on_hand_delta,
           reserved = reserved + p_reserved_delta,
           low_stock_threshold = coalesce(p_threshold, low_stock_threshold),
           version = version + 1,
           updated_at = now()
     WHERE product_id = p_product_id
    RETURNING * INTO v_after;
    IF p_on_hand_delta <> 0 OR p_reserved_delta <> 0 THEN
        INSERT INTO stock_movements (product_id, order_id, event_id, on_hand_delta, reserved_delta, reason, note)
        VALUES (p_product_id, p_order_id, p_event_id, p_on_hand_delta, p_reserved_delta, p_reason, p_note);
    END IF;
    IF v_after.on_hand - v_after.reserved <= v_after.low_stock_threshold
       AND v_before.on_hand - v_before.reserved > v_after.low_stock_threshold THEN
        RETURN jsonb_build_array(emit(p_event_id, 'inventory.low_stock', jsonb_build_object(
            'product_id', p_product_id,
            'available', v_after.on_hand - v_after.reserved,
            'threshold', v_after.low_stock_threshold)));
    END IF;
    RETURN '[]'::jsonb;
END $$;

-- The lines of a stored order, in the order they were placed, as messages carry them.
CREATE OR REPLACE FUNCTION order_lines_json(p_order_id text) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object('product_id', product_id, 'quantity', quantity)
                              ORDER BY line_no), '[]'::jsonb)
      FROM order_lines WHERE order_id = p_order_id
$$;

-- Locks the given products in the one global order. Missing ids are simply skipped.
CREATE OR REPLACE FUNCTION lock_products(p_ids text[]) RETURNS void
LANGUAGE sql AS $$
    SELECT NULL::void FROM (
        SELECT 1 FROM products WHERE product_id = ANY(p_ids)
         ORDER BY product_id FOR UPDATE) locked
$$;

CREATE OR REPLACE FUNCTION lock_order_products(p_order_id text) RETURNS void
LANGUAGE sql AS $$
    SELECT lock_products(ARRAY(SELECT product_id FROM order_lines WHERE order_id = p_order_id))
$$;

-- Releases every line of a reserved order (cancel or expiry). Caller holds the locks.
CREATE OR REPLACE FUNCTION release_lines(p_order_id text, p_reason text, p_event_id uuid) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    l record;
    v_msgs jsonb := '[]'::jsonb;
BEGIN
    FOR l IN SELECT product_id, quantity FROM order_lines WHERE order_id = p_order_id ORDER BY product_id LOOP
        v_msgs := v_msgs || move_stock(l.product_id, 0, -l.quantity, p_reason, p_order_id, p_event_id);
    END LOOP;
    RETURN v_msgs;
END $$;

-- Arguments are checked here too: a bug upstream must not be able to corrupt stock.
CREATE OR REPLACE FUNCTION check_arg(p_ok boolean, p_message text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF p_ok IS NOT TRUE THEN
        RAISE EXCEPTION 'invalid event: %', p_message USING ERRCODE = 'invalid_parameter_value';
    END IF;
END $$;

CREATE OR REPLACE FUNCTION valid_product_id(p text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$ SELECT p ~ '^[A-Za-z0-9._:-]{1,64}$' $$;

CREATE OR REPLACE FUNCTION valid_order_id(p text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$ SELECT length(p) BETWEEN 1 AND 200 $$;

---------------------------------------------------------------------------------------------
-- order.placed: reserve every line or none.
CREATE OR REPLACE FUNCTION place_order(p_event_id uuid, p_data jsonb, p_default_ttl integer) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_order_id  text := p_data->>'order_id';
    v_ttl       integer := coalesce((p_data->>'reservation_ttl_seconds')::integer, p_default_ttl);
    v_lines     jsonb := p_data->'lines';
    v_status    text;
    v_shortages jsonb;
    v_reason    text;
    v_expires   timestamptz;
    v_msgs      jsonb := '[]'::jsonb;
    l           record;
BEGIN
    PERFORM check_arg(valid_order_id(v_order_id), 'order_id');
    PERFORM check_arg(v_ttl BETWEEN 1 AND 31536000, 'reservation_ttl_seconds');
    PERFORM check_arg(jsonb_typeof(v_lines) = 'array'
                      AND jsonb_array_length(v_lines) BETWEEN 1 AND 100, 'lines');
    -- coalesce: bool_and skips NULLs, so a line without a quantity must count as false.
    PERFORM check_arg(bool_and(coalesce(valid_product_id(x->>'product_id')
                                        AND (x->>'quantity')::bigint BETWEEN 1 AND 1000000, false))
                      AND count(DISTINCT x->>'product_id') = count(*), 'lines')
       FROM jsonb_array_elements(v_lines) x;

    PERFORM lock_products(ARRAY(SELECT x->>'product_id' FROM jsonb_array_elements(v_lines) x));

    -- The orders row is the meeting point of every event of one order: a concurrent
    -- order.cancelled or a second order.placed waits here for us, and we for them.
    INSERT INTO orders (order_id, status, placed_event_id) VALUES (v_order_id, 'placing', p_event_id)
        ON CONFLICT (order_id) DO NOTHING;
    IF NOT FOUND THEN
        SELECT status INTO v_status FROM orders WHERE order_id = v_order_id FOR UPDATE;
        IF v_status = 'cancelled' THEN
            RETURN jsonb_build_object('outcome', 'rejected', 'order_id', v_order_id,
                'messages', jsonb_build_array(emit(p_event_id, 'inventory.rejected', jsonb_build_object(
                    'order_id', v_order_id, 'reason', 'order_cancelled', 'shortages', '[]'::jsonb))));
        END IF;
        -- Already reserved (or done) under another message id: never reserve twice.
        RETURN jsonb_build_object('outcome', 'duplicate_order', 'order_id', v_order_id,
                                  'status', v_status, 'messages', '[]'::jsonb);
    END IF;

    SELECT jsonb_agg(jsonb_build_object('product_id', x->>'product_id',
                                        'requested', (x->>'quantity')::bigint,
                                        'available', coalesce(p.on_hand - p.reserved, 0))
                     ORDER BY ord),
           CASE WHEN bool_or(p.product_id IS NULL) THEN 'unknown_product' ELSE 'insufficient_stock' END
      INTO v_shortages, v_reason
      FROM jsonb_array_elements(v_lines) WITH ORDINALITY AS t(x, ord)
      -- One primary-key lookup per line: a plain join hashed the whole table for every order
      -- (OFFSET 0 keeps the planner from flattening the lateral subquery back into that join).
      LEFT JOIN LATERAL (SELECT * FROM products WHERE product_id = x->>'product_id' OFFSET 0) p ON true
     WHERE p.product_id IS NULL OR p.on_hand - p.reserved < (x->>'quantity')::bigint;

    IF v_shortages IS NOT NULL THEN
        DELETE FROM orders WHERE order_id = v_order_id;  -- a rejected order may be placed again
        RETURN jsonb_build_object('outcome', 'rejected', 'order_id', v_order_id,
            'messages', jsonb_build_array(emit(p_event_id, 'inventory.rejected', jsonb_build_object(
                'order_id', v_order_id, 'reason', v_reason, 'shortages', v_shortages))));
    END IF;

    v_expires := now() + make_interval(secs => v_ttl);
    UPDATE orders SET status = 'reserved', expires_at = v_expires, updated_at = now()
     WHERE order_id = v_order_id;
    FOR l IN SELECT x->>'product_id' AS product_id, (x->>'quantity')::integer AS quantity, ord
               FROM jsonb_array_elements(v_lines) WITH ORDINALITY AS t(x, ord)
              ORDER BY x->>'product_id' LOOP
        INSERT INTO order_lines (order_id, product_id, line_no, quantity)
        VALUES (v_order_id, l.product_id, l.ord, l.quantity);
        v_msgs := v_msgs || move_stock(l.product_id, 0, l.quantity, 'reserve', v_order_id, p_event_id);
    END LOOP;
    RETURN jsonb_build_object('outcome', 'reserved', 'order_id', v_order_id,
        'messages', jsonb_build_array(emit(p_event_id, 'inventory.reserved', jsonb_build_object(
            'order_id', v_order_id, 'lines', order_lines_json(v_order_id),
            'expires_at', rfc3339(v_expires)))) || v_msgs);
END $$;

---------------------------------------------------------------------------------------------
-- order.cancelled: release the reservation; remember a cancel that came before its order.
CREATE OR REPLACE FUNCTION cancel_order(p_event_id uuid, p_data jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_order_id text := p_data->>'order_id';
    v_status   text;
    v_lines    jsonb;
    v_msgs     jsonb;
BEGIN
    PERFORM check_arg(valid_order_id(v_order_id), 'order_id');
    PERFORM lock_order_products(v_order_id);
    INSERT INTO orders (order_id, status) VALUES (v_order_id, 'cancelled')
        ON CONFLICT (order_id) DO NOTHING;
    IF FOUND THEN
        RETURN jsonb_build_object('outcome', 'cancel_recorded', 'order_id', v_order_id, 'messages', '[]'::jsonb);
    END IF;
    SELECT status INTO v_status FROM orders WHERE order_id = v_order_id FOR UPDATE;
    IF v_status <> 'reserved' THEN
        -- committed: too late to cancel; released/cancelled/expired: nothing left to release.
        RETURN jsonb_build_object('outcome', 'ignored', 'order_id', v_order_id,
                                  'status', v_status, 'messages', '[]'::jsonb);
    END IF;
    PERFORM lock_order_products(v_order_id);  -- no-op unless the order appeared meanwhile
    v_lines := order_lines_json(v_order_id);
    v_msgs := release_lines(v_order_id, 'release', p_event_id);
    UPDATE orders SET status = 'released', updated_at = now() WHERE order_id = v_order_id;
    RETURN jsonb_build_object('outcome', 'released', 'order_id', v_order_id,
        'messages', jsonb_build_array(emit(p_event_id, 'inventory.released', jsonb_build_object(
            'order_id', v_order_id, 'lines', v_lines, 'reason', 'cancelled'))) || v_msgs);
END $$;

---------------------------------------------------------------------------------------------
-- order.completed: commit the reservation (on_hand and reserved both fall). After expiry,
-- commit only if the stock is still there, taking it again and committing in one step.
CREATE OR REPLACE FUNCTION complete_order(p_event_id uuid, p_data jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_order_id  text := p_data->>'order_id';
    v_status    text;
    v_lines     jsonb;
    v_shortages jsonb;
    v_msgs      jsonb := '[]'::jsonb;
    l           record;
BEGIN
    PERFORM check_arg(valid_order_id(v_order_id), 'order_id');
    PERFORM lock_order_products(v_order_id);
    SELECT status INTO v_status FROM orders WHERE order_id = v_order_id FOR UPDATE;
    IF v_status IS NULL OR v_status IN ('placing', 'cancelled', 'released', 'committed') THEN
        RETURN jsonb_build_object('outcome', 'ignored', 'order_id', v_order_id,
            'status', coalesce(v_status, 'unknown'), 'messages',
            CASE WHEN v_status IN ('cancelled', 'released') THEN
                jsonb_build_array(emit(p_event_id, 'inventory.rejected', jsonb_build_object(
                    'order_id', v_order_id, 'reason', 'order_cancelled', 'shortages', '[]'::jsonb)))
            ELSE '[]'::jsonb END);
    END IF;
    v_lines := order_lines_json(v_order_id);

    IF v_status = 'expired' THEN
        SELECT jsonb_agg(jsonb_build_object('product_id', ol.product_id, 'requested', ol.quantity,
                                            'available', p.on_hand - p.reserved) ORDER BY ol.line_no)
          INTO v_shortages
          FROM order_lines ol JOIN products p USING (product_id)
         WHERE ol.order_id = v_order_id AND p.on_hand - p.reserved < ol.quantity;
        IF v_shortages IS NOT NULL THEN
            RETURN jsonb_build_object('outcome', 'rejected', 'order_id', v_order_id,
                'messages', jsonb_build_array(emit(p_event_id, 'inventory.rejected', jsonb_build_object(
                    'order_id', v_order_id, 'reason', 'reservation_expired', 'shortages', v_shortages))));
        END IF;
        FOR l IN SELECT product_id, quantity FROM order_lines WHERE order_id = v_order_id ORDER BY product_id LOOP
            v_msgs := v_msgs || move_stock(l.product_id, 0, l.quantity, 'reserve', v_order_id, p_event_id,
                                           'taken again after expiry');
        END LOOP;
    END IF;

    FOR l IN SELECT product_id, quantity FROM order_lines WHERE order_id = v_order_id ORDER BY product_id LOOP
        v_msgs := v_msgs || move_stock(l.product_id, -l.quantity, -l.quantity, 'commit', v_order_id, p_event_id);
    END LOOP;
    UPDATE orders SET status = 'committed', updated_at = now() WHERE order_id = v_order_id;
    RETURN jsonb_build_object('outcome', 'committed', 'order_id', v_order_id,
        'messages', jsonb_build_array(emit(p_event_id, 'inventory.committed', jsonb_build_object(
            'order_id', v_order_id, 'lines', v_lines))) || v_msgs);
END $$;

---------------------------------------------------------------------------------------------
-- stock.adjusted: receive (delta > 0), correct (delta < 0) or count (on_hand = N).
-- This is how a product comes to exist.
CREATE OR REPLACE FUNCTION adjust_stock(p_event_id uuid, p_data jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_product_id text := p_data->>'product_id';
    v_threshold  integer := (p_data->>'low_stock_threshold')::integer;
    v_created    boolean;
    v_row        products;
    v_target     bigint;
    v_reason     text;
    v_msgs       jsonb;
BEGIN
    PERFORM check_arg(valid_product_id(v_product_id), 'product_id');
    PERFORM check_arg((p_data ? 'delta') <> (p_data ? 'on_hand'), 'exactly one of delta and on_hand');
    PERFORM check_arg(v_threshold IS NULL OR v_threshold >= 0, 'low_stock_threshold');

    INSERT INTO products (product_id) VALUES (v_product_id) ON CONFLICT DO NOTHING;
    v_created := FOUND;
    SELECT * INTO v_row FROM products WHERE product_id = v_product_id FOR UPDATE;
    v_target := CASE WHEN p_data ? 'delta' THEN v_row.on_hand + (p_data->>'delta')::bigint
                     ELSE (p_data->>'on_hand')::bigint END;
    v_reason := CASE WHEN v_target < 0 THEN 'negative_on_hand'
                     WHEN v_target < v_row.reserved THEN 'below_reserved' END;
    IF v_reason IS NOT NULL THEN
        IF v_created THEN
            DELETE FROM products WHERE product_id = v_product_id;
        END IF;
        RETURN jsonb_build_object('outcome', 'rejected', 'product_id', v_product_id,
            'messages', jsonb_build_array(emit(p_event_id, 'inventory.adjustment_rejected', jsonb_build_object(
                'product_id', v_product_id, 'reason', v_reason,
                'on_hand', v_row.on_hand, 'reserved', v_row.reserved, 'requested', v_target))));
    END IF;
    v_msgs := move_stock(v_product_id, v_target - v_row.on_hand, 0, 'adjust', NULL, p_event_id,
                         p_data->>'reason', v_threshold);
    SELECT * INTO v_row FROM products WHERE product_id = v_product_id;
    RETURN jsonb_build_object('outcome', 'adjusted', 'product_id', v_product_id,
        'messages', jsonb_build_array(emit(p_event_id, 'inventory.adjusted', jsonb_build_object(
            'product_id', v_product_id, 'on_hand', v_row.on_hand, 'reserved', v_row.reserved,
            'available', v_row.on_hand - v_row.reserved))) || v_msgs);
END $$;

---------------------------------------------------------------------------------------------
-- Current figures of every product an event changed (or names), for the cache.
CREATE OR REPLACE FUNCTION touched_figures(p_event_id uuid, p_data jsonb) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(product_figures(p) ORDER BY p.product_id), '[]'::jsonb)
      FROM products p
     -- = ANY(ARRAY(...)): primary-key lookups. The planner turned IN (subquery), and
     -- IN ... OR ..., into a scan of every product for every event.
     WHERE p.product_id = ANY(ARRAY(SELECT product_id FROM stock_movements WHERE event_id = p_event_id
                                    UNION ALL SELECT p_data->>'product_id'))
$$;

-- The one entry point for an input event: idempotent by message id.
-- Returns {outcome, messages: [outbox rows to publish], products: [figures after]}.
CREATE OR REPLACE FUNCTION apply_event(p_event_id uuid, p_type text, p_data jsonb,
                                       p_default_ttl integer DEFAULT 900) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_result jsonb;
BEGIN
    PERFORM check_arg(p_event_id IS NOT NULL, 'id');
    PERFORM check_event_data(p_type, p_data);  -- sql/procedures/checks.sql
    INSERT INTO processed_events (event_id, type) VALUES (p_event_id, p_type) ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        -- Changes nothing, but returns the figures: a redelivery after a crash between commit
        -- and cache write must still bring the cache up to date.
        RETURN jsonb_build_object('outcome', 'duplicate', 'messages', '[]'::jsonb,
                                  'products', touched_figures(p_event_id, p_data));
    END IF;
    v_result := CASE p_type
        WHEN 'order.placed'    THEN place_order(p_event_id, p_data, p_default_ttl)
        WHEN 'order.cancelled' THEN cancel_order(p_event_id, p_data)
        WHEN 'order.completed' THEN complete_order(p_event_id, p_data)
        WHEN 'stock.adjusted'  THEN adjust_stock(p_event_id, p_data)
    END;
    PERFORM check_arg(v_result IS NOT NULL, 'type ' || coalesce(p_type, 'null'));
    UPDATE processed_events SET outcome = v_result->>'outcome' WHERE event_id = p_event_id;
    RETURN v_result || jsonb_build_object('products', touched_figures(p_event_id, p_data));
END $$;

-- Many events in one transaction (in the order given). Every product the batch can touch
-- is locked first, in product_id order, so batches never deadlock one another.
CREATE OR REPLACE FUNCTION apply_events(p_events jsonb, p_default_ttl integer DEFAULT 900) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    e jsonb;
    -- A jsonb[] grows in place; `jsonb || jsonb` re-encoded every earlier result on each
    -- append, which made a batch cost quadratic in its size.
    v_results jsonb[] := '{}';
BEGIN
    PERFORM lock_products(ARRAY(
        SELECT x->>'product_id'
          FROM jsonb_array_elements(p_events) ev, jsonb_array_elements(
                   CASE WHEN jsonb_typeof(ev->'data'->'lines') = 'array' THEN ev->'data'->'lines'
                        ELSE '[]'::jsonb END) x
        UNION SELECT ev->'data'->>'product_id' FROM jsonb_array_elements(p_events) ev
        UNION SELECT ol.product_id FROM order_lines ol  -- = ANY(ARRAY(..)): index, not a scan
               WHERE ol.order_id = ANY(ARRAY(SELECT ev->'data'->>'order_id' FROM jsonb_array_elements(p_events) ev))));
    FOR e IN SELECT value FROM jsonb_array_elements(p_events) LOOP
        v_results := array_append(v_results,
            apply_event((e->>'id')::uuid, e->>'type', e->'data', p_default_ttl));
    END LOOP;
    RETURN to_jsonb(v_results);
END $$;

---------------------------------------------------------------------------------------------
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
    -- What emit() does, for the whole batch in one INSERT (emit row by row costs more than
    -- the rest of the sweep together).
    WITH ev AS (
        SELECT gen_random_uuid() AS id, o.placed_event_id, event_data FROM (
            SELECT o.order_id, o.placed_event_id, jsonb_build_object(
                       'order_id', o.order_id, 'lines', order_lines_json(o.order_id),
                       'expired_at', rfc3339(o.expires_at)) AS event_data
              FROM unnest(v_expired) e(order_id) JOIN orders o USING (order_id)
             ORDER BY o.order_id) o
    ), written AS (
        INSERT INTO outbox (message_id, routing_key, body)
        SELECT id, 'inventory.expired', event_body(id, placed_event_id, 'inventory.expired', event_data) FROM ev
        RETURNING id, message_id, routing_key, body
    )
    SELECT jsonb_agg(jsonb_build_object('outbox_id', id, 'message_id', message_id,
                                        'routing_key', routing_key, 'body', body) ORDER BY id)
      INTO v_msgs FROM written;
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
