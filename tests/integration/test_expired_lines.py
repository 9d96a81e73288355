"""What inventory.expired lists (spec 4.6, 4.8): the units the expiry released. For an order
nothing was cancelled of, the lines as placed, byte for byte as before (C1); for an order partly
cancelled first, each line less what the cancel released (which its inventory.released listed),
so that released and expired add up to the order, never to more.
"""

from __future__ import annotations

from typing import Any

import pytest

from inventory_worker.adapters.postgres import Store
from inventory_worker.contract import validate_output

from ..private_stack import private_settings
from ..support import pg, uid
from .test_locations_orders import Db


@pytest.fixture(scope="module")
def settings(settings):
    """A database of this module's own: these tests sweep by hand."""
    with private_settings(settings, "expiredlines") as s:
        yield s


@pytest.fixture
def db(settings) -> Db:
    s = Store(settings.database, settings.worker.default_reservation_ttl_seconds)
    yield Db(settings, s)
    s.close()


def expired(db: Db, order_id: str) -> dict[str, Any]:
    """Expires the order by a real sweep; its inventory.expired (data), checked against the
    contract, and whether the outbox holds the lines as placed, in the very bytes the sweep
    wrote before (the expression of order_lines_json(), which it used to call)."""
    swept = db.expire(order_id)
    [m] = [m for m in swept["messages"] if m["body"]["data"].get("order_id") == order_id]
    validate_output(m["body"])
    assert m["body"]["type"] == "inventory.expired"
    with pg(db.settings) as cur:
        cur.execute(
            "SELECT (body->'data'->'lines')::text = ("
            "    SELECT jsonb_agg(jsonb_build_object('product_id', product_id, 'quantity', quantity)"
            "                     ORDER BY line_no) FROM order_lines WHERE order_id = %s)::text"
            "  FROM outbox WHERE message_id = %s",
            (order_id, m["body"]["id"]),
        )
        as_placed = cur.fetchone()[0]
    return {"data": m["body"]["data"], "as_placed": as_placed}


def cancel(db: Db, order_id: str, *lines: tuple[str, int]) -> list[tuple[str, dict[str, Any]]]:
    out = db.one(
        "order.cancelled",
        {"order_id": order_id, "lines": [{"product_id": p, "quantity": q} for p, q in lines]},
    )
    assert out.outcome == "released", out
    return [(m.body["type"], m.body["data"]) for m in out.messages]


def test_an_order_nothing_was_cancelled_of_lists_its_lines_as_placed(db):
    a, b = db.stock({"default": 10}), db.stock({"default": 10})
    o = uid("o")
    assert db.place(o, (b, 2), (a, 3)).outcome == "reserved"
    got = expired(db, o)
    assert got["data"]["lines"] == [{"product_id": b, "quantity": 2}, {"product_id": a, "quantity": 3}]
    assert got["as_placed"]
    assert db.totals(a) == (10, 0, 10) and db.totals(b) == (10, 0, 10)
    db.verify()


def test_an_order_held_at_two_locations_and_backordered_lists_its_lines_as_placed(db):
    """The expiry of an order held level by level (not set-based) with nothing cancelled."""
    loc = db.location(priority=1)
    a = db.stock({"default": 2, loc: 3})
    b = uid("BO")
    db.products.add(b)
    assert (
        db.one("product.configured", {"product_id": b, "backorder": {"mode": "allow"}}).outcome
        == "configured"
    )
    o = uid("o")
    assert db.place(o, (a, 5), (b, 4)).outcome == "reserved"
    assert db.allocations(o) == [(a, "default", 1, 2, 0), (a, loc, 2, 3, 0)]
    got = expired(db, o)
    assert got["data"]["lines"] == [{"product_id": a, "quantity": 5}, {"product_id": b, "quantity": 4}]
    assert got["as_placed"]
    assert db.totals(a) == (5, 0, 5)
    db.verify()


def test_a_partly_cancelled_order_lists_what_the_expiry_released(db):
    a, b = db.stock({"default": 10}), db.stock({"default": 10})
    o = uid("o")
    assert db.place(o, (a, 5), (b, 2)).outcome == "reserved"
    assert cancel(db, o, (a, 2)) == [
        (
            "inventory.released",
            {"order_id": o, "lines": [{"product_id": a, "quantity": 2}], "reason": "cancelled"},
        )
    ]
    assert db.totals(a) == (10, 3, 7)
    got = expired(db, o)
    assert got["data"]["lines"] == [{"product_id": a, "quantity": 3}, {"product_id": b, "quantity": 2}]
    assert not got["as_placed"]
    # 2 released by the cancel + 3 by the expiry = the 5 ordered; the stock agrees.
    assert db.totals(a) == (10, 0, 10) and db.totals(b) == (10, 0, 10)
    assert db.order(o)[0] == "expired"
    db.verify()


def test_a_line_cancelled_whole_is_left_out(db):
    a, b = db.stock({"default": 10}), db.stock({"default": 10})
    o = uid("o")
    assert db.place(o, (a, 4), (b, 2)).outcome == "reserved"
    cancel(db, o, (b, 2))
    assert expired(db, o)["data"]["lines"] == [{"product_id": a, "quantity": 4}]
    assert db.totals(a) == (10, 0, 10) and db.totals(b) == (10, 0, 10)
    db.verify()


def test_backordered_units_cancelled_first_are_not_expired_again(db):
    """An order for 5 with 2 in stock (3 backordered), 1 cancelled (a backordered unit): the
    expiry releases 2 reserved and 2 backordered units, 4."""
    pid = uid("BO")
    db.products.add(pid)
    assert (
        db.one("product.configured", {"product_id": pid, "backorder": {"mode": "allow"}}).outcome
        == "configured"
    )
    assert db.one("stock.adjusted", {"product_id": pid, "delta": 2}).outcome == "adjusted"
    o = uid("o")
    assert db.place(o, (pid, 5)).outcome == "reserved"
    cancel(db, o, (pid, 1))
    with pg(db.settings) as cur:
        cur.execute("SELECT backordered FROM products WHERE product_id = %s", (pid,))
        assert cur.fetchone()[0] == 2
    assert expired(db, o)["data"]["lines"] == [{"product_id": pid, "quantity": 4}]
    with pg(db.settings) as cur:
        cur.execute("SELECT on_hand, reserved, backordered FROM products WHERE product_id = %s", (pid,))
        assert cur.fetchone() == (2, 0, 0)
    db.verify()
