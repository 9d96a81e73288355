"""Audit: `verify`, which checks every figure against what explains it. (A product's movement
history is `Store.history`.)

- PostgreSQL: each product's `on_hand` and `reserved` against the sum of its ledger
  (stock_movements), and `reserved` against the orders still holding a reservation. One SQL
  statement (sql/procedures/audit.sql), so one snapshot: no false alarms under traffic.
- Redis: every cached entry against PostgreSQL. The cache is written just after each commit,
  so an entry may lag for a moment; a difference is reported only if it is still there
  after `settle_seconds` (re-read from both sides), or if it can never heal (the cached
  version is newer than the database's, or the product does not exist).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal, cast

import redis

from inventory_worker.adapters.postgres import Store
from inventory_worker.adapters.redis_cache import StockCache
from inventory_worker.contract import Figures

FIGURES: tuple[Literal["on_hand", "reserved", "available", "version"], ...] = (
    "on_hand",
    "reserved",
    "available",
    "version",
)


@dataclass(frozen=True)
class Mismatch:
    product_id: str
    check: str  # ledger | reservations | cache
    message: str
    detail: dict[str, Any]

    def as_json(self) -> str:
        return json.dumps(asdict(self), default=str)


class Audit:
    """Checks over a PostgreSQL store and the Redis cache; the caller owns (and closes) both."""

    def __init__(self, store: Store, cache: StockCache) -> None:
        self.store = store
        self.cache = cache

    def verify(self, settle_seconds: float = 1.0) -> tuple[list[Mismatch], dict[str, Any]]:
        """Every mismatch found, and what was checked ({"products": n, "cached": m}, plus
        "cache_error" when Redis could not be read: the cache is then unchecked)."""
        found = self._database_mismatches()
        products = self.store.product_count()
        try:
            cached, cache_found = self._cache_mismatches(settle_seconds)
        except redis.RedisError as exc:
            return found, {"products": products, "cached": 0, "cache_error": str(exc) or type(exc).__name__}
        return found + cache_found, {"products": products, "cached": cached}

    def _database_mismatches(self) -> list[Mismatch]:
        out = []
        for product_id, figure, recorded, expected, source in self.store.mismatches():
            by = {
                "ledger": "the ledger sums to",
                "levels": "its levels sum to",
                "orders": "its counters allow",
            }.get(source, "active reservations hold")
            where = (
                "order_lines" if source == "orders" else "stock_levels" if " at " in figure else "products"
            )
            out.append(
                Mismatch(
                    product_id,
                    source,
                    f"{figure} is {recorded} in {where}, but {by} {expected}",
                    {"figure": figure, "recorded": recorded, "expected": expected},
                )
            )
        return out

    def _cache_mismatches(self, settle_seconds: float) -> tuple[int, list[Mismatch]]:
        suspects: dict[str, bytes] = {}
        checked = 0
        for chunk in _chunks(self._cached_product_ids(), 1000):
            checked += len(chunk)
            suspects.update(self._differing(chunk))
        if suspects and settle_seconds > 0:
            # In-flight writes land within moments; what is still wrong afterwards is not in flight.
            time.sleep(settle_seconds)
            suspects = self._differing(list(suspects))
        out = []
        db = {f["product_id"]: f for f in self.store.figures(list(suspects))}
        for product_id, raw in sorted(suspects.items()):
            out.append(self._describe(product_id, raw, db.get(product_id)))
        return checked, out

    def _cached_product_ids(self) -> Iterator[str]:
        prefix = self.cache.key("")
        pattern = _glob_escape(prefix) + "*"
        for key in self.cache.client.scan_iter(match=pattern, count=1000):
            yield key.decode()[len(prefix) :]

    def _differing(self, product_ids: list[str]) -> dict[str, bytes]:
        """Those whose cached entry differs from PostgreSQL's figures, with the entry."""
        if not product_ids:
            return {}
        keys = [self.cache.key(p) for p in product_ids]
        values = cast("list[bytes | None]", self.cache.client.mget(keys))  # the client does not decode
        db = {f["product_id"]: f for f in self.store.figures(product_ids)}
        out = {}
        for product_id, raw in zip(product_ids, values, strict=True):
            if raw is None:
                continue  # expired or evicted meanwhile: a miss is refilled from PostgreSQL
            cached = _decode(raw)
            figures = db.get(product_id)
            if cached is None or figures is None or any(cached.get(k) != figures[k] for k in FIGURES):
                out[product_id] = raw
        return out

    @staticmethod
    def _describe(product_id: str, raw: bytes, figures: Figures | None) -> Mismatch:
        cached = _decode(raw)
        if figures is None:
            return Mismatch(
                product_id,
                "cache",
                "cached in Redis, but no such product in PostgreSQL",
                {"cached": raw.decode(errors="replace")},
            )
        if cached is None:
            return Mismatch(
                product_id,
                "cache",
                "the Redis entry is not valid figures",
                {"cached": raw.decode(errors="replace")},
            )
        show = " ".join
        return Mismatch(
            product_id,
            "cache",
            "Redis has "
            + show(f"{k}={cached.get(k)}" for k in FIGURES)
            + ", PostgreSQL "
            + show(f"{k}={figures[k]}" for k in FIGURES),
            {"cached": {k: cached.get(k) for k in FIGURES}, "database": {k: figures[k] for k in FIGURES}},
        )


def _decode(raw: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "\\*?[]" else c for c in text)


def _chunks(items: Iterator[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
