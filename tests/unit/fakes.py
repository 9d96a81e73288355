"""In-memory fakes of the consumer's ports (inventory_worker/worker/ports.py), to drive its
batch logic in milliseconds: a store with a tiny stock model and scripted failures, a cache, a
broker connection that delivers scripted arrivals, and a publisher that records what it is
given. Every fake writes what happens to one shared journal, so tests can check the order.

The stock rules here are a sketch (adjust, reserve, reject), not PostgreSQL's: the tests of the
rules themselves run against the real procedures (tests/integration/test_procedures.py).
"""

from __future__ import annotations

import copy
import itertools
import json
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from inventory_worker.adapters.postgres import PermanentError, TransientError
from inventory_worker.contract import Figures, Outcome, OutgoingMessage, make_event
from inventory_worker.worker.cache_writer import CacheWriter
from inventory_worker.worker.consumer import Consumer, ConsumerConfig


class FakeClock:
    """time.monotonic that moves only when the fakes wait (idle I/O, sleeps)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += max(seconds, 0.0)


# -- PostgreSQL -------------------------------------------------------------------------------


@dataclass
class ApplyCall:
    at: float
    event_ids: list[str]
    mark_published: list[int]


class FakeStore:
    """A tiny stock model with apply_events()'s shape: one transaction per call (all or
    nothing), idempotent by event id, results in an outbox. Failures are scripted: `refuse`
    (event ids -> PermanentError, like a constraint), `explode` (event id -> any exception,
    like a bug), `transient` (the next n calls raise TransientError, like a deadlock)."""

    def __init__(self, clock: FakeClock, journal: list[str]) -> None:
        self.clock, self.journal = clock, journal
        self.products: dict[str, Figures] = {}
        self.seen: dict[str, tuple[str, dict[str, Any]]] = {}  # event id -> (type, data)
        self.outbox: dict[int, OutgoingMessage] = {}
        self.published: set[int] = set()
        self.attempts: dict[str, int] = {}  # delivery_attempts
        self.calls: list[ApplyCall] = []
        self.refuse: set[str] = set()
        self.explode: dict[str, Exception] = {}
        self.transient = 0
        self.apply_seconds = 0.0  # how long a call takes, on the clock
        self.closed = False
        self._outbox_ids = itertools.count(1)

    def apply_batch(
        self, events: Sequence[dict[str, Any]], mark_published: Sequence[int] = ()
    ) -> list[Outcome]:
        self.calls.append(ApplyCall(self.clock(), [e["id"] for e in events], list(mark_published)))
        self.journal.append("apply")
        self.clock.advance(self.apply_seconds)
        if self.transient:
            self.transient -= 1
            raise TransientError("TransactionRollbackError: deadlock detected")
        for e in events:
            if e["id"] in self.explode:
                raise self.explode[e["id"]]
            if e["id"] in self.refuse:
                raise PermanentError("CheckViolation: new row violates check constraint")
        products, seen, outbox = copy.deepcopy(self.products), dict(self.seen), {}
        results = []
        for e in events:
            out = self._apply_one(e, products, seen)
            for m in out.messages:
                outbox[m.outbox_id] = m
            results.append(out)
        # commit
        self.products, self.seen = products, seen
        self.outbox.update(outbox)
        self.published.update(mark_published)
        return results

    def _apply_one(self, e: dict[str, Any], products: dict[str, Figures], seen: dict[str, Any]) -> Outcome:
        if e["id"] in seen:
            same = seen[e["id"]] == (e["type"], e["data"])
            return Outcome("duplicate" if same else "id_reused")
        seen[e["id"]] = (e["type"], e["data"])
        data = e["data"]
        if e["type"] == "stock.adjusted":
            pid = data["product_id"]
            f = products.setdefault(
                pid, Figures(product_id=pid, on_hand=0, reserved=0, available=0, version=0)
            )
            f["on_hand"] = data["on_hand"] if "on_hand" in data else f["on_hand"] + data["delta"]
            f["available"], f["version"] = f["on_hand"] - f["reserved"], f["version"] + 1
            body = {
                "product_id": pid,
                "on_hand": f["on_hand"],
                "reserved": f["reserved"],
                "available": f["available"],
            }
            return Outcome("adjusted", [self._message(e, "inventory.adjusted", body)], [Figures(**f)])
        if e["type"] == "order.placed":
            lines = data["lines"]
            if all(
                ln["product_id"] in products and products[ln["product_id"]]["available"] >= ln["quantity"]
                for ln in lines
            ):
                moved = []
                for ln in lines:
                    f = products[ln["product_id"]]
                    f["reserved"] += ln["quantity"]
                    f["available"], f["version"] = f["on_hand"] - f["reserved"], f["version"] + 1
                    moved.append(Figures(**f))
                msg = self._message(e, "inventory.reserved", {"order_id": data["order_id"], "lines": lines})
                return Outcome("reserved", [msg], moved, order_id=data["order_id"])
            msg = self._message(
                e, "inventory.rejected", {"order_id": data["order_id"], "reason": "insufficient_stock"}
            )
            return Outcome("rejected", [msg], [], order_id=data["order_id"])
        return Outcome("ignored", detail={"status": "unknown"})

    def _message(self, e: dict[str, Any], routing_key: str, data: dict[str, Any]) -> OutgoingMessage:
        mid = str(uuid.uuid4())
        body = {"id": mid, "type": routing_key, "causation_id": e["id"], "data": data}
        return OutgoingMessage(next(self._outbox_ids), mid, routing_key, body)

    def mark_published(self, outbox_ids: Sequence[int]) -> None:
        self.journal.append("mark_published")
        self.published.update(outbox_ids)

    def note_delivery_attempts(self, event_ids: Sequence[str]) -> dict[str, int]:
        for i in event_ids:
            self.attempts[i] = self.attempts.get(i, 0) + 1
        return {i: self.attempts[i] for i in event_ids}

    def forget_delivery_attempts(self, event_ids: Sequence[str]) -> None:
        for i in event_ids:
            self.attempts.pop(i, None)

    def figures(self, product_ids: Sequence[str]) -> list[Figures]:
        return [Figures(**self.products[p]) for p in product_ids if p in self.products]

    def close(self) -> None:
        self.closed = True


# -- Redis ------------------------------------------------------------------------------------


class FakeCache:
    """Keeps the newest figures per product; `fail_next` scripted failures (Redis down)."""

    def __init__(self, clock: FakeClock, journal: list[str]) -> None:
        self.clock, self.journal = clock, journal
        self.data: dict[str, Figures] = {}
        self.attempts: list[tuple[float, list[str]]] = []  # (when, product ids) of every call
        self.fail_next = 0

    def put_many(self, figures: Iterable[Figures]) -> int:
        items = list(figures)
        self.attempts.append((self.clock(), sorted(f["product_id"] for f in items)))
        self.journal.append("cache")
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionRefusedError("Redis: connection refused")
        written = 0
        for f in items:
            if f["product_id"] not in self.data or self.data[f["product_id"]]["version"] < f["version"]:
                self.data[f["product_id"]] = f
                written += 1
        return written


# -- RabbitMQ ---------------------------------------------------------------------------------


@dataclass
class Method:
    delivery_tag: int
    routing_key: str
    redelivered: bool = False


@dataclass
class Properties:
    message_id: str | None = None
    content_type: str | None = "application/json"
    headers: dict[str, Any] | None = None


@dataclass
class Arrival:
    """One message as the broker hands it over."""

    routing_key: str
    body: bytes
    redelivered: bool = False
    event_id: str | None = None  # the body's id, when it has one


def arrival(
    type_: str, data: dict[str, Any], event_id: str | None = None, redelivered: bool = False
) -> Arrival:
    body = make_event(type_, data, uuid.UUID(event_id) if event_id else None)
    return Arrival(type_, json.dumps(body).encode(), redelivered, body["id"])


class FakeChannel:
    def __init__(self, journal: list[str]) -> None:
        self.journal = journal
        self.acks: list[tuple[int, bool]] = []
        self.callback: Callable[[Any, Any, Any, bytes], None] | None = None
        self.prefetch = 0
        self.cancelled = False

    def basic_qos(self, *, prefetch_count: int) -> None:
        self.prefetch = prefetch_count

    def basic_consume(
        self,
        queue: str,
        on_message_callback: Callable[[Any, Any, Any, bytes], None],
        arguments: dict[str, Any] | None = None,
    ) -> str:
        self.callback = on_message_callback
        return "ctag-1"

    def basic_cancel(self, consumer_tag: str) -> None:
        self.cancelled = True

    def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self.journal.append("ack")
        self.acks.append((delivery_tag, multiple))


class FakeConnection:
    """Hands over one scripted group of arrivals per I/O round; when there are none left, each
    round lets the clock run for its time limit (idle), and after `idle_rounds` of those it
    asks the consumer to stop, as a SIGTERM would."""

    def __init__(
        self, clock: FakeClock, stop: threading.Event, groups: list[list[Arrival]], idle_rounds: int
    ) -> None:
        self.clock, self.stop = clock, stop
        self.groups = list(groups)
        self.idle_rounds = idle_rounds
        self.channel_: FakeChannel | None = None
        self.sleeps: list[float] = []
        self.closed = False
        self._tags = itertools.count(1)

    def channel(self) -> FakeChannel:
        assert self.channel_ is not None
        return self.channel_

    def process_data_events(self, time_limit: float | None = 0) -> None:
        if self.groups:
            ch = self.channel()
            assert ch.callback is not None, "consuming has not started"
            for a in self.groups.pop(0):
                method = Method(next(self._tags), a.routing_key, a.redelivered)
                ch.callback(ch, method, Properties(message_id=a.event_id), a.body)
            return
        self.clock.advance(time_limit or 0)
        self.idle_rounds -= 1
        if self.idle_rounds <= 0:
            self.stop.set()

    def sleep(self, duration: float) -> None:
        self.sleeps.append(duration)
        self.clock.advance(duration)

    def close(self) -> None:
        self.closed = True


@dataclass
class DeadLetter:
    body: bytes
    properties: Any
    routing_key: str
    reason: str


class FakePublisher:
    """Records results sent and dead letters; confirms every result at once unless its outbox
    id is in `nack` (the broker refused it)."""

    def __init__(self, journal: list[str]) -> None:
        self.journal = journal
        self.sent: list[OutgoingMessage] = []
        self.dead_letters: list[DeadLetter] = []
        self.nack: set[int] = set()
        self.drains: list[float | None] = []  # the timeout of each drain()
        self._acked: list[int] = []
        self._refused = 0

    def send_results(self, messages: Sequence[OutgoingMessage], max_in_flight: int | None = None) -> None:
        self.journal.append("send")
        for m in messages:
            self.sent.append(m)
            if m.outbox_id in self.nack:
                self._refused += 1
            else:
                self._acked.append(m.outbox_id)

    def drain(self, timeout: float | None = None) -> None:
        self.drains.append(timeout)

    def take_confirmed(self) -> list[int]:
        acked, self._acked = self._acked, []
        return acked

    def take_refused(self) -> int:
        refused, self._refused = self._refused, 0
        return refused

    def dead_letter(self, body: bytes, properties: Any, routing_key: str, reason: str) -> None:
        self.journal.append("dead_letter")
        self.dead_letters.append(DeadLetter(body, properties, routing_key, reason))


# -- the whole consumer on fakes ------------------------------------------------------------


@dataclass
class Rig:
    groups: list[list[Arrival]]
    batch_size: int = 10
    batch_max_wait_ms: int = 0
    delivery_limit: int = 3
    idle_rounds: int = 3
    shutdown_grace_seconds: float = 25.0
    outbox_relay_min_age_seconds: float = 5.0
    journal: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.clock = FakeClock()
        self.stop = threading.Event()
        self.store = FakeStore(self.clock, self.journal)
        self.cache = FakeCache(self.clock, self.journal)
        self.writer = CacheWriter(self.cache, clock=self.clock)
        self.publisher = FakePublisher(self.journal)
        self.conn = FakeConnection(self.clock, self.stop, self.groups, self.idle_rounds)
        self.channel = FakeChannel(self.journal)
        self.connects = 0
        config = ConsumerConfig(
            queue="orders",
            delivery_limit=self.delivery_limit,
            batch_size=self.batch_size,
            batch_max_wait_ms=self.batch_max_wait_ms,
            shutdown_grace_seconds=self.shutdown_grace_seconds,
            outbox_relay_min_age_seconds=self.outbox_relay_min_age_seconds,
        )
        self.consumer = Consumer(
            config,
            self.stop,
            store=self.store,
            cache=self.writer,
            connect=self._connect,
            open_publisher=lambda conn: self.publisher,
            declare_topology=lambda ch: None,
            clock=self.clock,
        )

    def _connect(self) -> FakeConnection:
        self.connects += 1
        if self.connects > 1:  # the loop failed and reconnected: no test expects that
            self.stop.set()
        self.conn.channel_ = self.channel
        return self.conn

    def run(self) -> Rig:
        """Runs the consumer until the script is played out and it stops."""
        self.consumer.run()
        assert self.connects == 1, "the consumer's loop failed and reconnected (see the log)"
        assert self.store.closed and self.conn.closed
        return self

    def reasons(self) -> dict[str | None, str]:
        """Dead letters: the message id -> the reason."""
        return {
            d.properties.message_id if d.properties else None: d.reason for d in self.publisher.dead_letters
        }
