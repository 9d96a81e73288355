"""Redis adapter: a versioned cache of stock figures.

Each product is one key, `{key_prefix}stock:{product_id}`, holding the JSON the HTTP endpoint
serves as is. Writes go through a Lua script that compares versions on the server, so when
processes race the cache never goes back to older figures.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import orjson
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from inventory_worker.config import RedisSettings, reveal
from inventory_worker.contract import Figures

# KEYS: the product keys; ARGV[1] the TTL in seconds, then for each key its JSON and version.
# The version sits first in the stored JSON, so it is read without decoding the whole value.
# One call per batch: a pipeline of one EVALSHA per product cost a command each to encode and
# send, and redis-py's pipelines check with SCRIPT EXISTS, a round trip of its own, first.
_PUT_IF_NEWER = """
local written = 0
for i, key in ipairs(KEYS) do
  local value, version = ARGV[2 * i], tonumber(ARGV[2 * i + 1])
  local cur = redis.call('GET', key)
  local v = cur and tonumber(string.match(cur, '^{"version": ?(%d+)'))
  if not (v and v >= version) then
    redis.call('SET', key, value, 'EX', ARGV[1])
    written = written + 1
  end
end
return written
"""


def encode_figures(figures: Figures) -> bytes:
    """The cached and served representation; `version` first (see the Lua script)."""
    return orjson.dumps(
        {
            "version": int(figures["version"]),
            "product_id": figures["product_id"],
            "on_hand": int(figures["on_hand"]),
            "reserved": int(figures["reserved"]),
            "available": int(figures["available"]),
        }
    )


class StockCache:
    def __init__(self, settings: RedisSettings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.client = client or make_client(settings)
        self._put = self.client.register_script(_PUT_IF_NEWER)

    def key(self, product_id: str) -> str:
        return f"{self.settings.key_prefix}stock:{product_id}"

    def put_many(self, figures: Iterable[Figures]) -> int:
        """Writes figures that are newer than what is cached; returns how many were written."""
        items = list(figures)
        if not items:
            return 0
        args: list[Any] = [self.settings.cache_ttl_seconds]
        for f in items:
            args += [encode_figures(f), int(f["version"])]
        return int(self._put(keys=[self.key(f["product_id"]) for f in items], args=args))

    def get(self, product_id: str) -> bytes | None:
        return cast("bytes | None", self.client.get(self.key(product_id)))  # the client does not decode

    def delete(self, product_id: str) -> None:
        self.client.delete(self.key(product_id))

    def ping(self) -> None:
        self.client.ping()

    def close(self) -> None:
        self.client.close()


def make_client(settings: RedisSettings) -> redis.Redis:
    # No retries inside the client: every caller copes with a failed call (the consumer
    # refills the cache later, HTTP reads PostgreSQL). redis-py's default (retries with
    # backoff, at the client and again at the connection level) stalled every batch and
    # request for up to ~50 s while Redis was unreachable.
    options: dict[str, Any] = {"health_check_interval": 30, "retry": Retry(NoBackoff(), 0)}
    if not settings.sentinels:
        return redis.Redis(**settings.client_kwargs(), **options)
    client: redis.Redis = sentinel(settings).master_for(settings.sentinel_service, **options)  # type: ignore[no-untyped-call]
    return client


def sentinel(settings: RedisSettings) -> Sentinel:
    """redis-py's Sentinel client: each new connection asks the sentinels for the current
    master; a connection that meets a READONLY reply (its server was demoted) is dropped."""
    kwargs = settings.client_kwargs()
    del kwargs["host"], kwargs["port"]
    sentinel_kwargs: dict[str, Any] = {"socket_timeout": settings.socket_timeout_seconds,
                                       "socket_connect_timeout": settings.socket_timeout_seconds}
    if password := reveal(settings.sentinel_password):
        sentinel_kwargs["password"] = password
    if settings.ssl:  # sentinels listening for TLS, with the same CA and client certificate
        sentinel_kwargs.update({k: v for k, v in kwargs.items() if k.startswith("ssl")})
    return Sentinel(settings.sentinel_addresses(), sentinel_kwargs=sentinel_kwargs, **kwargs)  # type: ignore[no-untyped-call]
