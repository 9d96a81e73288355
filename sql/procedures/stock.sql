-- Stock changes: move_stock() (figures, ledger rows, low-stock messages) and stock.adjusted.

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
