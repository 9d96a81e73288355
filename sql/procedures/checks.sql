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

-- Product ids are what products.product_id accepts (001_schema.sql).
CREATE OR REPLACE FUNCTION valid_product_id(p text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$ SELECT p ~ '^[A-Za-z0-9._:-]{1,64}$' $$;

-- A JSON integer (no fraction, no exponent) within [lo, hi].
CREATE OR REPLACE FUNCTION json_int_between(v jsonb, lo numeric, hi numeric) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(jsonb_typeof(v) = 'number' AND v::text ~ '^-?[0-9]{1,19}$'
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

-- What is wrong with each input event ({id, type, data}) of a batch, or NULL: the first
-- field that breaks the contract's rules. A set function that PostgreSQL inlines into the
-- caller's query, so apply_events() checks a whole batch in one query before it writes
-- anything (a scalar function with a subquery runs as a query of its own for every event).
CREATE OR REPLACE FUNCTION event_problems(p_events jsonb) RETURNS TABLE (ord bigint, problem text)
LANGUAGE sql IMMUTABLE AS $$
    SELECT ord, CASE
        WHEN jsonb_typeof(p_event->'id') IS DISTINCT FROM 'string' THEN 'id'
        WHEN jsonb_typeof(d) IS DISTINCT FROM 'object' THEN 'data'
        WHEN t IS NULL OR t NOT IN ('order.placed', 'order.cancelled', 'order.completed', 'stock.adjusted')
            THEN 'type ' || coalesce(t, 'null')
        WHEN t <> 'stock.adjusted' AND NOT json_text_between(d->'order_id', 1, 200) THEN 'data.order_id'
        WHEN t IN ('order.cancelled', 'order.completed') AND d - 'order_id' <> '{}' THEN 'data: unknown field'
        WHEN t = 'order.placed' AND d - ARRAY['order_id', 'lines', 'reservation_ttl_seconds', 'channel_id'] <> '{}'
            THEN 'data: unknown field'
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
