"""The read-only HTTP API: what each request gets, independent of any HTTP server.

`ReadAPI.handle()` is the whole behaviour; `http_server.py` puts it behind a server. Routes:
  GET /inventory/{product_id}  figures from Redis; on a miss from PostgreSQL (and Redis refilled)
  GET /healthz                 the process is alive
  GET /readyz                  PostgreSQL, Redis and RabbitMQ reachable, else 503 naming which
  GET /metrics                 Prometheus exposition of every worker process
Every other method is 405: there is no write path.
"""

from __future__ import annotations

import json
import queue
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

from . import amqp, metrics
from .cache import StockCache, encode_figures
from .config import Settings
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
    ) -> None:
        self.settings = settings
        self.cache = cache or StockCache(settings.redis)
        self.stores = stores or StorePool(settings)
        self.ready_checks: dict[str, Callable[[], None]] = {
            "postgresql": self._check_postgresql,
            "redis": self.cache.ping,
            "rabbitmq": self._check_rabbitmq,
            **(extra_ready_checks or {}),
        }

    def handle(self, method: str, path: str, headers: Mapping[str, str], client: str = "") -> Response:
        route, resp = self._route(method, path)
        metrics.HTTP_REQUESTS.labels(route, str(resp.status)).inc()
        return resp

    def _route(self, method: str, target: str) -> tuple[str, Response]:
        path = target.split("?", 1)[0]
        if path.startswith("/inventory/"):
            route = "/inventory/{product_id}"
        elif path in ("/healthz", "/readyz", "/metrics"):
            route = path
        else:
            route = "other"
        # Before the 404: there is no write method on any path, known or not.
        if method not in ("GET", "HEAD"):
            return route, error(405, "method not allowed: this endpoint is read-only", [("Allow", "GET, HEAD")])
        if route == "other":
            return route, error(404, "not found")
        if route == "/healthz":
            return route, Response(200, b'{"status":"ok"}')
        if route == "/readyz":
            return route, self._readyz()
        if route == "/metrics":
            body, ctype = metrics.exposition()
            return route, Response(200, body, ctype)
        return route, self._stock(path[len("/inventory/"):])

    def _stock(self, product_id: str) -> Response:
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
        failing = {}
        for name, check in self.ready_checks.items():
            try:
                check()
            except Exception as exc:
                failing[name] = str(exc) or type(exc).__name__
        if failing:
            body = {"status": "unavailable", "failing": sorted(failing), "detail": failing}
            return Response(503, json.dumps(body).encode())
        return Response(200, json.dumps({"status": "ready", "checks": sorted(self.ready_checks)}).encode())

    def _check_postgresql(self) -> None:
        with self.stores.store() as store:
            store.ping()

    def _check_rabbitmq(self) -> None:
        conn = amqp.connect(self.settings.rabbitmq)
        try:
            conn.channel().queue_declare(self.settings.rabbitmq.queue, passive=True)
        finally:
            conn.close()
