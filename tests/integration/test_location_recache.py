"""The sweeper's re-cache pass after a location flip (spec 2, location.configured), straight
through recache_locations() in a private database (it takes every flipped location in it)."""

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
    with private_settings(settings, "recache") as s:
        conn = psycopg2.connect(**s.database.dsn())
        conn.autocommit = True
        try:
            yield conn.cursor()
        finally:
            conn.close()


def configure(cur, location_id: str, **flags: Any) -> str:
    event_id = str(uuid.uuid4())
    assert (
        apply(cur, "location.configured", {"location_id": location_id, **flags}, event_id)["outcome"]
        == "configured"
    )
    return event_id


def recache(cur, limit: int) -> dict[str, Any]:
    cur.execute("SELECT recache_locations(%s)", (limit,))
    r = cur.fetchone()[0]
    for m in r["messages"]:
        validate_output(m["body"])
    return r


def figures(cur, pids: list[str]) -> dict[str, tuple[int, int]]:
    cur.execute(
        "SELECT product_id, (product_figures(p)->>'available')::int, version FROM products p"
        " WHERE product_id = ANY(%s)",
        (pids,),
    )
    return {r[0]: (r[1], r[2]) for r in cur.fetchall()}


def test_a_flip_recaches_every_product_there_in_batches(cur):
    loc = uid("L")
    configure(cur, loc)
    pids = sorted(uid("RC") for _ in range(5))
    for i, pid in enumerate(pids):  # 3 units at loc; the first two also 2 at default
        apply(cur, "stock.adjusted", {"product_id": pid, "location_id": loc, "on_hand": 3})
        if i < 2:
            apply(cur, "stock.adjusted", {"product_id": pid, "on_hand": 2})
    elsewhere = uid("RC")
    apply(cur, "stock.adjusted", {"product_id": elsewhere, "on_hand": 4})  # no level at loc
    before = figures(cur, pids + [elsewhere])
    assert [before[p][0] for p in pids] == [5, 5, 3, 3, 3]
    assert recache(cur, 2)["count"] == 0  # nothing flipped

    configure(cur, loc, priority=3)  # no flip: nothing to do
    assert recache(cur, 2)["count"] == 0
    flip = configure(cur, loc, active=False)
    batches = [recache(cur, 2) for _ in range(3)]
    assert [(b["count"], b["more"]) for b in batches] == [(2, True), (2, True), (1, False)]
    assert [f["product_id"] for b in batches for f in b["products"]] == pids  # product_id order
    after = figures(cur, pids + [elsewhere])
    assert {p: after[p] for p in pids} == {p: (before[p][0] - 3, before[p][1] + 1) for p in pids}
    assert after[elsewhere] == before[elsewhere]  # not re-cached
    assert [f["available"] for b in batches for f in b["products"]] == [2, 2, 0, 0, 0]
    # the three products whose `available` fell from 3 to 0 are low (threshold 0), as the flip said
    assert [
        (m["routing_key"], m["body"]["data"], m["body"]["causation_id"])
        for b in batches
        for m in b["messages"]
    ] == [("inventory.low_stock", {"product_id": p, "available": 0, "threshold": 0}, flip) for p in pids[2:]]
    assert recache(cur, 2)["count"] == 0  # done

    flip = configure(cur, loc, active=True)
    r = recache(cur, 10)
    assert (r["count"], r["more"]) == (5, False)
    assert [(m["routing_key"], m["body"]["data"], m["body"]["causation_id"]) for m in r["messages"]] == [
        ("inventory.back_in_stock", {"product_id": p, "available": 3}, flip) for p in pids[2:]
    ]
    assert {p: f[0] for p, f in figures(cur, pids).items()} == {p: before[p][0] for p in pids}

    # Flipped and flipped back before the pass: re-cached (the detail view shows the flags), no messages.
    configure(cur, loc, fulfils_orders=False)
    configure(cur, loc, fulfils_orders=True)
    r = recache(cur, 10)
    assert (r["count"], r["messages"]) == (5, [])
    cur.execute("SELECT count(*) FROM location_recache")
    assert cur.fetchone()[0] == 0


def test_a_flip_of_default_recaches_default_only_products(cur):
    a, b = uid("RD"), uid("RD")
    for pid in (a, b):
        apply(cur, "stock.adjusted", {"product_id": pid, "on_hand": 4})
    before = figures(cur, [a, b])
    flip = configure(cur, "default", fulfils_orders=False)
    try:
        r = recache(cur, 100000)
    finally:
        configure(cur, "default", fulfils_orders=True)
    assert r["more"] is False
    got = {
        f["product_id"]: (f["available"], f["version"]) for f in r["products"] if f["product_id"] in (a, b)
    }
    assert got == {a: (0, before[a][1] + 1), b: (0, before[b][1] + 1)}
    mine = [m["body"] for m in r["messages"] if m["body"]["data"]["product_id"] in (a, b)]
    assert [(m["type"], m["data"]["product_id"], m["causation_id"]) for m in mine] == [
        ("inventory.low_stock", p, flip) for p in sorted([a, b])
    ]
    r = recache(cur, 100000)  # back on: back in stock
    assert {
        m["body"]["data"]["product_id"]: m["body"]["data"]["available"]
        for m in r["messages"]
        if m["body"]["data"]["product_id"] in (a, b)
    } == {a: 4, b: 4}
