-- Stock changes: move_stock() (figures, ledger rows, low-stock messages) and stock.adjusted.

-- The messages of one product's `available` going from p_before to p_after: inventory.low_stock
-- from above the threshold to at or below it (as always), inventory.back_in_stock from 0 to
-- above 0 on a product that existed before the event (its creation is no transition).
CREATE OR REPLACE FUNCTION stock_messages(p_event_id uuid, p_product_id text, p_before bigint, p_after bigint,
                                          p_threshold integer, p_existed boolean) RETURNS jsonb[]
LANGUAGE plpgsql AS $$
BEGIN
    IF p_after <= p_threshold AND p_before > p_threshold THEN
        RETURN ARRAY[new_message(p_event_id, 'inventory.low_stock', jsonb_build_object(
            'product_id', p_product_id, 'available', p_after, 'threshold', p_threshold))];
    ELSIF p_before = 0 AND p_after > 0 AND p_existed THEN
        RETURN ARRAY[new_message(p_event_id, 'inventory.back_in_stock', jsonb_build_object(
            'product_id', p_product_id, 'available', p_after))];
    END IF;
    RETURN '{}';
END $$;

-- Moves stock on some products at `default`: changes their figures, appends their ledger rows
-- and makes their low-stock messages (back-in-stock ones for adjustments only: a release's is
-- decided by the order procedures). The caller holds the row locks.
-- Returns {figures: [figures after, in the order given], messages: [...]}.
-- A default-only product (the hot path) is one UPDATE and one INSERT; a multi-location one
-- goes through change_level() (its default level is a stock_levels row).
-- (A loop of single-row statements: one UPDATE ... FROM unnest() with the ledger INSERT in a
-- CTE cost fifteen times as much per product, re-planned on every call.)
CREATE OR REPLACE FUNCTION move_stock(
    p_product_ids text[], p_on_hand_deltas bigint[], p_reserved_deltas bigint[], p_reason text,
    p_order_id text, p_event_id uuid, p_note text DEFAULT NULL, p_threshold integer DEFAULT NULL) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_figures  jsonb[] := '{}';
    v_messages jsonb[] := '{}';
    v_sells    boolean;
    v_before   bigint;
    v_after    bigint;
    v_changed  jsonb;
    p          record;
BEGIN
    SELECT active AND fulfils_orders INTO v_sells FROM locations WHERE location_id = 'default';
    FOR i IN 1 .. cardinality(p_product_ids) LOOP
        UPDATE products
           SET on_hand = on_hand + p_on_hand_deltas[i],
               reserved = reserved + p_reserved_deltas[i],
               low_stock_threshold = coalesce(p_threshold, low_stock_threshold),
               version = version + 1,
               updated_at = now()
         WHERE product_id = p_product_ids[i] AND NOT multi_location
        RETURNING product_id, on_hand, reserved, damaged, quality_control, safety_stock,
                  low_stock_threshold, version
             INTO p;
        IF NOT FOUND THEN
            v_changed := change_level(p_product_ids[i], 'default', p_on_hand_deltas[i], p_reserved_deltas[i],
                                      0, 0, 0, p_reason, p_order_id, p_event_id, p_note, NULL, p_threshold);
            v_figures := array_append(v_figures, v_changed->'figures');
            v_messages := v_messages || ARRAY(SELECT jsonb_array_elements(v_changed->'messages'));
            CONTINUE;
        END IF;
        IF p_on_hand_deltas[i] <> 0 OR p_reserved_deltas[i] <> 0 THEN
            INSERT INTO stock_movements (product_id, order_id, event_id, on_hand_delta, reserved_delta, reason, note)
            VALUES (p.product_id, p_order_id, p_event_id, p_on_hand_deltas[i], p_reserved_deltas[i], p_reason, p_note);
        END IF;
        v_after := CASE WHEN v_sells THEN greatest(0, p.on_hand - p.damaged - p.quality_control - p.reserved
                                                      - p.safety_stock) ELSE 0 END;
        v_figures := array_append(v_figures, jsonb_build_object('product_id', p.product_id, 'on_hand', p.on_hand,
            'reserved', p.reserved, 'available', v_after, 'version', p.version));
        v_before := CASE WHEN v_sells THEN greatest(0, p.on_hand - p_on_hand_deltas[i] - p.damaged - p.quality_control
                                                       - p.reserved + p_reserved_deltas[i] - p.safety_stock) ELSE 0 END;
        IF v_after <= p.low_stock_threshold AND v_before > p.low_stock_threshold
           OR v_before = 0 AND v_after > 0 AND p_reason = 'adjust' THEN
            v_messages := v_messages || stock_messages(p_event_id, p.product_id, v_before, v_after,
                                                       p.low_stock_threshold, p.version > 1);
        END IF;
    END LOOP;
    RETURN jsonb_build_object('figures', to_jsonb(v_figures), 'messages', to_jsonb(v_messages));
END $$;

-- A level's figures as events and the detail view show them.
CREATE OR REPLACE FUNCTION level_json(p_on_hand bigint, p_reserved bigint, p_damaged bigint,
                                      p_quality_control bigint, p_incoming bigint, p_safety_stock bigint) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_build_object('on_hand', p_on_hand, 'reserved', p_reserved,
        'available', level_available(p_on_hand, p_reserved, p_damaged, p_quality_control, p_safety_stock),
        'damaged', p_damaged, 'quality_control', p_quality_control, 'incoming', p_incoming,
        'safety_stock', p_safety_stock)
$$;

-- Gives a locked default-only product its stock_levels rows: `default` with the figures of its
-- products row, which from now on holds the totals (080_locations.sql). No ledger row: the
-- default level's figures are still the sums of the product's ledger rows (all at default).
-- No version bump either: nothing visible changed; the caller's change bumps it.
CREATE OR REPLACE FUNCTION make_multi_location(p_product_id text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO stock_levels (product_id, location_id, on_hand, reserved, damaged, quality_control, incoming,
                              safety_stock)
    SELECT product_id, 'default', on_hand, reserved, damaged, quality_control, incoming, safety_stock
      FROM products WHERE product_id = p_product_id AND NOT multi_location;
    IF FOUND THEN
        UPDATE products SET multi_location = true, safety_stock = 0 WHERE product_id = p_product_id;
    END IF;
END $$;

-- A level's current figures (all 0 where the product has no level there, or does not exist),
-- without creating anything: what checks read before a change.
CREATE OR REPLACE FUNCTION level_of(p_product_id text, p_location_id text,
    OUT on_hand bigint, OUT reserved bigint, OUT damaged bigint, OUT quality_control bigint,
    OUT incoming bigint, OUT safety_stock bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_multi boolean;
BEGIN
    on_hand := 0; reserved := 0; damaged := 0; quality_control := 0; incoming := 0; safety_stock := 0;
    SELECT p.multi_location INTO v_multi FROM products p WHERE p.product_id = p_product_id;
    IF v_multi THEN
        SELECT s.on_hand, s.reserved, s.damaged, s.quality_control, s.incoming, s.safety_stock
          INTO on_hand, reserved, damaged, quality_control, incoming, safety_stock
          FROM stock_levels s WHERE s.product_id = p_product_id AND s.location_id = p_location_id;
        IF NOT FOUND THEN
            on_hand := 0; reserved := 0; damaged := 0; quality_control := 0; incoming := 0; safety_stock := 0;
        END IF;
    ELSIF NOT v_multi AND p_location_id = 'default' THEN
        SELECT p.on_hand, p.reserved, p.damaged, p.quality_control, p.incoming, p.safety_stock
          INTO on_hand, reserved, damaged, quality_control, incoming, safety_stock
          FROM products p WHERE p.product_id = p_product_id;
    END IF;
END $$;

-- THE primitive for every stock change: changes ONE level (p_location_id) of ONE product,
-- which the caller holds locked, by the given deltas; in either representation (a default-only
-- product is converted on its first level elsewhere); updates the products row (the default
-- level or the totals, threshold if given, version + 1, updated_at) and appends the ledger row
-- (when a delta is not 0). The CHECKs refuse a change that would oversell a level.
-- Returns {figures: compact figures after, level: the level's figures after (level_json),
--          available_before, available_after (product `available`), threshold,
--          messages: low_stock / back_in_stock of this change (none with p_quiet, for callers
--          changing one product several times in one event: they call stock_messages() once)}.
-- p_new: the product was created by this event (then no back_in_stock).
CREATE OR REPLACE FUNCTION change_level(
    p_product_id text, p_location_id text, p_on_hand bigint, p_reserved bigint, p_damaged bigint,
    p_quality_control bigint, p_incoming bigint, p_reason text, p_order_id text, p_event_id uuid,
    p_note text DEFAULT NULL, p_reference text DEFAULT NULL, p_threshold integer DEFAULT NULL,
    p_quiet boolean DEFAULT false, p_new boolean DEFAULT false) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_p       products;
    v_l       stock_levels;
    v_before  bigint;
    v_after   bigint;
    v_existed boolean;
BEGIN
    SELECT * INTO v_p FROM products WHERE product_id = p_product_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'change_level: unknown product %', p_product_id USING ERRCODE = 'no_data_found';
    END IF;
    v_existed := v_p.version > 0 AND NOT p_new;
    IF NOT v_p.multi_location AND p_location_id <> 'default' THEN
        PERFORM make_multi_location(p_product_id);
        v_p.multi_location := true;
    END IF;
    IF NOT v_p.multi_location THEN
        v_before := product_available(v_p);
        UPDATE products
           SET on_hand = on_hand + p_on_hand, reserved = reserved + p_reserved, damaged = damaged + p_damaged,
               quality_control = quality_control + p_quality_control, incoming = incoming + p_incoming,
               low_stock_threshold = coalesce(p_threshold, low_stock_threshold),
               version = version + 1, updated_at = now()
         WHERE product_id = p_product_id
        RETURNING * INTO v_p;
        v_l := ROW(v_p.product_id, 'default', v_p.on_hand, v_p.reserved, v_p.damaged, v_p.quality_control,
                   v_p.incoming, v_p.safety_stock);
    ELSE
        INSERT INTO stock_levels (product_id, location_id) VALUES (p_product_id, p_location_id)
            ON CONFLICT DO NOTHING;
        SELECT product_available(p) INTO v_before FROM products p WHERE p.product_id = p_product_id;
        UPDATE stock_levels
           SET on_hand = on_hand + p_on_hand, reserved = reserved + p_reserved, damaged = damaged + p_damaged,
               quality_control = quality_control + p_quality_control, incoming = incoming + p_incoming
         WHERE product_id = p_product_id AND location_id = p_location_id
        RETURNING * INTO v_l;
        UPDATE products
           SET on_hand = on_hand + p_on_hand, reserved = reserved + p_reserved, damaged = damaged + p_damaged,
               quality_control = quality_control + p_quality_control, incoming = incoming + p_incoming,
               low_stock_threshold = coalesce(p_threshold, low_stock_threshold),
               version = version + 1, updated_at = now()
         WHERE product_id = p_product_id
        RETURNING * INTO v_p;
    END IF;
    v_after := product_available(v_p);
    IF p_on_hand <> 0 OR p_reserved <> 0 OR p_damaged <> 0 OR p_quality_control <> 0 OR p_incoming <> 0 THEN
        INSERT INTO stock_movements (product_id, location_id, order_id, event_id, on_hand_delta, reserved_delta,
                                     damaged_delta, quality_control_delta, incoming_delta, reason, note, reference)
        VALUES (p_product_id, p_location_id, p_order_id, p_event_id, p_on_hand, p_reserved, p_damaged,
                p_quality_control, p_incoming, p_reason, p_note, p_reference);
    END IF;
    RETURN jsonb_build_object(
        'figures', jsonb_build_object('product_id', v_p.product_id, 'on_hand', v_p.on_hand,
                                      'reserved', v_p.reserved, 'available', v_after, 'version', v_p.version),
        'level', level_json(v_l.on_hand, v_l.reserved, v_l.damaged, v_l.quality_control, v_l.incoming,
                            v_l.safety_stock),
        'available_before', v_before, 'available_after', v_after, 'threshold', v_p.low_stock_threshold,
        'messages', CASE WHEN p_quiet THEN '[]'::jsonb ELSE to_jsonb(stock_messages(
            p_event_id, p_product_id, v_before, v_after, v_p.low_stock_threshold, v_existed)) END);
END $$;

-- The detail document of GET /inventory/{id}/detail (without its `channel` part), or NULL for
-- an unknown product. Part A has no backorders: `orderable` = `available`, `backordered` 0,
-- `backorder` deny (Part B changes the values, not the shape). `locations` lists every level,
-- by (priority, location_id); a default-only product's one level is its products row.
CREATE OR REPLACE FUNCTION product_detail(p_product_id text) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object('version', p.version, 'product_id', p.product_id, 'tracked', p.tracked,
               'on_hand', p.on_hand, 'reserved', p.reserved, 'available', a.available,
               'orderable', a.available, 'backordered', 0,
               'damaged', p.damaged, 'quality_control', p.quality_control, 'incoming', p.incoming,
               'low_stock_threshold', p.low_stock_threshold, 'max_per_order', p.max_per_order,
               'backorder', jsonb_build_object('mode', 'deny', 'limit', NULL, 'until', NULL, 'headroom', 0),
               'locations', (
                   SELECT coalesce(jsonb_agg(jsonb_build_object('location_id', l.location_id,
                                      'priority', l.priority, 'active', l.active, 'fulfils_orders', l.fulfils_orders)
                                  || level_json(v.on_hand, v.reserved, v.damaged, v.quality_control, v.incoming,
                                                v.safety_stock)
                                  ORDER BY l.priority, l.location_id), '[]'::jsonb)
                     FROM (SELECT s.location_id, s.on_hand, s.reserved, s.damaged, s.quality_control,
                                  s.incoming, s.safety_stock
                             FROM stock_levels s WHERE s.product_id = p.product_id AND p.multi_location
                           UNION ALL
                           SELECT 'default', p.on_hand, p.reserved, p.damaged, p.quality_control, p.incoming,
                                  p.safety_stock
                            WHERE NOT p.multi_location) v
                     JOIN locations l ON l.location_id = v.location_id))
      FROM products p, LATERAL (SELECT product_available(p) AS available) a
     WHERE p.product_id = p_product_id
$$;

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
