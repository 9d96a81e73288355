"""Where a dead letter came from, whoever dead-lettered it: the worker or RabbitMQ."""

from __future__ import annotations

import pika

from inventory_worker.dlq import _reason, original_routing_key


def test_refused_by_the_worker():
    props = pika.BasicProperties(headers={"x-inventory-error": "body is not JSON",
                                          "x-original-routing-key": "order.placed"})
    assert original_routing_key(props, "ignored") == "order.placed"
    assert _reason(props) == "body is not JSON"


def test_dead_lettered_by_rabbitmq_after_the_delivery_limit():
    # As RabbitMQ writes x-death (byte strings from pika's decoder).
    props = pika.BasicProperties(headers={"x-death": [{
        "count": 1, "reason": b"delivery_limit", "queue": b"inventory.orders",
        "exchange": b"orders", "routing-keys": [b"order.completed"]}]})
    assert original_routing_key(props, "fallback") == "order.completed"
    assert _reason(props) == "rabbitmq: delivery_limit (dead-lettered 1 times)"


def test_no_headers_fall_back_to_the_dlq_routing_key():
    props = pika.BasicProperties()
    assert original_routing_key(props, "stock.adjusted") == "stock.adjusted"
    assert _reason(props) == "unknown"
