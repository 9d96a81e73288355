"""The gauges of spec section 8 through /metrics of a running worker:
`inventory_backordered_units` (the sum of every product's backordered units) and
`inventory_holds_until_fulfilled` (live reservations without a deadline), beside
`inventory_reservations_active`, after a known scenario sent as messages, and again after it
moves on. The gauges are whole-database figures, so the worker has a database of its own.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from inventory_worker.config import Settings

from ..private_stack import private_settings
from ..support import Bus, WorkerProcess, free_port, poll, promtool, uid
from .test_operations import sample, scrape

pytestmark = pytest.mark.slow

GAUGES = ("inventory_backordered_units", "inventory_holds_until_fulfilled", "inventory_reservations_active")


@pytest.fixture
def stack(settings: Settings, logs_dir: Any) -> Iterator[tuple[WorkerProcess, Bus]]:
    with private_settings(settings, "gauges") as s:
        s = s.model_copy(
            update={
                "worker": s.worker.model_copy(update={"metrics_interval_seconds": 0.5}),
                "http": s.http.model_copy(update={"port": free_port()}),
            }
        )
        w = WorkerProcess(s, processes=2, log_path=logs_dir / f"gauges-{uuid.uuid4().hex[:6]}.log")
        bus = Bus(s)
        try:
            w.start()
            yield w, bus
        finally:
            bus.close()
            w.stop()


def applied(bus: Bus, type_: str, data: dict[str, Any], result: str) -> dict[str, Any]:
    """Publishes one message and waits for its result of that type (so the next one follows it)."""
    return bus.wait_result(bus.publish(type_, data)["id"], result)


def gauges_become(worker: WorkerProcess, expected: dict[str, float]) -> str:
    """Scrapes until the gauges read `expected` (measured every 0.5 s); returns that exposition."""

    def read() -> str | None:
        text = scrape(worker)
        return text if {g: sample(text, g) for g in GAUGES} == expected else None

    try:
        found: str = poll(read, timeout=20, what=f"gauges {expected}")
    except AssertionError:
        text = scrape(worker)
        raise AssertionError(
            f"gauges { ({g: sample(text, g) for g in GAUGES}) }, expected {expected}"
        ) from None
    return found


def test_backordered_units_and_holds_until_fulfilled(stack):
    worker, bus = stack
    short, capped, plain = uid("G"), uid("G"), uid("G")
    o1, o2, o3, o4, o5 = (uid("o") for _ in range(5))
    gauges_become(
        worker,
        {
            "inventory_backordered_units": 0,
            "inventory_holds_until_fulfilled": 0,
            "inventory_reservations_active": 0,
        },
    )

    # 3 + 4 units backordered on two products.
    applied(
        bus,
        "product.configured",
        {"product_id": short, "backorder": {"mode": "allow"}},
        "inventory.configured",
    )
    applied(
        bus,
        "product.configured",
        {"product_id": capped, "backorder": {"mode": "allow", "limit": 10}},
        "inventory.configured",
    )
    applied(bus, "stock.adjusted", {"product_id": short, "delta": 2}, "inventory.adjusted")
    for order, pid, quantity in ((o1, short, 5), (o2, capped, 4)):
        allocated = applied(
            bus,
            "order.placed",
            {"order_id": order, "lines": [{"product_id": pid, "quantity": quantity}]},
            "inventory.allocated",
        )
        assert allocated["data"]["lines"][0]["backordered"] == quantity - (2 if pid == short else 0)
    # Two holds without a deadline: one pinned until fulfilled, one partly fulfilled; one plain.
    applied(bus, "stock.adjusted", {"product_id": plain, "delta": 10}, "inventory.adjusted")
    for order, quantity in ((o3, 2), (o4, 3), (o5, 1)):
        applied(
            bus,
            "order.placed",
            {"order_id": order, "lines": [{"product_id": plain, "quantity": quantity}]},
            "inventory.reserved",
        )
    applied(
        bus,
        "reservation.extended",
        {"order_id": o3, "until_fulfilled": True},
        "inventory.reservation_extended",
    )
    shipment = {"order_id": o4, "fulfilment_id": "s-1", "lines": [{"product_id": plain, "quantity": 1}]}
    applied(bus, "order.fulfilled", shipment, "inventory.fulfilled")

    gauges_become(
        worker,
        {
            "inventory_backordered_units": 7,
            "inventory_holds_until_fulfilled": 2,
            "inventory_reservations_active": 5,
        },
    )

    # Stock fills o1's 3, the pinned hold is cancelled, the partly fulfilled order ships the rest.
    filled = applied(
        bus, "stock.received", {"product_id": short, "quantity": 3}, "inventory.backorder_filled"
    )
    assert filled["data"]["order_id"] == o1
    applied(bus, "order.cancelled", {"order_id": o3}, "inventory.released")
    rest = {"order_id": o4, "fulfilment_id": "s-2", "lines": [{"product_id": plain, "quantity": 2}]}
    applied(bus, "order.fulfilled", rest, "inventory.committed")

    text = gauges_become(
        worker,
        {
            "inventory_backordered_units": 4,
            "inventory_holds_until_fulfilled": 0,
            "inventory_reservations_active": 3,
        },
    )
    check = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
