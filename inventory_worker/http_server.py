"""Serves the ReadAPI (http_api.py) over HTTP/1.1.

Two servers, one behaviour (`ReadAPI.handle`):
- `granian` (default): a Rust HTTP server running the API as a WSGI app in `http.workers`
  processes with `http.threads` Python threads each. Chosen by measurement (bench/, README
  "Performance"): at 32 connections it answers several times the requests/s of the standard
  library's server with a fraction of its p99, because parsing, keep-alive and writing happen
  outside the GIL and the processes use both cores.
- `stdlib`: the standard library's ThreadingHTTPServer, in this process; no extra dependency.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .config import Settings
from .http_api import ReadAPI
from .logs import configure, get_logger

log = get_logger(__name__)

# How the http process hands its exact settings to granian's worker processes.
_SETTINGS_ENV = "INVENTORY_HTTP_SETTINGS_JSON"


class Headers(Mapping[str, str]):
    """Request headers, looked up case-insensitively (like the stdlib server's)."""

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self._d = {k.lower(): v for k, v in pairs}

    def __getitem__(self, key: str) -> str:
        return self._d[key.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)


# ---- WSGI (granian) -------------------------------------------------------------------------


def wsgi_app(api: ReadAPI) -> Callable[[dict[str, Any], Callable[..., Any]], list[bytes]]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        target = environ.get("PATH_INFO") or "/"
        if environ.get("QUERY_STRING"):
            target += "?" + environ["QUERY_STRING"]
        headers = Headers((k[5:].replace("_", "-"), v) for k, v in environ.items() if k.startswith("HTTP_"))
        for k in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            if environ.get(k):
                headers._d[k.lower().replace("_", "-")] = environ[k]
        method = environ["REQUEST_METHOD"]
        resp = api.handle(method, target, headers, environ.get("REMOTE_ADDR", ""))
        start_response(
            f"{resp.status} {HTTPStatus(resp.status).phrase}",
            [("Content-Type", resp.content_type), ("Content-Length", str(len(resp.body))), *resp.headers],
        )
        return [] if method == "HEAD" else [resp.body]

    return app


def wsgi_app_from_env() -> Callable[..., list[bytes]]:
    """granian's worker processes build the app here, from the settings the http process passed."""
    settings = Settings.model_validate_json(os.environ[_SETTINGS_ENV])
    configure(settings.logging, process="http", pid=os.getpid())
    return wsgi_app(ReadAPI(settings))


def _serve_granian(settings: Settings, stop: threading.Event | Any) -> None:
    from granian import Granian
    from granian.constants import Interfaces

    os.environ[_SETTINGS_ENV] = settings.model_dump_json()
    server = Granian(
        "inventory_worker.http_server:wsgi_app_from_env",
        factory=True,
        address=settings.http.host,
        port=settings.http.port,
        interface=Interfaces.WSGI,
        workers=settings.http.workers,
        blocking_threads=settings.http.threads,
        log_access=False,
        log_level="warning",
    )

    def stop_when_asked() -> None:
        stop.wait()
        server.signal_handler_interrupt()  # what granian's own SIGTERM handler does

    threading.Thread(target=stop_when_asked, name="http-stop", daemon=True).start()
    log.info("http listening", host=settings.http.host, port=settings.http.port, server="granian",
             workers=settings.http.workers)
    server.serve()


# ---- stdlib ---------------------------------------------------------------------------------


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
        self.wfile.flush()

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _serve

    def log_message(self, format: str, *args: Any) -> None:  # access logs would drown the event log
        pass


def make_server(api: ReadAPI, host: str, port: int) -> ThreadingHTTPServer:
    handler = type("Handler", (_Handler,), {"api": api})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def _serve_stdlib(settings: Settings, stop: threading.Event | Any) -> None:
    api = ReadAPI(settings)
    server = make_server(api, settings.http.host, settings.http.port)
    log.info("http listening", host=settings.http.host, port=server.server_address[1], server="stdlib")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    stop.wait()
    server.shutdown()
    server.server_close()


def serve(settings: Settings, stop: threading.Event | Any) -> None:
    if settings.http.server == "granian":
        _serve_granian(settings, stop)
    else:
        _serve_stdlib(settings, stop)

