"""Reservations expire on their own, end to end: RabbitMQ in, the elected sweeper, RabbitMQ out."""

from __future__ import annotations

import json
import random
import time
import uuid

from ..private_stack import all_figures, held_by_reservations, ledger_sums
from ..support import http_get, pg, poll, uid


def _poll(predicate, timeout=15.0, what="condition"):
    return poll(predicate, timeout, 0.1, what)


def test_reservation_expires_after_its_ttl(worker, bus, settings):
    a, b = uid("EXP"), uid("EXP")
    for sku in (a, b):
        bus.wait_result(
            bus.publish("stock.adjusted", {"product_id": sku, "on_hand": 10})["id"], "inventory.adjusted"
        )
    order, keeper = uid("o"), uid("o")
    lines = [{"product_id": b, "quantity": 2}, {"product_id": a, "quantity": 3}]
    placed = bus.publish("order.placed", {"order_id": order, "lines": lines, "reservation_ttl_seconds": 1})
    kept = bus.publish(
        "order.placed",
        {"order_id": keeper, "lines": [{"product_id": a, "quantity": 1}], "reservation_ttl_seconds": 120},
    )
    reserved = bus.wait_result(placed["id"], "inventory.reserved")
    bus.wait_result(kept["id"], "inventory.reserved")

    expired = bus.wait_result(placed["id"], "inventory.expired", timeout=20)
    assert expired["causation_id"] == placed["id"]
    assert expired["data"] == {
        "order_id": order,
        "lines": lines,
        "expired_at": reserved["data"]["expires_at"],
    }
    props = bus.result_props[bus.results.index(expired)]
    assert props.message_id == expired["id"] and props.type == "inventory.expired"
    assert [r["type"] for r in bus.results_for(placed["id"])].count("inventory.expired") == 1

    assert all_figures(settings, [a, b]) == {a: (10, 1), b: (10, 0)}
    assert ledger_sums(settings, [a, b]) == {a: (10, 1), b: (10, 0)}
    with pg(settings) as cur:
        # By PostgreSQL's clock: never before the deadline, and within about one sweep interval.
        cur.execute(
            "SELECT extract(epoch FROM m.occurred_at - o.expires_at), o.status"
            "  FROM stock_movements m JOIN orders o USING (order_id)"
            " WHERE m.reason = 'expire' AND m.order_id = %s",
            (order,),
        )
        rows = cur.fetchall()
        cur.execute("SELECT status FROM orders WHERE order_id = %s", (keeper,))
        assert cur.fetchone()[0] == "reserved"  # a longer TTL is left alone
    assert len(rows) == 2 and all(status == "expired" for _, status in rows)
    lag = float(rows[0][0])
    assert 0 <= lag < settings.worker.sweep_interval_seconds + 2.0, lag

    # The cache follows: the endpoint serves the released figures.
    def served():
        status, _, raw = http_get(f"{worker.base_url}/inventory/{a}")
        return status == 200 and json.loads(raw)["available"] == 9

    _poll(served, what="the cache to show the released stock")

    # Completion after expiry, stock still there: taken again and committed in one step.
    done = bus.publish("order.completed", {"order_id": order})
    committed = bus.wait_result(done["id"])
    assert committed["type"] == "inventory.committed"
    assert committed["data"] == {"order_id": order, "lines": lines}
    assert all_figures(settings, [a, b]) == {a: (7, 1), b: (8, 0)} == ledger_sums(settings, [a, b])
    # Cancelling it now changes nothing.
    cancel = bus.publish("order.cancelled", {"order_id": order})
    _poll(lambda: _processed(settings, cancel["id"]), what="the cancellation")
    assert bus.results_for(cancel["id"]) == []
    assert all_figures(settings, [a, b]) == {a: (7, 1), b: (8, 0)}


def _processed(settings, event_id):
    with pg(settings) as cur:
        cur.execute("SELECT outcome FROM processed_events WHERE event_id = %s", (event_id,))
        row = cur.fetchone()
    return row is not None and row[0] is not None


def test_ledger_sums_equal_the_figures_after_a_random_mix(worker, bus, settings):
    """Every event type, duplicates, cancel-before-place, completions before and after expiry,
    counts and corrections (some refused): the ledger explains every figure afterwards."""
    rng = random.Random(int(uuid.uuid4()) % 2**32)
    skus = [uid("MIX") for _ in range(4)]
    orders: list[str] = []
    sent: list[dict] = []

    def send(type_, data, event_id=None):
        sent.append(bus.publish(type_, data, event_id))
        return sent[-1]

    for sku in skus:
        send("stock.adjusted", {"product_id": sku, "on_hand": rng.randint(5, 20), "low_stock_threshold": 3})
    with pg(settings) as cur:  # the products exist before any order names them

        def stocked():
            cur.execute("SELECT count(*) FROM products WHERE product_id = ANY(%s)", (skus,))
            return cur.fetchone()[0] == len(skus)

        _poll(stocked, timeout=30, what="the products to exist")
    # One reservation nobody completes or cancels: whatever the random mix, one expiry happens.
    sentinel = uid("o")
    send(
        "order.placed",
        {
            "order_id": sentinel,
            "lines": [{"product_id": skus[0], "quantity": 1}],
            "reservation_ttl_seconds": 1,
        },
    )
    for _ in range(160):
        roll = rng.random()
        if roll < 0.35 or not orders:
            order = uid("o")
            orders.append(order)
            chosen = rng.sample(skus, rng.randint(1, 3))
            send(
                "order.placed",
                {
                    "order_id": order,
                    "lines": [{"product_id": p, "quantity": rng.randint(1, 4)} for p in chosen],
                    "reservation_ttl_seconds": rng.choice([1, 1, 2, 60]),
                },
            )
        elif roll < 0.5:
            send("order.cancelled", {"order_id": rng.choice(orders + [uid("o")])})
        elif roll < 0.65:
            send("order.completed", {"order_id": rng.choice(orders)})
        elif roll < 0.8:
            data = {"delta": rng.randint(-6, 8)} if rng.random() < 0.6 else {"on_hand": rng.randint(0, 25)}
            send("stock.adjusted", {"product_id": rng.choice(skus), **data})
        elif roll < 0.94:
            again = rng.choice(sent)  # a redelivery: the same id again
            send(again["type"], again["data"], again["id"])
        else:
            time.sleep(rng.choice([0.2, 0.5]))  # let some reservations run out mid-stream
    ids = list({e["id"] for e in sent})
    with pg(settings) as cur:

        def all_processed():
            cur.execute(
                "SELECT count(*) FROM processed_events WHERE event_id = ANY(%s::uuid[])"
                " AND outcome IS NOT NULL",
                (ids,),
            )
            return cur.fetchone()[0] == len(ids)

        _poll(all_processed, timeout=60, what="every event to be applied")

        def nothing_due():
            cur.execute(
                "SELECT count(*) FROM orders WHERE order_id = ANY(%s) AND status = 'reserved'"
                " AND expires_at <= now()",
                (orders + [sentinel],),
            )
            return cur.fetchone()[0] == 0

        _poll(nothing_due, timeout=20, what="the due reservations to expire")
        cur.execute("SELECT DISTINCT reason FROM stock_movements WHERE product_id = ANY(%s)", (skus,))
        reasons = {r[0] for r in cur.fetchall()}
        cur.execute("SELECT * FROM stock_mismatches() WHERE product_id = ANY(%s)", (skus,))
        mismatches = cur.fetchall()
    assert {"adjust", "reserve", "expire"} <= reasons, reasons
    figures = all_figures(settings, skus)
    assert figures == ledger_sums(settings, skus)
    assert {p: r for p, (_, r) in figures.items()} == held_by_reservations(settings, skus)
    assert mismatches == []
