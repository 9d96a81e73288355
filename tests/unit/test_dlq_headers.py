"""Where a dead letter came from, whoever dead-lettered it: the worker or RabbitMQ."""

from __future__ import annotations

import pika

from inventory_worker.ops.dlq import _reason, original_routing_key


def test_refused_by_the_worker():
    props = pika.BasicProperties(
        headers={"x-inventory-error": "body is not JSON", "x-original-routing-key": "order.placed"}
    )
    assert original_routing_key(props, "ignored") == "order.placed"
    assert _reason(props) == "body is not JSON"


def test_dead_lettered_by_rabbitmq_after_the_delivery_limit():
    # As RabbitMQ writes x-death (byte strings from pika's decoder).
    props = pika.BasicProperties(
        headers={
            "x-death": [
                {
                    "count": 1,
                    "reason": b"delivery_limit",
                    "queue": b"inventory.orders",
                    "exchange": b"orders",
                    "routing-keys": [b"order.completed"],
                }
            ]
        }
    )
    assert original_routing_key(props, "fallback") == "order.completed"
    assert _reason(props) == "rabbitmq: delivery_limit (dead-lettered 1 times)"


def test_no_headers_fall_back_to_the_dlq_routing_key():
    props = pika.BasicProperties()
    assert original_routing_key(props, "stock.adjusted") == "stock.adjusted"
    assert _reason(props) == "unknown"


import pytest  # noqa: E402


@pytest.mark.parametrize(
    "x_death",
    [
        "not a list",
        b"bytes",
        7,
        None,
        {"reason": b"expired"},
        [b"a string"],
        [None],
        [7],
        [{"routing-keys": "order.placed"}],
        [{"routing-keys": [7]}],
        [{"routing-keys": None}],
        [{"reason": {"nested": 1}, "count": "many"}],
        [[{"reason": b"rejected"}]],
    ],
)
def test_malformed_x_death_is_read_without_crashing(x_death):
    # Anyone can publish to the DLQ exchange, or edit headers: `dlq list` and `dlq replay`
    # must still read such a message (they crashed with AttributeError).
    props = pika.BasicProperties(headers={"x-death": x_death})
    assert isinstance(original_routing_key(props, "order.placed"), str)
    assert isinstance(_reason(props), str)


def test_malformed_headers_of_our_own_are_read_too():
    props = pika.BasicProperties(headers={"x-original-routing-key": [b"x"], "x-inventory-error": 7})
    assert original_routing_key(props, "fallback") == "fallback"
    assert _reason(props) == "7"
    assert original_routing_key(pika.BasicProperties(headers=["x"]), "fallback") == "fallback"  # type: ignore[arg-type]
    assert _reason(pika.BasicProperties(headers="x")) == "unknown"  # type: ignore[arg-type]
