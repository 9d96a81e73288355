-- Natural key of order.fulfilled: a fulfilment_id is applied once per order, whatever message
-- ids carry it; a refused fulfilment leaves no row (it may be sent again, corrected).
CREATE TABLE fulfilments (
    order_id      text NOT NULL,
    fulfilment_id text NOT NULL CHECK (length(fulfilment_id) BETWEEN 1 AND 200),
    event_id      uuid NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (order_id, fulfilment_id)
);
