"""Backorders end to end: the elected sweeper's fill pass gives a backordered order the stock
an expiry freed, publishes inventory.backorder_filled and refreshes the cache."""

from __future__ import annotations

import json

from ..support import http_get, poll, uid


def test_sweeper_fills_a_backorder_from_stock_an_expiry_freed(worker, bus, settings):
    sku = uid("BOF")
    bus.wait_result(
        bus.publish("product.configured", {"product_id": sku, "backorder": {"mode": "allow"}})["id"],
        "inventory.configured",
    )
    bus.wait_result(
        bus.publish("stock.adjusted", {"product_id": sku, "on_hand": 2})["id"], "inventory.adjusted"
    )
    holder, waiting = uid("o"), uid("o")
    held = bus.publish(
        "order.placed",
        {"order_id": holder, "lines": [{"product_id": sku, "quantity": 2}], "reservation_ttl_seconds": 1},
    )
    bus.wait_result(held["id"], "inventory.reserved")
    placed = bus.publish("order.placed", {"order_id": waiting, "lines": [{"product_id": sku, "quantity": 3}]})
    allocated = bus.wait_result(placed["id"], "inventory.allocated")
    assert allocated["data"]["lines"][0]["backordered"] == 3

    bus.wait_result(held["id"], "inventory.expired", timeout=20)
    filled = bus.wait_result(placed["id"], "inventory.backorder_filled", timeout=20)
    assert filled["data"] == {
        "order_id": waiting,
        "lines": [{"product_id": sku, "location_id": "default", "quantity": 2}],
        "backordered_remaining": [{"product_id": sku, "quantity": 1}],
    }

    def served():
        status, _, raw = http_get(f"{worker.base_url}/inventory/{sku}")
        return status == 200 and json.loads(raw)["reserved"] == 2

    poll(served, 15.0, 0.1, "the cache to show the filled backorder")
