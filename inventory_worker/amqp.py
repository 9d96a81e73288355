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


class ConfirmsNotReceived(pika.exceptions.AMQPChannelError):
    """The broker nacked a result or did not confirm in time: the outbox relay publishes it again."""


class PipelinedConfirms:
    """A confirm-mode channel that publishes a whole list, then waits once for the broker to
    confirm all of it: one round trip per list, not one per message as pika's blocking channel
    does (which capped a sweep of 100,000 expiries at about 2,000 events a second).

    It drives the asynchronous channel under pika's blocking one (`_impl`, stable in pika 1.x),
    and waits through the public `process_data_events`.
    """

    def __init__(self, channel: Any, timeout: float = 30.0) -> None:
        self.channel = channel
        self.timeout = timeout
        self._impl = channel._impl
        self._last_tag = 0  # delivery tags count up from 1 on a confirm-mode channel
        self._outstanding: set[int] = set()
        self._nacked = 0
        selected: list[Any] = []
        self._impl.confirm_delivery(ack_nack_callback=self._on_confirm, callback=selected.append)
        self._wait(lambda: bool(selected), "Confirm.SelectOk")

    def _on_confirm(self, frame: Any) -> None:
        m = frame.method
        if m.multiple:
            done = {t for t in self._outstanding if t <= m.delivery_tag}
        else:
            done = {m.delivery_tag} & self._outstanding
        self._outstanding -= done
        if isinstance(m, pika.spec.Basic.Nack):
            self._nacked += len(done)

    def publish(self, exchange: str, items: Sequence[tuple[str, bytes, pika.BasicProperties]]) -> None:
        """Returns once the broker confirmed every message; raises if it refused any."""
        for routing_key, body, properties in items:
            self._impl.basic_publish(exchange, routing_key, body, properties)
            self._last_tag += 1
            self._outstanding.add(self._last_tag)
        self._wait(lambda: not self._outstanding, "publisher confirms")
        if self._nacked:
            nacked, self._nacked = self._nacked, 0
            raise ConfirmsNotReceived(f"the broker refused {nacked} of {len(items)} messages")

    def _wait(self, done: Any, what: str) -> None:
        deadline = time.monotonic() + self.timeout
        while not done():
            if self._impl.is_closed or self._impl.is_closing:
                raise ConfirmsNotReceived(f"channel closed while waiting for {what}")
            if time.monotonic() > deadline:
                raise ConfirmsNotReceived(f"no {what} after {self.timeout}s")
            self.channel.connection.process_data_events(time_limit=0.001)


class Publisher:
    """Publishes persistent messages with confirms: a return means the broker has them."""

    def __init__(self, channel: Any, settings: RabbitMQSettings) -> None:
        self.channel = channel
        self.settings = settings
        channel.confirm_delivery()
        self._results: PipelinedConfirms | None = None  # its own channel, opened on first use

    def publish_results(self, messages: Sequence[OutgoingMessage]) -> None:
        if not messages:
            return
        if self._results is None or not self._results.channel.is_open:
            self._results = PipelinedConfirms(self.channel.connection.channel())
        now = int(time.time())
        self._results.publish(self.settings.events_exchange, [
            (
                m.routing_key,
                json.dumps(m.body, separators=(",", ":")).encode(),
                pika.BasicProperties(
                    content_type="application/json",
                    delivery_mode=pika.DeliveryMode.Persistent,
                    message_id=m.message_id,
                    type=m.routing_key,
                    timestamp=now,
                    correlation_id=str(m.body.get("causation_id") or ""),
                ),
            )
            for m in messages
        ])

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
