"""structlog set-up: JSON lines for machines, readable console output on a terminal."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import structlog
from structlog.typing import EventDict

from inventory_worker.config import LoggingSettings

# Pipes (journald, a container runtime) keep a write of at most PIPE_BUF bytes whole.
_PIPE_BUF = 4096
_held = threading.local()


class _StderrLogger:
    """Writes each line to sys.stderr as it is at that moment (tests and daemons replace it),
    whole: one write and flush per line (or per group of lines, see `lines_together`), under
    a lock shared by the process's threads, so that lines of processes appending to one file
    or pipe do not interleave."""

    _lock = threading.Lock()

    def msg(self, message: str) -> None:
        held = getattr(_held, "lines", None)
        if held is not None:
            held.append(message)
            return
        _write([message])

    debug = info = warning = warn = error = critical = exception = fatal = failure = err = log = msg


def _write(lines: list[str]) -> None:
    """Whole lines, in writes of at most PIPE_BUF bytes where lines allow (a longer line goes alone)."""
    chunks: list[str] = []
    chunk: list[str] = []
    size = 0
    for line in lines:
        n = len(line) + 1
        if chunk and size + n > _PIPE_BUF:
            chunks.append("".join(chunk))
            chunk, size = [], 0
        chunk.append(line + "\n")
        size += n
    if chunk:
        chunks.append("".join(chunk))
    with _StderrLogger._lock:
        stream = sys.stderr
        for c in chunks:
            stream.write(c)
            stream.flush()


@contextmanager
def lines_together() -> Iterator[None]:
    """Lines logged by this thread inside the block are written at its end, a few per write
    (the consumer's one line per event of a batch: one write per line was a third of the time
    it spent logging)."""
    if getattr(_held, "lines", None) is not None:  # nested: the outer block writes
        yield
        return
    _held.lines = []
    try:
        yield
    finally:
        lines, _held.lines = _held.lines, None
        if lines:
            _write(lines)


def _timestamp() -> Any:
    """RFC 3339 UTC with microseconds, like structlog's TimeStamper(fmt="iso", utc=True), with
    the seconds formatted once per second (a datetime per line was a tenth of a consumer's
    time under load)."""
    cache = [-1, ""]

    def stamp(_logger: object, _name: str, event: EventDict) -> EventDict:
        now = time.time()
        sec = int(now)
        if sec != cache[0]:
            cache[0], cache[1] = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        event["timestamp"] = f"{cache[1]}.{int((now - sec) * 1_000_000):06d}Z"
        return event

    return stamp


def _json_line(event: EventDict, **kw: Any) -> str:
    """orjson for the line (a few microseconds less per event); the json module for what
    orjson refuses (integers past 64 bits, say), so that a log call never fails."""
    try:
        return orjson.dumps(event, default=kw.get("default"), option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        return json.dumps(event, **kw)


# What `info_lines` needs of the configuration: set by configure(); None until then.
_json_mode: dict[str, Any] | None = None


def info_lines(log: Any, event: str, rows: list[dict[str, Any]]) -> None:
    """`log.info(event, **row)` for each row: the same lines, at a sixth of the CPU in JSON
    mode (the consumer's line per event: 15 us each through structlog's processors, 2 us
    here). What every line shares (context variables, the process's fields, level, one
    timestamp) is put together once; each line is then one orjson call. In console mode, or
    before configure(), the lines go through `log` as usual."""
    mode = _json_mode
    # Through `log` unless structlog still ends in configure()'s renderer (tests capture lines
    # by putting their own processors in place, in the same list).
    processors = structlog.get_config()["processors"]
    if mode is None or not processors or processors[-1] is not mode["renderer"]:
        for row in rows:
            log.info(event, **row)
        return
    if mode["level"] > logging.INFO or not rows:
        return
    # In the order structlog puts them: the call's fields, the event, then (unless the call
    # gave them) context variables and the process's fields, then level and timestamp.
    shared = structlog.contextvars.get_contextvars()
    for k, v in mode["static"].items():
        shared.setdefault(k, v)
    tail = _timestamp()(None, "info", {"level": "info"})
    lines = []
    for row in rows:
        line = {**row, "event": event}
        for k, v in shared.items():
            line.setdefault(k, v)
        line.update(tail)
        lines.append(_json_line(line, default=repr))
    held = getattr(_held, "lines", None)
    if held is not None:
        held.extend(lines)
    else:
        _write(lines)


def configure(settings: LoggingSettings, **context: object) -> None:
    global _json_mode
    fmt = settings.format
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer = (
        structlog.dev.ConsoleRenderer()
        if fmt == "console"
        else structlog.processors.JSONRenderer(serializer=_json_line)
    )
    level = getattr(logging, settings.level)
    static = dict(context)

    def add_static(_logger: object, _name: str, event: EventDict) -> EventDict:
        for k, v in static.items():
            event.setdefault(k, v)
        return event

    _route_stdlib_logging(level, renderer, fmt, add_static)
    _log_uncaught_exceptions()

    processors = [
        structlog.contextvars.merge_contextvars,
        add_static,  # process role and pid, in every thread of the process
        structlog.processors.add_log_level,
        _timestamp(),
        structlog.processors.format_exc_info if fmt == "json" else structlog.dev.set_exc_info,
        renderer,
    ]
    _json_mode = {"level": level, "static": static, "renderer": renderer} if fmt == "json" else None
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=lambda *_: _StderrLogger(),
        cache_logger_on_first_use=False,  # tests configure again in one process
    )


class _StdlibHandler(logging.Handler):
    """Records of the standard library's logging (pika's, say) as lines like the worker's own:
    rendered by the same renderer, written whole by the same writer."""

    _out = _StderrLogger()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._out.msg(self.format(record))
        except Exception:  # logging must never take the process down
            self.handleError(record)


def _route_stdlib_logging(level: int, renderer: Any, fmt: str, add_static: Any) -> None:
    """Before, the root logger printed the bare message: a library's warning was a line of plain
    text among the JSON, and a traceback (pika logs some) several such lines. Now each record is
    one JSON line with `logger`, `level`, `timestamp`, the process's fields and, if any, the
    traceback in `exception`."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            add_static,
            structlog.stdlib.add_logger_name,
            structlog.processors.add_log_level,
            _timestamp(),
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info if fmt == "json" else structlog.dev.set_exc_info,
            renderer,
        ],
    )
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, _StdlibHandler)]:  # configured again
        root.removeHandler(h)
    handler = _StdlibHandler()
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("pika").setLevel(max(level, logging.WARNING))  # its INFO is per connection step


def _log_uncaught_exceptions() -> None:
    """Python prints an uncaught exception as a multi-line traceback: here it is one log line
    (the traceback in `exception`), from the main thread, other threads, and the exceptions
    Python can only report (raised in __del__, say). Child processes log theirs in
    supervisor.child_main (multiprocessing prints them without these hooks)."""
    crash = get_logger("inventory_worker.crash")

    def main_thread(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        if issubclass(exc_type, KeyboardInterrupt):
            sys.__excepthook__(exc_type, exc, tb)
            return
        crash.critical("uncaught exception", exc_info=(exc_type, exc, tb))

    def other_thread(args: Any) -> None:
        if issubclass(args.exc_type, SystemExit):
            return
        crash.critical(
            "uncaught exception in a thread",
            thread=getattr(args.thread, "name", None),
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        )

    def unraisable(u: Any) -> None:
        crash.error(
            u.err_msg or "exception ignored",
            object=repr(u.object)[:200],
            exc_info=(u.exc_type, u.exc_value, u.exc_traceback),
        )

    sys.excepthook = main_thread
    threading.excepthook = other_thread
    sys.unraisablehook = unraisable


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)  # structlog.get_logger, typed
