"""Where a round's latency went inside the worker, from the worker's own histograms.

The benchmark reads the worker's metrics folder (prometheus-client's multiprocess files, the
same figures `/metrics` serves) before and after a round and keeps the difference: how many
events were handled and in how many batches, a batch's wait and its PostgreSQL transaction,
receive to ack per event, and the consumers' garbage-collector pauses. Set beside the
end-to-end latency the load generator measures, this says how much of it was the worker's.
Quantiles are read from the buckets as Prometheus's `histogram_quantile()` reads them
(linear within a bucket), so they are as coarse as the buckets.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, multiprocess

BATCH_SIZE = "inventory_batch_size_messages"
WAIT = "inventory_batch_wait_seconds"
APPLY = "inventory_batch_apply_seconds"
IN_WORKER = "inventory_event_processing_seconds"
GC = "inventory_gc_pause_seconds"


@dataclass
class Histogram:
    bounds: list[float]  # upper bounds, +Inf last
    counts: list[float]  # cumulative, as exposed
    total: float  # the sum of the values

    @property
    def count(self) -> float:
        return self.counts[-1] if self.counts else 0.0

    def minus(self, earlier: Histogram | None) -> Histogram:
        if earlier is None:
            return self
        return Histogram(
            self.bounds,
            [a - b for a, b in zip(self.counts, earlier.counts, strict=True)],
            self.total - earlier.total,
        )

    def plus(self, other: Histogram) -> Histogram:
        return Histogram(
            self.bounds,
            [a + b for a, b in zip(self.counts, other.counts, strict=True)],
            self.total + other.total,
        )

    def quantile(self, q: float) -> float:
        """histogram_quantile(q): NaN when empty; the highest finite bound when it falls in +Inf."""
        if self.count <= 0:
            return math.nan
        rank = q * self.count
        lower, below = 0.0, 0.0
        for bound, cumulative in zip(self.bounds, self.counts, strict=True):
            if cumulative >= rank:
                if math.isinf(bound):
                    return lower
                return lower + (bound - lower) * (rank - below) / (cumulative - below)
            lower, below = bound, cumulative
        return lower

    def above(self, threshold: float) -> float:
        """How many values fell in buckets above `threshold` (a bucket bound)."""
        i = self.bounds.index(threshold)
        return self.count - self.counts[i]

    def highest_bucket(self) -> float:
        """The upper bound of the highest bucket holding a value (0 when empty, +Inf past the last)."""
        highest, below = 0.0, 0.0
        for bound, cumulative in zip(self.bounds, self.counts, strict=True):
            if cumulative > below:
                highest = bound
            below = cumulative
        return highest


Snapshot = dict[tuple[str, str], Histogram]  # (metric, label value or "") -> histogram


def snapshot(metrics_dir: Path | str) -> Snapshot:
    """Every histogram of the worker's processes, summed over processes (as /metrics does)."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(metrics_dir))
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for family in registry.collect():
        if family.type != "histogram":
            continue
        for s in family.samples:
            labels = {k: v for k, v in s.labels.items() if k != "le"}
            key = (family.name, ",".join(labels.values()))
            h = found.setdefault(key, {"buckets": {}, "sum": 0.0})
            if s.name.endswith("_bucket"):
                h["buckets"][float(s.labels["le"])] = s.value
            elif s.name.endswith("_sum"):
                h["sum"] = s.value
    out: Snapshot = {}
    for key, h in found.items():
        bounds = sorted(h["buckets"])
        out[key] = Histogram(bounds, [h["buckets"][b] for b in bounds], h["sum"])
    return out


def settled(metrics_dir: Path | str, quiet: float = 0.1, timeout: float = 2.0) -> Snapshot:
    """A snapshot once the worker has stopped counting events: the last batch's results can
    reach the load generator a moment before the worker records that batch."""
    last = snapshot(metrics_dir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = snapshot(metrics_dir)
        if _count(now, IN_WORKER) == _count(last, IN_WORKER):
            return now
        last = now
    return last


def _count(snap: Snapshot, name: str) -> float:
    h = snap.get((name, ""))
    return h.count if h else 0.0


def _ms(seconds: float) -> float:
    """Milliseconds; NaN stays NaN, +Inf (a value past the last bucket) stays +Inf."""
    return seconds if math.isnan(seconds) or math.isinf(seconds) else round(seconds * 1000, 1)


def inside(before: Snapshot, after: Snapshot) -> dict[str, Any]:
    """What happened in the worker between two snapshots."""

    def diff(name: str, label: str = "") -> Histogram | None:
        h = after.get((name, label))
        return h.minus(before.get((name, label))) if h else None

    sizes, wait, apply, event = diff(BATCH_SIZE), diff(WAIT), diff(APPLY), diff(IN_WORKER)
    gcs = [h for g in "012" if (h := diff(GC, g))]
    gc = functools.reduce(Histogram.plus, gcs) if gcs else None
    full = diff(GC, "2")
    out: dict[str, Any] = {
        "events": int(event.count) if event else 0,
        "batches": int(sizes.count) if sizes else 0,
        "batch_mean": round(sizes.total / sizes.count, 1) if sizes and sizes.count else math.nan,
        "in_worker_p50_ms": _ms(event.quantile(0.5)) if event else math.nan,
        "in_worker_p99_ms": _ms(event.quantile(0.99)) if event else math.nan,
        "wait_p50_ms": _ms(wait.quantile(0.5)) if wait else math.nan,
        "wait_p99_ms": _ms(wait.quantile(0.99)) if wait else math.nan,
        "apply_p50_ms": _ms(apply.quantile(0.5)) if apply else math.nan,
        "apply_p99_ms": _ms(apply.quantile(0.99)) if apply else math.nan,
        # REV's worker (bench --compare) may not have these: NaN, not zero
        "gc_pauses": int(gc.count) if gc else math.nan,
        "gc_ms": _ms(gc.total) if gc else math.nan,
        "gc_over_10ms": int(gc.above(0.01)) if gc else math.nan,
        "gc_full": int(full.count) if full else (0 if gc else math.nan),
        "gc_max_bucket_ms": _ms(gc.highest_bucket()) if gc else math.nan,
    }
    return out
