"""The elected sweeper's backorder fill pass is fair across products (spec 4.3): with more
candidate products than one pass takes (`worker.sweep_batch_size`), products whose backorders
cannot be filled (their stock only at locations outside the orders' channel) do not keep the
others waiting: every product is reached within ceil(candidates / batch) ticks of the real
Maintenance duties, and within a product the oldest order is filled first.

Each test has a database of its own: the pass looks at every product of the database.
"""

from __future__ import annotations

import math
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from inventory_worker import bootstrap
from inventory_worker.adapters.postgres import Store
from inventory_worker.config import Settings
from inventory_worker.contract import validate_output

from ..private_stack import private_settings
from ..support import Bus, pg
from .test_locations_orders import Db

BATCH = 2  # products per fill pass


@pytest.fixture
def stack(settings: Settings) -> Iterator[tuple[Settings, Db, Bus]]:
    with private_settings(settings, "fairfill") as s:
        s = s.model_copy(update={"worker": s.worker.model_copy(update={"sweep_batch_size": BATCH})})
        store = Store(s.database, s.worker.default_reservation_ttl_seconds)
        bus = Bus(s)  # declares the exchanges the sweeper publishes to, and listens there
        try:
            yield s, Db(s, store), bus
        finally:
            bus.close()
            store.close()


def configure(db: Db, pid: str) -> None:
    out = db.one("product.configured", {"product_id": pid, "backorder": {"mode": "allow"}})
    assert out.outcome == "configured", out
    db.products.add(pid)


def backordered(s: Settings, pids: list[str]) -> dict[str, int]:
    with pg(s) as cur:
        cur.execute("SELECT product_id, backordered FROM products WHERE product_id = ANY(%s)", (pids,))
        return dict(cur.fetchall())


def test_products_waiting_beyond_one_pass_are_all_filled_in_bounded_ticks(stack):
    s, db, bus = stack
    tag = uuid.uuid4().hex[:6]
    # Stuck: a backorder in a channel whose only location has nothing, the product's stock at
    # `default`: a candidate of every pass (backordered and `available`) that no pass can fill.
    # Their ids sort first: a pass taking products from the first id on takes only them.
    elsewhere = db.location()
    web = db.channel([elsewhere])
    stuck = [f"FAIR{tag}-a{i}" for i in range(3)]
    for pid in stuck:
        configure(db, pid)
        assert db.place(f"{pid}-o", (pid, 1), channel_id=web).outcome == "reserved"
        assert db.one("stock.adjusted", {"product_id": pid, "delta": 3}).outcome == "adjusted"
    # Waiting: one unit freed by an expiry (which does not fill), two orders backordered, FIFO.
    waiting = [f"FAIR{tag}-b{i}" for i in range(3)]
    placed: dict[str, str] = {}  # order_id -> its order.placed id (the fill's causation)
    for pid in waiting:
        configure(db, pid)
        assert db.one("stock.adjusted", {"product_id": pid, "delta": 1}).outcome == "adjusted"
        assert db.place(f"{pid}-holder", (pid, 1)).outcome == "reserved"
        for n in (1, 2):
            out = db.place(f"{pid}-w{n}", (pid, 1))
            assert out.outcome == "reserved"
            placed[f"{pid}-w{n}"] = out.messages[0].body["causation_id"]
        db.expire(f"{pid}-holder")
    assert backordered(s, stuck + waiting) == {p: 1 for p in stuck} | {p: 2 for p in waiting}
    with pg(s) as cur:
        cur.execute("SELECT count(*) FROM products p WHERE backordered > 0 AND product_available(p) > 0")
        candidates = cur.fetchone()[0]
    assert candidates == len(stuck) + len(waiting) > BATCH

    maintenance = bootstrap.maintenance(s, threading.Event())
    ticks = 0
    try:
        while ticks < math.ceil(candidates / BATCH) and 2 in backordered(s, waiting).values():
            maintenance.tick()
            ticks += 1
    finally:
        maintenance._drop_amqp()
        maintenance.store.close()
        maintenance.cache.close()

    # Every waiting product got its unit, for its oldest order; the stuck ones still wait.
    assert backordered(s, stuck + waiting) == {p: 1 for p in stuck + waiting}, f"after {ticks} ticks"
    with pg(s) as cur:
        cur.execute(
            "SELECT order_id, product_id, location_id, reserved FROM order_allocations"
            " WHERE product_id = ANY(%s) AND reserved > 0 ORDER BY order_id",
            (waiting,),
        )
        assert cur.fetchall() == [(f"{pid}-w1", pid, "default", 1) for pid in waiting]
    for pid in waiting:
        assert db.totals(pid) == (1, 1, 0)

    def fills(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in results if r["type"] == "inventory.backorder_filled"]

    published = fills(bus.wait_for(lambda rs: len(fills(rs)) >= len(waiting)))
    for r in published:
        validate_output(r)
    assert sorted((r["causation_id"], r["data"]["order_id"]) for r in published) == sorted(
        (placed[f"{pid}-w1"], f"{pid}-w1") for pid in waiting
    )
    for r in published:
        pid = r["data"]["order_id"].rsplit("-", 1)[0]
        assert r["data"] == {
            "order_id": f"{pid}-w1",
            "lines": [{"product_id": pid, "location_id": "default", "quantity": 1}],
            "backordered_remaining": [],
        }
    db.verify()


def test_the_pass_cursor_wraps_round(stack):
    """The pass itself: after the last candidate it starts again from the first, and reports
    where it stopped (`cursor`); with nothing to do it keeps the cursor it was given."""
    s, db, _ = stack
    tag = uuid.uuid4().hex[:6]
    elsewhere = db.location()
    web = db.channel([elsewhere])
    pids = [f"WRAP{tag}-{i}" for i in range(3)]
    for pid in pids:
        configure(db, pid)
        assert db.place(f"{pid}-o", (pid, 1), channel_id=web).outcome == "reserved"
        assert db.one("stock.adjusted", {"product_id": pid, "delta": 1}).outcome == "adjusted"
    store = db.store
    cursors = []
    after = ""
    for _ in range(4):
        filled, messages, figures, after = store.fill_backorders(BATCH, 100, after)
        assert (filled, messages, figures) == (0, [], [])
        cursors.append(after)
    # [0, 1], then [2] and round to [0], then [1, 2], then [0, 1]
    assert cursors == [pids[1], pids[0], pids[2], pids[1]]
    for pid in pids:
        assert db.one("order.cancelled", {"order_id": f"{pid}-o"}).outcome == "released"
    assert store.fill_backorders(BATCH, 100, pids[1])[3] == pids[1]
    db.verify()


def test_one_tick_fills_past_one_pass_while_passes_fill(stack):
    """A backlog larger than one pass (`worker.backorder_fill_batch` orders per product) is
    filled by passes back to back within one tick, not one pass a tick: 10 preorders whose
    stock came back by an expiry (which does not fill) are all filled by a single tick taking
    3 a pass, oldest first, each once."""
    s, db, bus = stack
    s = s.model_copy(update={"worker": s.worker.model_copy(update={"backorder_fill_batch": 3})})
    pid = f"TICK{uuid.uuid4().hex[:6]}"
    configure(db, pid)
    assert db.one("stock.adjusted", {"product_id": pid, "delta": 10}).outcome == "adjusted"
    assert db.place(f"{pid}-holder", (pid, 10)).outcome == "reserved"
    waiting = [f"{pid}-w{n:02d}" for n in range(10)]
    for oid in waiting:
        assert db.place(oid, (pid, 1)).outcome == "reserved"
    db.expire(f"{pid}-holder")
    assert backordered(s, [pid]) == {pid: 10}

    maintenance = bootstrap.maintenance(s, threading.Event())
    try:
        maintenance.tick()
    finally:
        maintenance._drop_amqp()
        maintenance.store.close()
        maintenance.cache.close()

    assert backordered(s, [pid]) == {pid: 0}
    assert db.totals(pid) == (10, 10, 0)

    def fills(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in results if r["type"] == "inventory.backorder_filled"]

    published = fills(bus.wait_for(lambda rs: len(fills(rs)) >= len(waiting)))
    assert sorted(r["data"]["order_id"] for r in published) == waiting  # each once
    db.verify()
