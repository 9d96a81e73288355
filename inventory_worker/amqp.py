"""RabbitMQ adapter: connection, topology and the confirmed publisher.

Topology (names from config):
  exchange `orders` (topic, durable)  ->  quorum queue `inventory.orders`, bound to the four
      input routing keys, dead-lettering to exchange `inventory.dlx` (fanout) -> queue
      `inventory.orders.dlq`. The delivery limit dead-letters a message that keeps failing.
  exchange `inventory.events` (topic, durable): every result event, routing key = its type.
"""

from __future__ import annotations

import json
import ssl
import time
from urllib.parse import unquote
from collections.abc import Sequence
from typing import Any

import pika
import pika.exceptions

from .config import RabbitMQSettings, reveal
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
    url = settings.url
    password = reveal(settings.password)
    if password:  # the URL may carry a user name only; the password comes from its own setting
        netloc = f"{url.host}:{url.port}" if url.port else str(url.host)
        params = pika.URLParameters(str(url).replace(str(url).split("//", 1)[1].split("/", 1)[0], netloc, 1))
    else:
        params = pika.URLParameters(str(url))
    params.heartbeat = settings.heartbeat_seconds
    params.blocked_connection_timeout = 60
    params.connection_attempts = 1
    params.socket_timeout = 5
    params.client_properties = {"connection_name": "inventory-worker"}
    if password:
        params.credentials = pika.PlainCredentials(unquote(url.username or "guest"), password)
    if settings.url.scheme == "amqps":
        # Verify the broker's certificate and host name (pika's URL default checks neither).
        context = ssl.create_default_context(cafile=settings.cafile)
        if settings.certfile:
            context.load_cert_chain(settings.certfile, settings.keyfile)
        params.ssl_options = pika.SSLOptions(context, server_hostname=settings.url.host)
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
            "x-delivery-limit": settings.delivery_limit,
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
