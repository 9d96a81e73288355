"""The Redis client gives up fast: the cache is only a cache.

Every caller already copes with a failed Redis call (the consumer refills the cache later, the
HTTP endpoint reads PostgreSQL, /readyz reports `redis`), so a client that retries on its own
only stalls them: each batch and each request while Redis is down or unreachable.
"""

from __future__ import annotations

import socket
import threading

import pytest

from inventory_worker.adapters.redis_cache import StockCache
from inventory_worker.config import RedisSettings


class DeadRedis:
    """Accepts TCP connections and closes them at once, counting them."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def dead_redis():
    d = DeadRedis()
    yield d
    d.close()


@pytest.mark.parametrize("call", ["ping", "get", "put_many"])
def test_a_dead_redis_costs_at_most_two_connection_attempts_per_call(dead_redis, call):
    cache = StockCache(RedisSettings(port=dead_redis.port, socket_timeout_seconds=1))
    with pytest.raises(Exception) as exc:
        if call == "ping":
            cache.ping()
        elif call == "get":
            cache.client.get(cache.key("SKU-1"))
        else:
            cache.put_many(
                [{"product_id": "SKU-1", "on_hand": 1, "reserved": 0, "available": 1, "version": 1}]
            )
    assert "redis" in type(exc.value).__module__
    assert 1 <= dead_redis.accepted <= 2
