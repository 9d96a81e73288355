"""Starts, watches and stops the worker's processes.

  supervisor (this process) ─┬─ consumer-0 … consumer-N-1   AMQP batches + maintenance thread
                             └─ http                        the read-only endpoint

A child that dies is restarted (with backoff if it keeps dying). SIGTERM or SIGINT: every
child stops consuming, finishes and acks what it holds, and exits; children still alive
after the grace period are killed. Children exit by themselves if the supervisor vanishes.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .config import Settings
from .logs import configure, get_logger

log = get_logger(__name__)


def _child_stop_event(shared_stop: Any, parent_pid: int) -> threading.Event:
    """A local event set by the supervisor's stop, a SIGTERM to this child, or orphaning."""
    local = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which decides
    signal.signal(signal.SIGTERM, lambda *_: local.set())

    # Only signals and the parent's pid are watched, never `shared_stop`: a process SIGKILLed
    # while holding that event's lock would leave it locked, wedging every waiter for good.
    def watch() -> None:
        while not local.wait(0.5):
            if os.getppid() != parent_pid:
                local.set()

    threading.Thread(target=watch, name="stop-watch", daemon=True).start()
    return local


def child_main(role: str, settings: Settings, shared_stop: Any, parent_pid: int) -> None:
    configure(settings.logging, process=role, pid=os.getpid())
    stop = _child_stop_event(shared_stop, parent_pid)
    if role == "http":
        from .http_server import serve

        serve(settings, stop)
        return
    from .consumer import Consumer
    from .maintenance import Maintenance

    maintenance = Maintenance(settings, stop)
    maintenance.start()
    Consumer(settings, stop).run()
    maintenance.join(timeout=5)
    log.info("consumer stopped")


@dataclass
class Child:
    role: str
    process: Any = None
    started: float = 0.0
    failures: int = 0
    next_start: float = 0.0
    restarts: int = field(default=0)


class Supervisor:
    def __init__(self, settings: Settings, processes: int | None = None) -> None:
        self.settings = settings
        self.processes = processes or settings.worker.processes or os.cpu_count() or 1
        self.ctx = multiprocessing.get_context("spawn")
        self.stop = self.ctx.Event()
        # Set by the signal handler; the shared event is set from the main loop, never from a
        # handler (it may interrupt a wait on that same event and deadlock on its lock).
        self._stop_requested = False
        roles = [f"consumer-{i}" for i in range(self.processes)]
        if settings.http.enabled:
            roles.append("http")
        self.children = [Child(role) for role in roles]

    def _start(self, child: Child) -> None:
        child.process = self.ctx.Process(
            target=child_main,
            args=(child.role, self.settings, self.stop, os.getpid()),
            name=child.role,
        )
        child.process.start()
        child.started = time.monotonic()
        log.info("process started", role=child.role, child_pid=child.process.pid)

    def request_stop(self, *_: Any) -> None:
        self._stop_requested = True

    def run(self) -> int:
        from . import metrics

        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        log.info("worker starting", processes=self.processes, http_port=self.settings.http.port
                 if self.settings.http.enabled else None)
        for child in self.children:
            self._start(child)
        while not self._stop_requested:
            time.sleep(0.2)
            now = time.monotonic()
            for child in self.children:
                p = child.process
                if p is not None and p.is_alive():
                    if now - child.started > 30:
                        child.failures = 0
                    continue
                if p is not None:  # it died on its own
                    p.join()
                    metrics.mark_process_dead(p.pid)
                    metrics.PROCESS_RESTARTS.labels(child.role.split("-")[0]).inc()
                    child.failures += 1
                    delay = min(0.5 * 2 ** (child.failures - 1), 30.0)
                    child.next_start = now + delay
                    log.error("process died; restarting", role=child.role, exitcode=p.exitcode,
                              restart_in_seconds=delay)
                    child.process = None
                if now >= child.next_start and not self._stop_requested:
                    self._start(child)
        return self._shutdown()

    def _shutdown(self) -> int:
        # SIGTERM each child rather than set the shared event: a child SIGKILLed while holding
        # the event's lock (OOM killer, an operator) would make set() block forever.
        for child in self.children:
            if child.process is not None and child.process.is_alive():
                child.process.terminate()
        grace = self.settings.worker.shutdown_grace_seconds
        log.info("stopping", grace_seconds=grace)
        deadline = time.monotonic() + grace
        for child in self.children:
            if child.process is not None:
                child.process.join(max(0.0, deadline - time.monotonic()))
        killed = []
        for child in self.children:
            p = child.process
            if p is not None and p.is_alive():
                p.kill()
                p.join()
                killed.append(child.role)
        if killed:
            log.error("killed after the grace period", roles=killed)
        log.info("worker stopped")
        return 0


def run(settings: Settings, processes: int | None = None) -> int:
    """Runs the worker until SIGTERM/SIGINT; the exit status to return."""
    own_dir = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        own_dir = tempfile.mkdtemp(prefix="inventory-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = own_dir
    try:
        return Supervisor(settings, processes).run()
    finally:
        if own_dir:
            shutil.rmtree(own_dir, ignore_errors=True)
