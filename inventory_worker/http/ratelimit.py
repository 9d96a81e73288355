"""Rate limiting for the HTTP API, shared by every process and replica through Redis.

GCRA (the generic cell rate algorithm, a token bucket kept as one timestamp): each client key
holds its "theoretical arrival time" (TAT). A request is allowed when it does not arrive more
than `burst` emission intervals before the TAT; allowing it moves the TAT one interval on. The
whole decision is one Lua script, atomic in Redis, one round trip, clocked by Redis's own TIME
(so replicas with skewed clocks agree). One key per client: a limited client costs the others
nothing but its own O(1) script calls. The same script optionally reads more keys when the
request is admitted (the cached stock figures; a detail document and a channel's configuration),
so an admitted stock read costs one round trip in all, not two (`RateLimiter.check_and_get`); a
refused request reads nothing.

If Redis cannot answer, the check raises RateLimitUnavailable and the API answers 503: an
endpoint that serves without limits whenever Redis hiccups is not rate limited.

Response headers (draft-ietf-httpapi-ratelimit-headers, the separate-field form):
  RateLimit-Limit      the burst: requests allowed at once from a full bucket
  RateLimit-Remaining  requests still allowed right now
  RateLimit-Reset      seconds until the bucket is full again
  RateLimit-Policy     `<burst>;w=<seconds to refill it>`
  Retry-After          (429 only) seconds until the next request will be allowed
"""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Any, NamedTuple

import redis

if TYPE_CHECKING:
    from inventory_worker.adapters.redis_async import AsyncRedis

# KEYS[1] the client's key, KEYS[2...] (optional) keys to GET once the request is admitted.
# ARGV[1] emission interval (µs per request), ARGV[2] burst.
# Returns {allowed (0/1), remaining, retry_after_us, reset_us[, value of KEYS[2] or nil, ...]}
# (a missing key reads as false, which the reply carries as nil without ending the array).
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - burst * interval
if now < allow_at then
  return {0, 0, allow_at - now, tat - now}
end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000))
local admitted = {1, math.floor((now - allow_at) / interval), 0, new_tat - now}
for i = 2, #KEYS do
  admitted[i + 3] = redis.call('GET', KEYS[i])
end
return admitted
"""
GCRA_SCRIPT = _GCRA
GCRA_SHA = hashlib.sha1(GCRA_SCRIPT.encode()).hexdigest()
GCRA_SHA_BYTES = GCRA_SHA.encode()


class RateLimitUnavailable(Exception):
    """Redis did not answer: the request cannot be admitted (503)."""


class Decision(NamedTuple):  # a tuple: made per request, several times cheaper than a frozen dataclass
    allowed: bool
    limit: int
    remaining: int
    retry_after_seconds: int
    reset_seconds: int
    window_seconds: int

    def headers(self) -> list[tuple[str, str]]:
        h = [
            ("RateLimit-Limit", str(self.limit)),
            ("RateLimit-Remaining", str(self.remaining)),
            ("RateLimit-Reset", str(self.reset_seconds)),
            ("RateLimit-Policy", f"{self.limit};w={self.window_seconds}"),
        ]
        if not self.allowed:
            h.append(("Retry-After", str(self.retry_after_seconds)))
        return h

    @classmethod
    def from_reply(cls, reply: list[Any], interval_us: int, burst: int) -> Decision:
        """The decision in the script's reply (its first four items)."""
        allowed, remaining, retry_us, reset_us = reply[:4]
        return cls(
            bool(allowed),
            burst,
            int(remaining),
            max(1, -(-int(retry_us) // 1_000_000)),  # seconds, rounded up (integer arithmetic)
            -(-int(reset_us) // 1_000_000),
            max(1, math.ceil(burst * interval_us / 1_000_000)),
        )


def interval_us(rate_per_second: float) -> int:
    """GCRA's emission interval: microseconds per request at this rate."""
    return max(1, round(1_000_000 / rate_per_second))


class Limit(NamedTuple):  # made per request: a tuple, cheaper than a frozen dataclass
    """Whose bucket a request counts against (kind: "token" or "addr") and its size."""

    kind: str
    identity: str
    rate_per_second: float
    burst: int


class RateLimiter:
    """The one limiter of both servers: a blocking face (`check_and_get`, redis-py: the stdlib
    server) and an event-loop face (`acheck_and_get`, the pipelined client of adapters/redis_async.py:
    granian), the same script, keys and decoding."""

    def __init__(self, client: redis.Redis, key_prefix: str) -> None:
        self.client = client
        self.key_prefix = key_prefix
        self._async_client: AsyncRedis | None = None  # the client that knows the script (for EVAL)

    def key(self, kind: str, identity: str) -> str:
        return f"{self.key_prefix}ratelimit:{kind}:{identity}"

    @staticmethod
    def _decode(reply: list[Any], interval: int, burst: int) -> tuple[Decision, list[bytes | None]]:
        return Decision.from_reply(reply, interval, burst), reply[4:]

    def check_and_get(self, limit: Limit, read_key: str | None) -> tuple[Decision, bytes | None]:
        """Counts one request against `limit`, and when it is admitted reads the value at
        `read_key` (None: absent) in the same script: one round trip for both."""
        decision, values = self.check_and_get_many(limit, () if read_key is None else (read_key,))
        return decision, values[0] if values else None

    def check_and_get_many(
        self, limit: Limit, read_keys: tuple[str, ...]
    ) -> tuple[Decision, list[bytes | None]]:
        """check_and_get() reading any number of keys: their values, in order (none when the
        request is refused)."""
        interval = interval_us(limit.rate_per_second)
        keys = (self.key(limit.kind, limit.identity), *read_keys)
        try:
            try:
                reply = self.client.evalsha(GCRA_SHA, len(keys), *keys, interval, limit.burst)
            except redis.exceptions.NoScriptError:  # Redis lost it (a restart, SCRIPT FLUSH)
                reply = self.client.eval(GCRA_SCRIPT, len(keys), *keys, interval, limit.burst)
        except redis.RedisError as exc:
            raise RateLimitUnavailable(type(exc).__name__) from exc
        return self._decode(reply, interval, limit.burst)

    async def acheck_and_get(
        self, limit: Limit, read_key: str | None, client: AsyncRedis
    ) -> tuple[Decision, bytes | None]:
        """check_and_get() on an event loop, through `client` (which sends the script whole on
        NOSCRIPT)."""
        decision, values = await self.acheck_and_get_many(
            limit, () if read_key is None else (read_key,), client
        )
        return decision, values[0] if values else None

    async def acheck_and_get_many(
        self, limit: Limit, read_keys: tuple[str, ...], client: AsyncRedis
    ) -> tuple[Decision, list[bytes | None]]:
        """check_and_get_many() on an event loop, through `client`."""
        if client is not self._async_client:
            client.script_sha(GCRA_SCRIPT)
            self._async_client = client
        interval = interval_us(limit.rate_per_second)
        try:
            keys = (self.key(limit.kind, limit.identity), *read_keys)
            reply = await client.evalsha(GCRA_SHA_BYTES, keys, (interval, limit.burst))
        except redis.RedisError as exc:
            raise RateLimitUnavailable(type(exc).__name__) from exc
        return self._decode(reply, interval, limit.burst)
