"""The worker end to end: RabbitMQ in, PostgreSQL, RabbitMQ out, Redis, HTTP.

Each transition is published as a real message to the run's worker; the test asserts the
figures, the exact result events with their AMQP properties, the dead letters and the HTTP
answers. Results are deduplicated by id: the contract allows a result to arrive twice.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pika
import pytest

from inventory_worker.contract import make_event, validate_output
from inventory_worker.http.api import READY_CACHE_SECONDS

from ..support import (
    Bus,
    delete_topology,
    figures,
    free_port,
    http_get,
    pg,
    redis_client,
    uid,
    with_own_queues,
)


class Tap:
    """Every result event with its routing key and properties, deduplicated by id."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.channel = bus.conn.channel()
        self.queue = self.channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        self.channel.queue_bind(self.queue, bus.settings.rabbitmq.events_exchange, routing_key="#")
        self.seen: dict[str, tuple[str, Any, dict[str, Any]]] = {}

    def drain(self) -> None:
        while True:
            method, props, body = self.channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                return
            doc = json.loads(body)
            self.seen.setdefault(doc["id"], (method.routing_key, props, doc))

    def for_event(self, event_id: str) -> list[tuple[str, Any, dict[str, Any]]]:
        self.drain()
        return [v for v in self.seen.values() if v[2]["causation_id"] == event_id]

    def results(self, event: dict[str, Any], count: int, timeout: float = 20.0) -> list[tuple[str, dict]]:
        """Waits for `count` results of `event`; checks each one's envelope and AMQP properties
        (and an inventory.reserved's `expires_at`, then left out of its data: other results'
        deadlines are the test's to check); returns them as (type, data) in the order the
        worker published them."""
        deadline = time.monotonic() + timeout
        while len(found := self.for_event(event["id"])) < count:
            assert time.monotonic() < deadline, f"{len(found)} of {count} results for {event['type']}"
            self.bus.conn.sleep(0.05)
        self.bus.conn.sleep(0.2)  # anything beyond `count` would be a wrong extra result
        found = self.for_event(event["id"])
        assert len(found) == count, [d["type"] for _, _, d in found]
        out = []
        for routing_key, props, doc in found:
            validate_output(doc)
            assert doc["causation_id"] == event["id"]
            assert routing_key == doc["type"]
            assert props.message_id == doc["id"]
            assert props.delivery_mode == 2  # persistent
            assert props.content_type == "application/json"
            occurred = datetime.fromisoformat(doc["occurred_at"])
            assert abs(datetime.now(UTC) - occurred) < timedelta(minutes=1)
            data = dict(doc["data"])
            if doc["type"] == "inventory.reserved":  # held for the order's TTL from now
                expires = datetime.fromisoformat(data.pop("expires_at"))
                ttl = event["data"].get("reservation_ttl_seconds", 900)
                assert abs(expires - occurred - timedelta(seconds=ttl)) < timedelta(seconds=5)
            out.append((doc["type"], data))
        return out


@pytest.fixture
def tap(bus: Bus) -> Tap:
    return Tap(bus)


def processed(settings: Any, event: dict[str, Any], timeout: float = 20.0) -> str:
    """Waits until the worker applied the event; returns its outcome."""
    deadline = time.monotonic() + timeout
    while True:
        with pg(settings) as cur:
            cur.execute("SELECT outcome FROM processed_events WHERE event_id = %s", (event["id"],))
            row = cur.fetchone()
        if row:
            return row[0]
        assert time.monotonic() < deadline, f"{event['type']} {event['id']} not applied"
        time.sleep(0.05)


def lines(*pairs: tuple[str, int]) -> list[dict[str, Any]]:
    return [{"product_id": p, "quantity": q} for p, q in pairs]


def adjusted(pid: str, on_hand: int, reserved: int = 0) -> tuple[str, dict]:
    return (
        "inventory.adjusted",
        {"product_id": pid, "on_hand": on_hand, "reserved": reserved, "available": on_hand - reserved},
    )


def stock(bus: Bus, tap: Tap, pid: str, delta: int, **extra: Any) -> None:
    ev = bus.publish("stock.adjusted", {"product_id": pid, "delta": delta, **extra})
    tap.results(ev, 1)


# ==== every transition ============================================================================


def test_adjustments(worker, bus, tap, settings):
    pid = uid()
    ev = bus.publish(
        "stock.adjusted", {"product_id": pid, "delta": 10, "reason": "PO-1", "low_stock_threshold": 2}
    )
    assert tap.results(ev, 1) == [adjusted(pid, 10)]
    ev = bus.publish("stock.adjusted", {"product_id": pid, "on_hand": 6})
    assert tap.results(ev, 1) == [adjusted(pid, 6)]
    ev = bus.publish("stock.adjusted", {"product_id": pid, "delta": -7})
    assert tap.results(ev, 1) == [
        (
            "inventory.adjustment_rejected",
            {"product_id": pid, "reason": "negative_on_hand", "on_hand": 6, "reserved": 0, "requested": -1},
        )
    ]
    ev = bus.publish("stock.adjusted", {"product_id": pid, "delta": -4})
    assert tap.results(ev, 2) == [
        adjusted(pid, 2),
        ("inventory.low_stock", {"product_id": pid, "available": 2, "threshold": 2}),
    ]
    assert figures(settings, pid) == (2, 0)


def test_place_cancel_complete(worker, bus, tap, settings):
    a, b = uid("A"), uid("B")
    stock(bus, tap, a, 10)
    stock(bus, tap, b, 4)
    o1, o2 = uid("O"), uid("O")

    ev = bus.publish(
        "order.placed", {"order_id": o1, "lines": lines((b, 4), (a, 3)), "reservation_ttl_seconds": 120}
    )
    assert tap.results(ev, 2) == [
        ("inventory.reserved", {"order_id": o1, "lines": lines((b, 4), (a, 3))}),
        ("inventory.low_stock", {"product_id": b, "available": 0, "threshold": 0}),
    ]
    assert (figures(settings, a), figures(settings, b)) == ((10, 3), (4, 4))

    ev = bus.publish("order.placed", {"order_id": o2, "lines": lines((a, 2), (b, 1))})
    assert tap.results(ev, 1) == [
        (
            "inventory.rejected",
            {
                "order_id": o2,
                "reason": "insufficient_stock",
                "shortages": [{"product_id": b, "requested": 1, "available": 0}],
            },
        )
    ]
    assert (figures(settings, a), figures(settings, b)) == ((10, 3), (4, 4))  # all or nothing

    ev = bus.publish("order.cancelled", {"order_id": o1})  # b's available: 0 -> 4 (decision 13.7)
    assert tap.results(ev, 2) == [
        ("inventory.released", {"order_id": o1, "lines": lines((b, 4), (a, 3)), "reason": "cancelled"}),
        ("inventory.back_in_stock", {"product_id": b, "available": 4}),
    ]
    assert (figures(settings, a), figures(settings, b)) == ((10, 0), (4, 0))

    ev = bus.publish(
        "order.placed", {"order_id": o2, "lines": lines((a, 2), (b, 1))}
    )  # placed again: fits now
    assert tap.results(ev, 1)[0][0] == "inventory.reserved"
    ev = bus.publish("order.completed", {"order_id": o2})
    assert tap.results(ev, 1) == [("inventory.committed", {"order_id": o2, "lines": lines((a, 2), (b, 1))})]
    assert (figures(settings, a), figures(settings, b)) == ((8, 0), (3, 0))

    # cancelling a committed order changes nothing and says nothing
    ev = bus.publish("order.cancelled", {"order_id": o2})
    assert processed(settings, ev) == "ignored"
    assert tap.for_event(ev["id"]) == []
    # completing a cancelled one is refused
    ev = bus.publish("order.completed", {"order_id": o1})
    assert tap.results(ev, 1) == [
        ("inventory.rejected", {"order_id": o1, "reason": "order_cancelled", "shortages": []})
    ]
    assert (figures(settings, a), figures(settings, b)) == ((8, 0), (3, 0))


def test_unknown_product_and_unknown_orders(worker, bus, tap, settings):
    known, unknown = uid("K"), uid("U")
    stock(bus, tap, known, 5)
    order = uid("O")
    ev = bus.publish("order.placed", {"order_id": order, "lines": lines((known, 1), (unknown, 1))})
    assert tap.results(ev, 1) == [
        (
            "inventory.rejected",
            {
                "order_id": order,
                "reason": "unknown_product",
                "shortages": [{"product_id": unknown, "requested": 1, "available": 0}],
            },
        )
    ]
    for type_ in ("order.completed", "order.cancelled"):
        ev = bus.publish(type_, {"order_id": uid("NOPE")})
        assert processed(settings, ev) in ("ignored", "cancel_recorded")
        assert tap.for_event(ev["id"]) == []
    assert figures(settings, known) == (5, 0)
    assert figures(settings, unknown) is None


def test_cancel_before_place(worker, bus, tap, settings):
    pid, order = uid(), uid("O")
    stock(bus, tap, pid, 5)
    cancel = bus.publish("order.cancelled", {"order_id": order})
    assert processed(settings, cancel) == "cancel_recorded"
    ev = bus.publish("order.placed", {"order_id": order, "lines": lines((pid, 1))})
    assert tap.results(ev, 1) == [
        ("inventory.rejected", {"order_id": order, "reason": "order_cancelled", "shortages": []})
    ]
    assert tap.for_event(cancel["id"]) == []
    assert figures(settings, pid) == (5, 0)


# ==== idempotency ===============================================================================


def metric_total(base_url: str, name: str, **labels: str) -> float:
    status, _, raw = http_get(base_url + "/metrics")
    assert status == 200
    total = 0.0
    for line in raw.decode().splitlines():
        m = re.fullmatch(name + r"\{(.*)\} (\S+)", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


def wait_metric(base_url: str, name: str, at_least: float, timeout: float = 20.0, **labels: str) -> None:
    deadline = time.monotonic() + timeout
    while (v := metric_total(base_url, name, **labels)) < at_least:
        assert time.monotonic() < deadline, f"{name}{labels} = {v}, expected {at_least}"
        time.sleep(0.1)


def test_every_message_delivered_twice_gives_the_same_figures_as_once(worker, bus, tap, settings):
    """Two products get the same story; every message of the second is delivered twice."""
    once, twice = uid("ONCE"), uid("TWICE")
    dup_before = metric_total(worker.base_url, "inventory_events_total", outcome="duplicate")
    orders = {p: (uid("O"), uid("O")) for p in (once, twice)}
    story = [
        lambda p: ("stock.adjusted", {"product_id": p, "delta": 10}),
        lambda p: ("order.placed", {"order_id": orders[p][0], "lines": lines((p, 3))}),
        lambda p: ("order.placed", {"order_id": orders[p][1], "lines": lines((p, 4))}),
        lambda p: ("order.completed", {"order_id": orders[p][0]}),
        lambda p: ("order.cancelled", {"order_id": orders[p][1]}),
        lambda p: ("stock.adjusted", {"product_id": p, "on_hand": 5}),
    ]
    produced: dict[str, list[list[tuple[str, dict]]]] = {once: [], twice: []}
    delivered_twice = []
    for step in story:
        for pid in (once, twice):
            type_, data = step(pid)
            body = make_event(type_, data)
            raw = json.dumps(body).encode()
            copies = 2 if pid == twice else 1
            for _ in range(copies):
                bus.publish_raw(raw, type_, pika.BasicProperties(delivery_mode=2, message_id=body["id"]))
            processed(settings, body)
            if copies == 2:
                delivered_twice.append(body["id"])
            n = {"stock.adjusted": 1, "order.placed": 1, "order.completed": 1, "order.cancelled": 1}[type_]
            produced[pid].append(
                [
                    (t, {k: v for k, v in d.items() if k not in ("product_id", "order_id", "lines")})
                    for t, d in tap.results(body, n)
                ]
            )
    wait_metric(worker.base_url, "inventory_events_total", dup_before + len(story), outcome="duplicate")
    assert produced[twice] == produced[once]
    assert [len(tap.for_event(i)) for i in delivered_twice] == [1] * len(story)  # nothing new from the copies
    with pg(settings) as cur:
        cur.execute(
            "SELECT product_id, on_hand, reserved, version FROM products WHERE product_id IN (%s, %s)",
            (once, twice),
        )
        rows = {r[0]: r[1:] for r in cur.fetchall()}
    assert rows[twice] == rows[once] == (5, 0, 6)


def test_same_order_placed_twice_under_two_ids(worker, bus, tap, settings):
    pid, order = uid(), uid("O")
    stock(bus, tap, pid, 10)
    first = bus.publish("order.placed", {"order_id": order, "lines": lines((pid, 3))})
    second = bus.publish("order.placed", {"order_id": order, "lines": lines((pid, 3))})
    outcomes = sorted([processed(settings, first), processed(settings, second)])
    assert outcomes == ["duplicate_order", "reserved"]
    reserved_by = first if outcomes[1] == processed(settings, first) else second
    tap.results(reserved_by, 1)
    results = tap.for_event(first["id"]) + tap.for_event(second["id"])
    assert [d["type"] for _, _, d in results] == ["inventory.reserved"]
    assert figures(settings, pid) == (10, 3)


def test_an_id_reused_with_other_content_is_dead_lettered(worker, bus, tap, settings):
    """An order.cancelled sent under its order.placed's id was dropped as a duplicate, the
    stock staying reserved until expiry: now it is dead-lettered as 'id_reused'."""
    pid, order = uid(), uid("O")
    stock(bus, tap, pid, 10)
    placed = bus.publish("order.placed", {"order_id": order, "lines": lines((pid, 3))})
    tap.results(placed, 1)
    bus.publish(
        "order.placed", {"order_id": order, "lines": lines((pid, 3))}, event_id=placed["id"]
    )  # a duplicate
    cancel = make_event("order.cancelled", {"order_id": order}, event_id=uuid.UUID(placed["id"]))
    bus.publish_raw(
        json.dumps(cancel).encode(),
        "order.cancelled",
        pika.BasicProperties(delivery_mode=2, message_id=placed["id"], content_type="application/json"),
    )
    after = bus.publish("stock.adjusted", {"product_id": pid, "delta": 1})
    tap.results(after, 1)
    deadline = time.monotonic() + 20
    while not (letters := [(p, b) for p, b in bus.dead_letters() if p.message_id == placed["id"]]):
        assert time.monotonic() < deadline, "the reused id was not dead-lettered"
        time.sleep(0.2)
    [(props, body)] = letters
    assert props.headers["x-inventory-error"] == "id_reused"
    assert props.headers["x-original-routing-key"] == "order.cancelled" and json.loads(body) == cancel
    assert figures(settings, pid) == (11, 3)  # still reserved: the publisher must send a new id
    assert [d["type"] for _, _, d in tap.for_event(placed["id"])] == ["inventory.reserved"]


# ==== malformed messages ========================================================================


def test_malformed_messages_go_to_the_dlq_and_the_worker_carries_on(worker, bus, tap, settings):
    limit = settings.worker.max_message_bytes
    valid_cancel = json.dumps(make_event("order.cancelled", {"order_id": "o"})).encode()
    schema = (
        json.dumps(make_event("order.placed", {"order_id": "o", "lines": lines(("A", 1))}))
        .replace('"quantity": 1', '"quantity": 0')
        .encode()
    )
    big = make_event("stock.adjusted", {"product_id": "BIG", "delta": 1})
    big["data"]["reason"] = "x" * limit
    cases = {
        "not-json": (b'{"id": "broken', "order.placed", "body is not JSON"),
        "not-object": (b'["order.placed"]', "order.placed", "body is not a JSON object"),
        "schema": (schema, "order.placed", "data.lines.0.quantity"),
        "wrong-key": (valid_cancel, "order.completed", "does not match routing key 'order.completed'"),
        "oversized": (json.dumps(big).encode(), "stock.adjusted", f"exceeds the limit of {limit}"),
    }
    ids = {}
    for name, (raw, key, _) in cases.items():
        ids[name] = str(uuid.uuid4())
        bus.publish_raw(
            raw,
            key,
            pika.BasicProperties(delivery_mode=2, message_id=ids[name], content_type="application/json"),
        )
    pid = uid()
    after = bus.publish("stock.adjusted", {"product_id": pid, "delta": 1})
    assert tap.results(after, 1) == [adjusted(pid, 1)]

    deadline = time.monotonic() + 20
    while True:
        letters = {p.message_id: (p, body) for p, body in bus.dead_letters() if p.message_id in ids.values()}
        if len(letters) == len(cases):
            break
        assert time.monotonic() < deadline, f"dead letters: {sorted(letters)}"
        time.sleep(0.2)
    for name, (raw, key, reason) in cases.items():
        props, body = letters[ids[name]]
        assert reason in props.headers["x-inventory-error"], (name, props.headers)
        assert props.headers["x-original-routing-key"] == key
        assert body == raw  # kept as it came
        assert props.delivery_mode == 2
    assert figures(settings, "BIG") is None


# ==== HTTP ======================================================================================


def test_http_serves_figures_from_redis_and_falls_back_to_postgresql(worker, served, bus, tap, settings):
    pid = uid()
    stock(bus, tap, pid, 7)
    url = f"{served.base_url}/inventory/{pid}"
    status, headers, raw = http_get(url)
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(raw) == {"product_id": pid, "on_hand": 7, "reserved": 0, "available": 7, "version": 1}

    r = redis_client(settings)
    key = f"{settings.redis.key_prefix}stock:{pid}"
    assert 0 < r.ttl(key) <= settings.redis.cache_ttl_seconds
    # served from Redis: what Redis holds is what the endpoint says
    marker = {"version": 1, "product_id": pid, "on_hand": 99, "reserved": 0, "available": 99}
    r.set(key, json.dumps(marker, separators=(",", ":")))
    assert json.loads(http_get(url)[2]) == marker
    # a miss reads PostgreSQL and refills Redis
    r.delete(key)
    status, _, raw = http_get(url)
    assert status == 200
    assert json.loads(raw) == {"product_id": pid, "on_hand": 7, "reserved": 0, "available": 7, "version": 1}
    assert json.loads(r.get(key)) == {
        "version": 1,
        "product_id": pid,
        "on_hand": 7,
        "reserved": 0,
        "available": 7,
    }
    assert r.ttl(key) > 0


def test_cache_follows_every_change(worker, bus, tap, settings):
    pid = uid()
    stock(bus, tap, pid, 5)
    order = uid("O")
    tap.results(bus.publish("order.placed", {"order_id": order, "lines": lines((pid, 2))}), 1)
    assert json.loads(http_get(f"{worker.base_url}/inventory/{pid}")[2]) == {
        "product_id": pid,
        "on_hand": 5,
        "reserved": 2,
        "available": 3,
        "version": 2,
    }
    tap.results(bus.publish("order.completed", {"order_id": order}), 1)
    assert json.loads(http_get(f"{worker.base_url}/inventory/{pid}")[2]) == {
        "product_id": pid,
        "on_hand": 3,
        "reserved": 0,
        "available": 3,
        "version": 3,
    }


def test_http_errors(served):
    status, _, raw = http_get(f"{served.base_url}/inventory/{uid('NONE')}")
    assert (status, list(json.loads(raw))) == (404, ["error"])
    for bad in ("bad%20id", "x" * 65, "a*b", "", "a/b", "%C3%A4"):
        status, _, raw = http_get(f"{served.base_url}/inventory/{bad}")
        assert status == 400, bad
        assert "error" in json.loads(raw)
    assert http_get(served.base_url + "/no-such-path")[0] == 404
    for path in ("/inventory/SKU-1", "/healthz", "/readyz", "/metrics", "/", "/no-such-path"):
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            status, headers, raw = http_get(served.base_url + path, method=method)
            assert status == 405, (method, path)
            assert "error" in json.loads(raw)
            assert "GET" in headers["Allow"]


def test_health_readiness_and_metrics(worker, served, bus, tap):
    stock(bus, tap, uid(), 1)  # at least one event counted (by the shared worker)
    status, _, raw = http_get(served.base_url + "/healthz")
    assert status == 200
    status, _, raw = http_get(served.base_url + "/readyz")
    assert status == 200, raw
    assert json.loads(raw)["status"] == "ready"
    status, headers, raw = http_get(served.base_url + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert re.search(rb"^inventory_http_requests_total\{", raw, re.M)  # its own processes' metrics
    status, headers, raw = http_get(worker.base_url + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert re.search(rb"^inventory_events_total\{", raw, re.M)
    assert metric_total(worker.base_url, "inventory_events_total") > 0


def test_readyz_names_redis_when_redis_is_unreachable(start_worker, settings):
    s = with_own_queues(settings, uuid.uuid4().hex[:8])
    s = s.model_copy(
        update={"redis": s.redis.model_copy(update={"port": free_port(), "socket_timeout_seconds": 1})}
    )
    w = None
    try:
        w = start_worker(processes=1, wait_ready=False, settings_override=s)
        deadline = time.monotonic() + 40
        while True:  # up and consuming (the consumer declares the queue /readyz looks for)
            try:
                status, _, raw = http_get(w.base_url + "/readyz", timeout=5)
                if w._consumers_attached():
                    break
            except Exception:  # not listening yet, or the queue not declared yet
                pass
            assert w.proc.poll() is None and time.monotonic() < deadline, "worker never came up"
            time.sleep(0.2)
        time.sleep(READY_CACHE_SECONDS + 0.1)  # past the probe's cache of the dependency checks
        status, _, raw = http_get(w.base_url + "/readyz", timeout=5)
        assert status == 503
        body = json.loads(raw)
        assert body["failing"] == ["redis"]
        assert http_get(w.base_url + "/healthz")[0] == 200  # alive, just not ready
    finally:
        if w is not None:
            w.stop()  # before its queues go, or its consumer would declare them again
        delete_topology(s)


def test_results_are_counted_by_outcome(worker, bus, tap):
    pid = uid()
    before = Counter(
        {
            o: metric_total(worker.base_url, "inventory_events_total", type="stock.adjusted", outcome=o)
            for o in ("adjusted", "rejected")
        }
    )
    stock(bus, tap, pid, 1)
    tap.results(bus.publish("stock.adjusted", {"product_id": pid, "delta": -5}), 1)
    wait_metric(
        worker.base_url,
        "inventory_events_total",
        before["adjusted"] + 1,
        type="stock.adjusted",
        outcome="adjusted",
    )
    wait_metric(
        worker.base_url,
        "inventory_events_total",
        before["rejected"] + 1,
        type="stock.adjusted",
        outcome="rejected",
    )
