-- order_lines_json() is no longer called: the expiry lists what it released
-- (expired_lines() in sql/procedures/expiry.sql) instead of the lines as placed.
DROP FUNCTION IF EXISTS order_lines_json(text);
