"""An order's life after placement through the running worker (spec Part B 4.3-4.7, acceptance
checks 5, 11, 12, 13): messages published to RabbitMQ, the result events read back with their
AMQP properties (Tap), the figures read over HTTP (GET /inventory/{id} and /detail) and from
PostgreSQL. Nothing here needs the sweeper: short deadlines are in test_holds_e2e.py.

Each message waits for its result before the next is sent: the worker's two consumers do not
keep the order of messages between them.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from ..support import Bus, http_get, pg, uid
from .test_worker_e2e import Tap, lines, processed, stock


@pytest.fixture
def tap(bus: Bus) -> Tap:
    return Tap(bus)


def send(bus: Bus, tap: Tap, type_: str, data: dict[str, Any], results: int = 1) -> list[tuple[str, dict]]:
    """Publishes one message; its `results` result events as (type, data), in publishing order."""
    return tap.results(bus.publish(type_, data), results)


def configured(bus: Bus, tap: Tap, type_: str, data: dict[str, Any]) -> None:
    [(kind, _)] = send(bus, tap, type_, data)
    assert kind == "inventory.configured"


def compact(worker: Any, pid: str) -> dict[str, Any]:
    status, _, body = http_get(f"{worker.base_url}/inventory/{pid}")
    assert status == 200, body
    doc: dict[str, Any] = json.loads(body)
    return doc


def detail(worker: Any, pid: str) -> dict[str, Any]:
    status, _, body = http_get(f"{worker.base_url}/inventory/{pid}/detail")
    assert status == 200, body
    doc: dict[str, Any] = json.loads(body)
    return doc


def figures_of(doc: dict[str, Any], *names: str) -> tuple[Any, ...]:
    return tuple(doc[n] for n in names)


def order_status(settings: Any, order_id: str) -> str:
    with pg(settings) as cur:
        cur.execute("SELECT status FROM orders WHERE order_id = %s", (order_id,))
        status: str = cur.fetchone()[0]
    return status


def results_of_type(tap: Tap, type_: str, order_id: str) -> list[dict[str, Any]]:
    """Every result event of that type for that order seen so far, whatever caused it."""
    tap.drain()
    return [
        d["data"]
        for _, _, d in tap.seen.values()
        if d["type"] == type_ and d["data"].get("order_id") == order_id
    ]


# ==== order.fulfilled (4.4, acceptance check 11) =================================================


def test_fulfilment_3_of_5_then_2_commits_once_then_refuses_and_ignores_a_reused_id(
    worker, bus, tap, settings
):
    pid, order = uid("FUL"), uid("O")
    stock(bus, tap, pid, 10)
    assert send(bus, tap, "order.placed", {"order_id": order, "lines": lines((pid, 5))}) == [
        ("inventory.reserved", {"order_id": order, "lines": lines((pid, 5))})
    ]

    first = {"order_id": order, "fulfilment_id": "ship-1", "lines": lines((pid, 3))}
    assert send(bus, tap, "order.fulfilled", first) == [
        (
            "inventory.fulfilled",
            {
                "order_id": order,
                "fulfilment_id": "ship-1",
                "lines": [{"product_id": pid, "location_id": "default", "quantity": 3}],
                "open": [{"product_id": pid, "reserved": 2, "backordered": 0}],
            },
        )
    ]
    assert figures_of(compact(worker, pid), "on_hand", "reserved", "available") == (7, 2, 5)
    assert order_status(settings, order) == "reserved"

    second = {"order_id": order, "fulfilment_id": "ship-2", "lines": lines((pid, 2))}
    assert send(bus, tap, "order.fulfilled", second, 2) == [
        (
            "inventory.fulfilled",
            {
                "order_id": order,
                "fulfilment_id": "ship-2",
                "lines": [{"product_id": pid, "location_id": "default", "quantity": 2}],
                "open": [],
            },
        ),
        ("inventory.committed", {"order_id": order, "lines": lines((pid, 5))}),
    ]
    assert figures_of(compact(worker, pid), "on_hand", "reserved", "available") == (5, 0, 5)
    assert order_status(settings, order) == "committed"

    third = {"order_id": order, "fulfilment_id": "ship-3", "lines": lines((pid, 1))}
    assert send(bus, tap, "order.fulfilled", third) == [
        ("inventory.rejected", {"order_id": order, "reason": "order_completed", "shortages": []})
    ]
    # ship-1 again under a new message id: recognised by its fulfilment_id, nothing published.
    again = bus.publish("order.fulfilled", first)
    assert processed(settings, again) == "duplicate_fulfilment"
    assert tap.results(again, 0) == []

    assert len(results_of_type(tap, "inventory.committed", order)) == 1
    assert len(results_of_type(tap, "inventory.fulfilled", order)) == 2
    assert figures_of(compact(worker, pid), "on_hand", "reserved", "available") == (5, 0, 5)
    with pg(settings) as cur:
        cur.execute("SELECT quantity, fulfilled FROM order_lines WHERE order_id = %s", (order,))
        assert cur.fetchall() == [(5, 5)]


# ==== partial order.cancelled (4.6, acceptance check 12) =========================================


def test_partial_cancel_releases_backordered_units_first_then_the_last_location(worker, bus, tap, settings):
    pid, first, last, channel, order = uid("PCX"), uid("near"), uid("far"), uid("web"), uid("O")
    for loc in (first, last):
        configured(bus, tap, "location.configured", {"location_id": loc})
    configured(bus, tap, "channel.configured", {"channel_id": channel, "locations": [first, last]})
    configured(bus, tap, "product.configured", {"product_id": pid, "backorder": {"mode": "allow"}})
    # The product, created at 0 by product.configured, comes into stock (decision 13.7).
    for loc, results in (
        (first, ["inventory.adjusted", "inventory.back_in_stock"]),
        (last, ["inventory.adjusted"]),
    ):
        stocked = send(
            bus, tap, "stock.adjusted", {"product_id": pid, "location_id": loc, "on_hand": 2}, len(results)
        )
        assert [t for t, _ in stocked] == results

    placed = send(
        bus, tap, "order.placed", {"order_id": order, "channel_id": channel, "lines": lines((pid, 6))}, 3
    )
    assert placed == [
        ("inventory.reserved", {"order_id": order, "lines": lines((pid, 6))}),
        (
            "inventory.allocated",
            {
                "order_id": order,
                "channel_id": channel,
                "lines": [
                    {
                        "product_id": pid,
                        "quantity": 6,
                        "tracked": True,
                        "allocations": [
                            {"location_id": first, "quantity": 2},
                            {"location_id": last, "quantity": 2},
                        ],
                        "backordered": 2,
                    }
                ],
            },
        ),
        ("inventory.low_stock", {"product_id": pid, "available": 0, "threshold": 0}),
    ]

    def held() -> tuple[int, dict[str, int]]:
        d = detail(worker, pid)
        return d["backordered"], {
            x["location_id"]: x["reserved"] for x in d["locations"] if x["location_id"] != "default"
        }

    assert held() == (2, {first: 2, last: 2})

    # 3 units: the 2 backordered, then 1 from the last location; the first keeps its hold.
    cancel = {"order_id": order, "lines": lines((pid, 3))}
    assert send(bus, tap, "order.cancelled", cancel, 2) == [
        ("inventory.released", {"order_id": order, "lines": lines((pid, 3)), "reason": "cancelled"}),
        ("inventory.back_in_stock", {"product_id": pid, "available": 1}),
    ]
    assert held() == (0, {first: 2, last: 1})
    assert send(bus, tap, "order.cancelled", {"order_id": order, "lines": lines((pid, 1))}) == [
        ("inventory.released", {"order_id": order, "lines": lines((pid, 1)), "reason": "cancelled"})
    ]
    assert held() == (0, {first: 2, last: 0})
    assert order_status(settings, order) == "reserved"

    # More than is open: refused, nothing changes.
    assert send(bus, tap, "order.cancelled", {"order_id": order, "lines": lines((pid, 3))}) == [
        (
            "inventory.rejected",
            {
                "order_id": order,
                "reason": "exceeds_open_quantity",
                "shortages": [{"product_id": pid, "requested": 3, "available": 2}],
            },
        )
    ]
    # The rest closes the order: released, nothing was fulfilled, so no inventory.committed.
    assert send(bus, tap, "order.cancelled", {"order_id": order, "lines": lines((pid, 2))}) == [
        ("inventory.released", {"order_id": order, "lines": lines((pid, 2)), "reason": "cancelled"})
    ]
    assert held() == (0, {first: 0, last: 0})
    assert order_status(settings, order) == "released"
    assert figures_of(compact(worker, pid), "on_hand", "reserved", "available") == (4, 0, 4)
    assert results_of_type(tap, "inventory.committed", order) == []


# ==== order.returned (4.7, acceptance check 13) ==================================================


def test_return_of_2_sellable_and_1_damaged_then_more_than_fulfilled(worker, bus, tap, settings):
    pid, order = uid("RET"), uid("O")
    stock(bus, tap, pid, 10)
    send(bus, tap, "order.placed", {"order_id": order, "lines": lines((pid, 5))})
    assert send(bus, tap, "order.completed", {"order_id": order}) == [
        ("inventory.committed", {"order_id": order, "lines": lines((pid, 5))})
    ]
    before = detail(worker, pid)
    assert figures_of(before, "on_hand", "reserved", "available", "damaged") == (5, 0, 5, 0)

    back = {
        "order_id": order,
        "return_id": "rma-1",
        "lines": [
            {"product_id": pid, "quantity": 2, "condition": "sellable"},
            {"product_id": pid, "quantity": 1, "condition": "damaged"},
        ],
    }
    assert send(bus, tap, "order.returned", back) == [
        (
            "inventory.returned",
            {
                "order_id": order,
                "return_id": "rma-1",
                "lines": [
                    {"product_id": pid, "location_id": "default", "quantity": 2, "condition": "sellable"},
                    {"product_id": pid, "location_id": "default", "quantity": 1, "condition": "damaged"},
                ],
            },
        )
    ]
    after = detail(worker, pid)
    assert after["version"] > before["version"]
    # on_hand +3, damaged +1, available +2: the damaged unit is there but not for sale.
    assert figures_of(after, "on_hand", "reserved", "available", "damaged", "quality_control") == (
        8,
        0,
        7,
        1,
        0,
    )
    [level] = after["locations"]
    assert figures_of(level, "location_id", "on_hand", "available", "damaged") == ("default", 8, 7, 1)
    assert figures_of(compact(worker, pid), "on_hand", "reserved", "available") == (8, 0, 7)

    # 3 more of the 5 fulfilled: only 2 were not returned yet.
    more = {
        "order_id": order,
        "return_id": "rma-2",
        "lines": [{"product_id": pid, "quantity": 3, "condition": "sellable"}],
    }
    assert send(bus, tap, "order.returned", more) == [
        (
            "inventory.rejected",
            {
                "order_id": order,
                "reason": "exceeds_fulfilled",
                "shortages": [{"product_id": pid, "requested": 3, "available": 2}],
            },
        )
    ]
    again = bus.publish("order.returned", back)  # rma-1 under a new message id
    assert processed(settings, again) == "duplicate_return"
    assert tap.results(again, 0) == []
    assert figures_of(detail(worker, pid), "on_hand", "available", "damaged") == (8, 7, 1)


# ==== backorders filled by stock (4.3, acceptance check 5) =======================================


def test_backorder_filled_by_a_receipt_then_completed(worker, bus, tap, settings):
    pid, waiting, refused = uid("BOR"), uid("O"), uid("O")
    configured(
        bus, tap, "product.configured", {"product_id": pid, "backorder": {"mode": "allow", "limit": 10}}
    )
    stocked = send(bus, tap, "stock.adjusted", {"product_id": pid, "delta": 5}, 2)
    assert [t for t, _ in stocked] == ["inventory.adjusted", "inventory.back_in_stock"]
    placed = send(bus, tap, "order.placed", {"order_id": waiting, "lines": lines((pid, 12))}, 3)
    assert placed[0] == ("inventory.reserved", {"order_id": waiting, "lines": lines((pid, 12))})
    assert placed[1][0] == "inventory.allocated"
    assert placed[1][1]["lines"][0]["allocations"] == [{"location_id": "default", "quantity": 5}]
    assert placed[1][1]["lines"][0]["backordered"] == 7
    assert placed[2] == ("inventory.low_stock", {"product_id": pid, "available": 0, "threshold": 0})
    d = detail(worker, pid)
    assert figures_of(d, "on_hand", "reserved", "available", "backordered", "orderable") == (5, 5, 0, 7, 3)
    assert d["backorder"] == {"mode": "allow", "limit": 10, "until": None, "headroom": 3}

    # 4 more than the headroom of 3 can promise.
    assert send(bus, tap, "order.placed", {"order_id": refused, "lines": lines((pid, 4))}) == [
        (
            "inventory.rejected",
            {
                "order_id": refused,
                "reason": "insufficient_stock",
                "shortages": [{"product_id": pid, "requested": 4, "available": 3}],
            },
        )
    ]
    assert send(bus, tap, "order.completed", {"order_id": waiting}) == [
        ("inventory.rejected", {"order_id": waiting, "reason": "backorder_pending", "shortages": []})
    ]

    receipt = send(bus, tap, "stock.received", {"product_id": pid, "quantity": 7, "reference": "po-1"}, 4)
    assert [t for t, _ in receipt] == [
        "inventory.moved",
        "inventory.back_in_stock",
        "inventory.backorder_filled",
        "inventory.low_stock",
    ]
    assert figures_of(
        receipt[0][1], "kind", "product_id", "location_id", "quantity", "unexpected", "reference"
    ) == (
        "receipt",
        pid,
        "default",
        7,
        7,
        "po-1",
    )
    assert receipt[2][1] == {
        "order_id": waiting,
        "lines": [{"product_id": pid, "location_id": "default", "quantity": 7}],
        "backordered_remaining": [],
    }
    d = detail(worker, pid)
    assert figures_of(d, "on_hand", "reserved", "available", "backordered") == (12, 12, 0, 0)

    assert send(bus, tap, "order.completed", {"order_id": waiting}) == [
        ("inventory.committed", {"order_id": waiting, "lines": lines((pid, 12))})
    ]
    assert figures_of(compact(worker, pid), "on_hand", "reserved", "available") == (0, 0, 0)
    assert order_status(settings, waiting) == "committed"


def test_backorders_filled_fifo_by_an_adjustment(worker, bus, tap, settings):
    pid, older, newer = uid("BOA"), uid("O"), uid("O")
    configured(bus, tap, "product.configured", {"product_id": pid, "backorder": {"mode": "allow"}})
    for order, quantity in ((older, 3), (newer, 2)):  # one after the other: FIFO by placement
        placed = send(bus, tap, "order.placed", {"order_id": order, "lines": lines((pid, quantity))}, 2)
        assert [t for t, _ in placed] == ["inventory.reserved", "inventory.allocated"]
        assert placed[1][1]["lines"][0]["backordered"] == quantity

    # available 0 -> 4 by the adjustment, back to 0 by the fills in the same transaction.
    adjusted = send(bus, tap, "stock.adjusted", {"product_id": pid, "delta": 4}, 5)
    assert [t for t, _ in adjusted] == [
        "inventory.adjusted",
        "inventory.back_in_stock",
        "inventory.backorder_filled",
        "inventory.backorder_filled",
        "inventory.low_stock",
    ]
    assert [d for _, d in adjusted[2:4]] == [
        {
            "order_id": older,
            "lines": [{"product_id": pid, "location_id": "default", "quantity": 3}],
            "backordered_remaining": [],
        },
        {
            "order_id": newer,
            "lines": [{"product_id": pid, "location_id": "default", "quantity": 1}],
            "backordered_remaining": [{"product_id": pid, "quantity": 1}],
        },
    ]
    assert figures_of(detail(worker, pid), "on_hand", "reserved", "available", "backordered") == (4, 4, 0, 1)

    assert send(bus, tap, "order.completed", {"order_id": older}) == [
        ("inventory.committed", {"order_id": older, "lines": lines((pid, 3))})
    ]
    assert send(bus, tap, "order.completed", {"order_id": newer}) == [
        ("inventory.rejected", {"order_id": newer, "reason": "backorder_pending", "shortages": []})
    ]
    assert figures_of(detail(worker, pid), "on_hand", "reserved", "available", "backordered") == (1, 1, 0, 1)
