"""GET /inventory/{id}/detail[?channel=] end to end, under each HTTP server: stock and
configuration sent as messages through RabbitMQ to a running worker, the detail document read
over HTTP (and its cache in Redis), spec sections 7 and 10.16."""

from __future__ import annotations

import json
from typing import Any

from inventory_worker.contract import validate_output

from ..support import Bus, http_get, poll, redis_client, uid


def _send(bus: Bus, type_: str, data: dict[str, Any], result: str | None = None) -> dict[str, Any]:
    """Publishes one message and waits until the worker has applied it (its first result)."""
    return bus.wait_result(bus.publish(type_, data)["id"], result)


def _get(served: Any, path: str) -> tuple[int, Any]:
    status, _, body = http_get(served.base_url + path)
    if status == 200:  # the figures' key first, as in /inventory/{id} (the cache reads it there)
        assert body.startswith(b'{"version":'), body[:40]
    return status, json.loads(body)


def _level(location_id: str, priority: int, on_hand: int, available: int, **more: Any) -> dict[str, Any]:
    return {
        "location_id": location_id,
        "priority": priority,
        "active": True,
        "fulfils_orders": True,
        "on_hand": on_hand,
        "reserved": 0,
        "available": available,
        "damaged": 0,
        "quality_control": 0,
        "incoming": 0,
        "safety_stock": 0,
    } | more


def test_detail_of_a_default_only_product(worker, served, bus):
    pid = uid("SKU")
    _send(bus, "stock.adjusted", {"product_id": pid, "delta": 10, "low_stock_threshold": 2})
    _send(bus, "order.placed", {"order_id": uid("O"), "lines": [{"product_id": pid, "quantity": 3}]})
    status, compact = _get(served, f"/inventory/{pid}")
    assert (status, compact) == (
        200,
        {"version": 2, "product_id": pid, "on_hand": 10, "reserved": 3, "available": 7},
    )
    status, detail = _get(served, f"/inventory/{pid}/detail")
    assert status == 200
    assert detail == {
        "version": 2,
        "product_id": pid,
        "tracked": True,
        "on_hand": 10,
        "reserved": 3,
        "available": 7,
        "orderable": 7,
        "backordered": 0,
        "damaged": 0,
        "quality_control": 0,
        "incoming": 0,
        "low_stock_threshold": 2,
        "max_per_order": None,
        "backorder": {"mode": "deny", "limit": None, "until": None, "headroom": 0},
        "locations": [_level("default", 0, 10, 7, reserved=3)],
    }
    assert list(detail) == [
        "version",
        "product_id",
        "tracked",
        "on_hand",
        "reserved",
        "available",
        "orderable",
        "backordered",
        "damaged",
        "quality_control",
        "incoming",
        "low_stock_threshold",
        "max_per_order",
        "backorder",
        "locations",
    ]  # spec 7's order
    status, with_channel = _get(served, f"/inventory/{pid}/detail?channel=default")
    assert (status, with_channel) == (
        200,
        detail
        | {"channel": {"channel_id": "default", "strategy": "priority", "available": 7, "orderable": 7}},
    )


def test_detail_after_a_transfer_lists_every_location_by_priority_then_id(worker, served, bus):
    pid, first, after, web = uid("SKU"), uid("x"), uid("x"), uid("web")
    for loc, priority in ((first, -5), (after, 0)):  # `after` ties with default: by id, "default" < "x-"
        configured = _send(
            bus, "location.configured", {"location_id": loc, "priority": priority}, "inventory.configured"
        )
        assert configured["data"]["location_id"] == loc
    _send(bus, "stock.adjusted", {"product_id": pid, "delta": 10})
    _send(
        bus,
        "stock.transferred",
        {
            "transfer_id": uid("T"),
            "from_location_id": "default",
            "to_location_id": after,
            "lines": [{"product_id": pid, "quantity": 4}],
        },
    )
    _send(bus, "stock.adjusted", {"product_id": pid, "location_id": first, "delta": 2})
    status, detail = _get(served, f"/inventory/{pid}/detail")
    assert status == 200
    assert (detail["on_hand"], detail["reserved"], detail["available"]) == (12, 0, 12)
    assert detail["locations"] == [
        _level(first, -5, 2, 2),
        _level("default", 0, 6, 6),
        _level(after, 0, 4, 4),
    ]
    status, compact = _get(served, f"/inventory/{pid}")
    assert (status, compact) == (
        200,
        {"version": detail["version"], "product_id": pid, "on_hand": 12, "reserved": 0, "available": 12},
    )

    # A channel sums its own locations; an unknown channel, a bad id, an unknown product.
    _send(
        bus,
        "channel.configured",
        {"channel_id": web, "locations": [after, first], "strategy": "most_available"},
        "inventory.configured",
    )
    status, with_channel = _get(served, f"/inventory/{pid}/detail?channel={web}")
    assert (status, with_channel) == (
        200,
        detail
        | {"channel": {"channel_id": web, "strategy": "most_available", "available": 6, "orderable": 6}},
    )
    assert _get(served, f"/inventory/{pid}/detail?channel={uid('nope')}") == (
        404,
        {"error": "unknown channel"},
    )
    assert _get(served, f"/inventory/{pid}/detail?channel=bad%20id")[0] == 400
    assert _get(served, f"/inventory/{pid}/detail?channel={web}&channel=default")[0] == 400
    assert _get(served, "/inventory/bad%20id/detail")[0] == 400
    assert _get(served, f"/inventory/{uid('NONE')}/detail?channel={web}") == (
        404,
        {"error": "unknown product"},
    )


def test_a_detail_read_after_a_change_is_never_older_than_the_figures(worker, served, bus, settings):
    pid = uid("SKU")
    _send(bus, "stock.adjusted", {"product_id": pid, "delta": 5})
    key = f"{settings.redis.key_prefix}stock-detail:{pid}"
    for step in range(1, 4):
        status, detail = _get(served, f"/inventory/{pid}/detail")  # cached now ...
        assert status == 200 and detail["version"] == step
        assert json.loads(redis_client(settings).get(key))["version"] == step
        _send(bus, "stock.adjusted", {"product_id": pid, "delta": 1})  # ... and stale: the worker drops it
        status, compact = _get(served, f"/inventory/{pid}")
        assert compact["version"] == step + 1
        status, detail = _get(served, f"/inventory/{pid}/detail")
        assert (detail["version"], detail["on_hand"], detail["locations"][0]["on_hand"]) == (
            step + 1,
            5 + step,
            5 + step,
        )


def test_safety_stock_shows_in_the_detail_view(worker, served, bus):
    """Acceptance check 16's detail view: safety stock 2 on 5 units, `available` 3 (the refusal of
    an order for 4 is the order side's test)."""
    pid = uid("SKU")
    _send(bus, "stock.adjusted", {"product_id": pid, "on_hand": 5})
    _send(
        bus,
        "product.configured",
        {"product_id": pid, "safety_stock": [{"location_id": "default", "quantity": 2}]},
        "inventory.configured",
    )
    status, detail = _get(served, f"/inventory/{pid}/detail")
    assert status == 200
    assert (detail["on_hand"], detail["reserved"], detail["available"], detail["orderable"]) == (5, 0, 3, 3)
    assert detail["locations"] == [_level("default", 0, 5, 3, safety_stock=2)]
    assert _get(served, f"/inventory/{pid}")[1]["available"] == 3


def test_location_configured_is_applied_and_answered(worker, bus):
    loc = uid("store")
    sent = bus.publish(
        "location.configured", {"location_id": loc, "name": "Berlin", "priority": 3, "fulfils_orders": False}
    )
    result = bus.wait_result(sent["id"])
    validate_output(result)
    assert (result["type"], result["data"]) == (
        "inventory.configured",
        {
            "kind": "location",
            "location_id": loc,
            "name": "Berlin",
            "priority": 3,
            "active": True,
            "fulfils_orders": False,
        },
    )


def test_deactivating_a_location_recaches_its_products(worker, bus):
    """Spec 2: a flip makes the sweeper bump and re-cache every product with a level there."""
    pid, loc = uid("SKU"), uid("x")
    _send(bus, "location.configured", {"location_id": loc}, "inventory.configured")
    _send(bus, "stock.adjusted", {"product_id": pid, "on_hand": 4})
    _send(bus, "stock.adjusted", {"product_id": pid, "location_id": loc, "on_hand": 6})
    status, before = _get(worker, f"/inventory/{pid}")
    assert (status, before["available"]) == (200, 10)
    flip = bus.publish("location.configured", {"location_id": loc, "active": False})

    def recached() -> Any:
        status, now = _get(worker, f"/inventory/{pid}")
        return status == 200 and now["version"] > before["version"] and now

    now = poll(recached, timeout=30, what="the sweeper to re-cache the product")
    assert now == before | {"version": before["version"] + 1, "available": 4}
    assert (
        json.loads(redis_client(worker.settings).get(f"{worker.settings.redis.key_prefix}stock:{pid}")) == now
    )
    configured = bus.wait_result(flip["id"], "inventory.configured")
    validate_output(configured)
