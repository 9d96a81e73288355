"""One HTTP server for the read-endpoint benchmark: `python -m bench.serve_http SERVER`.

SERVER is `granian` (`granian:N`: with N worker processes instead of `http.workers`) or `stdlib`
(inventory_worker.http.server, as the worker runs them: the whole API, auth and rate limit
included), or `baseline`: the issue's yardstick, a plain standard-library
ThreadingHTTPServer that answers GET /inventory/{id} with one Redis GET of the cached figures and
nothing else (no auth, no rate limit, no bounds, no metrics, no PostgreSQL fallback). The baseline
is written the way a competent stdlib server is written, so the ratio is not flattered: HTTP/1.1
keep-alive, the response in one write with Nagle off, one shared redis-py client (a connection
per thread from its pool). Settings come from the INVENTORY_* environment; stops on SIGTERM.
"""

from __future__ import annotations

import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from inventory_worker.adapters.redis_cache import make_client
from inventory_worker.config import Settings, load_settings
from inventory_worker.http import server as http_server


def baseline_server(settings: Settings) -> ThreadingHTTPServer:
    client = make_client(settings.redis)
    prefix = f"{settings.redis.key_prefix}stock:"

    class Baseline(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        wbufsize = -1  # one write per response
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            body = None
            if self.path.startswith("/inventory/"):
                body = client.get(prefix + self.path[len("/inventory/") :])
            elif self.path == "/healthz":
                body = b'{"status":"ok"}'
            status, body = (200, body) if body is not None else (404, b'{"error":"unknown product"}')
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((settings.http.host, settings.http.port), Baseline)
    server.daemon_threads = True
    return server


def main() -> None:
    kind = sys.argv[1]
    settings = load_settings()
    if kind == "baseline":
        server = baseline_server(settings)
        signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
        server.serve_forever()
        return
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    kind, _, workers = kind.partition(":")
    # No management listener: this is the public port alone (and the worker's may run beside it).
    http = {"server": kind, "management_port": None, **({"workers": int(workers)} if workers else {})}
    settings = settings.model_copy(update={"http": settings.http.model_copy(update=http)})
    http_server.serve(settings, stop)


if __name__ == "__main__":
    main()
