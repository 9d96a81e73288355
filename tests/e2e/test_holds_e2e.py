"""Holds and their deadlines through a running worker and its elected sweeper (spec 4.2, 4.6,
4.8; acceptance check 8): reservation.extended moves the deadline and the sweeper keeps to the
new one; the longest lifetime refuses `extension_limit`; a hold until fulfilled is never swept;
an order partly cancelled, then expired, reports what the expiry released.

A database, queues and a worker of this module's own (tests/private_stack.py): the worker runs
with a short `worker.max_reservation_lifetime_seconds`, and the sweeper that takes these short
deadlines is this worker's, not another test's. When the sweeper expired an order is judged by
PostgreSQL's clock (the ledger row's time against the deadline), never by the test's.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest

from inventory_worker.config import Settings
from inventory_worker.contract import validate_output

from ..private_stack import all_figures, private_settings
from ..support import Bus, WorkerProcess, free_port, pg, uid
from .test_worker_e2e import Tap, lines, processed

pytestmark = pytest.mark.slow

LIFETIME = 12  # worker.max_reservation_lifetime_seconds
TTL = 4  # short enough to wait for, long enough for a message to reach the order before it


@pytest.fixture(scope="module")
def stack(settings: Settings, logs_dir: Any) -> Iterator[tuple[WorkerProcess, Bus]]:
    with private_settings(settings, "holds") as s:
        s = s.model_copy(
            update={
                "worker": s.worker.model_copy(update={"max_reservation_lifetime_seconds": LIFETIME}),
                "http": s.http.model_copy(update={"port": free_port()}),
            }
        )
        w = WorkerProcess(s, processes=2, log_path=logs_dir / f"holds-{uuid.uuid4().hex[:6]}.log")
        bus = Bus(s)
        try:
            w.start()
            yield w, bus
        finally:
            bus.close()
            w.stop()


@pytest.fixture
def tap(stack: tuple[WorkerProcess, Bus]) -> Tap:
    return Tap(stack[1])


def ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def results(
    bus: Bus, tap: Tap, sent: dict[str, Any], count: int, timeout: float = 20.0
) -> list[dict[str, Any]]:
    """The `count` result documents of a message, in publishing order, each checked against the
    contract with its routing key and message id (and no more of them a moment later)."""
    deadline = time.monotonic() + timeout
    while len(tap.for_event(sent["id"])) < count:
        assert time.monotonic() < deadline, f"{len(tap.for_event(sent['id']))} of {count} results"
        bus.conn.sleep(0.05)
    bus.conn.sleep(0.2)
    found = tap.for_event(sent["id"])
    assert len(found) == count, [doc["type"] for _, _, doc in found]
    for routing_key, props, doc in found:
        validate_output(doc)
        assert routing_key == doc["type"] and props.message_id == doc["id"]
    return [doc for _, _, doc in found]


def send(bus: Bus, tap: Tap, type_: str, data: dict[str, Any], count: int = 1) -> list[dict[str, Any]]:
    return results(bus, tap, bus.publish(type_, data), count)


def place(bus: Bus, tap: Tap, order_id: str, *pairs: tuple[str, int], ttl: int = TTL) -> dict[str, Any]:
    """Places an order; returns its order.placed message and its inventory.reserved data."""
    sent = bus.publish(
        "order.placed", {"order_id": order_id, "lines": lines(*pairs), "reservation_ttl_seconds": ttl}
    )
    [reserved] = results(bus, tap, sent, 1)
    assert reserved["type"] == "inventory.reserved"
    return {"placed": sent, "reserved": reserved["data"]}


def stocked(bus: Bus, tap: Tap, pid: str, on_hand: int) -> None:
    [adjusted] = send(bus, tap, "stock.adjusted", {"product_id": pid, "on_hand": on_hand})
    assert adjusted["type"] == "inventory.adjusted"


def order_row(settings: Settings, order_id: str) -> tuple[str, datetime | None, datetime]:
    with pg(settings) as cur:
        cur.execute("SELECT status, expires_at, created_at FROM orders WHERE order_id = %s", (order_id,))
        row = cur.fetchone()
    return row[0], row[1], row[2]


def expired_after(settings: Settings, order_id: str) -> float:
    """Seconds between the order's deadline and its expiry's ledger rows, by PostgreSQL's clock
    (the earliest row: never negative when the sweeper kept to the deadline)."""
    with pg(settings) as cur:
        cur.execute(
            "SELECT extract(epoch FROM min(m.occurred_at) - o.expires_at)"
            "  FROM stock_movements m JOIN orders o USING (order_id)"
            " WHERE m.reason = 'expire' AND m.order_id = %s GROUP BY o.expires_at",
            (order_id,),
        )
        return float(cur.fetchone()[0])


def test_extension_moves_the_deadline_and_the_sweeper_keeps_to_it(stack, tap):
    worker, bus = stack
    s = worker.settings
    pid, order = uid("EXT"), uid("o")
    stocked(bus, tap, pid, 10)
    held = place(bus, tap, order, (pid, 3))
    first_deadline = held["reserved"]["expires_at"]

    [extended] = send(bus, tap, "reservation.extended", {"order_id": order, "extend_by_seconds": 6})
    assert extended["type"] == "inventory.reservation_extended"
    assert extended["data"]["order_id"] == order
    assert extended["data"]["previous_expires_at"] == first_deadline
    new_deadline = extended["data"]["expires_at"]
    status, expires_at, created_at = order_row(s, order)
    assert (status, expires_at) == ("reserved", ts(new_deadline))
    # now() + 6 s, later than the first deadline, within the lifetime.
    assert ts(first_deadline) < ts(new_deadline) <= created_at + timedelta(seconds=LIFETIME)

    expired = bus.wait_result(held["placed"]["id"], "inventory.expired", timeout=30)
    assert expired["data"] == {"order_id": order, "lines": lines((pid, 3)), "expired_at": new_deadline}
    assert expired_after(s, order) >= 0  # not before the new deadline
    assert all_figures(s, [pid]) == {pid: (10, 0)}
    assert order_row(s, order)[0] == "expired"


def test_the_longest_lifetime_caps_an_extension_then_refuses_extension_limit(stack, tap):
    worker, bus = stack
    s = worker.settings
    pid, order = uid("CAP"), uid("o")
    stocked(bus, tap, pid, 10)
    held = place(bus, tap, order, (pid, 1))
    _, _, created_at = order_row(s, order)

    [capped] = send(bus, tap, "reservation.extended", {"order_id": order, "extend_by_seconds": 3600})
    assert capped["type"] == "inventory.reservation_extended"
    assert capped["data"]["previous_expires_at"] == held["reserved"]["expires_at"]
    assert ts(capped["data"]["expires_at"]) == created_at + timedelta(seconds=LIFETIME)

    [refused] = send(bus, tap, "reservation.extended", {"order_id": order, "extend_by_seconds": 60})
    assert (refused["type"], refused["data"]) == (
        "inventory.rejected",
        {"order_id": order, "reason": "extension_limit", "shortages": []},
    )
    assert order_row(s, order)[:2] == ("reserved", created_at + timedelta(seconds=LIFETIME))
    [released] = send(bus, tap, "order.cancelled", {"order_id": order})
    assert released["type"] == "inventory.released"
    assert all_figures(s, [pid]) == {pid: (10, 0)}


def test_a_hold_until_fulfilled_is_never_swept(stack, tap):
    worker, bus = stack
    s = worker.settings
    pid, pinned, lapsing = uid("UF"), uid("o"), uid("o")
    stocked(bus, tap, pid, 10)
    held = place(bus, tap, pinned, (pid, 2))
    [extended] = send(bus, tap, "reservation.extended", {"order_id": pinned, "until_fulfilled": True})
    assert (extended["type"], extended["data"]) == (
        "inventory.reservation_extended",
        {"order_id": pinned, "expires_at": None, "previous_expires_at": held["reserved"]["expires_at"]},
    )
    # An order placed after it, with the same TTL: once the sweeper has expired that one, it has
    # swept past the first one's old deadline.
    later = place(bus, tap, lapsing, (pid, 1))
    assert ts(later["reserved"]["expires_at"]) > ts(held["reserved"]["expires_at"])
    bus.wait_result(later["placed"]["id"], "inventory.expired", timeout=30)

    assert order_row(s, pinned)[:2] == ("reserved", None)
    assert [r["type"] for r in bus.results_for(held["placed"]["id"])] == ["inventory.reserved"]
    assert all_figures(s, [pid]) == {pid: (10, 2)}
    # extend_by_seconds on a hold until fulfilled, or until_fulfilled again: ignored, no event.
    for again in ({"extend_by_seconds": 60}, {"until_fulfilled": True}):
        sent = bus.publish("reservation.extended", {"order_id": pinned, **again})
        assert processed(s, sent) == "ignored"
        assert results(bus, tap, sent, 0) == []
    assert order_row(s, pinned)[:2] == ("reserved", None)

    shipped = send(
        bus, tap, "order.fulfilled", {"order_id": pinned, "fulfilment_id": "f-1", "lines": lines((pid, 2))}, 2
    )
    assert [d["type"] for d in shipped] == ["inventory.fulfilled", "inventory.committed"]
    assert all_figures(s, [pid]) == {pid: (8, 0)}


def test_a_partly_cancelled_order_expires_with_what_was_left(stack, tap):
    worker, bus = stack
    s = worker.settings
    a, b, order = uid("PX"), uid("PX"), uid("o")
    stocked(bus, tap, a, 10)
    stocked(bus, tap, b, 10)
    held = place(bus, tap, order, (a, 5), (b, 2))
    [released] = send(bus, tap, "order.cancelled", {"order_id": order, "lines": lines((a, 2))})
    assert (released["type"], released["data"]) == (
        "inventory.released",
        {"order_id": order, "lines": lines((a, 2)), "reason": "cancelled"},
    )
    assert all_figures(s, [a, b]) == {a: (10, 3), b: (10, 2)}

    expired = bus.wait_result(held["placed"]["id"], "inventory.expired", timeout=30)
    # What the expiry released: 3 of a (2 were cancelled), all of b. 2 + 3 = the 5 ordered.
    assert expired["data"] == {
        "order_id": order,
        "lines": lines((a, 3), (b, 2)),
        "expired_at": held["reserved"]["expires_at"],
    }
    assert expired_after(s, order) >= 0
    assert all_figures(s, [a, b]) == {a: (10, 0), b: (10, 0)}
