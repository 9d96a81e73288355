-- Argument checks for input events, applied by apply_event() before anything is written.
-- The worker validates every message against the contract (contract.py) before it gets here;
-- these checks hold the same rules inside PostgreSQL, so that a bug upstream, or a caller
-- other than the worker, still cannot write stock from malformed data. A failure raises
-- invalid_parameter_value ('invalid event: <field>'): the worker dead-letters that message.

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

-- Only the keys the contract knows.
CREATE OR REPLACE FUNCTION json_keys_within(p jsonb, allowed text[]) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT NOT EXISTS (SELECT 1 FROM jsonb_object_keys(p) k WHERE k <> ALL (allowed))
$$;

CREATE OR REPLACE FUNCTION check_event_data(p_type text, p_data jsonb) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v_lines jsonb := p_data->'lines';
BEGIN
    PERFORM check_arg(jsonb_typeof(p_data) = 'object', 'data');
    PERFORM check_arg(p_type IN ('order.placed', 'order.cancelled', 'order.completed', 'stock.adjusted'),
                      'type ' || coalesce(p_type, 'null'));
    IF p_type IN ('order.placed', 'order.cancelled', 'order.completed') THEN
        PERFORM check_arg(json_text_between(p_data->'order_id', 1, 200), 'data.order_id');
    END IF;
    IF p_type IN ('order.cancelled', 'order.completed') THEN
        PERFORM check_arg(json_keys_within(p_data, ARRAY['order_id']), 'data: unknown field');
    ELSIF p_type = 'order.placed' THEN
        PERFORM check_arg(json_keys_within(p_data, ARRAY['order_id', 'lines', 'reservation_ttl_seconds']),
                          'data: unknown field');
        PERFORM check_arg(json_optional(p_data->'reservation_ttl_seconds',
                                        json_int_between(p_data->'reservation_ttl_seconds', 1, 31536000)),
                          'data.reservation_ttl_seconds');
        PERFORM check_arg(jsonb_typeof(v_lines) = 'array' AND jsonb_array_length(v_lines) BETWEEN 1 AND 100,
                          'data.lines');
        PERFORM check_arg(bool_and(jsonb_typeof(x) = 'object'
                                   AND json_keys_within(x, ARRAY['product_id', 'quantity'])
                                   AND jsonb_typeof(x->'product_id') = 'string'
                                   AND valid_product_id(x->>'product_id')
                                   AND json_int_between(x->'quantity', 1, 1000000))
                          AND count(DISTINCT x->>'product_id') = count(*), 'data.lines')
           FROM jsonb_array_elements(v_lines) x;
    ELSE  -- stock.adjusted
        PERFORM check_arg(json_keys_within(p_data, ARRAY['product_id', 'delta', 'on_hand', 'reason',
                                                         'low_stock_threshold']), 'data: unknown field');
        PERFORM check_arg(jsonb_typeof(p_data->'product_id') = 'string'
                          AND valid_product_id(p_data->>'product_id'), 'data.product_id');
        PERFORM check_arg(json_optional(p_data->'delta', false) <> json_optional(p_data->'on_hand', false),
                          'data: exactly one of delta and on_hand');
        PERFORM check_arg(json_optional(p_data->'delta',
                                        json_int_between(p_data->'delta', -1000000000, 1000000000)), 'data.delta');
        PERFORM check_arg(json_optional(p_data->'on_hand',
                                        json_int_between(p_data->'on_hand', 0, 1000000000000)), 'data.on_hand');
        PERFORM check_arg(json_optional(p_data->'reason', json_text_between(p_data->'reason', 0, 500)),
                          'data.reason');
        PERFORM check_arg(json_optional(p_data->'low_stock_threshold',
                                        json_int_between(p_data->'low_stock_threshold', 0, 1000000000)),
                          'data.low_stock_threshold');
    END IF;
END $$;
