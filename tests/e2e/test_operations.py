"""Operating a live worker: metrics, event logs, DLQ and cache tools, SIGTERM, stuck children.

Each test here runs its own worker on its own queues and exchanges (the run's database and
Redis prefix are shared), so the session's worker cannot take its messages.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pika
import psycopg2
import pytest

from inventory_worker.config import Settings
from inventory_worker.contract import make_event

from ..conftest import HTTP_SERVERS
from ..support import (
    REPO,
    Bus,
    WorkerProcess,
    amqp_array,
    amqp_double,
    amqp_longstr,
    amqp_table,
    content_header_props,
    delete_topology,
    free_port,
    http_get,
    pg,
    poll,
    promtool,
    publish_with_raw_properties,
    redis_client,
    settings_env,
    uid,
    wait_for_lock_waiter,
)

pytestmark = pytest.mark.slow


def own_settings(settings: Settings, **worker: object) -> Settings:
    tag = uuid.uuid4().hex[:6]
    r = settings.rabbitmq
    return settings.model_copy(
        update={
            "rabbitmq": r.model_copy(
                update={
                    name: f"{getattr(r, name)}.{tag}"
                    for name in (
                        "exchange",
                        "queue",
                        "events_exchange",
                        "dead_letter_exchange",
                        "dead_letter_queue",
                    )
                }
            ),
            "worker": settings.worker.model_copy(update=worker),
            "http": settings.http.model_copy(update={"port": free_port()}),
        }
    )


def stop_lines(log_path: Path, limit: int = 80) -> str:
    """The log from the worker's "stopping" on, without the per-event lines: what a failed stop
    test shows (with the stacks of the processes killed after the grace period)."""
    lines = log_path.read_text().splitlines()
    start = max((i for i, line in enumerate(lines) if '"event":"stopping"' in line), default=0)
    story = [line for line in lines[start:] if '"event handled"' not in line]
    return "\n".join(story[-limit:])


def started_pids(log_path: Path, role: str) -> list[int]:
    """The pids the supervisor logged starting for `role` (e.g. "http", "consumer-0"), in order."""
    return [
        x["child_pid"]
        for x in log_lines(log_path)
        if x.get("event") == "process started" and x.get("role") == role
    ]


def scrape(worker: WorkerProcess) -> str:
    status, _, body = http_get(worker.base_url + "/metrics")
    assert status == 200
    return body.decode()


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in an exposition, or None if absent."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inventory_worker", *args],
        env=settings_env(settings),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def log_lines(path: Path) -> list[dict]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.received: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.received.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.received


@pytest.fixture(scope="module")
def ops(settings: Settings, logs_dir: Path, tmp_path_factory) -> Iterator[tuple[WorkerProcess, Bus]]:
    """A worker (2 consumers) measuring its gauges twice a second, and a bus on its queues."""
    s = own_settings(settings, metrics_interval_seconds=0.5)
    bus = Bus(s)
    w = WorkerProcess(s, processes=2, log_path=logs_dir / f"ops-{uuid.uuid4().hex[:6]}.log").start()
    yield w, bus
    w.stop()
    bus.close()
    delete_topology(s)


# ---- metrics and logs ---------------------------------------------------------------------


def test_metrics_move_with_traffic_and_pass_promtool(ops):
    worker, bus = ops
    sku, order = uid("SKU"), uid("O")
    adjusts = [bus.publish("stock.adjusted", {"product_id": sku, "delta": 1}) for _ in range(5)]
    placed = bus.publish("order.placed", {"order_id": order, "lines": [{"product_id": sku, "quantity": 2}]})
    too_big = bus.publish(
        "order.placed", {"order_id": uid("O"), "lines": [{"product_id": sku, "quantity": 99}]}
    )
    bus.publish_raw(b"not json", routing_key="order.placed")
    bus.wait_result(placed["id"], "inventory.reserved")
    bus.wait_result(too_big["id"], "inventory.rejected")
    for a in adjusts:
        bus.wait_result(a["id"], "inventory.adjusted")
    redis_client(worker.settings).delete(f"{worker.settings.redis.key_prefix}stock:{sku}")  # a cold cache
    for _ in range(3):
        assert http_get(f"{worker.base_url}/inventory/{sku}")[0] == 200
    assert http_get(f"{worker.base_url}/inventory/{uid('NOPE')}")[0] == 404

    # The gauges are measured every 0.5 s by one consumer; the DLQ holds our one bad message.
    # Each HTTP process writes its request metrics every 0.5 s too (http/tally.py).
    def measured():
        t = scrape(worker)
        return (
            t
            if (
                sample(t, "inventory_dead_letter_queue_messages") == 1
                and sample(
                    t, "inventory_http_request_duration_seconds_count", route="/inventory/{product_id}"
                )
                == 4
            )
            else None
        )

    text = poll(measured, what="DLQ depth gauge = 1 and the 4 stock reads counted")
    assert sample(text, "inventory_events_total", type="stock.adjusted", outcome="adjusted") == 5
    assert sample(text, "inventory_events_total", type="order.placed", outcome="reserved") == 1
    assert sample(text, "inventory_events_total", type="order.placed", outcome="rejected") == 1
    assert sample(text, "inventory_events_total", type="order.placed", outcome="dead_lettered") == 1
    assert sample(text, "inventory_dead_lettered_total", reason="invalid") == 1
    # Receive-to-ack latency: one observation per applied event, summed over both consumers.
    assert sample(text, "inventory_event_processing_seconds_count") == 7
    assert sample(text, "inventory_publish_seconds_count") >= 1
    assert sample(text, "inventory_results_published_total", path="direct") >= 7
    # One miss refilled the cache, then hits; the unknown product is a miss too.
    assert sample(text, "inventory_cache_requests_total", result="miss") == 2
    assert sample(text, "inventory_cache_requests_total", result="hit") == 2
    assert sample(text, "inventory_http_requests_total", route="/inventory/{product_id}", status="200") == 3
    assert sample(text, "inventory_http_requests_total", route="/inventory/{product_id}", status="404") == 1
    assert sample(text, "inventory_http_request_duration_seconds_count", route="/inventory/{product_id}") == 4
    # The gauge is the database-wide count (nothing else changes it while this test runs).
    with pg(worker.settings) as cur:
        cur.execute("SELECT count(*) FROM orders WHERE status = 'reserved'")
        live = cur.fetchone()[0]
    assert live >= 1
    poll(
        lambda: sample(scrape(worker), "inventory_reservations_active") == live,
        what=f"reservations gauge = {live}",
    )
    assert sample(text, "inventory_outbox_backlog_messages") is not None
    assert sample(text, "inventory_process_restarts_total", role="consumer", reason="died") == 0
    assert sample(text, "inventory_process_restarts_total", role="consumer", reason="stuck") == 0

    check = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_one_json_log_line_per_event_handled(ops):
    worker, bus = ops
    sku, order = uid("SKU"), uid("O")
    adj = bus.publish("stock.adjusted", {"product_id": sku, "delta": 4})
    bus.wait_result(adj["id"])  # two consumers: the order must not overtake the stock
    placed = bus.publish("order.placed", {"order_id": order, "lines": [{"product_id": sku, "quantity": 1}]})
    bus.wait_result(placed["id"], "inventory.reserved")

    def handled():
        lines = [
            x
            for x in log_lines(worker.log_path)
            if x.get("event") == "event handled" and x.get("event_id") in (adj["id"], placed["id"])
        ]
        return lines if len(lines) >= 2 else None

    lines = poll(handled, what="two 'event handled' lines")
    assert len(lines) == 2  # one each, not more
    by_id = {x["event_id"]: x for x in lines}
    p = by_id[placed["id"]]
    assert (p["type"], p["order_id"], p["outcome"]) == ("order.placed", order, "reserved")
    a = by_id[adj["id"]]
    assert (a["type"], a["product_id"], a["outcome"]) == ("stock.adjusted", sku, "adjusted")
    for x in lines:
        assert isinstance(x["duration_ms"], (int, float)) and x["duration_ms"] >= 0
        assert x["level"] == "info" and x["process"].startswith("consumer-") and "timestamp" in x


# ---- operator tools ------------------------------------------------------------------------


def test_dlq_list_replay_purge(ops):
    worker, bus = ops
    s = worker.settings
    bus.channel.queue_purge(s.rabbitmq.dead_letter_queue)  # what the metrics test left
    sku = uid("SKU")
    # A valid event that was dead-lettered (as when the database refused it for a reason since
    # fixed), put there as the worker does it, and a body that is not JSON, refused by the worker.
    good = {
        "id": str(uuid.uuid4()),
        "type": "stock.adjusted",
        "occurred_at": "2026-01-01T00:00:00Z",
        "data": {"product_id": sku, "delta": 7},
    }
    bus.channel.basic_publish(
        s.rabbitmq.dead_letter_exchange,
        "stock.adjusted",
        json.dumps(good).encode(),
        properties=pika.BasicProperties(
            message_id=good["id"],
            content_type="application/json",
            delivery_mode=2,
            headers={
                "x-inventory-error": "refused by the database: test",
                "x-original-routing-key": "stock.adjusted",
            },
        ),
    )
    bad_id = str(uuid.uuid4())
    bus.publish_raw(
        b"{broken",
        routing_key="order.cancelled",
        properties=pika.BasicProperties(message_id=bad_id, delivery_mode=2),
    )
    poll(
        lambda: (
            bus.channel.queue_declare(s.rabbitmq.dead_letter_queue, passive=True).method.message_count == 2
        ),
        what="two dead letters",
    )

    listed = {m["message_id"]: m for m in map(json.loads, cli(s, "dlq", "list").stdout.splitlines())}
    assert listed[good["id"]]["routing_key"] == "stock.adjusted"
    assert listed[good["id"]]["body"]["data"] == {"product_id": sku, "delta": 7}
    assert listed[bad_id]["routing_key"] == "order.cancelled"
    assert "not JSON" in listed[bad_id]["reason"]

    r = cli(s, "dlq", "replay", "--message-id", good["id"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"replayed": good["id"], "routing_key": "stock.adjusted"}
    assert bus.wait_result(good["id"], "inventory.adjusted")["data"]["on_hand"] == 7
    remaining = [json.loads(x)["message_id"] for x in cli(s, "dlq", "list").stdout.splitlines()]
    assert remaining == [bad_id]

    assert cli(s, "dlq", "purge").returncode == 2  # refuses without --yes
    assert cli(s, "dlq", "purge", "--yes").returncode == 0
    assert cli(s, "dlq", "list").stdout == ""


def test_dlq_list_and_replay_read_malformed_headers(ops):
    """A dead letter with an x-death that is not RabbitMQ's list of tables (anyone can publish
    to the DLQ exchange) and a double beyond int64 (as a Java client sends it): `dlq list`
    and `dlq replay` crashed with AttributeError, and replay could not encode the double."""
    worker, bus = ops
    s = worker.settings
    bus.channel.queue_purge(s.rabbitmq.dead_letter_queue)
    sku = uid("SKU")
    good = {
        "id": str(uuid.uuid4()),
        "type": "stock.adjusted",
        "occurred_at": "2026-01-01T00:00:00Z",
        "data": {"product_id": sku, "delta": 4},
    }
    table = amqp_table(
        [
            ("x-death", amqp_longstr(b"not a list")),
            ("x-price", amqp_double(1e20)),
            ("x-original-routing-key", amqp_array([amqp_longstr(b"x")])),
        ]
    )
    publish_with_raw_properties(
        bus.channel,
        s.rabbitmq.dead_letter_exchange,
        "stock.adjusted",
        json.dumps(good).encode(),
        content_header_props(table, message_id=good["id"]),
    )
    poll(
        lambda: (
            bus.channel.queue_declare(s.rabbitmq.dead_letter_queue, passive=True).method.message_count == 1
        ),
        what="the dead letter",
    )
    r = cli(s, "dlq", "list")
    assert r.returncode == 0, r.stderr
    [listed] = map(json.loads, r.stdout.splitlines())
    assert (listed["message_id"], listed["routing_key"], listed["reason"]) == (
        good["id"],
        "stock.adjusted",
        "unknown",
    )
    r = cli(s, "dlq", "replay", "--message-id", good["id"])
    assert r.returncode == 0, r.stderr
    assert bus.wait_result(good["id"], "inventory.adjusted")["data"]["on_hand"] == 4
    assert cli(s, "dlq", "list").stdout == ""


def test_cache_rebuild_refills_redis_without_going_back(ops):
    worker, bus = ops
    s = worker.settings
    a, b, c = uid("SKU"), uid("SKU"), uid("SKU")
    for sku in (a, b, c):
        bus.wait_result(bus.publish("stock.adjusted", {"product_id": sku, "on_hand": 10})["id"])
    r = redis_client(s)
    key = s.redis.key_prefix + "stock:"
    r.delete(key + a)  # lost
    r.set(key + b, json.dumps({"version": 0, "product_id": b, "on_hand": 3, "reserved": 0, "available": 3}))
    newer = json.dumps({"version": 999, "product_id": c, "on_hand": 1, "reserved": 0, "available": 1})
    r.set(key + c, newer)  # as if written by a newer change: a rebuild must not undo it

    out = cli(s, "cache", "rebuild")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["products"] >= 3 and report["written"] >= 2
    for sku in (a, b):
        cached = json.loads(r.get(key + sku))
        assert (cached["on_hand"], cached["available"], cached["version"]) == (10, 10, 1)
        assert r.ttl(key + sku) > 0
    assert r.get(key + c).decode() == newer


# ---- process behaviour ---------------------------------------------------------------------


def test_sigterm_finishes_in_flight_work_and_loses_nothing(settings, logs_dir, tmp_path):
    grace = 15.0
    s = own_settings(settings, shutdown_grace_seconds=grace)
    bus = Bus(s)
    notify = NotifySocket(tmp_path / "notify.sock")
    products = [uid("SKU") for _ in range(5)]
    # Enough that the stop (signal, then the children notice) lands mid-burst: a CI run once
    # applied all of 3,000 before the results counted here reached a tenth of them.
    n = 10_000
    ids = []
    try:
        w = WorkerProcess(
            s,
            processes=2,
            log_path=logs_dir / f"sigterm-{uuid.uuid4().hex[:6]}.log",
            extra_env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000"},
        )
        w.start(wait_ready=False)
        # Every consumer attached first: queued before, the burst could be a tenth done by the
        # consumer that started first, and the SIGTERM land before READY=1.
        poll(
            lambda: any(m.startswith("READY=1") for m in notify.drain()),
            timeout=60,
            interval=0.05,
            what="READY=1",
        )
        # Published from another connection (without per-message confirms) while the results
        # are counted here, so the SIGTERM lands in the middle of the burst.
        bodies = [make_event("stock.adjusted", {"product_id": products[i % 5], "delta": 1}) for i in range(n)]
        ids.extend(b["id"] for b in bodies)

        def publish() -> None:
            conn = pika.BlockingConnection(pika.URLParameters(str(s.rabbitmq.url)))
            try:
                ch = conn.channel()
                for body in bodies:
                    ch.basic_publish(
                        s.rabbitmq.exchange,
                        "stock.adjusted",
                        json.dumps(body).encode(),
                        properties=pika.BasicProperties(delivery_mode=2, message_id=body["id"]),
                    )
            finally:
                conn.close()

        publisher = threading.Thread(target=publish)
        publisher.start()

        def applied() -> int:
            with pg(s) as cur:
                cur.execute("SELECT count(*) FROM processed_events WHERE event_id = ANY(%s::uuid[])", (ids,))
                return cur.fetchone()[0]

        # Counted in the database: reading a tenth of the results off the queue took as long as
        # the worker needed for the whole burst.
        poll(lambda: applied() >= n // 10, timeout=60, interval=0.02, what="a tenth of the burst applied")
        started = time.monotonic()
        w.proc.send_signal(signal.SIGTERM)
        rc = w.proc.wait(grace + 10)
        elapsed = time.monotonic() - started
        w.stop()
        assert rc == 0
        print(f"SIGTERM to exit: {elapsed:.2f}s (grace {grace}s)")
        assert elapsed < grace, f"took {elapsed:.1f}s, grace is {grace}s; the stop:\n{stop_lines(w.log_path)}"
        assert "killed after the grace period" not in w.log_path.read_text()
        msgs = notify.drain()
        assert msgs[0].startswith("READY=1") and "WATCHDOG=1" in msgs and msgs[-1] == "STOPPING=1"
        publisher.join(60)  # the rest of the burst is queued for the next worker

        with pg(s) as cur:
            cur.execute("SELECT count(*) FROM processed_events WHERE event_id = ANY(%s::uuid[])", (ids,))
            applied_first = cur.fetchone()[0]
            # Everything applied before the stop had its results published and marked so.
            cur.execute(
                "SELECT count(*) FROM outbox WHERE published_at IS NULL"
                "   AND body->>'causation_id' = ANY(%s)",
                (ids,),
            )
            unpublished = cur.fetchone()[0]
        assert 0 < applied_first < n, "the SIGTERM should land mid-burst"
        assert unpublished == 0

        w2 = WorkerProcess(s, processes=2, log_path=logs_dir / f"sigterm2-{uuid.uuid4().hex[:6]}.log").start()
        try:
            bus.wait_for(lambda rs: len({r["causation_id"] for r in rs}) >= n, timeout=90)
        finally:
            assert w2.stop() == 0
        with pg(s) as cur:
            cur.execute("SELECT count(*) FROM processed_events WHERE event_id = ANY(%s::uuid[])", (ids,))
            assert cur.fetchone()[0] == n
            cur.execute("SELECT sum(on_hand) FROM products WHERE product_id = ANY(%s)", (products,))
            assert cur.fetchone()[0] == n  # each +1 applied exactly once
        assert {r["causation_id"] for r in bus.results} == set(ids)
    finally:
        bus.close()
        delete_topology(s)


def test_a_stop_past_the_grace_period_is_killed_and_says_where(settings, logs_dir):
    """A consumer that cannot finish its batch (it waits for a row lock held elsewhere) is killed
    at the grace period, its threads' stacks in the log; its message was never acked, so the
    next worker has it, and it counts once."""
    grace = 2.0
    s = own_settings(settings, shutdown_grace_seconds=grace)
    bus = Bus(s)
    sku = uid("SKU")
    w = WorkerProcess(s, processes=1, log_path=logs_dir / f"past-grace-{uuid.uuid4().hex[:6]}.log").start()
    w2 = None
    try:
        first = bus.publish("stock.adjusted", {"product_id": sku, "delta": 5})
        assert bus.wait_result(first["id"], "inventory.adjusted")["data"]["on_hand"] == 5
        holder = psycopg2.connect(**s.database.dsn())
        try:
            with holder.cursor() as cur:
                cur.execute("SELECT 1 FROM products WHERE product_id = %s FOR UPDATE", (sku,))
            second = bus.publish("stock.adjusted", {"product_id": sku, "delta": 3})
            wait_for_lock_waiter(s, holder.get_backend_pid())
            started = time.monotonic()
            w.proc.send_signal(signal.SIGTERM)
            rc = w.proc.wait(grace + 20)
            elapsed = time.monotonic() - started
        finally:
            holder.close()
        assert rc == 0
        assert grace <= elapsed < grace + 5, elapsed
        (killed,) = [x for x in log_lines(w.log_path) if x.get("event") == "killed after the grace period"]
        assert killed["roles"] == ["consumer-0"]
        # faulthandler's dump of the consumer's threads: where it hung, down to the adapter.
        text = w.log_path.read_text()
        assert "most recent call first" in text
        assert "inventory_worker/worker/consumer.py" in text and "in _apply" in text
        # Its database session lives on (autocommit): once the lock is free it commits the batch,
        # which was never acked. The next worker gets the message again, a duplicate then, and
        # it counts once. Its result goes out from the outbox, checked in the database: the
        # relay of any worker on this run's database may publish it, each to its own exchange.
        w2 = WorkerProcess(
            s, processes=1, log_path=logs_dir / f"past-grace2-{uuid.uuid4().hex[:6]}.log"
        ).start()
        handled = poll(
            lambda: [x for x in log_lines(w2.log_path) if x.get("event_id") == second["id"]],
            what="the message handled by the next worker",
        )
        assert handled[0]["outcome"] in ("adjusted", "duplicate")

        def second_published() -> tuple[int, int, int] | None:
            with pg(s) as cur:
                cur.execute(
                    "SELECT (SELECT on_hand FROM products WHERE product_id = %s),"
                    "       (SELECT count(*) FROM processed_events WHERE event_id = %s::uuid),"
                    "       (SELECT count(*) FROM outbox WHERE body->>'causation_id' = %s"
                    "           AND published_at IS NOT NULL)",
                    (sku, second["id"], second["id"]),
                )
                row = cur.fetchone()
                return tuple(row) if row[2] else None

        assert poll(second_published, timeout=30, what="the second result published") == (8, 1, 1)
    finally:
        w.stop()
        if w2 is not None:
            assert w2.stop() == 0
        bus.close()
        delete_topology(s)


def test_an_http_worker_that_does_not_stop_is_killed_within_the_grace_period(settings, logs_dir):
    """granian waits for its worker processes without limit unless told otherwise: one that
    cannot stop (SIGSTOP here; a hung request or a busy keep-alive connection in life) would
    hold the http process until the supervisor kills it at the grace period."""
    grace = 6.0
    s = own_settings(settings, shutdown_grace_seconds=grace)
    w = WorkerProcess(s, processes=1, log_path=logs_dir / f"http-stop-{uuid.uuid4().hex[:6]}.log").start()
    granian: list[str] = []
    try:
        (http_pid,) = started_pids(w.log_path, "http")
        granian = subprocess.run(
            ["pgrep", "-P", str(http_pid)], capture_output=True, text=True
        ).stdout.split()
        assert granian, "granian's worker processes"
        os.kill(int(granian[0]), signal.SIGSTOP)
        started = time.monotonic()
        w.proc.send_signal(signal.SIGTERM)
        rc = w.proc.wait(grace + 20)
        elapsed = time.monotonic() - started
        assert rc == 0
        assert elapsed < grace, f"took {elapsed:.1f}s; the stop:\n{stop_lines(w.log_path)}"
        assert "killed after the grace period" not in w.log_path.read_text()
        for pid in granian:  # none outlives the stop
            poll(
                lambda pid=pid: not Path(f"/proc/{pid}").exists(),
                timeout=10,
                what=f"granian worker {pid} gone",
            )
    finally:
        w.stop()
        for pid in granian:  # the stopped one, should the test have failed before it was killed
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        delete_topology(s)


@pytest.mark.parametrize("server", HTTP_SERVERS)
def test_stuck_consumer_fails_healthz_and_is_restarted(settings, logs_dir, server):
    """Under either server: granian's worker processes read the same health slots (heartbeats.py)."""
    s = own_settings(settings, heartbeat_timeout_seconds=4.0)
    s = s.model_copy(update={"http": s.http.model_copy(update={"server": server})})
    bus = Bus(s)
    w = WorkerProcess(
        s, processes=1, log_path=logs_dir / f"stuck-{server}-{uuid.uuid4().hex[:6]}.log"
    ).start()
    try:
        assert http_get(w.base_url + "/healthz")[0] == 200

        def fails_on_consumers(route: str, logged: str) -> None:
            """route answers 503 naming the consumers, and the log says `logged` of them."""
            _, _, body = poll(
                lambda: (r := http_get(w.base_url + route, timeout=5))[0] == 503 and r,
                interval=0.05,
                what=f"{route} 503",
            )
            assert json.loads(body)["failing"] == ["consumers"]
            poll(
                lambda: any(
                    logged in str(x.get("failing", {}).get("consumers", ""))
                    for x in log_lines(w.log_path)
                    if x.get("event") == "health check failing"
                ),
                what=f"the log saying {logged!r}",
            )

        (stuck_pid,) = started_pids(w.log_path, "consumer-0")
        os.kill(stuck_pid, signal.SIGSTOP)
        fails_on_consumers("/healthz", "consumer-0")
        # killed, and until its successor attaches to the queue: not ready, naming it
        fails_on_consumers("/readyz", "not attached to the queue: consumer-0")
        new_pid = poll(
            lambda: [p for p in started_pids(w.log_path, "consumer-0") if p != stuck_pid],
            what="a new consumer-0",
        )[0]
        poll(lambda: http_get(w.base_url + "/healthz")[0] == 200, what="/healthz 200 again")
        poll(lambda: http_get(w.base_url + "/readyz")[0] == 200, what="/readyz 200 again")
        assert (
            not os.path.exists(f"/proc/{stuck_pid}/status")
            or "zombie" in Path(f"/proc/{stuck_pid}/status").read_text()
        )
        assert new_pid != stuck_pid
        text = scrape(w)
        assert sample(text, "inventory_process_restarts_total", role="consumer", reason="stuck") == 1
        assert sample(text, "inventory_process_restarts_total", role="consumer", reason="died") == 0
        sku = uid("SKU")  # and the new consumer works
        assert (
            bus.wait_result(
                bus.publish("stock.adjusted", {"product_id": sku, "delta": 2})["id"], "inventory.adjusted"
            )["data"]["on_hand"]
            == 2
        )
    finally:
        assert w.stop() == 0
        bus.close()
        delete_topology(s)


def test_readyz_and_healthz_follow_the_consumer_slots(settings, bus):  # bus: the queues exist
    """/readyz waits for every consumer to attach; /healthz fails on a stale heartbeat."""
    from inventory_worker.bootstrap import read_api
    from inventory_worker.heartbeats import ProcessHealth
    from inventory_worker.http.server import health_checks

    health = ProcessHealth.create(2)  # as the supervisor does; the API reads it attached by name
    ready, live = health_checks(
        ProcessHealth.attach(health.name, 2), timeout=2.0
    )  # generous: a loaded machine
    api = read_api(settings, ready, live)
    health.set_attached(0, True)
    r = api.handle("GET", "/readyz", {})
    assert r.status == 503 and json.loads(r.body)["failing"] == ["consumers"]
    with pytest.raises(Exception, match="consumer-1"):
        ready["consumers"]()
    health.set_attached(1, True)
    assert api.handle("GET", "/readyz", {}).status == 200
    health.beat(0)
    health.beat(1)
    assert api.handle("GET", "/healthz", {}).status == 200
    time.sleep(2.2)
    health.beat(0)
    r = api.handle("GET", "/healthz", {})
    assert r.status == 503 and json.loads(r.body)["failing"] == ["consumers"]
    with pytest.raises(Exception, match=r"consumer-1 \(\d"):
        live["consumers"]()
    # A process still starting (imports, first connections) is allowed more than the timeout.
    health.starting(1)
    time.sleep(2.2)
    health.beat(0)
    assert api.handle("GET", "/healthz", {}).status == 200
    health.close()
