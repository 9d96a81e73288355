"""`logging.format: auto`: JSON lines into a pipe (journald, a collector), console on a terminal."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

from ..support import REPO

SNIPPET = (
    "from inventory_worker.config import LoggingSettings\n"
    "from inventory_worker.logs import configure, get_logger\n"
    "configure(LoggingSettings(), process='consumer-0', pid=1)\n"
    "get_logger('t').info('event handled', event_id='e-1', order_id='o-1', type='order.placed',"
    " outcome='reserved', duration_ms=1.5)\n"
)


def _run(stderr: int) -> None:
    subprocess.run([sys.executable, "-c", SNIPPET], cwd=REPO, stderr=stderr, check=True, timeout=60,
                   env={k: v for k, v in os.environ.items() if not k.startswith("INVENTORY_")})


def test_json_lines_when_not_a_terminal():
    r = subprocess.run([sys.executable, "-c", SNIPPET], cwd=REPO, capture_output=True, text=True, timeout=60)
    line = json.loads(r.stderr.strip().splitlines()[-1])
    assert {k: line[k] for k in ("event", "event_id", "order_id", "type", "outcome", "duration_ms", "process")} == {
        "event": "event handled", "event_id": "e-1", "order_id": "o-1", "type": "order.placed",
        "outcome": "reserved", "duration_ms": 1.5, "process": "consumer-0"}


def test_console_output_on_a_terminal():
    master, slave = pty.openpty()
    try:
        _run(slave)
        os.close(slave)
        out = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the other side is closed
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
    text = out.decode()
    assert "event handled" in text and "outcome" in text and "reserved" in text
    assert not text.lstrip().startswith("{")  # not JSON: the console renderer
