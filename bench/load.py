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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import pika

from inventory_worker.adapters import amqp_framing
from inventory_worker.config import Settings
from inventory_worker.contract import parse_event

from . import cpu, machine

UNIFORM_PRODUCTS = 10_000
HOT_PRODUCTS = 10
RESULT_KEYS = ("inventory.reserved", "inventory.rejected")
WINDOW_SECONDS = 0.5  # the timelines' window (latency percentiles, results/s, fills)


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


def single_id(kind: str, tag: str) -> list[str]:
    """One fresh product for a run whose every order names it (flash, preorder)."""
    return [f"BENCH-{kind}-{tag}"]


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
    the number of inputs that got a second, different result (another event id: the relay's
    republishing keeps the id), CPU seconds spent receiving).
    Results of other inputs (e.g. the relay republishing an earlier run's row) are ignored."""
    expected, wanted = len(ids), set(ids)
    amqp_framing.coalesce_writes()
    amqp_framing.read_deliveries()  # as in the worker: the load generator's CPU is the machine's too
    conn = pika.BlockingConnection(pika.URLParameters(str(settings.rabbitmq.url)))
    ch = conn.channel()
    q = ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
    for key in RESULT_KEYS:
        ch.queue_bind(q, settings.rabbitmq.events_exchange, routing_key=key)
    got: dict[str, tuple[float, str, int]] = {}
    first_id: dict[str, str] = {}
    extra: set[str] = set()
    last = [time.monotonic()]

    def on_message(_ch: Any, _m: Any, _p: Any, body: bytes) -> None:
        now = time.time()
        r = orjson.loads(body)
        cid = r["causation_id"]
        if cid in wanted and cid not in got:
            qty = (
                sum(line["quantity"] for line in r["data"].get("lines", []))
                if r["type"] == "inventory.reserved"
                else 0
            )
            got[cid] = (now, r["type"], qty)
            first_id[cid] = r["id"]
        elif cid in got and r["id"] != first_id[cid]:  # the same one again (relay) is fine
            extra.add(cid)
        last[0] = time.monotonic()

    ch.basic_qos(prefetch_count=2000)
    ch.basic_consume(q, on_message, auto_ack=True)
    ready.set()
    cpu0 = time.process_time()
    while len(got) < expected and time.monotonic() - last[0] < idle_timeout:
        conn.process_data_events(time_limit=0.1)
    conn.process_data_events(time_limit=0.2)  # a second result right behind the last first one
    conn.close()
    out.send((got, len(extra), time.process_time() - cpu0))
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
    extra_results: int = 0  # orders that got a second, different result (one result per order)
    # Per WINDOW_SECONDS from the first send: the latency percentiles of the orders sent in the
    # window, and the results that arrived in it per second (a stall shows in both).
    timeline: list[dict[str, float]] = field(default_factory=list)
    # With a machine probe (bench/machine.py): the host's slowdowns during the run, the orders
    # in flight during one, and the p99 of the others.
    slowdowns: dict[str, Any] = field(default_factory=dict)
    in_slowdown: int = 0
    p99_clear_ms: float = float("nan")
    # Each order's send and its result's arrival (wall clock), for bench/order_split.py; not saved.
    sent_at: dict[str, float] = field(default_factory=dict, repr=False)
    arrived_at: dict[str, float] = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            k: round(v, 2) if isinstance(v, float) else v
            for k, v in self.__dict__.items()
            if k not in ("sent_at", "arrived_at")
        }


def timeline(
    sent: dict[str, float], arrived: dict[str, float], window: float = WINDOW_SECONDS
) -> list[dict[str, float]]:
    """Per window from the first send: orders sent, their p50/p99/max latency (ms), and results
    per second arriving in the window."""
    if not sent:
        return []
    t0 = min(sent.values())
    end = max([*sent.values(), *arrived.values()])
    windows = int((end - t0) // window) + 1
    lat: list[list[float]] = [[] for _ in range(windows)]
    sends = [0] * windows
    arrivals = [0] * windows
    for i, s in sent.items():
        k = int((s - t0) // window)
        sends[k] += 1
        if i in arrived:
            lat[k].append((arrived[i] - s) * 1000)
    for a in arrived.values():
        arrivals[int((a - t0) // window)] += 1
    out = []
    for k in range(windows):
        ms = sorted(lat[k])
        out.append(
            {
                "t": round(k * window, 2),
                "sent": sends[k],
                "p50_ms": round(percentile(ms, 50), 1),
                "p99_ms": round(percentile(ms, 99), 1),
                "max_ms": round(ms[-1], 1) if ms else float("nan"),
                "results_per_s": round(arrivals[k] / window, 1),
            }
        )
    return out


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
    probe: bool = False,
) -> RunResult:
    """Publishes `count` orders (at `rate`/s, or flat out) while something consumes the input
    queue; waits for every result; returns throughput and latency from occurred_at to result.
    With `worker_pids`, also the CPU the whole machine spent per event, by component; with
    `probe`, the machine's own slowdowns meanwhile (bench/machine.py)."""
    ctx = multiprocessing.get_context("spawn")
    sampler = machine.Probe().start() if probe else None  # started (and its start-up over) first
    try:
        ids = [str(uuid.uuid4()) for _ in range(count)]
        ready, go = ctx.Event(), ctx.Event()
        c_recv, c_send = ctx.Pipe(duplex=False)
        p_recv, p_send = ctx.Pipe(duplex=False)
        collector = ctx.Process(
            target=_collector, args=(settings, ids, idle_timeout, ready, c_send), daemon=True
        )
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
        got, extra_results, collector_cpu = c_recv.recv()
        elapsed = time.monotonic() - t0
    finally:
        eps, slowdowns = sampler.stop() if sampler else ([], {})
    load_cpu = publisher_cpu + collector_cpu
    per_event = meter.per_event(len(got), load_generator_seconds=load_cpu) if meter else {}
    publisher.join(10)
    collector.join(10)
    arrived = {i: a for i, (a, _, _) in got.items()}
    arrivals = sorted(arrived.values())
    clear, hit = machine.clear_of(eps, sent, arrived) if probe else ([], 0)
    if probe and sent:  # when they were, on the timeline's clock (seconds from the first send)
        t_first = min(sent.values())
        slowdowns["spans_s"] = [[round(e.start - t_first, 3), round(e.end - t_first, 3)] for e in eps]
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
        extra_results=extra_results,
        timeline=timeline(sent, arrived),
        slowdowns=slowdowns,
        in_slowdown=hit,
        p99_clear_ms=percentile(clear, 99),
        sent_at=sent,
        arrived_at=arrived,
    )


# ---- backorder filling (the preorder workload) ----------------------------------------------


def receive_and_fill(
    settings: Settings,
    product_id: str,
    quantity: int,
    expect_units: int,
    idle_timeout: float = 20.0,
    grace: float = 1.5,
) -> dict[str, Any]:
    """Publishes one stock.received of `quantity` units of `product_id` and collects the
    inventory.backorder_filled events that follow (the receipt's own transaction fills the first
    orders, the elected sweeper's fill pass the rest), until `expect_units` units are filled and
    `grace` s more have passed (a second fill of an order would show), or nothing arrives for
    `idle_timeout` s. Times are seconds from the moment the receipt was handed to the broker.

    Returns the receipt's event id, its result's arrival, each fill event as (seconds, order id,
    units, causation id, event id) in arrival order, and the fills per second until the last."""
    conn = pika.BlockingConnection(pika.URLParameters(str(settings.rabbitmq.url)))
    try:
        ch = conn.channel()
        q = ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
        for key in ("inventory.backorder_filled", "inventory.moved"):
            ch.queue_bind(q, settings.rabbitmq.events_exchange, routing_key=key)
        receipt_id = str(uuid.uuid4())
        fills: list[tuple[float, str, int, str, str]] = []
        seen: set[str] = set()
        moved_at: list[float] = []
        last = [time.monotonic()]
        t0 = [0.0]

        def on_message(_ch: Any, method: Any, _p: Any, body: bytes) -> None:
            r = orjson.loads(body)
            now = time.time() - t0[0]
            last[0] = time.monotonic()
            if method.routing_key == "inventory.moved":
                if r["causation_id"] == receipt_id:
                    moved_at.append(now)
                return
            if r["id"] in seen:  # the relay's republishing of one fill: delivered twice, filled once
                return
            seen.add(r["id"])
            lines = [x for x in r["data"]["lines"] if x["product_id"] == product_id]
            if lines:
                units = sum(x["quantity"] for x in lines)
                fills.append((round(now, 4), r["data"]["order_id"], units, r["causation_id"], r["id"]))

        ch.basic_consume(q, on_message, auto_ack=True)
        body = orjson.dumps(
            {
                "id": receipt_id,
                "type": "stock.received",
                "occurred_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                "data": {"product_id": product_id, "quantity": quantity, "reference": "bench preorder"},
            }
        )
        parse_event(body, "stock.received")
        pub = conn.channel()
        pub.confirm_delivery()
        t0[0] = time.time()
        pub.basic_publish(
            settings.rabbitmq.exchange,
            "stock.received",
            body,
            properties=pika.BasicProperties(content_type="application/json", delivery_mode=2),
        )
        done_at: float | None = None
        while time.monotonic() - last[0] < idle_timeout:
            conn.process_data_events(time_limit=0.1)
            if done_at is None and sum(f[2] for f in fills) >= expect_units:
                done_at = time.monotonic()
            if done_at is not None and time.monotonic() - done_at >= grace:
                break
    finally:
        conn.close()
    last_fill = max((f[0] for f in fills), default=float("nan"))
    # Orders filled by the end of each 50 ms in which some were: the fills come in bursts (a
    # transaction's worth each), so this stays short and still shows every burst.
    per_window: dict[int, int] = {}
    for f in fills:
        per_window[int(f[0] // 0.05)] = per_window.get(int(f[0] // 0.05), 0) + 1
    cumulative, total = [], 0
    for k in sorted(per_window):
        total += per_window[k]
        cumulative.append([round((k + 1) * 0.05, 2), total])
    return {
        "receipt_id": receipt_id,
        "receipt_result_s": round(moved_at[0], 3) if moved_at else None,
        "fills": fills,
        "fill_events": len(fills),
        "units_filled": sum(f[2] for f in fills),
        "filled_by_receipt": sum(1 for f in fills if f[3] == receipt_id),
        "first_fill_s": round(min(f[0] for f in fills), 3) if fills else None,
        "last_fill_s": round(last_fill, 3),
        "fills_per_s": round(len(fills) / last_fill, 1) if fills and last_fill > 0 else float("nan"),
        "fill_timeline": cumulative,  # [[seconds, orders filled by then]] (the chart's curve)
    }


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
