"""Stock across locations, stock side (spec sections 2, 3, 8, 9): raw events through
apply_events (the Python contract for the new types comes later), on a private database
(locations and channels are global configuration; verify reads the whole database)."""

from __future__ import annotations

import subprocess
import threading
import uuid
from pathlib import Path

import psycopg2
import psycopg2.errors
import pytest

from inventory_worker.adapters.migrations import migrate
from inventory_worker.adapters.postgres import Store

from ..private_stack import apply, private_settings
from ..support import REPO, drop_database, pg, uid, wait_for_lock_waiter


@pytest.fixture(scope="module")
def db(settings):
    with private_settings(settings, "locstock") as s:
        with pg(s) as cur:
            for loc in ("store", "depot"):
                apply(cur, "location.configured", {"location_id": loc, "priority": 1})
        yield s


def ev(type_, data):
    return {"id": str(uuid.uuid4()), "type": type_, "data": data}


def datas(result, type_=None):
    return [m["body"]["data"] for m in result["messages"] if type_ is None or m["routing_key"] == type_]


def types(result):
    return [m["routing_key"] for m in result["messages"]]


def level(s, product_id, location_id):
    with pg(s) as cur:
        cur.execute("SELECT product_detail(%s)", (product_id,))
        detail = cur.fetchone()[0]
    return next((x for x in detail["locations"] if x["location_id"] == location_id), None), detail


def mismatches(s):
    with pg(s) as cur:
        cur.execute("SELECT product_id, figure, source FROM stock_mismatches()")
        return sorted(cur.fetchall())


def test_change_from_refuses_stale_and_applies_current(db):
    p = uid("CAS")
    with pg(db) as cur:
        apply(cur, "stock.adjusted", {"product_id": p, "on_hand": 10})
        out = apply(cur, "stock.adjusted", {"product_id": p, "on_hand": 4, "change_from": 9})
        assert out["outcome"] == "rejected"
        # at default the refusal keeps today's fields, plus `current` (decision 13.4)
        assert datas(out) == [
            {"product_id": p, "reason": "stale", "on_hand": 10, "reserved": 0, "requested": 4, "current": 10}
        ]
        out = apply(cur, "stock.adjusted", {"product_id": p, "delta": -6, "change_from": 10})
        assert out["outcome"] == "adjusted"
        assert datas(out) == [{"product_id": p, "on_hand": 4, "reserved": 0, "available": 4}]
        out = apply(cur, "stock.adjusted", {"product_id": p, "incoming": 20, "change_from": 1})
        assert datas(out)[0]["reason"] == "stale" and datas(out)[0]["current"] == 0
        assert datas(out)[0]["name"] == "incoming"
    assert mismatches(db) == []


def test_two_racing_counts_with_the_same_change_from_apply_exactly_once(db):
    p = uid("RACE")
    with pg(db) as cur:
        apply(cur, "stock.adjusted", {"product_id": p, "on_hand": 10})
    first, second = Store(db.database), Store(db.database)
    results = {}
    # The first count holds the product locked, uncommitted, while the second one waits for it.
    conn = first.connect()
    conn.autocommit = False
    cur = conn.cursor()
    cur.execute(
        "SELECT apply_events(%s::jsonb)",
        (psycopg2.extras.Json([ev("stock.adjusted", {"product_id": p, "on_hand": 7, "change_from": 10})]),),
    )
    results["first"] = cur.fetchone()[0][0]
    t = threading.Thread(
        target=lambda: results.__setitem__(
            "second",
            second.apply_batch([ev("stock.adjusted", {"product_id": p, "on_hand": 3, "change_from": 10})])[0],
        )
    )
    t.start()
    wait_for_lock_waiter(db, conn.get_backend_pid())
    conn.commit()
    t.join(20)
    first.close()
    second.close()
    assert results["first"]["outcome"] == "adjusted"
    assert results["second"].outcome == "rejected"
    assert results["second"].messages[0].body["data"]["reason"] == "stale"
    assert results["second"].messages[0].body["data"]["current"] == 7
    with pg(db) as c:
        c.execute("SELECT on_hand FROM products WHERE product_id = %s", (p,))
        assert c.fetchone()[0] == 7


@pytest.mark.parametrize("atomic", [True, False])
def test_bulk_of_1000_with_one_invalid_item(db, atomic):
    ps = [uid("BULK") for _ in range(1000)]
    items = [{"product_id": x, "delta": 5} for x in ps]
    items[500] = {"product_id": ps[500], "on_hand": 5, "location_id": "nowhere"}
    store = Store(db.database)
    try:
        out = store.apply_batch([ev("stock.adjusted", {"items": items, "atomic": atomic})])[0]
    finally:
        store.close()
    reasons = [m.body["data"].get("reason") for m in out.messages]
    assert [m.body["data"]["index"] for m in out.messages] == list(range(1000))
    assert reasons[500] == "unknown_location"
    with pg(db) as cur:
        cur.execute("SELECT count(*) FROM products WHERE product_id = ANY(%s)", (ps,))
        stored = cur.fetchone()[0]
    if atomic:
        assert out.outcome == "rejected"
        assert reasons.count("batch_rejected") == 999
        assert stored == 0  # a refused first adjustment leaves no product
    else:
        assert out.outcome == "adjusted"
        assert [m.routing_key for m in out.messages].count("inventory.adjusted") == 999
        assert stored == 999 and len(out.products) == 999
        first = out.messages[0].body["data"]
        assert first["location_id"] == "default" and first["location"]["on_hand"] == 5
    assert mismatches(db) == []


def test_transfer_in_transit_then_receipt(db):
    p = uid("TR")
    transfer_id = uid("T")
    with pg(db) as cur:
        apply(cur, "stock.adjusted", {"product_id": p, "on_hand": 10})
        data = {
            "transfer_id": transfer_id,
            "from_location_id": "default",
            "to_location_id": "store",
            "lines": [{"product_id": p, "quantity": 4}],
            "in_transit": True,
            "reference": "TO-1",
        }
        out = apply(cur, "stock.transferred", data)
        assert out["outcome"] == "transferred"
        assert datas(out, "inventory.moved") == [
            {
                "kind": "transfer",
                "transfer_id": transfer_id,
                "from_location_id": "default",
                "to_location_id": "store",
                "in_transit": True,
                "lines": [{"product_id": p, "quantity": 4}],
            }
        ]
        # the same transfer_id under another message id: nothing changes, nothing published
        again = apply(cur, "stock.transferred", data)
        assert (again["outcome"], again["messages"]) == ("duplicate_transfer", [])
        source, detail = level(db, p, "default")
        dest, _ = level(db, p, "store")
        assert (source["on_hand"], dest["on_hand"], dest["incoming"]) == (6, 0, 4)
        assert (detail["on_hand"], detail["incoming"], detail["available"]) == (6, 4, 6)
        out = apply(cur, "stock.received", {"product_id": p, "location_id": "store", "quantity": 5})
        assert out["outcome"] == "received"
        moved = datas(out, "inventory.moved")[0]
        assert (moved["kind"], moved["quantity"], moved["unexpected"]) == ("receipt", 5, 1)
        assert (moved["location"]["on_hand"], moved["location"]["incoming"]) == (5, 0)
        # more than the source can give: refused whole
        out = apply(
            cur,
            "stock.transferred",
            {
                "transfer_id": uid("T"),
                "from_location_id": "store",
                "to_location_id": "depot",
                "lines": [{"product_id": p, "quantity": 6}],
            },
        )
        assert out["outcome"] == "rejected"
        assert [d["reason"] for d in datas(out)] == ["insufficient_quantity"]
    assert mismatches(db) == []


def test_moved_beyond_sellable_minus_reserved_is_refused(db):
    p = uid("MV")
    with pg(db) as cur:
        apply(cur, "stock.adjusted", {"product_id": p, "on_hand": 5})
        assert (
            apply(cur, "order.placed", {"order_id": uid("O"), "lines": [{"product_id": p, "quantity": 3}]})[
                "outcome"
            ]
            == "reserved"
        )
        move = {"product_id": p, "quantity": 3, "from": "sellable", "to": "damaged"}
        out = apply(cur, "stock.moved", move)
        assert out["outcome"] == "rejected"
        assert datas(out)[0]["reason"] == "insufficient_quantity"
        out = apply(cur, "stock.moved", dict(move, quantity=2))
        assert out["outcome"] == "moved"
        state = datas(out, "inventory.moved")[0]
        assert state["location"] == {
            "on_hand": 5,
            "reserved": 3,
            "available": 0,
            "damaged": 2,
            "quality_control": 0,
            "incoming": 0,
            "safety_stock": 0,
        }
        assert out["products"][0]["available"] == 0
        out = apply(cur, "stock.moved", {"product_id": p, "quantity": 1, "from": "damaged", "to": "disposed"})
        assert out["products"][0]["on_hand"] == 4
        out = apply(
            cur,
            "stock.moved",
            {"product_id": uid("NOPE"), "quantity": 1, "from": "damaged", "to": "sellable"},
        )
        assert datas(out)[0]["reason"] == "unknown_product"
    assert mismatches(db) == []


def test_safety_stock_floor_lowers_available(db):
    p = uid("SAFE")
    with pg(db) as cur:
        apply(cur, "stock.adjusted", {"product_id": p, "on_hand": 5})
        out = apply(
            cur,
            "product.configured",
            {"product_id": p, "safety_stock": [{"location_id": "default", "quantity": 2}]},
        )
        assert out["outcome"] == "configured"
        assert datas(out, "inventory.configured") == [
            {
                "kind": "product",
                "product_id": p,
                "tracked": True,
                "low_stock_threshold": 0,
                "max_per_order": None,
                "backorder": {"mode": "deny", "limit": None, "until": None},
                "safety_stock": [{"location_id": "default", "quantity": 2}],
            }
        ]
        assert out["products"][0]["available"] == 3
        default, detail = level(db, p, "default")
        assert (detail["available"], default["available"], default["safety_stock"]) == (3, 3, 2)
        # still default-only: the figures stay in the products row
        cur.execute("SELECT multi_location FROM products WHERE product_id = %s", (p,))
        assert cur.fetchone()[0] is False
        out = apply(
            cur,
            "product.configured",
            {"product_id": p, "safety_stock": [{"location_id": "nowhere", "quantity": 1}]},
        )
        assert datas(out) == [
            {"kind": "product", "id": p, "reason": "unknown_location", "detail": "unknown location: nowhere"}
        ]


def test_back_in_stock_on_the_rise_from_zero(db):
    p, q = uid("BIS"), uid("BIS")
    with pg(db) as cur:
        # created by its first adjustment: no transition
        assert "inventory.back_in_stock" not in types(
            apply(cur, "stock.adjusted", {"product_id": p, "on_hand": 2})
        )
        apply(cur, "stock.adjusted", {"product_id": p, "on_hand": 0})
        out = apply(cur, "stock.adjusted", {"product_id": p, "delta": 3})
        assert datas(out, "inventory.back_in_stock") == [{"product_id": p, "available": 3}]
        assert "inventory.back_in_stock" not in types(
            apply(cur, "stock.adjusted", {"product_id": p, "delta": 1})
        )
        # created at 0 by product.configured, then stocked: fires
        apply(cur, "product.configured", {"product_id": q, "tracked": True})
        out = apply(cur, "stock.received", {"product_id": q, "location_id": "store", "quantity": 2})
        assert datas(out, "inventory.back_in_stock") == [{"product_id": q, "available": 2}]
        # move to sellable, and a lowered safety stock, raise available from 0 too
        apply(
            cur,
            "stock.moved",
            {
                "product_id": q,
                "location_id": "store",
                "quantity": 2,
                "from": "sellable",
                "to": "quality_control",
            },
        )
        out = apply(
            cur,
            "stock.moved",
            {
                "product_id": q,
                "location_id": "store",
                "quantity": 1,
                "from": "quality_control",
                "to": "sellable",
            },
        )
        assert datas(out, "inventory.back_in_stock") == [{"product_id": q, "available": 1}]
        out = apply(
            cur,
            "product.configured",
            {"product_id": q, "safety_stock": [{"location_id": "store", "quantity": 1}]},
        )
        assert datas(out, "inventory.low_stock") == [{"product_id": q, "available": 0, "threshold": 0}]
        out = apply(
            cur,
            "product.configured",
            {"product_id": q, "safety_stock": [{"location_id": "store", "quantity": 0}]},
        )
        assert datas(out, "inventory.back_in_stock") == [{"product_id": q, "available": 1}]
    assert mismatches(db) == []


def test_checks_refuse_an_oversold_level_written_by_hand(db):
    p = uid("CHK")
    with pg(db) as cur:
        apply(cur, "stock.adjusted", {"product_id": p, "on_hand": 5, "location_id": "store"})
        for sql in (
            "UPDATE stock_levels SET reserved = 6 WHERE product_id = %s AND location_id = 'store'",
            "UPDATE stock_levels SET damaged = 3, reserved = 3 WHERE product_id = %s AND location_id = 'store'",
            "UPDATE stock_levels SET damaged = 4, quality_control = 2 WHERE product_id = %s",
            "UPDATE products SET damaged = 1, reserved = 5 WHERE product_id = %s",
        ):
            with pytest.raises(psycopg2.errors.CheckViolation):
                cur.execute(sql, (p,))


def test_verify_detects_a_hand_made_mismatch_in_each_new_figure(db):
    p, d = uid("VER"), uid("VER")
    with pg(db) as cur:
        apply(cur, "stock.adjusted", {"product_id": p, "on_hand": 8, "location_id": "store"})
        apply(cur, "stock.adjusted", {"product_id": p, "incoming": 4, "location_id": "store"})
        apply(
            cur,
            "stock.moved",
            {"product_id": p, "location_id": "store", "quantity": 2, "from": "sellable", "to": "damaged"},
        )
        apply(
            cur,
            "stock.moved",
            {
                "product_id": p,
                "location_id": "store",
                "quantity": 1,
                "from": "sellable",
                "to": "quality_control",
            },
        )
        apply(cur, "stock.adjusted", {"product_id": d, "on_hand": 5})
        # an order held at `store` by allocation rows, as the order side writes them
        order = uid("O")
        cur.execute(
            "INSERT INTO orders (order_id, status, allocated) VALUES (%s, 'reserved', true)", (order,)
        )
        cur.execute(
            "INSERT INTO order_lines (order_id, product_id, line_no, quantity) VALUES (%s, %s, 1, 2)",
            (order, p),
        )
        cur.execute(
            "INSERT INTO order_allocations (order_id, product_id, location_id, position, reserved)"
            " VALUES (%s, %s, 'store', 1, 2)",
            (order, p),
        )
        cur.execute(
            "SELECT change_level(%s, 'store', 0, 2, 0, 0, 0, 'reserve', %s, gen_random_uuid())", (p, order)
        )
    assert [m for m in mismatches(db) if m[0] in (p, d)] == []
    cases = [
        (
            "UPDATE stock_levels SET damaged = damaged - 1 WHERE product_id = %s AND location_id = 'store'",
            p,
            [(p, "damaged", "levels"), (p, "damaged at store", "ledger")],
        ),
        (
            "UPDATE stock_levels SET quality_control = quality_control + 1 WHERE product_id = %s"
            " AND location_id = 'store'",
            p,
            [(p, "quality_control", "levels"), (p, "quality_control at store", "ledger")],
        ),
        (
            "UPDATE stock_levels SET incoming = incoming + 3 WHERE product_id = %s AND location_id = 'store'",
            p,
            [(p, "incoming", "levels"), (p, "incoming at store", "ledger")],
        ),
        (
            "UPDATE stock_levels SET on_hand = on_hand + 1 WHERE product_id = %s AND location_id = 'default'",
            p,
            [(p, "on_hand", "levels"), (p, "on_hand at default", "ledger")],
        ),
        ("UPDATE stock_levels SET safety_stock = 1 WHERE product_id = %s AND location_id = 'store'", p, []),
        ("UPDATE products SET safety_stock = 1 WHERE product_id = %s", p, [(p, "safety_stock", "levels")]),
        ("UPDATE products SET incoming = incoming + 1 WHERE product_id = %s", p, [(p, "incoming", "levels")]),
        (
            "UPDATE order_allocations SET reserved = 1 WHERE product_id = %s",
            p,
            [(p, "reserved at store", "reservations"), (p, f"quantity of order {order}", "orders")],
        ),
        ("UPDATE products SET damaged = 1 WHERE product_id = %s", d, [(d, "damaged", "ledger")]),
        (
            "UPDATE products SET quality_control = 1 WHERE product_id = %s",
            d,
            [(d, "quality_control", "ledger")],
        ),
        ("UPDATE products SET incoming = 1 WHERE product_id = %s", d, [(d, "incoming", "ledger")]),
    ]
    for sql, product_id, expected in cases:
        with pg(db) as cur:
            cur.execute("BEGIN")
            cur.execute(sql, (product_id,))
            cur.execute(
                "SELECT product_id, figure, source FROM stock_mismatches() WHERE product_id IN (%s, %s)",
                (p, d),
            )
            found = sorted(cur.fetchall())
            cur.execute("ROLLBACK")
        assert found == sorted(expected), sql


def test_default_only_traffic_writes_no_level_or_allocation_rows(db):
    p = uid("DEF")
    with pg(db) as cur:
        apply(
            cur,
            "stock.adjusted",
            {"product_id": p, "on_hand": 5, "location_id": "default", "reference": "C-1"},
        )
        apply(cur, "order.placed", {"order_id": uid("O"), "lines": [{"product_id": p, "quantity": 2}]})
        cur.execute(
            "SELECT (SELECT count(*) FROM stock_levels WHERE product_id = %s),"
            " (SELECT count(*) FROM order_allocations WHERE product_id = %s),"
            " (SELECT multi_location FROM products WHERE product_id = %s)",
            (p, p, p),
        )
        assert cur.fetchone() == (0, 0, False)
        cur.execute("SELECT location_id, reference FROM stock_history(%s, 10) ORDER BY id", (p,))
        assert cur.fetchall() == [("default", "C-1"), ("default", None)]


def _base_sql(out: Path) -> Path:
    """The sql/ folder as it was just before 080_locations.sql was added (from git history),
    written under `out`."""
    added = subprocess.run(
        ["git", "log", "--diff-filter=A", "--format=%H", "-1", "--", "sql/migrations/080_locations.sql"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert added, "the git history of sql/migrations/080_locations.sql is needed"
    base = f"{added}^"
    archive = subprocess.run(
        ["git", "archive", base, "sql"], cwd=REPO, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out / "sql"


def test_verify_passes_right_after_migrating_an_existing_database(settings, tmp_path):
    s = settings.model_copy(
        update={
            "database": settings.database.model_copy(
                update={"dbname": f"{settings.database.dbname}_premig_{uuid.uuid4().hex[:6]}"}
            )
        }
    )
    try:
        migrate(s.database, _base_sql(tmp_path))
        p = uid("MIG")
        with pg(s) as cur:
            apply(cur, "stock.adjusted", {"product_id": p, "on_hand": 20})
            done, live, gone = uid("O"), uid("O"), uid("O")
            for order in (done, live, gone):
                apply(cur, "order.placed", {"order_id": order, "lines": [{"product_id": p, "quantity": 3}]})
            apply(cur, "order.completed", {"order_id": done})
            apply(cur, "order.cancelled", {"order_id": gone})
        migrate(s.database)
        assert mismatches(s) == []
        with pg(s) as cur:
            cur.execute("SELECT order_id, fulfilled, released FROM order_lines ORDER BY order_id")
            assert sorted(cur.fetchall()) == sorted([(done, 3, 0), (live, 0, 0), (gone, 0, 3)])
            cur.execute("SELECT product_figures(p) FROM products p")
            assert cur.fetchone()[0]["available"] == 14
    finally:
        drop_database(s)
