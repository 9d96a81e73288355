"""The chaos run: publish a seeded workload while faults are injected for real, then check.

    python -m tests.chaos.runner [--duration 600] [--seed 7]   (`make chaos`, CHAOS_ARGS="...")

Starts private PostgreSQL, Redis and RabbitMQ (tests/chaos/services.py), a worker on them,
publishes the workload round by round (tests/chaos/workload.py explains why rounds keep the
model determined) while a fault thread SIGKILLs worker processes and the supervisor, restarts
RabbitMQ, PostgreSQL and Redis, flushes Redis and cuts connections. After the last round it
waits for the system to drain and checks every invariant against the model.

It prints a progress line every few seconds and ends with one verdict line, `chaos: PASS ...`
or `chaos: FAIL ...` (exit status 0 or 1). A failed run keeps its folder (every log: the
worker's, PostgreSQL's, RabbitMQ's, Redis's) and names it; a passed or interrupted one removes
it. Stopped by SIGTERM, SIGINT or SIGHUP, it stops everything it started (tests/reaper.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import psycopg2

from inventory_worker.adapters.migrations import migrate
from inventory_worker.adapters.rabbitmq import cluster_parameters, declare_topology
from inventory_worker.config import Settings, load_settings

from .. import reaper
from ..support import REPO, WorkerProcess, free_port, isolated_settings
from .services import PrivateServices
from .workload import Msg, Workload

AMQP_ERRORS = (pika.exceptions.AMQPError, OSError)
FAULT_KINDS = (
    "kill_consumer",
    "kill_supervisor",
    "restart_rabbitmq",
    "restart_postgresql",
    "crash_postgresql",
    "flush_redis",
    "restart_redis",
    "cut_postgresql",
    "cut_rabbitmq",
    "cut_redis",
    "rabbitmq_flapping_during_postgresql_outage",
)
DEFAULT_SECONDS = 600  # `make chaos`: ten minutes of faults
DEFAULT_SEED = 7


class Progress(threading.Thread):
    """A line every `interval` seconds: the phase, and what `status()` says of it."""

    def __init__(self, interval: float = 5.0) -> None:
        super().__init__(name="progress", daemon=True)
        self.interval = interval
        self.started = time.monotonic()
        self.phase = "starting the private services"
        self.status: Callable[[], str] | None = None
        self.stop_event = threading.Event()

    def line(self) -> str:
        try:
            detail = self.status() if self.status else ""
        except Exception as exc:  # a count read while it changes: the next line will do
            detail = repr(exc)
        return f"chaos {time.monotonic() - self.started:6.0f}s  {self.phase}" + (
            f": {detail}" if detail else ""
        )

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            print(self.line(), flush=True)


def chaos_settings(services: PrivateServices, run_id: str, cache_ttl_seconds: int = 30) -> Settings:
    """Isolated names on the private services, with short timings so faults show quickly."""
    base = services.settings(load_settings())
    s = isolated_settings(base, run_id)
    w = s.worker.model_copy(
        update={
            "batch_size": 20,
            "sweep_interval_seconds": 0.25,
            "outbox_relay_min_age_seconds": 1.0,
            "outbox_relay_interval_seconds": 0.5,
            "default_reservation_ttl_seconds": 3600,
            # one order per product per fill: an arrival for more leaves the rest to the
            # elected sweeper's fill pass, which then races the round's new orders
            "backorder_fill_batch": 1,
            "shutdown_grace_seconds": 10.0,
        }
    )
    r = s.redis.model_copy(update={"cache_ttl_seconds": cache_ttl_seconds})
    q = s.rabbitmq.model_copy(update={"heartbeat_seconds": 10})
    return s.model_copy(update={"worker": w, "redis": r, "rabbitmq": q})


class ReliablePublisher:
    """Publishes with confirms and reconnects until the broker takes each message."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.conn: Any = None
        self.ch: Any = None
        self.reconnects = 0
        self.sent: list[tuple[float, str]] = []  # (when, message id) of every confirmed publish

    def _connect(self) -> None:
        nodes = cluster_parameters(self.settings.rabbitmq)  # every node of a cluster, in turn
        for params in nodes:
            params.socket_timeout = 5
            params.connection_attempts = 1
            params.heartbeat = 10
        nodes = nodes[self.reconnects % len(nodes) :] + nodes[: self.reconnects % len(nodes)]
        self.conn = pika.BlockingConnection(nodes)
        self.ch = self.conn.channel()
        self.ch.confirm_delivery()

    def publish(self, m: Msg, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.conn is None or not self.conn.is_open:
                    self._connect()
                self.ch.basic_publish(
                    self.settings.rabbitmq.exchange,
                    m.routing_key,
                    m.body,
                    properties=pika.BasicProperties(
                        delivery_mode=2, content_type="application/json", message_id=m.message_id
                    ),
                )
                self.sent.append((time.time(), m.message_id))
                return
            except AMQP_ERRORS:
                self.close()
                self.reconnects += 1
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def close(self) -> None:
        try:
            if self.conn is not None and self.conn.is_open:
                self.conn.close()
        except Exception:
            pass
        self.conn = None


def _amqp_channel(settings: Settings) -> tuple[Any, Any]:
    nodes = cluster_parameters(settings.rabbitmq)
    for params in nodes:
        params.socket_timeout = 5
    conn = pika.BlockingConnection(nodes)
    return conn, conn.channel()


def _retry(fn: Any, timeout: float = 120, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def drain_queue(settings: Settings, queue: str) -> list[tuple[Any, bytes]]:
    """Every message in a queue, removed as it is read (faults are over when this runs)."""
    out: list[tuple[Any, bytes]] = []

    def go() -> None:
        conn, ch = _amqp_channel(settings)
        try:
            while True:
                method, props, body = ch.basic_get(queue, auto_ack=True)
                if method is None:
                    return
                out.append((props, body))
        finally:
            conn.close()

    _retry(go)
    return out


class Pg:
    """A reconnecting connection for the barrier, the sampler and the final checks."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.conn: Any = None

    def query(self, sql: str, args: Any = None) -> list[tuple[Any, ...]]:
        if self.conn is None or self.conn.closed:
            self.conn = psycopg2.connect(
                **{**self.settings.database.dsn(), "application_name": "chaos-check"}
            )
            self.conn.autocommit = True
        try:
            with self.conn.cursor() as cur:
                cur.execute(sql, args)
                return cur.fetchall()
        except psycopg2.Error:
            self.close()
            raise

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:
                pass
        self.conn = None


@dataclass
class Fleet:
    """The worker: its current supervisor, and every process ever started (to clean up)."""

    settings: Settings
    log_dir: Path
    processes: int
    current: WorkerProcess | None = None
    all_pids: set[int] = field(default_factory=set)
    generation: int = 0

    def start(self, wait_ready: bool = True) -> WorkerProcess:
        self.generation += 1
        s = self.settings.model_copy(
            update={
                "http": self.settings.http.model_copy(update={"port": free_port()}),
                # Every process takes input round-robin, however many cores the machine has:
                # the suite is here to race them (by default, processes beyond one per core
                # get input only as overflow).
                "worker": self.settings.worker.model_copy(update={"round_robin_processes": self.processes}),
            }
        )
        w = WorkerProcess(
            s, processes=self.processes, log_path=self.log_dir / f"worker-{self.generation}.log"
        )
        w.start(wait_ready=False)
        self.current = w  # before waiting: stop() must find it if the run is stopped meanwhile
        self.all_pids.add(w.proc.pid)
        if wait_ready:
            w.wait_ready(timeout=90)
        self.remember_children()
        return w

    def remember_children(self) -> list[int]:
        kids = self.current.children() if self.current and self.current.proc.poll() is None else []
        self.all_pids.update(kids)
        return kids

    def stop(self) -> tuple[int | None, float]:
        """SIGTERM to the current supervisor: its exit status and how long it took."""
        rc, started = None, time.monotonic()
        if self.current is not None:
            rc = self.current.stop(timeout=self.settings.worker.shutdown_grace_seconds + 20)
        took = time.monotonic() - started
        for pid in self.all_pids:  # orphans of killed supervisors, if any are still around
            if self.ours(pid):
                os.kill(pid, signal.SIGKILL)
        return rc, took

    def ours(self, pid: int) -> bool:
        """Still alive and one of this run's worker processes (not a recycled pid)."""
        marker = f"INVENTORY_RABBITMQ__QUEUE={self.settings.rabbitmq.queue}".encode()
        try:
            return marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return False


class FaultInjector(threading.Thread):
    def __init__(
        self,
        services: PrivateServices,
        fleet: Fleet,
        kinds: tuple[str, ...],
        seed: int,
        interval: tuple[float, float],
    ) -> None:
        super().__init__(name="faults", daemon=True)
        self.services, self.fleet, self.kinds = services, fleet, kinds
        self.rng = random.Random(seed ^ 0x5EED)
        self.interval = interval
        self.stop_event = threading.Event()
        self.counts: Counter[str] = Counter()
        self.errors: list[str] = []
        self.log: list[tuple[float, str]] = []
        self.current = ""  # the fault being injected, for the progress line

    def run(self) -> None:
        # Every kind once, in a shuffled order, before random draws: a short run sees them all.
        plan = list(self.kinds)
        self.rng.shuffle(plan)
        while not self.stop_event.wait(self.rng.uniform(*self.interval)):
            kind = plan.pop() if plan else self.rng.choice(self.kinds)
            self.current = kind
            try:
                self.inject(kind)
                self.counts[kind] += 1
                self.log.append((time.time(), kind))
            except Exception as exc:
                self.errors.append(f"{kind}: {exc!r}")
            self.current = ""

    def inject(self, kind: str) -> None:
        s, fleet = self.services, self.fleet
        if kind == "kill_consumer":
            kids = [k for k in fleet.remember_children() if fleet.ours(k)]
            if kids:
                os.kill(self.rng.choice(kids), signal.SIGKILL)
        elif kind == "kill_supervisor":
            fleet.remember_children()
            old = fleet.current
            if old.proc.poll() is not None:
                raise RuntimeError(
                    f"the supervisor had exited by itself with {old.proc.returncode}; see {old.log_path}"
                )
            os.kill(old.proc.pid, signal.SIGKILL)
            old.proc.wait()
            fleet.start(wait_ready=False)  # orphaned children stop by themselves
        elif kind == "restart_rabbitmq":
            s.rabbitmq.restart_app(down_seconds=self.rng.uniform(0.5, 2.0))
        elif kind == "restart_rabbitmq_node":
            s.rabbitmq.restart_node()
        elif kind == "restart_postgresql":
            s.postgres.restart("fast", down_seconds=self.rng.uniform(0.5, 2.0))
        elif kind == "crash_postgresql":
            s.postgres.restart("immediate", down_seconds=self.rng.uniform(0.2, 1.0))
        elif kind == "flush_redis":
            s.redis.flush()
        elif kind == "restart_redis":
            s.redis.restart(down_seconds=self.rng.uniform(0.5, 2.0))
        elif kind == "cut_postgresql":
            s.postgres.terminate_worker_backends()
        elif kind == "cut_rabbitmq":
            s.rabbitmq.close_all_connections()
        elif kind == "rabbitmq_flapping_during_postgresql_outage":
            # Messages held while PostgreSQL is down come back after every lost connection.
            s.postgres.stop("fast")
            try:
                for _ in range(fleet.settings.rabbitmq.delivery_limit + 2):
                    time.sleep(0.7)  # the consumers reconnect and take their messages again
                    s.rabbitmq.close_all_connections()
            finally:
                s.postgres.start()
        elif kind == "cut_redis":
            s.redis.kill_clients()
        else:
            raise ValueError(kind)


# Every level: the stock_levels rows, and the products row of a default-only product (its one
# level); a multi-location product's row holds its totals, which must hold the same rules.
LEVELS_SQL = """
    SELECT product_id, location_id, on_hand, reserved, damaged, quality_control, incoming FROM stock_levels
    UNION ALL
    SELECT product_id, CASE WHEN multi_location THEN '(total)' ELSE 'default' END, on_hand, reserved, damaged,
           quality_control, incoming FROM products"""


# Products with units backordered, and those above their limit (never: placement checks the
# limit under the product's row lock), in the same snapshot as the levels.
BACKORDERS_SQL = """
    (SELECT count(*) FROM products WHERE backordered > 0),
    (SELECT array_agg(product_id || ': ' || backordered || ' > ' || backorder_limit)
       FROM products WHERE backordered > backorder_limit OR backordered < 0)"""


class Sampler(threading.Thread):
    """Samples PostgreSQL during the run: no level of any product is ever oversold."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="sampler", daemon=True)
        self.pg = Pg(settings)
        self.stop_event = threading.Event()
        self.samples = 0
        self.levels_seen = 0
        self.violations: list[Any] = []
        self.backorders_seen = 0  # products sampled while they had units backordered
        self.backorder_violations: list[Any] = []

    def run(self) -> None:
        while not self.stop_event.wait(0.3):
            try:
                # one statement: one snapshot of every level at this instant
                rows = self.pg.query(
                    f"SELECT count(*), array_agg(l::text) FILTER (WHERE reserved > on_hand - damaged "
                    f"- quality_control OR damaged + quality_control > on_hand OR least(on_hand, "
                    f"reserved, damaged, quality_control, incoming) < 0), {BACKORDERS_SQL} "
                    f"FROM ({LEVELS_SQL}) l"
                )
                self.samples += 1
                self.levels_seen += rows[0][0]
                self.violations.extend(rows[0][1] or [])
                self.backorders_seen += rows[0][2]
                self.backorder_violations.extend(rows[0][3] or [])
            except Exception:  # PostgreSQL is being restarted
                pass
        self.pg.close()


@dataclass
class Report:
    summary: dict[str, Any]
    invariants: dict[str, tuple[bool, str]]
    context: dict[str, Any] = field(default_factory=dict)  # the run's settings, publisher, faults

    @property
    def ok(self) -> bool:
        return all(ok for ok, _ in self.invariants.values())

    def text(self) -> str:
        lines = ["", "=== chaos summary ==="]
        for k, v in self.summary.items():
            lines.append(f"  {k}: {v}")
        lines.append("=== invariants ===")
        for name, (ok, detail) in self.invariants.items():
            lines.append(f"  {'PASS' if ok else 'FAIL'}  {name}" + (f": {detail}" if detail else ""))
        return "\n".join(lines)


def wait_applied(pg: Pg, ids: list[str], timeout: float) -> None:
    """The round barrier: every event id of the round is in processed_events."""
    want = sorted(set(ids))
    deadline = time.monotonic() + timeout
    while True:
        try:
            rows = pg.query("SELECT count(*) FROM processed_events WHERE event_id = ANY(%s::uuid[])", (want,))
            if rows[0][0] == len(want):
                return
        except psycopg2.Error:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(want)} events not applied after {timeout}s")
        time.sleep(0.05)


def results_of(pg: Pg, event_ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    """The result events of these input events, from the outbox (written with their effects, so
    there once the round barrier passed): how the model learns which side of a race ran first."""
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for (body,) in pg.query("SELECT body FROM outbox WHERE body->>'causation_id' = ANY(%s)", (event_ids,)):
        out[body["causation_id"]].append(body)
    return out


# Products whose backorders a fill can still reach (the sweeper's fill pass takes them): the
# replay of a round waits for none to be left (only default-channel orders wait on them here).
UNSETTLED_SQL = (
    "SELECT array_agg(product_id) FROM products p WHERE backordered > 0 AND product_available(p) > 0"
)


def wait_fills_settled(pg: Pg, timeout: float) -> list[str]:
    """[] once no backorder is left that a fill can reach; else the products still waiting."""
    deadline = time.monotonic() + timeout
    left: list[str] = []
    while True:
        try:
            left = pg.query(UNSETTLED_SQL)[0][0] or []
            if not left:
                return []
        except psycopg2.Error:
            pass
        if time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def replay_backorders(pg: Pg, wl: Workload) -> None:
    """The round's events on backorder products and every fill since the last replay, read from
    the outbox with their ids (the order they were applied in), and when their orders were
    created (FIFO); then the model replays them and compares the products with PostgreSQL."""
    eids = [op.eid for op in wl.bo_pending]
    placed = [oid for oid, o in wl.orders.items() if o.backorder and o.placed_id and o.created is None]

    def read() -> tuple[int, list[tuple[int, dict[str, Any]]], dict[str, Any]]:
        mark = pg.query("SELECT coalesce(max(id), 0) FROM outbox")[0][0]
        rows = pg.query(
            "SELECT id, body FROM outbox WHERE id > %s AND (body->>'causation_id' = ANY(%s) "
            "OR body->>'type' = 'inventory.backorder_filled') ORDER BY id",
            (wl.outbox_mark - 1000, eids),
        )
        created = dict(
            pg.query("SELECT order_id, created_at FROM orders WHERE order_id = ANY(%s)", (placed,))
        )
        return mark, [(r[0], r[1]) for r in rows], {k: v for k, v in created.items()}

    mark, rows, created = _retry(read)
    wl.outbox_mark = mark
    wl.replay(rows, created)
    if wl.round_no and len(wl.replay_problems) < 30:  # (the setup rounds' figures are the model's at once)
        wl.replay_problems.extend(_retry(lambda: backorder_figures_differ(pg, wl)))


def backorder_figures_differ(pg: Pg, wl: Workload) -> list[str]:
    """Each backorder product's (on_hand, reserved, backordered) and levels, model vs PostgreSQL."""
    problems = []
    for k, on_hand, reserved, backordered in pg.query(
        "SELECT product_id, on_hand, reserved, backordered FROM products WHERE product_id = ANY(%s)",
        (wl.bo_ids,),
    ):
        p = wl.products[k]
        if (on_hand, reserved, backordered) != (p.on_hand, p.firm, p.backordered):
            problems.append(
                f"round {wl.round_no}: {k} (on_hand, reserved, backordered) {(on_hand, reserved, backordered)}, "
                f"model {(p.on_hand, p.firm, p.backordered)}"
            )
    for k, loc, *fig in pg.query(
        "SELECT product_id, location_id, on_hand, reserved, damaged, quality_control, incoming FROM stock_levels "
        "WHERE product_id = ANY(%s)",
        (wl.bo_ids,),
    ):
        want = wl.products[k].levels.get(loc)
        if (want.figures() if want else (0, 0, 0, 0, 0)) != tuple(fig):
            problems.append(
                f"round {wl.round_no}: {k} at {loc} {tuple(fig)}, model {want.figures() if want else None}"
            )
    return problems


def run_chaos(
    services: PrivateServices,
    *,
    duration: float,
    seed: int,
    processes: int = 3,
    round_size: int = 40,
    kinds: tuple[str, ...] = FAULT_KINDS,
    fault_interval: tuple[float, float] = (1.0, 3.0),
    log_dir: Path | None = None,
    progress: Progress | None = None,
    injector: Callable[..., FaultInjector] | None = None,
    until: Callable[[FaultInjector], bool] | None = None,
    cache_ttl_seconds: int = 30,
) -> Report:
    """`injector` makes the fault thread (default FaultInjector); with `until`, publishing
    goes on past `duration` until it says the faults are done (the HA run: each fault once)."""
    run_id = f"chaos{uuid.uuid4().hex[:8]}"
    settings = chaos_settings(services, run_id, cache_ttl_seconds)
    migrate(settings.database)
    log_dir = log_dir or services.root / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    results_queue = f"chaos.results.{run_id}"
    conn, ch = _amqp_channel(settings)
    declare_topology(ch, settings.rabbitmq)
    ch.queue_declare(results_queue, durable=True, arguments={"x-queue-type": "quorum"})
    ch.queue_bind(results_queue, settings.rabbitmq.events_exchange, routing_key="#")
    conn.close()

    wl = Workload(seed)
    pub = ReliablePublisher(settings)
    pg = Pg(settings)
    fleet = Fleet(settings, log_dir, processes)
    sampler = Sampler(settings)
    faults = (injector or FaultInjector)(services, fleet, kinds, seed, fault_interval)
    published: Counter[str] = Counter()
    rounds = 0
    errors: list[str] = []
    t_start = time.monotonic()
    check: Checker | None = None
    unsettled = False  # backorders once left unfilled: later rounds do not wait as long
    progress = progress or Progress()  # not started: nobody prints it

    def status() -> str:
        if check is not None:
            return check.status
        injecting = f", injecting {faults.current}" if faults.current else ""
        return (
            f"round {rounds}, {sum(published.values())} messages published, "
            f"{sum(faults.counts.values())} faults{injecting}, worker generation {fleet.generation}"
        )

    progress.status = status
    try:
        progress.phase = "starting the worker"
        fleet.start()
        sampler.start()
        progress.phase = "publishing under faults"

        def publish_round(msgs: list[Msg], dup: bool = True) -> None:
            nonlocal rounds
            batch = wl.duplicated(msgs) if dup else msgs
            for m in batch:
                pub.publish(m)
                published["poison" if m.poison else "event"] += 1
            rounds += 1
            wait_applied(pg, [m.message_id for m in batch if not m.poison], timeout=240)
            wl.resolve(lambda ids: _retry(lambda: results_of(pg, ids)))
            if wl.bo_ids:
                nonlocal unsettled
                left = wait_fills_settled(pg, timeout=5 if unsettled else 120)
                if left and not unsettled:  # backordered units and stock for them, never filled
                    wl.replay_problems.append(f"round {wl.round_no}: still fillable after 120 s: {left}")
                unsettled = unsettled or bool(left)
                replay_backorders(pg, wl)

        for msgs in wl.setup_rounds():
            publish_round(msgs)
        if kinds:
            faults.start()
        t_faults = time.monotonic()  # `duration` is of faults: the worker's start is not counted
        while time.monotonic() - t_faults < duration or (until is not None and not until(faults)):
            publish_round(wl.round(round_size))
        publish_round(wl.pending_round())
        faults.stop_event.set()
        progress.phase = "faults over, last rounds"
        if faults.is_alive():
            faults.join(timeout=180)
        publish_round(wl.final_round() + wl.flush_delayed(), dup=True)
        publish_round(wl.flush_delayed(), dup=False)
        wl.finish()
        t_published = time.monotonic()
        # Drain: short reservations expire, results reach the results queue, the outbox empties.
        progress.phase = "draining"
        check = Checker(settings, wl, pg, results_queue)
        drained = check.wait_drained(timeout=180)
        t_drained = time.monotonic()
        sampler.stop_event.set()
        sampler.join(10)
        progress.phase = "checking the invariants"
        invariants = check.run(sampler)
    except Exception:
        errors.append(traceback.format_exc())
        invariants = {"run completed": (False, errors[-1][-2000:])}
        drained, t_published, t_drained = False, time.monotonic(), time.monotonic()
    finally:
        progress.phase = "stopping the worker"
        faults.stop_event.set()
        sampler.stop_event.set()
        if faults.is_alive():  # a fault half done would start a service again after close()
            faults.join(timeout=60)
        pub.close()
        stop_rc, stop_seconds = fleet.stop()
        pg.close()
    invariants["the worker stops on SIGTERM with exit 0 within its grace period"] = (
        stop_rc == 0 and stop_seconds <= settings.worker.shutdown_grace_seconds + 5,
        f"exit {stop_rc} after {stop_seconds:.1f}s (grace {settings.worker.shutdown_grace_seconds:.0f}s)",
    )
    if faults.errors:
        invariants["every fault injected"] = (False, "; ".join(faults.errors[:5]))
    n_events = sum(1 for _ in wl.expect)
    summary = {
        "seed": seed,
        "rounds": rounds,
        "distinct events": n_events,
        "by type": dict(sorted(wl.counts.items())),
        "messages published": sum(published.values()),
        "duplicates published (absorbed by id)": published["event"] - n_events,
        "poison messages": len(wl.poison_ids),
        "orders": len(wl.orders),
        "faults injected": dict(sorted(faults.counts.items())),
        "publisher reconnects": pub.reconnects,
        "worker generations (supervisor restarts + 1)": fleet.generation,
        "oversell samples": f"{sampler.samples} instants, {sampler.levels_seen} levels read",
        "compare-and-set races (as resolved)": dict(sorted(wl.race_outcomes.items())),
        "backorders and holds (as resolved)": dict(sorted(wl.partb_outcomes.items())),
        "backorder samples": f"{sampler.backorders_seen} products seen with units backordered",
        "publish phase seconds": round(t_published - t_start, 1),
        "drain seconds": round(t_drained - t_published, 1) if drained else "did not drain",
    }
    return Report(
        summary, invariants, {"settings": settings, "publisher": pub, "faults": faults, "fleet": fleet}
    )


class Checker:
    def __init__(self, settings: Settings, wl: Workload, pg: Pg, results_queue: str) -> None:
        self.settings, self.wl, self.pg, self.results_queue = settings, wl, pg, results_queue
        self.results: dict[str, dict[str, Any]] = {}  # by message id
        self.copies: Counter[str] = Counter()
        self.bad_results: list[str] = []
        self.status = "collecting the results"  # for the progress line

    def _collect(self) -> None:
        for props, body in drain_queue(self.settings, self.results_queue):
            r = json.loads(body)
            self.copies[r["id"]] += 1
            if props.message_id != r["id"]:
                self.bad_results.append(f"message_id {props.message_id} != body id {r['id']}")
            self.results[r["id"]] = r

    def _by_causation(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in self.results.values():
            if r["type"] not in self.ORDER_DEPENDENT:
                out[r["causation_id"]].append(r)
        return out

    # Results that depend on the order of application inside a round: not in the model.
    # inventory.backorder_filled: whether an event or the sweeper fills, and what, is the order of
    # the round: the replay (workload.py) checks every one instead.
    ORDER_DEPENDENT = ("inventory.low_stock", "inventory.back_in_stock", "inventory.backorder_filled")
    # What can raise `available` from 0: an adjustment, a receipt, a move to sellable, a
    # transfer in, a cancel, an expiry (caused by the placement of the order it releases).
    RAISERS = (
        "stock.adjusted",
        "stock.received",
        "stock.moved",
        "stock.transferred",
        "order.cancelled",
        "order.placed",
        "order.returned",
    )

    def _back_in_stock(self) -> tuple[bool, str]:
        seen: Counter[tuple[str, str]] = Counter()
        problems = []
        for r in self.results.values():
            if r["type"] != "inventory.back_in_stock":
                continue
            seen[(r["causation_id"], r["data"]["product_id"])] += 1
            cause = self.wl.types.get(r["causation_id"])
            if cause not in self.RAISERS or r["data"]["available"] <= 0:
                problems.append(f"{r['data']} caused by {cause} {r['causation_id']}")
        problems += [f"{k}: {n} back_in_stock for one event and product" for k, n in seen.items() if n > 1]
        return (
            not problems,
            f"{len(problems)} wrong: {problems[:5]}"
            if problems
            else f"{sum(seen.values())} back_in_stock results",
        )

    def _results_match(self) -> list[str]:
        by = self._by_causation()
        problems = []
        for eid, e in self.wl.expect.items():
            got = sorted(
                (
                    r["type"],
                    r["data"].get("reason", "")
                    if r["type"] == "inventory.rejected" or r["type"] == "inventory.adjustment_rejected"
                    else "",
                )
                for r in by.get(eid, [])
            )
            want = sorted(e.results)
            if got != want and not (e.optional and got == sorted(e.results + e.optional)):
                problems.append(
                    f"{eid} ({e.order_id or e.product_id}): want {want}"
                    f"{' (+' + str(e.optional) + ')' if e.optional else ''}, got {got}"
                )
                continue
            for type_, index, want in e.data:
                for r in by.get(eid, []):
                    if r["type"] == type_ and r["data"].get("index") == index and not _holds(r["data"], want):
                        problems.append(
                            f"{eid} ({e.order_id or e.product_id}): {type_} {r['data']} lacks {want}"
                        )
            for r in by.get(eid, []):
                if r["type"] == "inventory.allocated" and _sorted_allocation(r["data"]) != e.allocated:
                    problems.append(f"{eid} ({e.order_id}): allocated {r['data']}, model {e.allocated}")
                if r["type"] == "inventory.rejected" and e.must_short:
                    short = {s["product_id"] for s in r["data"]["shortages"]}
                    if not e.must_short <= short:
                        problems.append(
                            f"{eid}: shortages {sorted(short)} lack {sorted(e.must_short - short)}"
                        )
        unknown = set(by) - set(self.wl.expect)
        if unknown:
            problems.append(f"results caused by {len(unknown)} events never published: {sorted(unknown)[:3]}")
        return problems

    def _figures_match(self) -> list[str]:
        rows = self.pg.query("SELECT product_id, on_hand, reserved, multi_location FROM products")
        actual = {r[0]: (r[1], r[2]) for r in rows}
        want = self.wl.expected_figures()
        problems = [
            f"{k}: want (on_hand, reserved) {v}, PostgreSQL has {actual.get(k)}"
            for k, v in sorted(want.items())
            if actual.get(k) != v
        ]
        extra = set(actual) - set(want)
        if extra:
            problems.append(f"products that should not exist: {sorted(extra)}")
        backordered = dict(
            self.pg.query(
                "SELECT product_id, backordered FROM products WHERE product_id = ANY(%s)", (self.wl.bo_ids,)
            )
        )
        problems += [
            f"{k}: backordered {backordered.get(k)}, model {v}"
            for k, v in sorted(self.wl.expected_backordered().items())
            if backordered.get(k) != v
        ]
        multi = {r[0]: r[3] for r in rows}
        problems += [
            f"{k}: multi_location {multi.get(k)}, the model has levels {sorted(self.wl.products[k].levels)}"
            for k, v in sorted(self.wl.expected_multi().items())
            if k in multi and multi[k] != v
        ]
        return problems + self._levels_match()

    def _levels_match(self) -> list[str]:
        """Every level's (on_hand, reserved, damaged, quality_control, incoming), all-zero ones aside."""
        actual = {
            (r[0], r[1]): tuple(r[2:]) for r in self.pg.query(LEVELS_SQL) if r[1] != "(total)" and any(r[2:])
        }
        want = self.wl.expected_levels()
        return [
            f"{k} at {loc}: want (on_hand, reserved, damaged, quality_control, incoming) {want.get((k, loc))}, "
            f"PostgreSQL has {actual.get((k, loc))}"
            for k, loc in sorted(set(want) | set(actual))
            if want.get((k, loc)) != actual.get((k, loc))
        ]

    def wait_drained(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self._collect()
                results, figures = self._results_match(), self._figures_match()
                unpublished = self.pg.query("SELECT count(*) FROM outbox WHERE published_at IS NULL")[0][0]
                self.status = (
                    f"{len(self.results)} results received, {len(results)} events and "
                    f"{len(figures)} products not yet as the model says, {unpublished} unpublished "
                    "in the outbox"
                )
                if not results and not figures and unpublished == 0:
                    return True
            except Exception as exc:
                self.status = f"{len(self.results)} results received ({exc!r})"
            time.sleep(1.0)
        return False

    def run(self, sampler: Sampler) -> dict[str, tuple[bool, str]]:
        inv: dict[str, tuple[bool, str]] = {}
        self._collect()

        p = self._figures_match()
        inv["the figures of every product and of every level match the model"] = (
            not p,
            f"{len(p)} differ: " + "; ".join(p[:5])
            if p
            else f"{len(self.wl.products)} products, {len(self.wl.expected_levels())} levels",
        )
        inv[
            "no level ever oversold (reserved <= on_hand - damaged - quality_control, sampled during the run)"
        ] = (
            not sampler.violations and sampler.samples > 0,
            f"{sampler.samples} samples of {sampler.levels_seen} levels, {len(sampler.violations)} violations "
            f"{sampler.violations[:3]}",
        )

        p = self._results_match()
        inv["every event's results match the model (exactly once in effect)"] = (
            not p,
            f"{len(p)} differ: " + "; ".join(p[:5]) if p else f"{len(self.wl.expect)} events",
        )

        inv["every order has exactly one terminal outcome"] = self._terminal()
        inv["backordered never above a product's limit (sampled during the run)"] = (
            not sampler.backorder_violations and sampler.samples > 0,
            f"{sampler.samples} samples, {sampler.backorders_seen} products seen backordered, "
            f"{len(sampler.backorder_violations)} above their limit {sampler.backorder_violations[:3]}",
        )
        p = self.wl.replay_problems
        inv["backorders replayed as applied: placements, FIFO fills, completions, figures each round"] = (
            not p,
            f"{len(p)} problems: " + "; ".join(p[:5])
            if p
            else f"{len(self.wl.fills_seen)} fills, {len(self.wl.bo_ids)} backorder products",
        )
        inv[
            "every order line: quantity = reserved + fulfilled + backordered + released, returned <= fulfilled, as the model"
        ] = self._order_lines()
        inv["back_in_stock only from events that can raise available, once per product"] = (
            self._back_in_stock()
        )

        outbox = {
            str(r[0]): (r[1], r[2])
            for r in self.pg.query("SELECT message_id, routing_key, published_at IS NOT NULL FROM outbox")
        }
        missing = [m for m in outbox if m not in self.results]
        foreign = [m for m in self.results if m not in outbox]
        unmarked = [m for m, (_, pub) in outbox.items() if not pub]
        dups = sum(c - 1 for c in self.copies.values())
        inv["every outbox result published, with its original id"] = (
            not missing and not foreign and not self.bad_results,
            f"{len(outbox)} outbox rows, {len(missing)} never published, {len(foreign)} published but not in "
            f"the outbox, {len(unmarked)} not marked yet, {dups} redelivered copies (same id)"
            + (f"; {self.bad_results[:3]}" if self.bad_results else ""),
        )

        dlq = drain_queue(self.settings, self.settings.rabbitmq.dead_letter_queue)
        seen = Counter(props.message_id for props, _ in dlq)
        poison = set(self.wl.poison_ids)
        not_poison = [
            (props.message_id, (props.headers or {}).get("x-inventory-error"), body[:120])
            for props, body in dlq
            if props.message_id not in poison
        ]
        lacking = poison - set(seen)
        inv["the DLQ holds exactly the poison messages"] = (
            not not_poison and not lacking,
            f"{len(poison)} poison, {len(dlq)} dead letters ({sum(seen.values()) - len(set(seen))} copies), "
            f"{len(lacking)} poison missing, {len(not_poison)} not poison: {not_poison[:3]}",
        )

        inv["Redis agrees with PostgreSQL within one TTL"] = self._redis_agrees()

        inv["inventory-worker verify reports nothing"] = self._verify()
        return inv

    def _order_lines(self) -> tuple[bool, str]:
        """order_lines and order_allocations of every allocated order, against the model."""
        want = self.wl.expected_lines()
        got: dict[str, dict[str, Any]] = defaultdict(dict)
        for oid, k, q, ful, rel, ret, bo in self.pg.query(
            "SELECT order_id, product_id, quantity, fulfilled, released, returned, backordered FROM order_lines "
            "WHERE order_id = ANY(%s)",
            (list(want),),
        ):
            got[oid][k] = [q, ful, rel, ret, bo, {}]
        for oid, k, loc, r, ful in self.pg.query(
            "SELECT order_id, product_id, location_id, reserved, fulfilled FROM order_allocations "
            "WHERE order_id = ANY(%s)",
            (list(want),),
        ):
            if k in got[oid]:
                got[oid][k][5][loc] = (r, ful)
        problems = []
        for oid, lines in want.items():
            for k, w in lines.items():
                g = tuple(got[oid].get(k, [None] * 6))
                reserved = sum(r for r, _ in (g[5] or {}).values())
                if g != w:
                    problems.append(
                        f"{oid} {k}: (quantity, fulfilled, released, returned, backordered, "
                        f"allocations) {g}, model {w}"
                    )
                elif g[0] != reserved + g[1] + g[4] + g[2] or g[3] > g[1]:
                    problems.append(f"{oid} {k}: {g} breaks the line invariant")
        allocated = dict(
            self.pg.query(
                "SELECT order_id, allocated FROM orders WHERE order_id = ANY(%s)",
                (list(self.wl.expected_allocated()),),
            )
        )
        problems += [
            f"{oid}: allocated {allocated.get(oid)}, model {v}"
            for oid, v in self.wl.expected_allocated().items()
            if allocated.get(oid) != v
        ]
        n = sum(len(x) for x in want.values())
        return (
            not problems,
            f"{len(problems)} wrong: {problems[:4]}"
            if problems
            else f"{n} lines of {len(want)} allocated orders",
        )

    def _terminal(self) -> tuple[bool, str]:
        per: dict[str, Counter[str]] = defaultdict(Counter)
        for r in self.results.values():
            oid = r["data"].get("order_id")
            if r["type"] == "inventory.released" and r["causation_id"] in self.wl.partial_released:
                continue  # a partial cancel that left the order open, or closed it committed
            if oid:
                per[oid][r["type"]] += 1
        problems = []
        final = self.wl.final_status()
        for oid, status in final.items():
            c = per.get(oid, Counter())
            ends = c["inventory.committed"] + c["inventory.released"]
            if c["inventory.reserved"] > 1 or ends > 1 or c["inventory.expired"] > 1:
                problems.append(f"{oid}: {dict(c)}")
                continue
            got = (
                "committed"
                if c["inventory.committed"]
                else "released"
                if c["inventory.released"]
                else "expired"
                if c["inventory.expired"]
                else "rejected"
            )
            want = "rejected" if status == "cancelled" else status
            if got != want:
                problems.append(f"{oid}: want {want}, got {got} {dict(c)}")
        counts = Counter("rejected" if s == "cancelled" else s for s in final.values())
        return (
            not problems,
            f"{len(problems)} wrong: {problems[:5]}" if problems else dict(counts).__repr__(),
        )

    def _redis_agrees(self) -> tuple[bool, str]:
        import redis as redis_lib

        from inventory_worker.adapters.redis_cache import StockCache

        ttl = self.settings.redis.cache_ttl_seconds
        from inventory_worker.adapters.redis_cache import make_client

        cache = StockCache(
            self.settings.redis,
            make_client(self.settings.redis)
            if self.settings.redis.sentinels
            else redis_lib.Redis(host=self.settings.redis.host, port=self.settings.redis.port),
        )
        started = time.monotonic()
        stale_at_drain: int | None = None
        while True:
            rows = self.pg.query("SELECT product_id, product_figures(p) FROM products p")
            stale, present = [], 0
            for pid, fig in rows:
                raw = cache.client.get(cache.key(pid))
                if raw is None:
                    continue  # a miss is served from PostgreSQL
                present += 1
                c = json.loads(raw)
                if (c["on_hand"], c["reserved"], c["available"], c["version"]) != (
                    fig["on_hand"],
                    fig["reserved"],
                    fig["available"],
                    fig["version"],
                ):
                    stale.append((pid, c, fig))
            took = time.monotonic() - started
            if stale_at_drain is None:
                stale_at_drain = len(stale)
            if not stale:
                return True, (
                    f"{present}/{len(rows)} cached, all equal after {took:.1f}s "
                    f"({stale_at_drain} stale when drained)"
                )
            if took > ttl + 2:
                return False, f"{len(stale)} stale after {took:.0f}s: {stale[:2]}"
            time.sleep(1.0)

    def _verify(self) -> tuple[bool, str]:
        from inventory_worker.cli import build_parser

        if "verify" not in build_parser()._subparsers._group_actions[0].choices:  # type: ignore[union-attr]
            return True, "SKIPPED: this build has no `inventory-worker verify` command"
        from ..support import settings_env

        r = subprocess.run(
            [sys.executable, "-m", "inventory_worker", "verify"],
            env=settings_env(self.settings),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        return r.returncode == 0, (r.stdout + r.stderr).strip()[-1000:]


def _holds(got: Any, want: Any) -> bool:
    """want's fields are in got with equal values; dicts compared as subsets, recursively."""
    if isinstance(want, dict):
        return isinstance(got, dict) and all(k in got and _holds(got[k], v) for k, v in want.items())
    return bool(got == want)


def _sorted_allocation(data: dict[str, Any]) -> dict[str, Any]:
    """inventory.allocated with its lines by product and their allocations by location."""
    lines = [
        dict(line, allocations=sorted(line["allocations"], key=lambda a: a["location_id"]))
        for line in data["lines"]
    ]
    return {"channel_id": data["channel_id"], "lines": sorted(lines, key=lambda x: x["product_id"])}


def finish(
    services: PrivateServices, report: Report | None, seconds: float, interrupted: str | None = None
) -> str:
    """Stops the private services and keeps their folder if the run failed; the verdict line."""
    passed = report is not None and report.ok and interrupted is None
    kept = services.close(keep=not passed and interrupted is None)
    where = f"; logs kept in {services.root}" if kept else ""
    if interrupted:
        return f"chaos: FAIL interrupted by {interrupted} after {seconds:.0f} s, everything it started stopped{where}"
    if report is None:
        return f"chaos: FAIL the run did not complete after {seconds:.0f} s (see the error above){where}"
    failed = [name for name, (ok, _) in report.invariants.items() if not ok]
    s = report.summary
    counts = (
        f"{s['distinct events']} events, {sum(s['faults injected'].values())} faults, "
        f"seed {s['seed']}, {seconds:.0f} s"
    )
    if not failed:
        return f"chaos: PASS all {len(report.invariants)} invariants hold ({counts}){where}"
    return (
        f"chaos: FAIL {len(failed)} of {len(report.invariants)} invariants broken ({counts}): "
        + "; ".join(failed)
        + where
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--duration",
        type=float,
        default=DEFAULT_SECONDS,
        help=f"seconds of publishing under faults (default {DEFAULT_SECONDS})",
    )
    ap.add_argument(
        "--seed",
        type=int,
        default=int(os.environ.get("CHAOS_SEED", DEFAULT_SEED)),
        help=f"the workload's and the faults' seed (default CHAOS_SEED or {DEFAULT_SEED})",
    )
    ap.add_argument("--processes", type=int, default=3)
    ap.add_argument("--round-size", type=int, default=60)
    ap.add_argument("--node-restarts", action="store_true", help="also restart the whole RabbitMQ node")
    ap.add_argument("--progress-seconds", type=float, default=5.0, help="seconds between progress lines")
    args = ap.parse_args(argv)
    os.chdir(REPO)
    reaper.install()
    progress = Progress(args.progress_seconds)
    progress.start()
    services = PrivateServices()
    report: Report | None = None
    interrupted: str | None = None
    print(
        f"chaos: {args.duration:.0f} s of faults, seed {args.seed}, {args.processes} consumer processes;"
        f" private services in {services.root}",
        flush=True,
    )
    try:
        services.start()
        print(
            f"chaos: private services up in {services.start_seconds.get('total', 0):.1f} s: "
            f"{services.describe()}",
            flush=True,
        )
        kinds = FAULT_KINDS + (("restart_rabbitmq_node",) if args.node_restarts else ())
        report = run_chaos(
            services,
            duration=args.duration,
            seed=args.seed,
            processes=args.processes,
            round_size=args.round_size,
            kinds=kinds,
            progress=progress,
        )
        print(report.text(), flush=True)
    except reaper.Interrupted as exc:
        interrupted = exc.name
        raise
    except Exception:
        traceback.print_exc()
    finally:
        reaper.hold()  # a second signal must not cut the cleanup short
        progress.phase = "stopping the private services"
        verdict = finish(services, report, time.monotonic() - progress.started, interrupted)
        progress.stop_event.set()
        reaper.sweep()  # what the orderly stops missed, before the verdict: it stays the last line
        print(verdict, flush=True)
    return 0 if report is not None and report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
