"""The AMQP loop of one consumer process: receive a batch, apply it, ack it, publish results.

For each batch, in this order:
  1. parse every body; one that breaks the contract goes to the DLQ with the reason;
  2. apply the valid events in ONE PostgreSQL transaction (stored procedures; idempotent);
  3. write the new figures to Redis (version-checked);
  4. ack the whole batch with one `multiple=True` ack: only after the commit (queued, it goes
     out in the same write as the results);
  5. send the batch's result events without waiting for their confirms (pipelined); the
     confirms are collected as they come, and the outbox rows of the confirmed results are
     marked published in the next batch's transaction (alone, if none comes within a
     second). Nacked or unconfirmed ones stay for the outbox relay;
  6. log one line per event (rendered and written together) and count them.
A crash anywhere leaves either an unacked message (redelivered, absorbed by the idempotency
table) or an unpublished outbox row (published later by the relay with the same id).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import tenacity

from inventory_worker import metrics
from inventory_worker.adapters.postgres import PermanentError, TransientError
from inventory_worker.adapters.rabbitmq import CONNECTION_ERRORS
from inventory_worker.config import Settings
from inventory_worker.contract import (
    INPUT_TYPES,
    Event,
    Figures,
    InvalidMessage,
    Outcome,
    OutgoingMessage,
    parse_event,
)
from inventory_worker.cpus import usable_cpus
from inventory_worker.dependencies import Failure
from inventory_worker.heartbeats import ConsumerSlot
from inventory_worker.logs import get_logger, info_lines, lines_together
from inventory_worker.worker.cache_writer import CacheWriter
from inventory_worker.worker.ports import AmqpChannel, AmqpConnection, EventStore, ResultPublisher, Stop

log = get_logger(__name__)

# apply_events' outcome for a message id seen before with another type or data; also the
# dead letter's reason.
ID_REUSED = "id_reused"

# Confirmed results are marked published in the next batch's transaction; only marks this old
# get a transaction of their own (when the consumer is idle). Marked at the first idle moment,
# they cost a transaction and a WAL flush after many batches below full load, where a consumer
# is idle between most of them. At most half of outbox_relay_min_age_seconds (5 s by default),
# so that the relay does not take these rows and publish them a second time.
MARK_ALONE_AFTER_SECONDS = 1.0


@dataclass
class Delivery:
    method: Any
    properties: Any
    body: bytes
    received: float

    @property
    def tag(self) -> int:
        tag: int = self.method.delivery_tag
        return tag


@dataclass(frozen=True)
class ConsumerConfig:
    """The settings the consumer's loop reads."""

    queue: str
    delivery_limit: int  # attempts at applying a redelivered message before it is dead-lettered
    batch_size: int = 100
    batch_max_wait_ms: int = 5
    max_message_bytes: int = 1_048_576
    round_robin_processes: int | None = None  # None: all share the input (from_settings: one per CPU)
    shutdown_grace_seconds: float = 25.0  # the supervisor kills a child still running after it
    outbox_relay_min_age_seconds: float = 5.0  # unmarked rows older than this are the relay's

    @classmethod
    def from_settings(cls, settings: Settings) -> ConsumerConfig:
        w = settings.worker
        return cls(
            queue=settings.rabbitmq.queue,
            delivery_limit=settings.rabbitmq.delivery_limit,
            batch_size=w.batch_size,
            batch_max_wait_ms=w.batch_max_wait_ms,
            max_message_bytes=w.max_message_bytes,
            round_robin_processes=w.round_robin_processes or usable_cpus(),
            shutdown_grace_seconds=w.shutdown_grace_seconds,
            outbox_relay_min_age_seconds=w.outbox_relay_min_age_seconds,
        )


class Stopping(Exception):
    """Shutdown was asked for while waiting to retry; the batch stays unacked (redelivered)."""


class Unexpected(PermanentError):
    """An exception nobody foresaw while applying one message: that message is dead-lettered
    with it as the reason, rather than the process dying and the message coming back."""


# Raised while applying, but no fault of the messages: the loop handles them.
_NOT_THIS_MESSAGE: tuple[type[BaseException], ...] = (Stopping, *CONNECTION_ERRORS)


def backoff_retrying(
    stop: threading.Event | Any, sleep: Callable[[float], None], dependency: str, what: str
) -> tenacity.Retrying:
    """Retry TransientError with exponential backoff and jitter until it works or we stop."""

    def _before_sleep(state: tenacity.RetryCallState) -> None:
        metrics.RETRIES.labels(dependency).inc()
        exc = state.outcome.exception() if state.outcome else None
        log.warning(
            "retrying",
            dependency=dependency,
            what=what,
            attempt=state.attempt_number,
            error=str(exc),
            wait_seconds=round(state.next_action.sleep, 3) if state.next_action else None,
        )

    def _sleep(seconds: float) -> None:
        if stop.is_set():
            raise Stopping()
        sleep(seconds)

    return tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(TransientError),
        # 50 ms doubling to 5 s, plus up to 250 ms of jitter so processes that failed together
        # do not retry together.
        wait=tenacity.wait_exponential(multiplier=0.05, max=5.0) + tenacity.wait_random(0, 0.25),
        # Never give up by itself: once stopping, _sleep raises Stopping (with reraise=True a
        # stop condition here would re-raise the TransientError and crash the consumer).
        stop=tenacity.stop_never,
        sleep=_sleep,
        before_sleep=_before_sleep,
        reraise=True,
    )


class Consumer:
    """One consumer process's loop; its collaborators come in (bootstrap.consumer() puts
    the real ones together, the unit tests in-memory fakes)."""

    def __init__(
        self,
        config: ConsumerConfig,
        stop: Stop,
        *,
        store: EventStore,
        cache: CacheWriter,
        connect: Callable[[], AmqpConnection],
        open_publisher: Callable[[AmqpConnection], ResultPublisher],
        declare_topology: Callable[[AmqpChannel], None],
        open_channel: Callable[[AmqpConnection], AmqpChannel] = lambda conn: conn.channel(),
        slot: ConsumerSlot | None = None,
        describe: Callable[[BaseException], Failure | None] = lambda exc: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.stop = stop
        self.slot = slot or ConsumerSlot(None, 0)  # heartbeat and attachment, read by /healthz, /readyz
        self.store = store
        self.cache = cache
        self.connect = connect
        self.open_publisher = open_publisher
        self.open_channel = open_channel
        self.declare_topology = declare_topology
        self.describe = describe  # which dependency failed, for the reconnect log line
        self.clock = clock
        self._to_mark: list[int] = []  # confirmed outbox ids not yet marked published
        self._to_mark_since = 0.0  # when the oldest of them was confirmed
        self._mark_alone_after = min(MARK_ALONE_AFTER_SECONDS, config.outbox_relay_min_age_seconds / 2)
        self._attached = False
        # Result events sent and not yet confirmed, at most; past that, publishing waits.
        self._max_in_flight = max(10 * config.batch_size, 1000)

    @property
    def attached(self) -> bool:
        return self._attached

    @attached.setter
    def attached(self, value: bool) -> None:
        self._attached = value
        self.slot.set_attached(value)

    def _sleep(self, conn: AmqpConnection, seconds: float) -> None:
        """Waits between retries, still beating: waiting for a dependency is not being stuck."""
        deadline = self.clock() + seconds
        while (left := deadline - self.clock()) > 0 and not self.stop.is_set():
            self.slot.beat()
            conn.sleep(min(left, 1.0))

    # -- outer loop: (re)connect with backoff -----------------------------------------------

    def run(self) -> None:
        delay = 0.1
        while not self.stop.is_set():
            self.slot.beat()
            try:
                self._consume()
                delay = 0.1
            except Stopping:
                break
            except CONNECTION_ERRORS as exc:
                self.attached = False
                metrics.RETRIES.labels("rabbitmq").inc()
                failure = self.describe(exc)
                log.warning(
                    "rabbitmq connection lost; reconnecting",
                    error=repr(exc),
                    wait_seconds=delay,
                    **(failure.fields() if failure else {}),
                )
                self.stop.wait(delay)
                self.slot.beat()
                delay = min(delay * 2, 5.0)
            except Exception as exc:
                # A bug outside the handling of any one message. Dying would hand every
                # prefetched message to the next consumer, to the same end; instead start
                # afresh: what was not acked comes back marked redelivered and is applied one
                # by one, where a message that fails is dead-lettered on its own (_handle).
                self.attached = False
                log.exception("consumer failed; reconnecting", error=repr(exc), wait_seconds=delay)
                self.stop.wait(delay)
                self.slot.beat()
                delay = min(delay * 2, 5.0)
        self._flush_marks(final=True)
        self.store.close()

    def _consume(self) -> None:
        w = self.config
        conn = self.connect()
        try:
            channel = self.open_channel(conn)
            self.declare_topology(channel)
            channel.basic_qos(prefetch_count=max(2 * w.batch_size, 10))
            publisher = self.open_publisher(conn)
            buffer: list[Delivery] = []

            def on_message(_ch: Any, method: Any, properties: Any, body: bytes) -> None:
                buffer.append(Delivery(method, properties, body, self.clock()))

            # Processes beyond the first `round_robin_processes` take input only while those
            # have full prefetch windows (RabbitMQ consumer priorities): below full load fewer
            # processes take bigger batches instead of all of them small ones.
            priority = -(self.slot.slot // w.round_robin_processes) if w.round_robin_processes else 0
            consumer_tag = channel.basic_consume(
                w.queue, on_message_callback=on_message, arguments={"x-priority": priority}
            )
            self.attached = True
            log.info("consuming", queue=w.queue, batch_size=w.batch_size)
            max_wait = w.batch_max_wait_ms / 1000.0
            busy = False  # the last pass handled a batch
            while not self.stop.is_set():
                self.slot.beat()
                conn.process_data_events(time_limit=0 if buffer or busy else 0.2)
                self._collect_confirms(publisher)
                if not buffer:
                    busy = False
                    self._idle()
                    continue
                # Input after an idle moment waits a little for more to share its transaction.
                # Input that came while a batch was being handled has waited already: a batch
                # formed that way is applied at once (waiting again only added latency).
                if not busy:
                    deadline = buffer[0].received + max_wait
                    while len(buffer) < w.batch_size and (remaining := deadline - self.clock()) > 0:
                        conn.process_data_events(time_limit=remaining)
                batch = buffer[: w.batch_size]
                del buffer[: w.batch_size]
                self._handle(conn, channel, publisher, batch)
                busy = True
            # Graceful stop: no new deliveries; finish what we already hold, for at most half
            # the grace period. What is left then is safe to leave (unacked messages go back to
            # the queue when the connection closes, unconfirmed results stay in the outbox for
            # the relay); the other half covers closing, and a batch that was in hand.
            stopping = self.clock()
            give_up_at = stopping + w.shutdown_grace_seconds / 2
            channel.basic_cancel(consumer_tag)
            self.attached = False
            finished = 0
            while buffer and self.clock() < give_up_at:
                batch = buffer[: w.batch_size]
                del buffer[: w.batch_size]
                self._handle(conn, channel, publisher, batch)
                finished += len(batch)
            if buffer:
                log.warning("stopping with messages unhandled; they go back to the queue", count=len(buffer))
                buffer.clear()
            publisher.drain(timeout=max(0.0, give_up_at - self.clock()))
            self._collect_confirms(publisher)
            self._flush_marks(final=True)
            # How long a stop takes, and on what: what the grace period must cover.
            log.info(
                "stopped consuming", finished_messages=finished, seconds=round(self.clock() - stopping, 2)
            )
        finally:
            self.attached = False
            try:
                conn.close()
            except Exception:  # already closed or broken: nothing more to do
                pass

    # -- one batch --------------------------------------------------------------------------

    def _handle(
        self, conn: AmqpConnection, channel: AmqpChannel, publisher: ResultPublisher, batch: list[Delivery]
    ) -> None:
        max_bytes = self.config.max_message_bytes
        valid: list[tuple[Delivery, Event]] = []
        for d in batch:
            try:
                valid.append((d, parse_event(d.body, d.method.routing_key, max_bytes)))
            except InvalidMessage as exc:
                self._dead_letter(publisher, d, str(exc), "invalid")
            except Exception as exc:  # a bug in parsing must not cost more than this message
                self._dead_letter(publisher, d, f"unexpected error: {exc!r}", "error")
        if not valid:
            channel.basic_ack(batch[-1].tag, multiple=True)
            return
        # After a crash every unacked message comes back: apply those one by one, so that a
        # message that kills its worker cannot drag innocent ones to the delivery limit.
        if any(d.method.redelivered for d, _ in valid):
            done_upto = 0
            noted: list[str] = []
            for item in valid:
                if item[0].method.redelivered:
                    noted.append(str(item[1].id))
                    if self._too_many_attempts(conn, publisher, item):
                        channel.basic_ack(item[0].tag, multiple=True)
                        done_upto = item[0].tag
                        continue
                self._apply_and_ack(conn, channel, publisher, [item], ack_tag=item[0].tag)
                done_upto = item[0].tag
            if batch[-1].tag > done_upto:  # trailing dead-lettered messages
                channel.basic_ack(batch[-1].tag, multiple=True)
            try:
                self.store.forget_delivery_attempts(noted)
            except TransientError:  # harmless: old counts are pruned
                pass
            return
        self._apply_and_ack(conn, channel, publisher, valid, ack_tag=batch[-1].tag)

    def _apply_and_ack(
        self,
        conn: AmqpConnection,
        channel: AmqpChannel,
        publisher: ResultPublisher,
        items: list[tuple[Delivery, Event]],
        ack_tag: int,
    ) -> None:
        started = self.clock()
        results = self._apply(conn, items)
        applied = self.clock()
        products: dict[str, Figures] = {}
        outgoing: list[OutgoingMessage] = []
        for (d, _), res in zip(items, results, strict=True):
            if isinstance(res, Unexpected):
                self._dead_letter(publisher, d, f"unexpected error: {res}", "error")
                continue
            if isinstance(res, PermanentError):
                self._dead_letter(publisher, d, f"refused by the database: {res}", "refused")
                continue
            if res.outcome == ID_REUSED:  # the publisher's bug, to be seen: not a duplicate
                self._dead_letter(publisher, d, ID_REUSED, ID_REUSED)
                continue
            for f in res.products:
                products[f["product_id"]] = f  # later events in the batch carry newer versions
            outgoing.extend(res.messages)
        self.cache.write(list(products.values()))
        channel.basic_ack(ack_tag, multiple=True)
        now = self.clock()
        self._publish(publisher, outgoing)  # before the bookkeeping below: results go out sooner
        counts: Counter[tuple[str, str]] = Counter()
        with lines_together():
            self._log_handled(items, results, now, counts)
        for (type_, outcome), n in counts.items():  # one update per kind, not per event
            metrics.EVENTS.labels(type_, outcome).inc(n)
        metrics.BATCH_SIZE.observe(len(items))
        metrics.BATCH_WAIT_SECONDS.observe(started - items[0][0].received)
        metrics.BATCH_APPLY_SECONDS.observe(applied - started)
        metrics.GC_PAUSES.flush()

    def _log_handled(
        self,
        items: list[tuple[Delivery, Event]],
        results: list[Outcome | PermanentError],
        now: float,
        counts: Counter[tuple[str, str]],
    ) -> None:
        waited: list[float] = []
        lines: list[dict[str, Any]] = []
        for (d, ev), res in zip(items, results, strict=True):
            if isinstance(res, Outcome) and res.outcome != ID_REUSED:
                counts[ev.type, res.outcome] += 1
                waited.append(now - d.received)
                line = {
                    "event_id": str(ev.id),
                    "type": ev.type,
                    "order_id": ev.data.get("order_id"),
                    "product_id": ev.data.get("product_id"),
                    "outcome": res.outcome,
                    "results": [m.routing_key for m in res.messages],
                    "duration_ms": round((now - d.received) * 1000, 2),
                }
                if "status" in res.detail:
                    line["status"] = res.detail["status"]
                lines.append(line)
        info_lines(log, "event handled", lines)
        metrics.observe_many(metrics.EVENT_SECONDS, waited)  # one write per bucket, not two per event

    def _too_many_attempts(
        self, conn: AmqpConnection, publisher: ResultPublisher, item: tuple[Delivery, Event]
    ) -> bool:
        """Notes one more attempt to apply a redelivered message; dead-letters it past the limit.

        The count lives in PostgreSQL and grows only when the worker starts applying the
        message, so only a message whose application keeps being cut short (it kills its
        worker) reaches the limit. RabbitMQ's own delivery count also grows at every lost
        connection, which dead-lettered valid events when the broker flapped during an outage.
        """
        d, ev = item
        for attempt in backoff_retrying(self.stop, conn.sleep, "postgresql", "note delivery attempt"):
            with attempt:
                attempts = self.store.note_delivery_attempts([str(ev.id)])[str(ev.id)]
        limit = self.config.delivery_limit
        if attempts <= limit:
            return False
        self._dead_letter(
            publisher,
            d,
            f"applying it was interrupted {attempts} times (delivery limit {limit}): "
            "it may be stopping the worker",
            "delivery_limit",
        )
        return True

    def _apply(
        self, conn: AmqpConnection, items: list[tuple[Delivery, Event]]
    ) -> list[Outcome | PermanentError]:
        """Applies items in one transaction; isolates the ones the database refuses."""
        events = [ev.for_store() for _, ev in items]
        try:
            outcomes: list[Outcome | PermanentError] = list(self._retrying_apply(conn, events))
            return outcomes
        except PermanentError as exc:
            if len(items) == 1:
                return [exc]
        except _NOT_THIS_MESSAGE:
            raise
        except Exception as exc:  # not the database refusing: a bug, or data nobody foresaw
            log.exception("unexpected error applying events", error=repr(exc), events=len(items))
            if len(items) == 1:
                return [Unexpected(repr(exc))]
        # One bad event spoils its batch: apply them one at a time to find it.
        return [r for item in items for r in self._apply(conn, [item])]

    def _retrying_apply(self, conn: AmqpConnection, events: Sequence[dict[str, Any]]) -> list[Outcome]:
        for attempt in backoff_retrying(
            self.stop, lambda s: self._sleep(conn, s), "postgresql", "apply batch"
        ):
            with attempt:
                marks = list(self._to_mark)
                results = self.store.apply_batch(events, mark_published=marks)
                del self._to_mark[: len(marks)]
                return results
        raise AssertionError("unreachable")

    # -- after the commit -------------------------------------------------------------------

    def _publish(self, publisher: ResultPublisher, messages: list[OutgoingMessage]) -> None:
        if messages:
            started = time.monotonic()
            # Not waiting for the confirms: the next batch is applied while the broker writes
            # these. Confirmed ones are marked published (in the next batch's transaction); the
            # rest (nacked, unconfirmed, or lost with the connection) stay unpublished in the
            # outbox, and the relay publishes them, with the same ids.
            publisher.send_results(messages, max_in_flight=self._max_in_flight)
            metrics.PUBLISH_SECONDS.observe(time.monotonic() - started)
        self._collect_confirms(publisher)

    def _collect_confirms(self, publisher: ResultPublisher) -> None:
        confirmed = publisher.take_confirmed()
        if confirmed:
            metrics.RESULTS_PUBLISHED.labels("direct").inc(len(confirmed))
            if not self._to_mark:
                self._to_mark_since = self.clock()
            self._to_mark.extend(confirmed)
        if refused := publisher.take_refused():
            log.warning("results not confirmed; the outbox relay will publish them", count=refused)

    def _dead_letter(self, publisher: ResultPublisher, d: Delivery, reason: str, kind: str) -> None:
        try:
            publisher.dead_letter(d.body, d.properties, d.method.routing_key, reason)
        except CONNECTION_ERRORS:
            raise
        except Exception as exc:  # its properties cannot be sent again: dead-letter it without them
            log.exception("dead-lettering with the original properties failed", error=repr(exc))
            publisher.dead_letter(
                d.body, None, d.method.routing_key, f"{reason} (original properties dropped: {exc!r})"
            )
        metrics.DEAD_LETTERED.labels(kind).inc()
        metrics.EVENTS.labels(
            d.method.routing_key if d.method.routing_key in INPUT_TYPES else "unknown", "dead_lettered"
        ).inc()
        log.warning(
            "message dead-lettered",
            reason=reason,
            routing_key=d.method.routing_key,
            message_id=getattr(d.properties, "message_id", None),
            outcome="dead_lettered",
        )

    def _idle(self) -> None:
        metrics.GC_PAUSES.flush()
        self._flush_marks()
        self.cache.refill(self.store.figures)

    def _flush_marks(self, final: bool = False) -> None:
        """Marks the confirmed results published in a transaction of their own: on the way
        out, or when they have waited MARK_ALONE_AFTER_SECONDS (or half the relay's minimum age,
        if less) for a batch to go with."""
        if not self._to_mark:
            return
        if not final and self.clock() - self._to_mark_since < self._mark_alone_after:
            return
        marks = list(self._to_mark)
        try:
            self.store.mark_published(marks)
            del self._to_mark[: len(marks)]
        except TransientError as exc:
            # Unmarked rows are merely published again by the relay (same id): harmless.
            if final:
                log.warning("could not mark results published", error=str(exc), count=len(marks))
