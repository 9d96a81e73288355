-- The one entry point for input events: apply_events() (a batch, in one transaction).

-- Every product an event can change: the lines of an order.placed or stock.transferred, the
-- product_id and items of a stock event, the lines of the order that an order.cancelled,
-- .completed, .fulfilled or .returned acts on. Of a batch of events ({type, data}).
-- apply_events() locks these up front; a duplicate returns their figures. A set-returning SQL
-- function that PostgreSQL inlines where it is called in FROM (STABLE, not STRICT).
CREATE OR REPLACE FUNCTION named_products(p_events jsonb) RETURNS SETOF text
LANGUAGE sql STABLE AS $$
    SELECT x->>'product_id' FROM jsonb_array_elements(p_events) ev, jsonb_array_elements(ev->'data'->'lines') x
     WHERE ev->>'type' = 'order.placed'
    UNION SELECT ev->'data'->>'product_id' FROM jsonb_array_elements(p_events) ev
     WHERE ev->>'type' IN ('stock.adjusted', 'stock.moved', 'stock.received', 'product.configured')
    UNION SELECT x->>'product_id' FROM jsonb_array_elements(p_events) ev,
                 jsonb_array_elements(CASE WHEN ev->>'type' = 'stock.transferred' THEN ev->'data'->'lines'
                                           ELSE ev->'data'->'items' END) x
     WHERE ev->>'type' IN ('stock.adjusted', 'stock.received', 'stock.transferred')
    UNION SELECT ol.product_id FROM order_lines ol  -- = ANY(ARRAY(..)): index, not a scan
     WHERE ol.order_id = ANY(ARRAY(SELECT ev->'data'->>'order_id' FROM jsonb_array_elements(p_events) ev
                                    WHERE ev->>'type' IN ('order.cancelled', 'order.completed',
                                                          'order.fulfilled', 'order.returned')))
$$;

-- Current figures of every product an event names: what a duplicate returns, so that a
-- redelivery after a crash between commit and cache write still refreshes the cache. Named,
-- not looked up in the ledger by event id: every ledger row an event writes is for a product
-- it names, and an index of the ledger on the producers' random event ids, kept for this
-- lookup only, cost every ledger row an entry on a random page (migration 096).
DROP FUNCTION IF EXISTS touched_figures(uuid, jsonb);
CREATE OR REPLACE FUNCTION touched_figures(p_type text, p_data jsonb) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT coalesce(jsonb_agg(product_figures(p) ORDER BY p.product_id), '[]'::jsonb)
      FROM products p
     -- = ANY(ARRAY(...)): primary-key lookups. The planner turned IN (subquery) into a scan
     -- of every product for every event.
     WHERE p.product_id = ANY(ARRAY(SELECT n FROM named_products(jsonb_build_array(
                                        jsonb_build_object('type', p_type, 'data', p_data))) n)));
END $$;

-- The one entry point for input events: many events ({id, type, data}) in one transaction,
-- applied in the order given, each at most once ever (by id).
-- Returns one result per event: {outcome, messages: [to publish], products: [figures after]}.
-- An id met again with the same content is a 'duplicate' (changes nothing); with another type
-- or data it is 'id_reused' (changes nothing, recorded nowhere: the worker dead-letters it).
-- p_options: worker settings some events need ({backorder_fill_batch,
-- max_reservation_lifetime_seconds}); a key
-- left out takes its default.
DROP FUNCTION IF EXISTS apply_events(jsonb, integer);
CREATE OR REPLACE FUNCTION apply_events(p_events jsonb, p_default_ttl integer DEFAULT 900,
                                        p_options jsonb DEFAULT '{}') RETURNS jsonb
LANGUAGE plpgsql SET enable_seqscan = off SET jit = off AS $$
DECLARE
    v_bad      record;
    v_fresh    boolean[];
    v_reused   boolean[];
    v_event_digests uuid[];
    v_event_ids   uuid[];
    v_event_types text[];
    v_event_data  jsonb[];
    i          integer := 1;
    j          integer;
    v_run      jsonb[];
    v_one_by_one_until integer := 0;
    v_result   jsonb;
    -- A jsonb[] grows in place; `jsonb || jsonb` re-encoded every earlier result on each
    -- append, which made a batch cost quadratic in its size.
    v_results  jsonb[] := '{}';
    v_ids      uuid[] := '{}';
    v_types    text[] := '{}';
    v_outcomes text[] := '{}';
    v_digests  uuid[] := '{}';
    -- Backorder filling after stock changes (backorders.sql): only while some product has
    -- open backorders (an empty partial index: default-only traffic pays one probe a batch).
    v_fill     boolean;
    v_fill_batch integer := coalesce((p_options->>'backorder_fill_batch')::integer, 100);
BEGIN
    -- 1. Every event is checked (checks.sql) before anything is written.
    --    OFFSET 0 keeps the filter out of the inlined function: pushed into it, the filter
    --    held a second copy of the whole CASE, and compiling both, at every batch, was most
    --    of this query's cost (104 against 66 us for one event).
    SELECT ord, problem INTO v_bad FROM (SELECT * FROM event_problems(p_events) OFFSET 0) e
     WHERE problem IS NOT NULL ORDER BY ord LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'invalid event: %', v_bad.problem USING ERRCODE = 'invalid_parameter_value',
            DETAIL = format('event %s of %s in the batch', v_bad.ord, jsonb_array_length(p_events));
    END IF;

    -- 2. Every product the batch can touch, locked in product_id order.
    PERFORM 1 FROM products WHERE product_id = ANY(ARRAY(SELECT n FROM named_products(p_events) n))
     ORDER BY product_id FOR UPDATE;

    v_fill := EXISTS (SELECT 1 FROM products WHERE backordered > 0);

    -- 3. Which events are new: neither applied before nor met earlier in this batch; and of
    --    the others, which carry other content than their id did the first time (compared
    --    with the stored digest, else with the id's first event in this batch; a stored row
    --    from before digests were kept has none: a duplicate, as it always was).
    --    The events' ids, types and data come out as arrays in the same query.
    SELECT array_agg(e.n = 1 AND p.event_id IS NULL ORDER BY e.ord),
           array_agg(coalesce(CASE WHEN p.event_id IS NOT NULL THEN p.digest <> e.digest
                                   ELSE e.first_digest <> e.digest END, false) ORDER BY e.ord),
           array_agg(e.digest ORDER BY e.ord), array_agg(e.id ORDER BY e.ord),
           array_agg(e.type ORDER BY e.ord), array_agg(e.data ORDER BY e.ord)
      INTO v_fresh, v_reused, v_event_digests, v_event_ids, v_event_types, v_event_data
      FROM (SELECT ord, id, type, data, digest, row_number() OVER w AS n, first_value(digest) OVER w AS first_digest
              FROM (SELECT ord, (ev->>'id')::uuid AS id, ev->>'type' AS type, ev->'data' AS data,
                           md5((ev->>'type') || ' ' || (ev->'data')::text)::uuid AS digest
                      FROM jsonb_array_elements(p_events) WITH ORDINALITY AS t(ev, ord)) i
            WINDOW w AS (PARTITION BY id ORDER BY ord)) e
      -- One index probe per event, whatever the statistics: a plan made while the table was
      -- young (a merge join reading its whole index) is kept by the session and grew slower
      -- with every batch until the next ANALYZE.
      LEFT JOIN LATERAL (SELECT pe.event_id, pe.digest FROM processed_events pe
                          WHERE pe.event_id = e.id OFFSET 0) p ON true;

    -- 4. The events, in order; a run of new order.placed (or order.completed) events at once
    --    where place_orders() (or complete_orders()) can take it.
    WHILE i <= coalesce(cardinality(v_event_ids), 0) LOOP
        IF i > v_one_by_one_until AND v_fresh[i] AND v_event_types[i] IN ('order.placed', 'order.completed') THEN
            j := i;
            WHILE j < cardinality(v_event_ids) AND v_fresh[j + 1] AND v_event_types[j + 1] = v_event_types[i] LOOP
                j := j + 1;
            END LOOP;
            v_run := CASE WHEN j = i THEN NULL
                          WHEN v_event_types[i] = 'order.placed'
                          THEN place_orders(v_event_ids[i:j], v_event_data[i:j], p_default_ttl)
                          ELSE complete_orders(v_event_ids[i:j], v_event_data[i:j]) END;
            IF v_run IS NOT NULL THEN
                v_results := v_results || v_run;
                v_ids := v_ids || v_event_ids[i:j];
                v_types := v_types || v_event_types[i:j];
                v_digests := v_digests || v_event_digests[i:j];
                v_outcomes := v_outcomes || ARRAY(SELECT r->>'outcome' FROM unnest(v_run) r);
                i := j + 1;
                CONTINUE;
            END IF;
            v_one_by_one_until := j;
        END IF;
        IF v_fresh[i] THEN
            v_result := CASE v_event_types[i]
                WHEN 'order.placed'    THEN place_order(v_event_ids[i], v_event_data[i], p_default_ttl)
                WHEN 'order.cancelled' THEN cancel_order(v_event_ids[i], v_event_data[i])
                WHEN 'order.completed' THEN complete_order(v_event_ids[i], v_event_data[i])
                WHEN 'stock.adjusted'  THEN adjust_stock(v_event_ids[i], v_event_data[i])
                WHEN 'stock.moved'     THEN move_state(v_event_ids[i], v_event_data[i])
                WHEN 'stock.transferred' THEN transfer_stock(v_event_ids[i], v_event_data[i])
                WHEN 'stock.received'  THEN receive_stock(v_event_ids[i], v_event_data[i])
                WHEN 'location.configured' THEN configure_location(v_event_ids[i], v_event_data[i])
                WHEN 'channel.configured'  THEN configure_channel(v_event_ids[i], v_event_data[i])
                WHEN 'product.configured'  THEN configure_product(v_event_ids[i], v_event_data[i])
                WHEN 'reservation.extended' THEN extend_reservation(v_event_ids[i], v_event_data[i], p_options)
                WHEN 'order.fulfilled' THEN fulfil_order(v_event_ids[i], v_event_data[i])
                WHEN 'order.returned'  THEN return_order(v_event_ids[i], v_event_data[i])
            END;
            IF v_result ? 'backordered' THEN  -- an order backordered: fills may be due from now on
                v_fill := true;
                v_result := v_result - 'backordered';
            END IF;
            IF v_fill AND v_result->'products' <> '[]' THEN
                v_result := fill_after_event(v_event_ids[i], v_result, v_fill_batch);
            END IF;
            v_ids := array_append(v_ids, v_event_ids[i]);
            v_types := array_append(v_types, v_event_types[i]);
            v_digests := array_append(v_digests, v_event_digests[i]);
            v_outcomes := array_append(v_outcomes, v_result->>'outcome');
        ELSIF v_reused[i] THEN
            v_result := jsonb_build_object('outcome', 'id_reused', 'messages', '[]'::jsonb, 'products', '[]'::jsonb);
        ELSE
            -- Changes nothing, but returns the figures: a redelivery after a crash between
            -- commit and cache write must still bring the cache up to date.
            v_result := jsonb_build_object('outcome', 'duplicate', 'messages', '[]'::jsonb,
                                           'products', touched_figures(v_event_types[i], v_event_data[i]));
        END IF;
        v_results := array_append(v_results, v_result);
        i := i + 1;
    END LOOP;

    -- 5. The batch's idempotency keys and outbox rows, one INSERT each. A plain INSERT, not
    --    ON CONFLICT DO NOTHING: that probes the index before every row and writes a second
    --    WAL record per row to confirm it, to handle a race that is rare. The block costs one
    --    subtransaction per batch.
    BEGIN
        INSERT INTO processed_events (event_id, type, outcome, digest)
        SELECT * FROM unnest(v_ids, v_types, v_outcomes, v_digests);
    EXCEPTION WHEN unique_violation THEN
        -- Another transaction applied one of these events after step 3 (a redelivery racing
        -- its original). Undo it all; the worker retries and then finds a duplicate.
        RAISE EXCEPTION 'an event of this batch was applied concurrently' USING ERRCODE = 'serialization_failure';
    END;
    PERFORM write_outbox_of(v_results);
    RETURN to_jsonb(v_results);
END $$;

-- One event on its own (operators, tests): apply_events() with a batch of one.
CREATE OR REPLACE FUNCTION apply_event(p_event_id uuid, p_type text, p_data jsonb,
                                       p_default_ttl integer DEFAULT 900) RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
    RETURN apply_events(jsonb_build_array(jsonb_build_object('id', p_event_id, 'type', p_type, 'data', p_data)),
                        p_default_ttl)->0;
END $$;
