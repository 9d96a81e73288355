-- The ledger's index on event_id served one query: the figures a duplicate event returns,
-- which now come from the products the event names (touched_figures() in events.sql). On the
-- producers' random event ids, every ledger row dirtied a random page of it: one index entry,
-- WAL record and, after a checkpoint, full-page image more per order line.
DROP INDEX IF EXISTS stock_movements_event;
