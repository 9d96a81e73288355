-- Expiry: the elected sweeper releases reservations whose deadline passed.

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

-- The lines of inventory.expired: what the expiry releases of each line, its units neither
-- cancelled (a partial order.cancelled: its inventory.released listed those) nor fulfilled (a
-- fulfilled order has no deadline, so none in practice); lines with nothing left are left
-- out. For an order nothing was cancelled of, the lines as placed, as they always were.
CREATE OR REPLACE FUNCTION expired_lines(p_order_id text) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object('product_id', product_id,
                                                 'quantity', quantity - released - fulfilled) ORDER BY line_no)
                        FILTER (WHERE quantity - released - fulfilled > 0), '[]'::jsonb)
      FROM order_lines WHERE order_id = p_order_id
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
-- Orders held at locations (orders.allocated) or in products with levels elsewhere are
-- released one by one, level by level (change_holdings()); an allocated order keeps its
-- order_allocations rows as they were (what it held, for a completion after expiry).
-- Both paths emit inventory.back_in_stock for a product whose `available` rises from 0 (one
-- per product however many orders released it), after the inventory.expired messages.
-- Returns {expired, candidates, messages, products}; candidates = p_limit: more may be due.
CREATE OR REPLACE FUNCTION expire_reservations(p_limit integer DEFAULT 500) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_candidates text[];
    v_expired    text[];
    v_held       text[];   -- of v_expired, those not held in products rows at `default`
    v_msgs       jsonb;
    v_back       jsonb;
    h            record;
BEGIN
    SELECT array_agg(order_id) INTO v_candidates FROM (
        SELECT order_id FROM orders WHERE status = 'reserved' AND expires_at <= now()
         ORDER BY expires_at LIMIT p_limit) c;
    IF v_candidates IS NULL THEN
        RETURN jsonb_build_object('expired', 0, 'candidates', 0, 'messages', '[]'::jsonb, 'products', '[]'::jsonb);
    END IF;
    PERFORM lock_products(ARRAY(SELECT DISTINCT product_id FROM lines_of_orders(v_candidates)));
    -- Re-checked under the row lock: a completion or cancellation that committed meanwhile wins.
    SELECT array_agg(order_id), array_agg(order_id) FILTER (WHERE held) INTO v_expired, v_held FROM (
        SELECT o.order_id, o.allocated OR EXISTS (
                   SELECT 1 FROM order_lines ol JOIN products p ON p.product_id = ol.product_id
                    WHERE ol.order_id = o.order_id AND p.multi_location) AS held
          FROM unnest(v_candidates) c(order_id) JOIN orders o USING (order_id)
         WHERE o.status = 'reserved' AND o.expires_at <= now()
         ORDER BY o.order_id FOR UPDATE OF o SKIP LOCKED) o;
    IF v_expired IS NULL THEN
        RETURN jsonb_build_object('expired', 0, 'candidates', cardinality(v_candidates),
                                  'messages', '[]'::jsonb, 'products', '[]'::jsonb);
    END IF;
    UPDATE orders o SET status = 'expired', updated_at = now()
      FROM unnest(v_expired) e(order_id) WHERE o.order_id = e.order_id;
    SELECT coalesce(jsonb_agg(m), '[]'::jsonb) INTO v_msgs FROM (
        SELECT new_message(o.placed_event_id, 'inventory.expired', jsonb_build_object(
                   'order_id', o.order_id, 'lines', expired_lines(o.order_id),
                   'expired_at', rfc3339(o.expires_at))) AS m
          FROM unnest(v_expired) e(order_id) JOIN orders o USING (order_id)
         ORDER BY o.order_id) x;
    -- Held at locations: one by one (few, and each at a few levels).
    FOR h IN SELECT order_id, allocated, placed_event_id FROM orders
              WHERE order_id = ANY(coalesce(v_held, '{}')) ORDER BY order_id LOOP
        v_msgs := v_msgs || (change_holdings(h.order_id, h.allocated, 0, -1, 'expire', h.placed_event_id)->'messages');
        -- and its backordered units (the lines keep their counts: completion refuses them)
        PERFORM release_backorders(h.order_id, 'expire', h.placed_event_id, false);
    END LOOP;
    v_expired := ARRAY(SELECT unnest(v_expired) EXCEPT SELECT unnest(v_held));
    IF cardinality(v_expired) > 0 THEN
        INSERT INTO stock_movements (product_id, order_id, event_id, on_hand_delta, reserved_delta, reason)
        SELECT l.product_id, l.order_id, l.placed_event_id, 0, -l.quantity, 'expire'
          FROM lines_of_orders(v_expired) l
         ORDER BY l.order_id, l.product_id;
        -- The rest, in products rows (default-only products): one UPDATE per product however
        -- many orders held it. Its `available` before is after's plus the units released
        -- (negative before the floor of 0); back_in_stock is caused by the placement of the
        -- product's first order (by order_id) among those released.
        WITH s AS (
            SELECT l.product_id, sum(l.quantity) AS quantity,
                   (array_agg(l.placed_event_id ORDER BY l.order_id))[1] AS event_id
              FROM lines_of_orders(v_expired) l GROUP BY l.product_id
        ), u AS (
            UPDATE products p
               SET reserved = p.reserved - s.quantity, version = p.version + 1, updated_at = now()
              FROM s WHERE p.product_id = s.product_id
            RETURNING p.product_id, s.event_id, s.quantity,
                      p.on_hand - p.damaged - p.quality_control - p.reserved - p.safety_stock AS unfloored
        )
        SELECT coalesce(jsonb_agg(new_message(u.event_id, 'inventory.back_in_stock', jsonb_build_object(
                   'product_id', u.product_id, 'available', u.unfloored)) ORDER BY u.product_id), '[]'::jsonb)
          INTO v_back
          FROM u WHERE u.unfloored > 0 AND u.unfloored - u.quantity <= 0 AND default_sells();
        v_msgs := v_msgs || v_back;
    END IF;
    v_expired := ARRAY(SELECT unnest(v_expired) UNION SELECT unnest(v_held));
    PERFORM write_outbox(ARRAY(SELECT jsonb_array_elements(v_msgs)));
    RETURN jsonb_build_object('expired', cardinality(v_expired), 'candidates', cardinality(v_candidates),
        'messages', v_msgs, 'products', (
        SELECT coalesce(jsonb_agg(product_figures(p) ORDER BY p.product_id), '[]'::jsonb)
          FROM products p WHERE p.product_id IN (
              SELECT l.product_id FROM lines_of_orders(v_expired) l)));
END $$;
