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
-- Products' `available` follows the flags at once where it is computed; a flip of `active` or
-- `fulfils_orders` queues the location for the sweeper's re-cache pass (recache_locations()).
CREATE OR REPLACE FUNCTION configure_location(p_event_id uuid, p_data jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v   locations;
    v_old locations;
BEGIN
    SELECT * INTO v_old FROM locations WHERE location_id = p_data->>'location_id' FOR UPDATE;
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
    IF v_old.location_id IS NOT NULL AND (v_old.active <> v.active OR v_old.fulfils_orders <> v.fulfils_orders) THEN
        -- A pass already under way restarts (products it re-cached may have changed again);
        -- was_selling stays what the products not re-cached yet were last published with
        -- only if it had not started.
        INSERT INTO location_recache AS q (location_id, was_selling, event_id)
        VALUES (v.location_id, v_old.active AND v_old.fulfils_orders, p_event_id)
            ON CONFLICT (location_id) DO UPDATE
           SET was_selling = CASE WHEN q.cursor IS NULL THEN q.was_selling ELSE EXCLUDED.was_selling END,
               event_id = EXCLUDED.event_id, cursor = NULL, requested_at = now();
    END IF;
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

-- The sweeper's re-cache pass after a location flip (spec 2): up to p_limit products with a
-- level at the oldest flipped location (every product for `default`, whose default-only
-- products keep their level in the products row), after the location's cursor, locked in
-- product_id order; bumps their version so that the version-checked cache takes their figures.
-- Messages (decision 13.7 and the low_stock rule, caused by the flip's message): the product's
-- `available` before is now's minus (or plus) its level there, as the flip added (or took
-- away) that level; low_stock / back_in_stock on that transition. A location whose flags are
-- back where they were bumps and re-caches only (the detail view shows the flags).
-- Returns {count, more (another batch is due), messages, products}.
CREATE OR REPLACE FUNCTION recache_locations(p_limit integer DEFAULT 500) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    r      location_recache;
    v_ids  text[];
    v_sign integer;
    v_msgs jsonb[] := '{}';
    v_figs jsonb[] := '{}';
    v_more boolean;
    v      products;
    v_level bigint;
    v_after bigint;
BEGIN
    SELECT * INTO r FROM location_recache ORDER BY requested_at, location_id LIMIT 1 FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('count', 0, 'more', false, 'messages', '[]'::jsonb, 'products', '[]'::jsonb);
    END IF;
    IF r.location_id = 'default' THEN
        v_ids := ARRAY(SELECT product_id FROM products WHERE product_id > coalesce(r.cursor, '')
                        ORDER BY product_id LIMIT p_limit);
    ELSE
        v_ids := ARRAY(SELECT product_id FROM stock_levels
                        WHERE location_id = r.location_id AND product_id > coalesce(r.cursor, '')
                        ORDER BY product_id LIMIT p_limit);
    END IF;
    v_sign := CASE WHEN location_sells(r.location_id) = r.was_selling THEN 0
                   WHEN r.was_selling THEN -1 ELSE 1 END;
    PERFORM lock_products(v_ids);
    UPDATE products SET version = version + 1, updated_at = now() WHERE product_id = ANY(v_ids);
    FOR v IN SELECT * FROM products WHERE product_id = ANY(v_ids) ORDER BY product_id LOOP
        v_figs := v_figs || product_figures(v);
        IF v_sign <> 0 THEN
            SELECT level_available(l.on_hand, l.reserved, l.damaged, l.quality_control, l.safety_stock)
              INTO v_level FROM level_of(v.product_id, r.location_id) l;
            v_after := (v_figs[cardinality(v_figs)]->>'available')::bigint;
            v_msgs := v_msgs || stock_messages(r.event_id, v.product_id, v_after - v_sign * v_level, v_after,
                                               v.low_stock_threshold, true);
        END IF;
    END LOOP;
    IF cardinality(v_ids) < p_limit THEN
        DELETE FROM location_recache WHERE location_id = r.location_id;
    ELSE
        UPDATE location_recache SET cursor = v_ids[cardinality(v_ids)] WHERE location_id = r.location_id;
    END IF;
    v_more := EXISTS (SELECT 1 FROM location_recache);
    PERFORM write_outbox(v_msgs);
    RETURN jsonb_build_object('count', cardinality(v_ids), 'more', v_more, 'messages', to_jsonb(v_msgs),
                              'products', to_jsonb(v_figs));
END $$;
