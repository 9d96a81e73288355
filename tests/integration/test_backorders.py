"""Backorders and preorders (spec 1, 2, 4.1, 4.3, 4.5, 4.8; acceptance checks 5, 6, 7), through
Store.apply_batch with raw events against the real database; every result event is checked
against the output contract and `verify` (stock_mismatches()) stays clean.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg2.errors
import pytest

from inventory_worker.adapters.postgres import Outcome, Store, TransientError
from inventory_worker.contract import validate_output

from ..private_stack import private_settings
from ..support import pg, uid
from .test_locations_orders import Db, ev, msgs, reserved


class BackorderDb(Db):
    def apply(self, *events: dict[str, Any]) -> list[Outcome]:
        outs = super().apply(*events)
        for o in outs:
            for m in o.messages:
                validate_output(m.body)
        return outs

    def product(self, pid: str | None = None, *, stock: int = 0, **backorder: Any) -> str:
        """A product configured by product.configured (backorder policy), stocked by stock.adjusted."""
        pid = pid or uid("BO")
        self.products.add(pid)
        out = self.one("product.configured", {"product_id": pid, "backorder": backorder})
        assert out.outcome == "configured", out
        if stock:
            assert self.one("stock.adjusted", {"product_id": pid, "delta": stock}).outcome == "adjusted"
        return pid

    def backordered(self, pid: str) -> int:
        with pg(self.settings) as cur:
            cur.execute("SELECT backordered FROM products WHERE product_id = %s", (pid,))
            return cur.fetchone()[0]

    def lines(self, order_id: str) -> list[tuple[str, int, int]]:
        with pg(self.settings) as cur:
            cur.execute(
                "SELECT product_id, quantity, backordered FROM order_lines WHERE order_id = %s"
                " ORDER BY line_no",
                (order_id,),
            )
            return cur.fetchall()

    def detail(self, pid: str) -> dict[str, Any]:
        with pg(self.settings) as cur:
            cur.execute("SELECT product_detail(%s)", (pid,))
            return cur.fetchone()[0]


@pytest.fixture(scope="module")
def settings(settings):
    """A database of this module's own: these tests sweep and fill by hand, and the run's shared
    workers' sweepers would otherwise take the orders first in the shared database."""
    with private_settings(settings, "backorders") as s:
        yield s


@pytest.fixture
def store(settings) -> Any:
    s = Store(settings.database, settings.worker.default_reservation_ttl_seconds)
    yield s
    s.close()


@pytest.fixture
def db(settings, store) -> BackorderDb:
    return BackorderDb(settings, store)


def allocated(
    order_id: str,
    pid: str,
    quantity: int,
    allocations: list[tuple[str, int]],
    backordered: int,
    channel: str = "default",
) -> tuple[str, dict[str, Any]]:
    return (
        "inventory.allocated",
        {
            "order_id": order_id,
            "channel_id": channel,
            "lines": [
                {
                    "product_id": pid,
                    "quantity": quantity,
                    "tracked": True,
                    "allocations": [{"location_id": loc, "quantity": q} for loc, q in allocations],
                    "backordered": backordered,
                }
            ],
        },
    )


def filled(order_id: str, lines: list[tuple[str, str, int]], remaining: list[tuple[str, int]]):
    return (
        "inventory.backorder_filled",
        {
            "order_id": order_id,
            "lines": [{"product_id": p, "location_id": loc, "quantity": q} for p, loc, q in lines],
            "backordered_remaining": [{"product_id": p, "quantity": q} for p, q in remaining],
        },
    )


def shortage(order_id: str, pid: str, requested: int, available: int):
    return (
        "inventory.rejected",
        {
            "order_id": order_id,
            "reason": "insufficient_stock",
            "shortages": [{"product_id": pid, "requested": requested, "available": available}],
        },
    )


# ==== acceptance check 5: allow, limit 10 =======================================================


def test_allow_backorders_within_the_limit_then_fill_fifo_and_complete(db):
    pid = db.product(stock=5, mode="allow", limit=10)
    a, b = uid("o"), uid("o")

    out = db.place(a, (pid, 12))
    assert out.outcome == "reserved"
    assert msgs(out) == [
        reserved(a, (pid, 12)),
        allocated(a, pid, 12, [("default", 5)], 7),
        ("inventory.low_stock", {"product_id": pid, "available": 0, "threshold": 0}),
    ]
    assert db.backordered(pid) == 7 and db.lines(a) == [(pid, 12, 7)]
    assert db.totals(pid) == (5, 5, 0)
    d = db.detail(pid)
    assert (d["available"], d["orderable"], d["backordered"]) == (0, 3, 7)
    assert d["backorder"] == {"mode": "allow", "limit": 10, "until": None, "headroom": 3}

    # another order for 4: only 3 more may be promised
    assert msgs(db.place(b, (pid, 4))) == [shortage(b, pid, 4, 3)]
    assert db.order(b) is None and db.backordered(pid) == 7

    # backordered units cannot be committed
    out = db.one("order.completed", {"order_id": a})
    assert msgs(out) == [
        ("inventory.rejected", {"order_id": a, "reason": "backorder_pending", "shortages": []})
    ]
    assert db.totals(pid) == (5, 5, 0)

    # receiving 7 fills the order in the same transaction
    out = db.one("stock.adjusted", {"product_id": pid, "delta": 7})
    assert out.outcome == "adjusted"
    assert [t for t, _ in msgs(out)] == [
        "inventory.adjusted",
        "inventory.back_in_stock",
        "inventory.backorder_filled",
        "inventory.low_stock",
    ]
    assert msgs(out)[2] == filled(a, [(pid, "default", 7)], [])
    assert out.products == [
        {
            "product_id": pid,
            "on_hand": 12,
            "reserved": 12,
            "available": 0,
            "version": out.products[0]["version"],
        }
    ]
    assert db.backordered(pid) == 0 and db.lines(a) == [(pid, 12, 0)]
    assert db.allocations(a) == [(pid, "default", 1, 12, 0)]
    db.verify()

    out = db.one("order.completed", {"order_id": a})
    assert out.outcome == "committed"
    assert msgs(out)[0] == (
        "inventory.committed",
        {"order_id": a, "lines": [{"product_id": pid, "quantity": 12}]},
    )
    assert db.totals(pid) == (0, 0, 0)
    db.verify()


def test_fill_is_fifo_by_placement_and_partial_fills_report_what_remains(db):
    pid = db.product(mode="allow")  # no limit: orderable is null
    assert db.detail(pid)["orderable"] is None and db.detail(pid)["backorder"]["headroom"] is None
    first, second = uid("z"), uid("a")  # FIFO by created_at, not by order_id
    assert db.place(first, (pid, 3)).outcome == "reserved"
    time.sleep(0.01)
    assert db.place(second, (pid, 4)).outcome == "reserved"
    assert db.backordered(pid) == 7

    out = db.one("stock.adjusted", {"product_id": pid, "delta": 5})
    assert [m for m in msgs(out) if m[0] == "inventory.backorder_filled"] == [
        filled(first, [(pid, "default", 3)], []),
        filled(second, [(pid, "default", 2)], [(pid, 2)]),
    ]
    assert db.backordered(pid) == 2 and db.lines(second) == [(pid, 4, 2)]
    db.verify()

    # cancelling the first frees 3 units: the second order takes 2 of them
    out = db.one("order.cancelled", {"order_id": first})
    assert [t for t, _ in msgs(out)][0] == "inventory.released"
    assert filled(second, [(pid, "default", 2)], []) in msgs(out)
    assert db.totals(pid) == (5, 4, 1)
    db.verify()


def test_a_backorder_placed_earlier_in_the_same_batch_is_filled_by_a_later_receipt(db):
    pid = db.product(mode="allow", limit=3)
    o = uid("o")
    placed, adjusted = db.apply(
        ev("order.placed", {"order_id": o, "lines": [{"product_id": pid, "quantity": 2}]}),
        ev("stock.adjusted", {"product_id": pid, "delta": 5}),
    )
    assert placed.outcome == "reserved" and placed.detail == {}  # apply_events' marker does not leak
    assert filled(o, [(pid, "default", 2)], []) in msgs(adjusted)
    assert adjusted.products[0]["reserved"] == 2
    db.verify()


def test_an_order_of_two_backordered_products_completes_once_both_are_filled(db):
    x, y = db.product(mode="allow"), db.product(mode="incoming", limit=5)
    db.one("stock.adjusted", {"product_id": y, "incoming": 1})
    o = uid("o")
    out = db.one(
        "order.placed",
        {"order_id": o, "lines": [{"product_id": x, "quantity": 2}, {"product_id": y, "quantity": 1}]},
    )
    assert [
        line["backordered"] for t, d in msgs(out) if t == "inventory.allocated" for line in d["lines"]
    ] == [2, 1]
    assert msgs(db.one("stock.adjusted", {"product_id": x, "delta": 2}))[2] == filled(
        o, [(x, "default", 2)], [(y, 1)]
    )
    assert msgs(db.one("order.completed", {"order_id": o}))[0][1]["reason"] == "backorder_pending"
    assert filled(o, [(y, "default", 1)], []) in msgs(
        db.one("stock.received", {"product_id": y, "quantity": 1})
    )
    db.verify()
    out = db.one("order.completed", {"order_id": o})
    assert msgs(out)[0] == (
        "inventory.committed",
        {"order_id": o, "lines": [{"product_id": x, "quantity": 2}, {"product_id": y, "quantity": 1}]},
    )
    assert db.totals(x) == (0, 0, 0) and db.totals(y) == (0, 0, 0)
    db.verify()


def test_allow_backorder_false_never_backorders(db):
    pid = db.product(stock=2, mode="allow", limit=10)
    o = uid("o")
    assert msgs(db.place(o, (pid, 5), allow_backorder=False)) == [shortage(o, pid, 5, 2)]
    assert db.place(o, (pid, 2), allow_backorder=False).outcome == "reserved"
    assert db.backordered(pid) == 0
    db.verify()


def test_a_product_without_policy_is_refused_as_today(db):
    pid = db.product(stock=2, mode="deny")
    o = uid("o")
    assert msgs(db.place(o, (pid, 5))) == [shortage(o, pid, 5, 2)]
    assert msgs(db.place(o, (pid, 2))) == [
        reserved(o, (pid, 2)),
        ("inventory.low_stock", {"product_id": pid, "available": 0, "threshold": 0}),
    ]
    assert db.order(o) == ("reserved", False, None)  # held implicitly, as today


# ==== acceptance check 6: incoming ==============================================================


def test_incoming_mode_headroom_follows_incoming_and_a_receipt_fills(db):
    pid = db.product(mode="incoming")
    assert db.one("stock.adjusted", {"product_id": pid, "incoming": 5}).outcome == "adjusted"
    assert db.detail(pid)["backorder"]["headroom"] == 5
    a, b = uid("o"), uid("o")
    out = db.place(a, (pid, 3))
    assert msgs(out)[:2] == [reserved(a, (pid, 3)), allocated(a, pid, 3, [], 3)]
    assert db.detail(pid)["orderable"] == 2
    assert msgs(db.place(b, (pid, 3))) == [shortage(b, pid, 3, 2)]

    out = db.one("stock.received", {"product_id": pid, "quantity": 3})
    assert out.outcome == "received"
    assert filled(a, [(pid, "default", 3)], []) in msgs(out)
    d = db.detail(pid)
    assert (d["on_hand"], d["reserved"], d["incoming"], d["backordered"]) == (3, 3, 2, 0)
    assert d["backorder"]["headroom"] == 2
    db.verify()


def test_incoming_mode_capped_by_the_limit(db):
    pid = db.product(mode="incoming", limit=1)
    db.one("stock.adjusted", {"product_id": pid, "incoming": 5})
    assert db.detail(pid)["backorder"]["headroom"] == 1
    o = uid("o")
    assert msgs(db.place(o, (pid, 2))) == [shortage(o, pid, 2, 1)]


# ==== acceptance check 7: until ================================================================


def test_until_in_the_past_behaves_as_deny(db):
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    pid = db.product(stock=1, mode="allow", until=past)
    d = db.detail(pid)
    assert d["backorder"]["headroom"] == 0 and d["orderable"] == 1
    o = uid("o")
    assert msgs(db.place(o, (pid, 2))) == [shortage(o, pid, 2, 1)]

    out = db.one("product.configured", {"product_id": pid, "backorder": {"mode": "allow", "until": future}})
    (conf,) = [d for t, d in msgs(out) if t == "inventory.configured"]
    assert conf["backorder"]["mode"] == "allow"
    assert datetime.fromisoformat(conf["backorder"]["until"]) == datetime.fromisoformat(future)
    assert db.place(o, (pid, 2)).outcome == "reserved"
    assert db.backordered(pid) == 1
    db.verify()


# ==== release: cancel, expiry; policy changes ===================================================


def test_expiry_releases_backordered_units_and_completion_after_it_is_refused(db):
    pid = db.product(stock=1, mode="allow", limit=5)
    o = uid("o")
    assert db.place(o, (pid, 3)).outcome == "reserved"
    assert db.backordered(pid) == 2
    db.expire(o)
    assert db.order(o)[0] == "expired"
    assert db.backordered(pid) == 0 and db.totals(pid) == (1, 0, 1)
    db.verify()
    out = db.one("order.completed", {"order_id": o})
    assert msgs(out) == [
        ("inventory.rejected", {"order_id": o, "reason": "backorder_pending", "shortages": []})
    ]
    assert db.totals(pid) == (1, 0, 1)
    db.verify()


def test_full_cancel_releases_backordered_units(db):
    pid = db.product(mode="allow", limit=5)
    o = uid("o")
    assert db.place(o, (pid, 5)).outcome == "reserved"
    assert db.detail(pid)["orderable"] == 0
    out = db.one("order.cancelled", {"order_id": o})
    assert msgs(out) == [
        (
            "inventory.released",
            {"order_id": o, "lines": [{"product_id": pid, "quantity": 5}], "reason": "cancelled"},
        )
    ]
    assert db.backordered(pid) == 0 and db.lines(o) == [(pid, 5, 0)]
    assert db.detail(pid)["orderable"] == 5
    assert out.products[0]["version"] == db.detail(pid)["version"]
    db.verify()


def test_a_lower_limit_is_accepted_and_untracking_waits_for_backorders(db):
    pid = db.product(mode="allow", limit=5)
    assert db.place(uid("o"), (pid, 4)).outcome == "reserved"
    out = db.one("product.configured", {"product_id": pid, "backorder": {"mode": "allow", "limit": 2}})
    assert out.outcome == "configured"
    assert db.detail(pid)["backorder"]["headroom"] == 0
    out = db.one("product.configured", {"product_id": pid, "tracked": False})
    assert msgs(out) == [
        (
            "inventory.configuration_rejected",
            {
                "kind": "product",
                "id": pid,
                "reason": "has_open_reservations",
                "detail": "4 units backordered",
            },
        )
    ]


def test_lowering_safety_stock_fills(db):
    pid = db.product(stock=3, mode="allow")
    db.one(
        "product.configured", {"product_id": pid, "safety_stock": [{"location_id": "default", "quantity": 3}]}
    )
    o = uid("o")
    out = db.place(o, (pid, 2))
    assert msgs(out)[1] == allocated(o, pid, 2, [], 2)
    out = db.one(
        "product.configured", {"product_id": pid, "safety_stock": [{"location_id": "default", "quantity": 1}]}
    )
    assert filled(o, [(pid, "default", 2)], []) in msgs(out)
    db.verify()


# ==== locations and channels ===================================================================


def test_fill_only_at_locations_of_the_orders_channel(db):
    a, b = db.location(0), db.location(1)
    ch = db.channel([a])
    pid = db.product(mode="allow")
    o = uid("o")
    out = db.place(o, (pid, 2), channel_id=ch)
    assert msgs(out)[1] == allocated(o, pid, 2, [], 2, ch)
    out = db.one("stock.received", {"product_id": pid, "location_id": b, "quantity": 5})
    assert [t for t, _ in msgs(out)] == ["inventory.moved", "inventory.back_in_stock"]
    assert db.backordered(pid) == 2
    out = db.one("stock.received", {"product_id": pid, "location_id": a, "quantity": 1})
    assert filled(o, [(pid, a, 1)], [(pid, 1)]) in msgs(out)
    assert db.allocations(o) == [(pid, a, 1, 1, 0)]
    db.verify()


def test_the_sweepers_fill_pass_takes_what_an_expiry_freed(db, store):
    pid = db.product(stock=2, mode="allow")
    holder, waiting = uid("o"), uid("o")
    assert db.place(holder, (pid, 2)).outcome == "reserved"
    assert db.place(waiting, (pid, 3)).outcome == "reserved"
    db.expire(holder)  # the expiry itself does not fill
    assert db.backordered(pid) == 3 and db.totals(pid) == (2, 0, 2)
    count, messages, figures, _ = store.fill_backorders(500, 100)
    assert count >= 1
    mine = [m.body["data"] for m in messages if m.body["data"].get("order_id") == waiting]
    for m in messages:
        validate_output(m.body)
    assert mine == [filled(waiting, [(pid, "default", 2)], [(pid, 1)])[1]]
    assert [f for f in figures if f["product_id"] == pid][0]["reserved"] == 2
    assert db.backordered(pid) == 1
    db.verify()


def test_fill_batch_setting_bounds_orders_per_transaction(settings, db):
    small = Store(
        settings.database, settings.worker.default_reservation_ttl_seconds, {"backorder_fill_batch": 2}
    )
    try:
        pid = db.product(mode="allow")
        orders = [uid("o") for _ in range(3)]
        for o in orders:
            assert db.place(o, (pid, 1)).outcome == "reserved"
            time.sleep(0.005)
        out = small.apply_batch([ev("stock.adjusted", {"product_id": pid, "delta": 3})])[0]
        assert [
            m.body["data"]["order_id"] for m in out.messages if m.body["type"] == "inventory.backorder_filled"
        ] == orders[:2]
        assert db.backordered(pid) == 1
        db.verify()
    finally:
        small.close()


# ==== concurrency: never above the limit =======================================================


def test_concurrent_backorders_and_receipts_never_exceed_the_limit(settings, db):
    limit = 20
    pid = db.product(mode="allow", limit=limit)
    stop = threading.Event()
    errors: list[BaseException] = []
    samples: list[int] = []

    def placer() -> None:
        s = Store(settings.database, settings.worker.default_reservation_ttl_seconds)
        try:
            while not stop.is_set():
                try:
                    out = s.apply_batch(
                        [
                            ev(
                                "order.placed",
                                {"order_id": uid("c"), "lines": [{"product_id": pid, "quantity": 3}]},
                            )
                            for _ in range(3)
                        ]
                    )
                    for o in out:
                        for m in o.messages:
                            validate_output(m.body)
                except TransientError:
                    pass  # a deadlock/serialization retry the worker would redo
        except BaseException as exc:
            errors.append(exc)
        finally:
            s.close()

    def receiver() -> None:
        s = Store(settings.database, settings.worker.default_reservation_ttl_seconds)
        try:
            while not stop.is_set():
                try:
                    for o in s.apply_batch([ev("stock.adjusted", {"product_id": pid, "delta": 2})]):
                        for m in o.messages:
                            validate_output(m.body)
                except TransientError:
                    pass
                time.sleep(0.01)
        except BaseException as exc:
            errors.append(exc)
        finally:
            s.close()

    def sampler() -> None:
        while not stop.is_set():
            with pg(settings) as cur:
                cur.execute("SELECT backordered FROM products WHERE product_id = %s", (pid,))
                samples.append(cur.fetchone()[0])

    threads = [threading.Thread(target=placer) for _ in range(3)] + [
        threading.Thread(target=receiver),
        threading.Thread(target=sampler),
    ]
    for t in threads:
        t.start()
    time.sleep(4)
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert samples and max(samples) <= limit
    assert max(samples) > 0  # backorders did happen
    with pg(settings) as cur:
        cur.execute(
            "SELECT count(*) FROM stock_movements WHERE product_id = %s AND reason = 'backorder_fill'", (pid,)
        )
        assert cur.fetchone()[0] > 0  # and fills
    db.verify()


def test_verify_detects_a_backordered_figure_out_of_line(db, settings):
    pid = db.product(mode="allow")
    assert db.place(uid("o"), (pid, 2)).outcome == "reserved"
    with pg(settings) as cur:
        cur.execute("UPDATE products SET backordered = 3 WHERE product_id = %s", (pid,))
        cur.execute(
            "SELECT figure, recorded, expected, source FROM stock_mismatches() WHERE product_id = %s", (pid,)
        )
        assert sorted(cur.fetchall()) == [
            ("backordered", 3, 2, "backorders"),
            ("backordered", 3, 2, "ledger"),
        ]
        cur.execute("UPDATE products SET backordered = 2 WHERE product_id = %s", (pid,))
    db.verify()


@pytest.mark.parametrize(
    "bad",
    [
        {"mode": "later"},
        {"mode": "allow", "limit": -1},
        {"mode": "allow", "until": "2026-01-01T00:00:00"},
        {"mode": "allow", "until": "2026-02-30T00:00:00Z"},
        {"limit": 1},
        {"mode": "allow", "x": 1},
    ],
)
def test_the_procedures_refuse_a_malformed_backorder(settings, bad):
    with pytest.raises(psycopg2.errors.InvalidParameterValue, match="data.backorder"), pg(settings) as cur:
        cur.execute(
            "SELECT apply_event(%s, 'product.configured', %s::jsonb)",
            (str(uuid.uuid4()), json.dumps({"product_id": uid("B"), "backorder": bad})),
        )


def test_partial_cancel_releases_the_products_backordered_units_too(db):
    """A partial cancel takes backordered units first (spec 4.6): the product's `backordered`
    (and its headroom) follows the line's, and verify stays clean."""
    pid = db.product(stock=2, mode="allow", limit=5)
    o = uid("o")
    assert db.place(o, (pid, 6)).outcome == "reserved"  # 2 reserved, 4 backordered
    assert db.backordered(pid) == 4
    out = db.one("order.cancelled", {"order_id": o, "lines": [{"product_id": pid, "quantity": 3}]})
    assert (
        "inventory.released",
        {"order_id": o, "lines": [{"product_id": pid, "quantity": 3}], "reason": "cancelled"},
    ) in msgs(out)
    assert db.backordered(pid) == 1
    assert db.detail(pid)["backorder"]["headroom"] == 4
    db.verify()
    # The rest of the order, cancelled whole: the last backordered unit and the 2 reserved go.
    db.one("order.cancelled", {"order_id": o})
    assert db.backordered(pid) == 0 and db.totals(pid) == (2, 0, 2)
    db.verify()
