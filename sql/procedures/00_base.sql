-- The stock rules, by concern: 00_base.sql (shared helpers), stock.sql (stock changes),
-- orders.sql (placing, cancelling, completing), expiry.sql, events.sql (the one entry point,
-- apply_events), outbox.sql, checks.sql (argument checks), audit.sql, delivery.sql,
-- housekeeping.sql. Re-applied by `inventory-worker migrate` whenever a file changes (CREATE
-- OR REPLACE), so they always hold the whole, current truth. `migrate` applies them in name
-- order; this file is named 00_ to come first, since LANGUAGE sql functions elsewhere
-- (backorder_json) need its helpers (rfc3339) to exist already.
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
-- Its id is a UUIDv7 (RFC 9562: milliseconds since 1970, then random bits), so that the
-- outbox's message_id index grows at its right edge: a random id dirtied a page of it anywhere
-- for every event, each one a full-page image in the WAL after every checkpoint.
CREATE OR REPLACE FUNCTION new_message(p_causation_id uuid, p_type text, p_data jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
    v_rand bytea := uuid_send(gen_random_uuid());
    v_id uuid := encode(set_byte(overlay(v_rand PLACING substring(int8send(
                            floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3) FROM 1 FOR 6),
                        6, (get_byte(v_rand, 6) & 15) | 112), 'hex')::uuid;  -- version 7
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

-- The outbox rows of the messages a batch's results carry (apply_events()). Generic plan: the
-- planner costs a join of two set-returning functions over the results lower when it sees the
-- array, so it planned this anew for every batch (35 to 45 us) instead of keeping a plan.
CREATE OR REPLACE FUNCTION write_outbox_of(p_results jsonb[]) RETURNS void
LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    INSERT INTO outbox (id, message_id, routing_key, body)
    SELECT (m->>'outbox_id')::bigint, (m->>'message_id')::uuid, m->>'routing_key', m->'body'
      FROM unnest(p_results) AS r, jsonb_array_elements(r->'messages') AS m;
END $$;

-- A level's `available`: sellable units (on hand, neither damaged nor in quality control) not
-- reserved, above the safety stock floor; never negative (a count may take it below the floor).
CREATE OR REPLACE FUNCTION level_available(p_on_hand bigint, p_reserved bigint, p_damaged bigint,
                                           p_quality_control bigint, p_safety_stock bigint) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    SELECT greatest(0, p_on_hand - p_damaged - p_quality_control - p_reserved - p_safety_stock)
$$;

-- Whether a location's stock counts towards products' `available` (active, fulfils orders).
-- Configuration rows are read unlocked (a change applies to transactions that start later).
CREATE OR REPLACE FUNCTION location_sells(p_location_id text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT active AND fulfils_orders FROM locations WHERE location_id = p_location_id), false)
$$;

-- Whether `default` counts towards `available`, read once per transaction (configuration
-- applies to transactions that start after it commits): the hot path asks for every product.
CREATE OR REPLACE FUNCTION default_sells() RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v boolean := nullif(current_setting('inventory.default_sells', true), '')::boolean;
BEGIN
    IF v IS NULL THEN
        SELECT active AND fulfils_orders INTO v FROM locations WHERE location_id = 'default';
        v := coalesce(v, false);
        PERFORM set_config('inventory.default_sells', v::text, true);
    END IF;
    RETURN v;
END $$;

-- A product's `available`: the sum of its levels' at active, order-fulfilling locations. A
-- default-only product's one level is its products row (080_locations.sql); for it this is
-- today's on_hand - reserved while the new figures are unused. PL/pgSQL, so that its queries
-- are planned once per session: as a LANGUAGE sql function with a subquery it is not inlined
-- and was planned again for every product (0.3 ms each).
CREATE OR REPLACE FUNCTION product_available(p products) RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v bigint;
BEGIN
    IF NOT p.multi_location THEN
        RETURN CASE WHEN default_sells()
                    THEN greatest(0, p.on_hand - p.damaged - p.quality_control - p.reserved - p.safety_stock)
                    ELSE 0 END;
    END IF;
    SELECT coalesce(sum(level_available(s.on_hand, s.reserved, s.damaged, s.quality_control, s.safety_stock)), 0)
      INTO v
      FROM stock_levels s JOIN locations l ON l.location_id = s.location_id
     WHERE s.product_id = p.product_id AND l.active AND l.fulfils_orders;
    RETURN v;
END $$;

-- The compact figures (Outcome products, the cache, GET /inventory/{id}): product totals.
CREATE OR REPLACE FUNCTION product_figures(p products) RETURNS jsonb
LANGUAGE sql STABLE AS $$  -- STABLE as jsonb_build_object() is, so that it is inlined
    SELECT jsonb_build_object('product_id', p.product_id, 'on_hand', p.on_hand,
        'reserved', p.reserved, 'available', product_available(p), 'version', p.version)
$$;

CREATE OR REPLACE FUNCTION rejected(p_event_id uuid, p_order_id text, p_reason text,
                                    p_shortages jsonb DEFAULT '[]') RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
    RETURN jsonb_build_object('outcome', 'rejected', 'order_id', p_order_id, 'products', '[]'::jsonb,
        'messages', jsonb_build_array(new_message(p_event_id, 'inventory.rejected', jsonb_build_object(
            'order_id', p_order_id, 'reason', p_reason, 'shortages', p_shortages))));
END $$;

-- Locks the given products in the one global order. Missing ids are simply skipped.
CREATE OR REPLACE FUNCTION lock_products(p_ids text[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM products WHERE product_id = ANY(p_ids) ORDER BY product_id FOR UPDATE;
END $$;
