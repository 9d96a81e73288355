"""One send() per flush instead of one per AMQP frame, for pika's connections.

pika queues every frame it writes as its own chunk and sends the chunks one `send()` at a time:
a published message (method, header and body frames) costs three system calls and three TCP
segments, an ack one more. Over loopback the kernel's TCP work for a segment is charged to the
sender's system call, and the broker wakes to read each segment: at a few thousand results per
second those sends were the largest single cost in a consumer process (about a fifth of its
CPU, by py-spy) and a visible part of RabbitMQ's. Other AMQP clients write a publish as one
buffer for the same reason (rabbitmq-c #272, amqprs #33).

`coalesce_writes()` replaces pika's `_AsyncTransportBase._produce` (which plain and TLS
transports both go through) with the same loop that joins the
queued chunks, up to `MAX_JOIN` bytes, before each send(). Byte order, the buffered-byte count,
partial sends and errors are handled as pika does; only the number of sends changes. Installed
once, when `inventory_worker.amqp` is imported; tested in tests/integration/test_pipelined_confirms.py.
"""

from __future__ import annotations

from typing import Any

from pika.adapters.utils import io_services_utils

# Beyond this a partial send is likely anyway; joining more would only copy more.
MAX_JOIN = 256 * 1024


def _produce_joined(self: Any) -> None:
    """pika's `_AsyncTransportBase._produce` (send until the buffer is empty or send() raises,
    e.g. EAGAIN; requeue what a partial send left), sending joined chunks."""
    buffers = self._tx_buffers
    while buffers:
        if len(buffers) > 1 and len(buffers[0]) < MAX_JOIN:
            chunks, size = [], 0
            while buffers and size < MAX_JOIN:
                chunk = buffers.popleft()
                chunks.append(chunk)
                size += len(chunk)
            buffers.appendleft(b"".join(chunks))
        chunk = buffers[0]
        sent = self._sigint_safe_send(self._sock, chunk)
        buffers.popleft()
        if sent < len(chunk):
            buffers.appendleft(chunk[sent:])
        self._tx_buffered_byte_count -= sent


_produce_joined.__inventory_coalesced__ = True  # type: ignore[attr-defined]


def coalesce_writes() -> bool:
    """Installs the joining wrapper (idempotent). False if this pika has no such method."""
    base = getattr(io_services_utils, "_AsyncTransportBase", None)
    produce = getattr(base, "_produce", None)
    if produce is None or not hasattr(base, "_sigint_safe_send"):
        return False
    if not getattr(produce, "__inventory_coalesced__", False):
        base._produce = _produce_joined  # type: ignore[union-attr]
    return True
