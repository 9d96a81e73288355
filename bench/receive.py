"""A consumer's CPU per message received: pika's own frame reader against ours, in one run.

  python -m bench.receive [--messages 30000] [--rounds 3]

Fills a quorum queue of its own with order.placed messages as the benchmark's publisher sends
them, then drains it with a BlockingConnection as the worker's consumer does (prefetch 200, one
ack for every 100), and reports the process's CPU time per message. Each round does it twice:
once with pika's `Connection._on_data_available`, once with `amqp_framing.read_deliveries()`'s,
taking turns on who goes first. Only the receiving is timed, not the filling; the process's CPU
time hardly depends on what else the machine runs. The queue is deleted at the end, also when
interrupted.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from typing import Any

import orjson
import pika
import pika.connection

from inventory_worker.adapters import amqp_framing
from inventory_worker.config import load_settings
from tests import reaper

from .exclusive import exclusive

PREFETCH, ACK_EVERY = 200, 100


def fill(url: str, queue: str, n: int) -> None:
    """n messages in the queue, each confirmed by the broker: one it did not take would leave
    drain() waiting for it."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.confirm_delivery()  # basic_publish now waits for the broker's ack, and raises on a nack
    props = pika.BasicProperties(content_type="application/json", delivery_mode=2)
    for _ in range(n):
        body = orjson.dumps(
            {
                "id": str(uuid.uuid4()),
                "type": "order.placed",
                "occurred_at": "2026-11-29T00:00:00Z",
                "data": {
                    "order_id": f"o-{uuid.uuid4().hex}",
                    "lines": [{"product_id": "BENCH-U-00001", "quantity": 1}],
                },
            }
        )
        ch.basic_publish("", queue, body, properties=props)
    conn.close()


def drain(url: str, queue: str, n: int, timeout: float = 120.0) -> float:
    """Microseconds of this process's CPU per message, receiving and acking `n` (an error if
    they do not all come within `timeout` seconds)."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    ch = conn.channel()
    ch.basic_qos(prefetch_count=PREFETCH)
    tags: list[int] = []

    def on_message(_ch: Any, method: Any, _props: Any, _body: bytes) -> None:
        tags.append(method.delivery_tag)

    ch.basic_consume(queue, on_message)
    acked = 0
    started = time.process_time()
    deadline = time.monotonic() + timeout
    while len(tags) < n:
        if time.monotonic() > deadline:
            conn.close()
            raise RuntimeError(f"only {len(tags)} of {n} messages came back from {queue} in {timeout:.0f} s")
        conn.process_data_events(time_limit=0.05)
        if len(tags) - acked >= ACK_EVERY or (len(tags) == n and acked < n):
            ch.basic_ack(tags[-1], multiple=True)
            acked = len(tags)
    spent = time.process_time() - started
    conn.close()
    return spent / n * 1e6


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=30_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    url = str(load_settings().rabbitmq.url)
    queue = f"bench.receive.{uuid.uuid4().hex[:8]}"
    readers = {
        "pika": amqp_framing._pika_on_data_available,
        "ours": amqp_framing._on_data_available,
    }
    conn_class = pika.connection.Connection
    installed = conn_class._on_data_available
    res: dict[str, Any] = {name: [] for name in readers}
    res["queue"] = queue
    # Connections of their own for the declare and the delete: one held open through the rounds
    # without running its I/O loop misses its heartbeats, and the broker closes it.
    admin = pika.BlockingConnection(pika.URLParameters(url))
    admin.channel().queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    admin.close()
    try:
        for r in range(args.rounds):
            for name in list(readers) if r % 2 == 0 else list(readers)[::-1]:
                fill(url, queue, args.messages)
                conn_class._on_data_available = readers[name]
                try:
                    res[name].append(drain(url, queue, args.messages))
                finally:
                    conn_class._on_data_available = installed
                print(f"round {r + 1} {name}: {res[name][-1]:.1f} us a message", flush=True)
        pika_us, ours_us = statistics.median(res["pika"]), statistics.median(res["ours"])
        print(
            f"median of {args.rounds}: pika {pika_us:.1f} us, ours {ours_us:.1f} us a message"
            f" ({ours_us / pika_us:.2f}x)"
        )
        return res
    finally:
        reaper.hold()
        try:
            admin = pika.BlockingConnection(pika.URLParameters(url))
            admin.channel().queue_delete(queue)
            admin.close()
        except Exception as exc:  # the broker went away: nothing left to delete from here
            print(f"could not delete {queue}: {exc!r}")


if __name__ == "__main__":
    reaper.install()
    with exclusive("bench.receive"):
        main()
