"""RabbitMQ adapter: connection, topology and the confirmed publisher.

Topology (names from config):
  exchange `orders` (topic, durable)  ->  quorum queue `inventory.orders`, bound to the four
      input routing keys, dead-lettering to exchange `inventory.dlx` (fanout) -> queue
      `inventory.orders.dlq`. The broker's delivery limit is only a backstop: it also counts
      returns after lost connections (the worker counts real attempts, see consumer.py).
  exchange `inventory.events` (topic, durable): every result event, routing key = its type.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import pika
import pika.exceptions

from .config import RabbitMQSettings
from .contract import INPUT_TYPES
from .store import OutgoingMessage

# Errors after which the connection is gone and must be made anew.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.AMQPChannelError,
    pika.exceptions.StreamLostError,
    pika.exceptions.ConnectionClosed,
    ConnectionError,
    OSError,
)


def connection_parameters(settings: RabbitMQSettings) -> pika.URLParameters:
    params = pika.URLParameters(str(settings.url))
    params.heartbeat = settings.heartbeat_seconds
    params.blocked_connection_timeout = 60
    params.connection_attempts = 1
    params.socket_timeout = 5
    params.client_properties = {"connection_name": "inventory-worker"}
    return params


def connect(settings: RabbitMQSettings) -> pika.BlockingConnection:
    return pika.BlockingConnection(connection_parameters(settings))


def declare_topology(channel: Any, settings: RabbitMQSettings) -> None:
    channel.exchange_declare(settings.exchange, exchange_type="topic", durable=True)
    channel.exchange_declare(settings.events_exchange, exchange_type="topic", durable=True)
    channel.exchange_declare(settings.dead_letter_exchange, exchange_type="fanout", durable=True)
    channel.queue_declare(
        settings.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"}
    )
    channel.queue_bind(settings.dead_letter_queue, settings.dead_letter_exchange)
    channel.queue_declare(
        settings.queue,
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": settings.dead_letter_exchange,
            "x-delivery-limit": settings.broker_delivery_limit,
            # Dead-letter without losing the message if the DLQ cannot take it at once.
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        },
    )
    for key in INPUT_TYPES:
        channel.queue_bind(settings.queue, settings.exchange, routing_key=key)


class Publisher:
    """Publishes persistent messages on a confirm-mode channel: a return means the broker has them."""

    def __init__(self, channel: Any, settings: RabbitMQSettings) -> None:
        self.channel = channel
        self.settings = settings
        channel.confirm_delivery()

    def publish_results(self, messages: Sequence[OutgoingMessage]) -> None:
        for m in messages:
            self.channel.basic_publish(
                self.settings.events_exchange,
                m.routing_key,
                json.dumps(m.body, separators=(",", ":")).encode(),
                properties=pika.BasicProperties(
                    content_type="application/json",
                    delivery_mode=pika.DeliveryMode.Persistent,
                    message_id=m.message_id,
                    type=m.routing_key,
                    timestamp=int(time.time()),
                    correlation_id=str(m.body.get("causation_id") or ""),
                ),
            )

    def dead_letter(
        self, body: bytes, properties: Any, routing_key: str, reason: str
    ) -> None:
        """Sends a message we refuse to the DLQ, with why, keeping its body and properties."""
        headers = dict(getattr(properties, "headers", None) or {})
        headers["x-inventory-error"] = reason[:1000]
        headers["x-original-routing-key"] = routing_key
        headers["x-original-exchange"] = self.settings.exchange
        props = pika.BasicProperties(
            content_type=getattr(properties, "content_type", None),
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=getattr(properties, "message_id", None),
            headers=headers,
            timestamp=int(time.time()),
        )
        self.channel.basic_publish(self.settings.dead_letter_exchange, routing_key, body, properties=props)

    def publish_input(self, body: dict[str, Any]) -> None:
        """Publishes one input event to the orders exchange (the `publish` command)."""
        self.channel.basic_publish(
            self.settings.exchange,
            body["type"],
            json.dumps(body).encode(),
            properties=pika.BasicProperties(
                content_type="application/json",
                delivery_mode=pika.DeliveryMode.Persistent,
                message_id=body["id"],
                type=body["type"],
            ),
            mandatory=True,
        )
