"""Redis Sentinel, for real (a private master, replica and three sentinels: tests/chaos/ha.py):
the cache's client and the HTTP path's asyncio client find the master through the sentinels,
follow it when the sentinels fail it over, and drop a connection to a server that was demoted."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from inventory_worker.adapters.redis_async import AsyncRedis
from inventory_worker.adapters.redis_cache import StockCache
from inventory_worker.config import RedisSettings

from ..chaos.ha import RedisSentinels

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def group() -> Iterator[RedisSentinels]:
    root = Path(tempfile.mkdtemp(prefix="inventory-sentinel-"))
    g = RedisSentinels(root)
    try:
        g.start()
        yield g
    finally:
        g.close()
        shutil.rmtree(root, ignore_errors=True)


def _settings(g: RedisSentinels) -> RedisSettings:
    return RedisSettings(
        sentinels=g.addresses(), sentinel_service=g.SERVICE, key_prefix=f"sf{os.getpid()}:", port=1
    )  # host/port unused with sentinels: a port nothing listens on


def _figures(version: int) -> dict:
    return {"product_id": "P1", "version": version, "on_hand": version, "reserved": 0, "available": version}


def _eventually(fn, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except redis.RedisError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_both_clients_follow_the_master_through_a_failover(group):
    s = _settings(group)
    cache = StockCache(s)
    assert cache.put_many([_figures(1)]) == 1

    async def async_get() -> bytes:
        client = AsyncRedis(s)
        try:
            return await client.execute(b"GET", cache.key("P1"))
        finally:
            client.close()

    assert b'"version":1' in asyncio.run(async_get())
    group.kill_master()
    # The first call after the failover may fail (its connection was to the lost master);
    # the next ones reach the promoted replica, which took the figures over.
    assert _eventually(lambda: cache.put_many([_figures(2)])) == 1
    assert b'"version":2' in _eventually(lambda: cache.client.get(cache.key("P1")))
    assert b'"version":2' in _eventually(lambda: asyncio.run(async_get()))
    cache.close()


def test_the_asyncio_client_drops_a_connection_to_a_demoted_server(group):
    master = group.master_port()
    replica = next(p.port for p in group.servers if p.port != master)
    direct = RedisSettings(host="127.0.0.1", port=replica)  # as when the master was demoted since

    async def main():
        client = AsyncRedis(direct)
        with pytest.raises(redis.ReadOnlyError):
            await client.execute(b"SET", b"sf-demoted", b"1")
        dropped = client._proto is None
        client.close()
        return dropped

    assert asyncio.run(main())
