"""The read-only HTTP API: what each request gets, independent of any HTTP server.

`ReadAPI.handle()` (blocking clients, the stdlib server) and `ReadAPI.handle_async()` (an event
loop, granian) are the whole behaviour, the same gates and answers; `http/server.py` puts them
behind a server. Routes:
  GET /inventory/{product_id}  figures from Redis; on a miss from PostgreSQL (and Redis refilled)
  GET /inventory/{product_id}/detail[?channel=ID]
                               the detail document (levels per location, states, policy), cached
                               and refilled likewise; with ?channel= the channel's figures, computed
                               from it and the channel's cached configuration
  GET /healthz                 the worker is alive: no consumer process stuck, else 503
  GET /readyz                  PostgreSQL, Redis and RabbitMQ reachable and every consumer
                               attached to its queue, else 503 naming which check fails
  GET /metrics                 Prometheus exposition of every worker process
  GET /openapi.json            the OpenAPI 3 description of this API (docs/openapi.json)
Every other method is 405: there is no write path.

Every request passes the same gates, in this order, before any route code runs:
  1. input bounds: request line (414), header count and size (431), method (405);
  2. routes that need a role (http/auth.py): the rate limit, per token or else per client address
     (http/ratelimit.py: 429, or 503 when Redis cannot say), then the token (401) and its roles (403);
  3. the route itself; a product (or channel) id that breaks the contract's rules is 400 before
     it is used.
A request with more than one Authorization header is 400 on every route that needs a role.
An admitted stock read costs one Redis call: the rate-limit script returns the cached figures too
(for a detail read: the cached detail document, and the channel's configuration if asked).
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, unquote

import orjson

from inventory_worker import metrics
from inventory_worker.adapters.postgres import Store
from inventory_worker.adapters.redis_async import AsyncRedis
from inventory_worker.adapters.redis_cache import StockCache, encode_detail, encode_figures
from inventory_worker.config import AuthSettings, HTTPSettings, RateLimitSettings
from inventory_worker.contract import PRODUCT_ID_PATTERN
from inventory_worker.http.auth import Authenticator, Headers, Principal
from inventory_worker.http.ratelimit import Decision, Limit, RateLimiter, RateLimitUnavailable
from inventory_worker.http.tally import HttpTally
from inventory_worker.logs import get_logger

log = get_logger(__name__)

_PRODUCT_ID = re.compile(PRODUCT_ID_PATTERN)
JSON = "application/json"


@dataclass(slots=True)
class _Pending:
    """A request past the gates that need no I/O, waiting for its Redis step."""

    route: str
    role: str
    principal: Principal | None
    product_id: str | None  # None: not a valid id (or the /metrics route)
    read_keys: tuple[str, ...]  # the cached documents to read with the rate-limit decision
    limit: Limit | None  # None: limiting off
    sent_authorization: bool
    channel_id: str | None = None  # the detail route's ?channel=
    channel_invalid: bool = False


@dataclass(slots=True)
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
    candidates += [
        Path(__file__).resolve().parents[2] / "docs",
        Path(sys.prefix) / "share" / "inventory-worker" / "docs",
    ]
    for c in candidates:
        if (c / "openapi.json").is_file():
            return (c / "openapi.json").read_bytes()
    raise FileNotFoundError("cannot find docs/openapi.json; set INVENTORY_DOCS_DIR")


READY_CACHE_SECONDS = 1.0
_DEFERRED = 0  # the status of an open route's placeholder answer (see ReadAPI._begin)
_ROUTES = {"/healthz", "/readyz", "/metrics", "/openapi.json"}
_INVENTORY = "/inventory/"
_DETAIL = "/detail"
DETAIL_ROUTE = "/inventory/{product_id}/detail"
_INVALID_PRODUCT = "invalid product id: 1 to 64 characters of letters, digits and ._:-"
_INVALID_CHANNEL = "invalid channel id: 1 to 64 characters of letters, digits and ._:-"


def channel_figures(detail: dict[str, Any], channel: dict[str, Any]) -> dict[str, Any]:
    """The `channel` part of a detail document: `available` sums the levels at the channel's
    active, order-fulfilling locations (every such location when the channel names none: the
    default rule); `orderable` adds the product's backorder headroom (null when unlimited)."""
    names = channel.get("locations")
    chosen = set(names) if names is not None else None
    available = sum(
        int(level["available"])
        for level in detail["locations"]
        if level["active"] and level["fulfils_orders"] and (chosen is None or level["location_id"] in chosen)
    )
    headroom = (detail.get("backorder") or {}).get("headroom", 0)
    return {
        "channel_id": channel["channel_id"],
        "strategy": channel["strategy"],
        "available": available,
        "orderable": None if headroom is None else available + int(headroom),
    }


class StorePool:
    """A few PostgreSQL connections shared by the HTTP threads (cache misses and /readyz)."""

    def __init__(self, stores: Iterable[Store]) -> None:
        self._free: queue.LifoQueue[Store] = queue.LifoQueue()
        for s in stores:
            self._free.put(s)

    @contextmanager
    def store(self) -> Iterator[Store]:
        s = self._free.get(timeout=10)
        try:
            yield s
        finally:
            self._free.put(s)


class ReadAPI:
    """Built by bootstrap.read_api(), which gives it its adapters."""

    def __init__(
        self,
        http: HTTPSettings,
        auth: AuthSettings,
        rate_limit: RateLimitSettings,
        *,
        cache: StockCache,
        stores: StorePool,
        limiter: RateLimiter,
        check_rabbitmq: Callable[[], None],
        extra_ready_checks: Mapping[str, Callable[[], None]] | None = None,
        liveness_checks: Mapping[str, Callable[[], None]] | None = None,
    ) -> None:
        self.http = http
        self.rate_limit = rate_limit
        self.cache = cache
        self.stores = stores
        self._ready_lock = threading.Lock()
        self._ready_cache: tuple[float, dict[str, str]] | None = None  # (when, failing checks)
        self.auth = Authenticator(auth)
        self.limiter = limiter
        self._limiter_warned_at = -1e9
        self.tally = HttpTally()
        if not self.auth.has_tokens:
            log.warning(
                "no API tokens configured: /inventory answers 401 to everyone "
                "(create one with `inventory-worker token create NAME --role inventory:read`)"
            )
        # Dependencies cost a connection each: checked at most once per READY_CACHE_SECONDS.
        self.dependency_checks: dict[str, Callable[[], None]] = {
            "postgresql": self._check_postgresql,
            "redis": self.cache.ping,
            "rabbitmq": check_rabbitmq,
        }
        # In-process state (e.g. every consumer attached): cheap, checked on every probe.
        self.local_ready_checks: dict[str, Callable[[], None]] = dict(extra_ready_checks or {})
        # Each raises when the worker is alive but wedged (e.g. a consumer's heartbeat is stale).
        self.liveness_checks: dict[str, Callable[[], None]] = dict(liveness_checks or {})

    # A request's life: _begin (bounds, route, auth: no I/O), then at most one Redis round trip
    # (the rate-limit script, which also reads the cached figures when the request is admitted
    # to a stock read), then _decide; only a cache miss (PostgreSQL), /metrics and the probes
    # do blocking work after that. handle() runs it with blocking clients (the stdlib server),
    # handle_async() on an event loop (granian's RSGI workers) with the pipelined client.

    def handle(self, method: str, path: str, headers: Headers, client: str = "") -> Response:
        started = time.perf_counter()
        p = self._begin(method, path, headers, client)
        if isinstance(p, _Pending):
            decision: Decision | None = None
            cached: list[bytes | None] = []
            try:
                if p.limit is not None:
                    decision, cached = self.limiter.check_and_get_many(p.limit, p.read_keys)
                elif p.read_keys:
                    cached = self._read_cache(p.read_keys)
            except RateLimitUnavailable as exc:
                resp = self._limiter_unavailable(exc)
            else:
                step = self._decide(p, decision, cached)
                resp = step() if callable(step) else step
            route = p.route
        else:
            route, resp = p
            if resp.status == _DEFERRED:
                resp = self._open(route)
        self._observe(route, resp, started)
        return resp

    async def handle_async(
        self,
        method: str,
        path: str,
        headers: Headers,
        client: str,
        redis_client: AsyncRedis,
        executor: Executor,
    ) -> Response:
        """handle() on an event loop: the Redis step through `redis_client`, blocking work in
        `executor`."""
        started = time.perf_counter()
        p = self._begin(method, path, headers, client)
        loop = asyncio.get_running_loop()
        if isinstance(p, _Pending):
            decision: Decision | None = None
            cached: list[bytes | None] = []
            try:
                if p.limit is not None:
                    decision, cached = await self.limiter.acheck_and_get_many(
                        p.limit, p.read_keys, redis_client
                    )
                elif p.read_keys:
                    try:
                        cached = await redis_client.execute(b"MGET", *p.read_keys)
                    except Exception as exc:
                        log.warning("cache read failed; reading PostgreSQL", error=repr(exc))
            except RateLimitUnavailable as exc:
                resp = self._limiter_unavailable(exc)
            else:
                step = self._decide(p, decision, cached)
                resp = await loop.run_in_executor(executor, step) if callable(step) else step
            route = p.route
        else:
            route, resp = p
            if resp.status == _DEFERRED:  # a probe, the document or open metrics: may block
                resp = await loop.run_in_executor(executor, self._open, route)
        self._observe(route, resp, started)
        return resp

    def _observe(self, route: str, resp: Response, started: float) -> None:
        self.tally.request(route, resp.status, time.perf_counter() - started)

    def _begin(
        self, method: str, target: str, headers: Headers, client: str
    ) -> tuple[str, Response] | _Pending:
        """The gates that need no I/O: an answer (route, response), or what to ask Redis.
        An open route is answered (route, _DEFERRED) for the caller to run self._open(route)."""
        limits = self.http
        # "METHOD SP target SP HTTP/1.1": the server adapter bounds the raw line too.
        if len(method) + len(target) + 10 > limits.max_request_line_bytes:
            return "other", error(414, "request line too long")
        items = headers.items()
        if (
            len(items) > limits.max_headers
            or sum(len(k) + len(v) + 4 for k, v in items) > limits.max_header_bytes
        ):
            return "other", error(431, "request header fields too large")
        path, _, query = target.partition("?")
        if path.startswith(_INVENTORY):
            route = DETAIL_ROUTE if path.endswith(_DETAIL) else "/inventory/{product_id}"
        elif path in _ROUTES:
            route = path
        else:
            route = "other"
        # Before the 404: there is no write method on any path, known or not.
        if method not in ("GET", "HEAD"):
            return route, error(
                405, "method not allowed: this endpoint is read-only", [("Allow", "GET, HEAD")]
            )
        if route == "other":
            return route, error(404, "not found")
        role = self.auth.required_role(route)
        if role is None:
            return route, Response(_DEFERRED)
        # Two Authorization headers: which one counts would be the server's guess (and a proxy's
        # may differ), so neither does.
        if sum(1 for k, _ in items if k.lower() == "authorization") > 1:
            return route, error(400, "more than one Authorization header")
        principal = self.auth.authenticate(headers)
        product_id = None
        if route == "/inventory/{product_id}":
            product_id = self._product_id(path[len(_INVENTORY) :])
        elif route == DETAIL_ROUTE:
            product_id = self._product_id(path[len(_INVENTORY) : -len(_DETAIL)])
        # Redis reads the figures only for a request that will be served them: a valid token
        # with the role and a valid id (anything else is answered without them).
        read = principal is not None and role in principal.roles and product_id is not None
        limit = self._limit(principal, client)
        sent_authorization = bool(headers.get("Authorization") or headers.get("authorization"))
        if route != DETAIL_ROUTE:
            stock_keys = (self.cache.key(product_id),) if read and product_id is not None else ()
            return _Pending(route, role, principal, product_id, stock_keys, limit, sent_authorization)
        channel_id, channel_invalid = self._channel_id(query)
        read_keys: tuple[str, ...] = ()
        if read and product_id is not None and not channel_invalid:
            read_keys = (self.cache.detail_key(product_id),)
            if channel_id is not None:
                read_keys += (self.cache.channel_key(channel_id),)
        return _Pending(
            route,
            role,
            principal,
            product_id,
            read_keys,
            limit,
            sent_authorization,
            channel_id,
            channel_invalid,
        )

    def _decide(
        self, p: _Pending, decision: Decision | None, cached: list[bytes | None]
    ) -> Response | Callable[[], Response]:
        """The answer after the Redis step, or a function doing the blocking rest (a cache miss
        read from PostgreSQL, /metrics) that returns it."""
        limit_headers = decision.headers() if decision is not None else []
        if decision is not None and not decision.allowed:
            return error(429, "too many requests", limit_headers)
        if p.principal is None:
            challenge = 'Bearer realm="inventory"'
            if p.sent_authorization:
                challenge += ', error="invalid_token"'
            return error(
                401, "a valid bearer token is required", [("WWW-Authenticate", challenge)] + limit_headers
            )
        if p.role not in p.principal.roles:
            return error(
                403,
                f"this token lacks the role {p.role}",
                [
                    (
                        "WWW-Authenticate",
                        f'Bearer realm="inventory", error="insufficient_scope", scope="{p.role}"',
                    )
                ]
                + limit_headers,
            )
        if p.route == "/metrics":
            return lambda: self._with_headers(self._metrics(), limit_headers)
        if p.product_id is None:
            return error(400, _INVALID_PRODUCT, limit_headers)
        product_id = p.product_id
        if p.route == DETAIL_ROUTE:
            return self._decide_detail(p, product_id, cached, limit_headers)
        if cached and cached[0] is not None:
            self.tally.cache("hit")
            return Response(200, cached[0], JSON, limit_headers)
        return lambda: self._with_headers(self._stock_from_db(product_id), limit_headers)

    def _decide_detail(
        self, p: _Pending, product_id: str, cached: list[bytes | None], limit_headers: list[tuple[str, str]]
    ) -> Response | Callable[[], Response]:
        if p.channel_invalid:
            return error(400, _INVALID_CHANNEL, limit_headers)
        detail = cached[0] if cached else None
        channel = cached[1] if len(cached) > 1 else None
        channel_id = p.channel_id
        if detail is not None and (channel_id is None or channel is not None):
            self.tally.cache("hit")
            return self._with_headers(self._detail_response(detail, channel), limit_headers)
        return lambda: self._with_headers(
            self._detail_from_db(product_id, channel_id, detail, channel), limit_headers
        )

    @staticmethod
    def _channel_id(query: str) -> tuple[str | None, bool]:
        """The ?channel= of a detail request: (id or None, whether it is invalid). Given more
        than once, or breaking the id rules, it is invalid; other parameters are ignored."""
        if not query:
            return None, False
        try:
            values = parse_qs(query, keep_blank_values=True, errors="strict").get("channel")
        except (UnicodeDecodeError, ValueError):
            return None, True
        if values is None:
            return None, False
        if len(values) != 1 or not _PRODUCT_ID.fullmatch(values[0]):
            return None, True
        return values[0], False

    @staticmethod
    def _with_headers(resp: Response, headers: list[tuple[str, str]]) -> Response:
        resp.headers.extend(headers)
        return resp

    def _limiter_unavailable(self, exc: Exception) -> Response:
        if time.monotonic() - self._limiter_warned_at > 10:  # one line per 10 s, not one per request
            self._limiter_warned_at = time.monotonic()
            log.warning("rate limiter unavailable; refusing requests with 503", error=str(exc))
        return error(503, "rate limiter unavailable; try again shortly", [("Retry-After", "1")])

    def _limit(self, principal: Principal | None, client: str) -> Limit | None:
        """Whose limit a request counts against; None when limiting is off."""
        rl = self.rate_limit
        if not rl.enabled:
            return None
        if principal is not None:
            return Limit(
                "token",
                principal.name,
                principal.rate_per_second or rl.rate_per_second,
                principal.burst or rl.burst,
            )
        return Limit("addr", client or "unknown", rl.anonymous_rate_per_second, rl.anonymous_burst)

    def _open(self, route: str) -> Response:
        if route == "/healthz":
            return self._verdict(
                self._failures(self.liveness_checks), sorted(self.liveness_checks), "ok", "unhealthy"
            )
        if route == "/readyz":
            return self._readyz()
        if route == "/openapi.json":
            return Response(200, openapi_document())
        return self._metrics()

    def _metrics(self) -> Response:
        self.tally.flush()  # this process's latest requests (the others' flush on their own)
        body, ctype = metrics.exposition()
        return Response(200, body, ctype)

    @staticmethod
    def _product_id(segment: str) -> str | None:
        """The product id of a path segment, or None when it breaks the contract's rules.

        Percent-decoded first ("%3A" is ":"), then held to the rules: what passes is letters,
        digits and ._:- only, safe for every key and query it is used in."""
        try:
            product_id = unquote(segment, errors="strict")
        except UnicodeDecodeError:
            return None
        return product_id if _PRODUCT_ID.fullmatch(product_id) else None

    def _read_cache(self, keys: tuple[str, ...]) -> list[bytes | None]:
        try:
            if len(keys) == 1:
                return [cast("bytes | None", self.cache.client.get(keys[0]))]  # the client does not decode
            return cast("list[bytes | None]", self.cache.client.mget(keys))
        except Exception as exc:
            log.warning("cache read failed; reading PostgreSQL", error=repr(exc))
            return []

    def _stock_from_db(self, product_id: str) -> Response:
        """A cache miss: the figures from PostgreSQL, and Redis refilled."""
        self.tally.cache("miss")
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

    @staticmethod
    def _detail_response(detail: bytes, channel: bytes | None) -> Response:
        """The detail document as cached, or with its `channel` part computed now."""
        if channel is None:
            return Response(200, detail)
        doc = orjson.loads(detail)
        doc["channel"] = channel_figures(doc, orjson.loads(channel))
        return Response(200, orjson.dumps(doc))

    def _detail_from_db(
        self, product_id: str, channel_id: str | None, detail: bytes | None, channel: bytes | None
    ) -> Response:
        """A detail read that missed the cache: what is missing from PostgreSQL, cached again."""
        self.tally.cache("miss")
        doc = chan = None
        try:
            with self.stores.store() as store:
                if detail is None:
                    doc = store.product_detail(product_id)
                if channel_id is not None and channel is None and (detail is not None or doc is not None):
                    chan = store.channel(channel_id)
        except Exception as exc:
            log.warning("stock read failed", error=repr(exc))
            return error(503, "stock figures are unavailable right now")
        if detail is None:
            if doc is None:
                return error(404, "unknown product")
            detail = encode_detail(doc)
            try:
                self.cache.put_detail(doc, detail)
            except Exception as exc:  # serve it anyway
                log.warning("cache refill failed", error=repr(exc))
        if channel_id is not None and channel is None:
            if chan is None:
                return error(404, "unknown channel")
            channel = orjson.dumps(chan)
            try:
                self.cache.put_channel(channel_id, channel)
            except Exception as exc:
                log.warning("cache refill failed", error=repr(exc))
        return self._detail_response(detail, channel)

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
