-- Inventory schema. Stock rules live in sql/procedures/; this file holds only the tables.

CREATE TABLE products (
    product_id          text PRIMARY KEY
                        CHECK (product_id ~ '^[A-Za-z0-9._:-]{1,64}$'),
    on_hand             bigint  NOT NULL DEFAULT 0 CHECK (on_hand >= 0),
    reserved            bigint  NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    low_stock_threshold integer NOT NULL DEFAULT 0 CHECK (low_stock_threshold >= 0),
    -- Bumped on every change; the Redis cache never replaces a newer version with an older one.
    version             bigint  NOT NULL DEFAULT 0,
    updated_at          timestamptz NOT NULL DEFAULT now(),
    -- The last line of defence against overselling: whatever a bug upstream does,
    -- PostgreSQL refuses a row where more is reserved than is on hand.
    CONSTRAINT not_oversold CHECK (reserved <= on_hand)
);

-- One row per order that holds or held a reservation, or that was cancelled before it
-- was placed (status 'cancelled', no lines): that tombstone rejects the late order.placed.
CREATE TABLE orders (
    order_id        text PRIMARY KEY CHECK (length(order_id) BETWEEN 1 AND 200),
    status          text NOT NULL
                    CHECK (status IN ('placing', 'reserved', 'committed', 'released', 'expired', 'cancelled')),
    placed_event_id uuid,
    expires_at      timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
-- The expiry sweeper walks only live reservations, oldest deadline first.
CREATE INDEX orders_live_expiry ON orders (expires_at) WHERE status = 'reserved';

CREATE TABLE order_lines (
    order_id   text    NOT NULL REFERENCES orders (order_id),
    product_id text    NOT NULL REFERENCES products (product_id),
    line_no    integer NOT NULL,
    quantity   integer NOT NULL CHECK (quantity BETWEEN 1 AND 1000000),
    PRIMARY KEY (order_id, product_id)
);

-- Idempotency: one row per input message id ever applied.
CREATE TABLE processed_events (
    event_id     uuid PRIMARY KEY,
    type         text NOT NULL,
    outcome      text,
    processed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX processed_events_processed_at ON processed_events (processed_at);

-- Transactional outbox: result events are written in the same transaction as the stock
-- change and published after commit; published_at is set once the broker confirmed.
CREATE TABLE outbox (
    id           bigserial PRIMARY KEY,
    message_id   uuid NOT NULL UNIQUE,
    routing_key  text NOT NULL,
    body         jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;

-- Append-only ledger: every change of on_hand or reserved, in the same transaction.
CREATE TABLE stock_movements (
    id             bigserial PRIMARY KEY,
    product_id     text   NOT NULL REFERENCES products (product_id),
    order_id       text,
    event_id       uuid,
    on_hand_delta  bigint NOT NULL,
    reserved_delta bigint NOT NULL,
    reason         text   NOT NULL CHECK (reason IN ('reserve', 'release', 'commit', 'expire', 'adjust')),
    note           text,
    occurred_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX stock_movements_product ON stock_movements (product_id, id DESC);
CREATE INDEX stock_movements_event ON stock_movements (event_id);

CREATE FUNCTION stock_movements_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'stock_movements is append-only' USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE TRIGGER stock_movements_no_update BEFORE UPDATE OR DELETE ON stock_movements
    FOR EACH ROW EXECUTE FUNCTION stock_movements_append_only();
