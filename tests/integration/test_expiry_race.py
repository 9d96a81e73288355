"""Expiry against completion and cancellation, straight through the stored procedures.

The race: an order whose reservation is due, completed while the sweeper expires it. Exactly
one of them takes the reservation: either the completion commits it (the sweep passes it
over), or the sweep releases it and the completion then has to take the stock again. Each
arrival order is forced many times (a third session holds the product row; the two queue
behind it in a known order), then both are let loose together many more times.
"""

from __future__ import annotations

import random
import threading
import time
import uuid

import psycopg2
import pytest

from ..private_stack import all_figures, apply, ledger_sums, private_settings
from ..support import uid


@pytest.fixture(scope="module")
def db(settings):
    with private_settings(settings, "race") as s:
        yield s


def _connect(s):
    conn = psycopg2.connect(**s.database.dsn())
    conn.autocommit = True
    return conn


def _due_order(cur, quantity=5, on_hand=5):
    """A product and an order holding all of it, already past its deadline by PostgreSQL's clock."""
    sku, order = uid("RACE"), uid("o")
    apply(cur, "stock.adjusted", {"product_id": sku, "on_hand": on_hand})
    placed_id = str(uuid.uuid4())
    r = apply(
        cur,
        "order.placed",
        {
            "order_id": order,
            "lines": [{"product_id": sku, "quantity": quantity}],
            "reservation_ttl_seconds": 60,
        },
        placed_id,
    )
    assert r["outcome"] == "reserved"
    cur.execute(
        "UPDATE orders SET expires_at = now() - interval '1 millisecond' WHERE order_id = %s", (order,)
    )
    return sku, order, placed_id


def _waiting_on_lock(cur, backend_pid):
    cur.execute("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s", (backend_pid,))
    row = cur.fetchone()
    return bool(row and row[0])


class Racer(threading.Thread):
    def __init__(self, conn, sql, args):
        super().__init__(daemon=True)
        self.conn, self.sql, self.args = conn, sql, args
        self.backend = conn.get_backend_pid()
        self.result = None
        self.error = None

    def run(self):
        try:
            with self.conn.cursor() as cur:
                cur.execute(self.sql, self.args)
                self.result = cur.fetchone()[0]
        except Exception as exc:  # surfaced by the test
            self.error = exc


def _race(db, admin, order, first, forced):
    """Runs the completion and a sweep concurrently; returns (completion result, sweep result)."""
    complete = (
        "SELECT apply_event(%s::uuid, 'order.completed', %s::jsonb, 900)",
        (str(uuid.uuid4()), f'{{"order_id": "{order}"}}'),
    )
    sweep = ("SELECT expire_reservations(500)", ())
    conns = [_connect(db), _connect(db)]
    try:
        racers = {"complete": Racer(conns[0], *complete), "expire": Racer(conns[1], *sweep)}
        order_of_arrival = [first, "expire" if first == "complete" else "complete"]
        if forced:
            blocker = _connect(db)
            try:
                with blocker.cursor() as b:
                    b.execute("BEGIN")
                    b.execute(
                        "SELECT 1 FROM products p JOIN order_lines ol USING (product_id)"
                        " WHERE ol.order_id = %s FOR UPDATE OF p",
                        (order,),
                    )
                    for name in order_of_arrival:  # each queues behind the blocker, in this order
                        racers[name].start()
                        deadline = time.monotonic() + 10
                        while not _waiting_on_lock(admin, racers[name].backend):
                            assert time.monotonic() < deadline, f"{name} never queued on the product lock"
                            time.sleep(0.005)
                    b.execute("COMMIT")
            finally:
                blocker.close()
        else:
            for name in order_of_arrival:
                racers[name].start()
        for r in racers.values():
            r.join(30)
            assert not r.is_alive()
            assert r.error is None, r.error
        return racers["complete"].result, racers["expire"].result
    finally:
        for c in conns:
            c.close()


def _reasons(cur, sku):
    cur.execute(
        "SELECT reason, on_hand_delta, reserved_delta, note IS NOT NULL FROM stock_movements"
        " WHERE product_id = %s ORDER BY id",
        (sku,),
    )
    return cur.fetchall()


@pytest.mark.parametrize("first", ["complete", "expire"])
def test_completion_expiry_race_forced_order(db, first):
    admin = _connect(db)
    try:
        cur = admin.cursor()
        for _ in range(12):
            sku, order, placed_id = _due_order(cur)
            completed, swept = _race(db, cur, order, first, forced=True)
            expired_here = [
                m
                for m in swept["messages"]
                if m["routing_key"] == "inventory.expired" and m["body"]["data"]["order_id"] == order
            ]
            assert completed["outcome"] == "committed"
            if first == "complete":
                # The completion took the reservation; the sweep found it gone.
                assert expired_here == []
                assert _reasons(cur, sku) == [
                    ("adjust", 5, 0, False),
                    ("reserve", 0, 5, False),
                    ("commit", -5, -5, False),
                ]
            else:
                # The sweep released it (once, with the event the placement caused); the late
                # completion found the stock still there and took it again in the same step.
                assert len(expired_here) == 1
                assert expired_here[0]["body"]["causation_id"] == placed_id
                assert _reasons(cur, sku) == [
                    ("adjust", 5, 0, False),
                    ("reserve", 0, 5, False),
                    ("expire", 0, -5, False),
                    ("reserve", 0, 5, True),
                    ("commit", -5, -5, False),
                ]
            assert all_figures(db, [sku]) == {sku: (0, 0)} == ledger_sums(db, [sku])
            cur.execute("SELECT status FROM orders WHERE order_id = %s", (order,))
            assert cur.fetchone()[0] == "committed"
    finally:
        admin.close()


def test_completion_expiry_race_unforced(db):
    """Let loose together: whoever wins, the reservation is taken exactly once."""
    admin = _connect(db)
    wins = {"complete": 0, "expire": 0}
    try:
        cur = admin.cursor()
        for i in range(30):
            sku, order, _ = _due_order(cur)
            completed, swept = _race(db, cur, order, random.choice(["complete", "expire"]), forced=False)
            assert completed["outcome"] == "committed"
            reasons = [r[0] for r in _reasons(cur, sku)]
            if "expire" in reasons:
                wins["expire"] += 1
                assert reasons == ["adjust", "reserve", "expire", "reserve", "commit"], i
            else:
                wins["complete"] += 1
                assert reasons == ["adjust", "reserve", "commit"], i
            assert all_figures(db, [sku]) == {sku: (0, 0)} == ledger_sums(db, [sku])
    finally:
        admin.close()
    assert sum(wins.values()) == 30


def test_completion_after_expiry_when_the_stock_is_gone_is_rejected(db):
    conn = _connect(db)
    try:
        cur = conn.cursor()
        sku, order, placed_id = _due_order(cur)
        swept = apply_sweep(cur)
        # The order held all 5 units: the sweep takes `available` from 0 to 5 (decision 13.7).
        mine = [
            (m["routing_key"], m["body"]["data"], m["body"]["causation_id"])
            for m in swept["messages"]
            if order == m["body"]["data"].get("order_id") or sku == m["body"]["data"].get("product_id")
        ]
        assert [(t, c) for t, _, c in mine] == [
            ("inventory.expired", placed_id),
            ("inventory.back_in_stock", placed_id),
        ]
        assert (mine[0][1]["order_id"], mine[0][1]["lines"]) == (order, [{"product_id": sku, "quantity": 5}])
        assert mine[1][1] == {"product_id": sku, "available": 5}
        rival = apply(
            cur, "order.placed", {"order_id": uid("o"), "lines": [{"product_id": sku, "quantity": 4}]}
        )
        assert rival["outcome"] == "reserved"
        r = apply(cur, "order.completed", {"order_id": order})
        assert r["outcome"] == "rejected"
        [msg] = r["messages"]
        assert msg["body"]["data"] == {
            "order_id": order,
            "reason": "reservation_expired",
            "shortages": [{"product_id": sku, "requested": 5, "available": 1}],
        }
        # Cancelling an expired order changes nothing either.
        assert apply(cur, "order.cancelled", {"order_id": order})["messages"] == []
    finally:
        conn.close()
    assert all_figures(db, [sku]) == {sku: (5, 4)} == ledger_sums(db, [sku])


def apply_sweep(cur):
    cur.execute("SELECT expire_reservations(500)")
    return cur.fetchone()[0]
