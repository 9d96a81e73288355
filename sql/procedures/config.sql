-- Configuration messages: location.configured, channel.configured, product.configured. Each
-- answers inventory.configured {kind, <id field>, ...every effective field, unset as null} or
-- inventory.configuration_rejected {kind, id, reason, detail}. Locations and channels are read
-- unlocked by the stock and order procedures: a change applies to transactions that start
-- after it commits.

CREATE OR REPLACE FUNCTION configuration_rejected(p_event_id uuid, p_kind text, p_id text, p_reason text,
                                                  p_detail text) RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
    RETURN jsonb_build_object('outcome', 'rejected', 'products', '[]'::jsonb,
        'messages', jsonb_build_array(new_message(p_event_id, 'inventory.configuration_rejected', jsonb_build_object(
            'kind', p_kind, 'id', p_id, 'reason', p_reason, 'detail', p_detail))));
END $$;

-- location.configured: create (priority 0, active, fulfils orders) or update the given fields
-- (a `name` given as null clears it; other fields given as null are left as they are).
-- Products' `available` follows the flags at once where it is computed; re-caching the products
-- with a level there is the sweeper's.
CREATE OR REPLACE FUNCTION configure_location(p_event_id uuid, p_data jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v locations;
BEGIN
    INSERT INTO locations AS l (location_id, name, priority, active, fulfils_orders)
    VALUES (p_data->>'location_id', p_data->>'name', coalesce((p_data->>'priority')::integer, 0),
            coalesce((p_data->>'active')::boolean, true), coalesce((p_data->>'fulfils_orders')::boolean, true))
        ON CONFLICT (location_id) DO UPDATE
       SET name = CASE WHEN p_data ? 'name' THEN EXCLUDED.name ELSE l.name END,
           priority = coalesce((p_data->>'priority')::integer, l.priority),
           active = coalesce((p_data->>'active')::boolean, l.active),
           fulfils_orders = coalesce((p_data->>'fulfils_orders')::boolean, l.fulfils_orders),
           updated_at = now()
    RETURNING * INTO v;
    -- default_sells() keeps default's flags for the rest of the transaction: later events of
    -- this batch must see the change.
    PERFORM set_config('inventory.default_sells', '', true);
    RETURN jsonb_build_object('outcome', 'configured', 'products', '[]'::jsonb,
        'messages', jsonb_build_array(new_message(p_event_id, 'inventory.configured', jsonb_build_object(
            'kind', 'location', 'location_id', v.location_id, 'name', v.name, 'priority', v.priority,
            'active', v.active, 'fulfils_orders', v.fulfils_orders))));
END $$;

-- channel.configured: create (strategy priority, the default location rule) or update the
-- given fields; `locations` given as null goes back to the default rule. Every location named
-- must be configured (unknown_location). The contract refuses `locations` for `default`.
CREATE OR REPLACE FUNCTION configure_channel(p_event_id uuid, p_data jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_locations text[] := CASE WHEN jsonb_typeof(p_data->'locations') = 'array'
                               THEN ARRAY(SELECT jsonb_array_elements_text(p_data->'locations')) END;
    v_unknown   text;
    v           channels;
BEGIN
    SELECT string_agg(id, ', ' ORDER BY n) INTO v_unknown FROM unnest(v_locations) WITH ORDINALITY AS t(id, n)
     WHERE NOT EXISTS (SELECT 1 FROM locations WHERE location_id = id);
    IF v_unknown IS NOT NULL THEN
        RETURN configuration_rejected(p_event_id, 'channel', p_data->>'channel_id', 'unknown_location',
                                      'unknown location: ' || v_unknown);
    END IF;
    INSERT INTO channels AS c (channel_id, strategy, locations)
    VALUES (p_data->>'channel_id', coalesce(p_data->>'strategy', 'priority'), v_locations)
        ON CONFLICT (channel_id) DO UPDATE
       SET strategy = coalesce(p_data->>'strategy', c.strategy),
           locations = CASE WHEN p_data ? 'locations' THEN EXCLUDED.locations ELSE c.locations END,
           updated_at = now()
    RETURNING * INTO v;
    RETURN jsonb_build_object('outcome', 'configured', 'products', '[]'::jsonb,
        'messages', jsonb_build_array(new_message(p_event_id, 'inventory.configured', jsonb_build_object(
            'kind', 'channel', 'channel_id', v.channel_id, 'strategy', v.strategy, 'locations', to_jsonb(v.locations)))));
END $$;

-- product.configured: creates the product (all figures 0) if missing, then sets the given
-- policy fields (`max_per_order` given as null clears it) and safety stock per location. A
-- safety stock change moves `available`: low_stock / back_in_stock as for a stock change.
-- Refusals: a safety stock at an unconfigured location (unknown_location); `tracked: false`
-- while units are reserved or backordered (has_open_reservations). A limit below the current
-- `backordered` is accepted (headroom 0 until it falls).
-- A safety stock lowered raises `available`: apply_events() then fills open backorders.
CREATE OR REPLACE FUNCTION configure_product(p_event_id uuid, p_data jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_product_id text := p_data->>'product_id';
    v_unknown    text;
    v_created    boolean;
    v_existed    boolean;
    v_before     bigint;
    v            products;
    s            record;
BEGIN
    SELECT string_agg(x->>'location_id', ', ' ORDER BY n) INTO v_unknown
      FROM jsonb_array_elements(coalesce(p_data->'safety_stock', '[]')) WITH ORDINALITY AS t(x, n)
     WHERE jsonb_typeof(p_data->'safety_stock') = 'array'
       AND NOT EXISTS (SELECT 1 FROM locations WHERE location_id = x->>'location_id');
    IF v_unknown IS NOT NULL THEN
        RETURN configuration_rejected(p_event_id, 'product', v_product_id, 'unknown_location',
                                      'unknown location: ' || v_unknown);
    END IF;
    INSERT INTO products (product_id) VALUES (v_product_id) ON CONFLICT DO NOTHING;
    v_created := FOUND;
    SELECT * INTO v FROM products WHERE product_id = v_product_id FOR UPDATE;
    IF p_data->'tracked' = 'false' AND v.reserved > 0 THEN
        RETURN configuration_rejected(p_event_id, 'product', v_product_id, 'has_open_reservations',
                                      v.reserved || ' units reserved');
    END IF;
    IF p_data->'tracked' = 'false' AND v.backordered > 0 THEN
        RETURN configuration_rejected(p_event_id, 'product', v_product_id, 'has_open_reservations',
                                      v.backordered || ' units backordered');
    END IF;
    v_existed := v.version > 0;
    v_before := product_available(v);
    FOR s IN SELECT x->>'location_id' AS location_id, (x->>'quantity')::bigint AS quantity
               FROM jsonb_array_elements(p_data->'safety_stock') x WHERE jsonb_typeof(p_data->'safety_stock') = 'array'
    LOOP
        IF NOT v.multi_location AND s.location_id = 'default' THEN
            UPDATE products SET safety_stock = s.quantity WHERE product_id = v_product_id;
        ELSIF v.multi_location OR s.quantity > 0 THEN  -- a 0 where there is no level creates none
            PERFORM make_multi_location(v_product_id);
            v.multi_location := true;
            INSERT INTO stock_levels AS l (product_id, location_id, safety_stock)
            VALUES (v_product_id, s.location_id, s.quantity)
                ON CONFLICT (product_id, location_id) DO UPDATE SET safety_stock = EXCLUDED.safety_stock;
        END IF;
    END LOOP;
    UPDATE products
       SET tracked = coalesce((p_data->>'tracked')::boolean, tracked),
           low_stock_threshold = coalesce((p_data->>'low_stock_threshold')::integer, low_stock_threshold),
           max_per_order = CASE WHEN p_data ? 'max_per_order' THEN (p_data->>'max_per_order')::integer
                                ELSE max_per_order END,
           -- `backorder` is set whole: a limit or until left out is none
           backorder_mode = coalesce(p_data->'backorder'->>'mode', backorder_mode),
           backorder_limit = CASE WHEN p_data ? 'backorder' THEN (p_data->'backorder'->>'limit')::bigint
                                  ELSE backorder_limit END,
           backorder_until = CASE WHEN p_data ? 'backorder' THEN (p_data->'backorder'->>'until')::timestamptz
                                  ELSE backorder_until END,
           version = version + 1, updated_at = now()
     WHERE product_id = v_product_id
    RETURNING * INTO v;
    RETURN jsonb_build_object('outcome', 'configured', 'product_id', v_product_id,
        'products', jsonb_build_array(product_figures(v)),
        'messages', jsonb_build_array(new_message(p_event_id, 'inventory.configured', jsonb_build_object(
            'kind', 'product', 'product_id', v_product_id, 'tracked', v.tracked,
            'low_stock_threshold', v.low_stock_threshold, 'max_per_order', v.max_per_order,
            'backorder', jsonb_build_object('mode', v.backorder_mode, 'limit', v.backorder_limit,
                                            'until', rfc3339(v.backorder_until)),
            'safety_stock', (SELECT coalesce(jsonb_agg(jsonb_build_object('location_id', l.location_id,
                                                                         'quantity', l.safety_stock)
                                                      ORDER BY l.location_id), '[]'::jsonb)
                               FROM (SELECT location_id, safety_stock FROM stock_levels
                                      WHERE product_id = v_product_id AND v.multi_location
                                     UNION ALL SELECT 'default', v.safety_stock WHERE NOT v.multi_location) l
                              WHERE l.safety_stock > 0))))
        || to_jsonb(stock_messages(p_event_id, v_product_id, v_before, product_available(v),
                                   v.low_stock_threshold, v_existed AND NOT v_created)));
END $$;
