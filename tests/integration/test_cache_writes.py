"""The stock cache never goes back to older figures: one script call writes a whole batch,
each key only when its version is newer than the cached one."""

from __future__ import annotations

import json

from inventory_worker.adapters.redis_cache import StockCache

from ..support import uid


def fig(pid: str, version: int, on_hand: int) -> dict:
    return {"product_id": pid, "version": version, "on_hand": on_hand, "reserved": 1, "available": on_hand - 1}


def cached(cache: StockCache, pid: str) -> dict | None:
    raw = cache.client.get(cache.key(pid))
    return json.loads(raw) if raw else None


def test_a_batch_writes_only_newer_versions(settings):
    cache = StockCache(settings.redis)
    a, b, c = uid("C"), uid("C"), uid("C")
    assert cache.put_many([fig(a, 5, 10), fig(b, 5, 10)]) == 2
    # a: older (skipped), b: same version (skipped), c: new key (written)
    assert cache.put_many([fig(a, 4, 99), fig(b, 5, 99), fig(c, 1, 7)]) == 1
    assert cached(cache, a) == {"version": 5, "product_id": a, "on_hand": 10, "reserved": 1, "available": 9}
    assert cached(cache, b)["on_hand"] == 10
    assert cached(cache, c)["on_hand"] == 7
    assert cache.put_many([fig(a, 6, 3), fig(b, 4, 1)]) == 1
    assert cached(cache, a)["on_hand"] == 3 and cached(cache, b)["on_hand"] == 10
    ttl = cache.client.ttl(cache.key(a))
    assert 0 < ttl <= settings.redis.cache_ttl_seconds
