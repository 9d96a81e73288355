"""A redelivered event of any kind returns the current figures of every product it changed.

A worker that dies between its commit and its cache write leaves the cache behind; the
redelivered batch is all duplicates, and only their figures can put the cache right. The
products come from what the event names (named_products()), not from the ledger: each event
of a story over every stock-changing type is applied once, then again under its own id, and
the duplicate must carry, for every product with a ledger row of that event, the product's
figures as they are now.
"""

from __future__ import annotations

import uuid

import pytest

from ..private_stack import apply, private_settings
from ..support import pg, uid


@pytest.fixture(scope="module")
def db(settings):
    with private_settings(settings, "dupfig") as s:
        with pg(s) as cur:
            apply(cur, "location.configured", {"location_id": "store", "priority": 1})
        yield s


def story(p: str, q: str, r: str, bo: str) -> list[tuple[str, dict]]:
    """Every stock-changing event type, each changing a product the next ones build on."""
    o1, o2, o3, o4 = (uid("O") for _ in range(4))
    return [
        ("stock.adjusted", {"items": [{"product_id": p, "delta": 10}, {"product_id": q, "on_hand": 8}]}),
        ("stock.adjusted", {"product_id": r, "delta": 6, "low_stock_threshold": 2}),
        ("stock.received", {"product_id": r, "location_id": "store", "quantity": 4}),
        (
            "stock.transferred",
            {
                "transfer_id": uid("T"),
                "from_location_id": "default",
                "to_location_id": "store",
                "lines": [{"product_id": p, "quantity": 2}, {"product_id": q, "quantity": 1}],
            },
        ),
        ("stock.moved", {"product_id": q, "quantity": 1, "from": "sellable", "to": "damaged"}),
        (
            "order.placed",
            {"order_id": o1, "lines": [{"product_id": p, "quantity": 2}, {"product_id": r, "quantity": 1}]},
        ),
        ("order.placed", {"order_id": o2, "lines": [{"product_id": q, "quantity": 2}]}),
        ("order.placed", {"order_id": o3, "lines": [{"product_id": p, "quantity": 1}]}),
        ("order.cancelled", {"order_id": o2}),
        ("order.completed", {"order_id": o3}),
        (
            "order.fulfilled",
            {"order_id": o1, "fulfilment_id": uid("F"), "lines": [{"product_id": p, "quantity": 2}]},
        ),
        (
            "order.returned",
            {
                "order_id": o1,
                "return_id": uid("R"),
                "lines": [{"product_id": p, "quantity": 1, "condition": "sellable"}],
            },
        ),
        ("product.configured", {"product_id": bo, "backorder": {"mode": "allow", "limit": 5}}),
        ("order.placed", {"order_id": o4, "lines": [{"product_id": bo, "quantity": 3}]}),  # backordered
        ("stock.adjusted", {"product_id": bo, "delta": 3}),  # fills o4's backorder
    ]


def test_a_duplicate_returns_the_figures_of_every_product_its_event_changed(db):
    p, q, r, bo = uid("DP"), uid("DQ"), uid("DR"), uid("DB")
    applied = []
    with pg(db) as cur:
        for type_, data in story(p, q, r, bo):
            event_id = str(uuid.uuid4())
            out = apply(cur, type_, data, event_id)
            assert out["outcome"] not in ("rejected", "ignored"), (type_, out)
            applied.append((event_id, type_, data))
        cur.execute("SELECT DISTINCT reason FROM stock_movements WHERE event_id = %s", (applied[-1][0],))
        assert "backorder_fill" in {row[0] for row in cur.fetchall()}  # the fill really happened

        changed_by_some = set()
        for event_id, type_, data in applied:
            again = apply(cur, type_, data, event_id)
            assert (again["outcome"], again["messages"]) == ("duplicate", []), type_
            cur.execute("SELECT DISTINCT product_id FROM stock_movements WHERE event_id = %s", (event_id,))
            changed = {row[0] for row in cur.fetchall()}
            returned = {f["product_id"]: f for f in again["products"]}
            assert changed <= set(returned), (type_, changed, set(returned))
            cur.execute(
                "SELECT product_id, product_figures(p) FROM products p WHERE product_id = ANY(%s)",
                (list(returned),),
            )
            assert dict(cur.fetchall()) == returned, type_
            changed_by_some |= changed
    assert changed_by_some == {p, q, r, bo}
