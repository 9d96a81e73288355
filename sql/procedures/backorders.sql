-- Backorders and preorders (spec 1, 2, 4.1, 4.3, 4.8): a product's backorder policy, its
-- `headroom`, the product-level `backordered` figure and the filling of open backorders.
-- A backordered order is always `allocated` (order_allocations rows, per-line counters): the
-- default-only fast paths never meet one.

-- Units the product may still promise without stock: NULL = no limit. 0 when the mode is
-- `deny` or `until` has passed; `allow`: limit - backordered; `incoming`: the incoming units at
-- active, order-fulfilling locations - backordered, capped by the limit too; never below 0.
CREATE OR REPLACE FUNCTION product_headroom(p products) RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v bigint;
BEGIN
    IF p.backorder_mode = 'deny' OR now() >= p.backorder_until THEN
        RETURN 0;
    ELSIF p.backorder_mode = 'incoming' THEN
        IF NOT p.multi_location THEN
            v := CASE WHEN default_sells() THEN p.incoming ELSE 0 END;
        ELSE
            SELECT coalesce(sum(s.incoming), 0) INTO v
              FROM stock_levels s JOIN locations l ON l.location_id = s.location_id
             WHERE s.product_id = p.product_id AND l.active AND l.fulfils_orders;
        END IF;
        v := least(v, p.backorder_limit) - p.backordered;  -- least() ignores a NULL limit
    ELSIF p.backorder_limit IS NULL THEN
        RETURN NULL;
    ELSE
        v := p.backorder_limit - p.backordered;
    END IF;
    RETURN greatest(0, v);
END $$;

-- The backorder part of the detail view: {mode, limit, until, headroom}.
CREATE OR REPLACE FUNCTION backorder_json(p products) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object('mode', p.backorder_mode, 'limit', p.backorder_limit,
                              'until', rfc3339(p.backorder_until), 'headroom', product_headroom(p))
$$;

-- Changes a locked product's `backordered` by p_delta: products row (version + 1) and one
-- ledger row at no location (backordered_delta). Returns the product's compact figures after.
CREATE OR REPLACE FUNCTION change_backordered(p_product_id text, p_delta bigint, p_reason text,
                                              p_order_id text, p_event_id uuid) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v products;
BEGIN
    UPDATE products SET backordered = backordered + p_delta, version = version + 1, updated_at = now()
     WHERE product_id = p_product_id
    RETURNING * INTO v;
    INSERT INTO stock_movements (product_id, location_id, order_id, event_id, on_hand_delta, reserved_delta,
                                 backordered_delta, reason)
    VALUES (p_product_id, NULL, p_order_id, p_event_id, 0, 0, p_delta, p_reason);
    RETURN product_figures(v);
END $$;

-- Figures lists merged: b's entries replace a's of the same product; by product_id.
-- PL/pgSQL, not SQL: its query cannot be inlined, and as an SQL function called from PL/pgSQL
-- it was planned again at every call (185 us a call, on every backordered order).
CREATE OR REPLACE FUNCTION merge_figures(a jsonb, b jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN (SELECT coalesce(jsonb_agg(f ORDER BY f->>'product_id'), '[]'::jsonb) FROM (
        SELECT x AS f FROM jsonb_array_elements(a) x
         WHERE NOT EXISTS (SELECT 1 FROM jsonb_array_elements(b) y WHERE y->>'product_id' = x->>'product_id')
        UNION ALL SELECT y FROM jsonb_array_elements(b) y) m);
END $$;

-- A channel's candidate locations: its list (or C2's rule: every active, order-fulfilling
-- location by priority, location_id), active and fulfilling ones only, in channel order.
CREATE OR REPLACE FUNCTION channel_locations(p_channel_id text) RETURNS text[]
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT coalesce(CASE WHEN c.locations IS NULL
        THEN ARRAY(SELECT location_id FROM locations WHERE active AND fulfils_orders ORDER BY priority, location_id)
        ELSE ARRAY(SELECT l.location_id FROM unnest(c.locations) WITH ORDINALITY AS x(location_id, ord)
                     JOIN locations l ON l.location_id = x.location_id
                    WHERE l.active AND l.fulfils_orders ORDER BY x.ord) END, '{}')
      FROM channels c WHERE c.channel_id = coalesce(p_channel_id, 'default'));
END $$;

-- Releases the backordered units of an order's lines (cancel, expiry: spec 4.6, 4.8): product
-- `backordered` falls. p_clear: the lines' counters go to 0 too (a cancel); an expiry keeps
-- them (what the order had backordered: order.completed after expiry refuses it). The caller
-- holds the products' locks. Returns the figures of the products changed.
CREATE OR REPLACE FUNCTION release_backorders(p_order_id text, p_reason text, p_event_id uuid,
                                              p_clear boolean) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_figures jsonb := '[]';
    l         record;
BEGIN
    FOR l IN SELECT product_id, backordered FROM order_lines
              WHERE order_id = p_order_id AND backordered > 0 ORDER BY product_id LOOP
        v_figures := v_figures || jsonb_build_array(
            change_backordered(l.product_id, -l.backordered, p_reason, p_order_id, p_event_id));
    END LOOP;
    IF p_clear AND v_figures <> '[]' THEN
        UPDATE order_lines SET backordered = 0 WHERE order_id = p_order_id AND backordered > 0;
    END IF;
    RETURN v_figures;
END $$;

-- Backorder filling (spec 4.3) of one product, which the caller holds locked: open backorders
-- FIFO by (order created_at, order_id), at most p_limit orders, each at the locations of its
-- channel in channel order, n = min(backordered, level available) reserved there. The
-- candidates are chosen by FIFO, then locked in order_id order (C5) without waiting: an order
-- another transaction holds (which may be waiting for this product: a deadlock) ends the pass
-- there, so no later order overtakes it; the sweeper's fill pass comes back to it.
-- p_event_id: the event whose stock change this fills after (ledger and causation), or NULL
-- (the sweeper): then each order's order.placed id.
-- Returns {filled: orders filled, figures: [the product's figures] or [], messages:
-- [inventory.backorder_filled per order, then low_stock of the product's transition]}.
CREATE OR REPLACE FUNCTION fill_backorders(p_product_id text, p_event_id uuid, p_limit integer) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_p        products;
    v_before   bigint;
    v_left     bigint;
    v_cands    text[];
    v_locked   text[];
    v_need     bigint;
    v_n        bigint;
    v_lines    jsonb;
    v_messages jsonb := '[]';
    v_filled   integer := 0;
    v_event    uuid;
    c          record;
    loc        text;
BEGIN
    SELECT * INTO v_p FROM products WHERE product_id = p_product_id FOR UPDATE;
    IF NOT FOUND OR v_p.backordered = 0 THEN
        RETURN jsonb_build_object('filled', 0, 'figures', '[]'::jsonb, 'messages', '[]'::jsonb);
    END IF;
    v_before := product_available(v_p);
    v_left := v_before;
    IF v_left = 0 THEN  -- nothing to give anywhere an order could take it
        RETURN jsonb_build_object('filled', 0, 'figures', '[]'::jsonb, 'messages', '[]'::jsonb);
    END IF;
    v_cands := ARRAY(SELECT o.order_id FROM order_lines ol JOIN orders o ON o.order_id = ol.order_id
                      WHERE ol.product_id = p_product_id AND ol.backordered > 0 AND o.status = 'reserved'
                      ORDER BY o.created_at, o.order_id LIMIT p_limit);
    v_locked := ARRAY(SELECT order_id FROM orders WHERE order_id = ANY(v_cands)
                       ORDER BY order_id FOR UPDATE SKIP LOCKED);
    FOR c IN SELECT t.order_id, o.status, o.channel_id, o.placed_event_id, ol.backordered
               FROM unnest(v_cands) WITH ORDINALITY AS t(order_id, n)
               JOIN orders o ON o.order_id = t.order_id
               JOIN order_lines ol ON ol.order_id = t.order_id AND ol.product_id = p_product_id
              ORDER BY t.n LOOP
        EXIT WHEN v_left = 0 OR NOT c.order_id = ANY(v_locked);
        CONTINUE WHEN c.status <> 'reserved' OR c.backordered = 0;  -- changed before we locked it
        v_event := coalesce(p_event_id, c.placed_event_id);
        v_need := c.backordered;
        v_lines := '[]';
        FOREACH loc IN ARRAY channel_locations(c.channel_id) LOOP
            SELECT least(v_need, level_available(v.on_hand, v.reserved, v.damaged, v.quality_control, v.safety_stock))
              INTO v_n FROM level_of(p_product_id, loc) v;
            CONTINUE WHEN v_n <= 0;
            PERFORM change_level(p_product_id, loc, 0, v_n, 0, 0, 0, 'backorder_fill', c.order_id, v_event,
                                 NULL, NULL, NULL, true);
            INSERT INTO order_allocations AS a (order_id, product_id, location_id, position, reserved)
            VALUES (c.order_id, p_product_id, loc,
                    (SELECT coalesce(max(position), 0) + 1 FROM order_allocations
                      WHERE order_id = c.order_id AND product_id = p_product_id), v_n)
                ON CONFLICT (order_id, product_id, location_id) DO UPDATE SET reserved = a.reserved + EXCLUDED.reserved;
            v_lines := v_lines || jsonb_build_array(jsonb_build_object(
                'product_id', p_product_id, 'location_id', loc, 'quantity', v_n));
            v_need := v_need - v_n;
            v_left := v_left - v_n;
            EXIT WHEN v_need = 0 OR v_left = 0;
        END LOOP;
        CONTINUE WHEN v_need = c.backordered;  -- its channel's locations have nothing
        UPDATE order_lines SET backordered = v_need WHERE order_id = c.order_id AND product_id = p_product_id;
        PERFORM change_backordered(p_product_id, v_need - c.backordered, 'backorder_fill', c.order_id, v_event);
        v_filled := v_filled + 1;
        v_messages := v_messages || jsonb_build_array(new_message(v_event, 'inventory.backorder_filled',
            jsonb_build_object('order_id', c.order_id, 'lines', v_lines,
                'backordered_remaining', (
                    SELECT coalesce(jsonb_agg(jsonb_build_object('product_id', product_id, 'quantity', backordered)
                                              ORDER BY line_no), '[]'::jsonb)
                      FROM order_lines WHERE order_id = c.order_id AND backordered > 0))));
        -- left: what the product still has (a level outside this order's channel may have more)
        SELECT product_available(p) INTO v_left FROM products p WHERE p.product_id = p_product_id;
    END LOOP;
    IF v_filled = 0 THEN
        RETURN jsonb_build_object('filled', 0, 'figures', '[]'::jsonb, 'messages', '[]'::jsonb);
    END IF;
    SELECT * INTO v_p FROM products WHERE product_id = p_product_id;
    RETURN jsonb_build_object('filled', v_filled, 'figures', jsonb_build_array(product_figures(v_p)),
        'messages', v_messages || to_jsonb(stock_messages(coalesce(p_event_id, v_event), p_product_id, v_before,
                                                          product_available(v_p), v_p.low_stock_threshold, true)));
END $$;

-- After an event changed stock (apply_events(), one by one): fills the open backorders of the
-- products it names in its figures, in product_id order (they are locked already), and adds
-- what that did to its result (messages after the event's own, figures replaced).
CREATE OR REPLACE FUNCTION fill_after_event(p_event_id uuid, p_result jsonb, p_limit integer) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_fill     jsonb;
    v_figures  jsonb := '[]';
    v_messages jsonb := '[]';
    v_id       text;
BEGIN
    FOR v_id IN SELECT product_id FROM products
                 WHERE product_id = ANY(ARRAY(SELECT f->>'product_id' FROM jsonb_array_elements(p_result->'products') f))
                   AND backordered > 0 ORDER BY product_id LOOP
        v_fill := fill_backorders(v_id, p_event_id, p_limit);
        v_figures := v_figures || (v_fill->'figures');
        v_messages := v_messages || (v_fill->'messages');
    END LOOP;
    IF v_figures = '[]' THEN
        RETURN p_result;
    END IF;
    RETURN p_result || jsonb_build_object('messages', (p_result->'messages') || v_messages,
                                          'products', merge_figures(p_result->'products', v_figures));
END $$;

-- The elected sweeper's fill pass (spec 4.3): products with open backorders and `available`
-- (a fill an event could not finish, stock freed by expiry, a location activated), up to
-- p_products of them, each locked in product_id order, skipped if another transaction holds
-- it; p_limit orders per product. Writes its messages to the outbox.
-- The products are taken in product_id order after p_after (the `cursor` the previous pass
-- returned), wrapping round to the first ones: a product can stay a candidate without being
-- filled (its stock only at locations outside its backorders' channels, its orders held by
-- other transactions), and taken from the start every pass, such products would keep every
-- later one out for good. So every candidate is visited within ceil(candidates / p_products)
-- passes; within a product, filling stays FIFO (fill_backorders()).
-- Returns {filled: orders filled, messages, products: figures after, cursor: the last
-- product visited (p_after when none was)}.
DROP FUNCTION IF EXISTS fill_backorder_pass(integer, integer);
CREATE OR REPLACE FUNCTION fill_backorder_pass(p_products integer, p_limit integer, p_after text DEFAULT '')
RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_ids      text[];
    v_fill     jsonb;
    v_filled   integer := 0;
    v_figures  jsonb := '[]';
    v_messages jsonb := '[]';
    v_id       text;
BEGIN
    -- Both halves walk the partial index products_backordered from a bound, never all of it.
    v_ids := ARRAY(
        SELECT c.product_id FROM (
            (SELECT p.product_id, 0 AS lap FROM products p
              WHERE p.backordered > 0 AND p.product_id > p_after AND product_available(p) > 0
              ORDER BY p.product_id LIMIT p_products)
            UNION ALL
            (SELECT p.product_id, 1 FROM products p
              WHERE p.backordered > 0 AND p.product_id <= p_after AND product_available(p) > 0
              ORDER BY p.product_id LIMIT p_products)) c
         ORDER BY c.lap, c.product_id LIMIT p_products);
    -- Lock order (C5): the ids in product_id order, whatever lap they came from.
    FOR v_id IN SELECT x FROM unnest(v_ids) x ORDER BY x LOOP
        PERFORM 1 FROM products WHERE product_id = v_id FOR UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND;
        v_fill := fill_backorders(v_id, NULL, p_limit);
        v_filled := v_filled + (v_fill->>'filled')::integer;
        v_figures := v_figures || (v_fill->'figures');
        v_messages := v_messages || (v_fill->'messages');
    END LOOP;
    PERFORM write_outbox(ARRAY(SELECT jsonb_array_elements(v_messages)));
    RETURN jsonb_build_object('filled', v_filled, 'messages', v_messages, 'products', v_figures,
                              'cursor', coalesce(v_ids[cardinality(v_ids)], p_after));
END $$;
