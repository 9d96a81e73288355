"""Runs of orders on scarce stock: place_orders() decides them set-based, exactly as one by one.

A run of new order.placed events in a batch goes through place_orders(), which decides every
order in one pass (reserved, insufficient_stock, duplicate_order, order_cancelled) and writes
what it decided in a few statements. Here the same random sequences (a seeded generator:
single- and multi-line orders over three products with little stock, repeated order ids,
quantities above the stock, exact sell-outs, products at zero, low-stock thresholds being
crossed, cancels before and after placing, restocks) are applied in two fresh databases,
in batches of up to 60 events in one and one event per transaction in the other, and
everything must be equal: each event's result (outbox ids included), the outbox, the ledger,
the orders and their lines, the final figures. Then the races: batches of a flash sale from
several connections at once, and an order stored by another transaction while a run decides.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest

from inventory_worker.adapters.migrations import migrate
from inventory_worker.adapters.postgres import Store, TransientError
from inventory_worker.config import Settings

from ..support import drop_database, pg, uid, wait_for_lock_waiter

PRODUCTS = ["P1", "P2", "P3"]
TTL = 900


@pytest.fixture(scope="module")
def databases(settings: Settings) -> Iterator[tuple[Settings, Settings]]:
    """Two fresh databases: batched, and one event per transaction (same sequences, same ids)."""
    pair = tuple(
        settings.model_copy(
            update={
                "database": settings.database.model_copy(
                    update={"dbname": f"{settings.database.dbname}_{tag}"}
                )
            }
        )
        for tag in ("flash_batched", "flash_single")
    )
    try:
        for s in pair:
            migrate(s.database)
        yield pair  # type: ignore[misc]
    finally:
        for s in pair:
            drop_database(s)


def scenario(rng: random.Random, ns: str) -> list[dict[str, Any]]:
    """One random sequence over products and orders of namespace ns."""
    products = [f"{ns}{p}" for p in PRODUCTS]
    orders = [f"{ns}O{i}" for i in range(rng.choice([4, 8, 30, 100]))]
    ev: list[dict[str, Any]] = []

    def add(type_: str, data: dict[str, Any]) -> None:
        ev.append({"id": str(uuid.uuid4()), "type": type_, "data": data})

    missing = rng.choice(products) if rng.random() < 0.1 else None  # runs naming it: one by one
    for p in products:
        if p != missing:
            data: dict[str, Any] = {"product_id": p, "on_hand": rng.choice([0, 1, 2, 3, 5, 8, 13, 30, 60])}
            if rng.random() < 0.6:
                data["low_stock_threshold"] = rng.choice([0, 1, 2, 4])
            add("stock.adjusted", data)
    for _ in range(rng.randint(5, 80)):
        r = rng.random()
        if r < 0.8:
            picked = rng.sample(products, rng.choice([1, 1, 1, 2, 3]))
            data = {
                "order_id": rng.choice(orders),
                "lines": [{"product_id": p, "quantity": rng.choice([1, 1, 1, 2, 3, 5, 14])} for p in picked],
            }
            if rng.random() < 0.2:
                data["reservation_ttl_seconds"] = rng.choice([60, 3600])
            add("order.placed", data)
        elif r < 0.87:
            add("order.cancelled", {"order_id": rng.choice(orders)})  # maybe before it is placed
        elif r < 0.9:
            add("order.completed", {"order_id": rng.choice(orders)})
        elif r < 0.97:
            data = {"product_id": rng.choice(products), "delta": rng.choice([-2, 0, 1, 3, 10])}
            if rng.random() < 0.5:
                data["low_stock_threshold"] = rng.choice([0, 1, 3])
            add("stock.adjusted", data)
        elif ev:
            ev.append(ev[rng.randrange(len(ev))])  # a redelivery: breaks a run, a duplicate
    return ev


def apply(
    settings: Settings, events: list[dict[str, Any]], sizes: list[int], calls: dict[str, int]
) -> list[Any]:
    """The events in batches of the given sizes (in turn); adds up the calls of the functions in calls."""
    results: list[Any] = []
    count = "SELECT f, coalesce(pg_stat_get_xact_function_calls(f::regproc), 0) FROM unnest(%s) f"
    with pg(settings) as cur:
        i = 0
        while i < len(events):
            batch = events[i : i + sizes[len(results) % len(sizes)]]
            # (the counts may include earlier transactions' not yet reported: take the difference)
            cur.execute("BEGIN; SET LOCAL track_functions = 'all'")
            cur.execute(count, (list(calls),))
            before = dict(cur.fetchall())
            cur.execute("SELECT apply_events(%s::jsonb, %s)", (json.dumps(batch), TTL))
            results.extend(cur.fetchone()[0])
            cur.execute(count, (list(calls),))
            for f, c in cur.fetchall():
                calls[f] += c - before[f]
            cur.execute("COMMIT")
            i += len(batch)
    return results


def volatile_out(value: Any) -> Any:
    """Random message ids and clocks out; everything else (outbox ids too) must be equal."""
    if isinstance(value, dict):
        return {
            k: volatile_out(v)
            for k, v in value.items()
            if k not in ("id", "message_id", "occurred_at", "expires_at")
        }
    if isinstance(value, list):
        return [volatile_out(v) for v in value]
    return value


def state(settings: Settings, ns: str, ids: list[str]) -> dict[str, Any]:
    with pg(settings) as cur:
        cur.execute(
            "SELECT product_figures(p), p.low_stock_threshold FROM products p"
            " WHERE product_id LIKE %s ORDER BY product_id",
            (ns + "%",),
        )
        figures = cur.fetchall()
        cur.execute(
            "SELECT id, product_id, location_id, order_id, event_id::text, on_hand_delta, reserved_delta,"
            "       reason, note FROM stock_movements WHERE product_id LIKE %s ORDER BY id",
            (ns + "%",),
        )
        ledger = cur.fetchall()
        cur.execute(
            "SELECT order_id, status, placed_event_id::text, extract(epoch FROM expires_at - created_at),"
            "       channel_id, allocated FROM orders WHERE order_id LIKE %s ORDER BY order_id",
            (ns + "%",),
        )
        orders = cur.fetchall()
        cur.execute(
            "SELECT order_id, product_id, line_no, quantity, tracked, backordered FROM order_lines"
            " WHERE order_id LIKE %s ORDER BY order_id, product_id",
            (ns + "%",),
        )
        lines = cur.fetchall()
        cur.execute(
            "SELECT id, routing_key, body FROM outbox WHERE body->>'causation_id' = ANY(%s) ORDER BY id",
            (ids,),
        )
        outbox = [(i, k, volatile_out(b)) for i, k, b in cur.fetchall()]
        cur.execute("SELECT count(*) FROM products WHERE reserved > on_hand")
        oversold = cur.fetchone()[0]
    return {
        "figures": figures,
        "ledger": ledger,
        "orders": orders,
        "lines": lines,
        "outbox": outbox,
        "oversold": oversold,
    }


def test_runs_on_scarce_stock_give_what_one_by_one_gives(databases: tuple[Settings, Settings]) -> None:
    batched, single = databases
    rng = random.Random(20261130)
    rejected = reserved = placed = 0
    calls = {"place_orders": 0, "place_order": 0}
    for n in range(150):
        ns = f"f{n}-"
        events = scenario(rng, ns)
        ids = sorted({e["id"] for e in events})
        sizes = [rng.choice([3, 10, 30, 60]) for _ in range(4)]
        got = apply(batched, events, sizes, calls)
        want = apply(single, events, [1], {"place_order": 0})
        assert len(got) == len(events)  # every order answered
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert volatile_out(g) == volatile_out(w), f"scenario {n}, event {i}: {events[i]}"
        after = state(batched, ns, ids)
        assert after == state(single, ns, ids), f"scenario {n}"
        assert after["oversold"] == 0
        rejected += sum(r["outcome"] == "rejected" for r in got)
        reserved += sum(r["outcome"] == "reserved" for r in got)
        placed += sum(e["type"] == "order.placed" for e in events)
    # the sequences did what they are for: many orders reserved and many rejected, most of
    # them decided by place_orders() (runs of one, and runs naming a missing product, are not)
    assert reserved > 800 and rejected > 1500, (reserved, rejected)
    assert calls["place_orders"] > 500 and calls["place_order"] < placed / 5, (calls, placed)


def test_a_flash_sale_sells_out_exactly_in_one_set_based_run(settings: Settings) -> None:
    """One product, stock for a third of the orders: the batch is one place_orders() call
    (place_order() never), exactly the stock is sold, every order is answered, the rest
    rejected with the `available` left at its turn (0 once sold out), low_stock crossed once."""
    ns = f"fs{uuid.uuid4().hex[:8]}-"
    product = f"{ns}SKU"
    with pg(settings) as cur:
        cur.execute(
            "SELECT apply_event(gen_random_uuid(), 'stock.adjusted', %s::jsonb)",
            (json.dumps({"product_id": product, "on_hand": 31, "low_stock_threshold": 5}),),
        )
    # 90 orders: 1 to 3 units each, asking for more than the 31 units there are
    qty = [1 + i % 3 for i in range(90)]
    events = [
        {
            "id": str(uuid.uuid4()),
            "type": "order.placed",
            "data": {"order_id": f"{ns}O{i}", "lines": [{"product_id": product, "quantity": q}]},
        }
        for i, q in enumerate(qty)
    ]
    with pg(settings) as cur:
        cur.execute("BEGIN; SET LOCAL track_functions = 'all'")
        cur.execute("SELECT apply_events(%s::jsonb)", (json.dumps(events),))
        results = cur.fetchone()[0]
        cur.execute(
            "SELECT f, coalesce(pg_stat_get_xact_function_calls(f::regproc), 0) FROM unnest(%s) f",
            (["place_orders", "place_order"],),
        )
        assert dict(cur.fetchall()) == {"place_orders": 1, "place_order": 0}
        cur.execute("COMMIT")
        cur.execute("SELECT on_hand, reserved, version FROM products WHERE product_id = %s", (product,))
        assert cur.fetchone() == (31, 31, 1 + sum(r["outcome"] == "reserved" for r in results))
    assert len(results) == 90
    # as one by one: each order takes what it asks while the stock lasts
    left, expected = 31, []
    for q in qty:
        expected.append(("reserved", left - q) if q <= left else ("rejected", left))
        left -= q if q <= left else 0
    got = [
        (r["outcome"], r["products"][0]["available"])
        if r["outcome"] == "reserved"
        else (r["outcome"], r["messages"][0]["body"]["data"]["shortages"][0]["available"])
        for r in results
    ]
    assert got == expected
    assert left == 0  # sold out exactly
    assert all(
        r["messages"][0]["body"]["data"]["reason"] == "insufficient_stock"
        for r in results
        if r["outcome"] == "rejected"
    )
    low = [
        m["body"]["data"] for r in results for m in r["messages"] if m["routing_key"] == "inventory.low_stock"
    ]
    assert len(low) == 1 and low[0]["threshold"] == 5 and low[0]["available"] <= 5


def placed(order_id: str, product: str, quantity: int) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "type": "order.placed",
        "data": {"order_id": order_id, "lines": [{"product_id": product, "quantity": quantity}]},
    }


def test_racing_batches_of_a_flash_sale_sell_out_exactly(settings: Settings) -> None:
    """Four connections send batches of 10 orders for one product at once (retrying what
    PostgreSQL calls transient, as the consumer does): every order is answered once, exactly
    the stock is sold, the books agree, low_stock is crossed once."""
    product = uid("FLASH")
    with pg(settings) as cur:
        cur.execute(
            "SELECT apply_event(gen_random_uuid(), 'stock.adjusted', %s::jsonb)",
            (json.dumps({"product_id": product, "on_hand": 50, "low_stock_threshold": 3}),),
        )
    rng = random.Random(7)
    jobs = [
        [[placed(uid("FO"), product, rng.choice([1, 2])) for _ in range(10)] for _ in range(5)]
        for _ in range(4)
    ]
    results: dict[str, Any] = {}
    errors: list[BaseException] = []

    def racer(batches: list[list[dict[str, Any]]]) -> None:
        store = Store(settings.database)
        try:
            for batch in batches:
                while True:
                    try:
                        outcomes = store.apply_batch(batch)
                        break
                    except TransientError:
                        time.sleep(rng.uniform(0.01, 0.05))
                for e, o in zip(batch, outcomes, strict=True):
                    assert e["id"] not in results
                    results[e["id"]] = (e, o)
        except BaseException as exc:  # the test fails with it below
            errors.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=racer, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [] and not any(t.is_alive() for t in threads)
    assert len(results) == 200  # every order answered
    sold = sum(e["data"]["lines"][0]["quantity"] for e, o in results.values() if o.outcome == "reserved")
    assert sold == 50  # sold out exactly: the orders ask for more than twice the stock
    assert {o.outcome for _, o in results.values()} == {"reserved", "rejected"}
    for e, o in results.values():
        if o.outcome == "rejected":  # what was left at its turn was too little
            [short] = o.messages[0].body["data"]["shortages"]
            assert short["available"] < short["requested"] == e["data"]["lines"][0]["quantity"]
    low = [
        m.body["data"]
        for _, o in results.values()
        for m in o.messages
        if m.routing_key == "inventory.low_stock"
    ]
    assert len(low) == 1 and low[0]["available"] <= 3
    with pg(settings) as cur:
        cur.execute("SELECT on_hand, reserved, version FROM products WHERE product_id = %s", (product,))
        assert cur.fetchone() == (50, 50, 1 + sum(o.outcome == "reserved" for _, o in results.values()))
        cur.execute(
            "SELECT sum(reserved_delta), count(*) FROM stock_movements WHERE product_id = %s AND reason = 'reserve'",
            (product,),
        )
        assert cur.fetchone() == (50, sum(o.outcome == "reserved" for _, o in results.values()))
        cur.execute(
            "SELECT coalesce(sum(quantity), 0) FROM order_lines ol JOIN orders o USING (order_id)"
            " WHERE ol.product_id = %s AND o.status = 'reserved'",
            (product,),
        )
        assert cur.fetchone()[0] == 50


def test_an_order_stored_meanwhile_by_another_transaction_makes_the_run_retry(settings: Settings) -> None:
    """A run decides an order new, but another transaction (placing it on another product)
    stores it before the run writes: the run rolls back with a serialization failure, and
    applied again (the worker retries transient errors) the order is a duplicate_order and the
    run's other order is reserved, as one by one would have answered after waiting."""
    p, q, order, other = uid("RP"), uid("RQ"), uid("RO"), uid("RO")
    with pg(settings) as cur:
        for product in (p, q):
            cur.execute(
                "SELECT apply_event(gen_random_uuid(), 'stock.adjusted', %s::jsonb)",
                (json.dumps({"product_id": product, "on_hand": 5}),),
            )
    first = psycopg2.connect(**settings.database.dsn())
    second = Store(settings.database)
    run = [placed(order, p, 1), placed(other, p, 1)]
    try:
        with first.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            first_pid = cur.fetchone()[0]
            cur.execute("SELECT apply_events(%s::jsonb)", (json.dumps([placed(order, q, 2)]),))
            assert cur.fetchone()[0][0]["outcome"] == "reserved"
        errors: list[Exception] = []

        def second_run() -> None:
            try:
                second.apply_batch(run)
            except Exception as exc:  # the assertion is below
                errors.append(exc)

        t = threading.Thread(target=second_run)
        t.start()
        wait_for_lock_waiter(settings, first_pid)  # the run waits on the order's row
        first.commit()
        t.join(30)
        assert len(errors) == 1 and isinstance(errors[0], TransientError), errors
        assert "SerializationFailure" in str(errors[0])
        again = second.apply_batch(run)  # the worker's retry
        assert [(o.outcome, o.detail.get("status")) for o in again] == [
            ("duplicate_order", "reserved"),
            ("reserved", None),
        ]
        with pg(settings) as cur:
            cur.execute(
                "SELECT product_id, reserved FROM products WHERE product_id = ANY(%s) ORDER BY 1", ([p, q],)
            )
            assert cur.fetchall() == sorted([(p, 1), (q, 2)])
    finally:
        first.close()
        second.close()
