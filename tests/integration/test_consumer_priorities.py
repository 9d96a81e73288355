"""Processes beyond the first `worker.round_robin_processes` get input only as overflow.

Consumer process N consumes with RabbitMQ consumer priority -(N // round_robin_processes).
With 1, process 0 takes everything below full load (fewer, bigger batches); process 1 gets input
as soon as process 0's prefetch window is full, so a process stuck in a long transaction holds
up no more than its window. With 2, the two share it round-robin. Two real consumers on one
quorum queue, told apart by the events each applied."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg2
import pytest

from inventory_worker import bootstrap
from inventory_worker.heartbeats import ConsumerSlot

from ..support import Bus, delete_topology, figures, poll, uid, wait_for_lock_waiter, with_own_queues


@contextmanager
def _two_consumers(settings: Any) -> Iterator[tuple[Bus, list[list[str]]]]:
    """Consumer processes 0 and 1 (as threads) on the run's own queue; yields the bus and, per
    consumer, the ids of the events it applied."""
    bus = Bus(settings)
    stop = threading.Event()
    applied: list[list[str]] = [[], []]
    consumers = []
    for index in (0, 1):
        c = bootstrap.consumer(settings, stop, ConsumerSlot(None, index))
        real_apply = c.store.apply_batch

        def apply(
            events: Any, mark_published: Any = (), real: Any = real_apply, seen: Any = applied[index]
        ) -> Any:
            results = real(events, mark_published)
            seen.extend(e["id"] for e in events)
            return results

        c.store.apply_batch = apply  # type: ignore[method-assign]
        consumers.append(c)
    threads = [threading.Thread(target=c.run, daemon=True) for c in consumers]
    for t in threads:
        t.start()
    try:
        poll(lambda: all(c.attached for c in consumers), 30, 0.05, "both consumers attached")
        yield bus, applied
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        bus.close()
        delete_topology(settings)


def _with(settings: Any, tag: str, **worker: Any) -> Any:
    s = with_own_queues(settings, uid(tag))
    return s.model_copy(update={"worker": s.worker.model_copy(update=worker)})


@pytest.mark.parametrize("round_robin", [1, 2])
def test_light_input_goes_to_the_first_process_unless_they_share(settings, round_robin):
    s = _with(settings, "prio-light", round_robin_processes=round_robin)
    with _two_consumers(s) as (bus, applied):
        product = uid("PRIO")
        sent = []
        for _ in range(20):  # one at a time: the first consumer is never full
            ev = bus.publish("stock.adjusted", {"product_id": product, "delta": 1})
            bus.wait_result(ev["id"], "inventory.adjusted")
            sent.append(ev["id"])
        assert figures(s, product) == (20, 0)
        assert sorted(applied[0] + applied[1]) == sorted(sent)  # each applied once
        if round_robin == 1:
            assert (len(applied[0]), len(applied[1])) == (20, 0)
        else:  # round-robin: both take a share
            assert applied[0] and applied[1]


def test_the_next_process_takes_over_once_the_first_is_full(settings):
    """The first consumer stuck on a row lock holds its prefetch window (2 x batch_size) and no
    more: the rest of the input is applied by the second meanwhile, and nothing twice."""
    s = _with(settings, "prio-full", batch_size=10, round_robin_processes=1)  # a window of 20
    window = 2 * s.worker.batch_size
    with _two_consumers(s) as (bus, applied):
        stuck, free = uid("STUCK"), uid("FREE")
        bus.wait_result(bus.publish("stock.adjusted", {"product_id": stuck, "on_hand": 5})["id"])
        first = len(applied[0])
        conn = psycopg2.connect(**s.database.dsn())
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM products WHERE product_id = %s FOR UPDATE", (stuck,))
                cur.execute("SELECT pg_backend_pid()")
                order = bus.publish(
                    "order.placed", {"order_id": uid("o"), "lines": [{"product_id": stuck, "quantity": 2}]}
                )
                wait_for_lock_waiter(s, cur.fetchone()[0])  # consumer 0 holds the order, waiting
                assert len(applied[0]) == first  # (its apply has not returned)
                sent = [
                    bus.publish("stock.adjusted", {"product_id": free, "delta": 1})["id"] for _ in range(50)
                ]
                # All but what fits in consumer 0's window (the order and window - 1 more) go to
                # consumer 1, which applies them while consumer 0 waits.
                poll(
                    lambda: len(set(applied[1]) & set(sent)) >= 50 - (window - 1),
                    30,
                    0.05,
                    "consumer 1 to apply the overflow",
                )
                assert figures(s, free) == (len(set(applied[1]) & set(sent)), 0)
            conn.rollback()  # the lock goes; consumer 0 applies what it holds
        finally:
            conn.close()
        bus.wait_result(order["id"], "inventory.reserved")
        bus.wait_for(lambda rs: {r["causation_id"] for r in rs} >= set(sent))
        assert figures(s, stuck) == (5, 2) and figures(s, free) == (50, 0)
        assert sorted(e for e in applied[0] + applied[1] if e in set(sent)) == sorted(sent)  # each once
        assert len(set(applied[0]) & set(sent)) == window - 1
