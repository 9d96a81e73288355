"""Load for the benchmark: workloads, an input publisher, a result collector, a naive consumer.

Each runs in its own process (multiprocessing, spawn), so that generating load and collecting
results do not share a GIL with each other; all three still share the machine's cores with the
worker, as a real co-located producer and consumer would.
"""

from __future__ import annotations

import multiprocessing
import random
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import pika

from inventory_worker.adapters import amqp_framing
from inventory_worker.config import Settings
from inventory_worker.contract import parse_event

from . import cpu

UNIFORM_PRODUCTS = 10_000
HOT_PRODUCTS = 10
RESULT_KEYS = ("inventory.reserved", "inventory.rejected")


@dataclass(frozen=True)
class Workload:
    """What the orders look like. Every input is one order.placed; its result is one event."""

    name: str
    products: list[str]
    lines: int = 1
    channel_id: str | None = None  # sent with every order when set

    def order(self, rng: random.Random) -> dict[str, Any]:
        picked = rng.sample(self.products, self.lines) if self.lines > 1 else [rng.choice(self.products)]
        order: dict[str, Any] = {
            "order_id": f"o-{uuid.uuid4().hex}",
            "lines": [{"product_id": p, "quantity": 1} for p in picked],
        }
        if self.channel_id is not None:
            order["channel_id"] = self.channel_id
        return order


def uniform_ids() -> list[str]:
    return [f"BENCH-U-{i:05d}" for i in range(UNIFORM_PRODUCTS)]


def location_ids(count: int = UNIFORM_PRODUCTS) -> list[str]:
    """The products of the locations3 workload (as many as the uniform ones but in --smoke), ids of their own."""
    return [f"BENCH-L-{i:05d}" for i in range(count)]


def hot_ids(tag: str) -> list[str]:
    """Fresh hot products for each run, so each run's no-oversell check stands on its own."""
    return [f"BENCH-H-{tag}-{i}" for i in range(HOT_PRODUCTS)]


def publish(settings: Settings, messages: list[tuple[str, dict[str, Any]]]) -> None:
    """Publishes (type, data) messages, each checked against the contract first (an invalid one
    raises InvalidMessage before anything is sent), and waits for the broker's confirms."""
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    bodies = []
    for type_, data in messages:
        body = orjson.dumps({"id": str(uuid.uuid4()), "type": type_, "occurred_at": now, "data": data})
        parse_event(body, type_)
        bodies.append((type_, body))
    conn = pika.BlockingConnection(pika.URLParameters(str(settings.rabbitmq.url)))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        for type_, body in bodies:
            ch.basic_publish(
                settings.rabbitmq.exchange,
                type_,
                body,
                properties=pika.BasicProperties(content_type="application/json", delivery_mode=2),
            )
    finally:
        conn.close()


# ---- input publisher ----------------------------------------------------------------------


def _publisher(
    settings: Settings,
    workload: Workload,
    ids: list[str],
    rate: float | None,
    seed: int,
    started: Any,
    out: Any,
) -> None:
    """Publishes `count` orders, as fast as it can (rate None) or at `rate` per second, in
    bursts of what is due within 5 ms (open loop: it does not wait for results). Sends back
    ({id: wall-clock sent}, CPU seconds spent publishing)."""
    rng = random.Random(seed)
    amqp_framing.coalesce_writes()  # as in the worker: one send() per flush, not per frame
    conn = pika.BlockingConnection(pika.URLParameters(str(settings.rabbitmq.url)))
    ch = conn.channel()
    # Confirms: an input the broker did not take must not be counted against the worker as
    # lost. Pipelined (as the worker publishes its results): pika's blocking confirm mode
    # waits for each publish's confirm, which capped this publisher below the worker's speed.
    outstanding: dict[int, str] = {}  # delivery tag -> input id, in publish order
    nacked: list[str] = []
    selected: list[bool] = []

    def on_confirm(frame: Any) -> None:
        m = frame.method
        if m.multiple:  # every tag up to this one: the oldest entries (dicts keep publish order)
            done = []
            for t in outstanding:
                if t > m.delivery_tag:
                    break
                done.append(t)
        else:
            done = [m.delivery_tag]
        for t in done:
            eid = outstanding.pop(t, None)
            if eid is not None and isinstance(m, pika.spec.Basic.Nack):
                nacked.append(eid)

    ch._impl.confirm_delivery(ack_nack_callback=on_confirm, callback=lambda _f: selected.append(True))
    while not selected:
        conn.process_data_events(time_limit=0.05)
    exchange = settings.rabbitmq.exchange
    orders = [workload.order(rng) for _ in ids]
    sent: dict[str, float] = {}
    started.wait()
    cpu0 = time.process_time()  # what publishing costs, without start-up and making the orders
    t0 = time.monotonic()
    for i, data in enumerate(orders):
        if rate:
            due = t0 + i / rate
            if (ahead := due - time.monotonic()) > 0.005:
                conn.sleep(ahead)  # writes what is buffered (the last burst) first
        eid = ids[i]
        now = time.time()
        body = {
            "id": eid,
            "type": "order.placed",
            "occurred_at": datetime.fromtimestamp(now, UTC).isoformat().replace("+00:00", "Z"),
            "data": data,
        }
        amqp_framing.publish(
            ch._impl,
            exchange,
            "order.placed",
            orjson.dumps(body),
            content_type="application/json",
            delivery_mode=2,
        )
        outstanding[i + 1] = eid
        sent[eid] = now
        if i % 50 == 0:
            # Writes what is buffered and reads confirms. Paced, the orders due within 5 ms go
            # out as one burst, written when it ends (their latency counts from before that).
            conn.process_data_events(0)
        while len(outstanding) > 2000:
            conn.process_data_events(time_limit=0.01)
    deadline = time.monotonic() + 30
    while outstanding and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
    conn.close()
    for eid in nacked + list(outstanding.values()):
        sent.pop(eid, None)
    out.send((sent, time.process_time() - cpu0))
    out.close()


# ---- result collector ---------------------------------------------------------------------


def _collector(settings: Settings, ids: list[str], idle_timeout: float, ready: Any, out: Any) -> None:
    """Receives result events until every input in `ids` has one (or nothing arrives for
    `idle_timeout` s). Sends back ({causation_id: (arrival wall-clock, type, reserved quantity)},
    CPU seconds spent receiving).
    Results of other inputs (e.g. the relay republishing an earlier run's row) are ignored."""
    expected, wanted = len(ids), set(ids)
    amqp_framing.coalesce_writes()
    conn = pika.BlockingConnection(pika.URLParameters(str(settings.rabbitmq.url)))
    ch = conn.channel()
    q = ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
    for key in RESULT_KEYS:
        ch.queue_bind(q, settings.rabbitmq.events_exchange, routing_key=key)
    got: dict[str, tuple[float, str, int]] = {}
    last = [time.monotonic()]

    def on_message(_ch: Any, _m: Any, _p: Any, body: bytes) -> None:
        now = time.time()
        r = orjson.loads(body)
        cid = r["causation_id"]
        if (
            cid in wanted and cid not in got
        ):  # a result may arrive twice (relay after a crash): first one counts
            qty = (
                sum(line["quantity"] for line in r["data"].get("lines", []))
                if r["type"] == "inventory.reserved"
                else 0
            )
            got[cid] = (now, r["type"], qty)
        last[0] = time.monotonic()

    ch.basic_qos(prefetch_count=2000)
    ch.basic_consume(q, on_message, auto_ack=True)
    ready.set()
    cpu0 = time.process_time()
    while len(got) < expected and time.monotonic() - last[0] < idle_timeout:
        conn.process_data_events(time_limit=0.1)
    conn.close()
    out.send((got, time.process_time() - cpu0))
    out.close()


@dataclass
class RunResult:
    sent: int
    received: int
    throughput: float  # results/s between the 10th and 90th percentile of arrivals
    p50_ms: float
    p95_ms: float
    p99_ms: float
    reserved_qty: int
    rejected: int
    seconds: float
    load_cpu_seconds: float  # CPU the publisher and the collector used while the run went on
    cpu_us_per_event: dict[str, float]  # by component (bench/cpu.py), when asked for

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in self.__dict__.items()}


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def drive(
    settings: Settings,
    workload: Workload,
    count: int,
    rate: float | None = None,
    seed: int = 1,
    idle_timeout: float = 20.0,
    worker_pids: set[int] | None = None,
) -> RunResult:
    """Publishes `count` orders (at `rate`/s, or flat out) while something consumes the input
    queue; waits for every result; returns throughput and latency from occurred_at to result.
    With `worker_pids`, also the CPU the whole machine spent per event, by component."""
    ctx = multiprocessing.get_context("spawn")
    ids = [str(uuid.uuid4()) for _ in range(count)]
    ready, go = ctx.Event(), ctx.Event()
    c_recv, c_send = ctx.Pipe(duplex=False)
    p_recv, p_send = ctx.Pipe(duplex=False)
    collector = ctx.Process(target=_collector, args=(settings, ids, idle_timeout, ready, c_send), daemon=True)
    publisher = ctx.Process(
        target=_publisher, args=(settings, workload, ids, rate, seed, go, p_send), daemon=True
    )
    collector.start()
    publisher.start()
    if not ready.wait(30):
        raise RuntimeError("result collector did not start")
    meter = cpu.CpuMeter(worker_pids) if worker_pids is not None else None
    t0 = time.monotonic()
    go.set()
    sent, publisher_cpu = p_recv.recv()
    got, collector_cpu = c_recv.recv()
    elapsed = time.monotonic() - t0
    load_cpu = publisher_cpu + collector_cpu
    per_event = meter.per_event(len(got), load_generator_seconds=load_cpu) if meter else {}
    publisher.join(10)
    collector.join(10)
    arrivals = sorted(a for a, _, _ in got.values())
    lat = sorted((got[i][0] - s) * 1000 for i, s in sent.items() if i in got)
    if len(arrivals) >= 10:
        lo, hi = arrivals[len(arrivals) // 10], arrivals[(len(arrivals) * 9) // 10]
        n = (len(arrivals) * 9) // 10 - len(arrivals) // 10
        tput = n / (hi - lo) if hi > lo else float("nan")
    else:
        tput = float("nan")
    return RunResult(
        sent=len(sent),
        received=len(got),
        throughput=tput,
        p50_ms=percentile(lat, 50),
        p95_ms=percentile(lat, 95),
        p99_ms=percentile(lat, 99),
        reserved_qty=sum(q for _, t, q in got.values() if t == "inventory.reserved"),
        rejected=sum(1 for _, t, _ in got.values() if t == "inventory.rejected"),
        seconds=elapsed,
        load_cpu_seconds=load_cpu,
        cpu_us_per_event=per_event,
    )


# ---- the naive consumer (baseline) ---------------------------------------------------------


def naive_consumer(settings: Settings, stop: Any) -> None:
    """One message at a time: one transaction, one ack, one confirmed publish per result.

    The same stored procedures, cache and outbox as the worker; only the batching and the
    pipelining are missing. The previous message's outbox marks ride in the next transaction,
    so it is still one transaction per message.
    """
    from inventory_worker.adapters.postgres import Store
    from inventory_worker.adapters.redis_cache import StockCache

    store = Store(settings.database, settings.worker.default_reservation_ttl_seconds)
    cache = StockCache(settings.redis)
    conn = pika.BlockingConnection(pika.URLParameters(str(settings.rabbitmq.url)))
    ch = conn.channel()
    ch.basic_qos(prefetch_count=100)
    pub = conn.channel()
    pub.confirm_delivery()
    marks: list[int] = []

    def on_message(_ch: Any, method: Any, _props: Any, body: bytes) -> None:
        ev = parse_event(body, method.routing_key)
        [res] = store.apply_batch([ev.for_store()], mark_published=marks)
        marks.clear()
        cache.put_many(res.products)
        ch.basic_ack(method.delivery_tag)
        for m in res.messages:
            pub.basic_publish(
                settings.rabbitmq.events_exchange,
                m.routing_key,
                orjson.dumps(m.body),
                properties=pika.BasicProperties(
                    content_type="application/json",
                    delivery_mode=2,
                    message_id=m.message_id,
                    type=m.routing_key,
                ),
            )
            marks.append(m.outbox_id)

    ch.basic_consume(settings.rabbitmq.queue, on_message)
    while not stop.is_set():
        conn.process_data_events(time_limit=0.2)
    conn.close()
    store.close()
