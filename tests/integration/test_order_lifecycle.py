"""An order's life after placement (spec Part B 4.2, 4.4-4.7): reservation.extended,
order.fulfilled, order.completed generalised, partial order.cancelled, order.returned; through
Store.apply_batch with raw events against the real database. Every result event is checked
against the contract (validate_output) and every test ends with verify clean.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta
from typing import Any

import psycopg2
import psycopg2.extras
import pytest

from inventory_worker.adapters.postgres import Outcome, Store
from inventory_worker.contract import validate_output

from ..private_stack import private_settings
from ..support import pg, uid, wait_for_lock_waiter
from .test_locations_orders import Db, ev


def msgs(out: Outcome) -> list[tuple[str, dict[str, Any]]]:
    """The result events, each checked against the contract."""
    for m in out.messages:
        validate_output(m.body)
    return [(m.body["type"], m.body["data"]) for m in out.messages]


def ts(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text.replace("Z", "+00:00"))


class Life(Db):
    def apply(self, *events: dict[str, Any]) -> list[Outcome]:
        outs = super().apply(*events)
        for o in outs:
            msgs(o)
        return outs

    def extend(self, order_id: str, **data: Any) -> Outcome:
        return self.one("reservation.extended", {"order_id": order_id, **data})

    def deadline(self, order_id: str) -> tuple[datetime | None, datetime, datetime]:
        """(expires_at, created_at, PostgreSQL's now())."""
        with pg(self.settings) as cur:
            cur.execute("SELECT expires_at, created_at, now() FROM orders WHERE order_id = %s", (order_id,))
            return cur.fetchone()

    def sql(self, query: str, *args: Any) -> Any:
        with pg(self.settings) as cur:
            cur.execute(query, args)
            return cur.fetchone()[0] if cur.description else None

    def sweep(self) -> dict[str, Any]:
        return self.sql("SELECT expire_reservations(500)")


@pytest.fixture(scope="module")
def settings(settings):
    """A database of this module's own: these tests sweep by hand, and the run's shared workers'
    sweepers would otherwise take the orders first in the shared database."""
    with private_settings(settings, "lifecycle") as s:
        yield s


@pytest.fixture
def life(settings) -> Life:
    s = Store(settings.database, settings.worker.default_reservation_ttl_seconds)
    yield Life(settings, s)
    s.close()


def rejected(order_id: str, reason: str, *shortages: tuple[str, int, int]) -> tuple[str, dict[str, Any]]:
    return (
        "inventory.rejected",
        {
            "order_id": order_id,
            "reason": reason,
            "shortages": [{"product_id": p, "requested": r, "available": a} for p, r, a in shortages],
        },
    )


# ==== reservation.extended (4.2, acceptance check 8) ============================================


def test_extension_moves_the_deadline_and_the_sweeper_respects_it(life):
    pid = life.stock({"default": 5})
    oid = uid("o")
    assert life.place(oid, (pid, 2), reservation_ttl_seconds=1).outcome == "reserved"
    before, _, _ = life.deadline(oid)
    out = life.extend(oid, extend_by_seconds=3600)
    assert out.outcome == "extended" and out.products == []
    after, _, now = life.deadline(oid)
    assert after - now == pytest.approx(timedelta(seconds=3600), abs=timedelta(seconds=5))
    [(type_, data)] = msgs(out)
    assert type_ == "inventory.reservation_extended"
    assert (data["order_id"], ts(data["expires_at"]), ts(data["previous_expires_at"])) == (oid, after, before)
    # The old deadline passes: a real sweep leaves the order alone.
    time.sleep(max(0.0, (before - now).total_seconds()) + 0.3)
    assert life.sweep()["expired"] == 0
    assert life.order(oid)[0] == "reserved"
    assert life.totals(pid) == (5, 2, 3)
    # Its new deadline passes: swept as always.
    life.sql("UPDATE orders SET expires_at = now() - interval '1 second' WHERE order_id = %s", oid)
    swept = life.sweep()
    assert swept["expired"] == 1 and [m["body"]["type"] for m in swept["messages"]] == ["inventory.expired"]
    assert life.totals(pid) == (5, 0, 5)
    life.verify()


def test_extension_never_shortens_and_is_capped_by_the_lifetime(settings, life):
    pid = life.stock({"default": 5})
    oid = uid("o")
    life.place(oid, (pid, 1), reservation_ttl_seconds=600)
    before, created, _ = life.deadline(oid)
    # now() + 10 s is earlier than the deadline: nothing to gain -> extension_limit.
    out = life.extend(oid, extend_by_seconds=10)
    assert (out.outcome, msgs(out)) == ("rejected", [rejected(oid, "extension_limit")])
    assert life.deadline(oid)[0] == before
    # The default cap: created_at + 604800 s (worker.max_reservation_lifetime_seconds).
    out = life.extend(oid, extend_by_seconds=31_536_000)
    assert out.outcome == "extended"
    assert life.deadline(oid)[0] == created + timedelta(seconds=604_800)
    assert ts(msgs(out)[0][1]["expires_at"]) == created + timedelta(seconds=604_800)
    out = life.extend(oid, extend_by_seconds=31_536_000)
    assert (out.outcome, msgs(out)) == ("rejected", [rejected(oid, "extension_limit")])
    # The setting, as the worker passes it.
    short = Store(settings.database, 900, {"max_reservation_lifetime_seconds": 700})
    try:
        other = uid("o")
        life.place(other, (pid, 1), reservation_ttl_seconds=600)
        _, created, _ = life.deadline(other)
        out = short.apply_batch([ev("reservation.extended", {"order_id": other, "extend_by_seconds": 3600})])[
            0
        ]
        assert out.outcome == "extended" and life.deadline(other)[0] == created + timedelta(seconds=700)
        out = short.apply_batch([ev("reservation.extended", {"order_id": other, "extend_by_seconds": 3600})])[
            0
        ]
        assert (out.outcome, msgs(out)) == ("rejected", [rejected(other, "extension_limit")])
    finally:
        short.close()
    life.verify()


def test_until_fulfilled_is_never_swept(life):
    pid = life.stock({"default": 5})
    oid = uid("o")
    life.place(oid, (pid, 3), reservation_ttl_seconds=1)
    before, _, _ = life.deadline(oid)
    out = life.extend(oid, until_fulfilled=True)
    assert out.outcome == "extended"
    assert msgs(out) == [
        (
            "inventory.reservation_extended",
            {
                "order_id": oid,
                "expires_at": None,
                "previous_expires_at": msgs(out)[0][1]["previous_expires_at"],
            },
        )
    ]
    assert ts(msgs(out)[0][1]["previous_expires_at"]) == before
    assert life.deadline(oid)[0] is None
    time.sleep(1.3)
    assert life.sweep()["expired"] == 0
    assert life.order(oid)[0] == "reserved" and life.totals(pid) == (5, 3, 2)
    # Held until fulfilled already: nothing to do, no event (decision 13.12).
    for data in ({"until_fulfilled": True}, {"extend_by_seconds": 60}):
        out = life.extend(oid, **data)
        assert (out.outcome, out.messages) == ("ignored", [])
    assert life.deadline(oid)[0] is None
    # Completion still works.
    assert life.one("order.completed", {"order_id": oid}).outcome == "committed"
    life.verify()


def test_extension_refusals(life):
    pid = life.stock({"default": 10})
    # unknown_order, and not remembered: the order placed afterwards is reserved.
    oid = uid("o")
    out = life.extend(oid, extend_by_seconds=60)
    assert (out.outcome, msgs(out)) == ("rejected", [rejected(oid, "unknown_order")])
    assert life.order(oid) is None
    assert life.place(oid, (pid, 1)).outcome == "reserved"
    # order_completed
    life.one("order.completed", {"order_id": oid})
    out = life.extend(oid, until_fulfilled=True)
    assert msgs(out) == [rejected(oid, "order_completed")]
    # order_cancelled: released, and cancelled before it was placed
    for cancel_first in (False, True):
        oid = uid("o")
        if not cancel_first:
            life.place(oid, (pid, 1))
        life.one("order.cancelled", {"order_id": oid})
        out = life.extend(oid, extend_by_seconds=60)
        assert msgs(out) == [rejected(oid, "order_cancelled")]
    # reservation_expired: due but not swept yet, then swept
    oid = uid("o")
    life.place(oid, (pid, 2))
    life.sql("UPDATE orders SET expires_at = now() - interval '1 second' WHERE order_id = %s", oid)
    for _ in range(2):
        out = life.extend(oid, until_fulfilled=True)
        assert msgs(out) == [rejected(oid, "reservation_expired")]
        assert life.order(oid)[0] in ("reserved", "expired")
        life.sweep()
    assert life.order(oid)[0] == "expired" and life.totals(pid) == (9, 0, 9)
    life.verify()


def test_extension_and_sweeper_race_under_the_order_lock(settings, life):
    """The order's row lock decides: an extension in flight keeps the sweeper off; a sweep in
    flight makes the extension a reservation_expired."""
    pid = life.stock({"default": 10})
    # 1. The extension holds the lock when the old deadline passes: the sweep skips the order,
    #    and after the commit the new deadline holds.
    oid = uid("o")
    life.place(oid, (pid, 1), reservation_ttl_seconds=1)
    conn = psycopg2.connect(**settings.database.dsn())
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                "SELECT apply_events(%s::jsonb)",
                (
                    psycopg2.extras.Json(
                        [ev("reservation.extended", {"order_id": oid, "extend_by_seconds": 3600})]
                    ),
                ),
            )
            assert cur.fetchone()[0][0]["outcome"] == "extended"
            time.sleep(1.3)
            assert life.sweep()["expired"] == 0
    finally:
        conn.close()
    assert life.sweep()["expired"] == 0 and life.order(oid)[0] == "reserved"
    # 2. The sweep holds the lock: the extension waits, then finds the order expired.
    oid = uid("o")
    life.place(oid, (pid, 1))
    life.sql("UPDATE orders SET expires_at = now() - interval '1 second' WHERE order_id = %s", oid)
    conn = psycopg2.connect(**settings.database.dsn())
    result: list[Outcome] = []
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT expire_reservations(500)")
            assert cur.fetchone()[0]["expired"] == 1
            t = threading.Thread(target=lambda: result.append(life.extend(oid, extend_by_seconds=60)))
            t.start()
            cur.execute("SELECT pg_backend_pid()")
            wait_for_lock_waiter(settings, cur.fetchone()[0])
    finally:
        conn.close()
    t.join(10)
    assert msgs(result[0]) == [rejected(oid, "reservation_expired")]
    life.verify()


# ==== order.fulfilled (4.4) and order.completed generalised (4.5), acceptance check 11 ==========


def fulfilled(order_id: str, fid: str, lines: list[tuple], open_: list[tuple]) -> tuple[str, dict[str, Any]]:
    return (
        "inventory.fulfilled",
        {
            "order_id": order_id,
            "fulfilment_id": fid,
            "lines": [{"product_id": p, "location_id": loc, "quantity": q} for p, loc, q in lines],
            "open": [{"product_id": p, "reserved": r, "backordered": b} for p, r, b in open_],
        },
    )


def committed(order_id: str, *lines: tuple[str, int]) -> tuple[str, dict[str, Any]]:
    return (
        "inventory.committed",
        {"order_id": order_id, "lines": [{"product_id": p, "quantity": q} for p, q in lines]},
    )


def fulfil(life: Life, order_id: str, fid: str, *lines: tuple) -> Outcome:
    return life.one(
        "order.fulfilled",
        {
            "order_id": order_id,
            "fulfilment_id": fid,
            "lines": [
                {"product_id": x[0], "quantity": x[1], **({"location_id": x[2]} if len(x) > 2 else {})}
                for x in lines
            ],
        },
    )


def line_counters(life: Life, order_id: str) -> list[tuple]:
    with pg(life.settings) as cur:
        cur.execute(
            "SELECT product_id, quantity, fulfilled, released, backordered, returned FROM order_lines"
            " WHERE order_id = %s ORDER BY line_no",
            (order_id,),
        )
        return cur.fetchall()


def ledger(life: Life, order_id: str) -> list[tuple]:
    with pg(life.settings) as cur:
        cur.execute(
            "SELECT reason, product_id, location_id, on_hand_delta, reserved_delta, reference"
            " FROM stock_movements WHERE order_id = %s ORDER BY id",
            (order_id,),
        )
        return cur.fetchall()


def test_partial_fulfilment_3_then_2_commits_once(life):
    """Acceptance check 11, on an order held implicitly at default (converted at its first
    partial fulfilment)."""
    pid = life.stock({"default": 10})
    oid = uid("o")
    life.place(oid, (pid, 5), reservation_ttl_seconds=60)
    assert life.order(oid) == ("reserved", False, None)
    out = fulfil(life, oid, "f1", (pid, 3))
    assert out.outcome == "fulfilled"
    assert msgs(out) == [fulfilled(oid, "f1", [(pid, "default", 3)], [(pid, 2, 0)])]
    assert life.order(oid) == ("reserved", True, None) and life.deadline(oid)[0] is None
    assert life.totals(pid) == (7, 2, 5)
    assert out.products == [
        {
            "product_id": pid,
            "on_hand": 7,
            "reserved": 2,
            "available": 5,
            "version": out.products[0]["version"],
        }
    ]
    life.verify()
    # Reused fulfilment_id under a new message id: nothing, nothing published.
    out = fulfil(life, oid, "f1", (pid, 2))
    assert (out.outcome, out.messages) == ("duplicate_fulfilment", [])
    assert life.totals(pid) == (7, 2, 5)
    out = fulfil(life, oid, "f2", (pid, 2))
    assert msgs(out) == [fulfilled(oid, "f2", [(pid, "default", 2)], []), committed(oid, (pid, 5))]
    assert life.order(oid)[0] == "committed" and life.totals(pid) == (5, 0, 5)
    assert line_counters(life, oid) == [(pid, 5, 5, 0, 0, 0)]
    # A third fulfilment -> order_completed; the reused id stays a duplicate.
    assert msgs(fulfil(life, oid, "f3", (pid, 1))) == [rejected(oid, "order_completed")]
    assert fulfil(life, oid, "f2", (pid, 1)).outcome == "duplicate_fulfilment"
    assert ledger(life, oid) == [
        ("reserve", pid, "default", 0, 5, None),
        ("fulfil", pid, "default", -3, -3, "f1"),
        ("fulfil", pid, "default", -2, -2, "f2"),
    ]
    life.verify()


def test_fulfilment_consumes_allocations_in_order_and_by_location(life):
    a, b = life.location(0), life.location(1)
    ch = life.channel([a, b])
    p, q = life.stock({a: 3, b: 5}), life.stock({a: 4})
    oid = uid("o")
    assert life.place(oid, (p, 6), (q, 2), channel_id=ch).outcome == "reserved"  # p: a 3, b 3
    # Without location: allocation order (a first, then b); with it: that location only.
    out = fulfil(life, oid, "f1", (p, 4), (q, 1, a))
    assert msgs(out) == [fulfilled(oid, "f1", [(p, a, 3), (p, b, 1), (q, a, 1)], [(p, 2, 0), (q, 1, 0)])]
    assert life.levels(p) == {"default": (0, 0), a: (0, 0), b: (4, 2)}
    assert sorted(life.allocations(oid)) == sorted([(p, a, 1, 0, 3), (p, b, 2, 2, 1), (q, a, 1, 1, 1)])
    life.verify()
    # Refusals, nothing changes: exceeds_reserved (at that location; backordered units are not
    # reserved), unknown_line, a location without an allocation.
    before = (life.levels(p), life.levels(q), life.allocations(oid))
    assert msgs(fulfil(life, oid, "f2", (p, 1, a))) == [rejected(oid, "exceeds_reserved", (p, 1, 0))]
    assert msgs(fulfil(life, oid, "f2", (p, 3), (q, 1))) == [rejected(oid, "exceeds_reserved", (p, 3, 2))]
    assert msgs(fulfil(life, oid, "f2", (p, 2, b), (p, 1))) == [rejected(oid, "exceeds_reserved", (p, 1, 0))]
    other = uid("P")
    assert msgs(fulfil(life, oid, "f2", (q, 1), (other, 1))) == [rejected(oid, "unknown_line", (other, 1, 0))]
    assert (life.levels(p), life.levels(q), life.allocations(oid)) == before
    # A refused fulfilment_id may be used again.
    out = fulfil(life, oid, "f2", (p, 2, b), (q, 1))
    assert msgs(out) == [fulfilled(oid, "f2", [(p, b, 2), (q, a, 1)], []), committed(oid, (p, 6), (q, 2))]
    assert line_counters(life, oid) == [(p, 6, 6, 0, 0, 0), (q, 2, 2, 0, 0, 0)]
    life.verify()


def test_fulfilment_refusals_by_order_state(life):
    pid = life.stock({"default": 10})
    oid = uid("o")
    assert msgs(fulfil(life, oid, "f", (pid, 1))) == [rejected(oid, "unknown_order")]
    assert life.order(oid) is None
    life.place(oid, (pid, 2))
    life.one("order.cancelled", {"order_id": oid})
    assert msgs(fulfil(life, oid, "f", (pid, 1))) == [rejected(oid, "order_cancelled")]
    oid = uid("o")
    life.place(oid, (pid, 2))
    life.sql("UPDATE orders SET expires_at = now() - interval '1 second' WHERE order_id = %s", oid)
    assert msgs(fulfil(life, oid, "f", (pid, 1))) == [rejected(oid, "reservation_expired")]
    life.sweep()
    assert msgs(fulfil(life, oid, "f", (pid, 1))) == [rejected(oid, "reservation_expired")]
    assert life.totals(pid) == (10, 0, 10)
    life.verify()


def test_completion_after_partial_fulfilment_commits_the_rest(life):
    a = life.location(0)
    ch = life.channel([a, "default"])
    p, q = life.stock({a: 2, "default": 5}), life.stock({"default": 5})
    oid = uid("o")
    life.place(oid, (p, 4), (q, 3), channel_id=ch)  # p: a 2, default 2; q: default 3
    fulfil(life, oid, "f1", (p, 1))
    out = life.one("order.completed", {"order_id": oid})
    assert out.outcome == "committed"
    assert msgs(out) == [committed(oid, (p, 4), (q, 3))]
    assert life.levels(p) == {"default": (3, 0), a: (0, 0)} and life.totals(q) == (2, 0, 2)
    assert line_counters(life, oid) == [(p, 4, 4, 0, 0, 0), (q, 3, 3, 0, 0, 0)]
    assert msgs(fulfil(life, oid, "f2", (p, 1))) == [rejected(oid, "order_completed")]
    life.verify()


def test_completion_refuses_backorder_pending(life):
    """The refusal is checked (no order can be backordered before the backorders slice: made
    by hand here)."""
    pid = life.stock({"default": 5})
    oid = uid("o")
    life.place(oid, (pid, 2))
    fulfil(life, oid, "f1", (pid, 1))
    life.sql("UPDATE order_lines SET backordered = 1 WHERE order_id = %s", oid)
    assert msgs(life.one("order.completed", {"order_id": oid})) == [rejected(oid, "backorder_pending")]
    assert life.order(oid)[0] == "reserved" and life.totals(pid) == (4, 1, 3)
    life.sql("UPDATE order_lines SET backordered = 0 WHERE order_id = %s", oid)
    assert msgs(life.one("order.completed", {"order_id": oid})) == [committed(oid, (pid, 2))]
    life.verify()


def test_untracked_line_is_fulfilled_without_stock(life):
    p = life.stock({"default": 5})
    u = life.stock({"default": 0}, tracked=False)
    oid = uid("o")
    life.place(oid, (p, 2), (u, 3))
    out = fulfil(life, oid, "f1", (u, 2), (p, 2))
    assert msgs(out) == [fulfilled(oid, "f1", [(u, None, 2), (p, "default", 2)], [(u, 1, 0)])]
    assert [f["product_id"] for f in out.products] == [p]
    assert msgs(fulfil(life, oid, "f2", (u, 1, "default"))) == [rejected(oid, "exceeds_reserved", (u, 1, 0))]
    assert msgs(fulfil(life, oid, "f2", (u, 2))) == [rejected(oid, "exceeds_reserved", (u, 2, 1))]
    assert msgs(fulfil(life, oid, "f2", (u, 1))) == [
        fulfilled(oid, "f2", [(u, None, 1)], []),
        committed(oid, (p, 2), (u, 3)),
    ]
    assert life.totals(u) == (0, 0, 0) and life.totals(p) == (3, 0, 3)
    life.verify()


def test_verify_checks_the_line_counters(life):
    pid = life.stock({"default": 10})
    oid = uid("o")
    life.place(oid, (pid, 5))
    fulfil(life, oid, "f1", (pid, 2))
    life.verify()

    def found() -> list[tuple]:
        with pg(life.settings) as cur:
            cur.execute(
                "SELECT figure, recorded, expected, source FROM stock_mismatches() WHERE product_id = %s",
                (pid,),
            )
            return cur.fetchall()

    for change, mismatch in (
        (
            "fulfilled = fulfilled + 1",
            [("fulfilled of order " + oid, 3, 2, "orders"), ("quantity of order " + oid, 5, 6, "orders")],
        ),
        ("released = 1", [("quantity of order " + oid, 5, 6, "orders")]),
        ("returned = 3", [("returned of order " + oid, 3, 2, "orders")]),
    ):
        life.sql(f"UPDATE order_lines SET {change} WHERE order_id = %s", oid)
        assert found() == mismatch
        life.sql("UPDATE order_lines SET fulfilled = 2, released = 0, returned = 0 WHERE order_id = %s", oid)
    assert found() == []


# ==== partial order.cancelled (4.6), acceptance check 12 ========================================


def cancel(life: Life, order_id: str, *lines: tuple[str, int]) -> Outcome:
    return life.one(
        "order.cancelled",
        {
            "order_id": order_id,
            **({"lines": [{"product_id": p, "quantity": q} for p, q in lines]} if lines else {}),
        },
    )


def released(order_id: str, *lines: tuple[str, int]) -> tuple[str, dict[str, Any]]:
    return (
        "inventory.released",
        {
            "order_id": order_id,
            "lines": [{"product_id": p, "quantity": q} for p, q in lines],
            "reason": "cancelled",
        },
    )


def test_partial_cancel_releases_the_last_location_first(life):
    a, b = life.location(0), life.location(1)
    ch = life.channel([a, b])
    p, q = life.stock({a: 3, b: 5}), life.stock({a: 4})
    oid = uid("o")
    life.place(oid, (p, 6), (q, 2), channel_id=ch)  # p: a 3, b 3
    out = cancel(life, oid, (p, 4))
    assert out.outcome == "released"
    assert msgs(out) == [released(oid, (p, 4))]
    assert life.levels(p) == {"default": (0, 0), a: (3, 2), b: (5, 0)}
    assert sorted(life.allocations(oid)) == sorted([(p, a, 1, 2, 0), (p, b, 2, 0, 0), (q, a, 1, 2, 0)])
    assert line_counters(life, oid) == [(p, 6, 0, 4, 0, 0), (q, 2, 0, 0, 0, 0)]
    assert life.order(oid)[0] == "reserved"
    life.verify()
    # Refusals, nothing changes.
    other = uid("P")
    assert msgs(cancel(life, oid, (p, 3))) == [rejected(oid, "exceeds_open_quantity", (p, 3, 2))]
    assert msgs(cancel(life, oid, (q, 1), (other, 1))) == [rejected(oid, "unknown_line", (other, 1, 0))]
    assert line_counters(life, oid) == [(p, 6, 0, 4, 0, 0), (q, 2, 0, 0, 0, 0)]
    # Cancelling what is left closes the order: released (nothing was fulfilled).
    out = cancel(life, oid, (q, 2), (p, 2))
    assert msgs(out) == [released(oid, (q, 2), (p, 2))]
    assert life.order(oid)[0] == "released" and life.totals(p) == (8, 0, 8) and life.totals(q) == (4, 0, 4)
    assert msgs(cancel(life, oid, (p, 1))) == [rejected(oid, "order_cancelled")]
    life.verify()


def test_partial_cancel_of_an_implicit_order_then_completion(life):
    pid = life.stock({"default": 10})
    oid = uid("o")
    life.place(oid, (pid, 5))
    assert msgs(cancel(life, oid, (pid, 2))) == [released(oid, (pid, 2))]
    assert life.order(oid)[:2] == ("reserved", True) and life.totals(pid) == (10, 3, 7)
    life.verify()
    assert msgs(life.one("order.completed", {"order_id": oid})) == [committed(oid, (pid, 3))]
    assert line_counters(life, oid) == [(pid, 5, 3, 2, 0, 0)]
    assert life.totals(pid) == (7, 0, 7)
    life.verify()


def test_cancel_closing_a_partly_fulfilled_order_commits_it(life):
    pid, q = life.stock({"default": 10}), life.stock({"default": 1})
    oid = uid("o")
    life.place(oid, (pid, 5), (q, 1))
    fulfil(life, oid, "f1", (pid, 3))
    # Taking q's last unit back into stock: back_in_stock after the release.
    out = cancel(life, oid, (pid, 2), (q, 1))
    assert msgs(out) == [
        released(oid, (pid, 2), (q, 1)),
        committed(oid, (pid, 3)),
        ("inventory.back_in_stock", {"product_id": q, "available": 1}),
    ]
    assert life.order(oid)[0] == "committed"
    assert line_counters(life, oid) == [(pid, 5, 3, 2, 0, 0), (q, 1, 0, 1, 0, 0)]
    life.verify()
    # A whole cancel of a partly fulfilled order: what is still open is released, then committed.
    oid = uid("o")
    life.place(oid, (pid, 4))
    fulfil(life, oid, "f1", (pid, 1))
    out = cancel(life, oid)
    assert msgs(out) == [released(oid, (pid, 3)), committed(oid, (pid, 1))]
    assert life.order(oid)[0] == "committed" and line_counters(life, oid) == [(pid, 4, 1, 3, 0, 0)]
    assert msgs(cancel(life, oid, (pid, 1))) == [rejected(oid, "order_completed")]
    life.verify()


def test_partial_cancel_refusals_by_order_state(life):
    pid = life.stock({"default": 10})
    oid = uid("o")
    assert msgs(cancel(life, oid, (pid, 1))) == [rejected(oid, "unknown_order")]
    assert life.order(oid) is None  # not remembered: the order may still be placed
    assert life.place(oid, (pid, 2)).outcome == "reserved"
    life.sql("UPDATE orders SET expires_at = now() - interval '1 second' WHERE order_id = %s", oid)
    assert msgs(cancel(life, oid, (pid, 1))) == [rejected(oid, "reservation_expired")]
    life.sweep()
    assert msgs(cancel(life, oid, (pid, 1))) == [rejected(oid, "reservation_expired")]
    oid = uid("o")
    cancel(life, oid)  # remembered before its order
    assert msgs(cancel(life, oid, (pid, 1))) == [rejected(oid, "order_cancelled")]
    assert life.totals(pid) == (10, 0, 10)
    life.verify()


def test_partial_cancel_takes_backordered_units_first(life):
    a = life.location(0)
    ch = life.channel(["default", a])
    pid = life.stock({"default": 2, a: 2})
    assert (
        life.one("product.configured", {"product_id": pid, "backorder": {"mode": "allow"}}).outcome
        == "configured"
    )
    oid = uid("o")
    assert life.place(oid, (pid, 6), channel_id=ch).outcome == "reserved"  # default 2, a 2, 2 backordered
    assert msgs(cancel(life, oid, (pid, 3))) == [
        released(oid, (pid, 3)),
        ("inventory.back_in_stock", {"product_id": pid, "available": 1}),
    ]
    assert line_counters(life, oid) == [(pid, 6, 0, 3, 0, 0)]
    assert life.levels(pid) == {"default": (2, 2), a: (2, 1)}
    life.verify()


# ==== order.returned (4.7), acceptance check 13 =================================================


def give_back(life: Life, order_id: str, rid: str, *lines: tuple) -> Outcome:
    """A line is (product_id, quantity, condition[, location_id])."""
    return life.one(
        "order.returned",
        {
            "order_id": order_id,
            "return_id": rid,
            "lines": [
                {
                    "product_id": x[0],
                    "quantity": x[1],
                    "condition": x[2],
                    **({"location_id": x[3]} if len(x) > 3 else {}),
                }
                for x in lines
            ],
        },
    )


def returned(order_id: str, rid: str, *lines: tuple) -> tuple[str, dict[str, Any]]:
    return (
        "inventory.returned",
        {
            "order_id": order_id,
            "return_id": rid,
            "lines": [
                {"product_id": p, "location_id": loc, "quantity": q, "condition": c} for p, q, c, loc in lines
            ],
        },
    )


def detail(life: Life, pid: str) -> tuple[int, int, int, int, int]:
    """(on_hand, reserved, damaged, quality_control, available) of the product."""
    with pg(life.settings) as cur:
        cur.execute(
            "SELECT on_hand, reserved, damaged, quality_control, (product_figures(p)->>'available')::int"
            " FROM products p WHERE product_id = %s",
            (pid,),
        )
        return cur.fetchone()


def test_return_sellable_and_damaged_restocks_where_it_was_fulfilled(life):
    a = life.location(0)
    ch = life.channel([a, "default"])
    pid = life.stock({a: 5, "default": 5})
    oid = uid("o")
    life.place(oid, (pid, 5), channel_id=ch)  # all at a
    fulfil(life, oid, "f1", (pid, 5))
    before = detail(life, pid)
    out = give_back(life, oid, "r1", (pid, 2, "sellable"), (pid, 1, "damaged"))
    assert out.outcome == "returned"
    assert msgs(out) == [returned(oid, "r1", (pid, 2, "sellable", a), (pid, 1, "damaged", a))]
    after = detail(life, pid)
    assert (after[0] - before[0], after[2] - before[2], after[4] - before[4]) == (3, 1, 2)
    assert life.levels(pid)[a] == (3, 0)
    assert line_counters(life, oid) == [(pid, 5, 5, 0, 0, 3)]
    assert out.products == [
        {
            "product_id": pid,
            "on_hand": after[0],
            "reserved": 0,
            "available": after[4],
            "version": out.products[0]["version"],
        }
    ]
    # More than fulfilled -> exceeds_fulfilled (available = fulfilled - returned), nothing changes.
    assert msgs(give_back(life, oid, "r2", (pid, 2, "sellable"), (pid, 1, "disposed"))) == [
        rejected(oid, "exceeds_fulfilled", (pid, 3, 2))
    ]
    assert detail(life, pid) == after
    # Reused return_id: nothing, nothing published.
    out = give_back(life, oid, "r1", (pid, 1, "sellable"))
    assert (out.outcome, out.messages) == ("duplicate_return", [])
    # Disposed: recorded, no stock moves.
    out = give_back(life, oid, "r2", (pid, 2, "disposed"))
    assert msgs(out) == [returned(oid, "r2", (pid, 2, "disposed", a))] and detail(life, pid) == after
    assert line_counters(life, oid) == [(pid, 5, 5, 0, 0, 5)]
    assert [r[0] for r in ledger(life, oid)].count("return") == 2
    life.verify()


def test_return_to_another_location_and_of_an_order_committed_at_default(life):
    store = life.location(5, active=False)  # a store that sells nothing still takes returns
    pid = life.stock({"default": 1})
    oid = uid("o")
    life.place(oid, (pid, 1))
    assert life.one("order.completed", {"order_id": oid}).outcome == "committed"  # fast path, no counters
    assert life.totals(pid) == (0, 0, 0)
    out = give_back(life, oid, "r1", (pid, 1, "sellable"))
    assert msgs(out) == [
        returned(oid, "r1", (pid, 1, "sellable", "default")),
        ("inventory.back_in_stock", {"product_id": pid, "available": 1}),
    ]
    assert line_counters(life, oid) == [(pid, 1, 1, 0, 0, 1)] and life.totals(pid) == (1, 0, 1)
    life.verify()
    other = uid("o")
    life.place(other, (pid, 1))
    fulfil(life, other, "f1", (pid, 1))
    out = give_back(life, other, "r1", (pid, 1, "quality_control", store))
    assert msgs(out) == [returned(other, "r1", (pid, 1, "quality_control", store))]
    assert life.levels(pid)[store] == (1, 0) and detail(life, pid) == (1, 0, 0, 1, 0)
    life.verify()


def test_return_refusals(life):
    pid = life.stock({"default": 5})
    oid = uid("o")
    assert msgs(give_back(life, oid, "r", (pid, 1, "sellable"))) == [rejected(oid, "unknown_order")]
    life.place(oid, (pid, 2))
    assert msgs(give_back(life, oid, "r", (pid, 1, "sellable"))) == [
        rejected(oid, "exceeds_fulfilled", (pid, 1, 0))
    ]
    fulfil(life, oid, "f", (pid, 1))
    other = uid("P")
    assert msgs(give_back(life, oid, "r", (other, 1, "sellable"))) == [
        rejected(oid, "unknown_line", (other, 1, 0))
    ]
    assert msgs(give_back(life, oid, "r", (pid, 1, "sellable", uid("L")))) == [
        rejected(oid, "unknown_location", (pid, 1, 0))
    ]
    assert give_back(life, oid, "r", (pid, 1, "sellable")).outcome == "returned"  # a refused id may be reused
    life.verify()
