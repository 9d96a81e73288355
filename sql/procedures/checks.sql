-- Argument checks for input events, applied by apply_events() before anything is written.
-- The worker validates every message against the contract (contract.py) before it gets here;
-- these checks hold the same rules inside PostgreSQL, so that a bug upstream, or a caller
-- other than the worker, still cannot write stock from malformed data. A failure raises
-- invalid_parameter_value ('invalid event: <field>'): the worker dead-letters that message.

-- Arguments are checked in the procedures too: a bug upstream must not be able to corrupt stock.
CREATE OR REPLACE FUNCTION check_arg(p_ok boolean, p_message text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF p_ok IS NOT TRUE THEN
        RAISE EXCEPTION 'invalid event: %', p_message USING ERRCODE = 'invalid_parameter_value';
    END IF;
END $$;

-- Product ids are what products.product_id accepts: ^[A-Za-z0-9._:-]{1,64}$. Written as `+`
-- and a length test: PostgreSQL's regex engine expands {1,64} into 64 states, ten times the
-- cost (about 5 us a call, twice per order line); migration 095 did the same to the tables.
CREATE OR REPLACE FUNCTION valid_product_id(p text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$ SELECT p ~ '^[A-Za-z0-9._:-]+$' AND length(p) <= 64 $$;

-- A JSON integer (no fraction, no exponent) of at most 19 digits, within [lo, hi]. (jsonb
-- prints a number without exponent, so a fraction is the only thing to refuse; the digit
-- count is tested apart, as above.)
CREATE OR REPLACE FUNCTION json_int_between(v jsonb, lo numeric, hi numeric) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(jsonb_typeof(v) = 'number' AND v::text ~ '^-?[0-9]+$' AND length(ltrim(v::text, '-')) <= 19
                    AND v::text::numeric BETWEEN lo AND hi, false)
$$;

-- A JSON string of at most max_len characters (and at least min_len).
CREATE OR REPLACE FUNCTION json_text_between(v jsonb, min_len integer, max_len integer) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(jsonb_typeof(v) = 'string' AND length(v #>> '{}') BETWEEN min_len AND max_len, false)
$$;

-- Absent, JSON null, or what `ok` says.
CREATE OR REPLACE FUNCTION json_optional(v jsonb, ok boolean) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT v IS NULL OR jsonb_typeof(v) = 'null' OR coalesce(ok, false)
$$;

-- Given: present and not JSON null (json_optional() treats null as absent).
CREATE OR REPLACE FUNCTION json_given(v jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$ SELECT v IS NOT NULL AND jsonb_typeof(v) <> 'null' $$;

-- A JSON string that is a product, location or channel id.
CREATE OR REPLACE FUNCTION json_id(v jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$ SELECT coalesce(jsonb_typeof(v) = 'string' AND valid_product_id(v #>> '{}'), false) $$;

-- A JSON string holding an RFC 3339 date-time with its offset (Z or +hh:mm), a real instant.
CREATE OR REPLACE FUNCTION json_rfc3339(v jsonb) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF NOT coalesce(jsonb_typeof(v) = 'string' AND (v #>> '{}') ~
                    '^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?([Zz]|[+-][0-9]{2}:[0-9]{2})$',
                    false) THEN
        RETURN false;
    END IF;
    PERFORM (v #>> '{}')::timestamptz;
    RETURN true;
EXCEPTION WHEN datetime_field_overflow OR invalid_datetime_format THEN
    RETURN false;
END $$;

CREATE OR REPLACE FUNCTION json_bool(v jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$ SELECT coalesce(jsonb_typeof(v) = 'boolean', false) $$;

-- `lines` of 1 to p_max_lines {product_id, quantity 1..p_max_quantity}, each product once
-- (a transfer's and a partial cancel's lines).
CREATE OR REPLACE FUNCTION json_product_lines(v jsonb, p_max_lines integer, p_max_quantity bigint) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN jsonb_typeof(v) IS DISTINCT FROM 'array' THEN false  -- CASE: evaluated in order
                WHEN jsonb_array_length(v) NOT BETWEEN 1 AND p_max_lines THEN false
                ELSE coalesce((
        SELECT bool_and(jsonb_typeof(x) = 'object' AND x - ARRAY['product_id', 'quantity'] = '{}'
                        AND json_id(x->'product_id') AND json_int_between(x->'quantity', 1, p_max_quantity))
               AND count(DISTINCT x->>'product_id') = count(*)
          FROM jsonb_array_elements(v) x), false) END
$$;

-- One adjustment of stock.adjusted (the message itself, or one of its `items`), p = its path.
CREATE OR REPLACE FUNCTION adjustment_problem(x jsonb, p text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN jsonb_typeof(x) IS DISTINCT FROM 'object' THEN p
        WHEN x - ARRAY['product_id', 'location_id', 'delta', 'on_hand', 'incoming', 'name', 'change_from', 'reason',
                       'reference', 'low_stock_threshold'] <> '{}' THEN p || ': unknown field'
        WHEN NOT json_id(x->'product_id') THEN p || '.product_id'
        WHEN NOT json_optional(x->'location_id', json_id(x->'location_id')) THEN p || '.location_id'
        WHEN json_given(x->'delta')::int + json_given(x->'on_hand')::int + json_given(x->'incoming')::int <> 1
            THEN p || ': exactly one of delta, on_hand and incoming'
        WHEN NOT json_optional(x->'delta', json_int_between(x->'delta', -1000000000, 1000000000)) THEN p || '.delta'
        WHEN NOT json_optional(x->'on_hand', json_int_between(x->'on_hand', 0, 1000000000000)) THEN p || '.on_hand'
        WHEN NOT json_optional(x->'incoming', json_int_between(x->'incoming', 0, 1000000000000)) THEN p || '.incoming'
        WHEN NOT json_optional(x->'name', x->'name' IN ('"on_hand"', '"incoming"')) THEN p || '.name'
        WHEN json_given(x->'name') AND NOT json_given(x->'delta') THEN p || '.name: only with delta'
        WHEN NOT json_optional(x->'change_from', json_int_between(x->'change_from', 0, 1000000000000))
            THEN p || '.change_from'
        WHEN NOT json_optional(x->'reason', json_text_between(x->'reason', 0, 500)) THEN p || '.reason'
        WHEN NOT json_optional(x->'reference', json_text_between(x->'reference', 0, 500)) THEN p || '.reference'
        WHEN NOT json_optional(x->'low_stock_threshold', json_int_between(x->'low_stock_threshold', 0, 1000000000))
            THEN p || '.low_stock_threshold'
    END
$$;

-- One receipt of stock.received (the message itself, or one of its `items`).
CREATE OR REPLACE FUNCTION receipt_problem(x jsonb, p text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN jsonb_typeof(x) IS DISTINCT FROM 'object' THEN p
        WHEN x - ARRAY['product_id', 'location_id', 'quantity', 'reason', 'reference'] <> '{}' THEN p || ': unknown field'
        WHEN NOT json_id(x->'product_id') THEN p || '.product_id'
        WHEN NOT json_optional(x->'location_id', json_id(x->'location_id')) THEN p || '.location_id'
        WHEN NOT json_int_between(x->'quantity', 1, 1000000000) THEN p || '.quantity'
        WHEN NOT json_optional(x->'reason', json_text_between(x->'reason', 0, 500)) THEN p || '.reason'
        WHEN NOT json_optional(x->'reference', json_text_between(x->'reference', 0, 500)) THEN p || '.reference'
    END
$$;

-- `items` of a bulk message (stock.adjusted, stock.received): 1-1000, each valid, and the key
-- (product, location, quantity name) at most once.
CREATE OR REPLACE FUNCTION items_problem(d jsonb, p_receipts boolean) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN d - ARRAY['items', 'atomic'] <> '{}' THEN 'data: items with item fields'
        WHEN NOT json_optional(d->'atomic', json_bool(d->'atomic')) THEN 'data.atomic'
        WHEN NOT (jsonb_typeof(d->'items') = 'array' AND jsonb_array_length(d->'items') BETWEEN 1 AND 1000)
            THEN 'data.items'
        ELSE (SELECT coalesce(min(problem), CASE WHEN count(DISTINCT key) <> count(*) THEN 'data.items: duplicate' END)
                FROM (SELECT CASE WHEN p_receipts THEN receipt_problem(x, 'data.items[' || (i - 1) || ']')
                                  ELSE adjustment_problem(x, 'data.items[' || (i - 1) || ']') END AS problem,
                             jsonb_build_array(x->'product_id', coalesce(x->>'location_id', 'default'),
                                 CASE WHEN json_given(x->'incoming') OR x->>'name' = 'incoming' THEN 'incoming'
                                      ELSE 'on_hand' END) AS key
                        FROM jsonb_array_elements(d->'items') WITH ORDINALITY AS t(x, i)) e)
    END
$$;

-- The types of stock across locations, and stock.adjusted with any of its newer fields. A
-- query of its own per event (its subqueries), so event_problems() calls it only for these.
CREATE OR REPLACE FUNCTION stock_event_problem(t text, d jsonb) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE t
    WHEN 'stock.adjusted' THEN
        CASE WHEN d ? 'items' THEN items_problem(d, false)
             WHEN d ? 'atomic' THEN 'data.atomic: only with items'
             ELSE adjustment_problem(d, 'data') END
    WHEN 'stock.received' THEN
        CASE WHEN d ? 'items' THEN items_problem(d, true)
             WHEN d ? 'atomic' THEN 'data.atomic: only with items'
             ELSE receipt_problem(d, 'data') END
    WHEN 'stock.moved' THEN CASE
        WHEN d - ARRAY['product_id', 'location_id', 'quantity', 'from', 'to', 'reason', 'reference'] <> '{}'
            THEN 'data: unknown field'
        WHEN NOT json_id(d->'product_id') THEN 'data.product_id'
        WHEN NOT json_optional(d->'location_id', json_id(d->'location_id')) THEN 'data.location_id'
        WHEN NOT json_int_between(d->'quantity', 1, 1000000000) THEN 'data.quantity'
        WHEN d->'from' IS NULL OR d->'from' NOT IN ('"sellable"', '"damaged"', '"quality_control"') THEN 'data.from'
        WHEN d->'to' IS NULL OR d->'to' NOT IN ('"sellable"', '"damaged"', '"quality_control"', '"disposed"')
            THEN 'data.to'
        WHEN d->'from' = d->'to' THEN 'data.to: the same as from'
        WHEN NOT json_optional(d->'reason', json_text_between(d->'reason', 0, 500)) THEN 'data.reason'
        WHEN NOT json_optional(d->'reference', json_text_between(d->'reference', 0, 500)) THEN 'data.reference'
    END
    WHEN 'stock.transferred' THEN CASE
        WHEN d - ARRAY['transfer_id', 'from_location_id', 'to_location_id', 'lines', 'in_transit', 'reason',
                       'reference'] <> '{}' THEN 'data: unknown field'
        WHEN NOT json_text_between(d->'transfer_id', 1, 200) THEN 'data.transfer_id'
        WHEN NOT json_id(d->'from_location_id') THEN 'data.from_location_id'
        WHEN NOT json_id(d->'to_location_id') THEN 'data.to_location_id'
        WHEN d->'from_location_id' = d->'to_location_id' THEN 'data.to_location_id: the same as from_location_id'
        WHEN NOT json_optional(d->'in_transit', json_bool(d->'in_transit')) THEN 'data.in_transit'
        WHEN NOT json_optional(d->'reason', json_text_between(d->'reason', 0, 500)) THEN 'data.reason'
        WHEN NOT json_optional(d->'reference', json_text_between(d->'reference', 0, 500)) THEN 'data.reference'
        WHEN NOT json_product_lines(d->'lines', 1000, 1000000000) THEN 'data.lines'
    END
    WHEN 'location.configured' THEN CASE
        WHEN d - ARRAY['location_id', 'name', 'priority', 'active', 'fulfils_orders'] <> '{}' THEN 'data: unknown field'
        WHEN NOT json_id(d->'location_id') THEN 'data.location_id'
        WHEN NOT json_optional(d->'name', json_text_between(d->'name', 0, 200)) THEN 'data.name'
        WHEN NOT json_optional(d->'priority', json_int_between(d->'priority', -1000000, 1000000)) THEN 'data.priority'
        WHEN NOT json_optional(d->'active', json_bool(d->'active')) THEN 'data.active'
        WHEN NOT json_optional(d->'fulfils_orders', json_bool(d->'fulfils_orders')) THEN 'data.fulfils_orders'
    END
    WHEN 'channel.configured' THEN CASE
        WHEN d - ARRAY['channel_id', 'locations', 'strategy'] <> '{}' THEN 'data: unknown field'
        WHEN NOT json_id(d->'channel_id') THEN 'data.channel_id'
        WHEN NOT json_optional(d->'strategy', d->'strategy' IN ('"priority"', '"most_available"',
                                                               '"fewest_locations"', '"single_location"'))
            THEN 'data.strategy'
        WHEN d->>'channel_id' = 'default' AND json_given(d->'locations') THEN 'data.locations: not for channel default'
        WHEN NOT json_optional(d->'locations', jsonb_typeof(d->'locations') = 'array'
                               AND jsonb_array_length(d->'locations') BETWEEN 1 AND 100
                               AND (SELECT bool_and(json_id(x)) AND count(DISTINCT x) = count(*)
                                      FROM jsonb_array_elements(d->'locations') x)) THEN 'data.locations'
    END
    WHEN 'product.configured' THEN CASE
        WHEN d - ARRAY['product_id', 'tracked', 'low_stock_threshold', 'max_per_order', 'safety_stock',
                       'backorder'] <> '{}'
            THEN 'data: unknown field'
        WHEN d ? 'backorder' AND NOT coalesce(jsonb_typeof(d->'backorder') = 'object'
                                      AND (d->'backorder') - ARRAY['mode', 'limit', 'until'] = '{}'
                                      AND d->'backorder'->'mode' IN ('"deny"', '"allow"', '"incoming"')
                                      AND json_optional(d->'backorder'->'limit',
                                                        json_int_between(d->'backorder'->'limit', 0, 1000000000))
                                      AND json_optional(d->'backorder'->'until', json_rfc3339(d->'backorder'->'until')),
                                      false)
            THEN 'data.backorder'
        WHEN NOT json_id(d->'product_id') THEN 'data.product_id'
        WHEN NOT json_optional(d->'tracked', json_bool(d->'tracked')) THEN 'data.tracked'
        WHEN NOT json_optional(d->'low_stock_threshold', json_int_between(d->'low_stock_threshold', 0, 1000000000))
            THEN 'data.low_stock_threshold'
        WHEN NOT json_optional(d->'max_per_order', json_int_between(d->'max_per_order', 1, 1000000))
            THEN 'data.max_per_order'
        WHEN NOT json_optional(d->'safety_stock', jsonb_typeof(d->'safety_stock') = 'array'
                               AND jsonb_array_length(d->'safety_stock') BETWEEN 1 AND 100
                               AND (SELECT bool_and(jsonb_typeof(x) = 'object'
                                                    AND x - ARRAY['location_id', 'quantity'] = '{}'
                                                    AND json_id(x->'location_id')
                                                    AND json_int_between(x->'quantity', 0, 1000000000))
                                           AND count(DISTINCT x->>'location_id') = count(*)
                                      FROM jsonb_array_elements(d->'safety_stock') x)) THEN 'data.safety_stock'
    END
    END
$$;

-- The order messages of Part B (an order's life after placement). Like stock_event_problem(),
-- a query of its own per event, called only for these.
CREATE OR REPLACE FUNCTION order_event_problem(t text, d jsonb) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE t
    WHEN 'reservation.extended' THEN CASE
        WHEN d - ARRAY['order_id', 'extend_by_seconds', 'until_fulfilled'] <> '{}' THEN 'data: unknown field'
        WHEN NOT json_text_between(d->'order_id', 1, 200) THEN 'data.order_id'
        WHEN json_given(d->'extend_by_seconds')::int + json_given(d->'until_fulfilled')::int <> 1
            THEN 'data: exactly one of extend_by_seconds and until_fulfilled'
        WHEN NOT json_optional(d->'extend_by_seconds', json_int_between(d->'extend_by_seconds', 1, 31536000))
            THEN 'data.extend_by_seconds'
        WHEN NOT json_optional(d->'until_fulfilled', d->'until_fulfilled' = 'true') THEN 'data.until_fulfilled'
    END
    WHEN 'order.cancelled' THEN CASE  -- with lines: a partial cancel
        WHEN d - ARRAY['order_id', 'lines'] <> '{}' THEN 'data: unknown field'
        WHEN NOT json_text_between(d->'order_id', 1, 200) THEN 'data.order_id'
        WHEN NOT json_product_lines(d->'lines', 100, 1000000) THEN 'data.lines'
    END
    WHEN 'order.returned' THEN CASE
        WHEN d - ARRAY['order_id', 'return_id', 'lines'] <> '{}' THEN 'data: unknown field'
        WHEN NOT json_text_between(d->'order_id', 1, 200) THEN 'data.order_id'
        WHEN NOT json_text_between(d->'return_id', 1, 200) THEN 'data.return_id'
        WHEN NOT (jsonb_typeof(d->'lines') = 'array' AND jsonb_array_length(d->'lines') BETWEEN 1 AND 100)
            THEN 'data.lines'
        WHEN NOT coalesce((
                SELECT bool_and(jsonb_typeof(x) = 'object'
                                AND x - ARRAY['product_id', 'quantity', 'location_id', 'condition'] = '{}'
                                AND json_id(x->'product_id') AND json_int_between(x->'quantity', 1, 1000000)
                                AND json_optional(x->'location_id', json_id(x->'location_id'))
                                AND coalesce(x->'condition' IN ('"sellable"', '"damaged"', '"quality_control"',
                                                                '"disposed"'), false))
                       AND count(DISTINCT jsonb_build_array(x->'product_id', x->'location_id', x->'condition'))
                           = count(*)
                  FROM jsonb_array_elements(d->'lines') x), false) THEN 'data.lines'
    END
    WHEN 'order.fulfilled' THEN CASE
        WHEN d - ARRAY['order_id', 'fulfilment_id', 'lines'] <> '{}' THEN 'data: unknown field'
        WHEN NOT json_text_between(d->'order_id', 1, 200) THEN 'data.order_id'
        WHEN NOT json_text_between(d->'fulfilment_id', 1, 200) THEN 'data.fulfilment_id'
        WHEN NOT (jsonb_typeof(d->'lines') = 'array' AND jsonb_array_length(d->'lines') BETWEEN 1 AND 100)
            THEN 'data.lines'
        WHEN NOT coalesce((
                SELECT bool_and(jsonb_typeof(x) = 'object' AND x - ARRAY['product_id', 'quantity', 'location_id'] = '{}'
                                AND json_id(x->'product_id') AND json_int_between(x->'quantity', 1, 1000000)
                                AND json_optional(x->'location_id', json_id(x->'location_id')))
                       AND count(DISTINCT jsonb_build_array(x->'product_id', x->'location_id')) = count(*)
                  FROM jsonb_array_elements(d->'lines') x), false) THEN 'data.lines'
    END
    END
$$;

-- What is wrong with each input event ({id, type, data}) of a batch, or NULL: the first
-- field that breaks the contract's rules. A set function that PostgreSQL inlines into the
-- caller's query, so apply_events() checks a whole batch in one query before it writes
-- anything (a scalar function with a subquery runs as a query of its own for every event).
CREATE OR REPLACE FUNCTION event_problems(p_events jsonb) RETURNS TABLE (ord bigint, problem text)
LANGUAGE sql IMMUTABLE AS $$
    SELECT ord, CASE
        WHEN jsonb_typeof(p_event->'id') IS DISTINCT FROM 'string' THEN 'id'
        WHEN jsonb_typeof(d) IS DISTINCT FROM 'object' THEN 'data'
        WHEN t IS NULL OR t NOT IN ('order.placed', 'order.cancelled', 'order.completed', 'stock.adjusted',
                                    'stock.moved', 'stock.transferred', 'stock.received', 'location.configured',
                                    'channel.configured', 'product.configured', 'reservation.extended',
                                    'order.fulfilled', 'order.returned')
            THEN 'type ' || coalesce(t, 'null')
        WHEN t IN ('reservation.extended', 'order.fulfilled', 'order.returned') OR t = 'order.cancelled' AND d ? 'lines'
            THEN order_event_problem(t, d)
        WHEN t IN ('stock.moved', 'stock.transferred', 'stock.received', 'location.configured',
                   'channel.configured', 'product.configured')
             OR t = 'stock.adjusted' AND d ?| ARRAY['location_id', 'incoming', 'name', 'change_from', 'reference',
                                                   'items', 'atomic']
            THEN stock_event_problem(t, d)
        WHEN t <> 'stock.adjusted' AND NOT json_text_between(d->'order_id', 1, 200) THEN 'data.order_id'
        WHEN t IN ('order.cancelled', 'order.completed') AND d - 'order_id' <> '{}' THEN 'data: unknown field'
        WHEN t = 'order.placed' AND d - ARRAY['order_id', 'lines', 'reservation_ttl_seconds', 'channel_id',
                                              'allow_backorder'] <> '{}'
            THEN 'data: unknown field'
        WHEN t = 'order.placed' AND NOT json_optional(d->'allow_backorder', json_bool(d->'allow_backorder'))
            THEN 'data.allow_backorder'
        WHEN t = 'order.placed' AND NOT json_optional(d->'channel_id', jsonb_typeof(d->'channel_id') = 'string'
                                                                       AND valid_product_id(d->>'channel_id'))
            THEN 'data.channel_id'
        WHEN t = 'order.placed' AND NOT json_optional(d->'reservation_ttl_seconds',
                                                      json_int_between(d->'reservation_ttl_seconds', 1, 31536000))
            THEN 'data.reservation_ttl_seconds'
        WHEN t = 'order.placed' AND NOT (jsonb_typeof(d->'lines') = 'array'
                                         AND jsonb_array_length(d->'lines') BETWEEN 1 AND 100) THEN 'data.lines'
        WHEN t = 'order.placed' AND NOT coalesce((
                SELECT bool_and(jsonb_typeof(x) = 'object'
                                AND x - ARRAY['product_id', 'quantity', 'location_id'] = '{}'
                                AND json_optional(x->'location_id', jsonb_typeof(x->'location_id') = 'string'
                                                                    AND valid_product_id(x->>'location_id'))
                                AND jsonb_typeof(x->'product_id') = 'string'
                                AND valid_product_id(x->>'product_id')
                                AND json_int_between(x->'quantity', 1, 1000000))
                       AND count(DISTINCT x->>'product_id') = count(*)
                  FROM jsonb_array_elements(d->'lines') x), false) THEN 'data.lines'
        WHEN t = 'stock.adjusted' AND d - ARRAY['product_id', 'delta', 'on_hand', 'reason', 'low_stock_threshold'] <> '{}'
            THEN 'data: unknown field'
        WHEN t = 'stock.adjusted' AND NOT (jsonb_typeof(d->'product_id') = 'string'
                                           AND valid_product_id(d->>'product_id')) THEN 'data.product_id'
        WHEN t = 'stock.adjusted' AND json_optional(d->'delta', false) = json_optional(d->'on_hand', false)
            THEN 'data: exactly one of delta and on_hand'
        WHEN t = 'stock.adjusted' AND NOT json_optional(d->'delta', json_int_between(d->'delta', -1000000000, 1000000000))
            THEN 'data.delta'
        WHEN t = 'stock.adjusted' AND NOT json_optional(d->'on_hand', json_int_between(d->'on_hand', 0, 1000000000000))
            THEN 'data.on_hand'
        WHEN t = 'stock.adjusted' AND NOT json_optional(d->'reason', json_text_between(d->'reason', 0, 500))
            THEN 'data.reason'
        WHEN t = 'stock.adjusted' AND NOT json_optional(d->'low_stock_threshold',
                                                        json_int_between(d->'low_stock_threshold', 0, 1000000000))
            THEN 'data.low_stock_threshold'
    END
      FROM jsonb_array_elements(p_events) WITH ORDINALITY AS e(p_event, ord),
           LATERAL (SELECT p_event->>'type' AS t, p_event->'data' AS d OFFSET 0) f
$$;

-- Replaced by event_problems() (one query per batch instead of a dozen statements per event).
DROP FUNCTION IF EXISTS check_event_data(text, jsonb);
DROP FUNCTION IF EXISTS event_problem(jsonb);
