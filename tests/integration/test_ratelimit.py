"""GCRA in Redis: exact under concurrency, shared by separate clients, refills, isolates keys,
and survives Redis losing the script."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from inventory_worker.adapters.redis_async import AsyncRedis
from inventory_worker.adapters.redis_cache import make_client
from inventory_worker.config import RedisSettings
from inventory_worker.http.ratelimit import Decision, Limit, RateLimiter

from ..support import free_port, uid


def limiter(settings, prefix: str) -> RateLimiter:
    return RateLimiter(make_client(settings.redis), prefix)  # its own connection pool, as another process has


def check(rl: RateLimiter, kind: str, identity: str, rate: float, burst: int) -> Decision:
    """One request counted against the limit, nothing read with it."""
    return rl.check_and_get(Limit(kind, identity, rate, burst), None)[0]


def test_exactly_the_burst_is_admitted_from_concurrent_clients(settings):
    prefix = settings.redis.key_prefix + uid("rl") + ":"
    limiters = [limiter(settings, prefix) for _ in range(4)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: check(limiters[i % 4], "token", "shared", 0.001, 25), range(200)))
    assert sum(r.allowed for r in results) == 25
    refused = [r for r in results if not r.allowed]
    assert all(r.remaining == 0 and r.retry_after_seconds > 900 for r in refused)  # one per 1000 s
    assert sorted(r.remaining for r in results if r.allowed) == list(range(25))


def test_keys_are_independent_and_the_bucket_refills(settings):
    rl = limiter(settings, settings.redis.key_prefix + uid("rl") + ":")
    assert [check(rl, "token", "a", 50, 1).allowed for _ in range(2)] == [True, False]
    assert check(rl, "token", "b", 50, 1).allowed  # another client is untouched
    assert check(rl, "addr", "a", 50, 1).allowed  # another kind with the same name too
    deadline = time.monotonic() + 10
    while not check(rl, "token", "a", 50, 1).allowed:  # 50/s: back within about 20 ms
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_the_key_expires_once_the_bucket_is_full_again(settings):
    rl = limiter(settings, settings.redis.key_prefix + uid("rl") + ":")
    check(rl, "token", "x", 10, 3)
    ttl_ms = rl.client.pttl(rl.key("token", "x"))
    assert 0 < ttl_ms <= 100  # no key lingers for clients that went away


@pytest.fixture
def private_redis():
    """A redis-server of this test's own: it starts with no script loaded, and SCRIPT FLUSH there
    disturbs nobody else."""
    from .test_redis_tls import _private_redis

    port = free_port()
    yield from _private_redis(["--port", str(port)], RedisSettings(host="127.0.0.1", port=port))


def test_both_faces_send_the_script_whole_when_redis_does_not_have_it(private_redis):
    rl = RateLimiter(make_client(private_redis), "rl:")
    limit = Limit("token", "t", 0.001, 4)

    async def admitted_async() -> bool:
        client = AsyncRedis(private_redis)
        try:
            return (await rl.acheck_and_get(limit, None, client))[0].allowed
        finally:
            client.close()

    seen = []
    for face in ("blocking", "async", "blocking", "async"):
        rl.client.script_flush()  # as after a Redis restart: NOSCRIPT for the EVALSHA
        seen.append(
            rl.check_and_get(limit, None)[0].remaining
            if face == "blocking"
            else asyncio.run(admitted_async())
        )
    assert seen == [3, True, 1, True]  # every call counted in the one bucket
    assert not rl.check_and_get(limit, None)[0].allowed
