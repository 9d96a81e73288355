-- Backorders and preorders (Part B): a product's backorder policy and the units it has
-- promised to open orders without stock (product-level, at no location).
-- backordered <= backorder_limit is NOT a CHECK: a limit lowered below the current figure is
-- accepted (headroom 0 until it falls); placement keeps it under the products row lock.
ALTER TABLE products
    ADD COLUMN backordered     bigint NOT NULL DEFAULT 0 CHECK (backordered >= 0),
    ADD COLUMN backorder_mode  text   NOT NULL DEFAULT 'deny' CHECK (backorder_mode IN ('deny', 'allow', 'incoming')),
    ADD COLUMN backorder_limit bigint CHECK (backorder_limit BETWEEN 0 AND 1000000000),
    ADD COLUMN backorder_until timestamptz;

-- The sweeper's fill pass and the fill after a stock change find products with open
-- backorders, and the backordered lines of a product, through these (empty while unused).
CREATE INDEX products_backordered ON products (product_id) WHERE backordered > 0;
CREATE INDEX order_lines_backordered ON order_lines (product_id, order_id) WHERE backordered > 0;
