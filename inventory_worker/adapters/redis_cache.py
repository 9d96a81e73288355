"""Redis adapter: a versioned cache of stock figures.

Each product is one key, `{key_prefix}stock:{product_id}`, holding the JSON the HTTP endpoint
serves as is. Writes go through a Lua script that compares versions on the server, so when
processes race the cache never goes back to older figures.

The detail document of a product (GET /inventory/{id}/detail) is cached under
`{key_prefix}stock-detail:{product_id}`, filled only by the read path (`put_detail`): the worker
never computes it. Every write of newer compact figures deletes it, and it is stored only when
its version equals the compact figures' (written in the same script if older), so a cached
detail is never older than the cached figures. A channel's configuration is cached for
CHANNEL_TTL_SECONDS under `{key_prefix}channel:{channel_id}`.
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

# KEYS: for each product its figures key then its detail key; ARGV[1] the TTL in seconds, then
# for each product its JSON and version. Newer figures are written and the product's detail
# document deleted (the read path caches it again from PostgreSQL).
# The version sits first in the stored JSON, so it is read without decoding the whole value.
# One call per batch: a pipeline of one EVALSHA per product cost a command each to encode and
# send, and redis-py's pipelines check with SCRIPT EXISTS, a round trip of its own, first.
_PUT_IF_NEWER = """
local written = 0
for i = 1, #KEYS / 2 do
  local key, value, version = KEYS[2 * i - 1], ARGV[2 * i], tonumber(ARGV[2 * i + 1])
  local cur = redis.call('GET', key)
  local v = cur and tonumber(string.match(cur, '^{"version": ?(%d+)'))
  if not (v and v >= version) then
    redis.call('SET', key, value, 'EX', ARGV[1])
    redis.call('DEL', KEYS[2 * i])
    written = written + 1
  end
end
return written
"""

# KEYS[1] the figures key, KEYS[2] the detail key; ARGV[1] the TTL, ARGV[2] the figures JSON,
# ARGV[3] the detail JSON, ARGV[4] their version (both read in one statement). The figures are
# written as by _PUT_IF_NEWER (without deleting the detail); the detail only when the cached
# figures then have its version: cached figures that are newer mean this detail is already old.
# Returns 1 when the detail was stored.
_PUT_DETAIL = """
local version = tonumber(ARGV[4])
local cur = redis.call('GET', KEYS[1])
local v = cur and tonumber(string.match(cur, '^{"version": ?(%d+)'))
if not (v and v >= version) then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[1])
  v = version
end
if v ~= version then
  return 0
end
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[1])
return 1
"""

# A channel's configuration changes rarely and is read on every `?channel=` request: cached this
# long, so a change shows in the channel figures within that many seconds.
CHANNEL_TTL_SECONDS = 5

# The order of the detail document's keys (spec 7): `version` first, as in the figures.
_DETAIL_KEYS = (
    "version",
    "product_id",
    "tracked",
    "on_hand",
    "reserved",
    "available",
    "orderable",
    "backordered",
    "damaged",
    "quality_control",
    "incoming",
    "low_stock_threshold",
    "max_per_order",
    "backorder",
    "locations",
)
_LOCATION_KEYS = (
    "location_id",
    "priority",
    "active",
    "fulfils_orders",
    "on_hand",
    "reserved",
    "available",
    "damaged",
    "quality_control",
    "incoming",
    "safety_stock",
)
_BACKORDER_KEYS = ("mode", "limit", "until", "headroom")


def _ordered(doc: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """`doc` with `keys` first in that order, then any others (a later version's) as they come."""
    return {**{k: doc[k] for k in keys if k in doc}, **doc}


def encode_detail(detail: dict[str, Any]) -> bytes:
    """The cached and served detail document (PostgreSQL's jsonb orders keys its own way)."""
    doc = _ordered(detail, _DETAIL_KEYS)
    if isinstance(doc.get("backorder"), dict):
        doc["backorder"] = _ordered(doc["backorder"], _BACKORDER_KEYS)
    doc["locations"] = [_ordered(loc, _LOCATION_KEYS) for loc in doc.get("locations") or []]
    return orjson.dumps(doc)


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
        self._put_detail = self.client.register_script(_PUT_DETAIL)

    def key(self, product_id: str) -> str:
        return f"{self.settings.key_prefix}stock:{product_id}"

    def detail_key(self, product_id: str) -> str:
        return f"{self.settings.key_prefix}stock-detail:{product_id}"

    def channel_key(self, channel_id: str) -> str:
        return f"{self.settings.key_prefix}channel:{channel_id}"

    def put_many(self, figures: Iterable[Figures]) -> int:
        """Writes figures that are newer than what is cached (deleting those products' detail
        documents); returns how many were written."""
        items = list(figures)
        if not items:
            return 0
        args: list[Any] = [self.settings.cache_ttl_seconds]
        keys: list[str] = []
        for f in items:
            args += [encode_figures(f), int(f["version"])]
            keys += [self.key(f["product_id"]), self.detail_key(f["product_id"])]
        return int(self._put(keys=keys, args=args))

    def put_detail(self, detail: dict[str, Any], encoded: bytes | None = None) -> bool:
        """Caches a detail document read from PostgreSQL (and its figures, if newer than the
        cached ones); False when newer figures are cached already (this detail is old)."""
        product_id = detail["product_id"]
        return bool(
            self._put_detail(
                keys=[self.key(product_id), self.detail_key(product_id)],
                args=[
                    self.settings.cache_ttl_seconds,
                    encode_figures(cast("Figures", detail)),
                    encoded or encode_detail(detail),
                    int(detail["version"]),
                ],
            )
        )

    def put_channel(self, channel_id: str, document: bytes) -> None:
        self.client.set(self.channel_key(channel_id), document, ex=CHANNEL_TTL_SECONDS)

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
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": settings.socket_timeout_seconds,
        "socket_connect_timeout": settings.socket_timeout_seconds,
    }
    if password := reveal(settings.sentinel_password):
        sentinel_kwargs["password"] = password
    if settings.ssl:  # sentinels listening for TLS, with the same CA and client certificate
        sentinel_kwargs.update({k: v for k, v in kwargs.items() if k.startswith("ssl")})
    return Sentinel(settings.sentinel_addresses(), sentinel_kwargs=sentinel_kwargs, **kwargs)  # type: ignore[no-untyped-call]
