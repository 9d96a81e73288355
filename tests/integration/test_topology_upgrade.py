"""Rollout (spec stock-across-locations C4): a new worker binds the new input types at start.

A worker of today declared the quorum queue bound to today's four routing keys. The new worker
declares the same queue (same arguments, so RabbitMQ accepts it) and adds the new bindings;
from then on messages of the new types are routed to it. Before that they are unroutable,
which is why the worker is deployed before publishers send the new types.
"""

from __future__ import annotations

import json
import uuid

import pika
import pytest
from pika.exceptions import UnroutableError

from inventory_worker.adapters import rabbitmq
from inventory_worker.contract import INPUT_TYPES, make_event, parse_event

from ..support import delete_topology, isolated_settings

TODAYS_TYPES = ("order.placed", "order.cancelled", "order.completed", "stock.adjusted")
NEW_MESSAGES = {
    "location.configured": {"location_id": "store-1"},
    "channel.configured": {"channel_id": "web", "strategy": "priority"},
    "product.configured": {"product_id": "SKU-1", "tracked": True},
    "stock.moved": {"product_id": "SKU-1", "quantity": 1, "from": "sellable", "to": "damaged"},
    "stock.transferred": {
        "transfer_id": "t-1",
        "from_location_id": "a",
        "to_location_id": "b",
        "lines": [{"product_id": "SKU-1", "quantity": 1}],
    },
    "stock.received": {"product_id": "SKU-1", "quantity": 1},
    "reservation.extended": {"order_id": "o-1", "until_fulfilled": True},
    "order.fulfilled": {
        "order_id": "o-1",
        "fulfilment_id": "f-1",
        "lines": [{"product_id": "SKU-1", "quantity": 1}],
    },
    "order.returned": {
        "order_id": "o-1",
        "return_id": "r-1",
        "lines": [{"product_id": "SKU-1", "quantity": 1, "condition": "sellable"}],
    },
}


@pytest.fixture
def fresh(base_settings):
    s = isolated_settings(base_settings, f"c4-{uuid.uuid4().hex[:8]}")
    yield s
    delete_topology(s)


def _publish(ch, settings, type_: str) -> None:
    body = make_event(type_, NEW_MESSAGES[type_])
    ch.basic_publish(
        settings.rabbitmq.exchange,
        type_,
        json.dumps(body).encode(),
        properties=pika.BasicProperties(delivery_mode=2),
        mandatory=True,
    )


def test_a_new_worker_adds_the_new_bindings_to_the_existing_queue(fresh, monkeypatch):
    assert set(NEW_MESSAGES) == set(INPUT_TYPES) - set(TODAYS_TYPES)
    conn = rabbitmq.connect(fresh.rabbitmq)
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        with monkeypatch.context() as m:  # the topology a worker of today leaves behind
            m.setattr(rabbitmq, "INPUT_TYPES", TODAYS_TYPES)
            rabbitmq.declare_topology(ch, fresh.rabbitmq)
        for type_ in NEW_MESSAGES:
            with pytest.raises(UnroutableError):  # published before the new worker: returned
                _publish(ch, fresh, type_)

        rabbitmq.declare_topology(ch, fresh.rabbitmq)  # what the new worker does at start
        for type_ in NEW_MESSAGES:
            _publish(ch, fresh, type_)
        got = []
        while (r := ch.basic_get(fresh.rabbitmq.queue, auto_ack=True))[0] is not None:
            got.append(parse_event(r[2], r[0].routing_key).type)  # what the consumer checks
        assert got == list(NEW_MESSAGES)
        assert ch.queue_declare(fresh.rabbitmq.queue, passive=True).method.message_count == 0
    finally:
        conn.close()
