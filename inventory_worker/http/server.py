"""Serves the ReadAPI (http/api.py) over HTTP/1.1.

Two servers, one behaviour (`ReadAPI.handle`), chosen by `http.server`:
- `granian` (default): a Rust HTTP server running the API on an event loop (granian's RSGI
  interface, `RSGIApp`) in `http.workers` processes, blocking work in `http.threads` threads
  each (see README "Performance"). Its workers are granian's own processes: they read the
  consumers' health slots by name (heartbeats.py).
- `stdlib`: the standard library's ThreadingHTTPServer, in the http process.

Both bound what they read before the API sees anything: the request head, idle connections (a
timeout) and how many connections they serve at once (`granian_limits` maps the settings; the
stdlib server answers connections beyond http.max_connections 503, granian leaves them in the
listen backlog). ReadAPI.handle then applies the exact bounds itself (414, 431). Every method
reaches it, and it answers all but GET and HEAD with 405.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from inventory_worker.config import Settings
from inventory_worker.heartbeats import ProcessHealth
from inventory_worker.http.api import ReadAPI
from inventory_worker.logs import configure, get_logger
from inventory_worker.adapters.redis_async import AsyncRedis

log = get_logger(__name__)


class _Handler(BaseHTTPRequestHandler):
    api: ReadAPI
    server_version = "inventory-worker"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    # Buffer the response and send it in one write: with the default unbuffered wfile the
    # body goes out as a second small segment, and Nagle plus delayed ACKs stall every
    # keep-alive request by ~40 ms.
    wbufsize = -1
    disable_nagle_algorithm = True

    def _serve(self) -> None:
        resp = self.api.handle(self.command, self.path, self.headers, self.client_address[0])
        self.send_response(resp.status)
        self.send_header("Content-Type", resp.content_type)
        self.send_header("Content-Length", str(len(resp.body)))
        for k, v in resp.headers:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(resp.body)

    def handle_one_request(self) -> None:
        max_line = self.api.settings.http.max_request_line_bytes
        try:
            self.raw_requestline = self.rfile.readline(max_line + 1)
            if len(self.raw_requestline) > max_line:
                self.requestline = self.request_version = self.command = ""
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG, "request line too long")
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            if not self.parse_request():  # it has sent 400/431/505 itself
                return
            self._serve()  # any method: the API decides (405 for all but GET/HEAD)
            self.wfile.flush()
        except TimeoutError:
            self.close_connection = True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors found while parsing, as JSON like every other error; the connection is closed.

        The standard phrase only: the library's messages echo the client's bytes.
        """
        phrase = HTTPStatus(code).phrase
        body = json.dumps({"error": phrase.lower()}).encode()
        self.close_connection = True
        self.request_version = "HTTP/1.1"  # always a status line, even for an HTTP/0.9-looking request
        self.send_response(code, phrase)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and code >= 200 and code not in (204, 304):
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # access logs would drown the event log
        pass


_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
         b"Connection: close\r\nContent-Length: 33\r\n\r\n" + b'{"error": "too many connections"}')


class _BoundedServer(ThreadingHTTPServer):
    """A thread per connection, up to http.max_connections; beyond that 503 and close."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[_Handler], max_connections: int) -> None:
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                request.sendall(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def make_server(api: ReadAPI, host: str, port: int) -> ThreadingHTTPServer:
    handler = type("Handler", (_Handler,), {"api": api, "timeout": api.settings.http.client_timeout_seconds})
    return _BoundedServer((host, port), handler, api.settings.http.max_connections)


# How the http process hands its exact settings, and the name of the consumers' health segment
# ("name:consumers", see heartbeats.py), to granian's worker processes.
_SETTINGS_ENV = "INVENTORY_HTTP_SETTINGS_JSON"
_HEALTH_ENV = "INVENTORY_HTTP_HEALTH_SHM"


# ---- RSGI (granian) -------------------------------------------------------------------------


class RSGIApp:
    """The API as granian's native async interface (RSGI), one instance per worker process.

    The worker's event loop runs every request's gates and its one Redis round trip through a
    pipelined client (adapters/redis_async.py: the requests in flight share writes to Redis); blocking
    work (a cache miss read from PostgreSQL, /metrics, the probes) runs in a pool of
    `http.threads` threads, so it never stalls the loop.
    """

    def __init__(self, api: ReadAPI) -> None:
        self.api = api
        self.redis = AsyncRedis(api.settings.redis)
        self.executor = ThreadPoolExecutor(api.settings.http.threads, thread_name_prefix="http-blocking")

    def __rsgi_del__(self, loop: Any) -> None:  # granian: the worker's loop is stopping
        self.api.tally.flush()
        self.redis.close()
        self.executor.shutdown(wait=False)

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        if scope.proto != "http":  # websockets are off; nothing else is served
            return
        target = scope.path
        if scope.query_string:
            target += "?" + scope.query_string
        client = scope.client.rpartition(":")[0].strip("[]")  # "addr:port", "[v6]:port"
        method = scope.method
        resp = await self.api.handle_async(method, target, scope.headers, client, self.redis, self.executor)
        headers = [("content-type", resp.content_type), *resp.headers]
        if method == "HEAD":
            headers.append(("content-length", str(len(resp.body))))
            proto.response_empty(resp.status, headers)
        else:
            proto.response_bytes(resp.status, headers, resp.body)


def _stop_when_orphaned(parent: int) -> None:
    """granian's workers outlive a killed http process, and would go on serving the port next to
    the new one's (with stale settings): a worker whose parent is gone stops itself, as granian
    stops it (SIGTERM: in-flight requests finish), or exits after a grace period."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        log.warning("http process gone; granian worker stopping", parent_pid=parent)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
        os._exit(1)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def rsgi_app_from_env() -> RSGIApp:
    """granian's worker processes build the app here, from the settings the http process passed."""
    settings = Settings.model_validate_json(os.environ[_SETTINGS_ENV])
    configure(settings.logging, process="http", pid=os.getpid())
    _stop_when_orphaned(os.getppid())
    ready: dict[str, Any] = {}
    live: dict[str, Any] = {}
    if shm := os.environ.get(_HEALTH_ENV):
        name, consumers = shm.rsplit(":", 1)
        health = ProcessHealth.attach(name, int(consumers))  # mapped for this process's lifetime
        ready, live = health_checks(health, settings.worker.heartbeat_timeout_seconds)
    return RSGIApp(ReadAPI(settings, extra_ready_checks=ready, liveness_checks=live))


def granian_limits(settings: Settings) -> dict[str, Any]:
    """The http.* bounds in granian's terms (README "HTTP servers" says what differs).

    - max_connections -> backpressure: per worker process, the connections it serves at once;
      beyond that granian stops accepting and new connections wait in the listen backlog
      (the stdlib server answers them 503 instead).
    - client_timeout_seconds -> HTTP/1 header_read_timeout: a client must send a whole request
      head within it, also on an idle keep-alive connection, or the connection is closed.
    - max_request_line_bytes + max_header_bytes -> max_buffer_size: a request head that does not
      fit is refused with 431 by the server itself (its lower bound is 8 KiB). The exact bounds
      (414 for the line, 431 for header count and size) are ReadAPI.handle's own checks.
    """
    from granian.http import HTTP1Settings

    h = settings.http
    return {
        "backpressure": max(1, -(-h.max_connections // h.workers)),
        "http1_settings": HTTP1Settings(
            header_read_timeout=max(1, int(h.client_timeout_seconds * 1000)),
            keep_alive=True,
            max_buffer_size=max(8192, h.max_request_line_bytes + h.max_header_bytes + 4),
        ),
    }


def _serve_granian(settings: Settings, stop: threading.Event | Any, health: ProcessHealth | None) -> None:
    from granian import Granian
    from granian.constants import HTTPModes, Interfaces, Loops
    from granian.log import LogLevels

    os.environ[_SETTINGS_ENV] = settings.model_dump_json()
    if health is not None:  # granian's workers inherit the environment
        os.environ[_HEALTH_ENV] = f"{health.name}:{health.consumers}"
    else:  # served alone (bench/serve_http.py): no consumers to check
        os.environ.pop(_HEALTH_ENV, None)
    server = Granian(
        "inventory_worker.http.server:rsgi_app_from_env",
        factory=True,
        address=settings.http.host,
        port=settings.http.port,
        interface=Interfaces.RSGI,
        workers=settings.http.workers,
        loop=Loops.auto,  # uvloop (a dependency) when it is installed: ~1.5x the requests of asyncio's loop
        http=HTTPModes.http1,  # the API speaks HTTP/1.1, like the stdlib server
        **granian_limits(settings),
        log_access=False,
        log_level=LogLevels.warning,
    )

    def stop_when_asked() -> None:
        stop.wait()
        # What granian's own SIGTERM handler does (a method it leaves unannotated).
        server.signal_handler_interrupt()  # type: ignore[no-untyped-call]

    threading.Thread(target=stop_when_asked, name="http-stop", daemon=True).start()
    log.info("http listening", host=settings.http.host, port=settings.http.port, server="granian",
             workers=settings.http.workers)
    server.serve()


def health_checks(health: ProcessHealth, timeout: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """(readiness, liveness) checks on the consumer processes, for ReadAPI."""

    def attached() -> None:
        if missing := health.detached():
            raise RuntimeError("not attached to the queue: " + ", ".join(f"consumer-{i}" for i in missing))

    def heartbeats() -> None:
        if stuck := health.stuck(timeout):
            raise RuntimeError(f"no heartbeat for more than {timeout:g}s: "
                               + ", ".join(f"consumer-{i} ({health.age(i):.1f}s)" for i in stuck))

    return {"consumers": attached}, {"consumers": heartbeats}


def serve(settings: Settings, stop: threading.Event | Any, health: ProcessHealth | None = None) -> None:
    if settings.http.server == "granian":
        _serve_granian(settings, stop, health)
        return
    ready, live = health_checks(health, settings.worker.heartbeat_timeout_seconds) if health else ({}, {})
    api = ReadAPI(settings, extra_ready_checks=ready, liveness_checks=live)
    server = make_server(api, settings.http.host, settings.http.port)
    log.info("http listening", host=settings.http.host, port=server.server_address[1], server="stdlib")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    stop.wait()
    server.shutdown()
    server.server_close()
    api.tally.flush()
