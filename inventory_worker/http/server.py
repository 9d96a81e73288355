"""Serves the ReadAPI (http/api.py) over HTTP/1.1.

Two servers, one behaviour (`ReadAPI.handle`), chosen by `http.server`:
- `granian` (default): a Rust HTTP server running the API on an event loop (granian's RSGI
  interface, `RSGIApp`) in `http.workers` processes, blocking work in `http.threads` threads
  each (see README "Performance"). Its workers are granian's own processes: they read the
  consumers' health slots by name (heartbeats.py).
- `stdlib`: the standard library's ThreadingHTTPServer, in the http process.

Why the stdlib server stays, though granian serves reads at 4.8x its rate (docs/performance.md):
the management listener below is a stdlib server in either mode, so its code is needed anyway;
choosing it for the public port costs only `serve()`'s last branch. It is the fallback where
granian has no wheel (a platform without one needs a Rust toolchain to install it), and it runs
the same ReadAPI (the blocking face of the same rate limiter), covered by the same tests.

Both bound what they read before the API sees anything: the request head, idle connections (a
timeout) and how many connections they serve at once (`granian_limits` maps the settings; the
stdlib server answers connections beyond http.max_connections, or beyond
http.max_connections_per_address from one address, 503; granian leaves them in the listen
backlog). ReadAPI.handle then applies the exact bounds itself (414, 431). Every method
reaches it, and it answers all but GET and HEAD with 405.

The management listener (http.management_port) serves /healthz, /readyz and /metrics from the
http process itself, on a stdlib server of its own: connections crowding the public port
cannot starve the probes and the scrape. Both ports are checked free before anything starts
(`check_ports`): granian binds with SO_REUSEPORT, so a second worker would otherwise share the
port with the first, the kernel splitting requests between them.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import resource
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pydantic import SecretStr

from inventory_worker import bootstrap
from inventory_worker.adapters.redis_async import AsyncRedis
from inventory_worker.config import Settings
from inventory_worker.heartbeats import ProcessHealth
from inventory_worker.http.api import ReadAPI, error
from inventory_worker.logs import configure, get_logger

log = get_logger(__name__)


# On every answer: nothing here may be cached by a proxy (stock figures, probes, metrics), and
# no browser may sniff a JSON body into something else.
SECURITY_HEADERS = [("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")]
_SECURITY_BYTES = b"".join(f"{k}: {v}\r\n".encode() for k, v in SECURITY_HEADERS)

# The exit status of an http process whose port is taken: the supervisor stops the worker
# rather than restart it for ever (EX_CONFIG of sysexits.h).
EXIT_PORT_TAKEN = 78
MANAGEMENT_ROUTES = ("/healthz", "/readyz", "/metrics")


class PortTaken(Exception):
    """A port the worker must listen on is in use; the message names the address."""


class _Handler(BaseHTTPRequestHandler):
    api: ReadAPI
    routes: tuple[str, ...] | None = None  # None: every route; else only these (management)
    sys_version = ""
    protocol_version = "HTTP/1.1"
    # Buffer the response and send it in one write: with the default unbuffered wfile the
    # body goes out as a second small segment, and Nagle plus delayed ACKs stall every
    # keep-alive request by ~40 ms.
    wbufsize = -1
    disable_nagle_algorithm = True

    def send_response(self, code: int, message: str | None = None) -> None:
        """The status line and Date, without the library's Server header: no server announced."""
        self.log_request(code)
        self.send_response_only(code, message)
        self.send_header("Date", self.date_time_string())
        for k, v in SECURITY_HEADERS:
            self.send_header(k, v)

    def _serve(self) -> None:
        if self.routes is not None and self.path.split("?", 1)[0] not in self.routes:
            resp = error(404, "not found")
        else:
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
        max_line = self.api.http.max_request_line_bytes
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


_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    + _SECURITY_BYTES
    + b"Connection: close\r\nContent-Length: 33\r\n\r\n"
    + b'{"error": "too many connections"}'
)

STDLIB_MAX_CONNECTIONS = 256  # http.max_connections unset: a thread each
GRANIAN_MAX_CONNECTIONS = 8192  # http.max_connections unset: a task each, a few KB


class _BoundedServer(ThreadingHTTPServer):
    """A thread per connection, up to `max_connections` and `per_address` from one client
    address; beyond either, 503 and close (a client holding idle connections locks out only
    itself)."""

    daemon_threads = True
    request_queue_size = 1024  # the listen backlog (socketserver's 5 drops bursts of connections)

    def __init__(
        self, address: tuple[str, int], handler: type[_Handler], max_connections: int, per_address: int
    ) -> None:
        self._slots = threading.BoundedSemaphore(max_connections)
        self._per_address = per_address
        self._held: dict[str, int] = {}
        self._held_lock = threading.Lock()
        super().__init__(address, handler)

    def _take(self, addr: str) -> bool:
        with self._held_lock:
            if self._held.get(addr, 0) >= self._per_address:
                return False
            if not self._slots.acquire(blocking=False):
                return False
            self._held[addr] = self._held.get(addr, 0) + 1
            return True

    def _give(self, addr: str) -> None:
        with self._held_lock:
            n = self._held[addr] - 1
            if n:
                self._held[addr] = n
            else:
                del self._held[addr]
            self._slots.release()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._take(client_address[0]):
            try:
                request.sendall(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._give(client_address[0])
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._give(client_address[0])


def make_server(
    api: ReadAPI, host: str, port: int, routes: tuple[str, ...] | None = None
) -> ThreadingHTTPServer:
    """The stdlib server for `api`; `routes` limits it to those paths (others are 404)."""
    h = api.http
    handler = type(
        "Handler", (_Handler,), {"api": api, "timeout": h.client_timeout_seconds, "routes": routes}
    )
    return _BoundedServer(
        (host, port), handler, h.max_connections or STDLIB_MAX_CONNECTIONS, h.max_connections_per_address
    )


def management_address(settings: Settings) -> tuple[str, int] | None:
    h = settings.http
    return None if h.management_port is None else (h.management_host or h.host, h.management_port)


def _start_management(api: ReadAPI, settings: Settings) -> ThreadingHTTPServer | None:
    """/healthz, /readyz and /metrics on the management port, in a thread of this process."""
    where = management_address(settings)
    if where is None:
        return None
    server = make_server(api, *where, routes=MANAGEMENT_ROUTES)
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="http-management", daemon=True
    ).start()
    log.info(
        "management listening", host=where[0], port=server.server_address[1], paths=list(MANAGEMENT_ROUTES)
    )
    return server


def _addresses(settings: Settings) -> list[tuple[str, str, int]]:
    out = [("http.port", settings.http.host, settings.http.port)]
    if (m := management_address(settings)) is not None:
        out.append(("http.management_port", *m))
    return [a for a in out if a[2] != 0]  # port 0: any free port, nothing to check


def check_ports(settings: Settings, wait: float = 0.0) -> None:
    """Raises PortTaken unless every address the http process will listen on is free.

    A plain bind (SO_REUSEADDR, as every server sets, but not SO_REUSEPORT) fails while any
    socket listens there, granian's SO_REUSEPORT ones included. `wait`: keep trying that long
    (a restarted http process: its predecessor's sockets may take a moment to close).
    """
    deadline = time.monotonic() + wait
    for key, host, port in _addresses(settings):
        while True:
            try:
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                with socket.socket(family, socket.SOCK_STREAM) as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind((host, port))
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise PortTaken(f"cannot listen on {host}:{port} ({key}): {exc.strerror}") from None
                if time.monotonic() >= deadline:
                    raise PortTaken(
                        f"{host}:{port} ({key}) is already in use: is another worker "
                        "or program listening there?"
                    ) from None
                time.sleep(0.1)


def settings_json(settings: Settings) -> str:
    """The settings as JSON with the secrets' real values (model_dump_json writes them masked)."""

    def plain(value: Any) -> Any:
        return value.get_secret_value() if isinstance(value, SecretStr) else str(value)

    return json.dumps(settings.model_dump(mode="python"), default=plain)


# How the http process hands its exact settings, and the name of the consumers' health segment
# ("name:consumers", see heartbeats.py), to granian's worker processes.
_SETTINGS_ENV = "INVENTORY_HTTP_SETTINGS_JSON"
_HEALTH_ENV = "INVENTORY_HTTP_HEALTH_SHM"


# ---- RSGI (granian) -------------------------------------------------------------------------


# granian sends "server: granian" unless the app names a server (it cannot be left out): an
# empty one names none. (Answers granian gives itself, e.g. 431 for an oversized head, still
# carry its name: granian issue #594.)
_RSGI_FIXED = [*SECURITY_HEADERS, ("server", "")]


class RSGIApp:
    """The API as granian's native async interface (RSGI), one instance per worker process.

    The worker's event loop runs every request's gates and its one Redis round trip through a
    pipelined client (adapters/redis_async.py: the requests in flight share writes to Redis); blocking
    work (a cache miss read from PostgreSQL, /metrics, the probes) runs in a pool of
    `http.threads` threads, so it never stalls the loop.
    """

    def __init__(self, api: ReadAPI, redis: AsyncRedis) -> None:
        self.api = api
        self.redis = redis
        self.executor = ThreadPoolExecutor(api.http.threads, thread_name_prefix="http-blocking")

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
        headers = [("content-type", resp.content_type), *_RSGI_FIXED, *resp.headers]
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
    app = RSGIApp(bootstrap.read_api(settings, ready, live), bootstrap.async_redis(settings))
    # Start-up made some 66,000 objects (modules, models, clients) that live as long as the
    # process; frozen, a full collection no longer walks them (about 20 ms each, in the middle
    # of whatever requests were in flight), as in the consumers (supervisor._child_run).
    gc.freeze()
    return app


def granian_limits(settings: Settings) -> dict[str, Any]:
    """The http.* bounds in granian's terms (README "HTTP servers" says what differs).

    - max_connections -> backpressure: per worker process, the connections it serves at once
      (its share of them); beyond that granian stops accepting and new connections wait in the
      listen backlog (the stdlib server answers them 503 instead). Unset, 8192: an idle
      connection costs granian a task and a few KB, so a client holding hundreds of them
      open locks nobody out (the stdlib server bounds each address instead; granian has no
      such hook).
    - client_timeout_seconds -> HTTP/1 header_read_timeout: a client must send a whole request
      head within it, also on an idle keep-alive connection, or the connection is closed.
    - max_request_line_bytes + max_header_bytes -> max_buffer_size: a request head that does not
      fit is refused with 431 by the server itself (its lower bound is 8 KiB). The exact bounds
      (414 for the line, 431 for header count and size) are ReadAPI.handle's own checks.
    """
    from granian.http import HTTP1Settings

    h = settings.http
    return {
        "backpressure": max(1, -(-(h.max_connections or GRANIAN_MAX_CONNECTIONS) // h.workers)),
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

    # Inherited by granian's workers only (this process's own environment); never logged.
    os.environ[_SETTINGS_ENV] = settings_json(settings)
    _raise_fd_limit()
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
        # A granian worker that does not stop (a kept-alive connection still in use, a hung
        # request) is killed by granian after half the grace period; waiting without limit, it
        # would hold the http process until the supervisor kills that at the grace period.
        workers_kill_timeout=max(1, int(settings.worker.shutdown_grace_seconds / 2)),
        log_access=False,
        log_level=LogLevels.warning,
    )

    def stop_when_asked() -> None:
        stop.wait()
        # What granian's own SIGTERM handler does (a method it leaves unannotated).
        server.signal_handler_interrupt()  # type: ignore[no-untyped-call]

    threading.Thread(target=stop_when_asked, name="http-stop", daemon=True).start()
    management = None
    if management_address(settings) is not None:
        ready, live = health_checks(health, settings.worker.heartbeat_timeout_seconds) if health else ({}, {})
        management = _start_management(bootstrap.read_api(settings, ready, live), settings)
    log.info(
        "http listening",
        host=settings.http.host,
        port=settings.http.port,
        server="granian",
        workers=settings.http.workers,
    )
    try:
        server.serve()
    finally:
        if management is not None:
            management.shutdown()
            management.server_close()


def _raise_fd_limit() -> None:
    """Every connection is a file descriptor: the soft limit (often 1024) up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(
                resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard)
            )
        except (ValueError, OSError):
            pass


def health_checks(health: ProcessHealth, timeout: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """(readiness, liveness) checks on the consumer processes, for ReadAPI."""

    def attached() -> None:
        if missing := health.detached():
            raise RuntimeError("not attached to the queue: " + ", ".join(f"consumer-{i}" for i in missing))

    def heartbeats() -> None:
        if stuck := health.stuck(timeout):
            raise RuntimeError(
                f"no heartbeat for more than {timeout:g}s: "
                + ", ".join(f"consumer-{i} ({health.age(i):.1f}s)" for i in stuck)
            )

    return {"consumers": attached}, {"consumers": heartbeats}


def serve(settings: Settings, stop: threading.Event | Any, health: ProcessHealth | None = None) -> None:
    try:  # the supervisor checked at start; a restart may find the port taken since
        check_ports(settings, wait=5.0)
    except PortTaken as exc:
        log.error("http port taken; stopping", error=str(exc))
        raise SystemExit(EXIT_PORT_TAKEN) from None
    if settings.http.server == "granian":
        _serve_granian(settings, stop, health)
        return
    ready, live = health_checks(health, settings.worker.heartbeat_timeout_seconds) if health else ({}, {})
    api = bootstrap.read_api(settings, ready, live)
    server = make_server(api, settings.http.host, settings.http.port)
    management = _start_management(api, settings)
    gc.freeze()  # start-up's objects out of the collector's walks (see rsgi_app_from_env)
    log.info("http listening", host=settings.http.host, port=server.server_address[1], server="stdlib")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    stop.wait()
    for s in (server, management):
        if s is not None:
            s.shutdown()
            s.server_close()
    api.tally.flush()
