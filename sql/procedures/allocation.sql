-- Allocation: where an order's tracked lines are held (spec 4.1). A pure function: what it
-- plans depends only on its arguments, so it is tested on its own (test_allocation.py) and
-- the placing code (orders.sql) only gathers its inputs and carries out its plan.

-- The plan for an order's tracked lines.
--   p_lines:      [{product_id, quantity, location_id?}] (distinct products; location_id = a pin)
--   p_locations:  the candidates E, in channel order (active, order-fulfilling)
--   p_reservable: {product_id: {location_id: units}}, units = max(0, sellable - reserved -
--                 safety_stock) at that level; a missing entry is 0
--   p_strategy:   priority | most_available | fewest_locations | single_location
-- Returns, in the order of p_lines: [{product_id, quantity, location_id (the pin or null),
-- allocations: [{location_id, quantity}] (in the order taken), shortfall}].
-- Pinned lines take only at their pin (which must be in E, else they get nothing); unpinned
-- lines follow the strategy; every tie goes to the earlier location in E.
-- fewest_locations: repeatedly the location holding the most of what is still missing
-- (a location holding every line whole holds all of it, so the first such wins first);
-- single_location: that choice made once, no other location used.
CREATE OR REPLACE FUNCTION allocation_plan(p_lines jsonb, p_locations text[], p_reservable jsonb,
                                           p_strategy text) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    n        integer := jsonb_array_length(p_lines);
    m        integer := coalesce(cardinality(p_locations), 0);
    v_pid    text[];
    v_pin    text[];
    v_rem    bigint[];
    v_allocs jsonb[];
    v_units  bigint[];   -- units left of line i's product at location j: (i - 1) * m + j
    v_take   bigint;
    v_best   integer;
    v_most   bigint;
    v_sum    bigint;
    v_out    jsonb := '[]';
    i        integer;
    j        integer;
BEGIN
    IF p_strategy IS NULL OR p_strategy NOT IN ('priority', 'most_available', 'fewest_locations', 'single_location') THEN
        RAISE EXCEPTION 'unknown allocation strategy: %', p_strategy USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT array_agg(x->>'product_id' ORDER BY ord), array_agg(x->>'location_id' ORDER BY ord),
           array_agg((x->>'quantity')::bigint ORDER BY ord), array_fill('[]'::jsonb, ARRAY[n])
      INTO v_pid, v_pin, v_rem, v_allocs
      FROM jsonb_array_elements(p_lines) WITH ORDINALITY AS t(x, ord);
    v_units := array_fill(0::bigint, ARRAY[greatest(n * m, 1)]);
    FOR i IN 1 .. n LOOP
        FOR j IN 1 .. m LOOP
            v_units[(i - 1) * m + j] := greatest(0, coalesce((p_reservable->v_pid[i]->>p_locations[j])::bigint, 0));
        END LOOP;
    END LOOP;

    -- Pinned lines: their location only.
    FOR i IN 1 .. n LOOP
        CONTINUE WHEN v_pin[i] IS NULL;
        j := array_position(p_locations, v_pin[i]);
        IF j IS NOT NULL AND v_units[(i - 1) * m + j] > 0 THEN
            v_take := least(v_rem[i], v_units[(i - 1) * m + j]);
            v_allocs[i] := v_allocs[i] || jsonb_build_object('location_id', v_pin[i], 'quantity', v_take);
            v_rem[i] := v_rem[i] - v_take;
        END IF;
    END LOOP;

    IF p_strategy IN ('priority', 'most_available') THEN
        -- Per line, walk E (most_available: by the line's units there, most first).
        FOR i IN 1 .. n LOOP
            CONTINUE WHEN v_pin[i] IS NOT NULL;
            FOR j IN SELECT k FROM generate_series(1, m) k
                      ORDER BY CASE WHEN p_strategy = 'most_available' THEN -v_units[(i - 1) * m + k] ELSE 0 END, k LOOP
                EXIT WHEN v_rem[i] = 0;
                v_take := least(v_rem[i], v_units[(i - 1) * m + j]);
                IF v_take > 0 THEN
                    v_allocs[i] := v_allocs[i] || jsonb_build_object('location_id', p_locations[j], 'quantity', v_take);
                    v_rem[i] := v_rem[i] - v_take;
                    v_units[(i - 1) * m + j] := v_units[(i - 1) * m + j] - v_take;
                END IF;
            END LOOP;
        END LOOP;
    ELSE
        -- Whole locations at a time: the one that holds the most of what the unpinned lines
        -- still miss (the first in E on a tie); once for single_location, else until done.
        LOOP
            v_best := NULL;
            v_most := 0;
            FOR j IN 1 .. m LOOP
                v_sum := 0;
                FOR i IN 1 .. n LOOP
                    IF v_pin[i] IS NULL THEN
                        v_sum := v_sum + least(v_rem[i], v_units[(i - 1) * m + j]);
                    END IF;
                END LOOP;
                IF v_sum > v_most THEN
                    v_best := j;
                    v_most := v_sum;
                END IF;
            END LOOP;
            EXIT WHEN v_best IS NULL;
            FOR i IN 1 .. n LOOP
                CONTINUE WHEN v_pin[i] IS NOT NULL;
                v_take := least(v_rem[i], v_units[(i - 1) * m + v_best]);
                IF v_take > 0 THEN
                    v_allocs[i] := v_allocs[i] || jsonb_build_object('location_id', p_locations[v_best], 'quantity', v_take);
                    v_rem[i] := v_rem[i] - v_take;
                    v_units[(i - 1) * m + v_best] := v_units[(i - 1) * m + v_best] - v_take;
                END IF;
            END LOOP;
            EXIT WHEN p_strategy = 'single_location';
        END LOOP;
    END IF;

    FOR i IN 1 .. n LOOP
        v_out := v_out || jsonb_build_array(jsonb_build_object(
            'product_id', v_pid[i], 'quantity', (p_lines->(i - 1)->>'quantity')::bigint, 'location_id', v_pin[i],
            'allocations', v_allocs[i], 'shortfall', v_rem[i]));
    END LOOP;
    RETURN v_out;
END $$;
