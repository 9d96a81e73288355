"""A backlog of 100,000 overdue reservations (a worker fleet that was down for a while) drains
in bounded batches while new orders on the same products keep being served.

The backlog is written with SQL in one go, exactly as place_order would have left it: orders,
their lines, products.reserved and a `reserve` ledger row per line.
"""

from __future__ import annotations

import json
import statistics
import time
import uuid

import pika

from inventory_worker.adapters.rabbitmq import declare_topology
from inventory_worker.contract import make_event

from ..private_stack import all_figures, held_by_reservations, ledger_sums, private_settings
from ..support import pg

BACKLOG = 100_000
PRODUCTS = 20

BACKLOG_SQL = """
INSERT INTO products (product_id, on_hand, reserved, version)
    SELECT 'BK-' || g, 1000000, 0, 1 FROM generate_series(1, %(products)s) g;
INSERT INTO stock_movements (product_id, on_hand_delta, reserved_delta, reason, note)
    SELECT 'BK-' || g, 1000000, 0, 'adjust', 'backlog test' FROM generate_series(1, %(products)s) g;
INSERT INTO orders (order_id, status, placed_event_id, expires_at, created_at)
    SELECT 'bk-' || g, 'reserved', gen_random_uuid(),
           now() - interval '10 minutes' + g * interval '1 millisecond', now() - interval '20 minutes'
      FROM generate_series(1, %(orders)s) g;
INSERT INTO order_lines (order_id, product_id, line_no, quantity)
    SELECT 'bk-' || g, 'BK-' || (g %% %(products)s + 1), 1, 1 + g %% 3 FROM generate_series(1, %(orders)s) g;
INSERT INTO stock_movements (product_id, order_id, event_id, on_hand_delta, reserved_delta, reason)
    SELECT ol.product_id, ol.order_id, o.placed_event_id, 0, ol.quantity, 'reserve'
      FROM order_lines ol JOIN orders o USING (order_id);
UPDATE products p SET reserved = s.quantity, version = version + 1
  FROM (SELECT product_id, sum(quantity) AS quantity FROM order_lines GROUP BY product_id) s
 WHERE p.product_id = s.product_id;
ANALYZE products, orders, order_lines;
"""

# The sweeper's candidate query, as expire_reservations() runs it.
CANDIDATES_SQL = (
    "SELECT order_id FROM orders WHERE status = 'reserved' AND expires_at <= now()"
    " ORDER BY expires_at LIMIT 500"
)


def test_backlog_of_100k_expired_reservations_drains_while_orders_flow(settings, start_worker):
    with private_settings(settings, "backlog") as s:
        started = time.monotonic()
        with pg(s) as cur:
            cur.execute(BACKLOG_SQL, {"products": PRODUCTS, "orders": BACKLOG})
            # The sweep finds its batch through the partial index on expires_at: no scan of
            # the orders table, however many finished orders it holds.
            cur.execute("EXPLAIN " + CANDIDATES_SQL)
            plan = "\n".join(r[0] for r in cur.fetchall())
        assert "orders_live_expiry" in plan and "Seq Scan" not in plan, plan
        print(f"backlog of {BACKLOG} written in {time.monotonic() - started:.1f}s")
        skus = [f"BK-{i}" for i in range(1, PRODUCTS + 1)]
        before = all_figures(s, skus)
        lines_scans_before = _order_lines_seq_scans(s)

        conn = pika.BlockingConnection(pika.URLParameters(str(s.rabbitmq.url)))
        ch = conn.channel()
        ch.confirm_delivery()
        declare_topology(ch, s.rabbitmq)
        queue = ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
        ch.queue_bind(queue, s.rabbitmq.events_exchange, routing_key="inventory.reserved")
        try:
            worker_started = time.monotonic()
            start_worker(processes=2, settings_override=s)
            latencies, sweep_xact_ages, placed = [], [], []
            remaining, next_count = BACKLOG, time.monotonic() + 1.0
            deadline = time.monotonic() + 240
            with pg(s) as cur:
                while remaining:
                    assert time.monotonic() < deadline, f"{remaining} reservations still not expired"
                    order = f"live-{uuid.uuid4().hex[:10]}"
                    body = make_event(
                        "order.placed",
                        {
                            "order_id": order,
                            "reservation_ttl_seconds": 600,
                            "lines": [{"product_id": skus[len(placed) % PRODUCTS], "quantity": 1}],
                        },
                    )
                    sent = time.monotonic()
                    ch.basic_publish(
                        s.rabbitmq.exchange,
                        "order.placed",
                        json.dumps(body).encode(),
                        pika.BasicProperties(delivery_mode=2),
                    )
                    placed.append(order)
                    while True:  # its inventory.reserved
                        method, _, raw = ch.basic_get(queue, auto_ack=True)
                        if method is not None and json.loads(raw)["causation_id"] == body["id"]:
                            break
                        assert time.monotonic() - sent < 30, (
                            "an order got no answer while the backlog drained"
                        )
                        if method is None:
                            conn.sleep(0.01)
                    latencies.append(time.monotonic() - sent)
                    time.sleep(max(0.0, 0.1 - latencies[-1]))  # a steady trickle, ~10 orders a second
                    # How long the sweeper's current transaction (and so its locks) has lasted.
                    cur.execute(
                        "SELECT coalesce(max(extract(epoch FROM clock_timestamp() - xact_start)), 0)"
                        "  FROM pg_stat_activity WHERE application_name LIKE 'inventory-worker sweeper%'"
                        "   AND state <> 'idle' AND datname = current_database()"
                    )
                    sweep_xact_ages.append(float(cur.fetchone()[0]))
                    if time.monotonic() >= next_count:  # counting is not free: once a second
                        cur.execute(
                            "SELECT count(*) FROM orders WHERE status = 'reserved' AND order_id LIKE 'bk-%'"
                        )
                        remaining = cur.fetchone()[0]
                        next_count = time.monotonic() + 1.0
                drained = time.monotonic() - worker_started
                cur.execute(
                    "SELECT count(*), count(DISTINCT order_id) FROM stock_movements"
                    " WHERE reason = 'expire' AND order_id LIKE 'bk-%'"
                )
                expire_rows, expired_orders = cur.fetchone()
                cur.execute("SELECT count(*) FROM orders WHERE status = 'expired' AND order_id LIKE 'bk-%'")
                expired_status = cur.fetchone()[0]
                cur.execute("SELECT count(*) FROM outbox WHERE routing_key = 'inventory.expired'")
                expired_events = cur.fetchone()[0]
                cur.execute("SELECT * FROM stock_mismatches()")
                mismatches = cur.fetchall()
        finally:
            conn.close()

        time.sleep(1.0)  # table statistics are flushed within a second
        lines_scans = _order_lines_seq_scans(s) - lines_scans_before
        p50 = statistics.median(latencies)
        p95 = statistics.quantiles(latencies, n=20)[-1] if len(latencies) >= 20 else max(latencies)
        print(f"sequential scans of order_lines while draining: {lines_scans}")
        print(
            f"drained {BACKLOG} in {drained:.1f}s ({BACKLOG / drained:.0f}/s) while {len(placed)} orders flowed;"
            f" order latency p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms;"
            f" longest sweep transaction seen {max(sweep_xact_ages) * 1000:.0f} ms"
        )
        # Every overdue reservation released exactly once, through the ledger and the outbox.
        assert expire_rows == expired_orders == expired_status == expired_events == BACKLOG
        after = all_figures(s, skus)
        assert after == ledger_sums(s, skus)
        assert {p: r for p, (_, r) in after.items()} == held_by_reservations(s, skus)
        assert sum(r for _, r in after.values()) == len(placed)  # only the live orders hold stock
        assert all(after[p][0] == before[p][0] for p in skus)
        assert mismatches == []
        # Each batch looks up its orders' lines by key: no scan of order_lines per batch (there
        # were 200 batches), which would cost more and more as the table grows.
        assert lines_scans < 20, lines_scans
        # Orders were served all along: the sweep never held the products for long.
        assert len(placed) >= 20
        assert p95 < 2.0 and max(latencies) < 5.0, (p95, max(latencies))
        assert max(sweep_xact_ages) < 3.0


def _order_lines_seq_scans(s) -> int:
    with pg(s) as cur:
        cur.execute("SELECT seq_scan FROM pg_stat_user_tables WHERE relname = 'order_lines'")
        return int(cur.fetchone()[0])
