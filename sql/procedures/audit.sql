-- Audit: reads that explain and check the stock figures. Nothing here writes.

-- A product's movements, newest first, each with the figures the ledger gives right after it
-- (the running sum of every movement up to and including it).
CREATE OR REPLACE FUNCTION stock_history(p_product_id text, p_limit integer DEFAULT 50)
RETURNS TABLE (id bigint, occurred_at timestamptz, reason text, on_hand_delta bigint,
               reserved_delta bigint, on_hand_after bigint, reserved_after bigint,
               order_id text, event_id uuid, note text)
LANGUAGE sql STABLE AS $$
    SELECT m.id, m.occurred_at, m.reason, m.on_hand_delta, m.reserved_delta,
           (t.on_hand - coalesce(sum(m.on_hand_delta) OVER newer, 0))::bigint,
           (t.reserved - coalesce(sum(m.reserved_delta) OVER newer, 0))::bigint,
           m.order_id, m.event_id, m.note
      FROM stock_movements m,
           (SELECT coalesce(sum(on_hand_delta), 0) AS on_hand, coalesce(sum(reserved_delta), 0) AS reserved
              FROM stock_movements WHERE product_id = p_product_id) t
     WHERE m.product_id = p_product_id
    WINDOW newer AS (ORDER BY m.id DESC ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
     ORDER BY m.id DESC
     LIMIT p_limit
$$;

-- Every disagreement between a product's figures and what explains them:
--   ledger:       on_hand / reserved vs the sum of the product's movements;
--   reservations: reserved vs the quantities of the orders still holding a reservation.
-- One statement, so one snapshot: safe to run while the worker applies events.
-- (Full scans of stock_movements and order_lines: an operator's check, not a hot path.)
CREATE OR REPLACE FUNCTION stock_mismatches()
RETURNS TABLE (product_id text, figure text, recorded bigint, expected bigint, source text)
LANGUAGE sql STABLE AS $$
    WITH ledger AS (
        SELECT m.product_id, sum(m.on_hand_delta) AS on_hand, sum(m.reserved_delta) AS reserved
          FROM stock_movements m GROUP BY m.product_id
    ), held AS (
        SELECT ol.product_id, sum(ol.quantity) AS reserved
          FROM order_lines ol JOIN orders o USING (order_id)
         WHERE o.status = 'reserved' AND ol.tracked GROUP BY ol.product_id  -- untracked lines hold nothing
    ), checks AS (
        SELECT p.product_id, 'on_hand' AS figure, p.on_hand AS recorded,
               coalesce(l.on_hand, 0)::bigint AS expected, 'ledger' AS source
          FROM products p LEFT JOIN ledger l USING (product_id)
        UNION ALL
        SELECT p.product_id, 'reserved', p.reserved, coalesce(l.reserved, 0)::bigint, 'ledger'
          FROM products p LEFT JOIN ledger l USING (product_id)
        UNION ALL
        SELECT p.product_id, 'reserved', p.reserved, coalesce(h.reserved, 0)::bigint, 'reservations'
          FROM products p LEFT JOIN held h USING (product_id)
    )
    SELECT * FROM checks WHERE recorded IS DISTINCT FROM expected
     ORDER BY product_id, source, figure
$$;
