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


@pytest.fixture
def life(settings) -> Life:
    s = Store(settings.database, settings.worker.default_reservation_ttl_seconds)
    yield Life(settings, s)
    s.close()


def rejected(order_id: str, reason: str, *shortages: tuple[str, int, int]) -> tuple[str, dict[str, Any]]:
    return ("inventory.rejected", {"order_id": order_id, "reason": reason, "shortages": [
        {"product_id": p, "requested": r, "available": a} for p, r, a in shortages]})


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
        out = short.apply_batch([ev("reservation.extended", {"order_id": other, "extend_by_seconds": 3600})])[0]
        assert out.outcome == "extended" and life.deadline(other)[0] == created + timedelta(seconds=700)
        out = short.apply_batch([ev("reservation.extended", {"order_id": other, "extend_by_seconds": 3600})])[0]
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
    assert msgs(out) == [("inventory.reservation_extended", {
        "order_id": oid, "expires_at": None, "previous_expires_at": msgs(out)[0][1]["previous_expires_at"]})]
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
            cur.execute("SELECT apply_events(%s::jsonb)", (psycopg2.extras.Json(
                [ev("reservation.extended", {"order_id": oid, "extend_by_seconds": 3600})]),))
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

