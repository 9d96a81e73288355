"""The shortest end-to-end path: adjust, place, read back over HTTP."""

import json

from ..support import http_get, uid


def test_adjust_then_place_is_seen_over_http(worker, bus, settings):
    sku = uid("SKU")
    adj = bus.publish("stock.adjusted", {"product_id": sku, "delta": 10})
    assert bus.wait_result(adj["id"], "inventory.adjusted")["data"] == {
        "product_id": sku,
        "on_hand": 10,
        "reserved": 0,
        "available": 10,
    }
    placed = bus.publish(
        "order.placed", {"order_id": uid("O"), "lines": [{"product_id": sku, "quantity": 3}]}
    )
    reserved = bus.wait_result(placed["id"], "inventory.reserved")
    assert reserved["data"]["lines"] == [{"product_id": sku, "quantity": 3}]
    status, _, raw = http_get(f"{worker.base_url}/inventory/{sku}")
    assert status == 200
    body = json.loads(raw)
    assert (body["on_hand"], body["reserved"], body["available"]) == (10, 3, 7)
