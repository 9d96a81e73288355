-- Stock across locations (Part A; room left for Part B's backorders, fulfilments, returns).
--
-- Representation (keeps default-only traffic as fast as before): a product whose only level
-- is `default` (multi_location = false) keeps that level in its products row. The first time
-- it gets a level anywhere else, stock_levels receives a `default` row holding the products
-- row's figures plus the new level, multi_location becomes true, and from then on
-- stock_levels holds every level while the products row holds the totals (safety_stock 0,
-- unused). Never converted back. Every level satisfies the CHECKs, so the totals do too.
-- Adding a column with a constant default is metadata-only: this stays fast on big tables
-- (the CHECKs re-added below scan products and stock_movements once).

CREATE TABLE locations (
    location_id    text PRIMARY KEY CHECK (location_id ~ '^[A-Za-z0-9._:-]{1,64}$'),
    name           text CHECK (length(name) <= 200),
    priority       integer NOT NULL DEFAULT 0 CHECK (priority BETWEEN -1000000 AND 1000000),
    active         boolean NOT NULL DEFAULT true,
    fulfils_orders boolean NOT NULL DEFAULT true,
    updated_at     timestamptz NOT NULL DEFAULT now()
);
INSERT INTO locations (location_id) VALUES ('default');

-- locations NULL: every active, order-fulfilling location by (priority, location_id). Never
-- set for `default` (the contract refuses it).
CREATE TABLE channels (
    channel_id text PRIMARY KEY CHECK (channel_id ~ '^[A-Za-z0-9._:-]{1,64}$'),
    strategy   text NOT NULL DEFAULT 'priority'
               CHECK (strategy IN ('priority', 'most_available', 'fewest_locations', 'single_location')),
    locations  text[] CHECK (cardinality(locations) BETWEEN 1 AND 100),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT default_has_no_locations CHECK (channel_id <> 'default' OR locations IS NULL)
);
INSERT INTO channels (channel_id) VALUES ('default');

ALTER TABLE products
    ADD COLUMN damaged         bigint  NOT NULL DEFAULT 0 CHECK (damaged >= 0),
    ADD COLUMN quality_control bigint  NOT NULL DEFAULT 0 CHECK (quality_control >= 0),
    ADD COLUMN incoming        bigint  NOT NULL DEFAULT 0 CHECK (incoming >= 0),
    ADD COLUMN safety_stock    bigint  NOT NULL DEFAULT 0 CHECK (safety_stock >= 0),
    ADD COLUMN tracked         boolean NOT NULL DEFAULT true,
    ADD COLUMN max_per_order   integer CHECK (max_per_order BETWEEN 1 AND 1000000),
    ADD COLUMN multi_location  boolean NOT NULL DEFAULT false,
    -- Reserved units must be sellable ones (on hand, neither damaged nor in quality control).
    DROP CONSTRAINT not_oversold,
    ADD CONSTRAINT not_oversold CHECK (reserved <= on_hand - damaged - quality_control),
    ADD CONSTRAINT unsellable_within_on_hand CHECK (damaged + quality_control <= on_hand);

-- The levels of multi-location products (all of them, `default` included); see above.
CREATE TABLE stock_levels (
    product_id      text   NOT NULL REFERENCES products (product_id),
    location_id     text   NOT NULL REFERENCES locations (location_id),
    on_hand         bigint NOT NULL DEFAULT 0 CHECK (on_hand >= 0),
    reserved        bigint NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    damaged         bigint NOT NULL DEFAULT 0 CHECK (damaged >= 0),
    quality_control bigint NOT NULL DEFAULT 0 CHECK (quality_control >= 0),
    incoming        bigint NOT NULL DEFAULT 0 CHECK (incoming >= 0),
    safety_stock    bigint NOT NULL DEFAULT 0 CHECK (safety_stock >= 0),
    PRIMARY KEY (product_id, location_id),
    -- The last line of defence against overselling, at every level.
    CONSTRAINT not_oversold CHECK (reserved <= on_hand - damaged - quality_control),
    CONSTRAINT unsellable_within_on_hand CHECK (damaged + quality_control <= on_hand)
);
-- Products with a level at a location (the sweeper's recompute after a location flag flips).
CREATE INDEX stock_levels_location ON stock_levels (location_id);

-- channel_id NULL = channel `default`. allocated = false: every tracked line is held whole at
-- `default` (no order_allocations rows: the default-only fast path writes none).
ALTER TABLE orders
    ADD COLUMN channel_id text,
    ADD COLUMN allocated  boolean NOT NULL DEFAULT false;

-- Per-line counters (Part B fills backordered and returned); an untracked line holds nothing.
ALTER TABLE order_lines
    ADD COLUMN backordered integer NOT NULL DEFAULT 0 CHECK (backordered >= 0),
    ADD COLUMN fulfilled   integer NOT NULL DEFAULT 0 CHECK (fulfilled >= 0),
    ADD COLUMN released    integer NOT NULL DEFAULT 0 CHECK (released >= 0),
    ADD COLUMN returned    integer NOT NULL DEFAULT 0 CHECK (returned >= 0),
    ADD COLUMN tracked     boolean NOT NULL DEFAULT true;
UPDATE order_lines ol SET fulfilled = ol.quantity
  FROM orders o WHERE o.order_id = ol.order_id AND o.status = 'committed';
UPDATE order_lines ol SET released = ol.quantity
  FROM orders o WHERE o.order_id = ol.order_id AND o.status IN ('released', 'expired');

-- Where an allocated order's units are held, per (order, product, location); position = the
-- allocation order (a partial cancel releases the last first).
CREATE TABLE order_allocations (
    order_id    text    NOT NULL,
    product_id  text    NOT NULL,
    location_id text    NOT NULL,
    position    integer NOT NULL,
    reserved    bigint  NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    fulfilled   bigint  NOT NULL DEFAULT 0 CHECK (fulfilled >= 0),
    returned    bigint  NOT NULL DEFAULT 0 CHECK (returned >= 0),
    PRIMARY KEY (order_id, product_id, location_id)
);
CREATE INDEX order_allocations_product ON order_allocations (product_id, location_id);

-- Ledger: where, and the state quantities. location_id NULL is left for Part B's
-- product-level backorder rows; existing rows read as `default`.
ALTER TABLE stock_movements
    ADD COLUMN location_id           text DEFAULT 'default',
    ADD COLUMN damaged_delta         bigint NOT NULL DEFAULT 0,
    ADD COLUMN quality_control_delta bigint NOT NULL DEFAULT 0,
    ADD COLUMN incoming_delta        bigint NOT NULL DEFAULT 0,
    ADD COLUMN backordered_delta     bigint NOT NULL DEFAULT 0,
    ADD COLUMN reference             text,
    DROP CONSTRAINT stock_movements_reason_check,
    ADD CONSTRAINT stock_movements_reason_check CHECK (reason IN (
        'reserve', 'release', 'commit', 'expire', 'adjust', 'move', 'transfer', 'receive',
        'fulfil', 'return', 'backorder', 'backorder_fill'));

-- Natural key of stock.transferred: a transfer_id applied once, whatever message ids carry it.
CREATE TABLE transfers (
    transfer_id text PRIMARY KEY CHECK (length(transfer_id) BETWEEN 1 AND 200),
    event_id    uuid NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
