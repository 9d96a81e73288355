"""RabbitMQ adapter: connection, topology and the confirmed publisher.

Topology (names from config):
  exchange `orders` (topic, durable)  ->  quorum queue `inventory.orders`, bound to the four
      input routing keys, dead-lettering to exchange `inventory.dlx` (fanout) -> queue
      `inventory.orders.dlq`. The broker's delivery limit is only a backstop: it also counts
      returns after lost connections (the worker counts real attempts, see worker/consumer.py).
  exchange `inventory.events` (topic, durable): every result event, routing key = its type.
"""

from __future__ import annotations

import copy
import json
import os
import ssl
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote

import orjson
import pika
import pika.exceptions

from inventory_worker.adapters import amqp_framing
from inventory_worker.config import RabbitMQSettings, reveal, split_address
from inventory_worker.contract import INPUT_TYPES, OutgoingMessage

amqp_framing.coalesce_writes()
amqp_framing.read_deliveries()
amqp_framing.robust_tables()


class NotConfirmed(pika.exceptions.AMQPError):  # type: ignore[misc]  # pika has no type hints
    """The broker nacked, or did not confirm in time, messages that had to be confirmed."""


# Errors after which the connection is gone (or no longer trusted) and must be made anew.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    pika.exceptions.AMQPConnectionError,
    pika.exceptions.AMQPChannelError,
    pika.exceptions.StreamLostError,
    pika.exceptions.ConnectionClosed,
    ConnectionError,
    OSError,
    NotConfirmed,
)


def connection_parameters(settings: RabbitMQSettings) -> pika.URLParameters:
    """The parameters of `url` (with the password of its own setting, heartbeat, TLS)."""
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


def cluster_parameters(settings: RabbitMQSettings) -> list[pika.URLParameters]:
    """One set of parameters per node: `addresses` if given, else `url`'s host alone."""
    base = connection_parameters(settings)
    if not settings.addresses:
        return [base]
    out = []
    for address in settings.addresses:
        host, port = split_address(address, 5671 if settings.url.scheme == "amqps" else 5672)
        params = copy.copy(base)  # a shallow copy: credentials and TLS context are shared
        params.host, params.port = host, port
        if base.ssl_options is not None:  # each node's certificate is checked against its own name
            params.ssl_options = pika.SSLOptions(base.ssl_options.context, server_hostname=host)
        out.append(params)
    return out


def connect(settings: RabbitMQSettings) -> pika.BlockingConnection:
    """A connection to the first node that answers, trying the next ones in turn.

    The list starts at a different node in each process (rotated by its pid), so that the
    consumers of one worker spread over the cluster and a node's loss moves only its share;
    a node that is down (refused, or silent: `socket_timeout`) costs one attempt, then pika
    goes on to the next one."""
    params = cluster_parameters(settings)
    start = os.getpid() % len(params)
    return pika.BlockingConnection(params[start:] + params[:start])


def quorum_arguments(settings: RabbitMQSettings) -> dict[str, Any]:
    """What makes a queue a replicated quorum queue, spread over a cluster.

    Its members are chosen when it is first declared (on every node the cluster has then, up
    to `quorum_initial_group_size`); a lost leader is replaced by an election among the other
    members. Both optional arguments are sent only when set: RabbitMQ refuses a declaration
    whose arguments differ from those the queue was created with (PRECONDITION_FAILED), so a
    queue made before they were set keeps working (a policy sets `queue-leader-locator` too).
    """
    args: dict[str, Any] = {"x-queue-type": "quorum"}
    if settings.quorum_initial_group_size is not None:
        args["x-quorum-initial-group-size"] = settings.quorum_initial_group_size
    if settings.queue_leader_locator is not None:
        args["x-queue-leader-locator"] = settings.queue_leader_locator
    return args


def check_queue(settings: RabbitMQSettings) -> None:
    """Raises unless the broker is reachable and the input queue exists (a readiness check)."""
    conn = connect(settings)
    try:
        conn.channel().queue_declare(settings.queue, passive=True)
    finally:
        conn.close()


def declare_topology(channel: Any, settings: RabbitMQSettings) -> None:
    channel.exchange_declare(settings.exchange, exchange_type="topic", durable=True)
    channel.exchange_declare(settings.events_exchange, exchange_type="topic", durable=True)
    channel.exchange_declare(settings.dead_letter_exchange, exchange_type="fanout", durable=True)
    channel.queue_declare(settings.dead_letter_queue, durable=True, arguments=quorum_arguments(settings))
    channel.queue_bind(settings.dead_letter_queue, settings.dead_letter_exchange)
    channel.queue_declare(
        settings.queue,
        durable=True,
        arguments={
            **quorum_arguments(settings),
            "x-dead-letter-exchange": settings.dead_letter_exchange,
            "x-delivery-limit": settings.broker_delivery_limit,
            # Dead-letter without losing the message if the DLQ cannot take it at once.
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        },
    )
    for key in INPUT_TYPES:
        channel.queue_bind(settings.queue, settings.exchange, routing_key=key)


def _nothing() -> None:
    pass


class InputChannel:
    """The consuming channel: pika's BlockingChannel, with acks queued instead of flushed.

    BlockingChannel.basic_ack writes the ack at once, running the connection's I/O loop until
    it is sent: a poll and a send() of its own for each batch, just before the batch's results
    are written with another. Queued on the channel beneath, the ack goes out in the
    connection's next write (the results' send, or the consumer's next read of deliveries),
    in order with everything else on the connection. Only the broker waits for an ack (it
    holds the message until then); a process that dies before that write leaves the batch
    unacked, as a death between the commit and the ack always did: redelivered, and absorbed
    by the idempotency table. Everything else is the BlockingChannel's own.
    """

    def __init__(self, channel: Any) -> None:
        self._channel = channel

    def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self._channel._impl.basic_ack(delivery_tag=delivery_tag, multiple=multiple)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._channel, name)


class Publisher:
    """Publishes persistent messages with publisher confirms.

    Dead letters and single inputs go through `channel` in pika's blocking confirm mode: one
    publish, one wait. Result events go through a second channel of the same connection with
    *pipelined* confirms: a whole batch is written, then the broker's acks (which may each cover
    many delivery tags, `multiple=True`) are awaited together (publish_results), or collected
    later while the caller goes on with its next batch (send_results, take_confirmed), so a
    batch costs at most one round trip instead of one per message.
    """

    def __init__(self, channel: Any, settings: RabbitMQSettings, confirm_timeout: float = 30.0) -> None:
        self.channel = channel
        self.settings = settings
        self.confirm_timeout = confirm_timeout
        channel.confirm_delivery()
        self._results: Any = None  # the pipelined channel, opened on first use
        self._next_tag = 1
        self._pending: dict[int, int] = {}  # delivery tag -> outbox id, in publish order
        self._acked: list[int] = []
        self._refused = 0

    def _results_channel(self) -> Any:
        if self._results is None or not self._results.is_open:
            conn = self.channel.connection
            ch = conn.channel()
            selected: list[bool] = []

            # pika's BlockingChannel only offers one-at-a-time confirms; its underlying channel
            # takes an ack/nack callback, which is all pipelining needs.
            def on_select_ok(_frame: Any) -> None:
                selected.append(True)
                conn.call_later(0, _nothing)  # wakes _wait (see _on_confirm)

            ch._impl.confirm_delivery(ack_nack_callback=self._on_confirm, callback=on_select_ok)
            self._wait(lambda: bool(selected), self.confirm_timeout, ch)
            if not selected:
                raise NotConfirmed("no Confirm.SelectOk from the broker")
            self._results, self._next_tag = ch, 1
            self._refused += len(self._pending)  # their channel is gone: the relay has them
            self._pending.clear()
        return self._results

    def _on_confirm(self, frame: Any) -> None:
        m = frame.method
        ack = isinstance(m, pika.spec.Basic.Ack)
        if m.multiple:
            while self._pending:
                tag = next(iter(self._pending))
                if tag > m.delivery_tag:
                    break
                outbox_id = self._pending.pop(tag)
                if ack:
                    self._acked.append(outbox_id)
                else:
                    self._refused += 1
        else:
            confirmed = self._pending.pop(m.delivery_tag, None)
            if confirmed is not None:
                if ack:
                    self._acked.append(confirmed)
                else:
                    self._refused += 1
        if not self._pending and self._results is not None:
            # Wake process_data_events in _wait: it returns early only for events of pika's
            # blocking layer (a timer is one), not for this callback of the channel beneath.
            self._results.connection.call_later(0, _nothing)

    def _wait(self, done: Any, timeout: float, channel: Any) -> None:
        conn = channel.connection
        deadline = time.monotonic() + timeout
        while not done():
            if not channel.is_open:
                raise pika.exceptions.ChannelClosed(0, "the results channel closed while awaiting confirms")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            conn.process_data_events(time_limit=min(remaining, 0.5))

    def send_results(self, messages: Sequence[OutgoingMessage], max_in_flight: int | None = None) -> None:
        """Publishes the messages in order and returns without waiting for their confirms.

        The confirms arrive while the caller goes on (whenever it runs the connection's I/O
        loop) and are collected with take_confirmed(). Only when more than `max_in_flight`
        messages await a confirm does this wait, at most `confirm_timeout`; past that, the
        unconfirmed ones are given up (take_refused counts them) and stay in the outbox for the
        relay, which republishes them with the same ids. A lost connection raises (one of
        CONNECTION_ERRORS); the relay covers those too.
        """
        if not messages:
            return
        ch = self._results_channel()
        now = int(time.time())
        for m in messages:
            self._pending[self._next_tag] = m.outbox_id
            self._next_tag += 1
            # Straight to the channel beneath: queued for one write (BlockingChannel.basic_publish
            # would run the I/O loop, i.e. flush and read, per message), framed by
            # amqp_framing (the same bytes as pika's marshalling, at about a third of the cost).
            amqp_framing.publish(
                ch._impl,
                self.settings.events_exchange,
                m.routing_key,
                orjson.dumps(m.body),
                content_type="application/json",
                delivery_mode=pika.DeliveryMode.Persistent.value,
                message_id=m.message_id,
                type=m.routing_key,
                timestamp=now,
                correlation_id=str(m.body.get("causation_id") or ""),
            )
        ch.connection.process_data_events(time_limit=0)  # written now: the broker starts on them
        if max_in_flight is not None and len(self._pending) > max_in_flight:
            self._wait(lambda: len(self._pending) <= max_in_flight, self.confirm_timeout, ch)
            if len(self._pending) > max_in_flight:
                self._give_up_pending()

    def drain(self, timeout: float | None = None) -> None:
        """Waits (at most `timeout`, by default `confirm_timeout`) until every message sent has
        its ack or nack; the rest are given up (take_refused counts them)."""
        if self._pending and self._results is not None:
            wait = self.confirm_timeout if timeout is None else min(timeout, self.confirm_timeout)
            self._wait(lambda: not self._pending, wait, self._results)
            if self._pending:
                self._give_up_pending()

    def _give_up_pending(self) -> None:
        # A fresh channel for what comes next, so that late confirms of these can never be
        # mistaken for confirms of later messages.
        self._refused += len(self._pending)
        self._pending.clear()
        results, self._results = self._results, None
        try:
            results.close()
        except Exception:  # closing a channel that is already broken
            pass

    def take_confirmed(self) -> list[int]:
        """Outbox ids the broker acked since the last call."""
        acked, self._acked = self._acked, []
        return acked

    def take_refused(self) -> int:
        """How many messages were nacked, or given up unconfirmed, since the last call."""
        refused, self._refused = self._refused, 0
        return refused

    def publish_results(self, messages: Sequence[OutgoingMessage]) -> list[int]:
        """Publishes the messages in order, then waits for the broker's confirms of all of them.

        Returns the outbox ids the broker confirmed (with any earlier send_results() ones not
        yet taken); nacked or unconfirmed ones are left out, so they stay unpublished in the
        outbox for the relay.
        """
        self.send_results(messages)
        self.drain()
        return self.take_confirmed()

    def publish_all(self, messages: Sequence[OutgoingMessage]) -> None:
        """Like publish_results, but every message must be confirmed, else NotConfirmed."""
        confirmed = self.publish_results(messages)
        if len(confirmed) != len(messages):
            raise NotConfirmed(f"{len(messages) - len(confirmed)} of {len(messages)} results not confirmed")

    def dead_letter(self, body: bytes, properties: Any, routing_key: str, reason: str) -> None:
        """Sends a message we refuse to the DLQ, with why, keeping its body and properties
        (header values RabbitMQ would not take back as they are go as text: safe_headers)."""
        headers = amqp_framing.safe_headers(getattr(properties, "headers", None))
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
