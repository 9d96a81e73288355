"""Background duties of each consumer process, on their own connections:

- the outbox relay: publishes result events whose process died between commit and confirm
  (rows older than `outbox_relay_min_age_seconds`), with their original message ids. Every
  process runs it; `FOR UPDATE SKIP LOCKED` keeps two relays off the same rows.
- the expiry sweeper: releases reservations past their deadline. Exactly one sweeper is active
  in the whole cluster: the process holding a PostgreSQL session advisory lock. The lock dies
  with its connection, so when the holder dies another process takes over at its next tick.
  Server-side TCP keepalives on that session bound how long a vanished host keeps the lock.
  A backlog is drained in back-to-back batches of `sweep_batch_size`, one short transaction
  each, so order transactions get the product locks between batches. The same process then
  re-caches the products with a level at a location whose `active` or `fulfils_orders` flipped
  (their `available` changed with no stock change), in batches of the same size. After each sweep it
  also runs a backorder fill pass (products with open backorders and `available`, up to
  `sweep_batch_size` of them, taken round-robin from pass to pass).
- the gauges (one process per worker, `measure=True`): outbox backlog, active reservations
  (and those held until fulfilled), backordered units and DLQ depth, every
  `worker.metrics_interval_seconds`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from inventory_worker import metrics
from inventory_worker.adapters import rabbitmq
from inventory_worker.adapters.postgres import Store, TransientError
from inventory_worker.adapters.redis_cache import StockCache
from inventory_worker.config import RabbitMQSettings
from inventory_worker.logs import get_logger

log = get_logger(__name__)

# What a tick may fail with and retry after (a tuple made once: mypy cannot read one unpacked in `except`).
_RETRIED: tuple[type[BaseException], ...] = (TransientError, *rabbitmq.CONNECTION_ERRORS)


@dataclass(frozen=True)
class Schedule:
    """The worker settings the duties run by (`worker.*` of the same names)."""

    sweep_interval_seconds: float
    sweep_batch_size: int
    outbox_relay_interval_seconds: float
    outbox_relay_min_age_seconds: float
    metrics_interval_seconds: float
    backorder_fill_batch: int = 100


class Maintenance(threading.Thread):
    """The duties, on their own store, cache and RabbitMQ connection (made by `connect`, again
    after it breaks); the thread closes the store and the connection when it ends."""

    def __init__(
        self,
        store: Store,
        cache: StockCache,
        connect: Callable[[], Any],
        amqp_settings: RabbitMQSettings,
        schedule: Schedule,
        stop: threading.Event | Any,
        measure: bool = False,
    ) -> None:
        super().__init__(name="maintenance", daemon=True)
        self.store = store
        self.cache = cache
        self.connect = connect
        self.amqp_settings = amqp_settings
        self.schedule = schedule
        self.stop = stop
        self.measure = measure
        self._next_measure = 0.0
        self._fill_cursor = ""  # where the next backorder fill pass starts (fill_backorder_pass())
        self._amqp: Any = None
        self._publisher: rabbitmq.Publisher | None = None

    def run(self) -> None:
        interval = min(self.schedule.sweep_interval_seconds, self.schedule.outbox_relay_interval_seconds)
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                self.tick()
            except _RETRIED as exc:
                log.warning("maintenance tick failed; will retry", error=repr(exc))
                self._drop_amqp()
            except Exception:
                log.exception("maintenance tick crashed; will retry")
                self._drop_amqp()
            self.stop.wait(max(0.0, interval - (time.monotonic() - started)))
        self._drop_amqp()
        self.store.close()

    def tick(self) -> None:
        if self._amqp is not None and self._amqp.is_open:
            self._amqp.process_data_events(time_limit=0)  # keep heartbeats flowing while idle
        self._sweep()
        self._fill_backorders()
        self._relay()
        if self.measure and time.monotonic() >= self._next_measure:
            self._next_measure = time.monotonic() + self.schedule.metrics_interval_seconds
            self._measure()

    # -- gauges -----------------------------------------------------------------------------

    def _measure(self) -> None:
        f = self.store.operational_figures()
        metrics.OUTBOX_BACKLOG.set(f["outbox_backlog"])
        metrics.OUTBOX_OLDEST_AGE.set(f["outbox_oldest_age_seconds"])
        metrics.ACTIVE_RESERVATIONS.set(f["active_reservations"])
        metrics.HOLDS_UNTIL_FULFILLED.set(f["holds_until_fulfilled"])
        metrics.BACKORDERED_UNITS.set(f["backordered_units"])
        self._publisher_ready()  # the connection we publish on also answers the depth
        channel = self._amqp.channel()
        try:
            q = channel.queue_declare(self.amqp_settings.dead_letter_queue, passive=True)
            metrics.DLQ_DEPTH.set(q.method.message_count)
        finally:
            if channel.is_open:
                channel.close()

    # -- expiry -----------------------------------------------------------------------------

    def _try_lead(self) -> bool:
        if self.store.is_leader:
            return True
        got = self.store.try_lead()
        if got:
            log.info("expiry sweeper active in this process", pid=os.getpid())
        return got

    def _sweep(self) -> None:
        if not self._try_lead():
            return
        self._expire()
        self._recache()

    def _expire(self) -> None:
        limit = self.schedule.sweep_batch_size
        while not self.stop.is_set():
            started = time.monotonic()
            count, candidates, messages, figures = self.store.expire_reservations(limit)
            if count == 0:
                return  # nothing due, or all of it in other transactions' hands: next tick
            committed = time.monotonic()
            metrics.EXPIRED.inc(count)
            try:
                self.cache.put_many(figures)
            except Exception as exc:  # the cache is only a cache; TTL bounds staleness
                metrics.CACHE_WRITE_ERRORS.inc()
                log.warning("cache write failed after expiry", error=repr(exc))
            self._publish_now(messages)
            log.info(
                "reservations expired",
                count=count,
                more_due=candidates == limit,
                transaction_ms=round((committed - started) * 1000, 1),
                publish_ms=round((time.monotonic() - committed) * 1000, 1),
            )
            if candidates < limit:
                return  # the backlog is drained

    def _recache(self) -> None:
        while not self.stop.is_set():
            count, more, messages, figures = self.store.recache_locations(self.schedule.sweep_batch_size)
            if count == 0 and not messages:
                return  # nothing flipped, or the flip's row is in a consumer's hands: next tick
            self._cache_and_publish(figures, messages, "re-cache after a location flip")
            log.info("products re-cached after a location flip", count=count, more_due=more)
            if not more:
                return

    # -- backorders -------------------------------------------------------------------------

    def _fill_backorders(self) -> None:
        """The elected sweeper's fill pass (spec 4.3): open backorders of products that have
        `available` again (stock freed by expiry, a fill an event could not finish, a location
        activated), one short transaction per pass, then the cache and the messages. Each
        pass starts after the last product the previous one visited, so products that stay
        candidates without being filled cannot keep later ones out. Passes follow one another
        while they fill something, for at most one sweep interval: a receipt for thousands of
        preorders is filled at the database's pace, not `backorder_fill_batch` a tick."""
        if not self.store.is_leader:
            return
        deadline = time.monotonic() + self.schedule.sweep_interval_seconds
        while not self.stop.is_set():
            filled, messages, figures, self._fill_cursor = self.store.fill_backorders(
                self.schedule.sweep_batch_size, self.schedule.backorder_fill_batch, self._fill_cursor
            )
            if filled == 0:
                return
            self._cache_and_publish(figures, messages, "backorder fill")
            log.info("backorders filled", orders=filled)
            if time.monotonic() >= deadline:
                return  # the rest next tick: expiry and the relay get their turn

    def _cache_and_publish(self, figures: list[Any], messages: list[Any], what: str) -> None:
        try:
            self.cache.put_many(figures)
        except Exception as exc:  # the cache is only a cache; TTL bounds staleness
            metrics.CACHE_WRITE_ERRORS.inc()
            log.warning(f"cache write failed after {what}", error=repr(exc))
        self._publish_now(messages)

    # -- outbox -----------------------------------------------------------------------------

    def _relay(self) -> None:
        while not self.stop.is_set():
            with self.store.claim_unpublished(self.schedule.outbox_relay_min_age_seconds, 500) as rows:
                if not rows:
                    return
                started = time.monotonic()
                self._publisher_ready().publish_all(rows)  # all confirmed, or rolled back
                metrics.PUBLISH_SECONDS.observe(time.monotonic() - started)
                metrics.RESULTS_PUBLISHED.labels("relay").inc(len(rows))
                log.info("outbox relay published", count=len(rows))
            if len(rows) < 500:
                return

    def _publish_now(self, messages: list[Any]) -> None:
        """Publishes freshly committed results; on failure the relay picks them up later."""
        if not messages:
            return
        started = time.monotonic()
        try:
            confirmed = self._publisher_ready().publish_results(messages)
            metrics.PUBLISH_SECONDS.observe(time.monotonic() - started)
        except rabbitmq.CONNECTION_ERRORS as exc:
            log.warning("publish failed; the relay will retry", error=repr(exc))
            self._drop_amqp()
            return
        metrics.RESULTS_PUBLISHED.labels("direct").inc(len(confirmed))
        self.store.mark_published(confirmed)

    def _publisher_ready(self) -> rabbitmq.Publisher:
        if self._publisher is None or self._amqp is None or not self._amqp.is_open:
            self._drop_amqp()
            self._amqp = self.connect()
            self._publisher = rabbitmq.Publisher(self._amqp.channel(), self.amqp_settings)
        else:
            self._amqp.process_data_events(time_limit=0)  # service heartbeats
        return self._publisher

    def _drop_amqp(self) -> None:
        if self._amqp is not None:
            try:
                self._amqp.close()
            except Exception:  # already broken
                pass
        self._amqp = None
        self._publisher = None
