-- Location flag flips waiting for the sweeper's re-cache pass (spec 2, location.configured): an
-- (in)activation or a fulfils_orders flip changes the `available` of every product with a level
-- there at once (it is computed), but their cached figures only when the sweeper bumps their
-- version and writes them again, in batches, products in product_id order after `cursor`.
-- was_selling: whether the location counted towards `available` (active AND fulfils_orders) as
-- the products not re-cached yet were last published; event_id: the flip's message (causation
-- of the pass's low_stock / back_in_stock).
CREATE TABLE location_recache (
    location_id  text PRIMARY KEY REFERENCES locations (location_id),
    was_selling  boolean NOT NULL,
    event_id     uuid NOT NULL,
    cursor       text,  -- last product_id re-cached; NULL = none yet
    requested_at timestamptz NOT NULL DEFAULT now()
);

-- The products with a level at a location other than `default`, for the pass.
CREATE INDEX stock_levels_by_location ON stock_levels (location_id, product_id);
