-- Natural key of order.returned: a return_id is applied once per order, whatever message ids
-- carry it; a refused return leaves no row.
CREATE TABLE returns (
    order_id   text NOT NULL,
    return_id  text NOT NULL CHECK (length(return_id) BETWEEN 1 AND 200),
    event_id   uuid NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (order_id, return_id)
);
