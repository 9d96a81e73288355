"""GCRA in Redis: exact under concurrency, shared by separate clients, refills, isolates keys."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from inventory_worker.adapters.redis_cache import make_client
from inventory_worker.http.ratelimit import RateLimiter

from ..support import uid


def limiter(settings, prefix: str) -> RateLimiter:
    return RateLimiter(make_client(settings.redis), prefix)  # its own connection pool, as another process has


def test_exactly_the_burst_is_admitted_from_concurrent_clients(settings):
    prefix = settings.redis.key_prefix + uid("rl") + ":"
    limiters = [limiter(settings, prefix) for _ in range(4)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: limiters[i % 4].check("token", "shared", 0.001, 25), range(200)))
    assert sum(r.allowed for r in results) == 25
    refused = [r for r in results if not r.allowed]
    assert all(r.remaining == 0 and r.retry_after_seconds > 900 for r in refused)  # one per 1000 s
    assert sorted(r.remaining for r in results if r.allowed) == list(range(25))


def test_keys_are_independent_and_the_bucket_refills(settings):
    rl = limiter(settings, settings.redis.key_prefix + uid("rl") + ":")
    assert [rl.check("token", "a", 50, 1).allowed for _ in range(2)] == [True, False]
    assert rl.check("token", "b", 50, 1).allowed  # another client is untouched
    assert rl.check("addr", "a", 50, 1).allowed  # another kind with the same name too
    deadline = time.monotonic() + 10
    while not rl.check("token", "a", 50, 1).allowed:  # 50/s: back within about 20 ms
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_the_key_expires_once_the_bucket_is_full_again(settings):
    rl = limiter(settings, settings.redis.key_prefix + uid("rl") + ":")
    rl.check("token", "x", 10, 3)
    ttl_ms = rl.client.pttl(rl.key("token", "x"))
    assert 0 < ttl_ms <= 100  # no key lingers for clients that went away
