"""Every transition of the stock rules, through Store.apply_batch against the real database.

Each test asserts the figures (on_hand, reserved, available, version), the exact result events
(each one checked against the output contract and found in the outbox), and the ledger rows.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from inventory_worker.adapters.postgres import PermanentError, Store
from inventory_worker.contract import InvalidMessage, Outcome, make_event, parse_event, validate_output

from ..support import pg, uid


@pytest.fixture
def store(settings):
    s = Store(settings.database, settings.worker.default_reservation_ttl_seconds)
    yield s
    s.close()


def event(type_: str, data: dict[str, Any], event_id: str | None = None) -> dict[str, Any]:
    """An event as the consumer hands it to the store: through the contract first."""
    body = make_event(type_, data, uuid.UUID(event_id) if event_id else None)
    return parse_event(json.dumps(body).encode(), type_).for_store()


class Ctx:
    """Applies events and checks every result against the contract and the outbox."""

    def __init__(self, settings, store: Store) -> None:
        self.settings = settings
        self.store = store

    def apply(self, *events: dict[str, Any]) -> list[Outcome]:
        before = self.outbox_count()
        outcomes = self.store.apply_batch(list(events))
        assert len(outcomes) == len(events)
        emitted = 0
        for ev, out in zip(events, outcomes, strict=True):
            for m in out.messages:
                validate_output(m.body)
                assert m.body["causation_id"] == ev["id"]
                assert m.message_id == m.body["id"] and m.routing_key == m.body["type"]
                assert m.body["occurred_at"].endswith("Z")
                with pg(self.settings) as cur:
                    cur.execute(
                        "SELECT message_id::text, routing_key, body, published_at FROM outbox WHERE id = %s",
                        (m.outbox_id,),
                    )
                    assert cur.fetchone() == (m.message_id, m.routing_key, m.body, None)
            emitted += len(out.messages)
        assert self.outbox_count() - before == emitted  # nothing written that is not returned
        return outcomes

    def one(self, type_: str, data: dict[str, Any], event_id: str | None = None) -> Outcome:
        return self.apply(event(type_, data, event_id))[0]

    def outbox_count(self) -> int:
        """Rows written by applied events. Expiry rows are left out: the run's shared workers'
        sweepers expire other tests' reservations in this database meanwhile (no test here
        expires anything), which a plain count(*) took for rows of ours."""
        with pg(self.settings) as cur:
            cur.execute("SELECT count(*) FROM outbox WHERE routing_key <> 'inventory.expired'")
            return cur.fetchone()[0]

    def fig(self, pid: str) -> tuple[int, int, int, int] | None:
        """(on_hand, reserved, available, version)"""
        with pg(self.settings) as cur:
            cur.execute(
                "SELECT on_hand, reserved, on_hand - reserved, version FROM products WHERE product_id = %s",
                (pid,),
            )
            return cur.fetchone()

    def ledger(self, event_id: str) -> list[tuple]:
        with pg(self.settings) as cur:
            cur.execute(
                "SELECT product_id, order_id, on_hand_delta, reserved_delta, reason, note FROM stock_movements"
                " WHERE event_id = %s ORDER BY id",
                (event_id,),
            )
            return cur.fetchall()

    def order_status(self, order_id: str) -> str | None:
        with pg(self.settings) as cur:
            cur.execute("SELECT status FROM orders WHERE order_id = %s", (order_id,))
            row = cur.fetchone()
            return row[0] if row else None

    def processed(self, event_id: str) -> str | None:
        with pg(self.settings) as cur:
            cur.execute("SELECT outcome FROM processed_events WHERE event_id = %s", (event_id,))
            row = cur.fetchone()
            return row[0] if row else None

    def stock(self, pid: str, qty: int, threshold: int | None = None) -> None:
        data: dict[str, Any] = {"product_id": pid, "delta": qty}
        if threshold is not None:
            data["low_stock_threshold"] = threshold
        assert self.one("stock.adjusted", data).outcome == "adjusted"


@pytest.fixture
def db(settings, store) -> Ctx:
    return Ctx(settings, store)


def msgs(out: Outcome) -> list[tuple[str, dict[str, Any]]]:
    """The result events as (type, data), expires_at taken out (checked separately)."""
    res = []
    for m in out.messages:
        data = dict(m.body["data"])
        data.pop("expires_at", None)
        res.append((m.body["type"], data))
    return res


def lines(*pairs: tuple[str, int]) -> list[dict[str, Any]]:
    return [{"product_id": p, "quantity": q} for p, q in pairs]


def place(db: Ctx, order_id: str, *pairs: tuple[str, int], **extra: Any) -> tuple[str, Outcome]:
    ev = event("order.placed", {"order_id": order_id, "lines": lines(*pairs), **extra})
    return ev["id"], db.apply(ev)[0]


# ==== stock.adjusted ==============================================================================


def test_adjust_creates_product_by_delta(db):
    pid = uid()
    ev = event("stock.adjusted", {"product_id": pid, "delta": 10, "reason": "received PO-7"})
    out = db.apply(ev)[0]
    assert out.outcome == "adjusted"
    assert msgs(out) == [
        ("inventory.adjusted", {"product_id": pid, "on_hand": 10, "reserved": 0, "available": 10})
    ]
    assert db.fig(pid) == (10, 0, 10, 1)
    assert out.products == [{"product_id": pid, "on_hand": 10, "reserved": 0, "available": 10, "version": 1}]
    assert db.ledger(ev["id"]) == [(pid, None, 10, 0, "adjust", "received PO-7")]
    assert db.processed(ev["id"]) == "adjusted"


def test_adjust_by_delta_up_and_down(db):
    pid = uid()
    db.stock(pid, 10)
    ev = event("stock.adjusted", {"product_id": pid, "delta": -4})
    out = db.apply(ev)[0]
    assert msgs(out) == [
        ("inventory.adjusted", {"product_id": pid, "on_hand": 6, "reserved": 0, "available": 6})
    ]
    assert db.fig(pid) == (6, 0, 6, 2)
    assert db.ledger(ev["id"]) == [(pid, None, -4, 0, "adjust", None)]


def test_adjust_count_sets_on_hand_and_ledger_records_the_difference(db):
    pid = uid()
    db.stock(pid, 10)
    ev = event("stock.adjusted", {"product_id": pid, "on_hand": 4, "reason": "stock take"})
    out = db.apply(ev)[0]
    assert msgs(out) == [
        ("inventory.adjusted", {"product_id": pid, "on_hand": 4, "reserved": 0, "available": 4})
    ]
    assert db.fig(pid) == (4, 0, 4, 2)
    assert db.ledger(ev["id"]) == [(pid, None, -6, 0, "adjust", "stock take")]


def test_adjust_count_creates_a_product(db):
    pid = uid()
    out = db.one("stock.adjusted", {"product_id": pid, "on_hand": 3})
    assert msgs(out) == [
        ("inventory.adjusted", {"product_id": pid, "on_hand": 3, "reserved": 0, "available": 3})
    ]
    assert db.fig(pid) == (3, 0, 3, 1)


def test_adjust_to_zero_by_count_creates_a_sold_out_product(db):
    pid = uid()
    ev = event("stock.adjusted", {"product_id": pid, "on_hand": 0})
    out = db.apply(ev)[0]
    assert msgs(out) == [
        ("inventory.adjusted", {"product_id": pid, "on_hand": 0, "reserved": 0, "available": 0})
    ]
    assert db.fig(pid) == (0, 0, 0, 1)
    assert db.ledger(ev["id"]) == []  # nothing moved


def test_adjust_below_zero_is_rejected_and_changes_nothing(db):
    pid = uid()
    db.stock(pid, 10)
    ev = event("stock.adjusted", {"product_id": pid, "delta": -11})
    out = db.apply(ev)[0]
    assert out.outcome == "rejected"
    assert msgs(out) == [
        (
            "inventory.adjustment_rejected",
            {"product_id": pid, "reason": "negative_on_hand", "on_hand": 10, "reserved": 0, "requested": -1},
        )
    ]
    assert db.fig(pid) == (10, 0, 10, 1)
    assert db.ledger(ev["id"]) == []
    assert db.processed(ev["id"]) == "rejected"


def test_negative_adjustment_of_an_unknown_product_does_not_create_it(db):
    pid = uid()
    out = db.one("stock.adjusted", {"product_id": pid, "delta": -2})
    assert msgs(out) == [
        (
            "inventory.adjustment_rejected",
            {"product_id": pid, "reason": "negative_on_hand", "on_hand": 0, "reserved": 0, "requested": -2},
        )
    ]
    assert db.fig(pid) is None
    assert out.products == []


def test_adjust_below_reserved_is_rejected(db):
    pid = uid()
    db.stock(pid, 10)
    place(db, uid("O"), (pid, 6))
    for data, requested in (({"on_hand": 5}, 5), ({"delta": -5}, 5)):
        out = db.one("stock.adjusted", {"product_id": pid, **data})
        assert msgs(out) == [
            (
                "inventory.adjustment_rejected",
                {
                    "product_id": pid,
                    "reason": "below_reserved",
                    "on_hand": 10,
                    "reserved": 6,
                    "requested": requested,
                },
            )
        ]
        assert db.fig(pid) == (10, 6, 4, 2)
    # down to exactly what is reserved is allowed: nothing available, nothing oversold
    out = db.one("stock.adjusted", {"product_id": pid, "on_hand": 6})
    assert msgs(out) == [
        ("inventory.adjusted", {"product_id": pid, "on_hand": 6, "reserved": 6, "available": 0}),
        ("inventory.low_stock", {"product_id": pid, "available": 0, "threshold": 0}),
    ]
    assert db.fig(pid) == (6, 6, 0, 3)


def test_low_stock_when_an_adjustment_crosses_the_threshold(db):
    pid = uid()
    ev = event("stock.adjusted", {"product_id": pid, "delta": 10, "low_stock_threshold": 3})
    out = db.apply(ev)[0]
    assert msgs(out) == [
        ("inventory.adjusted", {"product_id": pid, "on_hand": 10, "reserved": 0, "available": 10})
    ]
    with pg(db.settings) as cur:
        cur.execute("SELECT low_stock_threshold FROM products WHERE product_id = %s", (pid,))
        assert cur.fetchone() == (3,)
    out = db.one("stock.adjusted", {"product_id": pid, "delta": -6})  # 4: still above
    assert [t for t, _ in msgs(out)] == ["inventory.adjusted"]
    out = db.one("stock.adjusted", {"product_id": pid, "delta": -1})  # 3: at the threshold
    assert msgs(out) == [
        ("inventory.adjusted", {"product_id": pid, "on_hand": 3, "reserved": 0, "available": 3}),
        ("inventory.low_stock", {"product_id": pid, "available": 3, "threshold": 3}),
    ]
    out = db.one("stock.adjusted", {"product_id": pid, "delta": -1})  # already low: said once
    assert [t for t, _ in msgs(out)] == ["inventory.adjusted"]
    db.one("stock.adjusted", {"product_id": pid, "delta": 5})  # back above
    out = db.one("stock.adjusted", {"product_id": pid, "on_hand": 0})
    assert msgs(out)[1] == ("inventory.low_stock", {"product_id": pid, "available": 0, "threshold": 3})
    assert db.fig(pid) == (0, 0, 0, 6)


def test_threshold_alone_changes_no_stock(db):
    pid = uid()
    db.stock(pid, 5)
    ev = event("stock.adjusted", {"product_id": pid, "delta": 0, "low_stock_threshold": 2})
    out = db.apply(ev)[0]
    assert msgs(out) == [
        ("inventory.adjusted", {"product_id": pid, "on_hand": 5, "reserved": 0, "available": 5})
    ]
    assert db.fig(pid)[:3] == (5, 0, 5)
    assert db.ledger(ev["id"]) == []
    # the new threshold applies to the next change
    out = db.one("stock.adjusted", {"product_id": pid, "delta": -3})
    assert msgs(out)[1] == ("inventory.low_stock", {"product_id": pid, "available": 2, "threshold": 2})


# ==== order.placed ================================================================================


def test_place_reserves_every_line(db):
    a, b = uid("A"), uid("B")
    db.stock(a, 10)
    db.stock(b, 5)
    order = uid("O")
    started = datetime.now(UTC)
    eid, out = place(db, order, (b, 2), (a, 3))
    assert out.outcome == "reserved"
    assert msgs(out) == [("inventory.reserved", {"order_id": order, "lines": lines((b, 2), (a, 3))})]
    expires = datetime.fromisoformat(out.messages[0].body["data"]["expires_at"])
    assert started + timedelta(seconds=899) <= expires <= datetime.now(UTC) + timedelta(seconds=901)
    assert db.fig(a) == (10, 3, 7, 2) and db.fig(b) == (5, 2, 3, 2)
    assert sorted(db.ledger(eid)) == sorted(
        [(a, order, 0, 3, "reserve", None), (b, order, 0, 2, "reserve", None)]
    )
    assert db.order_status(order) == "reserved"
    assert sorted(f["product_id"] for f in out.products) == sorted([a, b])


def test_place_with_its_own_ttl(db):
    pid = uid()
    db.stock(pid, 1)
    started = datetime.now(UTC)
    _, out = place(db, uid("O"), (pid, 1), reservation_ttl_seconds=60)
    expires = datetime.fromisoformat(out.messages[0].body["data"]["expires_at"])
    assert started + timedelta(seconds=59) <= expires <= datetime.now(UTC) + timedelta(seconds=61)


def test_place_the_last_units_says_low_stock(db):
    pid = uid()
    db.stock(pid, 4)
    order = uid("O")
    _, out = place(db, order, (pid, 4))
    assert msgs(out) == [
        ("inventory.reserved", {"order_id": order, "lines": lines((pid, 4))}),
        ("inventory.low_stock", {"product_id": pid, "available": 0, "threshold": 0}),
    ]
    assert db.fig(pid) == (4, 4, 0, 2)


def test_place_crossing_the_threshold_says_low_stock_once(db):
    pid = uid()
    db.stock(pid, 10, threshold=5)
    _, out = place(db, uid("O"), (pid, 4))  # 6 left: above
    assert [t for t, _ in msgs(out)] == ["inventory.reserved"]
    _, out = place(db, uid("O"), (pid, 1))  # 5 left: at
    assert msgs(out)[1] == ("inventory.low_stock", {"product_id": pid, "available": 5, "threshold": 5})
    _, out = place(db, uid("O"), (pid, 1))  # 4 left: still low, no repeat
    assert [t for t, _ in msgs(out)] == ["inventory.reserved"]


def test_place_insufficient_stock_reserves_nothing(db):
    a, b, c = uid("A"), uid("B"), uid("C")
    db.stock(a, 10)
    db.stock(b, 2)
    db.stock(c, 1)
    order = uid("O")
    eid, out = place(db, order, (a, 5), (b, 3), (c, 2))
    assert out.outcome == "rejected"
    assert msgs(out) == [
        (
            "inventory.rejected",
            {
                "order_id": order,
                "reason": "insufficient_stock",
                "shortages": [
                    {"product_id": b, "requested": 3, "available": 2},
                    {"product_id": c, "requested": 2, "available": 1},
                ],
            },
        )
    ]
    # all or nothing: the line that fits reserved nothing either
    assert db.fig(a) == (10, 0, 10, 1) and db.fig(b) == (2, 0, 2, 1) and db.fig(c) == (1, 0, 1, 1)
    assert db.ledger(eid) == []
    assert db.order_status(order) is None
    assert out.products == []


def test_place_counts_what_others_reserved(db):
    pid = uid()
    db.stock(pid, 5)
    place(db, uid("O"), (pid, 3))
    order = uid("O")
    _, out = place(db, order, (pid, 3))
    assert msgs(out) == [
        (
            "inventory.rejected",
            {
                "order_id": order,
                "reason": "insufficient_stock",
                "shortages": [{"product_id": pid, "requested": 3, "available": 2}],
            },
        )
    ]
    assert db.fig(pid) == (5, 3, 2, 2)


def test_place_unknown_product(db):
    known, unknown = uid("K"), uid("U")
    db.stock(known, 10)
    order = uid("O")
    eid, out = place(db, order, (known, 1), (unknown, 2))
    assert msgs(out) == [
        (
            "inventory.rejected",
            {
                "order_id": order,
                "reason": "unknown_product",
                "shortages": [{"product_id": unknown, "requested": 2, "available": 0}],
            },
        )
    ]
    assert db.fig(known) == (10, 0, 10, 1)
    assert db.fig(unknown) is None
    assert db.ledger(eid) == []


def test_unknown_product_wins_over_a_shortage(db):
    short, unknown = uid("S"), uid("U")
    db.stock(short, 1)
    order = uid("O")
    _, out = place(db, order, (short, 2), (unknown, 1))
    assert msgs(out) == [
        (
            "inventory.rejected",
            {
                "order_id": order,
                "reason": "unknown_product",
                "shortages": [
                    {"product_id": short, "requested": 2, "available": 1},
                    {"product_id": unknown, "requested": 1, "available": 0},
                ],
            },
        )
    ]


def test_a_rejected_order_may_be_placed_again(db):
    pid = uid()
    db.stock(pid, 1)
    order = uid("O")
    _, out = place(db, order, (pid, 2))
    assert out.outcome == "rejected"
    db.stock(pid, 1)
    _, out = place(db, order, (pid, 2))
    assert out.outcome == "reserved"
    assert db.fig(pid) == (2, 2, 0, 3)


# ==== idempotency =================================================================================


def test_duplicate_id_changes_nothing_and_emits_nothing(db):
    pid = uid()
    db.stock(pid, 10)
    order = uid("O")
    ev = event("order.placed", {"order_id": order, "lines": lines((pid, 3))})
    first = db.apply(ev)[0]
    assert first.outcome == "reserved"
    outbox = db.outbox_count()
    for _ in range(2):
        again = db.apply(ev)[0]
        assert (again.outcome, again.messages) == ("duplicate", [])
        # The current figures still come back, so a redelivery after a crash between commit
        # and cache write puts the cache right.
        assert [(f["product_id"], f["on_hand"], f["reserved"], f["version"]) for f in again.products] == [
            (pid, 10, 3, 2)
        ]
    assert db.outbox_count() == outbox
    assert db.fig(pid) == (10, 3, 7, 2)
    assert len(db.ledger(ev["id"])) == 1
    assert db.processed(ev["id"]) == "reserved"


@pytest.mark.parametrize("kind", ["adjust", "cancel", "complete"])
def test_every_type_is_idempotent(db, kind):
    pid = uid()
    db.stock(pid, 10)
    order = uid("O")
    if kind == "adjust":
        ev = event("stock.adjusted", {"product_id": pid, "delta": 5})
        expected = (15, 0, 15, 2)
    else:
        place(db, order, (pid, 4))
        ev = event(f"order.{'cancelled' if kind == 'cancel' else 'completed'}", {"order_id": order})
        expected = (10, 0, 10, 3) if kind == "cancel" else (6, 0, 6, 3)
    assert db.apply(ev)[0].messages
    outbox = db.outbox_count()
    assert db.apply(ev)[0].outcome == "duplicate"
    assert db.outbox_count() == outbox
    assert db.fig(pid) == expected
    assert len(db.ledger(ev["id"])) == 1


def test_an_id_reused_with_other_content_is_not_a_duplicate(db):
    """order.cancelled sent with its order.placed's id: it was taken as a duplicate and lost,
    the stock staying reserved. Now 'id_reused' (the worker dead-letters it): nothing changes
    and nothing is recorded, so the same message sent again is 'id_reused' again."""
    pid, order = uid(), uid("O")
    db.stock(pid, 10)
    placed_id, placed = place(db, order, (pid, 3))
    assert placed.outcome == "reserved"
    outbox = db.outbox_count()
    cancel = event("order.cancelled", {"order_id": order}, event_id=placed_id)
    for _ in range(2):
        out = db.apply(cancel)[0]
        assert (out.outcome, out.messages, out.products) == ("id_reused", [], [])
    # the same type with other data is reused too; the same content in another key order is not
    other = event("order.placed", {"order_id": order, "lines": lines((pid, 4))}, event_id=placed_id)
    assert db.apply(other)[0].outcome == "id_reused"
    reordered = {
        "id": placed_id,
        "type": "order.placed",
        "data": {"lines": lines((pid, 3)), "order_id": order},
    }
    assert db.apply(reordered)[0].outcome == "duplicate"
    assert db.outbox_count() == outbox
    assert db.fig(pid) == (10, 3, 7, 2)
    assert db.order_status(order) == "reserved" and db.processed(placed_id) == "reserved"


def test_an_id_reused_within_one_batch(db):
    pid = uid()
    ev = event("stock.adjusted", {"product_id": pid, "delta": 2})
    other = {**ev, "data": {"product_id": pid, "delta": 3}}
    assert [r.outcome for r in db.apply(ev, other, ev, other)] == [
        "adjusted",
        "id_reused",
        "duplicate",
        "id_reused",
    ]
    assert db.fig(pid) == (2, 0, 2, 1)


def test_ids_applied_before_digests_were_kept_stay_duplicates(db, settings):
    """Rows written before migration 070 have no digest: such an id is a duplicate, whatever
    it carries, as it always was."""
    pid = uid()
    ev = event("stock.adjusted", {"product_id": pid, "delta": 2})
    db.apply(ev)
    with pg(settings) as cur:
        cur.execute("UPDATE processed_events SET digest = NULL WHERE event_id = %s", (ev["id"],))
    other = {**ev, "data": {"product_id": pid, "delta": 3}}
    assert [r.outcome for r in db.apply(other, ev)] == ["duplicate", "duplicate"]
    assert db.fig(pid) == (2, 0, 2, 1)


def test_duplicate_id_within_one_batch(db):
    pid = uid()
    ev = event("stock.adjusted", {"product_id": pid, "delta": 2})
    first, second = db.apply(ev, ev)
    assert (first.outcome, second.outcome) == ("adjusted", "duplicate")
    assert second.messages == []
    assert db.fig(pid) == (2, 0, 2, 1)


def test_same_order_placed_twice_under_two_ids_reserves_once(db):
    pid = uid()
    db.stock(pid, 10)
    order = uid("O")
    _, first = place(db, order, (pid, 3))
    eid, second = place(db, order, (pid, 3))
    assert first.outcome == "reserved"
    assert (second.outcome, second.messages, second.detail.get("status")) == (
        "duplicate_order",
        [],
        "reserved",
    )
    assert db.fig(pid) == (10, 3, 7, 2)
    assert db.ledger(eid) == []
    # even with other lines, and after the order moved on
    db.one("order.completed", {"order_id": order})
    _, third = place(db, order, (pid, 1))
    assert (third.outcome, third.messages, third.detail.get("status")) == ("duplicate_order", [], "committed")
    assert db.fig(pid) == (7, 0, 7, 3)


# ==== order.cancelled =============================================================================


def test_cancel_releases_the_reservation(db):
    a, b = uid("A"), uid("B")
    db.stock(a, 5)
    db.stock(b, 5)
    order = uid("O")
    place(db, order, (b, 1), (a, 5))
    ev = event("order.cancelled", {"order_id": order})
    out = db.apply(ev)[0]
    assert out.outcome == "released"
    # a's `available` rises from 0 to 5 (back in stock, decision 13.7); b's from 4 (no message).
    assert msgs(out) == [
        ("inventory.released", {"order_id": order, "lines": lines((b, 1), (a, 5)), "reason": "cancelled"}),
        ("inventory.back_in_stock", {"product_id": a, "available": 5}),
    ]
    assert db.fig(a) == (5, 0, 5, 3) and db.fig(b) == (5, 0, 5, 3)
    assert sorted(db.ledger(ev["id"])) == sorted(
        [(a, order, 0, -5, "release", None), (b, order, 0, -1, "release", None)]
    )
    assert db.order_status(order) == "released"
    # cancelling again changes nothing
    out = db.one("order.cancelled", {"order_id": order})
    assert (out.outcome, out.messages, out.detail["status"]) == ("ignored", [], "released")
    assert db.fig(a) == (5, 0, 5, 3)


def test_cancel_before_place_rejects_the_late_order(db):
    pid = uid()
    db.stock(pid, 10)
    order = uid("O")
    cancel = event("order.cancelled", {"order_id": order})
    out = db.apply(cancel)[0]
    assert (out.outcome, out.messages) == ("cancel_recorded", [])
    assert db.order_status(order) == "cancelled"
    eid, out = place(db, order, (pid, 3))
    assert out.outcome == "rejected"
    assert msgs(out) == [
        ("inventory.rejected", {"order_id": order, "reason": "order_cancelled", "shortages": []})
    ]
    assert db.fig(pid) == (10, 0, 10, 1)
    assert db.ledger(eid) == [] and db.ledger(cancel["id"]) == []
    # and stays rejected
    _, out = place(db, order, (pid, 1))
    assert msgs(out)[0][1]["reason"] == "order_cancelled"


def test_cancel_of_a_committed_order_changes_nothing(db):
    pid = uid()
    db.stock(pid, 10)
    order = uid("O")
    place(db, order, (pid, 4))
    db.one("order.completed", {"order_id": order})
    ev = event("order.cancelled", {"order_id": order})
    out = db.apply(ev)[0]
    assert (out.outcome, out.messages, out.detail["status"]) == ("ignored", [], "committed")
    assert db.fig(pid) == (6, 0, 6, 3)
    assert db.ledger(ev["id"]) == []
    assert db.order_status(order) == "committed"


def test_cancel_and_complete_of_an_unknown_order_change_no_stock(db):
    pid = uid()
    db.stock(pid, 10)
    outbox = db.outbox_count()
    complete = event("order.completed", {"order_id": uid("O")})
    out = db.apply(complete)[0]
    assert (out.outcome, out.messages, out.detail["status"]) == ("ignored", [], "unknown")
    out = db.one("order.cancelled", {"order_id": uid("O")})
    assert (out.outcome, out.messages) == ("cancel_recorded", [])
    assert db.outbox_count() == outbox
    assert db.fig(pid) == (10, 0, 10, 1)
    with pg(db.settings) as cur:
        cur.execute("SELECT count(*) FROM stock_movements WHERE event_id = %s", (complete["id"],))
        assert cur.fetchone() == (0,)


# ==== order.completed =============================================================================


def test_complete_commits_the_reservation(db):
    a, b = uid("A"), uid("B")
    db.stock(a, 10)
    db.stock(b, 3, threshold=1)
    order = uid("O")
    place(db, order, (a, 4), (b, 3))
    ev = event("order.completed", {"order_id": order})
    out = db.apply(ev)[0]
    assert out.outcome == "committed"
    assert msgs(out) == [("inventory.committed", {"order_id": order, "lines": lines((a, 4), (b, 3))})]
    assert db.fig(a) == (6, 0, 6, 3) and db.fig(b) == (0, 0, 0, 3)
    assert sorted(db.ledger(ev["id"])) == sorted(
        [(a, order, -4, -4, "commit", None), (b, order, -3, -3, "commit", None)]
    )
    assert db.order_status(order) == "committed"
    # completing again changes nothing
    out = db.one("order.completed", {"order_id": order})
    assert (out.outcome, out.messages, out.detail["status"]) == ("ignored", [], "committed")
    assert db.fig(a) == (6, 0, 6, 3)


def test_complete_after_cancel_is_rejected(db):
    pid = uid()
    db.stock(pid, 10)
    order = uid("O")
    place(db, order, (pid, 2))
    db.one("order.cancelled", {"order_id": order})
    ev = event("order.completed", {"order_id": order})
    out = db.apply(ev)[0]
    assert msgs(out) == [
        ("inventory.rejected", {"order_id": order, "reason": "order_cancelled", "shortages": []})
    ]
    assert db.fig(pid) == (10, 0, 10, 3)
    assert db.ledger(ev["id"]) == []
    # also when the cancel came before the order was ever placed
    other = uid("O")
    db.one("order.cancelled", {"order_id": other})
    out = db.one("order.completed", {"order_id": other})
    assert msgs(out) == [
        ("inventory.rejected", {"order_id": other, "reason": "order_cancelled", "shortages": []})
    ]


# ==== batches =====================================================================================


def test_events_of_one_order_in_one_batch_apply_in_order(db):
    pid, order = uid(), uid("O")
    results = db.apply(
        event("stock.adjusted", {"product_id": pid, "delta": 5}),
        event("order.placed", {"order_id": order, "lines": lines((pid, 5))}),
        event("order.cancelled", {"order_id": order}),
        event("order.placed", {"order_id": (o2 := uid("O")), "lines": lines((pid, 2))}),
        event("order.completed", {"order_id": o2}),
    )
    assert [r.outcome for r in results] == ["adjusted", "reserved", "released", "reserved", "committed"]
    # the cancel takes `available` from 0 to 5: back in stock (decision 13.7)
    assert [t for r in results for t, _ in msgs(r)] == [
        "inventory.adjusted",
        "inventory.reserved",
        "inventory.low_stock",
        "inventory.released",
        "inventory.back_in_stock",
        "inventory.reserved",
        "inventory.committed",
    ]
    assert db.fig(pid) == (3, 0, 3, 5)
    # figures per event are those right after it: the consumer caches the last ones
    assert [r.products[0]["version"] for r in results] == [1, 2, 3, 4, 5]


def test_cancel_then_place_in_one_batch(db):
    pid, order = uid(), uid("O")
    db.stock(pid, 5)
    cancel, placed = db.apply(
        event("order.cancelled", {"order_id": order}),
        event("order.placed", {"order_id": order, "lines": lines((pid, 1))}),
    )
    assert cancel.outcome == "cancel_recorded"
    assert msgs(placed) == [
        ("inventory.rejected", {"order_id": order, "reason": "order_cancelled", "shortages": []})
    ]
    assert db.fig(pid) == (5, 0, 5, 1)


def test_batch_is_atomic_when_one_event_is_refused(db):
    pid = uid()
    good = event("stock.adjusted", {"product_id": pid, "delta": 5})
    bad = {"id": str(uuid.uuid4()), "type": "order.placed", "data": {"order_id": "", "lines": []}}
    outbox = db.outbox_count()
    with pytest.raises(PermanentError):
        db.store.apply_batch([good, bad])
    assert db.fig(pid) is None
    assert db.processed(good["id"]) is None
    assert db.outbox_count() == outbox
    # the store stays usable; the good event alone applies
    assert db.apply(good)[0].outcome == "adjusted"


# ==== argument checks in the procedures (data that bypassed the contract) ===========================


def raw(type_: str, data: Any, event_id: Any = "new") -> dict[str, Any]:
    return {"id": str(uuid.uuid4()) if event_id == "new" else event_id, "type": type_, "data": data}


def _line(**kw: Any) -> dict[str, Any]:
    return {"product_id": "ARG-OK", "quantity": 1, **kw}


BYPASS = {
    "id not a uuid": raw("stock.adjusted", {"product_id": "ARG-OK", "delta": 1}, "nope"),
    "id null": raw("stock.adjusted", {"product_id": "ARG-OK", "delta": 1}, None),
    "unknown type": raw("order.shipped", {"order_id": "o"}),
    "type null": raw(None, {"order_id": "o"}),
    "data not an object": raw("order.cancelled", ["o"]),
    "data null": raw("order.cancelled", None),
    "order_id missing": raw("order.placed", {"lines": [_line()]}),
    "order_id empty": raw("order.placed", {"order_id": "", "lines": [_line()]}),
    "order_id too long": raw("order.placed", {"order_id": "x" * 201, "lines": [_line()]}),
    "lines missing": raw("order.placed", {"order_id": "o"}),
    "lines not an array": raw("order.placed", {"order_id": "o", "lines": _line()}),
    "lines empty": raw("order.placed", {"order_id": "o", "lines": []}),
    "101 lines": raw(
        "order.placed", {"order_id": "o", "lines": [_line(product_id=f"P{i}") for i in range(101)]}
    ),
    "bad product id": raw("order.placed", {"order_id": "o", "lines": [_line(product_id="a b")]}),
    "product id missing": raw("order.placed", {"order_id": "o", "lines": [{"quantity": 1}]}),
    "quantity zero": raw("order.placed", {"order_id": "o", "lines": [_line(quantity=0)]}),
    "quantity too big": raw("order.placed", {"order_id": "o", "lines": [_line(quantity=1_000_001)]}),
    "quantity fractional": raw("order.placed", {"order_id": "o", "lines": [_line(quantity=1.5)]}),
    "quantity missing": raw("order.placed", {"order_id": "o", "lines": [{"product_id": "ARG-OK"}]}),
    "quantity missing on a second line": raw(
        "order.placed", {"order_id": "o", "lines": [_line(), {"product_id": "ARG-OTHER"}]}
    ),
    "quantity missing next to an unknown product": raw(
        "order.placed", {"order_id": "o", "lines": [_line(), {"product_id": "ARG-UNKNOWN"}]}
    ),
    "quantity null": raw("order.placed", {"order_id": "o", "lines": [_line(quantity=None)]}),
    "line not an object": raw("order.placed", {"order_id": "o", "lines": [_line(), 5]}),
    "duplicate product": raw("order.placed", {"order_id": "o", "lines": [_line(), _line(quantity=2)]}),
    "ttl zero": raw("order.placed", {"order_id": "o", "lines": [_line()], "reservation_ttl_seconds": 0}),
    "cancel without order_id": raw("order.cancelled", {}),
    "complete with empty order_id": raw("order.completed", {"order_id": ""}),
    "adjust bad product id": raw("stock.adjusted", {"product_id": "no/slash", "delta": 1}),
    "adjust both": raw("stock.adjusted", {"product_id": "ARG-OK", "delta": 1, "on_hand": 1}),
    "adjust neither": raw("stock.adjusted", {"product_id": "ARG-OK"}),
    "adjust negative threshold": raw(
        "stock.adjusted", {"product_id": "ARG-OK", "delta": 1, "low_stock_threshold": -1}
    ),
    "adjust delta not a number": raw("stock.adjusted", {"product_id": "ARG-OK", "delta": "lots"}),
}


@pytest.mark.parametrize("name", list(BYPASS))
def test_procedures_check_their_arguments(db, name):
    db.stock("ARG-OK", 0) if db.fig("ARG-OK") is None else None
    if db.fig("ARG-OTHER") is None:
        db.stock("ARG-OTHER", 5)
    before = (db.fig("ARG-OK"), db.fig("ARG-OTHER"), db.outbox_count())
    with pytest.raises(PermanentError) as exc:
        db.store.apply_batch([BYPASS[name]])
    assert "ERROR" in str(exc.value)
    assert (db.fig("ARG-OK"), db.fig("ARG-OTHER"), db.outbox_count()) == before
    assert db.fig("ARG-UNKNOWN") is None


def test_database_refuses_what_the_contract_cannot_see(db):
    """An order id with a NUL character is valid JSON, but PostgreSQL text cannot hold it: the
    contract refuses it (with its own reason), and the store still refuses it as permanent
    from a caller that skips the contract."""
    with pytest.raises(InvalidMessage, match="must not contain U\\+0000"):
        event("order.cancelled", {"order_id": "o\u0000x"})
    ev = {"id": str(uuid.uuid4()), "type": "order.cancelled", "data": {"order_id": "o\u0000x"}}
    with pytest.raises(PermanentError) as exc:
        db.store.apply_batch([ev])
    assert "Unicode" in str(exc.value)
    assert db.processed(ev["id"]) is None
