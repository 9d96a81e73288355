"""Orders over several locations (spec 4.1, 4.5, 4.6, 4.8 without backorders), through
Store.apply_batch with raw events, against the real database.

Locations, channels and product policies are set up in SQL here (their messages are tested
with the stock side); stock at a location other than `default` is put there with
change_level(), the one primitive every stock message uses.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from typing import Any

import psycopg2
import pytest

from inventory_worker.adapters.postgres import Outcome, Store, TransientError

from ..private_stack import private_settings
from ..support import pg, uid


def ev(type_: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "type": type_, "data": data}


def msgs(out: Outcome) -> list[tuple[str, dict[str, Any]]]:
    res = []
    for m in out.messages:
        data = dict(m.body["data"])
        data.pop("expires_at", None)
        res.append((m.body["type"], data))
    return res


class Db:
    def __init__(self, settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.products: set[str] = set()

    def apply(self, *events: dict[str, Any]) -> list[Outcome]:
        with pg(self.settings) as cur:
            cur.execute("SELECT count(*) FROM outbox WHERE routing_key <> 'inventory.expired'")
            before = cur.fetchone()[0]
        outs = self.store.apply_batch(list(events))
        with pg(self.settings) as cur:
            cur.execute("SELECT count(*) FROM outbox WHERE routing_key <> 'inventory.expired'")
            assert cur.fetchone()[0] - before == sum(len(o.messages) for o in outs)
        for e, o in zip(events, outs, strict=True):
            assert all(m.body["causation_id"] == e["id"] for m in o.messages)
        return outs

    def one(self, type_: str, data: dict[str, Any]) -> Outcome:
        return self.apply(ev(type_, data))[0]

    def place(self, order_id: str, *lines: tuple, **extra: Any) -> Outcome:
        return self.one(
            "order.placed",
            {
                "order_id": order_id,
                "lines": [
                    {"product_id": x[0], "quantity": x[1], **({"location_id": x[2]} if len(x) > 2 else {})}
                    for x in lines
                ],
                **extra,
            },
        )

    def location(self, priority: int = 0, active: bool = True, fulfils: bool = True) -> str:
        loc = uid("L")
        with pg(self.settings) as cur:
            cur.execute(
                "INSERT INTO locations (location_id, priority, active, fulfils_orders) VALUES (%s, %s, %s, %s)",
                (loc, priority, active, fulfils),
            )
        return loc

    def channel(self, locations: list[str] | None, strategy: str = "priority") -> str:
        ch = uid("C")
        with pg(self.settings) as cur:
            cur.execute(
                "INSERT INTO channels (channel_id, strategy, locations) VALUES (%s, %s, %s)",
                (ch, strategy, locations),
            )
        return ch

    def stock(self, levels: dict[str, int], pid: str | None = None, **policy: Any) -> str:
        """A product with these on_hand figures per location (default first, by stock.adjusted)."""
        pid = pid or uid()
        self.products.add(pid)
        assert (
            self.one("stock.adjusted", {"product_id": pid, "delta": levels.get("default", 0)}).outcome
            == "adjusted"
        )
        conn = psycopg2.connect(**self.settings.database.dsn())
        try:
            with conn, conn.cursor() as cur:
                cur.execute("SELECT 1 FROM products WHERE product_id = %s FOR UPDATE", (pid,))
                for loc, qty in levels.items():
                    if loc != "default":
                        cur.execute(
                            "SELECT change_level(%s, %s, %s, 0, 0, 0, 0, 'adjust', NULL, NULL)",
                            (pid, loc, qty),
                        )
                for k, v in policy.items():
                    cur.execute(f"UPDATE products SET {k} = %s WHERE product_id = %s", (v, pid))
        finally:
            conn.close()
        return pid

    def levels(self, pid: str) -> dict[str, tuple[int, int]]:
        """{location_id: (on_hand, reserved)} of every level of the product."""
        with pg(self.settings) as cur:
            cur.execute(
                "SELECT location_id, on_hand, reserved FROM stock_levels WHERE product_id = %s"
                " UNION ALL SELECT 'default', on_hand, reserved FROM products"
                " WHERE product_id = %s AND NOT multi_location",
                (pid, pid),
            )
            return {r[0]: (r[1], r[2]) for r in cur.fetchall()}

    def totals(self, pid: str) -> tuple[int, int, int]:
        with pg(self.settings) as cur:
            cur.execute(
                "SELECT on_hand, reserved, (product_figures(p)->>'available')::int FROM products p"
                " WHERE product_id = %s",
                (pid,),
            )
            return cur.fetchone()

    def allocations(self, order_id: str) -> list[tuple[str, str, int, int, int]]:
        with pg(self.settings) as cur:
            cur.execute(
                "SELECT product_id, location_id, position, reserved, fulfilled FROM order_allocations"
                " WHERE order_id = %s ORDER BY product_id, position",
                (order_id,),
            )
            return cur.fetchall()

    def order(self, order_id: str) -> tuple[str, bool, str | None] | None:
        with pg(self.settings) as cur:
            cur.execute("SELECT status, allocated, channel_id FROM orders WHERE order_id = %s", (order_id,))
            return cur.fetchone()

    def expire(self, order_id: str) -> dict[str, Any]:
        with pg(self.settings) as cur:
            cur.execute(
                "UPDATE orders SET expires_at = now() - interval '1 second' WHERE order_id = %s", (order_id,)
            )
            cur.execute("SELECT expire_reservations(500)")
            return cur.fetchone()[0]

    def verify(self) -> None:
        """stock_mismatches() clean for our products, and every level agrees with its ledger rows
        and with what the open orders hold there."""
        ids = sorted(self.products)
        with pg(self.settings) as cur:
            cur.execute("SELECT * FROM stock_mismatches() WHERE product_id = ANY(%s)", (ids,))
            assert cur.fetchall() == []
            cur.execute(
                """
                WITH lv AS (
                    SELECT product_id, location_id, on_hand, reserved FROM stock_levels
                    UNION ALL SELECT product_id, 'default', on_hand, reserved FROM products WHERE NOT multi_location
                ), held AS (
                    SELECT product_id, location_id, sum(q) AS reserved FROM (
                        SELECT a.product_id, a.location_id, a.reserved AS q FROM order_allocations a
                          JOIN orders o USING (order_id) WHERE o.status = 'reserved' AND o.allocated
                        UNION ALL
                        SELECT ol.product_id, 'default', ol.quantity FROM order_lines ol
                          JOIN orders o USING (order_id) WHERE o.status = 'reserved' AND NOT o.allocated
                    ) h GROUP BY 1, 2
                ), ledger AS (
                    SELECT product_id, coalesce(location_id, 'default') AS location_id,
                           sum(on_hand_delta) AS on_hand, sum(reserved_delta) AS reserved
                      FROM stock_movements GROUP BY 1, 2
                )
                SELECT lv.*, h.reserved, l.on_hand, l.reserved FROM lv
                  LEFT JOIN held h USING (product_id, location_id) LEFT JOIN ledger l USING (product_id, location_id)
                 WHERE lv.product_id = ANY(%s)
                   AND (lv.reserved <> coalesce(h.reserved, 0) OR lv.on_hand <> coalesce(l.on_hand, 0)
                        OR lv.reserved <> coalesce(l.reserved, 0))""",
                (ids,),
            )
            assert cur.fetchall() == []


@pytest.fixture(scope="module")
def settings(settings):
    """A database of this module's own: these tests sweep and fill by hand, and the run's shared
    workers' sweepers would otherwise take the orders first in the shared database."""
    with private_settings(settings, "locorders") as s:
        yield s


@pytest.fixture
def store(settings):
    s = Store(settings.database, settings.worker.default_reservation_ttl_seconds)
    yield s
    s.close()


@pytest.fixture
def db(settings, store) -> Db:
    return Db(settings, store)


def allocated(order_id: str, channel: str, *lines: tuple) -> tuple[str, dict[str, Any]]:
    """inventory.allocated; a line is (product_id, quantity, [(location, quantity)...], tracked=True)."""
    return (
        "inventory.allocated",
        {
            "order_id": order_id,
            "channel_id": channel,
            "lines": [
                {
                    "product_id": x[0],
                    "quantity": x[1],
                    "tracked": x[3] if len(x) > 3 else True,
                    "allocations": [{"location_id": loc, "quantity": q} for loc, q in x[2]],
                    "backordered": 0,
                }
                for x in lines
            ],
        },
    )


def reserved(order_id: str, *lines: tuple[str, int]) -> tuple[str, dict[str, Any]]:
    return (
        "inventory.reserved",
        {"order_id": order_id, "lines": [{"product_id": p, "quantity": q} for p, q in lines]},
    )


# ==== acceptance check 2: strategies ============================================================


def test_priority_splits_over_locations_in_channel_order(db):
    a, b = db.location(0), db.location(1)
    ch = db.channel([a, b], "priority")
    pid = db.stock({a: 5, b: 5})
    oid = uid("o")
    out = db.place(oid, (pid, 7), channel_id=ch)
    assert out.outcome == "reserved"
    assert msgs(out) == [reserved(oid, (pid, 7)), allocated(oid, ch, (pid, 7, [(a, 5), (b, 2)]))]
    assert db.levels(pid) == {"default": (0, 0), a: (5, 5), b: (5, 2)}
    assert db.totals(pid) == (10, 7, 3)
    assert out.products == [
        {
            "product_id": pid,
            "on_hand": 10,
            "reserved": 7,
            "available": 3,
            "version": out.products[0]["version"],
        }
    ]
    assert db.order(oid) == ("reserved", True, ch)
    assert db.allocations(oid) == [(pid, a, 1, 5, 0), (pid, b, 2, 2, 0)]
    db.verify()


def test_the_default_channel_walks_locations_by_priority(db):
    # Channel `default` = every active, order-fulfilling location by (priority, location_id).
    first = db.location(-1000000)
    pid = db.stock({"default": 1, first: 2})
    oid = uid("o")
    out = db.place(oid, (pid, 3))
    assert msgs(out)[1] == allocated(oid, "default", (pid, 3, [(first, 2), ("default", 1)]))
    assert db.levels(pid) == {"default": (1, 1), first: (2, 2)}
    db.verify()


def test_most_available(db):
    a, b = db.location(0), db.location(1)
    ch = db.channel([a, b], "most_available")
    pid = db.stock({a: 3, b: 5})
    oid = uid("o")
    out = db.place(oid, (pid, 7), channel_id=ch)
    assert msgs(out)[1] == allocated(oid, ch, (pid, 7, [(b, 5), (a, 2)]))
    assert db.levels(pid) == {"default": (0, 0), a: (3, 2), b: (5, 5)}
    db.verify()


def test_fewest_locations(db):
    a, b = db.location(0), db.location(1)
    ch = db.channel([a, b], "fewest_locations")
    pid = db.stock({a: 3, b: 7})
    oid = uid("o")
    out = db.place(oid, (pid, 7), channel_id=ch)
    assert msgs(out)[1] == allocated(oid, ch, (pid, 7, [(b, 7)]))
    assert db.levels(pid)[a] == (3, 0) and db.levels(pid)[b] == (7, 7)
    db.verify()


def test_single_location_never_splits(db):
    a, b = db.location(0), db.location(1)
    ch = db.channel([a, b], "single_location")
    pid = db.stock({a: 5, b: 5})
    oid = uid("o")
    out = db.place(oid, (pid, 7), channel_id=ch)
    assert out.outcome == "rejected"
    assert msgs(out) == [
        (
            "inventory.rejected",
            {
                "order_id": oid,
                "reason": "insufficient_stock",
                "shortages": [{"product_id": pid, "requested": 7, "available": 5}],
            },
        )
    ]
    assert db.order(oid) is None and db.levels(pid) == {"default": (0, 0), a: (5, 0), b: (5, 0)}
    out = db.place(oid, (pid, 5), channel_id=ch)
    assert msgs(out)[1] == allocated(oid, ch, (pid, 5, [(a, 5)]))
    db.verify()


# ==== refusals (spec 4.1 steps 3-6) =============================================================


def test_pin_at_an_inactive_location_is_location_unavailable_and_holds_nothing(db):
    a, off = db.location(0), db.location(1, active=False)
    pid, other = db.stock({a: 5, off: 5}), db.stock({"default": 5})
    for pin in (off, uid("L")):  # inactive, and not configured at all
        oid = uid("o")
        out = db.place(oid, (other, 1), (pid, 2, pin))
        assert out.outcome == "rejected"
        assert msgs(out) == [
            (
                "inventory.rejected",
                {
                    "order_id": oid,
                    "reason": "location_unavailable",
                    "shortages": [{"product_id": pid, "requested": 2, "available": 0}],
                },
            )
        ]
        assert db.order(oid) is None
    # A pin outside the channel's list, though active, too.
    ch = db.channel([a])
    oid = uid("o")
    assert (
        db.place(oid, (other, 1, "default"), channel_id=ch).messages[0].body["data"]["reason"]
        == "location_unavailable"
    )
    assert db.levels(pid) == {"default": (0, 0), a: (5, 0), off: (5, 0)} and db.levels(other) == {
        "default": (5, 0)
    }
    # At an active one it holds there only.
    oid = uid("o")
    out = db.place(oid, (pid, 2, a))
    assert msgs(out)[1] == allocated(oid, "default", (pid, 2, [(a, 2)]))
    db.verify()


def test_unknown_channel(db):
    pid = db.stock({"default": 5})
    oid = uid("o")
    out = db.place(oid, (pid, 1), channel_id=uid("C"))
    assert msgs(out) == [
        ("inventory.rejected", {"order_id": oid, "reason": "unknown_channel", "shortages": []})
    ]
    assert db.order(oid) is None and db.levels(pid) == {"default": (5, 0)}


def test_unknown_product_comes_before_the_channel(db):
    pid = db.stock({"default": 5})
    oid, ghost = uid("o"), uid()
    out = db.place(oid, (pid, 1), (ghost, 2), channel_id=uid("C"))
    assert msgs(out) == [
        (
            "inventory.rejected",
            {
                "order_id": oid,
                "reason": "unknown_product",
                "shortages": [{"product_id": ghost, "requested": 2, "available": 0}],
            },
        )
    ]


def test_quantity_limit(db):
    pid = db.stock({"default": 50}, max_per_order=3)
    oid = uid("o")
    out = db.place(oid, (pid, 4))
    assert msgs(out) == [
        (
            "inventory.rejected",
            {
                "order_id": oid,
                "reason": "quantity_limit",
                "shortages": [{"product_id": pid, "requested": 4, "available": 3}],
            },
        )
    ]
    assert db.levels(pid) == {"default": (50, 0)}
    # Within the limit: held at default, implicitly, and nothing more said than today.
    out = db.place(oid, (pid, 3))
    assert msgs(out) == [reserved(oid, (pid, 3))]
    assert db.order(oid) == ("reserved", False, None) and db.allocations(oid) == []
    db.verify()


def test_safety_stock_2_on_5_refuses_orders_for_4(db):
    # Acceptance check 16.
    pid = db.stock({"default": 5}, safety_stock=2)
    assert db.totals(pid) == (5, 0, 3)
    oid = uid("o")
    out = db.place(oid, (pid, 4))
    assert msgs(out) == [
        (
            "inventory.rejected",
            {
                "order_id": oid,
                "reason": "insufficient_stock",
                "shortages": [{"product_id": pid, "requested": 4, "available": 3}],
            },
        )
    ]
    out = db.place(oid, (pid, 3))
    assert msgs(out) == [
        reserved(oid, (pid, 3)),
        ("inventory.low_stock", {"product_id": pid, "available": 0, "threshold": 0}),
    ]
    assert db.totals(pid) == (5, 3, 0)
    db.verify()


def test_safety_stock_at_a_second_location(db):
    a = db.location(5)
    pid = db.stock({"default": 2, a: 5})
    with pg(db.settings) as cur:
        cur.execute(
            "UPDATE stock_levels SET safety_stock = 4 WHERE product_id = %s AND location_id = %s", (pid, a)
        )
    assert db.totals(pid) == (7, 0, 3)
    oid = uid("o")
    out = db.place(oid, (pid, 4))
    assert msgs(out)[0][1]["shortages"] == [{"product_id": pid, "requested": 4, "available": 3}]
    out = db.place(oid, (pid, 3))
    assert msgs(out)[1] == allocated(oid, "default", (pid, 3, [("default", 2), (a, 1)]))
    db.verify()


def test_default_location_not_selling_leaves_default_only_products_unavailable(db, settings):
    pid = db.stock({"default": 5})
    with pg(settings) as cur:
        cur.execute("UPDATE locations SET fulfils_orders = false WHERE location_id = 'default'")
    try:
        oid = uid("o")
        out = db.place(oid, (pid, 1))
        assert msgs(out) == [
            (
                "inventory.rejected",
                {
                    "order_id": oid,
                    "reason": "insufficient_stock",
                    "shortages": [{"product_id": pid, "requested": 1, "available": 0}],
                },
            )
        ]
    finally:
        with pg(settings) as cur:
            cur.execute("UPDATE locations SET fulfils_orders = true WHERE location_id = 'default'")


# ==== acceptance check 18: untracked products ===================================================


def test_untracked_product_orders_are_always_placed_without_touching_stock(db):
    free = db.stock({"default": 0}, tracked=False)
    held = db.stock({"default": 4})
    version = db.totals(held)
    oid = uid("o")
    out = db.place(oid, (free, 1000), (held, 4))
    assert out.outcome == "reserved"
    assert msgs(out) == [
        reserved(oid, (free, 1000), (held, 4)),
        allocated(oid, "default", (free, 1000, [], False), (held, 4, [("default", 4)])),
        ("inventory.low_stock", {"product_id": held, "available": 0, "threshold": 0}),
    ]
    assert db.levels(free) == {"default": (0, 0)} and db.levels(held) == {"default": (4, 4)}
    assert [p["product_id"] for p in out.products] == [held] and version
    with pg(db.settings) as cur:
        cur.execute(
            "SELECT product_id, tracked FROM order_lines WHERE order_id = %s ORDER BY line_no", (oid,)
        )
        assert cur.fetchall() == [(free, False), (held, True)]
    db.verify()
    out = db.one("order.completed", {"order_id": oid})
    assert msgs(out) == [
        (
            "inventory.committed",
            {
                "order_id": oid,
                "lines": [{"product_id": free, "quantity": 1000}, {"product_id": held, "quantity": 4}],
            },
        )
    ]
    assert db.levels(free) == {"default": (0, 0)} and db.levels(held) == {"default": (0, 0)}
    db.verify()
    # Alone, cancelled and expired: nothing moves either.
    for end in ("cancel", "expire"):
        oid = uid("o")
        assert msgs(db.place(oid, (free, 3))) == [
            reserved(oid, (free, 3)),
            allocated(oid, "default", (free, 3, [], False)),
        ]
        if end == "cancel":
            assert msgs(db.one("order.cancelled", {"order_id": oid})) == [
                (
                    "inventory.released",
                    {"order_id": oid, "lines": [{"product_id": free, "quantity": 3}], "reason": "cancelled"},
                )
            ]
        else:
            assert oid in [m["body"]["data"].get("order_id") for m in db.expire(oid)["messages"]]
        assert db.levels(free) == {"default": (0, 0)}
    db.verify()


# ==== cancel, complete, expire at two locations ==================================================


def two_locations(db: Db) -> tuple[str, str, str, str, str]:
    """A product with 3 at default and 3 at L, another with 5 at L only; an order held at
    both that takes all of the first."""
    loc = db.location(7)
    p, q = db.stock({"default": 3, loc: 3}), db.stock({loc: 5})
    oid = uid("o")
    out = db.place(oid, (p, 6), (q, 2))
    assert msgs(out)[1:] == [
        allocated(oid, "default", (p, 6, [("default", 3), (loc, 3)]), (q, 2, [(loc, 2)])),
        ("inventory.low_stock", {"product_id": p, "available": 0, "threshold": 0}),
    ]
    assert db.levels(p) == {"default": (3, 3), loc: (3, 3)} and db.levels(q) == {
        "default": (0, 0),
        loc: (5, 2),
    }
    db.verify()
    return loc, p, q, oid, out.messages[0].body["causation_id"]


def test_cancel_releases_every_level(db):
    loc, p, q, oid, _ = two_locations(db)
    out = db.one("order.cancelled", {"order_id": oid})
    assert out.outcome == "released"
    assert msgs(out) == [
        (
            "inventory.released",
            {
                "order_id": oid,
                "lines": [{"product_id": p, "quantity": 6}, {"product_id": q, "quantity": 2}],
                "reason": "cancelled",
            },
        ),
        ("inventory.back_in_stock", {"product_id": p, "available": 6}),
    ]
    assert db.levels(p) == {"default": (3, 0), loc: (3, 0)} and db.levels(q) == {
        "default": (0, 0),
        loc: (5, 0),
    }
    assert [(f["product_id"], f["reserved"], f["available"]) for f in out.products] == sorted(
        [(p, 0, 6), (q, 0, 5)]
    )
    assert sorted(db.allocations(oid)) == sorted(
        [(p, "default", 1, 0, 0), (p, loc, 2, 0, 0), (q, loc, 1, 0, 0)]
    )
    assert db.order(oid)[0] == "released"
    db.verify()
    assert db.one("order.cancelled", {"order_id": oid}).outcome == "ignored"


def test_complete_commits_at_every_level(db):
    loc, p, q, oid, _ = two_locations(db)
    out = db.one("order.completed", {"order_id": oid})
    assert out.outcome == "committed"
    assert msgs(out) == [
        (
            "inventory.committed",
            {"order_id": oid, "lines": [{"product_id": p, "quantity": 6}, {"product_id": q, "quantity": 2}]},
        )
    ]
    assert db.levels(p) == {"default": (0, 0), loc: (0, 0)} and db.levels(q) == {
        "default": (0, 0),
        loc: (3, 0),
    }
    assert sorted(db.allocations(oid)) == sorted(
        [(p, "default", 1, 0, 3), (p, loc, 2, 0, 3), (q, loc, 1, 0, 2)]
    )
    with pg(db.settings) as cur:
        cur.execute(
            "SELECT product_id, fulfilled, released FROM order_lines WHERE order_id = %s ORDER BY 1", (oid,)
        )
        assert cur.fetchall() == sorted([(p, 6, 0), (q, 2, 0)])
    db.verify()


def test_expiry_releases_every_level_and_completion_takes_them_again(db):
    loc, p, q, oid, placed_id = two_locations(db)
    swept = db.expire(oid)
    mine = [m for m in swept["messages"] if m["body"]["causation_id"] == placed_id]
    assert [(m["routing_key"], m["body"]["data"]) for m in mine] == [
        (
            "inventory.expired",
            {
                "order_id": oid,
                "lines": [{"product_id": p, "quantity": 6}, {"product_id": q, "quantity": 2}],
                "expired_at": mine[0]["body"]["data"]["expired_at"],
            },
        ),
        ("inventory.back_in_stock", {"product_id": p, "available": 6}),
    ]
    assert db.levels(p) == {"default": (3, 0), loc: (3, 0)} and db.levels(q) == {
        "default": (0, 0),
        loc: (5, 0),
    }
    assert db.order(oid)[0] == "expired"
    db.verify()
    out = db.one("order.completed", {"order_id": oid})
    assert out.outcome == "committed"
    assert msgs(out) == [
        (
            "inventory.committed",
            {"order_id": oid, "lines": [{"product_id": p, "quantity": 6}, {"product_id": q, "quantity": 2}]},
        ),
        ("inventory.low_stock", {"product_id": p, "available": 0, "threshold": 0}),
    ]
    assert db.levels(p) == {"default": (0, 0), loc: (0, 0)} and db.levels(q) == {
        "default": (0, 0),
        loc: (3, 0),
    }
    with pg(db.settings) as cur:
        cur.execute(
            "SELECT location_id, reason, on_hand_delta, reserved_delta FROM stock_movements"
            " WHERE order_id = %s AND product_id = %s ORDER BY id",
            (oid, p),
        )
        assert cur.fetchall() == [
            ("default", "reserve", 0, 3),
            (loc, "reserve", 0, 3),
            ("default", "expire", 0, -3),
            (loc, "expire", 0, -3),
            ("default", "reserve", 0, 3),
            (loc, "reserve", 0, 3),
            ("default", "commit", -3, -3),
            (loc, "commit", -3, -3),
        ]
    db.verify()


def test_completion_after_expiry_needs_each_original_level(db):
    loc, p, q, oid, _ = two_locations(db)
    db.expire(oid)
    # 6 left in all, but the order held 3 at L, where only 1 is left now.
    rival = uid("o")
    assert db.place(rival, (p, 2, loc)).outcome == "reserved"
    out = db.one("order.completed", {"order_id": oid})
    assert msgs(out) == [
        (
            "inventory.rejected",
            {
                "order_id": oid,
                "reason": "reservation_expired",
                "shortages": [{"product_id": p, "requested": 6, "available": 4}],
            },
        )
    ]
    assert db.levels(p) == {"default": (3, 0), loc: (3, 2)} and db.levels(q) == {
        "default": (0, 0),
        loc: (5, 0),
    }
    assert db.order(oid)[0] == "expired"
    db.verify()


def test_an_implicit_order_of_a_product_that_gets_a_second_level_later(db):
    # Placed wholly at default (no allocation rows); then the product gets stock elsewhere and
    # its default level moves to stock_levels: cancel and complete still find it there.
    pid = db.stock({"default": 5})
    o1, o2 = uid("o"), uid("o")
    assert msgs(db.place(o1, (pid, 2))) == [reserved(o1, (pid, 2))]
    assert msgs(db.place(o2, (pid, 3)))[0] == reserved(o2, (pid, 3))
    loc = db.location(3)
    db.stock({loc: 4}, pid=pid)
    assert db.levels(pid) == {"default": (5, 5), loc: (4, 0)}
    assert msgs(db.one("order.cancelled", {"order_id": o1}))[0][0] == "inventory.released"
    assert db.levels(pid) == {"default": (5, 3), loc: (4, 0)}
    out = db.apply(ev("order.completed", {"order_id": o2}))[0]
    assert out.outcome == "committed" and db.levels(pid) == {"default": (2, 0), loc: (4, 0)}
    assert db.totals(pid) == (6, 0, 6)
    db.verify()


def test_channel_given_with_everything_at_default_is_implicit_but_said(db):
    pid = db.stock({"default": 5})
    oid = uid("o")
    out = db.place(oid, (pid, 2), channel_id="default")
    assert msgs(out) == [reserved(oid, (pid, 2)), allocated(oid, "default", (pid, 2, [("default", 2)]))]
    assert db.order(oid) == ("reserved", False, "default") and db.allocations(oid) == []
    out = db.one("order.completed", {"order_id": oid})
    assert msgs(out) == [
        ("inventory.committed", {"order_id": oid, "lines": [{"product_id": pid, "quantity": 2}]})
    ]
    db.verify()


def test_a_batch_mixing_default_only_and_located_orders(db):
    loc = db.location(2)
    plain, split = db.stock({"default": 10}), db.stock({"default": 1, loc: 9})
    orders = [uid("o") for _ in range(6)]
    events = [
        ev(
            "order.placed",
            {"order_id": o, "lines": [{"product_id": plain if i % 2 else split, "quantity": 3}]},
        )
        for i, o in enumerate(orders)
    ]
    outs = db.apply(*events)
    assert [o.outcome for o in outs] == ["reserved"] * 6
    assert db.levels(plain) == {"default": (10, 9)} and db.levels(split) == {"default": (1, 1), loc: (9, 8)}
    outs = db.apply(*[ev("order.completed", {"order_id": o}) for o in orders])
    assert [o.outcome for o in outs] == ["committed"] * 6
    assert db.levels(plain) == {"default": (1, 0)} and db.levels(split) == {"default": (0, 0), loc: (1, 0)}
    db.verify()


# ==== concurrency ================================================================================


def test_concurrent_orders_over_two_locations_never_oversell_a_level(db, settings):
    a, b = db.location(0), db.location(1)
    ch = db.channel([a, b], "priority")
    pids = [db.stock({a: 6, b: 6}) for _ in range(3)]
    stop = threading.Event()
    errors: list[BaseException] = []
    samples = [0]

    def sampler() -> None:
        try:
            with pg(settings) as cur:
                while not stop.is_set():
                    cur.execute(
                        "SELECT product_id, location_id, on_hand, reserved FROM stock_levels"
                        " WHERE product_id = ANY(%s) AND (reserved > on_hand - damaged - quality_control"
                        " OR reserved < 0)",
                        (pids,),
                    )
                    assert cur.fetchall() == []
                    samples[0] += 1
        except BaseException as exc:  # reported below
            errors.append(exc)

    def racer(seed: int) -> None:
        rng = random.Random(seed)
        store = Store(settings.database)
        placed: list[str] = []
        try:
            for _ in range(25):
                batch = []
                for _ in range(rng.randint(1, 4)):
                    if placed and rng.random() < 0.4:
                        batch.append(
                            ev(
                                rng.choice(["order.cancelled", "order.completed"]),
                                {"order_id": placed.pop(rng.randrange(len(placed)))},
                            )
                        )
                    else:
                        oid = uid("o")
                        placed.append(oid)
                        lines = [
                            {
                                "product_id": p,
                                "quantity": rng.randint(1, 5),
                                **({"location_id": rng.choice([a, b])} if rng.random() < 0.2 else {}),
                            }
                            for p in rng.sample(pids, rng.randint(1, 2))
                        ]
                        batch.append(ev("order.placed", {"order_id": oid, "lines": lines, "channel_id": ch}))
                for attempt in range(20):
                    try:
                        store.apply_batch(batch)
                        break
                    except TransientError:
                        time.sleep(0.01 * attempt)
                else:
                    raise AssertionError("a batch kept failing")
            for oid in placed:
                store.apply_batch([ev("order.cancelled", {"order_id": oid})])
        except BaseException as exc:
            errors.append(exc)
        finally:
            store.close()

    watch = threading.Thread(target=sampler)
    watch.start()
    racers = [threading.Thread(target=racer, args=(i,)) for i in range(4)]
    for r in racers:
        r.start()
    for r in racers:
        r.join(120)
    stop.set()
    watch.join(10)
    assert errors == []
    assert samples[0] > 0
    db.products.update(pids)
    db.verify()
    for pid in pids:
        lv = db.levels(pid)
        assert all(r == 0 for _, r in lv.values())
        assert sum(oh for oh, _ in lv.values()) == db.totals(pid)[0] <= 12


# ==== stock.adjusted without a location, on a product with levels elsewhere =====================


def test_a_plain_adjustment_of_a_multi_location_product_is_checked_at_default(db):
    # The products row holds the totals (5 here), the default level 0: taking 1 off default
    # must be refused there, not applied (it raised the level's CHECK before, failing the batch).
    loc = db.location(4)
    pid = db.stock({loc: 5})
    out = db.one("stock.adjusted", {"product_id": pid, "delta": -1})
    assert msgs(out) == [
        (
            "inventory.adjustment_rejected",
            {"product_id": pid, "reason": "negative_on_hand", "on_hand": 5, "reserved": 0, "requested": -1},
        )
    ]
    out = db.one("stock.adjusted", {"product_id": pid, "on_hand": 2})
    assert msgs(out) == [
        ("inventory.adjusted", {"product_id": pid, "on_hand": 7, "reserved": 0, "available": 7})
    ]
    assert db.levels(pid) == {"default": (2, 0), loc: (5, 0)}
    # Unsellable units at a default-only product count against below_reserved.
    other = db.stock({"default": 5})
    assert db.place(uid("o"), (other, 3)).outcome == "reserved"
    with pg(db.settings) as cur:  # 2 sellable units found damaged (through the primitive: ledger kept)
        cur.execute("BEGIN; SELECT 1 FROM products WHERE product_id = %s FOR UPDATE", (other,))
        cur.execute("SELECT change_level(%s, 'default', 0, 0, 2, 0, 0, 'move', NULL, NULL); COMMIT", (other,))
    out = db.one("stock.adjusted", {"product_id": other, "delta": -1})
    assert msgs(out)[0][1]["reason"] == "below_reserved"
    db.verify()


def test_a_batch_sees_default_stop_fulfilling_at_once(settings):
    """default_sells() caches default's flags per transaction; a location.configured of
    `default` in the same batch must be seen by the events after it. (A database of its own:
    `default` stops fulfilling there.)"""
    with private_settings(settings, "defsells") as s:
        store = Store(s.database)
        try:
            p = uid("DS")
            store.apply_batch([ev("stock.adjusted", {"product_id": p, "on_hand": 5})])
            out = store.apply_batch(
                [
                    ev("order.placed", {"order_id": uid("O"), "lines": [{"product_id": p, "quantity": 1}]}),
                    ev("location.configured", {"location_id": "default", "fulfils_orders": False}),
                    ev("order.placed", {"order_id": uid("O"), "lines": [{"product_id": p, "quantity": 1}]}),
                    ev("stock.adjusted", {"product_id": p, "delta": 1}),
                ]
            )
            assert [o.outcome for o in out] == ["reserved", "configured", "rejected", "adjusted"]
            adjusted = out[3].messages[0].body["data"]
            assert (adjusted["on_hand"], adjusted["reserved"], adjusted["available"]) == (6, 1, 0)
            assert out[3].products[0]["available"] == 0
        finally:
            store.close()
