"""The HTTP metrics of one process, tallied in plain dicts and written to Prometheus in batches.

In multiprocess mode (how the worker runs, see metrics.py) every Counter.inc() or
Histogram.observe() takes a lock, asks the kernel for the process id (a system call, to notice a
fork) and writes a shared file; on this 2-core VM the four such calls of a stock read were about
a fifth of an HTTP worker's time under load. Here a request costs a few dict updates; `flush()`
adds the tallies to the same metrics (same names, labels and buckets) at most every
FLUSH_SECONDS, from a background thread, and before this process serves /metrics. A scrape can
therefore lag an HTTP process's last half second; counters and histograms stay exact.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from typing import Any

from inventory_worker import metrics

FLUSH_SECONDS = 0.5


class HttpTally:
    def __init__(self, flush_seconds: float = FLUSH_SECONDS) -> None:
        self.flush_seconds = flush_seconds
        self._lock = threading.Lock()  # the stdlib server records from many threads
        self._requests: dict[tuple[str, int], int] = {}
        self._cache: dict[str, int] = {}
        # route -> [observations per bucket (not cumulative, as prometheus_client keeps them), sum]
        self._seconds: dict[str, list[Any]] = {}
        # prometheus_client's own bucket bounds (+Inf last); its Histogram keeps one value per
        # bucket (_buckets) and the sum (_sum): flush() adds to those as observe() would.
        self._bounds = list(metrics.HTTP_SECONDS._upper_bounds)
        self._flushing = False  # a flusher thread runs in this process
        # Threads do not survive a fork (granian forks its workers): a child starts its own.
        ref = weakref.ref(self)  # neither the fork hook nor the thread keeps a dropped tally alive

        def forked() -> None:
            if (tally := ref()) is not None:
                tally._forked()

        os.register_at_fork(after_in_child=forked)

    def _forked(self) -> None:
        self._flushing = False
        self._lock = threading.Lock()

    def request(self, route: str, status: int, seconds: float) -> None:
        if not self._flushing:
            self._start_flusher()
        bucket = metrics.bucket_index(metrics.HTTP_SECONDS, seconds)
        with self._lock:
            key = (route, status)
            self._requests[key] = self._requests.get(key, 0) + 1
            h = self._seconds.get(route)
            if h is None:
                h = self._seconds[route] = [[0] * len(self._bounds), 0.0]
            h[0][bucket] += 1
            h[1] += seconds

    def cache(self, result: str) -> None:
        with self._lock:
            self._cache[result] = self._cache.get(result, 0) + 1

    def flush(self) -> None:
        with self._lock:
            requests, self._requests = self._requests, {}
            cache, self._cache = self._cache, {}
            seconds, self._seconds = self._seconds, {}
        for (route, status), n in requests.items():
            metrics.HTTP_REQUESTS.labels(route, str(status)).inc(n)
        for result, n in cache.items():
            metrics.CACHE.labels(result).inc(n)
        for route, (counts, total) in seconds.items():
            metrics.add_observations(metrics.HTTP_SECONDS.labels(route), enumerate(counts), total)

    def _start_flusher(self) -> None:
        with self._lock:
            if self._flushing:
                return
            self._flushing = True

        ref, interval = weakref.ref(self), self.flush_seconds

        def run() -> None:
            while True:
                time.sleep(interval)
                tally = ref()
                if tally is None:
                    return
                tally.flush()
                del tally

        threading.Thread(target=run, name="http-metrics-flush", daemon=True).start()
