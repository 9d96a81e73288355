"""Rate limiting for the HTTP API, shared by every process and replica through Redis.

GCRA (the generic cell rate algorithm, a token bucket kept as one timestamp): each client key
holds its "theoretical arrival time" (TAT). A request is allowed when it does not arrive more
than `burst` emission intervals before the TAT; allowing it moves the TAT one interval on. The
whole decision is one Lua script, atomic in Redis, one round trip, clocked by Redis's own TIME
(so replicas with skewed clocks agree). One key per client: a limited client costs the others
nothing but its own O(1) script calls.

If Redis cannot answer, `check` raises RateLimitUnavailable and the API answers 503: an
endpoint that serves without limits whenever Redis hiccups is not rate limited.

Response headers (draft-ietf-httpapi-ratelimit-headers, the separate-field form):
  RateLimit-Limit      the burst: requests allowed at once from a full bucket
  RateLimit-Remaining  requests still allowed right now
  RateLimit-Reset      seconds until the bucket is full again
  RateLimit-Policy     `<burst>;w=<seconds to refill it>`
  Retry-After          (429 only) seconds until the next request will be allowed
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import redis

# KEYS[1] the client's key. ARGV[1] emission interval (µs per request), ARGV[2] burst.
# Returns {allowed (0/1), remaining, retry_after_us, reset_us}.
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
return {1, math.floor((now - allow_at) / interval), 0, new_tat - now}
"""


class RateLimitUnavailable(Exception):
    """Redis did not answer: the request cannot be admitted (503)."""


@dataclass(frozen=True)
class Decision:
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


class RateLimiter:
    def __init__(self, client: redis.Redis, key_prefix: str) -> None:
        self.client = client
        self.key_prefix = key_prefix
        self._script = client.register_script(_GCRA)

    def key(self, kind: str, identity: str) -> str:
        return f"{self.key_prefix}ratelimit:{kind}:{identity}"

    def check(self, kind: str, identity: str, rate_per_second: float, burst: int) -> Decision:
        """Counts one request of `identity` (kind: "token" or "addr") against its limit."""
        interval_us = max(1, round(1_000_000 / rate_per_second))
        try:
            allowed, remaining, retry_us, reset_us = self._script(
                keys=[self.key(kind, identity)], args=[interval_us, burst]
            )
        except redis.RedisError as exc:
            raise RateLimitUnavailable(type(exc).__name__) from exc
        return Decision(
            allowed=bool(allowed),
            limit=burst,
            remaining=int(remaining),
            retry_after_seconds=max(1, math.ceil(int(retry_us) / 1_000_000)),
            reset_seconds=math.ceil(int(reset_us) / 1_000_000),
            window_seconds=max(1, math.ceil(burst * interval_us / 1_000_000)),
        )
