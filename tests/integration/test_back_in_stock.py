"""inventory.back_in_stock on the default-only paths (spec 5, decision 13.7: any cause, the
sweeper included): a cancel through move_stock() and the sweeper's set-based expiry, straight
through the stored procedures of a private database (a sweep takes every due order in it).
"""

from __future__ import annotations

import uuid
from typing import Any

import psycopg2
import pytest

from inventory_worker.contract import validate_output

from ..private_stack import apply, private_settings
from ..support import uid


@pytest.fixture(scope="module")
def cur(settings):
    with private_settings(settings, "bis") as s:
        conn = psycopg2.connect(**s.database.dsn())
        conn.autocommit = True
        try:
            yield conn.cursor()
        finally:
            conn.close()


def typed(result: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    for m in result["messages"]:
        validate_output(m["body"])
    return [(m["routing_key"], m["body"]["data"]) for m in result["messages"]]


def stock(cur, on_hand: int) -> str:
    pid = uid("BIS")
    assert apply(cur, "stock.adjusted", {"product_id": pid, "on_hand": on_hand})["outcome"] == "adjusted"
    return pid


def place(cur, *lines: tuple[str, int]) -> tuple[str, str]:
    order, placed_id = uid("o"), str(uuid.uuid4())
    r = apply(
        cur,
        "order.placed",
        {"order_id": order, "lines": [{"product_id": p, "quantity": q} for p, q in lines]},
        placed_id,
    )
    assert r["outcome"] == "reserved"
    return order, placed_id


def available(cur, pid: str) -> int:
    cur.execute("SELECT product_figures(p)->>'available' FROM products p WHERE product_id = %s", (pid,))
    return int(cur.fetchone()[0])


def test_a_cancel_from_zero_is_back_in_stock(cur):
    a, b = stock(cur, 3), stock(cur, 5)
    order, _ = place(cur, (a, 3), (b, 2))
    cancel_id = str(uuid.uuid4())
    r = apply(cur, "order.cancelled", {"order_id": order}, cancel_id)
    assert typed(r) == [
        (
            "inventory.released",
            {
                "order_id": order,
                "lines": [{"product_id": a, "quantity": 3}, {"product_id": b, "quantity": 2}],
                "reason": "cancelled",
            },
        ),
        ("inventory.back_in_stock", {"product_id": a, "available": 3}),
    ]  # b was at 3: no transition
    assert {m["body"]["causation_id"] for m in r["messages"]} == {cancel_id}


def test_no_back_in_stock_when_available_was_above_zero(cur):
    a = stock(cur, 5)
    order, _ = place(cur, (a, 4))
    r = apply(cur, "order.cancelled", {"order_id": order})
    assert [t for t, _ in typed(r)] == ["inventory.released"]
    assert available(cur, a) == 5


def _sweep(cur, orders: list[str]) -> dict[str, Any]:
    cur.execute(
        "UPDATE orders SET expires_at = now() - interval '1 millisecond' WHERE order_id = ANY(%s)", (orders,)
    )
    cur.execute("SELECT expire_reservations(500)")
    return cur.fetchone()[0]


def test_a_sweep_from_zero_is_back_in_stock_once_per_product(cur):
    p, q, r = stock(cur, 6), stock(cur, 10), stock(cur, 4)
    o1, id1 = place(cur, (p, 2), (q, 3))
    o2, id2 = place(cur, (p, 4))
    o3, id3 = place(cur, (q, 2), (r, 4))
    assert (available(cur, p), available(cur, q), available(cur, r)) == (0, 5, 0)
    swept = _sweep(cur, [o1, o2, o3])
    assert swept["expired"] == 3
    out = typed(swept)
    # The orders' own messages first (as before), then one back_in_stock per product that rose
    # from 0 (p: two orders released it; q was at 5), in product_id order.
    assert [(t, d.get("order_id")) for t, d in out[:3]] == [
        ("inventory.expired", o) for o in sorted([o1, o2, o3])
    ]
    back = sorted([(p, 6, sorted([(o1, id1), (o2, id2)])[0][1]), (r, 4, id3)])
    assert [
        (m["routing_key"], m["body"]["data"], m["body"]["causation_id"]) for m in swept["messages"][3:]
    ] == [
        ("inventory.back_in_stock", {"product_id": pid, "available": n}, caused_by)
        for pid, n, caused_by in back
    ]
    assert {f["product_id"]: f["available"] for f in swept["products"]} == {p: 6, q: 10, r: 4}
    cur.execute(
        "SELECT count(*) FROM outbox WHERE routing_key = 'inventory.back_in_stock'"
        " AND body->'data'->>'product_id' = ANY(%s)",
        ([p, q, r],),
    )
    assert cur.fetchone()[0] == 2


def test_a_sweep_that_leaves_available_at_zero_or_above_it_says_nothing(cur):
    # q: at 5 before the sweep; s: below its safety stock floor before and after.
    q, s = stock(cur, 10), stock(cur, 5)
    o1, _ = place(cur, (q, 5))
    apply(
        cur,
        "product.configured",
        {"product_id": s, "safety_stock": [{"location_id": "default", "quantity": 2}]},
    )
    o2, _ = place(cur, (s, 1))
    o3, _ = place(cur, (s, 2))
    assert (
        apply(
            cur,
            "product.configured",
            {"product_id": s, "safety_stock": [{"location_id": "default", "quantity": 4}]},
        )["outcome"]
        == "configured"
    )
    assert (available(cur, q), available(cur, s)) == (5, 0)  # s: 5 - 3 reserved - 4 = -2, floored
    swept = _sweep(cur, [o1, o2])  # s: 5 - 2 - 4 = -1: still 0
    assert [t for t, _ in typed(swept)] == ["inventory.expired", "inventory.expired"]
    assert (available(cur, q), available(cur, s)) == (10, 0)
    swept = _sweep(cur, [o3])  # s: 5 - 0 - 4 = 1
    assert typed(swept)[1:] == [("inventory.back_in_stock", {"product_id": s, "available": 1})]
