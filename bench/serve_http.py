"""One HTTP server for the read-endpoint benchmark: `python -m bench.serve_http SERVER`.

SERVER is `granian` or `stdlib` (inventory_worker.http_server, as the worker runs them), or
`stdlib-before`: the standard library's server as it was before this benchmark existed (the
response written unbuffered, Nagle on), kept as the historical baseline. Settings come from
the INVENTORY_* environment; stops on SIGTERM.
"""

from __future__ import annotations

import signal
import sys
import threading

from inventory_worker import http_server
from inventory_worker.config import load_settings
from inventory_worker.http_api import ReadAPI


def main() -> None:
    kind = sys.argv[1]
    settings = load_settings()
    stop = threading.Event()
    if kind == "stdlib-before":
        handler = type("Before", (http_server._Handler,), {
            "api": ReadAPI(settings), "wbufsize": 0, "disable_nagle_algorithm": False})
        server = http_server.ThreadingHTTPServer((settings.http.host, settings.http.port), handler)
        server.daemon_threads = True
        signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
        server.serve_forever()
        return
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    settings = settings.model_copy(update={"http": settings.http.model_copy(update={"server": kind})})
    http_server.serve(settings, stop)


if __name__ == "__main__":
    main()
