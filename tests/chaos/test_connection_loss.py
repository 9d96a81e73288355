"""Losing RabbitMQ, PostgreSQL or Redis while a worker runs: it reconnects with backoff and
carries on in the SAME processes (no restart), and no message is lost or applied twice.

Each test cuts one dependency of a running worker for real (on the private instances):
events published before, during and after the outage must all be applied exactly once.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from inventory_worker.adapters.migrations import migrate
from inventory_worker.adapters.rabbitmq import declare_topology

from ..support import WorkerProcess, pg
from .runner import Pg, ReliablePublisher, _amqp_channel, chaos_settings, drain_queue
from .services import PrivateServices, wait_until
from .workload import Msg


def _adjust(product_id: str, delta: int) -> Msg:
    body = {
        "id": str(uuid.uuid4()),
        "type": "stock.adjusted",
        "occurred_at": "2026-01-01T00:00:00Z",
        "data": {"product_id": product_id, "delta": delta},
    }
    return Msg("stock.adjusted", json.dumps(body).encode(), body["id"], event=body)


def _log_events(path: Path, event: str) -> list[dict[str, Any]]:
    """The log's JSON objects for `event`. Several processes append to one file, and a CI run
    once showed two objects on one line: every object on a line is read."""
    out = []
    decoder = json.JSONDecoder()
    for line in path.read_text().splitlines():
        pos = line.find("{")
        while pos != -1 and f'"{event}"' in line:  # a cheap filter; the parsed field decides
            try:
                obj, end = decoder.raw_decode(line, pos)
            except json.JSONDecodeError:
                break
            if obj.get("event") == event:
                out.append(obj)
            pos = line.find("{", end)
    return out


class Scenario:
    def __init__(self, services: PrivateServices, tmp_path: Path, cache_ttl: int | None = None) -> None:
        self.services = services
        self.settings = chaos_settings(services, f"loss{uuid.uuid4().hex[:8]}")
        if cache_ttl:
            r = self.settings.redis.model_copy(update={"cache_ttl_seconds": cache_ttl})
            self.settings = self.settings.model_copy(update={"redis": r})
        migrate(self.settings.database)
        self.results_queue = f"loss.results.{uuid.uuid4().hex[:8]}"
        conn, ch = _amqp_channel(self.settings)
        declare_topology(ch, self.settings.rabbitmq)
        ch.queue_declare(self.results_queue, durable=True, arguments={"x-queue-type": "quorum"})
        ch.queue_bind(self.results_queue, self.settings.rabbitmq.events_exchange, routing_key="#")
        conn.close()
        self.log = tmp_path / "worker.log"
        self.worker = WorkerProcess(self.settings, processes=2, log_path=self.log).start(timeout=90)
        self.pids = self.process_ids()
        self.publisher = ReliablePublisher(self.settings)
        self.pg = Pg(self.settings)
        self.sent: list[Msg] = []

    def process_ids(self) -> tuple[int, list[int]]:
        return self.worker.proc.pid, sorted(self.worker.children())

    def publish(self, product_id: str, n: int) -> None:
        for _ in range(n):
            m = _adjust(product_id, 1)
            self.publisher.publish(m)
            self.publisher.publish(m)  # every message twice: the copy must change nothing
            self.sent.append(m)

    def wait_applied(self, timeout: float = 120) -> None:
        ids = [m.message_id for m in self.sent]

        def applied() -> bool:
            rows = self.pg.query(
                "SELECT count(*) FROM processed_events WHERE event_id = ANY(%s::uuid[])", (ids,)
            )
            return rows[0][0] == len(ids)

        wait_until(applied, timeout, "every event applied", interval=0.2)

    def check_exactly_once(self, expected: dict[str, int]) -> None:
        with pg(self.settings) as cur:
            cur.execute(
                "SELECT product_id, on_hand FROM products WHERE product_id = ANY(%s)", (list(expected),)
            )
            assert dict(cur.fetchall()) == expected, "stock must be exactly the sum of the distinct events"
            cur.execute(
                "SELECT event_id::text, count(*) FROM stock_movements WHERE event_id = ANY(%s::uuid[]) "
                "GROUP BY 1",
                ([m.message_id for m in self.sent],),
            )
            ledger = dict(cur.fetchall())
        assert ledger == {m.message_id: 1 for m in self.sent}, (
            "one ledger row per event: none lost or doubled"
        )

        def all_results() -> bool:
            self.results = {}
            for _, body in drain_queue(self.settings, self.results_queue):
                r = json.loads(body)
                self.results[r["id"]] = r
                self.collected.append(r)
            causes = [r["causation_id"] for r in self.collected_unique() if r["type"] == "inventory.adjusted"]
            return sorted(causes) == sorted(m.message_id for m in self.sent)

        self.collected: list[dict[str, Any]] = []
        wait_until(all_results, 60, "one inventory.adjusted per event", interval=0.5)

    def collected_unique(self) -> list[dict[str, Any]]:
        return list({r["id"]: r for r in self.collected}.values())

    def assert_same_processes(self) -> None:
        assert self.worker.proc.poll() is None, "the supervisor must still run"
        assert self.process_ids() == self.pids, "no process may have been restarted"

    def close(self) -> None:
        self.publisher.close()
        self.pg.close()
        self.worker.stop()


@pytest.fixture
def scenario(private_services: PrivateServices, tmp_path: Path) -> Any:
    s = Scenario(private_services, tmp_path)
    yield s
    s.close()


def _is_backoff(waits: list[float], initial: float) -> bool:
    """At least three retries whose waits grow exponentially (jitter allowed on top)."""
    return len(waits) >= 3 and all(w >= initial * 2**i * 0.99 for i, w in enumerate(waits[:6]))


def test_rabbitmq_restart(scenario: Scenario, private_services: PrivateServices) -> None:
    sku = f"LOSS-R-{uuid.uuid4().hex[:6]}"
    scenario.publish(sku, 20)
    scenario.wait_applied()
    scenario.publish(sku, 20)  # some still queued or in flight when the broker goes
    private_services.rabbitmq.restart_app(down_seconds=4.0)
    scenario.publish(sku, 20)
    scenario.wait_applied()
    scenario.check_exactly_once({sku: 60})
    scenario.assert_same_processes()
    lost = _log_events(scenario.log, "rabbitmq connection lost; reconnecting")
    by_pid: dict[int, list[float]] = {}
    for e in lost:
        by_pid.setdefault(e["pid"], []).append(e["wait_seconds"])
    assert by_pid and all(_is_backoff(w, 0.1) for w in by_pid.values()), by_pid


def test_postgresql_restart(scenario: Scenario, private_services: PrivateServices) -> None:
    sku = f"LOSS-P-{uuid.uuid4().hex[:6]}"
    scenario.publish(sku, 20)
    scenario.wait_applied()
    private_services.postgres.stop("fast")
    try:
        scenario.publish(sku, 20)  # consumed while PostgreSQL is down: retried, never acked
        wait_until(
            lambda: (
                len([e for e in _log_events(scenario.log, "retrying") if e["dependency"] == "postgresql"])
                >= 6
            ),
            60,
            "retries while down",
        )
    finally:
        private_services.postgres.start()
    scenario.publish(sku, 20)
    scenario.wait_applied()
    scenario.check_exactly_once({sku: 60})
    scenario.assert_same_processes()
    retries = [e for e in _log_events(scenario.log, "retrying") if e["dependency"] == "postgresql"]
    # One list of waits per retry loop: per process and operation, a new loop at attempt 1
    # (a short loop for a blip before the outage must not be read as part of the long one).
    loops: list[list[float]] = []
    current: dict[tuple[int, str], list[float]] = {}
    for e in retries:
        key = (e["pid"], e.get("what", ""))
        if e.get("attempt") == 1 or key not in current:
            current[key] = []
            loops.append(current[key])
        current[key].append(e["wait_seconds"])
    assert any(_is_backoff(w, 0.05) for w in loops), loops


def test_postgresql_connections_cut(scenario: Scenario, private_services: PrivateServices) -> None:
    sku = f"LOSS-C-{uuid.uuid4().hex[:6]}"
    scenario.publish(sku, 20)
    scenario.wait_applied()
    assert private_services.postgres.terminate_worker_backends() > 0
    scenario.publish(sku, 20)
    scenario.wait_applied()
    scenario.check_exactly_once({sku: 40})
    scenario.assert_same_processes()


def test_redis_restart(scenario: Scenario, private_services: PrivateServices) -> None:
    sku, during = f"LOSS-D-{uuid.uuid4().hex[:6]}", f"LOSS-E-{uuid.uuid4().hex[:6]}"
    scenario.publish(sku, 20)
    scenario.wait_applied()
    private_services.redis.stop()
    try:
        scenario.publish(during, 10)  # applied to PostgreSQL while the cache is unreachable
        scenario.wait_applied()
    finally:
        private_services.redis.start()  # comes back empty
    scenario.publish(sku, 20)
    scenario.wait_applied()
    scenario.check_exactly_once({sku: 40, during: 10})
    scenario.assert_same_processes()
    failed = _log_events(scenario.log, "cache write failed; will retry")
    assert failed, "the outage must have been felt"
    by_pid: dict[int, list[float]] = {}
    for e in failed:
        by_pid.setdefault(e["pid"], []).append(e["retry_in_seconds"])
    # Redis is retried with exponential backoff, not hammered at every batch.
    assert all(w == [min(0.25 * 2**i, 30.0) for i in range(len(w))] for w in by_pid.values()), by_pid
    # The product changed only during the outage is refilled when Redis returns.
    key = f"{scenario.settings.redis.key_prefix}stock:"
    client = private_services.redis.client()

    def cached(pid: str) -> dict[str, Any] | None:
        raw = client.get(key + pid)
        return json.loads(raw) if raw else None

    wait_until(lambda: (cached(during) or {}).get("on_hand") == 10, 30, "cache refilled after the outage")
    assert cached(sku)["on_hand"] == 40


def test_rabbitmq_flapping_during_a_postgresql_outage(
    scenario: Scenario, private_services: PrivateServices
) -> None:
    """Every broker connection loss returns the unacked messages, and RabbitMQ counts each
    return as a delivery: events held while PostgreSQL is down must not reach the delivery
    limit (and the DLQ) merely because the broker connection dropped again and again."""
    sku = f"LOSS-F-{uuid.uuid4().hex[:6]}"
    scenario.publish(sku, 10)
    scenario.wait_applied()
    limit = scenario.settings.rabbitmq.delivery_limit
    private_services.postgres.stop("fast")
    try:
        scenario.publish(sku, 20)
        for _ in range(limit + 2):
            wait_until(lambda: _held_by_consumers(scenario), 60, "messages delivered to the consumers")
            private_services.rabbitmq.close_all_connections()
    finally:
        private_services.postgres.start()
    scenario.wait_applied(timeout=60)
    scenario.check_exactly_once({sku: 30})
    assert drain_queue(scenario.settings, scenario.settings.rabbitmq.dead_letter_queue) == []
    scenario.assert_same_processes()


def _held_by_consumers(scenario: Scenario) -> bool:
    conn, ch = _amqp_channel(scenario.settings)
    try:
        q = ch.queue_declare(scenario.settings.rabbitmq.queue, passive=True).method
        return q.consumer_count >= 2 and q.message_count == 0
    finally:
        conn.close()


def test_cache_repaired_after_a_crash_between_commit_and_cache_write(
    private_services: PrivateServices, tmp_path: Path
) -> None:
    """A worker killed after its commit but before its cache write leaves Redis with the old
    figures; the redelivered message is a duplicate, and must still bring the cache up to date
    (else it serves stale stock until the entry's TTL, an hour by default)."""
    scenario = Scenario(private_services, tmp_path, cache_ttl=3600)  # the default TTL
    try:
        _crash_before_cache_write(scenario, private_services)
    finally:
        scenario.close()


def _crash_before_cache_write(scenario: Scenario, private_services: PrivateServices) -> None:
    import os
    import signal

    sku = f"LOSS-K-{uuid.uuid4().hex[:6]}"
    scenario.publish(sku, 1)
    scenario.wait_applied()
    client = private_services.redis.client()
    key = f"{scenario.settings.redis.key_prefix}stock:{sku}"
    wait_until(lambda: client.get(key) is not None, 30, "first figures cached")
    # The next cache write hangs for 5 s: long enough to kill the consumer after its commit.
    client.execute_command("CLIENT", "PAUSE", "5000", "ALL")
    scenario.publish(sku, 1)
    scenario.wait_applied(timeout=30)  # committed; the cache write is now stuck
    for pid in scenario.worker.children():
        os.kill(pid, signal.SIGKILL)
    with pg(scenario.settings) as cur:
        cur.execute("SELECT on_hand, version FROM products WHERE product_id = %s", (sku,))
        on_hand, version = cur.fetchone()
    assert on_hand == 2
    wait_until(
        lambda: json.loads(client.get(key) or b"{}").get("version") == version,
        30,
        "the cache catches up with PostgreSQL when the message is redelivered",
    )
    # Children were SIGKILLed: the worker must still stop cleanly, within its grace period.
    import time

    started = time.monotonic()
    assert scenario.worker.stop(timeout=60) == 0
    assert time.monotonic() - started < scenario.settings.worker.shutdown_grace_seconds + 5
