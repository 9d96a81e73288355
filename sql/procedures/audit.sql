-- Audit: reads that explain and check the stock figures. Nothing here writes.

-- A product's movements, newest first, each with the figures the ledger gives right after it
-- (the running sum of every movement up to and including it: product totals), and where
-- (location_id) and which state quantities it changed.
DROP FUNCTION IF EXISTS stock_history(text, integer);
CREATE FUNCTION stock_history(p_product_id text, p_limit integer DEFAULT 50)
RETURNS TABLE (id bigint, occurred_at timestamptz, reason text, on_hand_delta bigint,
               reserved_delta bigint, on_hand_after bigint, reserved_after bigint,
               order_id text, event_id uuid, note text, location_id text, damaged_delta bigint,
               quality_control_delta bigint, incoming_delta bigint, reference text)
LANGUAGE sql STABLE AS $$
    SELECT m.id, m.occurred_at, m.reason, m.on_hand_delta, m.reserved_delta,
           (t.on_hand - coalesce(sum(m.on_hand_delta) OVER newer, 0))::bigint,
           (t.reserved - coalesce(sum(m.reserved_delta) OVER newer, 0))::bigint,
           m.order_id, m.event_id, m.note, m.location_id, m.damaged_delta, m.quality_control_delta,
           m.incoming_delta, m.reference
      FROM stock_movements m,
           (SELECT coalesce(sum(on_hand_delta), 0) AS on_hand, coalesce(sum(reserved_delta), 0) AS reserved
              FROM stock_movements WHERE product_id = p_product_id) t
     WHERE m.product_id = p_product_id
    WINDOW newer AS (ORDER BY m.id DESC ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
     ORDER BY m.id DESC
     LIMIT p_limit
$$;

-- Every disagreement between a stock figure and what explains it, as (product_id, figure,
-- recorded, expected, source):
--   ledger:       each level figure (on_hand, reserved, damaged, quality_control, incoming) vs
--                 the sum of the product's movements at that location;
--   reservations: each level's reserved vs what open orders hold there (allocation rows; an
--                 order without them holds its tracked lines at `default`);
--   levels:       a multi-location product's totals vs the sums of its levels (its own
--                 safety_stock vs 0: the levels hold it);
--   backordered:  the product's vs the sum of its ledger rows' backordered_delta (ledger) and
--                 vs the backordered units of open orders' lines (backorders).
--   orders:       each line of a live allocated order: quantity vs reserved (its allocations)
--                 + fulfilled + backordered + released; returned vs at most fulfilled; an
--                 allocated line's fulfilled vs its allocations' fulfilled.
-- A default-only product's one level is its products row: its figures are named as they always
-- were (`on_hand`); a level of a multi-location product is named `on_hand at LOCATION`.
-- One statement, so one snapshot: safe to run while the worker applies events.
-- (Full scans of stock_movements, order_lines, stock_levels: an operator's check, not a hot path.)
CREATE OR REPLACE FUNCTION stock_mismatches()
RETURNS TABLE (product_id text, figure text, recorded bigint, expected bigint, source text)
LANGUAGE sql STABLE AS $$
    WITH ledger AS (
        SELECT m.product_id, coalesce(m.location_id, 'default') AS location_id,
               sum(m.on_hand_delta) AS on_hand, sum(m.reserved_delta) AS reserved, sum(m.damaged_delta) AS damaged,
               sum(m.quality_control_delta) AS quality_control, sum(m.incoming_delta) AS incoming
          FROM stock_movements m GROUP BY 1, 2
    ), levels AS (
        SELECT s.product_id, s.location_id, s.on_hand, s.reserved, s.damaged, s.quality_control, s.incoming
          FROM stock_levels s
        UNION ALL
        SELECT p.product_id, 'default', p.on_hand, p.reserved, p.damaged, p.quality_control, p.incoming
          FROM products p WHERE NOT p.multi_location
    ), held AS (
        SELECT h.product_id, h.location_id, sum(h.reserved) AS reserved FROM (
            SELECT ol.product_id, 'default' AS location_id,
                   ol.quantity - ol.fulfilled - ol.released - ol.backordered AS reserved
              FROM order_lines ol JOIN orders o USING (order_id)
             WHERE o.status = 'reserved' AND NOT o.allocated AND ol.tracked
            UNION ALL
            SELECT a.product_id, a.location_id, a.reserved
              FROM order_allocations a JOIN orders o USING (order_id)
             WHERE o.status = 'reserved' AND o.allocated) h
         GROUP BY 1, 2
    ), pairs AS (  -- every level, ledger location and holding location of every product
        SELECT k.product_id, k.location_id, p.multi_location, v.on_hand, v.reserved, v.damaged,
               v.quality_control, v.incoming, l.on_hand AS l_on_hand, l.reserved AS l_reserved,
               l.damaged AS l_damaged, l.quality_control AS l_quality_control, l.incoming AS l_incoming,
               h.reserved AS h_reserved
          FROM (SELECT v.product_id, v.location_id FROM levels v UNION SELECT l.product_id, l.location_id FROM ledger l
                UNION SELECT h.product_id, h.location_id FROM held h) k
          JOIN products p ON p.product_id = k.product_id
          LEFT JOIN levels v ON v.product_id = k.product_id AND v.location_id = k.location_id
          LEFT JOIN ledger l ON l.product_id = k.product_id AND l.location_id = k.location_id
          LEFT JOIN held h ON h.product_id = k.product_id AND h.location_id = k.location_id
    ), sums AS (
        SELECT s.product_id, sum(s.on_hand) AS on_hand, sum(s.reserved) AS reserved, sum(s.damaged) AS damaged,
               sum(s.quality_control) AS quality_control, sum(s.incoming) AS incoming
          FROM stock_levels s GROUP BY 1
    ), lines AS (  -- Part B: every order line with its counters and what its allocations say
        SELECT ol.product_id, ol.order_id, ol.quantity::bigint AS quantity, ol.fulfilled::bigint AS fulfilled,
               ol.returned::bigint AS returned,
               o.status = 'reserved' AND o.allocated AND ol.tracked AS live,
               o.allocated AND ol.tracked AS allocated,
               (coalesce(a.reserved, 0) + ol.fulfilled + ol.backordered + ol.released)::bigint AS accounted,
               coalesce(a.fulfilled, 0)::bigint AS allocations_fulfilled
          FROM order_lines ol JOIN orders o USING (order_id)
          LEFT JOIN (SELECT a.order_id, a.product_id, sum(a.reserved) AS reserved, sum(a.fulfilled) AS fulfilled
                       FROM order_allocations a GROUP BY 1, 2) a USING (order_id, product_id)
    ), checks AS (
        SELECT x.product_id,
               CASE WHEN x.multi_location OR x.location_id <> 'default' THEN f.name || ' at ' || x.location_id
                    ELSE f.name END AS figure,
               coalesce(f.recorded, 0)::bigint AS recorded, coalesce(f.expected, 0)::bigint AS expected, f.source
          FROM pairs x, LATERAL (VALUES
               ('on_hand', x.on_hand, x.l_on_hand, 'ledger'), ('reserved', x.reserved, x.l_reserved, 'ledger'),
               ('damaged', x.damaged, x.l_damaged, 'ledger'),
               ('quality_control', x.quality_control, x.l_quality_control, 'ledger'),
               ('incoming', x.incoming, x.l_incoming, 'ledger'),
               ('reserved', x.reserved, x.h_reserved, 'reservations')) f(name, recorded, expected, source)
        UNION ALL
        SELECT p.product_id, f.name, f.recorded, coalesce(f.expected, 0)::bigint, 'levels'
          FROM products p LEFT JOIN sums s USING (product_id),
               LATERAL (VALUES ('on_hand', p.on_hand, s.on_hand), ('reserved', p.reserved, s.reserved),
                               ('damaged', p.damaged, s.damaged), ('quality_control', p.quality_control, s.quality_control),
                               ('incoming', p.incoming, s.incoming),
                               -- unused once the levels hold the safety stock
                               ('safety_stock', p.safety_stock, 0)) f(name, recorded, expected)
         WHERE p.multi_location
        UNION ALL  -- backordered (product-level): its ledger rows, and what open orders' lines wait for
        SELECT p.product_id, 'backordered', p.backordered, f.expected, f.source
          FROM products p
          LEFT JOIN (SELECT m.product_id, sum(m.backordered_delta) AS units FROM stock_movements m
                      GROUP BY 1) l USING (product_id)
          LEFT JOIN (SELECT ol.product_id, sum(ol.backordered) AS units FROM order_lines ol JOIN orders o USING (order_id)
                      WHERE o.status = 'reserved' GROUP BY 1) b USING (product_id),
               LATERAL (VALUES (coalesce(l.units, 0)::bigint, 'ledger'),
                               (coalesce(b.units, 0)::bigint, 'backorders')) f(expected, source)
        UNION ALL
        -- A live line's units are held, fulfilled, backordered or released (an implicitly held
        -- order keeps no counters: its status implies them); never more returned than fulfilled;
        -- an allocated line's fulfilled units are its allocations' ones.
        SELECT l.product_id, f.name || ' of order ' || l.order_id, f.recorded, f.expected, 'orders'
          FROM lines l,
               LATERAL (VALUES ('quantity', l.quantity, CASE WHEN l.live THEN l.accounted ELSE l.quantity END),
                               ('returned', l.returned, least(l.returned, l.fulfilled)),
                               ('fulfilled', l.fulfilled, CASE WHEN l.allocated THEN l.allocations_fulfilled
                                                               ELSE l.fulfilled END)) f(name, recorded, expected)
    )
    SELECT * FROM checks WHERE recorded IS DISTINCT FROM expected
     ORDER BY product_id, source, figure
$$;
