"""Write-behind of the figures to the cache, which must never hold up a batch.

After a batch commits, its products' new figures are written to Redis. If that fails (Redis
down or hanging), PostgreSQL is still right: the products are only noted as stale, Redis is
left alone with exponential backoff (a hanging Redis must not stall every batch), and when the
consumer is idle the stale products are refilled with their current figures from PostgreSQL.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from inventory_worker import metrics
from inventory_worker.contract import Figures
from inventory_worker.logs import get_logger
from inventory_worker.worker.ports import FiguresCache

log = get_logger(__name__)

MAX_STALE = 100_000  # products noted, at most (memory); others wait for their TTL or `cache rebuild`
REFILL_CHUNK = 1000  # stale products refilled per idle moment


class CacheWriter:
    def __init__(self, cache: FiguresCache, clock: Callable[[], float] = time.monotonic) -> None:
        self.cache = cache
        self.clock = clock
        self.stale: set[str] = set()  # products whose cache write failed or was skipped
        self.retry_at = 0.0  # Redis is left alone until then
        self.backoff = 0.0

    def write(self, figures: list[Figures]) -> None:
        """Writes a batch's figures, or notes them stale while backing off or on failure."""
        if not figures:
            return
        if self.clock() < self.retry_at:  # backing off: refilled from PostgreSQL later
            self._mark_stale(figures)
            return
        try:
            self.cache.put_many(figures)
            self.backoff = 0.0
        except Exception as exc:  # Redis down: PostgreSQL stays right; refill the cache later
            metrics.CACHE_WRITE_ERRORS.inc()
            self._mark_stale(figures)
            self._failed(exc, products=len(figures))

    def refill(self, figures_of: Callable[[Sequence[str]], list[Figures]]) -> None:
        """When idle and not backing off: rewrites some stale products with their figures now."""
        if not self.stale or self.clock() < self.retry_at:
            return
        ids = list(self.stale)[:REFILL_CHUNK]
        try:
            self.cache.put_many(figures_of(ids))
            self.stale.difference_update(ids)
            self.backoff = 0.0
        except Exception as exc:  # still down (or PostgreSQL is): back off further
            self._failed(exc, stale_products=len(self.stale))

    def _mark_stale(self, figures: list[Figures]) -> None:
        if len(self.stale) < MAX_STALE:
            self.stale.update(f["product_id"] for f in figures)

    def _failed(self, exc: Exception, **info: Any) -> None:
        self.backoff = min(max(0.25, self.backoff * 2), 30.0)
        self.retry_at = self.clock() + self.backoff
        log.warning("cache write failed; will retry", error=repr(exc), retry_in_seconds=self.backoff, **info)
