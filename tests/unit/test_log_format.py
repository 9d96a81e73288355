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
    subprocess.run(
        [sys.executable, "-c", SNIPPET],
        cwd=REPO,
        stderr=stderr,
        check=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("INVENTORY_")},
    )


def test_json_lines_when_not_a_terminal():
    r = subprocess.run([sys.executable, "-c", SNIPPET], cwd=REPO, capture_output=True, text=True, timeout=60)
    line = json.loads(r.stderr.strip().splitlines()[-1])
    assert {
        k: line[k] for k in ("event", "event_id", "order_id", "type", "outcome", "duration_ms", "process")
    } == {
        "event": "event handled",
        "event_id": "e-1",
        "order_id": "o-1",
        "type": "order.placed",
        "outcome": "reserved",
        "duration_ms": 1.5,
        "process": "consumer-0",
    }


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


class _Recorder:
    """A stderr that records each write."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return len(s)

    def flush(self) -> None:
        pass


def test_lines_together_writes_whole_lines_in_order_in_pipe_sized_writes(monkeypatch):
    from inventory_worker import logs
    from inventory_worker.config import LoggingSettings

    rec = _Recorder()
    monkeypatch.setattr(sys, "stderr", rec)
    logs.configure(LoggingSettings(format="json"), process="consumer-0")
    log = logs.get_logger("t")
    with logs.lines_together():
        for i in range(100):
            log.info("event handled", seq=i, pad="x" * 100)
        with logs.lines_together():  # nested: still held for the outer block
            log.info("event handled", seq=100, pad="y" * 5000)  # longer than a pipe's atomic write
        assert rec.writes == []  # nothing before the block ends
    log.info("after", seq=101)
    lines = "".join(rec.writes).splitlines()
    assert [json.loads(x)["seq"] for x in lines] == list(range(102))
    assert all(w.endswith("\n") for w in rec.writes)
    assert 5 <= len(rec.writes) <= 10  # 100 lines of ~170 bytes: a few per write, not one each
    assert all(len(w.encode()) <= 4096 for w in rec.writes if "y" * 100 not in w)


def test_a_value_orjson_refuses_still_gives_a_json_line(monkeypatch):
    """Integers past 64 bits: the renderer falls back to the json module instead of failing."""
    from inventory_worker import logs
    from inventory_worker.config import LoggingSettings

    rec = _Recorder()
    monkeypatch.setattr(sys, "stderr", rec)
    logs.configure(LoggingSettings(format="json"), process="consumer-0")
    logs.get_logger("t").info("big", n=2**70, keys={1: "a"})
    line = json.loads("".join(rec.writes))
    assert line["n"] == 2**70 and line["event"] == "big" and line["keys"] == {"1": "a"}


def test_info_lines_gives_the_lines_log_info_gives(monkeypatch):
    """The consumer's per-event lines go through info_lines (one orjson call a line): the
    same keys, in the same order, with the same values as log.info would write, context
    variables included; nothing below the configured level; through `log` in console mode."""
    import structlog

    from inventory_worker import logs
    from inventory_worker.config import LoggingSettings

    rec = _Recorder()
    monkeypatch.setattr(sys, "stderr", rec)
    logs.configure(LoggingSettings(format="json"), process="consumer-0", pid=7)
    log = logs.get_logger("t")
    rows = [
        {
            "event_id": "e-1",
            "type": "order.placed",
            "order_id": "o-1",
            "product_id": None,
            "outcome": "reserved",
            "results": ["inventory.reserved"],
            "duration_ms": 1.5,
        },
        {
            "event_id": "e-2",
            "type": "order.cancelled",
            "order_id": "o-2",
            "product_id": None,
            "outcome": "released",
            "results": [],
            "duration_ms": 2.0,
            "status": "cancelled",
            "process": "overridden",
            "n": 2**70,
        },
    ]
    structlog.contextvars.bind_contextvars(trace="t-1", pid=8)  # a context variable wins over pid=7
    try:
        for row in rows:
            log.info("event handled", **row)
        slow = [json.loads(x) for x in "".join(rec.writes).splitlines()]
        rec.writes.clear()
        with logs.lines_together():
            logs.info_lines(log, "event handled", [dict(r) for r in rows])
            assert rec.writes == []  # held with the block's other lines
        fast = [json.loads(x) for x in "".join(rec.writes).splitlines()]
    finally:
        structlog.contextvars.clear_contextvars()
    assert len(fast) == 2 and fast[1]["n"] == 2**70 and fast[1]["process"] == "overridden"
    for a, b in zip(slow, fast, strict=True):
        assert list(a) == list(b)
        assert {k: v for k, v in a.items() if k != "timestamp"} == {
            k: v for k, v in b.items() if k != "timestamp"
        }
        assert b["timestamp"].endswith("Z") and len(b["timestamp"]) == len(a["timestamp"])

    rec.writes.clear()
    logs.configure(LoggingSettings(format="json", level="WARNING"), process="consumer-0")
    logs.info_lines(logs.get_logger("t"), "event handled", [dict(r) for r in rows])
    assert rec.writes == []

    logs.configure(LoggingSettings(format="console"), process="consumer-0")
    logs.info_lines(logs.get_logger("t"), "event handled", [dict(rows[0])])
    assert "event handled" in "".join(rec.writes) and "o-1" in "".join(rec.writes)


def test_standard_library_records_are_json_lines_too(monkeypatch):
    """pika and other libraries log through the standard library: each record is one JSON line
    with the worker's fields, a traceback inside it, not lines of plain text beside the JSON."""
    import logging

    from inventory_worker import logs
    from inventory_worker.config import LoggingSettings

    rec = _Recorder()
    monkeypatch.setattr(sys, "stderr", rec)
    logs.configure(LoggingSettings(format="json"), process="consumer-0", pid=7)
    logs.configure(LoggingSettings(format="json"), process="consumer-0", pid=7)  # again: one handler
    try:
        raise ConnectionResetError("peer went away")
    except ConnectionResetError:
        logging.getLogger("pika.adapters.utils.io_services_utils").error(
            "socket failed:\n%s", "details", exc_info=True
        )
    logging.getLogger("pika.connection").info("connection step")  # pika below WARNING: dropped
    logging.getLogger("somelib").warning("careful")
    lines = "".join(rec.writes).splitlines()
    assert len(lines) == 2, lines
    first, second = (json.loads(x) for x in lines)
    assert first["event"] == "socket failed:\ndetails" and first["level"] == "error"
    assert first["logger"] == "pika.adapters.utils.io_services_utils"
    assert first["process"] == "consumer-0" and first["pid"] == 7 and first["timestamp"].endswith("Z")
    assert "Traceback" in first["exception"] and "peer went away" in first["exception"]
    assert second == {**second, "event": "careful", "level": "warning", "logger": "somelib"}


CRASH = """
import multiprocessing, os, sys, threading
from inventory_worker.config import LoggingSettings, Settings
from inventory_worker.logs import configure
from inventory_worker.supervisor import child_main

if __name__ == "__main__":
    configure(LoggingSettings(format="json"), process="supervisor")
    ctx = multiprocessing.get_context("spawn")
    # The supervisor's own child entry point; this role makes it fail after logging is set up.
    child = ctx.Process(target=child_main, args=("consumer-boom", Settings(), ctx.RawValue("b", 0), os.getpid()))
    child.start()
    child.join()
    print(child.exitcode, file=sys.stdout)
    t = threading.Thread(target=lambda: 1 / 0, name="doomed")
    t.start()
    t.join()
    raise RuntimeError("the supervisor fails")
"""


def test_crashes_are_one_json_line_each_in_the_supervisor_its_threads_and_children(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVENTORY_")}
    env["PYTHONPATH"] = str(REPO)
    r = subprocess.run(
        [sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=60, env=env
    )
    assert r.returncode == 1 and r.stdout.strip() == "1", r.stderr  # the child exited 1, the supervisor too
    lines = [json.loads(line) for line in r.stderr.splitlines()]  # every line is a JSON object
    by_event = {line["event"]: line for line in lines}
    child = by_event["process crashed"]
    assert child["process"] == "consumer-boom" and child["level"] == "critical"
    assert child["exception"].startswith("Traceback") and "ValueError" in child["exception"]
    thread = by_event["uncaught exception in a thread"]
    assert thread["thread"] == "doomed" and "ZeroDivisionError" in thread["exception"]
    main = by_event["uncaught exception"]
    assert main["process"] == "supervisor" and "RuntimeError: the supervisor fails" in main["exception"]
