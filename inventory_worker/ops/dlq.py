"""Operator tools for the dead-letter queue: list, replay, purge.

Messages are read with basic_get and left unacked while we look at them: closing the channel
hands every one we did not settle back to the queue. Replay publishes a message to the input
exchange with its original routing key on a confirm-mode channel (mandatory: an unroutable
message raises) and acks it in the DLQ only after the broker confirmed the publish, so a
crash in between leaves a copy in the DLQ (the worker's idempotency absorbs the duplicate),
never none.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pika

from inventory_worker.adapters import amqp_framing, rabbitmq
from inventory_worker.config import RabbitMQSettings

# Not carried over to a replayed message: ours describe the refusal, x-delivery-count is the
# DLQ's own count (a quorum queue counts each time `list` hands a message back).
INTERNAL_HEADERS = ("x-inventory-error", "x-original-routing-key", "x-original-exchange", "x-delivery-count")


@dataclass
class DeadLetter:
    delivery_tag: int
    routing_key: str  # the routing key it had on the input exchange
    message_id: str | None
    reason: str
    properties: Any
    body: bytes

    def summary(self, body_chars: int = 200) -> dict[str, Any]:
        try:
            body: Any = json.loads(self.body)
        except ValueError:
            body = self.body[:body_chars].decode("utf-8", "replace")
        text = json.dumps(body)
        return {
            "message_id": self.message_id,
            "routing_key": self.routing_key,
            "reason": self.reason,
            "bytes": len(self.body),
            "timestamp": getattr(self.properties, "timestamp", None),
            "body": body if len(text) <= body_chars else text[:body_chars] + "...",
        }


def _headers(properties: Any) -> dict[Any, Any]:
    headers = getattr(properties, "headers", None)
    return headers if isinstance(headers, dict) else {}


def _text(value: Any) -> str | None:
    """A header value that should be a string, as one; None if it is something else."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def _deaths(headers: dict[Any, Any]) -> list[dict[Any, Any]]:
    """x-death's tables; anything else in it is ignored (anyone can publish such headers)."""
    deaths = headers.get("x-death")
    return [d for d in deaths if isinstance(d, dict)] if isinstance(deaths, list) else []


def original_routing_key(properties: Any, fallback: str) -> str:
    """Ours (x-original-routing-key) when the worker refused it, x-death when RabbitMQ did."""
    headers = _headers(properties)
    if ours := _text(headers.get("x-original-routing-key")):
        return ours
    for death in _deaths(headers):
        keys = death.get("routing-keys")
        if isinstance(keys, list) and keys and (key := _text(keys[0])):
            return key
    return fallback


def _reason(properties: Any) -> str:
    headers = _headers(properties)
    if headers.get("x-inventory-error"):
        v = headers["x-inventory-error"]
        return _text(v) or str(v)
    deaths = _deaths(headers)
    if deaths:
        d = deaths[0]
        reason = d.get("reason")
        count = d.get("count")
        return f"rabbitmq: {_text(reason) or reason}" + (
            f" (dead-lettered {count} times)" if isinstance(count, int) and count else ""
        )
    return "unknown"


class DeadLetterQueue:
    def __init__(self, settings: RabbitMQSettings) -> None:
        self.settings = settings
        self.conn = rabbitmq.connect(settings)
        self.channel = self.conn.channel()
        rabbitmq.declare_topology(self.channel, settings)

    def close(self) -> None:
        try:
            self.conn.close()  # unsettled messages go back to the DLQ
        except Exception:  # already closed
            pass

    def messages(self, limit: int | None = None) -> Iterator[DeadLetter]:
        """Takes messages off the DLQ unacked, one at a time, up to `limit`."""
        n = 0
        while limit is None or n < limit:
            method, props, body = self.channel.basic_get(self.settings.dead_letter_queue, auto_ack=False)
            if method is None:
                return
            n += 1
            yield DeadLetter(
                method.delivery_tag,
                original_routing_key(props, method.routing_key),
                getattr(props, "message_id", None),
                _reason(props),
                props,
                body,
            )

    def replay(self, selected: Callable[[DeadLetter], bool], limit: int | None = None) -> list[DeadLetter]:
        """Re-publishes the selected messages to the input exchange; acks each once confirmed."""
        publisher = self.conn.channel()
        publisher.confirm_delivery()
        done = []
        for m in self.messages(limit):
            if not selected(m):
                continue
            headers = {
                k: v
                for k, v in amqp_framing.safe_headers(_headers(m.properties)).items()
                if k not in INTERNAL_HEADERS
            }
            replays = headers.get("x-replayed-from-dlq")
            headers["x-replayed-from-dlq"] = (replays if isinstance(replays, int) and replays >= 0 else 0) + 1
            props = pika.BasicProperties(
                content_type=getattr(m.properties, "content_type", None),
                delivery_mode=pika.DeliveryMode.Persistent,
                message_id=m.message_id,
                type=getattr(m.properties, "type", None),
                headers=headers,
            )
            # Raises (NackError, UnroutableError) unless the broker took it: then we do not ack.
            publisher.basic_publish(
                self.settings.exchange, m.routing_key, m.body, properties=props, mandatory=True
            )
            self.channel.basic_ack(m.delivery_tag)
            done.append(m)
        return done

    def drop(self, selected: Callable[[DeadLetter], bool], limit: int | None = None) -> list[DeadLetter]:
        dropped = []
        for m in self.messages(limit):
            if selected(m):
                self.channel.basic_ack(m.delivery_tag)
                dropped.append(m)
        return dropped

    def purge(self) -> int:
        return int(self.channel.queue_purge(self.settings.dead_letter_queue).method.message_count)
