"""Prometheus metrics, shared by every process of one worker.

The supervisor points PROMETHEUS_MULTIPROC_DIR at a fresh (or emptied) folder before it
starts any child, so each child writes its samples there and /metrics (in the HTTP process)
sums them up. Counters and histograms add up across processes. The cluster-wide gauges are
measured by one consumer process and use `livemostrecent`: the latest value written by a
live process, so a dead process's last value does not linger.
"""

from __future__ import annotations

import bisect
import gc
import os
import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

EVENTS = Counter(
    "inventory_events_total",
    "Input events handled, by type and outcome (reserved, rejected, duplicate, dead_lettered, ...).",
    ["type", "outcome"],
)
EVENT_SECONDS = Histogram(
    "inventory_event_processing_seconds",
    "Time from receiving a message to acking it.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BATCH_SIZE = Histogram(
    "inventory_batch_size_messages",
    "Messages applied per PostgreSQL transaction.",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
)
# Finer than the per-event buckets: at half load a batch waits and applies in a few milliseconds.
_BATCH_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)
BATCH_WAIT_SECONDS = Histogram(
    "inventory_batch_wait_seconds",
    "Time from receiving a batch's first message to applying the batch: waiting for more input"
    " to join it, and behind the batch before it.",
    buckets=_BATCH_BUCKETS,
)
BATCH_APPLY_SECONDS = Histogram(
    "inventory_batch_apply_seconds",
    "Time to apply one batch in PostgreSQL (its transaction, retries included).",
    buckets=_BATCH_BUCKETS,
)
GC_PAUSE_SECONDS = Histogram(
    "inventory_gc_pause_seconds",
    "Pauses of a consumer process for Python's garbage collector, by generation (2: full).",
    ["generation"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1),
)
DEAD_LETTERED = Counter(
    "inventory_dead_lettered_total", "Messages sent to the dead-letter queue by the worker.", ["reason"]
)
RETRIES = Counter(
    "inventory_retries_total", "Retries after a transient failure, by dependency.", ["dependency"]
)
RESULTS_PUBLISHED = Counter(
    "inventory_results_published_total", "Result events confirmed by the broker, by path.", ["path"]
)
PUBLISH_SECONDS = Histogram(
    "inventory_publish_seconds",
    "Time to publish one batch of result events: consumers until it is written (they collect"
    " confirms while applying the next batch), the relay and the sweeper until it is confirmed.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
OUTBOX_BACKLOG = Gauge(
    "inventory_outbox_backlog_messages",
    "Result events recorded in the outbox and not yet marked published (whole database).",
    multiprocess_mode="livemostrecent",
)
OUTBOX_OLDEST_AGE = Gauge(
    "inventory_outbox_oldest_unpublished_age_seconds",
    "Age of the oldest result event not yet marked published; 0 when none.",
    multiprocess_mode="livemostrecent",
)
ACTIVE_RESERVATIONS = Gauge(
    "inventory_reservations_active",
    "Orders holding a live reservation (whole database).",
    multiprocess_mode="livemostrecent",
)
BACKORDERED_UNITS = Gauge(
    "inventory_backordered_units",
    "Units promised to open orders without stock: the sum of every product's backordered units"
    " (whole database).",
    multiprocess_mode="livemostrecent",
)
HOLDS_UNTIL_FULFILLED = Gauge(
    "inventory_holds_until_fulfilled",
    "Live reservations without a deadline (reservation.extended until_fulfilled, or partly"
    " fulfilled), which expiry never releases (whole database).",
    multiprocess_mode="livemostrecent",
)
DLQ_DEPTH = Gauge(
    "inventory_dead_letter_queue_messages",
    "Messages waiting in the dead-letter queue.",
    multiprocess_mode="livemostrecent",
)
EXPIRED = Counter("inventory_reservations_expired_total", "Reservations released by expiry.")
CACHE = Counter("inventory_cache_requests_total", "Stock cache look-ups by result.", ["result"])
CACHE_WRITE_ERRORS = Counter("inventory_cache_write_errors_total", "Failed writes to the Redis cache.")
HTTP_REQUESTS = Counter(
    "inventory_http_requests_total", "HTTP requests by route and status.", ["route", "status"]
)
HTTP_SECONDS = Histogram(
    "inventory_http_request_duration_seconds",
    "Time to answer an HTTP request, by route.",
    ["route"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
PROCESS_RESTARTS = Counter(
    "inventory_process_restarts_total",
    "Child processes restarted by the supervisor, by role and reason (died, stuck).",
    ["role", "reason"],
)


def add_observations(histogram: Any, bucket_counts: Iterable[tuple[int, int]], total: float) -> None:
    """Adds what observe() would have for many values at once: `bucket_counts` pairs each
    bucket's index (`bucket_index`) with how many values fell in it, `total` is their sum.
    In multiprocess mode every observe() takes a lock, asks the kernel for the process id and
    writes a shared file, twice; this does it once per bucket touched. `histogram` is a
    Histogram without labels or one child of it (`.labels(...)`)."""
    for i, n in bucket_counts:
        if n:
            histogram._buckets[i].inc(n)
    histogram._sum.inc(total)


def bucket_index(histogram: Any, value: float) -> int:
    """The bucket observe() puts `value` in: the first upper bound >= value (+Inf last)."""
    return bisect.bisect_left(histogram._upper_bounds, value)


def observe_many(histogram: Any, values: list[float]) -> None:
    """observe() for each of `values`, with one write per bucket touched."""
    if not values:
        return
    counts: dict[int, int] = {}
    for v in values:
        i = bucket_index(histogram, v)
        counts[i] = counts.get(i, 0) + 1
    add_observations(histogram, counts.items(), sum(values))


class GcPauses:
    """Times the garbage collector's pauses (gc.callbacks) and adds them to GC_PAUSE_SECONDS in
    bulk (`flush()`): a young collection runs hundreds of times a second under load, and an
    observe() in multiprocess mode takes a lock and writes a shared file."""

    def __init__(self) -> None:
        self._started = 0.0
        self._pending: dict[int, list[float]] = {0: [], 1: [], 2: []}

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._pending[info["generation"]].append(time.perf_counter() - self._started)

    def install(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def flush(self) -> None:
        for generation, pauses in self._pending.items():
            if pauses:
                taken = pauses[:]
                del pauses[: len(taken)]
                observe_many(GC_PAUSE_SECONDS.labels(str(generation)), taken)


GC_PAUSES = GcPauses()  # a consumer process installs it (supervisor) and flushes it (consumer)


def exposition() -> tuple[bytes, str]:
    """The text exposition of every process's metrics."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)
