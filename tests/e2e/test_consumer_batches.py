"""The consumer's batch path, for real: one transaction per batch, a message the database
refuses isolated from its batch, redelivered messages applied one by one, ack only after commit.

A worker of its own (one consumer, own queues) waits up to 400 ms to fill a batch, so a burst
of messages is applied as one batch. The message PostgreSQL refuses although it passes the
contract: an order.cancelled for an order id that a CHECK constraint, added to this module's
own database only, forbids. The contract enforces every real database check (product id
pattern, quantity range, order id length, no U+0000, thresholds >= 0) identically or more
strictly, so no real message is refused by the database alone.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from typing import Any

import pika
import psycopg2
import pytest

from inventory_worker.adapters.migrations import migrate
from inventory_worker.adapters.postgres import Store
from inventory_worker.contract import make_event

from ..support import (
    Bus,
    WorkerProcess,
    delete_topology,
    drop_database,
    figures,
    free_port,
    pg,
    uid,
    wait_for_lock_waiter,
    with_own_queues,
)

REFUSED_ORDER_ID = "refused-by-the-database"


@pytest.fixture(scope="module")
def own(settings):
    """Queues, exchanges and a database of its own. The database too: every worker's outbox
    relay publishes what it finds unpublished in its database to its own exchange, so a result
    left to the relay here (the consumer killed after its commit) could otherwise be taken by
    the session's shared worker and sent where this module's bus does not listen."""
    tag = uuid.uuid4().hex[:8]
    s = with_own_queues(settings, tag)
    s = s.model_copy(
        update={
            "database": s.database.model_copy(update={"dbname": f"{s.database.dbname}_{tag}"}),
            "worker": s.worker.model_copy(update={"batch_max_wait_ms": 400}),
            "http": s.http.model_copy(update={"port": free_port()}),
        }
    )
    migrate(s.database)
    with pg(s) as cur:  # a rule the contract does not know: the database alone refuses this order id
        cur.execute(
            "ALTER TABLE orders ADD CONSTRAINT test_refused CHECK (order_id <> %s) NOT VALID",
            (REFUSED_ORDER_ID,),
        )
    yield s
    delete_topology(s)
    drop_database(s)


@pytest.fixture(scope="module")
def batch_worker(own, logs_dir):
    w = WorkerProcess(own, processes=1, log_path=logs_dir / "batch-worker.log").start()
    yield w
    w.stop()


@pytest.fixture
def own_bus(own):
    b = Bus(own)
    yield b
    b.close()


def publish_burst(bus: Bus, items: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    """Publishes quickly, so that the worker takes them as one batch; returns the bodies."""
    bodies = []
    for type_, data in items:
        if type_ == "garbage":
            body = {"id": str(uuid.uuid4()), "raw": b"\x00 not json"}
            bus.publish_raw(
                body["raw"], "order.placed", pika.BasicProperties(delivery_mode=2, message_id=body["id"])
            )
        else:
            body = make_event(type_, data)
            bus.publish_raw(
                json.dumps(body).encode(), type_, pika.BasicProperties(delivery_mode=2, message_id=body["id"])
            )
        bodies.append(body)
    return bodies


def results_by_cause(bus: Bus) -> dict[str, list[dict[str, Any]]]:
    bus.drain()
    out: dict[str, dict[str, dict]] = {}
    for r in bus.results:
        out.setdefault(r["causation_id"], {})[r["id"]] = r  # deduplicated by id
    return {k: list(v.values()) for k, v in out.items()}


def wait_results(bus: Bus, expected: dict[str, list[str]], timeout: float = 40.0) -> dict[str, list[dict]]:
    """Waits until each event id has exactly the result types listed."""
    deadline = time.monotonic() + timeout
    while True:
        got = results_by_cause(bus)
        types = {eid: sorted(r["type"] for r in got.get(eid, [])) for eid in expected}
        if all(types[eid] == sorted(t) for eid, t in expected.items()):
            bus.conn.sleep(0.3)
            got = results_by_cause(bus)
            assert {eid: sorted(r["type"] for r in got.get(eid, [])) for eid in expected} == {
                eid: sorted(t) for eid, t in expected.items()
            }, "extra results arrived"
            return got
        assert time.monotonic() < deadline, f"results so far: {types}"
        bus.conn.sleep(0.1)


def wait_dead_letters(bus: Bus, reasons: dict[str, str], timeout: float = 30.0) -> dict[str, list[str]]:
    """Waits until each message id is in the DLQ; returns their x-inventory-error headers."""
    deadline = time.monotonic() + timeout
    while True:
        found: dict[str, list[str]] = {}
        for props, _ in bus.dead_letters():
            if props.message_id in reasons:
                found.setdefault(props.message_id, []).append(props.headers["x-inventory-error"])
        if set(found) == set(reasons):
            for mid, reason in reasons.items():
                assert all(reason in r for r in found[mid]), found[mid]
            return found
        assert time.monotonic() < deadline, f"dead letters so far: {found}"
        time.sleep(0.2)


def test_a_refused_message_is_isolated_from_its_batch(batch_worker, own_bus, own):
    x, y = uid("X"), uid("Y")
    o1, o2 = uid("O"), uid("O")
    bodies = publish_burst(
        own_bus,
        [
            ("stock.adjusted", {"product_id": x, "delta": 5}),
            ("order.placed", {"order_id": o1, "lines": [{"product_id": x, "quantity": 2}]}),
            ("order.cancelled", {"order_id": REFUSED_ORDER_ID}),
            ("garbage", None),
            ("order.placed", {"order_id": o2, "lines": [{"product_id": x, "quantity": 1}]}),
            ("stock.adjusted", {"product_id": y, "delta": 1}),
        ],
    )
    adj, p1, refused, garbage, p2, adj_y = bodies
    # the good ones applied in their order (o1 after the stock it needs), each exactly once
    got = wait_results(
        own_bus,
        {
            adj["id"]: ["inventory.adjusted"],
            p1["id"]: ["inventory.reserved"],
            p2["id"]: ["inventory.reserved"],
            adj_y["id"]: ["inventory.adjusted"],
            refused["id"]: [],
            garbage["id"]: [],
        },
    )
    assert got[p1["id"]][0]["data"]["lines"] == [{"product_id": x, "quantity": 2}]
    assert figures(own, x) == (5, 3) and figures(own, y) == (1, 0)
    wait_dead_letters(own_bus, {refused["id"]: "refused by the database", garbage["id"]: "body is not JSON"})
    with pg(own) as cur:
        cur.execute("SELECT count(*) FROM processed_events WHERE event_id = %s", (refused["id"],))
        assert cur.fetchone() == (0,)


def _consumer_children(w: WorkerProcess) -> list[int]:
    """The worker's spawned children (consumer and http), not multiprocessing's resource tracker."""
    pids = []
    for pid in w.children():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    pids.append(pid)
        except FileNotFoundError:
            pass
    return pids


def test_killed_before_commit_nothing_is_lost_and_redeliveries_apply_one_by_one(batch_worker, own_bus, own):
    k, f = uid("K"), uid("F")
    store = Store(own.database)
    for pid in (k, f):
        store.apply_batch(
            [{"id": str(uuid.uuid4()), "type": "stock.adjusted", "data": {"product_id": pid, "delta": 5}}]
        )
    store.close()

    blocker = psycopg2.connect(**own.database.dsn())
    try:
        cur = blocker.cursor()
        cur.execute("SELECT pg_backend_pid()")
        my_pid = cur.fetchone()[0]
        cur.execute("SELECT 1 FROM products WHERE product_id = %s FOR UPDATE", (k,))
        bodies = publish_burst(
            own_bus,
            [
                ("order.placed", {"order_id": uid("A"), "lines": [{"product_id": k, "quantity": 1}]}),
                ("order.placed", {"order_id": uid("B"), "lines": [{"product_id": f, "quantity": 1}]}),
                ("order.cancelled", {"order_id": REFUSED_ORDER_ID}),
                ("garbage", None),
                ("order.placed", {"order_id": uid("C"), "lines": [{"product_id": f, "quantity": 1}]}),
            ],
        )
        wait_for_lock_waiter(
            own, my_pid
        )  # the worker's transaction waits for our lock: nothing is committed yet
        children = _consumer_children(batch_worker)
        assert children
        for pid in children:
            subprocess.run(["kill", "-KILL", str(pid)], check=True)
    finally:
        blocker.rollback()
        blocker.close()

    a, b, refused, garbage, c = bodies
    # the supervisor restarts the consumer; RabbitMQ redelivers the unacked messages to it
    wait_results(
        own_bus,
        {
            a["id"]: ["inventory.reserved"],
            b["id"]: ["inventory.reserved"],
            c["id"]: ["inventory.reserved"],
            refused["id"]: [],
            garbage["id"]: [],
        },
        timeout=60,
    )
    assert figures(own, k) == (5, 1) and figures(own, f) == (5, 2)  # each applied once
    wait_dead_letters(own_bus, {refused["id"]: "refused by the database", garbage["id"]: "body is not JSON"})

    # every message was acked: once the worker is gone, nothing comes back to the queue
    assert batch_worker.stop() == 0
    conn = pika.BlockingConnection(pika.URLParameters(str(own.rabbitmq.url)))
    try:
        q = conn.channel().queue_declare(own.rabbitmq.queue, passive=True)
        assert (q.method.message_count, q.method.consumer_count) == (0, 0)
    finally:
        conn.close()
    assert batch_worker.proc.returncode == 0  # its consumer was SIGKILLed, the worker still stops cleanly
