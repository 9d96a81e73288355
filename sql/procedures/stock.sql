-- Stock changes: change_level() (THE primitive: one level of one product), move_stock() (the
-- default level of many products, the hot path), stock.adjusted, stock.moved,
-- stock.transferred, stock.received.

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
-- and makes their low_stock / back_in_stock messages (any cause: an adjustment, a cancel's
-- release; spec 5 and decision 13.7). The caller holds the row locks.
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
    v_sells := default_sells();
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
           OR v_before = 0 AND v_after > 0 THEN
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
-- an unknown product. `orderable` = `available` + headroom (null when the headroom has no
-- limit); `backorder` {mode, limit, until, headroom} (backorders.sql). `locations` lists every level,
-- by (priority, location_id); a default-only product's one level is its products row.
CREATE OR REPLACE FUNCTION product_detail(p_product_id text) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object('version', p.version, 'product_id', p.product_id, 'tracked', p.tracked,
               'on_hand', p.on_hand, 'reserved', p.reserved, 'available', a.available,
               'orderable', a.available + product_headroom(p), 'backordered', p.backordered,
               'damaged', p.damaged, 'quality_control', p.quality_control, 'incoming', p.incoming,
               'low_stock_threshold', p.low_stock_threshold, 'max_per_order', p.max_per_order,
               'backorder', backorder_json(p),
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
    IF p_data ?| ARRAY['location_id', 'incoming', 'name', 'change_from', 'reference', 'items'] THEN
        RETURN adjust_levels(p_event_id, p_data);  -- the newer fields (locations, states, bulk)
    END IF;
    INSERT INTO products (product_id) VALUES (v_product_id) ON CONFLICT DO NOTHING;
    v_created := FOUND;
    SELECT * INTO v_row FROM products WHERE product_id = v_product_id FOR UPDATE;
    IF v_row.multi_location OR v_row.damaged + v_row.quality_control > 0 THEN
        -- Its default level is not its products row (the totals), or holds unsellable units:
        -- checked at the level (below_reserved counts sellable units only).
        RETURN adjust_levels(p_event_id, p_data);
    END IF;
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

-- Creates the products of an event that do not exist yet (figures 0, version 0; in product_id
-- order) and locks them all in product_id order (apply_events() locked those that existed).
-- Returns the ids it created: the caller deletes those left unchanged (version 0) when done,
-- so that a refused first change leaves no product, as it always did.
CREATE OR REPLACE FUNCTION create_products(p_ids text[]) RETURNS text[]
LANGUAGE plpgsql AS $$
DECLARE
    v_created text[];
BEGIN
    WITH ins AS (
        INSERT INTO products (product_id) SELECT DISTINCT id FROM unnest(p_ids) id ORDER BY 1
            ON CONFLICT DO NOTHING RETURNING product_id)
    SELECT coalesce(array_agg(product_id), '{}') INTO v_created FROM ins;
    PERFORM lock_products(p_ids);
    RETURN v_created;
END $$;

-- A product's totals for a refusal ({on_hand, reserved}; 0 for a product not there yet).
CREATE OR REPLACE FUNCTION product_totals(p_product_id text) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v jsonb;
BEGIN
    SELECT jsonb_build_object('on_hand', on_hand, 'reserved', reserved) INTO v FROM products
     WHERE product_id = p_product_id;
    RETURN coalesce(v, '{"on_hand": 0, "reserved": 0}');
END $$;

-- The figures after an event of every product it names that exists, by product_id.
CREATE OR REPLACE FUNCTION figures_of(p_ids text[]) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v jsonb;
BEGIN
    SELECT coalesce(jsonb_agg(product_figures(p) ORDER BY p.product_id), '[]') INTO v
      FROM products p WHERE p.product_id = ANY(p_ids);
    RETURN v;
END $$;

-- One adjustment (a stock.adjusted message or one of its items) checked against its level,
-- rules in the contract's order: {product_id, location_id, name, current, target, reason}
-- (reason NULL: it may be applied).
CREATE OR REPLACE FUNCTION adjustment_check(x jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_location text := coalesce(x->>'location_id', 'default');
    v_name     text := CASE WHEN jsonb_typeof(x->'incoming') = 'number' OR x->>'name' = 'incoming'
                            THEN 'incoming' ELSE 'on_hand' END;
    l          record;
    v_current  bigint;
    v_target   bigint;
BEGIN
    l := level_of(x->>'product_id', v_location);
    v_current := CASE v_name WHEN 'incoming' THEN l.incoming ELSE l.on_hand END;
    v_target := CASE WHEN jsonb_typeof(x->'delta') = 'number' THEN v_current + (x->>'delta')::bigint
                     ELSE (x->>v_name)::bigint END;
    RETURN jsonb_build_object('product_id', x->>'product_id', 'location_id', v_location, 'name', v_name,
        'current', v_current, 'target', v_target, 'reason', CASE
            WHEN NOT EXISTS (SELECT 1 FROM locations WHERE location_id = v_location) THEN 'unknown_location'
            WHEN jsonb_typeof(x->'change_from') = 'number' AND (x->>'change_from')::bigint <> v_current THEN 'stale'
            WHEN v_name = 'on_hand' AND v_target < 0 THEN 'negative_on_hand'
            WHEN v_name = 'on_hand' AND v_target - l.damaged - l.quality_control < l.reserved THEN 'below_reserved'
            WHEN v_name = 'incoming' AND v_target < 0 THEN 'negative_incoming' END);
END $$;

-- inventory.adjustment_rejected for a checked adjustment (c: adjustment_check()); the newer
-- fields only when the message uses a newer feature (another location, incoming, bulk).
CREATE OR REPLACE FUNCTION adjustment_rejected(p_event_id uuid, c jsonb, p_reason text, p_index integer) RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
    RETURN new_message(p_event_id, 'inventory.adjustment_rejected', jsonb_build_object(
            'product_id', c->'product_id', 'reason', p_reason, 'requested', c->'target')
        || product_totals(c->>'product_id')
        || CASE WHEN p_index IS NOT NULL OR c->>'location_id' <> 'default' OR c->>'name' = 'incoming'
                THEN jsonb_build_object('location_id', c->'location_id', 'name', c->'name')
                     || CASE WHEN p_index IS NOT NULL THEN jsonb_build_object('index', p_index) ELSE '{}' END
                ELSE '{}' END
        || CASE WHEN p_reason = 'stale' THEN jsonb_build_object('current', c->'current') ELSE '{}' END);
END $$;

-- Applies a checked adjustment (x the item, c its check): its messages (inventory.adjusted,
-- then low_stock / back_in_stock) and the product's figures after.
CREATE OR REPLACE FUNCTION adjustment_apply(p_event_id uuid, x jsonb, c jsonb, p_index integer, p_new boolean,
                                            OUT messages jsonb, OUT figures jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    v_delta   bigint := (c->>'target')::bigint - (c->>'current')::bigint;
    v_changed jsonb;
BEGIN
    v_changed := change_level(c->>'product_id', c->>'location_id',
                              CASE WHEN c->>'name' = 'on_hand' THEN v_delta ELSE 0 END, 0, 0, 0,
                              CASE WHEN c->>'name' = 'incoming' THEN v_delta ELSE 0 END,
                              'adjust', NULL, p_event_id, x->>'reason', x->>'reference',
                              (x->>'low_stock_threshold')::integer, false, p_new);
    figures := v_changed->'figures';
    messages := jsonb_build_array(new_message(p_event_id, 'inventory.adjusted',
            (figures - 'version')
            || CASE WHEN p_index IS NOT NULL OR c->>'location_id' <> 'default' OR c->>'name' = 'incoming'
                    THEN jsonb_build_object('location_id', c->'location_id', 'location', v_changed->'level')
                         || CASE WHEN p_index IS NOT NULL THEN jsonb_build_object('index', p_index) ELSE '{}' END
                    ELSE '{}' END))
        || (v_changed->'messages');
END $$;

-- stock.adjusted with the newer fields (spec 3.1): a location, `incoming`, `name`,
-- `change_from` (compare-and-set: `stale`), `reference`, or bulk `items` (+ `atomic`).
-- Items are independent (each changes one quantity of one level, none twice), so checking
-- each against the figures before the message is checking it where it stands.
CREATE OR REPLACE FUNCTION adjust_levels(p_event_id uuid, p_data jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_bulk     boolean := p_data ? 'items';
    v_items    jsonb := CASE WHEN p_data ? 'items' THEN p_data->'items' ELSE jsonb_build_array(p_data) END;
    v_atomic   boolean := coalesce((p_data->>'atomic')::boolean, true);
    v_ids      text[] := ARRAY(SELECT x->>'product_id' FROM jsonb_array_elements(v_items) x);
    v_created  text[];
    v_checks   jsonb[] := '{}';
    v_failed   boolean := false;
    v_applied  integer := 0;
    v_messages jsonb := '[]';
    v_figures  jsonb := '[]';
    v_done     record;
    c          jsonb;
BEGIN
    v_created := create_products(v_ids);
    FOR i IN 0 .. jsonb_array_length(v_items) - 1 LOOP
        c := adjustment_check(v_items->i);
        v_checks := array_append(v_checks, c);
        v_failed := v_failed OR c->>'reason' IS NOT NULL;
        IF NOT v_atomic THEN  -- each item on its own, in order
            IF c->>'reason' IS NULL THEN
                v_done := adjustment_apply(p_event_id, v_items->i, c, i, c->>'product_id' = ANY(v_created));
                v_messages := v_messages || v_done.messages;
                v_applied := v_applied + 1;
            ELSE
                v_messages := v_messages || adjustment_rejected(p_event_id, c, c->>'reason', i);
            END IF;
        END IF;
    END LOOP;
    IF v_atomic THEN  -- all or none
        FOR i IN 0 .. jsonb_array_length(v_items) - 1 LOOP
            c := v_checks[i + 1];
            IF v_failed THEN
                v_messages := v_messages || adjustment_rejected(p_event_id, c, coalesce(c->>'reason', 'batch_rejected'),
                                                                CASE WHEN v_bulk THEN i END);
            ELSE
                v_done := adjustment_apply(p_event_id, v_items->i, c, CASE WHEN v_bulk THEN i END,
                                           c->>'product_id' = ANY(v_created));
                v_messages := v_messages || v_done.messages;
                v_figures := v_figures || v_done.figures;
                v_applied := v_applied + 1;
            END IF;
        END LOOP;
    END IF;
    DELETE FROM products WHERE product_id = ANY(v_created) AND version = 0;  -- refused first adjustments
    RETURN jsonb_build_object('outcome', CASE WHEN v_applied > 0 THEN 'adjusted' ELSE 'rejected' END,
        'messages', v_messages, 'products', CASE WHEN v_bulk THEN figures_of(v_ids)
                                                 WHEN v_applied > 0 THEN v_figures ELSE figures_of(v_ids) END)
        || CASE WHEN v_bulk THEN '{}' ELSE jsonb_build_object('product_id', p_data->'product_id') END;
END $$;

-- The location a refusal of a stock message names, or NULL: the first not configured.
CREATE OR REPLACE FUNCTION unknown_location_of(p_ids text[]) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v text;
BEGIN
    SELECT id INTO v FROM unnest(p_ids) WITH ORDINALITY AS t(id, n)
     WHERE NOT EXISTS (SELECT 1 FROM locations WHERE location_id = id) ORDER BY n LIMIT 1;
    RETURN v;
END $$;

-- stock.moved (spec 3.2): units between quantity states at one level; `disposed` writes off.
-- Reserved units cannot be moved out of sellable.
CREATE OR REPLACE FUNCTION move_state(p_event_id uuid, p_data jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_product_id text := p_data->>'product_id';
    v_location   text := coalesce(p_data->>'location_id', 'default');
    v_quantity   bigint := (p_data->>'quantity')::bigint;
    v_from       text := p_data->>'from';
    v_to         text := p_data->>'to';
    l            record;
    v_reason     text;
    v_changed    jsonb;
BEGIN
    l := level_of(v_product_id, v_location);
    v_reason := CASE
        WHEN unknown_location_of(ARRAY[v_location]) IS NOT NULL THEN 'unknown_location'
        WHEN NOT EXISTS (SELECT 1 FROM products WHERE product_id = v_product_id) THEN 'unknown_product'
        WHEN v_quantity > CASE v_from WHEN 'sellable' THEN l.on_hand - l.damaged - l.quality_control - l.reserved
                                      WHEN 'damaged' THEN l.damaged ELSE l.quality_control END
            THEN 'insufficient_quantity' END;
    IF v_reason IS NOT NULL THEN
        RETURN jsonb_build_object('outcome', 'rejected', 'product_id', v_product_id,
            'products', figures_of(ARRAY[v_product_id]),
            'messages', jsonb_build_array(new_message(p_event_id, 'inventory.adjustment_rejected',
                jsonb_build_object('product_id', v_product_id, 'reason', v_reason, 'requested', v_quantity,
                                   'location_id', v_location) || product_totals(v_product_id))));
    END IF;
    v_changed := change_level(v_product_id, v_location,
        CASE WHEN v_to = 'disposed' THEN -v_quantity ELSE 0 END, 0,
        (CASE v_to WHEN 'damaged' THEN v_quantity ELSE 0 END) - (CASE v_from WHEN 'damaged' THEN v_quantity ELSE 0 END),
        (CASE v_to WHEN 'quality_control' THEN v_quantity ELSE 0 END)
            - (CASE v_from WHEN 'quality_control' THEN v_quantity ELSE 0 END),
        0, 'move', NULL, p_event_id, p_data->>'reason', p_data->>'reference');
    RETURN jsonb_build_object('outcome', 'moved', 'product_id', v_product_id,
        'products', jsonb_build_array(v_changed->'figures'),
        'messages', jsonb_build_array(new_message(p_event_id, 'inventory.moved', jsonb_build_object(
            'kind', 'state', 'product_id', v_product_id, 'location_id', v_location, 'quantity', v_quantity,
            'from', v_from, 'to', v_to, 'reason', p_data->'reason', 'reference', p_data->'reference',
            'location', v_changed->'level'))) || (v_changed->'messages'));
END $$;

-- stock.transferred (spec 3.3): units from one location to another (or, in transit, to its
-- `incoming`, for stock.received to finish), all lines or none. The transfer_id is applied
-- once whatever message ids carry it (`duplicate_transfer`); a refused transfer leaves no trace.
CREATE OR REPLACE FUNCTION transfer_stock(p_event_id uuid, p_data jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_from       text := p_data->>'from_location_id';
    v_to         text := p_data->>'to_location_id';
    v_transit    boolean := coalesce((p_data->>'in_transit')::boolean, false);
    v_unknown    text := unknown_location_of(ARRAY[p_data->>'from_location_id', p_data->>'to_location_id']);
    v_lines      jsonb[];
    v_failed     boolean;
    v_messages   jsonb := '[]';
    v_out        jsonb;
    v_in         jsonb;
    v_line       jsonb;
BEGIN
    INSERT INTO transfers (transfer_id, event_id) VALUES (p_data->>'transfer_id', p_event_id)
        ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('outcome', 'duplicate_transfer', 'transfer_id', p_data->'transfer_id',
                                  'messages', '[]'::jsonb, 'products', '[]'::jsonb);
    END IF;
    SELECT array_agg(jsonb_build_object('product_id', x->>'product_id', 'quantity', (x->>'quantity')::bigint,
               'index', n - 1, 'reason', CASE
                   WHEN v_unknown IS NOT NULL THEN 'unknown_location'
                   WHEN NOT EXISTS (SELECT 1 FROM products WHERE product_id = x->>'product_id') THEN 'unknown_product'
                   WHEN (x->>'quantity')::bigint > l.on_hand - l.damaged - l.quality_control - l.reserved
                       THEN 'insufficient_quantity' END) ORDER BY n)
      INTO v_lines
      FROM jsonb_array_elements(p_data->'lines') WITH ORDINALITY AS t(x, n),
           LATERAL level_of(x->>'product_id', v_from) l;
    SELECT bool_or(c->>'reason' IS NOT NULL) INTO v_failed FROM unnest(v_lines) c;
    IF v_failed THEN
        DELETE FROM transfers WHERE transfer_id = p_data->>'transfer_id';
        RETURN jsonb_build_object('outcome', 'rejected', 'transfer_id', p_data->'transfer_id',
            'products', figures_of(ARRAY(SELECT c->>'product_id' FROM unnest(v_lines) c)),
            'messages', (SELECT jsonb_agg(new_message(p_event_id, 'inventory.adjustment_rejected', jsonb_build_object(
                    'product_id', c->'product_id', 'reason', coalesce(c->>'reason', 'batch_rejected'),
                    'requested', c->'quantity', 'location_id', coalesce(v_unknown, v_from), 'index', c->'index')
                    || product_totals(c->>'product_id')) ORDER BY (c->>'index')::integer)
                FROM unnest(v_lines) c));
    END IF;
    FOREACH v_line IN ARRAY v_lines LOOP
        v_out := change_level(v_line->>'product_id', v_from, -(v_line->>'quantity')::bigint, 0, 0, 0, 0, 'transfer', NULL,
                              p_event_id, p_data->>'reason', p_data->>'reference', NULL, true);
        v_in := change_level(v_line->>'product_id', v_to, CASE WHEN v_transit THEN 0 ELSE (v_line->>'quantity')::bigint END,
                             0, 0, 0, CASE WHEN v_transit THEN (v_line->>'quantity')::bigint ELSE 0 END, 'transfer', NULL,
                             p_event_id, p_data->>'reason', p_data->>'reference', NULL, true);
        v_messages := v_messages || to_jsonb(stock_messages(p_event_id, v_line->>'product_id',
            (v_out->>'available_before')::bigint, (v_in->>'available_after')::bigint,
            (v_in->>'threshold')::integer, true));
    END LOOP;
    RETURN jsonb_build_object('outcome', 'transferred', 'transfer_id', p_data->'transfer_id',
        'products', figures_of(ARRAY(SELECT c->>'product_id' FROM unnest(v_lines) c)),
        'messages', jsonb_build_array(new_message(p_event_id, 'inventory.moved', jsonb_build_object(
            'kind', 'transfer', 'transfer_id', p_data->'transfer_id', 'from_location_id', v_from,
            'to_location_id', v_to, 'in_transit', v_transit, 'lines', p_data->'lines'))) || v_messages);
END $$;

-- stock.received (spec 3.4): incoming units arrive (on_hand += q, incoming -= what was
-- expected of them; more than expected is accepted and reported as `unexpected`). Creates the
-- product like stock.adjusted. One receipt or bulk `items` (+ `atomic`), as stock.adjusted.
CREATE OR REPLACE FUNCTION receive_stock(p_event_id uuid, p_data jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_bulk     boolean := p_data ? 'items';
    v_items    jsonb := CASE WHEN p_data ? 'items' THEN p_data->'items' ELSE jsonb_build_array(p_data) END;
    v_atomic   boolean := coalesce((p_data->>'atomic')::boolean, true);
    v_ids      text[] := ARRAY(SELECT x->>'product_id' FROM jsonb_array_elements(v_items) x);
    v_created  text[];
    v_failed   boolean;
    v_applied  integer := 0;
    v_messages jsonb := '[]';
    v_changed  jsonb;
    v_location text;
    v_quantity bigint;
    v_expected bigint;
    x          jsonb;
BEGIN
    -- The one refusal (an unknown location) does not depend on the figures: known up front.
    SELECT bool_or(NOT EXISTS (SELECT 1 FROM locations WHERE location_id = coalesce(i->>'location_id', 'default')))
      INTO v_failed FROM jsonb_array_elements(v_items) i;
    IF NOT v_failed OR NOT v_atomic THEN
        v_created := create_products(v_ids);
    END IF;
    FOR i IN 0 .. jsonb_array_length(v_items) - 1 LOOP
        x := v_items->i;
        v_location := coalesce(x->>'location_id', 'default');
        v_quantity := (x->>'quantity')::bigint;
        IF (v_failed AND v_atomic) OR NOT EXISTS (SELECT 1 FROM locations WHERE location_id = v_location) THEN
            v_messages := v_messages || new_message(p_event_id, 'inventory.adjustment_rejected', jsonb_build_object(
                    'product_id', x->'product_id', 'requested', v_quantity, 'location_id', v_location,
                    'reason', CASE WHEN EXISTS (SELECT 1 FROM locations WHERE location_id = v_location)
                                   THEN 'batch_rejected' ELSE 'unknown_location' END)
                || product_totals(x->>'product_id')
                || CASE WHEN v_bulk THEN jsonb_build_object('index', i) ELSE '{}' END);
            CONTINUE;
        END IF;
        v_expected := least(v_quantity, (level_of(x->>'product_id', v_location)).incoming);
        v_changed := change_level(x->>'product_id', v_location, v_quantity, 0, 0, 0, -v_expected, 'receive', NULL,
                                  p_event_id, x->>'reason', x->>'reference', NULL, false,
                                  x->>'product_id' = ANY(v_created));
        v_messages := v_messages || new_message(p_event_id, 'inventory.moved', jsonb_build_object(
                'kind', 'receipt', 'product_id', x->'product_id', 'location_id', v_location, 'quantity', v_quantity,
                'unexpected', v_quantity - v_expected, 'reference', x->'reference', 'location', v_changed->'level')
            || CASE WHEN v_bulk THEN jsonb_build_object('index', i) ELSE '{}' END)
            || (v_changed->'messages');
        v_applied := v_applied + 1;
    END LOOP;
    DELETE FROM products WHERE product_id = ANY(v_created) AND version = 0;
    RETURN jsonb_build_object('outcome', CASE WHEN v_applied > 0 THEN 'received' ELSE 'rejected' END,
        'messages', v_messages, 'products', figures_of(v_ids))
        || CASE WHEN v_bulk THEN '{}' ELSE jsonb_build_object('product_id', p_data->'product_id') END;
END $$;
