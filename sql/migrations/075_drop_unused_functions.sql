-- Functions of earlier versions of the procedures, no longer used (they stood at the end of
-- sql/procedures/inventory.sql, dropped again at every re-apply; a migration runs once).
DROP FUNCTION IF EXISTS emit(uuid, text, jsonb);
DROP FUNCTION IF EXISTS event_body(uuid, uuid, text, jsonb);
DROP FUNCTION IF EXISTS move_stock(text, bigint, bigint, text, text, uuid, text, integer);
DROP FUNCTION IF EXISTS release_lines(text, text, uuid);
DROP FUNCTION IF EXISTS lock_order_products(text);
DROP FUNCTION IF EXISTS valid_order_id(text);
