"""The read-only HTTP API: what each request gets, independent of any HTTP server.

`ReadAPI.handle()` is the whole behaviour; `http_server.py` puts it behind a server. Routes:
  GET /inventory/{product_id}  figures from Redis; on a miss from PostgreSQL (and Redis refilled)
  GET /healthz                 the worker is alive: no consumer process stuck, else 503
  GET /readyz                  PostgreSQL, Redis and RabbitMQ reachable and every consumer
                               attached to its queue, else 503 naming which check fails
  GET /metrics                 Prometheus exposition of every worker process
  GET /openapi.json            the OpenAPI 3 description of this API (docs/openapi.json)
Every other method is 405: there is no write path.

Every request passes the same gates, in this order, before any route code runs:
  1. input bounds: request line (414), header count and size (431), method (405);
  2. routes that need a role (auth.py): the rate limit, per token or else per client address
     (ratelimit.py: 429, or 503 when Redis cannot say), then the token (401) and its roles (403);
  3. the route itself; a product id that breaks the contract's rules is 400 before it is used.
"""

from __future__ import annotations

import json
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from urllib.parse import unquote

from . import amqp, metrics
from .auth import Authenticator, Principal
from .cache import StockCache, encode_figures
from .config import Settings
from .ratelimit import Decision, RateLimiter, RateLimitUnavailable
from .contract import PRODUCT_ID_PATTERN
from .logs import get_logger
from .store import Store

log = get_logger(__name__)

_PRODUCT_ID = re.compile(PRODUCT_ID_PATTERN)
JSON = "application/json"


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = JSON
    headers: list[tuple[str, str]] = field(default_factory=list)


def error(status: int, message: str, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(status, json.dumps({"error": message}).encode(), JSON, headers or [])


@cache
def openapi_document() -> bytes:
    """docs/openapi.json, from a checkout or a wheel install (INVENTORY_DOCS_DIR overrides)."""
    env = os.environ.get("INVENTORY_DOCS_DIR")
    candidates = [Path(env)] if env else []
    candidates += [Path(__file__).resolve().parent.parent / "docs",
                   Path(sys.prefix) / "share" / "inventory-worker" / "docs"]
    for c in candidates:
        if (c / "openapi.json").is_file():
            return (c / "openapi.json").read_bytes()
    raise FileNotFoundError("cannot find docs/openapi.json; set INVENTORY_DOCS_DIR")


READY_CACHE_SECONDS = 1.0
_ROUTES = {"/healthz", "/readyz", "/metrics", "/openapi.json"}
_INVENTORY = "/inventory/"


class StorePool:
    """A few PostgreSQL connections shared by the HTTP threads (cache misses and /readyz)."""

    def __init__(self, settings: Settings, size: int = 4) -> None:
        self._free: queue.LifoQueue[Store] = queue.LifoQueue()
        for _ in range(size):
            self._free.put(Store(settings.database))

    @contextmanager
    def store(self) -> Iterator[Store]:
        s = self._free.get(timeout=10)
        try:
            yield s
        finally:
            self._free.put(s)


class ReadAPI:
    def __init__(
        self,
        settings: Settings,
        cache: StockCache | None = None,
        stores: StorePool | None = None,
        extra_ready_checks: Mapping[str, Callable[[], None]] | None = None,
        liveness_checks: Mapping[str, Callable[[], None]] | None = None,
    ) -> None:
        self.settings = settings
        self.cache = cache or StockCache(settings.redis)
        self.stores = stores or StorePool(settings)
        self._ready_lock = threading.Lock()
        self._ready_cache: tuple[float, tuple[int, bytes]] | None = None
        self.auth = Authenticator(settings.auth)
        self.limiter = RateLimiter(self.cache.client, settings.redis.key_prefix)
        self._limiter_warned_at = -1e9
        if not self.auth.has_tokens:
            log.warning("no API tokens configured: /inventory answers 401 to everyone "
                        "(create one with `inventory-worker token create NAME --role inventory:read`)")
        # Dependencies cost a connection each: checked at most once per READY_CACHE_SECONDS.
        self.dependency_checks: dict[str, Callable[[], None]] = {
            "postgresql": self._check_postgresql,
            "redis": self.cache.ping,
            "rabbitmq": self._check_rabbitmq,
        }
        # In-process state (e.g. every consumer attached): cheap, checked on every probe.
        self.local_ready_checks: dict[str, Callable[[], None]] = dict(extra_ready_checks or {})
        # Each raises when the worker is alive but wedged (e.g. a consumer's heartbeat is stale).
        self.liveness_checks: dict[str, Callable[[], None]] = dict(liveness_checks or {})

    def handle(self, method: str, path: str, headers: Mapping[str, str], client: str = "") -> Response:
        started = time.perf_counter()
        route, resp = self._route(method, path, headers, client)
        metrics.HTTP_REQUESTS.labels(route, str(resp.status)).inc()
        metrics.HTTP_SECONDS.labels(route).observe(time.perf_counter() - started)
        return resp

    def _route(self, method: str, target: str, headers: Mapping[str, str], client: str) -> tuple[str, Response]:
        limits = self.settings.http
        # "METHOD SP target SP HTTP/1.1": the server adapter bounds the raw line too.
        if len(method) + len(target) + 10 > limits.max_request_line_bytes:
            return "other", error(414, "request line too long")
        items = list(headers.items())
        if len(items) > limits.max_headers or sum(len(k) + len(v) + 4 for k, v in items) > limits.max_header_bytes:
            return "other", error(431, "request header fields too large")
        path = target.split("?", 1)[0]
        if path.startswith(_INVENTORY):
            route = "/inventory/{product_id}"
        elif path in _ROUTES:
            route = path
        else:
            route = "other"
        # Before the 404: there is no write method on any path, known or not.
        if method not in ("GET", "HEAD"):
            return route, error(405, "method not allowed: this endpoint is read-only", [("Allow", "GET, HEAD")])
        if route == "other":
            return route, error(404, "not found")
        role = self.auth.required_role(route)
        if role is None:
            return route, self._open(route)
        principal = self.auth.authenticate(headers)
        try:
            decision = self._limit(principal, client)
        except RateLimitUnavailable as exc:
            if time.monotonic() - self._limiter_warned_at > 10:  # one line per 10 s, not one per request
                self._limiter_warned_at = time.monotonic()
                log.warning("rate limiter unavailable; refusing requests with 503", error=str(exc))
            return route, error(503, "rate limiter unavailable; try again shortly", [("Retry-After", "1")])
        limit_headers = decision.headers() if decision is not None else []
        if decision is not None and not decision.allowed:
            return route, error(429, "too many requests", limit_headers)
        if principal is None:
            challenge = 'Bearer realm="inventory"'
            if headers.get("Authorization") or headers.get("authorization"):
                challenge += ', error="invalid_token"'
            return route, error(401, "a valid bearer token is required", [("WWW-Authenticate", challenge)]
                                + limit_headers)
        if role not in principal.roles:
            return route, error(403, f"this token lacks the role {role}",
                                [("WWW-Authenticate", f'Bearer realm="inventory", error="insufficient_scope", '
                                                      f'scope="{role}"')] + limit_headers)
        resp = self._stock(path[len(_INVENTORY):]) if route != "/metrics" else self._metrics()
        resp.headers.extend(limit_headers)
        return route, resp

    def _limit(self, principal: Principal | None, client: str) -> Decision | None:
        """One request counted against its client's limit; None when rate limiting is off."""
        rl = self.settings.rate_limit
        if not rl.enabled:
            return None
        if principal is not None:
            return self.limiter.check("token", principal.name, principal.rate_per_second or rl.rate_per_second,
                                      principal.burst or rl.burst)
        return self.limiter.check("addr", client or "unknown", rl.anonymous_rate_per_second, rl.anonymous_burst)

    def _open(self, route: str) -> Response:
        if route == "/healthz":
            return self._verdict(self._failures(self.liveness_checks), sorted(self.liveness_checks),
                                 "ok", "unhealthy")
        if route == "/readyz":
            return self._readyz()
        if route == "/openapi.json":
            return Response(200, openapi_document())
        return self._metrics()

    def _metrics(self) -> Response:
        body, ctype = metrics.exposition()
        return Response(200, body, ctype)

    def _stock(self, segment: str) -> Response:
        # Percent-decoded first ("%3A" is ":"), then held to the contract's rules: what passes
        # is letters, digits and ._:- only, safe for every key and query it is used in.
        try:
            product_id = unquote(segment, errors="strict")
        except UnicodeDecodeError:
            product_id = ""
        if not _PRODUCT_ID.fullmatch(product_id):
            return error(400, "invalid product id: 1 to 64 characters of letters, digits and ._:-")
        try:
            cached = self.cache.get(product_id)
        except Exception as exc:
            log.warning("cache read failed; reading PostgreSQL", error=repr(exc))
            cached = None
        if cached is not None:
            metrics.CACHE.labels("hit").inc()
            return Response(200, cached)
        metrics.CACHE.labels("miss").inc()
        try:
            with self.stores.store() as store:
                figures = store.stock(product_id)
        except Exception as exc:
            log.warning("stock read failed", error=repr(exc))
            return error(503, "stock figures are unavailable right now")
        if figures is None:
            return error(404, "unknown product")
        try:
            self.cache.put_many([figures])
        except Exception as exc:  # serve the figures anyway
            log.warning("cache refill failed", error=repr(exc))
        return Response(200, encode_figures(figures))

    def _readyz(self) -> Response:
        """The probe is open to anyone: the dependencies are checked once per READY_CACHE_SECONDS
        however many ask, so a flood of probes cannot become a flood of connections."""
        with self._ready_lock:
            now = time.monotonic()
            if self._ready_cache is None or now - self._ready_cache[0] >= READY_CACHE_SECONDS:
                self._ready_cache = (time.monotonic(), self._failures(self.dependency_checks))
            failing = dict(self._ready_cache[1])
        failing.update(self._failures(self.local_ready_checks))
        checks = sorted({*self.dependency_checks, *self.local_ready_checks})
        return self._verdict(failing, checks, "ready", "unavailable")

    @staticmethod
    def _failures(checks: Mapping[str, Callable[[], None]]) -> dict[str, str]:
        failing = {}
        for name, check in checks.items():
            try:
                check()
            except Exception as exc:
                failing[name] = str(exc) or type(exc).__name__
        return failing

    @staticmethod
    def _verdict(failing: dict[str, str], checks: list[str], ok: str, bad: str) -> Response:
        if failing:
            # The probes are open to anyone: the body names what fails, the log says why.
            log.warning("health check failing", status=bad, failing=failing)
            return Response(503, json.dumps({"status": bad, "failing": sorted(failing)}).encode())
        return Response(200, json.dumps({"status": ok, "checks": checks}).encode())

    def _check_postgresql(self) -> None:
        with self.stores.store() as store:
            store.ping()

    def _check_rabbitmq(self) -> None:
        conn = amqp.connect(self.settings.rabbitmq)
        try:
            conn.channel().queue_declare(self.settings.rabbitmq.queue, passive=True)
        finally:
            conn.close()
