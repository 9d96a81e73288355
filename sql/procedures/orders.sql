-- Orders: order.placed (reserve every line or none), order.cancelled, order.completed, each
-- one by one and, where that gives exactly the same, as set-based runs.

-- A stored order's lines, with its products locked (in product_id order) and their figures.
-- apply_events() locked them already, unless the order was placed by a transaction that
-- committed after that: then this takes the locks.
-- at_default: every product is default-only, so that (for an order held implicitly at
-- `default`, orders.allocated = false) move_stock() can release or commit it in its products
-- rows; otherwise the order goes through change_holdings().
CREATE OR REPLACE FUNCTION locked_order_lines(p_order_id text,
    OUT product_ids text[], OUT quantities bigint[], OUT lines jsonb, OUT shortages jsonb, OUT at_default boolean)
LANGUAGE plpgsql AS $$
BEGIN
    SELECT array_agg(l.product_id ORDER BY l.product_id),
           array_agg(l.quantity::bigint ORDER BY l.product_id),
           jsonb_agg(jsonb_build_object('product_id', l.product_id, 'quantity', l.quantity) ORDER BY l.line_no),
           -- What re-reserving the lines would lack (order.completed after expiry).
           jsonb_agg(jsonb_build_object('product_id', l.product_id, 'requested', l.quantity,
                                        'available', l.available) ORDER BY l.line_no)
               FILTER (WHERE l.available < l.quantity),
           coalesce(bool_and(NOT l.multi_location), true)
      INTO product_ids, quantities, lines, shortages, at_default
      FROM (SELECT ol.product_id, ol.quantity, ol.line_no, p.multi_location,
                   level_available(p.on_hand, p.reserved, p.damaged, p.quality_control, p.safety_stock) AS available
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
    INSERT INTO orders (order_id, status, placed_event_id, expires_at, channel_id)
    VALUES (v_order_id, 'reserved', p_event_id, v_expires, p_data->>'channel_id')
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
           bool_or(p.product_id IS NULL) AS unknown,
           -- Anything but every line reserved in a products row at `default` (a channel, a
           -- pin, a product with other levels or a policy, `default` not selling): placed by
           -- place_order_at_locations().
           p_data->>'channel_id' IS NOT NULL OR bool_or(l.location_id IS NOT NULL OR NOT p.plain)
               OR NOT (SELECT active AND fulfils_orders FROM locations WHERE location_id = 'default') AS elsewhere
      INTO v_check
      FROM (SELECT x->>'product_id' AS product_id, (x->>'quantity')::bigint AS quantity, ord,
                   x->>'location_id' AS location_id
              FROM jsonb_array_elements(p_data->'lines') WITH ORDINALITY AS t(x, ord)) l
      -- One primary-key lookup per line (OFFSET 0 keeps the planner from hashing the table).
      LEFT JOIN LATERAL (SELECT on_hand, reserved, product_id,
                                NOT multi_location AND tracked AND max_per_order IS NULL AND damaged = 0
                                AND quality_control = 0 AND safety_stock = 0 AND backorder_mode = 'deny' AS plain
                           FROM products WHERE product_id = l.product_id OFFSET 0) p ON true;
    IF v_check.elsewhere THEN
        RETURN place_order_at_locations(p_event_id, p_data, v_expires);
    END IF;
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

-- A run of order.placed events (consecutive in a batch, all new) decided in one pass in memory
-- and written in a few statements, giving exactly what place_order() one by one would: the
-- same outcomes (reserved, insufficient_stock with the same `available`, duplicate_order,
-- order_cancelled), figures after each event, low_stock messages, ledger rows, and the same
-- order of outbox ids. That holds where place_order() would reserve in products rows at
-- `default` and nothing else: no channel, no pin, every product known, default-only, tracked,
-- without policy (max_per_order, damaged, quality control, safety stock, backorders) and
-- without open backorders (one by one would try to fill them after each order), `default`
-- selling. Then a product's `available` is on_hand - reserved, and an order is reserved whole
-- or rejected whole on that figure alone (lines name distinct products: the checks).
-- Returns one result per event, or NULL when the run must be applied one by one.
-- force_generic_plan: its statements are planned once per session. Left to choose, PostgreSQL
-- planned them again on every call of a short run (a custom plan looked cheaper for a few
-- rows), which cost about 300 us per call, more than the run's own work below 5 orders.
CREATE OR REPLACE FUNCTION place_orders(p_ids uuid[], p_datas jsonb[], p_default_ttl integer) RETURNS jsonb[]
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_results   jsonb[] := array_fill(NULL::jsonb, ARRAY[cardinality(p_ids)]);
    -- The lines, by event and then product_id (the order move_stock() takes them in).
    v_line_ev   integer[];
    v_line_pid  text[];
    v_line_qty  bigint[];
    v_line_no   integer[];
    v_line_prod integer[];  -- index into the product arrays below
    v_products  integer;    -- distinct products named
    v_elsewhere boolean;
    v_ok        boolean;
    -- The run's products, by product_id, locked; figures kept current as orders are decided.
    v_pids      text[];
    v_on_hand   bigint[];
    v_reserved  bigint[];
    v_version   bigint[];
    v_version0  bigint[];
    v_threshold integer[];
    -- Orders stored before the run (a duplicate, or a cancel that came first) and their status.
    v_stored    text[];
    v_status    text[];
    -- What is written at the end: orders reserved, and their lines (= ledger rows, in order).
    v_acc_order text[] := '{}';
    v_acc_event uuid[] := '{}';
    v_acc_exp   timestamptz[] := '{}';
    v_w_order   text[] := '{}';
    v_w_event   uuid[] := '{}';
    v_w_pid     text[] := '{}';
    v_w_no      integer[] := '{}';
    v_w_qty     bigint[] := '{}';
    -- One event.
    v_order_id  text;
    v_first     integer;
    v_last      integer := 0;
    v_short     jsonb[];
    v_figures   jsonb[];
    v_low       jsonb[];
    v_expires   timestamptz;
    v_before    bigint;
    v_after     bigint;
    k           integer;
    v_p         integer;
BEGIN
    SELECT array_agg(t.ord::integer ORDER BY t.ord, x.line->>'product_id'),
           array_agg(x.line->>'product_id' ORDER BY t.ord, x.line->>'product_id'),
           array_agg((x.line->>'quantity')::bigint ORDER BY t.ord, x.line->>'product_id'),
           array_agg(x.line_no::integer ORDER BY t.ord, x.line->>'product_id'),
           count(DISTINCT x.line->>'product_id'),
           coalesce(bool_or(t.d->>'channel_id' IS NOT NULL OR x.line->>'location_id' IS NOT NULL), false)
      INTO v_line_ev, v_line_pid, v_line_qty, v_line_no, v_products, v_elsewhere
      FROM unnest(p_datas) WITH ORDINALITY AS t(d, ord)
     CROSS JOIN LATERAL jsonb_array_elements(t.d->'lines') WITH ORDINALITY AS x(line, line_no);
    IF v_elsewhere OR v_line_ev IS NULL THEN
        RETURN NULL;
    END IF;

    -- Locked by apply_events() already, unless created since by another transaction: then
    -- this takes the lock before the figures are read.
    SELECT array_agg(product_id ORDER BY product_id), array_agg(on_hand ORDER BY product_id),
           array_agg(reserved ORDER BY product_id), array_agg(version ORDER BY product_id),
           array_agg(low_stock_threshold ORDER BY product_id),
           count(*) = v_products
               AND bool_and(NOT multi_location AND tracked AND max_per_order IS NULL AND damaged = 0
                            AND quality_control = 0 AND safety_stock = 0 AND backorder_mode = 'deny'
                            AND backordered = 0)
      INTO v_pids, v_on_hand, v_reserved, v_version, v_threshold, v_ok
      FROM (SELECT * FROM products WHERE product_id = ANY(v_line_pid) ORDER BY product_id FOR UPDATE) p;
    IF v_ok IS NOT TRUE OR NOT (SELECT active AND fulfils_orders FROM locations WHERE location_id = 'default') THEN
        RETURN NULL;
    END IF;
    v_version0 := v_version;
    -- Joined, not array_position() per line: that compared each line with half the run's
    -- products (125,000 text comparisons for 100 orders of 5 lines, 4% of the backend's CPU).
    v_line_prod := ARRAY(SELECT q.k FROM unnest(v_line_pid) WITH ORDINALITY AS u(pid, n)
                           JOIN unnest(v_pids) WITH ORDINALITY AS q(pid, k) ON q.pid = u.pid
                          ORDER BY u.n);

    -- Locked as place_order() locks a stored order (its status is the answer).
    SELECT coalesce(array_agg(order_id), '{}'), coalesce(array_agg(status), '{}') INTO v_stored, v_status
      FROM (SELECT order_id, status FROM orders
             WHERE order_id = ANY(ARRAY(SELECT d->>'order_id' FROM unnest(p_datas) AS d))
             ORDER BY order_id FOR UPDATE) o;

    FOR i IN 1 .. cardinality(p_ids) LOOP
        v_order_id := p_datas[i]->>'order_id';
        v_first := v_last + 1;
        v_last := v_first;
        WHILE v_last < cardinality(v_line_ev) AND v_line_ev[v_last + 1] = i LOOP
            v_last := v_last + 1;
        END LOOP;
        v_p := array_position(v_stored, v_order_id);
        IF v_p IS NOT NULL THEN
            v_results[i] := CASE WHEN v_status[v_p] = 'cancelled'
                                 THEN rejected(p_ids[i], v_order_id, 'order_cancelled')
                                 ELSE jsonb_build_object('outcome', 'duplicate_order', 'order_id', v_order_id,
                                          'status', v_status[v_p], 'messages', '[]'::jsonb,
                                          'products', '[]'::jsonb) END;
            CONTINUE;
        END IF;
        IF v_order_id = ANY(v_acc_order) THEN  -- reserved earlier in this run
            v_results[i] := jsonb_build_object('outcome', 'duplicate_order', 'order_id', v_order_id,
                                               'status', 'reserved', 'messages', '[]'::jsonb,
                                               'products', '[]'::jsonb);
            CONTINUE;
        END IF;

        -- Every line or none, on each product's figures before this order.
        v_short := NULL;
        FOR k IN v_first .. v_last LOOP
            v_p := v_line_prod[k];
            IF v_on_hand[v_p] - v_reserved[v_p] < v_line_qty[k] THEN
                IF v_short IS NULL THEN
                    v_short := array_fill(NULL::jsonb, ARRAY[v_last - v_first + 1]);
                END IF;
                v_short[v_line_no[k]] := jsonb_build_object('product_id', v_line_pid[k],
                    'requested', v_line_qty[k], 'available', v_on_hand[v_p] - v_reserved[v_p]);
            END IF;
        END LOOP;
        IF v_short IS NOT NULL THEN  -- shortages in the order of the lines
            v_results[i] := rejected(p_ids[i], v_order_id, 'insufficient_stock',
                                     to_jsonb(array_remove(v_short, NULL)));
            CONTINUE;
        END IF;

        -- Reserved: figures and low_stock messages product by product (made before the
        -- inventory.reserved message, as move_stock() makes them, so outbox ids run alike).
        v_figures := '{}';
        v_low := '{}';
        FOR k IN v_first .. v_last LOOP
            v_p := v_line_prod[k];
            v_before := greatest(0, v_on_hand[v_p] - v_reserved[v_p]);
            v_reserved[v_p] := v_reserved[v_p] + v_line_qty[k];
            v_version[v_p] := v_version[v_p] + 1;
            v_after := greatest(0, v_on_hand[v_p] - v_reserved[v_p]);
            v_figures := array_append(v_figures, jsonb_build_object('product_id', v_pids[v_p],
                'on_hand', v_on_hand[v_p], 'reserved', v_reserved[v_p], 'available', v_after,
                'version', v_version[v_p]));
            IF v_after <= v_threshold[v_p] AND v_before > v_threshold[v_p] THEN
                v_low := array_append(v_low, new_message(p_ids[i], 'inventory.low_stock', jsonb_build_object(
                    'product_id', v_pids[v_p], 'available', v_after, 'threshold', v_threshold[v_p])));
            END IF;
            v_w_order := array_append(v_w_order, v_order_id);
            v_w_event := array_append(v_w_event, p_ids[i]);
            v_w_pid := array_append(v_w_pid, v_pids[v_p]);
            v_w_no := array_append(v_w_no, v_line_no[k]);
            v_w_qty := array_append(v_w_qty, v_line_qty[k]);
        END LOOP;
        v_expires := now() + make_interval(secs => coalesce((p_datas[i]->>'reservation_ttl_seconds')::integer,
                                                             p_default_ttl));
        v_acc_order := array_append(v_acc_order, v_order_id);
        v_acc_event := array_append(v_acc_event, p_ids[i]);
        v_acc_exp := array_append(v_acc_exp, v_expires);
        v_results[i] := jsonb_build_object('outcome', 'reserved', 'order_id', v_order_id,
            'products', to_jsonb(v_figures),
            'messages', jsonb_build_array(new_message(p_ids[i], 'inventory.reserved', jsonb_build_object(
                'order_id', v_order_id, 'lines', p_datas[i]->'lines', 'expires_at', rfc3339(v_expires))))
                || to_jsonb(v_low));
    END LOOP;

    IF cardinality(v_acc_order) = 0 THEN
        RETURN v_results;
    END IF;
    -- Orders rows in order_id order, the order concurrent runs lock them in. One stored by a
    -- transaction that committed after the look-up above makes this run's decisions stale:
    -- undo it all, and the worker retries (then it is a duplicate_order). A plain INSERT in a
    -- block (one subtransaction per run) rather than ON CONFLICT DO NOTHING, which probes the
    -- index before each row and logs each row twice, for a race that is rare.
    BEGIN
        INSERT INTO orders (order_id, status, placed_event_id, expires_at)
        SELECT o, 'reserved', e, t FROM unnest(v_acc_order, v_acc_event, v_acc_exp) AS u(o, e, t)
         ORDER BY o;
    EXCEPTION WHEN unique_violation THEN
        RAISE EXCEPTION 'an order of this run was placed concurrently' USING ERRCODE = 'serialization_failure';
    END;
    INSERT INTO order_lines (order_id, product_id, line_no, quantity)
    SELECT * FROM unnest(v_w_order, v_w_pid, v_w_no, v_w_qty);
    INSERT INTO stock_movements (product_id, order_id, event_id, on_hand_delta, reserved_delta, reason)
    SELECT pid, o, e, 0, q, 'reserve'
      FROM unnest(v_w_pid, v_w_order, v_w_event, v_w_qty) WITH ORDINALITY AS u(pid, o, e, q, n)
     ORDER BY n;
    UPDATE products p SET reserved = u.reserved, version = u.version, updated_at = now()
      FROM unnest(v_pids, v_reserved, v_version, v_version0) AS u(product_id, reserved, version, version0)
     WHERE p.product_id = u.product_id AND u.version <> u.version0;
    RETURN v_results;
END $$;

-- order.cancelled: release the reservation; remember a cancel that came before its order.
CREATE OR REPLACE FUNCTION cancel_order(p_event_id uuid, p_data jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_order_id text := p_data->>'order_id';
    v_status   text;
    v_allocated boolean;
    v_lines    record;
    v_moved    jsonb;
BEGIN
    IF p_data ? 'lines' THEN  -- Part B: a partial cancel (order_lifecycle.sql)
        RETURN cancel_order_lines(p_event_id, p_data);
    END IF;
    INSERT INTO orders (order_id, status) VALUES (v_order_id, 'cancelled')
        ON CONFLICT (order_id) DO NOTHING;
    IF FOUND THEN
        RETURN jsonb_build_object('outcome', 'cancel_recorded', 'order_id', v_order_id,
                                  'messages', '[]'::jsonb, 'products', '[]'::jsonb);
    END IF;
    SELECT status, allocated INTO v_status, v_allocated FROM orders WHERE order_id = v_order_id FOR UPDATE;
    IF v_status <> 'reserved' THEN
        -- committed: too late to cancel; released/cancelled/expired: nothing left to release.
        RETURN jsonb_build_object('outcome', 'ignored', 'order_id', v_order_id, 'status', v_status,
                                  'messages', '[]'::jsonb, 'products', '[]'::jsonb);
    END IF;
    -- Part B: an order partly fulfilled or cancelled already releases what it still holds
    -- (and ends committed if anything was fulfilled).
    IF v_allocated AND EXISTS (SELECT 1 FROM order_lines WHERE order_id = v_order_id AND (fulfilled > 0 OR released > 0)) THEN
        RETURN release_order_lines(p_event_id, v_order_id, true, NULL);
    END IF;
    v_lines := locked_order_lines(v_order_id);
    IF v_allocated OR NOT v_lines.at_default THEN
        v_moved := change_holdings(v_order_id, v_allocated, 0, -1, 'release', p_event_id);
        IF v_allocated THEN
            -- backordered units too (product backordered falls)
            v_moved := jsonb_set(v_moved, '{figures}', merge_figures(v_moved->'figures',
                                 release_backorders(v_order_id, 'release', p_event_id, true)));
            UPDATE order_allocations SET reserved = 0 WHERE order_id = v_order_id;
            UPDATE order_lines SET released = quantity WHERE order_id = v_order_id;
        END IF;
    ELSE
        v_moved := move_stock(v_lines.product_ids, array_fill(0::bigint, ARRAY[cardinality(v_lines.product_ids)]),
                              ARRAY(SELECT -q FROM unnest(v_lines.quantities) q), 'release', v_order_id, p_event_id);
    END IF;
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
    v_allocated boolean;
    v_lines    record;
    v_taken    jsonb := '[]'::jsonb;
    v_moved    jsonb;
BEGIN
    SELECT status, allocated INTO v_status, v_allocated FROM orders WHERE order_id = v_order_id FOR UPDATE;
    IF v_status IS NULL OR v_status IN ('placing', 'cancelled', 'released', 'committed') THEN
        IF v_status IN ('cancelled', 'released') THEN
            RETURN rejected(p_event_id, v_order_id, 'order_cancelled') || jsonb_build_object('outcome', 'ignored',
                                                                                          'status', v_status);
        END IF;
        RETURN jsonb_build_object('outcome', 'ignored', 'order_id', v_order_id, 'status', coalesce(v_status, 'unknown'),
                                  'messages', '[]'::jsonb, 'products', '[]'::jsonb);
    END IF;
    v_lines := locked_order_lines(v_order_id);
    -- Backordered units cannot be committed (also those an expired order had): spec 4.5.
    IF v_allocated AND EXISTS (SELECT 1 FROM order_lines WHERE order_id = v_order_id AND backordered > 0) THEN
        RETURN rejected(p_event_id, v_order_id, 'backorder_pending');
    END IF;
    IF v_allocated OR NOT v_lines.at_default THEN
        RETURN complete_held_order(p_event_id, v_order_id, v_status, v_allocated, v_lines.lines);
    END IF;
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
    -- Held implicitly at `default` (orders.allocated = false) ...
    SELECT count(*) = cardinality(v_order_ids) AND bool_and(status = 'reserved' AND NOT allocated) INTO v_ok
      FROM (SELECT status, allocated FROM orders WHERE order_id = ANY(v_order_ids) ORDER BY order_id FOR UPDATE) o;
    IF NOT v_ok THEN
        RETURN NULL;
    END IF;
    -- ... in products rows (default-only products). Locked up front by apply_events(), unless
    -- an order was placed by a transaction that committed after that (as in locked_order_lines()).
    SELECT coalesce(bool_and(NOT multi_location), true) INTO v_ok FROM (
        SELECT multi_location FROM products WHERE product_id = ANY(ARRAY(
            SELECT product_id FROM order_lines WHERE order_id = ANY(v_order_ids)))
         ORDER BY product_id FOR UPDATE) p;
    IF NOT v_ok THEN
        RETURN NULL;
    END IF;

    FOR r IN
        WITH l AS (  -- every line of the orders, with its product's figures before the run
            SELECT t.ord, p_ids[t.ord] AS event_id, ol.order_id, ol.product_id, ol.line_no,
                   ol.quantity::bigint AS quantity, p.on_hand, p.reserved, p.version,
                   -- `available` as product_available(): a commit does not change it
                   CASE WHEN (SELECT active AND fulfils_orders FROM locations WHERE location_id = 'default')
                        THEN level_available(p.on_hand, p.reserved, p.damaged, p.quality_control, p.safety_stock)
                        ELSE 0 END AS available
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
                                            'reserved', a.reserved_after, 'available', a.available,
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

-- ==== Orders at locations (spec 4.1, 4.5, 4.6 without backorders) =============================
-- An order is held implicitly at `default` (orders.allocated = false, no order_allocations
-- rows) when every line is tracked and held whole there: the paths above, which keep
-- default-only traffic as fast as it was. Any other placement is `allocated`: one
-- order_allocations row per (line, location) and per-line counters kept; it goes through
-- change_level(), one level at a time.

-- order.placed with a channel, pins, untracked products, policies or levels elsewhere: the
-- checks of spec 4.1 in their order, then allocation_plan(), all lines or none. The orders row
-- is already inserted (by place_order()); a refusal deletes it again.
CREATE OR REPLACE FUNCTION place_order_at_locations(p_event_id uuid, p_data jsonb, p_expires timestamptz) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_order_id  text := p_data->>'order_id';
    v_channel   text := p_data->>'channel_id';
    v_lines     jsonb;
    v_refusal   record;
    v_strategy  text;
    v_listed    text[];
    v_locations text[];
    v_units     jsonb;
    v_plan      jsonb;
    v_implicit  boolean;
    v_moved     jsonb;
    v_backorders jsonb;   -- {product_id: units backordered}
    v_short     jsonb;
    v_backordered record;
    v_figures   jsonb := '[]';
BEGIN
    -- The lines as placed, with what the checks need of their products (locked already).
    SELECT jsonb_agg(jsonb_build_object('product_id', l.product_id, 'quantity', l.quantity,
               'location_id', l.location_id, 'known', p.product_id IS NOT NULL,
               'tracked', coalesce(p.tracked, true), 'max_per_order', p.max_per_order,
               'available', CASE WHEN p.product_id IS NULL THEN 0 ELSE product_available(p) END) ORDER BY l.ord)
      INTO v_lines
      FROM (SELECT x->>'product_id' AS product_id, (x->>'quantity')::bigint AS quantity,
                   x->>'location_id' AS location_id, ord
              FROM jsonb_array_elements(p_data->'lines') WITH ORDINALITY AS t(x, ord)) l
      LEFT JOIN products p ON p.product_id = l.product_id;

    -- The channel's candidate locations E: its list (or C2's rule), active and fulfilling.
    SELECT strategy, locations INTO v_strategy, v_listed FROM channels WHERE channel_id = coalesce(v_channel, 'default');
    IF FOUND AND v_listed IS NULL THEN
        SELECT array_agg(location_id ORDER BY priority, location_id) INTO v_locations
          FROM locations WHERE active AND fulfils_orders;
    ELSIF FOUND THEN
        SELECT array_agg(l.location_id ORDER BY c.ord) INTO v_locations
          FROM unnest(v_listed) WITH ORDINALITY AS c(location_id, ord)
          JOIN locations l ON l.location_id = c.location_id
         WHERE l.active AND l.fulfils_orders;
    END IF;
    v_locations := coalesce(v_locations, '{}');

    -- Refusals, first failing rule wins (spec 4.1 steps 2-5): the reason and its shortages.
    SELECT r.reason, r.shortages INTO v_refusal FROM (
        SELECT 1 AS step, 'unknown_product' AS reason,
               jsonb_agg(jsonb_build_object('product_id', x->'product_id', 'requested', x->'quantity',
                                            'available', x->'available') ORDER BY n)
                   FILTER (WHERE NOT (x->>'known')::boolean
                              OR (x->>'tracked')::boolean AND (x->>'available')::bigint < (x->>'quantity')::bigint)
                   AS shortages,
               bool_or(NOT (x->>'known')::boolean) AS fails
          FROM jsonb_array_elements(v_lines) WITH ORDINALITY AS t(x, n)
        UNION ALL
        SELECT 2, 'unknown_channel', '[]'::jsonb, v_strategy IS NULL
        UNION ALL
        SELECT 3, 'location_unavailable',
               jsonb_agg(jsonb_build_object('product_id', x->'product_id', 'requested', x->'quantity', 'available', 0)
                         ORDER BY n) FILTER (WHERE NOT x->>'location_id' = ANY(v_locations)),
               bool_or(NOT x->>'location_id' = ANY(v_locations))
          FROM jsonb_array_elements(v_lines) WITH ORDINALITY AS t(x, n)
        UNION ALL
        SELECT 4, 'quantity_limit',
               jsonb_agg(jsonb_build_object('product_id', x->'product_id', 'requested', x->'quantity',
                                            'available', x->'max_per_order') ORDER BY n)
                   FILTER (WHERE (x->>'quantity')::bigint > (x->>'max_per_order')::bigint),
               bool_or((x->>'quantity')::bigint > (x->>'max_per_order')::bigint)
          FROM jsonb_array_elements(v_lines) WITH ORDINALITY AS t(x, n)) r
     WHERE r.fails ORDER BY r.step LIMIT 1;
    IF FOUND THEN
        DELETE FROM orders WHERE order_id = v_order_id;  -- a rejected order may be placed again
        RETURN rejected(p_event_id, v_order_id, v_refusal.reason, coalesce(v_refusal.shortages, '[]'));
    END IF;

    -- What each tracked line's product can give at each candidate: its levels there
    -- (a default-only product's one level is its products row).
    SELECT coalesce(jsonb_object_agg(u.product_id, u.units), '{}') INTO v_units FROM (
        SELECT p.product_id, jsonb_object_agg(v.location_id, level_available(v.on_hand, v.reserved, v.damaged,
                                              v.quality_control, v.safety_stock)) AS units
          FROM products p
         CROSS JOIN LATERAL (
            SELECT 'default'::text AS location_id, p.on_hand, p.reserved, p.damaged, p.quality_control, p.safety_stock
             WHERE NOT p.multi_location
            UNION ALL
            SELECT s.location_id, s.on_hand, s.reserved, s.damaged, s.quality_control, s.safety_stock
              FROM stock_levels s
             WHERE p.multi_location AND s.product_id = p.product_id AND s.location_id = ANY(v_locations)) v
         WHERE p.product_id = ANY(ARRAY(SELECT x->>'product_id' FROM jsonb_array_elements(v_lines) x
                                         WHERE (x->>'tracked')::boolean))
         GROUP BY p.product_id) u;
    v_plan := allocation_plan(
        coalesce((SELECT jsonb_agg(jsonb_build_object('product_id', x->'product_id', 'quantity', x->'quantity')
                                   || CASE WHEN x->>'location_id' IS NULL THEN '{}'
                                           ELSE jsonb_build_object('location_id', x->'location_id') END ORDER BY n)
                    FROM jsonb_array_elements(v_lines) WITH ORDINALITY AS t(x, n) WHERE (x->>'tracked')::boolean),
                 '[]'),
        v_locations, v_units, v_strategy);
    -- Shortfalls within the product's headroom (and the order allowing it) are backordered
    -- (spec 4.1); any other refuses the order, each such line's shortage `available` being
    -- what it could have had: reservable + headroom (= today's figure without a policy).
    SELECT jsonb_object_agg(b.product_id, b.shortfall) FILTER (WHERE b.shortfall > 0),
           jsonb_agg(jsonb_build_object('product_id', b.product_id, 'requested', b.quantity,
                                        'available', b.quantity - b.shortfall + b.headroom) ORDER BY b.n)
               FILTER (WHERE b.shortfall > b.headroom)
      INTO v_backorders, v_short
      FROM (SELECT n, a->>'product_id' AS product_id, (a->>'quantity')::bigint AS quantity,
                   (a->>'shortfall')::bigint AS shortfall,
                   CASE WHEN (a->>'shortfall')::bigint = 0 OR p_data->'allow_backorder' = 'false' THEN 0
                        ELSE coalesce(product_headroom(p), 4000000000000000000) END AS headroom
              FROM jsonb_array_elements(v_plan) WITH ORDINALITY AS t(a, n)
              JOIN products p ON p.product_id = a->>'product_id') b;
    IF v_short IS NOT NULL THEN
        DELETE FROM orders WHERE order_id = v_order_id;
        RETURN rejected(p_event_id, v_order_id, 'insufficient_stock', v_short);
    END IF;
    v_backorders := coalesce(v_backorders, '{}');

    -- Held implicitly at `default` when every line is tracked and held whole there.
    v_implicit := v_backorders = '{}'
                  AND NOT EXISTS (SELECT 1 FROM jsonb_array_elements(v_lines) x WHERE NOT (x->>'tracked')::boolean)
                  AND NOT EXISTS (SELECT 1 FROM jsonb_array_elements(v_plan) a
                                   WHERE a->'allocations' <> jsonb_build_array(jsonb_build_object(
                                             'location_id', 'default', 'quantity', a->'quantity')));
    INSERT INTO order_lines (order_id, product_id, line_no, quantity, tracked, backordered)
    SELECT v_order_id, x->>'product_id', n, (x->>'quantity')::integer, (x->>'tracked')::boolean,
           coalesce((v_backorders->>(x->>'product_id'))::integer, 0)
      FROM jsonb_array_elements(v_lines) WITH ORDINALITY AS t(x, n);
    IF NOT v_implicit THEN
        UPDATE orders SET allocated = true WHERE order_id = v_order_id;
        INSERT INTO order_allocations (order_id, product_id, location_id, position, reserved)
        SELECT v_order_id, a->>'product_id', h->>'location_id', k, (h->>'quantity')::bigint
          FROM jsonb_array_elements(v_plan) a, jsonb_array_elements(a->'allocations') WITH ORDINALITY AS t(h, k);
    END IF;
    -- Backordered first: change_holdings()' figures (the later version) then win the merge.
    FOR v_backordered IN SELECT key, value::bigint FROM jsonb_each_text(v_backorders) ORDER BY key LOOP
        v_figures := v_figures || jsonb_build_array(change_backordered(v_backordered.key, v_backordered.value,
                                                                       'backorder', v_order_id, p_event_id));
    END LOOP;
    v_moved := change_holdings(v_order_id, NOT v_implicit, 0, 1, 'reserve', p_event_id);

    RETURN jsonb_build_object('outcome', 'reserved', 'order_id', v_order_id,
        'products', CASE WHEN v_figures = '[]' THEN v_moved->'figures' ELSE merge_figures(v_figures, v_moved->'figures') END,
        'messages', jsonb_build_array(new_message(p_event_id, 'inventory.reserved', jsonb_build_object(
                'order_id', v_order_id,
                'lines', (SELECT jsonb_agg(jsonb_build_object('product_id', x->'product_id', 'quantity', x->'quantity')
                                           ORDER BY n) FROM jsonb_array_elements(v_lines) WITH ORDINALITY AS t(x, n)),
                'expires_at', rfc3339(p_expires))))
            -- Where the lines are held, unless that is simply everything at `default`.
            || CASE WHEN v_implicit AND v_channel IS NULL
                         AND NOT EXISTS (SELECT 1 FROM jsonb_array_elements(v_lines) x WHERE x->>'location_id' IS NOT NULL)
                    THEN '[]'::jsonb
                    ELSE jsonb_build_array(new_message(p_event_id, 'inventory.allocated', jsonb_build_object(
                        'order_id', v_order_id, 'channel_id', coalesce(v_channel, 'default'),
                        'lines', (SELECT jsonb_agg(jsonb_build_object('product_id', x->'product_id',
                                      'quantity', x->'quantity', 'tracked', x->'tracked',
                                      'allocations', coalesce((SELECT a->'allocations' FROM jsonb_array_elements(v_plan) a
                                                                WHERE a->>'product_id' = x->>'product_id'), '[]'),
                                      'backordered', coalesce((v_backorders->>(x->>'product_id'))::bigint, 0)) ORDER BY n)
                                    FROM jsonb_array_elements(v_lines) WITH ORDINALITY AS t(x, n))))) END
            || (v_moved->'messages'))
        -- for apply_events(), which takes it out: fills may be due from now on in this batch
        || CASE WHEN v_backorders = '{}' THEN '{}'::jsonb ELSE jsonb_build_object('backordered', true) END;
END $$;

-- Changes the stock an order holds, level by level through change_level(): each holding's
-- on_hand by p_on_hand_sign x and reserved by p_reserved_sign x its quantity. Holdings: the
-- order_allocations rows (p_allocated; `reserved` = what the order holds or, once expired, held)
-- or else every tracked line at `default`. The caller holds the product locks.
-- Returns {figures: [each product's figures after, by product_id], messages: low_stock /
-- back_in_stock, one transition per product however many of its levels changed}.
CREATE OR REPLACE FUNCTION change_holdings(p_order_id text, p_allocated boolean, p_on_hand_sign integer,
                                           p_reserved_sign integer, p_reason text, p_event_id uuid,
                                           p_note text DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_figures  jsonb := '[]';
    v_messages jsonb := '[]';
    v_changed  jsonb;
    v_prev     jsonb;
    v_before   bigint;
    h          record;
BEGIN
    FOR h IN
        SELECT a.product_id, a.location_id, a.reserved AS quantity, a.position
          FROM order_allocations a WHERE p_allocated AND a.order_id = p_order_id AND a.reserved > 0
        UNION ALL
        SELECT ol.product_id, 'default', ol.quantity, 1 FROM order_lines ol
         WHERE NOT p_allocated AND ol.order_id = p_order_id AND ol.tracked
         ORDER BY 1, 4  -- products in the lock order; a product's levels in allocation order
    LOOP
        IF v_prev IS NOT NULL AND v_prev->'figures'->>'product_id' <> h.product_id THEN
            v_figures := v_figures || jsonb_build_array(v_prev->'figures');
            v_messages := v_messages || to_jsonb(stock_messages(p_event_id, v_prev->'figures'->>'product_id', v_before,
                (v_prev->>'available_after')::bigint, (v_prev->>'threshold')::integer, true));
            v_prev := NULL;
        END IF;
        v_changed := change_level(h.product_id, h.location_id, p_on_hand_sign * h.quantity, p_reserved_sign * h.quantity,
                                  0, 0, 0, p_reason, p_order_id, p_event_id, p_note, NULL, NULL, true);
        IF v_prev IS NULL THEN
            v_before := (v_changed->>'available_before')::bigint;
        END IF;
        v_prev := v_changed;
    END LOOP;
    IF v_prev IS NOT NULL THEN
        v_figures := v_figures || jsonb_build_array(v_prev->'figures');
        v_messages := v_messages || to_jsonb(stock_messages(p_event_id, v_prev->'figures'->>'product_id', v_before,
            (v_prev->>'available_after')::bigint, (v_prev->>'threshold')::integer, true));
    END IF;
    RETURN jsonb_build_object('figures', v_figures, 'messages', v_messages);
END $$;

-- order.completed of an order held at locations (or of products with levels elsewhere): commits
-- at every level it holds; after expiry, only if each of those levels still has what the order
-- held there (then taken again and committed in one step), else reservation_expired.
-- The caller locked the order (status reserved or expired) and its products.
CREATE OR REPLACE FUNCTION complete_held_order(p_event_id uuid, p_order_id text, p_status text,
                                               p_allocated boolean, p_lines jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_shortages jsonb;
    v_taken     jsonb := '[]';
    v_moved     jsonb;
BEGIN
    -- Part B: units promised without stock cannot be committed (cancel them or wait).
    IF EXISTS (SELECT 1 FROM order_lines WHERE order_id = p_order_id AND backordered > 0) THEN
        RETURN rejected(p_event_id, p_order_id, 'backorder_pending');
    END IF;
    IF p_status = 'expired' THEN
        SELECT jsonb_agg(jsonb_build_object('product_id', s.product_id, 'requested', s.requested,
                                            'available', s.available) ORDER BY s.line_no)
               FILTER (WHERE s.available < s.requested)
          INTO v_shortages
          FROM (SELECT h.product_id, min(ol.line_no) AS line_no, sum(h.quantity) AS requested,
                       sum(least(h.quantity, level_available(v.on_hand, v.reserved, v.damaged, v.quality_control,
                                                             v.safety_stock))) AS available
                  FROM (SELECT a.product_id, a.location_id, a.reserved AS quantity
                          FROM order_allocations a WHERE p_allocated AND a.order_id = p_order_id AND a.reserved > 0
                        UNION ALL
                        SELECT ol.product_id, 'default', ol.quantity FROM order_lines ol
                         WHERE NOT p_allocated AND ol.order_id = p_order_id AND ol.tracked) h
                  JOIN order_lines ol ON ol.order_id = p_order_id AND ol.product_id = h.product_id
                 CROSS JOIN LATERAL level_of(h.product_id, h.location_id) v
                 GROUP BY h.product_id) s;
        IF v_shortages IS NOT NULL THEN
            RETURN rejected(p_event_id, p_order_id, 'reservation_expired', v_shortages);
        END IF;
        v_taken := change_holdings(p_order_id, p_allocated, 0, 1, 'reserve', p_event_id, 'taken again after expiry')->'messages';
    END IF;
    v_moved := change_holdings(p_order_id, p_allocated, -1, -1, 'commit', p_event_id);
    IF p_allocated THEN
        UPDATE order_allocations SET fulfilled = fulfilled + reserved, reserved = 0 WHERE order_id = p_order_id;
        -- Everything still held is fulfilled now (Part B: after partial fulfilments or cancels).
        UPDATE order_lines SET fulfilled = quantity - released WHERE order_id = p_order_id;
    END IF;
    UPDATE orders SET status = 'committed', updated_at = now() WHERE order_id = p_order_id;
    RETURN jsonb_build_object('outcome', 'committed', 'order_id', p_order_id, 'products', v_moved->'figures',
        'messages', jsonb_build_array(new_message(p_event_id, 'inventory.committed', jsonb_build_object(
            -- each line's fulfilled total: the lines as placed unless part was cancelled
            'order_id', p_order_id, 'lines', CASE WHEN p_allocated THEN fulfilled_lines(p_order_id) ELSE p_lines END)))
            || v_taken || (v_moved->'messages'));
END $$;

-- Replaced by locked_order_lines() (its result gained at_default; a function's OUT parameters
-- cannot be changed in place).
DROP FUNCTION IF EXISTS locked_lines(text);
