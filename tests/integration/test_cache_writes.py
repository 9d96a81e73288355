"""The stock cache never goes back to older figures: one script call writes a whole batch,
each key only when its version is newer than the cached one."""

from __future__ import annotations

import json

from inventory_worker.adapters.redis_cache import StockCache

from ..support import uid


def fig(pid: str, version: int, on_hand: int) -> dict:
    return {
        "product_id": pid,
        "version": version,
        "on_hand": on_hand,
        "reserved": 1,
        "available": on_hand - 1,
    }


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


def detail(pid: str, version: int, on_hand: int) -> dict:
    return fig(pid, version, on_hand) | {
        "tracked": True,
        "locations": [{"location_id": "default", "on_hand": on_hand}],
    }


def cached_detail(cache: StockCache, pid: str) -> dict | None:
    raw = cache.client.get(cache.detail_key(pid))
    return json.loads(raw) if raw else None


def test_a_cached_detail_is_never_older_than_the_cached_figures(settings):
    cache = StockCache(settings.redis)
    a, b = uid("D"), uid("D")
    cache.put_many([fig(a, 5, 10)])
    assert cache.put_detail(detail(a, 4, 8)) is False  # read before the figures moved on: not kept
    assert cached_detail(cache, a) is None and cached(cache, a)["version"] == 5
    assert cache.put_detail(detail(a, 5, 10)) is True
    assert cached_detail(cache, a)["version"] == 5
    assert cache.put_many([fig(a, 5, 10)]) == 0 and cached_detail(cache, a) is not None  # not newer: kept
    assert cache.put_many([fig(a, 6, 11)]) == 1 and cached_detail(cache, a) is None  # newer: dropped
    # No figures cached (or older ones): the detail's own figures are written with it.
    assert cache.put_detail(detail(b, 3, 4)) is True
    assert cached(cache, b) == {"version": 3, "product_id": b, "on_hand": 4, "reserved": 1, "available": 3}
    assert cached_detail(cache, b)["locations"] == [{"location_id": "default", "on_hand": 4}]
    assert cache.put_detail(detail(a, 7, 12)) is True and cached(cache, a)["version"] == 7
    assert 0 < cache.client.ttl(cache.detail_key(a)) <= settings.redis.cache_ttl_seconds
