"""Serves the ReadAPI (http_api.py) over HTTP/1.1 with the standard library's threading server."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .config import Settings
from .health import ProcessHealth
from .http_api import ReadAPI
from .logs import get_logger

log = get_logger(__name__)


class _Handler(BaseHTTPRequestHandler):
    api: ReadAPI
    server_version = "inventory-worker"
    sys_version = ""
    protocol_version = "HTTP/1.1"

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

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _serve

    def log_message(self, format: str, *args: Any) -> None:  # access logs would drown the event log
        pass


def make_server(api: ReadAPI, host: str, port: int) -> ThreadingHTTPServer:
    handler = type("Handler", (_Handler,), {"api": api})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


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
    ready, live = health_checks(health, settings.worker.heartbeat_timeout_seconds) if health else ({}, {})
    api = ReadAPI(settings, extra_ready_checks=ready, liveness_checks=live)
    server = make_server(api, settings.http.host, settings.http.port)
    log.info("http listening", host=settings.http.host, port=server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    stop.wait()
    server.shutdown()
    server.server_close()
