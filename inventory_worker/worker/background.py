"""Background duties of each consumer process, on their own connections:

- the outbox relay: publishes result events whose process died between commit and confirm
  (rows older than `outbox_relay_min_age_seconds`), with their original message ids. Every
  process runs it; `FOR UPDATE SKIP LOCKED` keeps two relays off the same rows.
- the expiry sweeper: releases reservations past their deadline. Exactly one sweeper is active
  in the whole cluster: the process holding a PostgreSQL session advisory lock. The lock dies
  with its connection, so when the holder dies another process takes over at its next tick.
  Server-side TCP keepalives on that session bound how long a vanished host keeps the lock.
  A backlog is drained in back-to-back batches of `sweep_batch_size`, one short transaction
  each, so order transactions get the product locks between batches.
- the gauges (one process per worker, `measure=True`): outbox backlog, active reservations
  and DLQ depth, every `worker.metrics_interval_seconds`.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

from inventory_worker import metrics

from inventory_worker.adapters import rabbitmq
from inventory_worker.adapters.redis_cache import StockCache
from inventory_worker.config import Settings
from inventory_worker.logs import get_logger
from inventory_worker.adapters.postgres import SWEEPER_LOCK_KEY, Store, TransientError, one_row

log = get_logger(__name__)

# What a tick may fail with and retry after (a tuple made once: mypy cannot read one unpacked in `except`).
_RETRIED: tuple[type[BaseException], ...] = (TransientError, *rabbitmq.CONNECTION_ERRORS)


class Maintenance(threading.Thread):
    def __init__(self, settings: Settings, stop: threading.Event | Any, sweeper: bool = True,
                 measure: bool = False) -> None:
        super().__init__(name="maintenance", daemon=True)
        self.settings = settings
        self.stop = stop
        self.sweeper_enabled = sweeper
        self.measure = measure
        self._next_measure = 0.0
        self.store = Store(settings.database, settings.worker.default_reservation_ttl_seconds)
        self.cache = StockCache(settings.redis)
        self._conn: Any = None
        self._publisher: rabbitmq.Publisher | None = None
        self._leader_conn: Any = None  # the PostgreSQL connection our advisory lock lives on

    @property
    def is_sweeper(self) -> bool:
        conn = self.store._conn
        return conn is not None and not conn.closed and conn is self._leader_conn

    def run(self) -> None:
        w = self.settings.worker
        interval = min(w.sweep_interval_seconds, w.outbox_relay_interval_seconds)
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
        if self._conn is not None and self._conn.is_open:
            self._conn.process_data_events(time_limit=0)  # keep heartbeats flowing while idle
        if self.sweeper_enabled:
            self._sweep()
        self._relay()
        if self.measure and time.monotonic() >= self._next_measure:
            self._next_measure = time.monotonic() + self.settings.worker.metrics_interval_seconds
            self._measure()

    # -- gauges -----------------------------------------------------------------------------

    def _measure(self) -> None:
        f = self.store.operational_figures()
        metrics.OUTBOX_BACKLOG.set(f["outbox_backlog"])
        metrics.OUTBOX_OLDEST_AGE.set(f["outbox_oldest_age_seconds"])
        metrics.ACTIVE_RESERVATIONS.set(f["active_reservations"])
        self._publisher_ready()  # the connection we publish on also answers the depth
        channel = self._conn.channel()
        try:
            q = channel.queue_declare(self.settings.rabbitmq.dead_letter_queue, passive=True)
            metrics.DLQ_DEPTH.set(q.method.message_count)
        finally:
            if channel.is_open:
                channel.close()

    # -- expiry -----------------------------------------------------------------------------

    def _try_lead(self) -> bool:
        if self.is_sweeper:
            return True
        with self.store.transaction() as cur:
            cur.execute("SELECT pg_try_advisory_lock(%s)", (SWEEPER_LOCK_KEY,))
            got: bool = one_row(cur)[0]
            if got:
                # Session settings, kept after commit: operators (and tests) find the holder in
                # pg_stat_activity; if its host vanishes without closing the socket, the server
                # drops the session, and with it the lock, after about 5 + 2 * 3 seconds.
                cur.execute(
                    "SELECT set_config('application_name', %s, false),"
                    "       set_config('tcp_keepalives_idle', '5', false),"
                    "       set_config('tcp_keepalives_interval', '2', false),"
                    "       set_config('tcp_keepalives_count', '3', false),"
                    "       set_config('tcp_user_timeout', '10000', false)",
                    (f"inventory-worker sweeper {socket.gethostname()} pid={os.getpid()}"[:63],),
                )
        if got:
            self._leader_conn = self.store._conn
            log.info("expiry sweeper active in this process", pid=os.getpid())
        return got

    def _sweep(self) -> None:
        if not self._try_lead():
            return
        limit = self.settings.worker.sweep_batch_size
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
            log.info("reservations expired", count=count, more_due=candidates == limit,
                     transaction_ms=round((committed - started) * 1000, 1),
                     publish_ms=round((time.monotonic() - committed) * 1000, 1))
            if candidates < limit:
                return  # the backlog is drained

    # -- outbox -----------------------------------------------------------------------------

    def _relay(self) -> None:
        w = self.settings.worker
        while not self.stop.is_set():
            with self.store.claim_unpublished(w.outbox_relay_min_age_seconds, 500) as rows:
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
        if self._publisher is None or self._conn is None or not self._conn.is_open:
            self._drop_amqp()
            self._conn = rabbitmq.connect(self.settings.rabbitmq)
            self._publisher = rabbitmq.Publisher(self._conn.channel(), self.settings.rabbitmq)
        else:
            self._conn.process_data_events(time_limit=0)  # service heartbeats
        return self._publisher

    def _drop_amqp(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # already broken
                pass
        self._conn = None
        self._publisher = None
