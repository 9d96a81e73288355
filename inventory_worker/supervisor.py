"""Starts, watches and stops the worker's processes.

  supervisor (this process) ─┬─ consumer-0 … consumer-N-1   AMQP batches + maintenance thread
                             └─ http                        the read-only endpoint

A child that dies is restarted (with backoff if it keeps dying); so is a consumer whose
heartbeat is older than `worker.heartbeat_timeout_seconds` (stuck: killed first; counted from
the supervisor's own resume if it was paused, see PAUSE_SECONDS). SIGTERM or SIGINT: every
child stops consuming, finishes and acks what it holds, and exits; children still alive after
the grace period are killed. Children exit by themselves if the supervisor vanishes. Under
systemd (Type=notify) it reports READY, WATCHDOG and STOPPING.
"""

from __future__ import annotations

import faulthandler
import gc
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

from inventory_worker import systemd
from inventory_worker.config import Settings
from inventory_worker.cpus import usable_cpus
from inventory_worker.heartbeats import ConsumerSlot, ProcessHealth, startup_allowance
from inventory_worker.logs import configure, get_logger

log = get_logger(__name__)

# The main loop checks the children every 0.2 s. Checks further apart than this mean the
# supervisor itself did not run in between (VM or host paused or suspended, SIGSTOP of the
# service, a long stall): CLOCK_MONOTONIC went on, so every heartbeat looks that much older,
# though the children were most likely frozen too and beat again as soon as they run. Judged
# at once, healthy consumers would be killed; so after such a gap their silence is counted
# from the resume, and one really stuck is killed `timeout` after it. 2 s: ten times the loop's
# interval, and well below any sensible timeout (a shorter gap adds at most that much to the
# age of a healthy consumer's heartbeat).
PAUSE_SECONDS = 2.0

# A child about to be killed (stuck, or still running after the grace period) is first asked
# for every thread's stack (SIGUSR1, faulthandler, on its stderr): the log then says where it
# hung. This long for it to write them.
STACKS_SECONDS = 0.3


def _child_stop_event(shared_stop: Any, parent_pid: int) -> threading.Event:
    """A local event set by the supervisor's stop flag, a SIGTERM to this child, or orphaning."""
    local = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which decides
    signal.signal(signal.SIGTERM, lambda *_: local.set())

    # `shared_stop` is a lock-free byte (RawValue): a child SIGKILLed while reading it can wedge
    # nobody, unlike a multiprocessing.Event, whose lock a killed waiter may hold for good.
    def watch() -> None:
        while not local.is_set():
            time.sleep(0.2)
            if shared_stop.value or os.getppid() != parent_pid:
                local.set()

    threading.Thread(target=watch, name="stop-watch", daemon=True).start()
    return local


def child_main(
    role: str, settings: Settings, shared_stop: Any, parent_pid: int, health: ProcessHealth | None = None
) -> None:
    configure(settings.logging, process=role, pid=os.getpid())
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # see STACKS_SECONDS
    try:
        _child_run(role, settings, shared_stop, parent_pid, health)
    except Exception:
        # multiprocessing would print the traceback as plain lines on stderr: one log line instead.
        log.critical("process crashed", exc_info=True)
        sys.exit(1)  # the exit code the supervisor reports; multiprocessing prints nothing for it


def _child_run(
    role: str, settings: Settings, shared_stop: Any, parent_pid: int, health: ProcessHealth | None
) -> None:
    stop = _child_stop_event(shared_stop, parent_pid)
    if role == "http":
        from inventory_worker.http.server import serve

        # A process group of its own: if this process dies, the supervisor kills the group, so
        # no server process it started (granian's workers) lives on holding the port.
        os.setpgrp()
        serve(settings, stop, health)
        return
    from inventory_worker import bootstrap, metrics

    index = int(role.rsplit("-", 1)[1])
    slot = ConsumerSlot(health, index)
    slot.starting()  # the consumer's loop beats as RUNNING
    maintenance = bootstrap.maintenance(settings, stop, measure=index == 0)
    maintenance.start()
    consumer = bootstrap.consumer(settings, stop, slot)
    # What start-up made (modules, models, clients: some 65,000 objects) lives as long as the
    # process. Frozen, the collector no longer walks it: a full collection had cost 50-120 ms
    # in the middle of a batch, three times a minute at full load; the batches' own garbage is
    # still collected.
    gc.freeze()
    metrics.GC_PAUSES.install()  # what is left to collect, and how long it stops the loop
    consumer.run()
    maintenance.join(timeout=5)
    log.info("consumer stopped")


def _kill_after_stacks(processes: list[Any]) -> None:
    """Kills the processes, each having been asked for its threads' stacks first."""
    for p in processes:
        try:
            os.kill(p.pid, signal.SIGUSR1)
        except ProcessLookupError:  # gone meanwhile
            pass
    time.sleep(STACKS_SECONDS)
    for p in processes:
        p.kill()


def _kill_group(pgid: int) -> None:
    """Kills what is left of a dead child's process group (the http process leads its own)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # nothing left
        pass


@dataclass
class Child:
    role: str
    process: Any = None
    started: float = 0.0
    failures: int = 0
    next_start: float = 0.0


class Supervisor:
    def __init__(self, settings: Settings, processes: int | None = None) -> None:
        self.settings = settings
        self.processes = processes or settings.worker.processes or usable_cpus()
        self.ctx = multiprocessing.get_context("spawn")
        # A plain shared byte, polled by the children. Not a multiprocessing.Event: its set()
        # waits for every waiter to wake, and blocks for ever on a child killed while waiting.
        self.stop = self.ctx.RawValue("b", 0)
        # Set by the signal handler; the shared flag is set from the main loop.
        self._stop_requested = False
        roles = [f"consumer-{i}" for i in range(self.processes)]
        if settings.http.enabled:
            roles.append("http")
        self.children = [Child(role) for role in roles]
        # Named shared memory: granian's worker processes attach to it too (http/server.py).
        self.health = ProcessHealth.create(self.processes)
        self._exit_code = 0
        self._last_check: float | None = None  # monotonic time of the previous check
        self._resumed = float("-inf")  # of the last resume after a pause (PAUSE_SECONDS)

    def _slot(self, child: Child) -> int | None:
        return int(child.role.rsplit("-", 1)[1]) if child.role.startswith("consumer-") else None

    def _start(self, child: Child) -> None:
        slot = self._slot(child)
        if slot is not None:
            self.health.set_attached(slot, False)
        child.process = self.ctx.Process(
            target=child_main,
            args=(child.role, self.settings, self.stop, os.getpid(), self.health),
            name=child.role,
        )
        child.started = time.monotonic()  # before start(): the child's first beat comes after
        child.process.start()
        log.info("process started", role=child.role, child_pid=child.process.pid)

    def _stuck(self, child: Child, slot: int, now: float, timeout: float) -> bool:
        # `started` is on the same monotonic clock as the beats (see heartbeats.py). Silence is
        # counted from the last resume at the earliest (PAUSE_SECONDS), startup's too.
        beat = self.health.last_beat(slot)
        if beat < child.started:  # this process has not beaten yet
            return now - max(child.started, self._resumed) > startup_allowance(timeout)
        return now - max(beat, self._resumed) > self.health.allowed_silence(slot, timeout)

    def _stuck_consumers(self, now: float, timeout: float) -> list[Child]:
        """One check of the main loop at monotonic time `now`: the live consumers to kill."""
        if self._last_check is not None and (gap := now - self._last_check) > PAUSE_SECONDS:
            self._resumed = now
            log.warning(
                "supervisor was paused; heartbeats are counted from now", paused_seconds=round(gap, 1)
            )
        self._last_check = now
        return [
            child
            for child in self.children
            if (slot := self._slot(child)) is not None
            and child.process is not None
            and child.process.is_alive()
            and self._stuck(child, slot, now, timeout)
        ]

    def request_stop(self, *_: Any) -> None:
        self._stop_requested = True

    def run(self) -> int:
        from inventory_worker import metrics

        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        if self.settings.http.enabled:
            from inventory_worker.http.server import PortTaken, check_ports

            try:  # before anything starts: a second worker must not share the port (SO_REUSEPORT)
                check_ports(self.settings)
            except PortTaken as exc:
                log.error(f"cannot start: {exc}")
                return 1
        log.info(
            "worker starting",
            processes=self.processes,
            http_port=self.settings.http.port if self.settings.http.enabled else None,
        )
        for role in {c.role.split("-")[0] for c in self.children}:
            for reason in ("died", "stuck"):
                metrics.PROCESS_RESTARTS.labels(role, reason)  # exported as 0 from the start
        for child in self.children:
            self._start(child)
        timeout = self.settings.worker.heartbeat_timeout_seconds
        watchdog = systemd.watchdog_interval()
        ready = False
        next_watchdog = 0.0
        stuck_reason: dict[str, str] = {}
        self._last_check = time.monotonic()  # a pause before the first check counts too
        while not self._stop_requested:
            time.sleep(0.2)
            now = time.monotonic()
            stuck = self._stuck_consumers(now, timeout)
            for child in self.children:
                p = child.process
                slot = self._slot(child)
                if p is not None and p.is_alive():
                    if now - child.started > 30:
                        child.failures = 0
                    if slot is not None and child in stuck:
                        log.error(
                            "process stuck; killing it",
                            role=child.role,
                            child_pid=p.pid,
                            heartbeat_age_seconds=round(self.health.age(slot), 1),
                            stacks="its threads' stacks follow on stderr",
                        )
                        _kill_after_stacks([p])
                        stuck_reason[child.role] = "stuck"
                    continue
                if p is not None:  # it died on its own, or was killed as stuck
                    p.join()
                    if child.role == "http":
                        _kill_group(p.pid)
                        from inventory_worker.http.server import EXIT_PORT_TAKEN

                        if p.exitcode == EXIT_PORT_TAKEN:  # it said which; restarting would not help
                            log.error("http port taken; stopping the worker")
                            self._stop_requested = True
                            self._exit_code = 1
                            child.process = None
                            continue
                    if slot is not None:  # not attached while it is down (/readyz)
                        self.health.set_attached(slot, False)
                    metrics.mark_process_dead(p.pid)
                    reason = stuck_reason.pop(child.role, "died")
                    metrics.PROCESS_RESTARTS.labels(child.role.split("-")[0], reason).inc()
                    child.failures += 1
                    delay = min(0.5 * 2 ** (child.failures - 1), 30.0)
                    child.next_start = now + delay
                    log.error(
                        "process ended; restarting",
                        role=child.role,
                        exitcode=p.exitcode,
                        reason=reason,
                        restart_in_seconds=delay,
                    )
                    child.process = None
                if now >= child.next_start and not self._stop_requested:
                    self._start(child)
            if not ready and not self.health.detached():
                ready = True
                systemd.notify("READY=1\nSTATUS=consuming")
                log.info("worker ready: every consumer attached")
            if ready and watchdog and now >= next_watchdog and not self.health.stuck(timeout):
                systemd.notify("WATCHDOG=1")
                next_watchdog = now + watchdog
        return self._shutdown()

    def _shutdown(self) -> int:
        systemd.notify("STOPPING=1")
        self.stop.value = 1
        grace = self.settings.worker.shutdown_grace_seconds
        log.info("stopping", grace_seconds=grace)
        deadline = time.monotonic() + grace
        for child in self.children:
            if child.process is not None:
                child.process.join(max(0.0, deadline - time.monotonic()))
        late = [c for c in self.children if c.process is not None and c.process.is_alive()]
        if late:
            _kill_after_stacks([c.process for c in late])
            for c in late:
                c.process.join()
                if c.role == "http":  # and granian's workers, in its process group
                    _kill_group(c.process.pid)
            log.error(
                "killed after the grace period",
                roles=[c.role for c in late],
                stacks="their threads' stacks are on stderr, just above",
            )
        log.info("worker stopped")
        return self._exit_code


def run(settings: Settings, processes: int | None = None) -> int:
    """Runs the worker until SIGTERM/SIGINT; the exit status to return."""
    own_dir = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        own_dir = tempfile.mkdtemp(prefix="inventory-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = own_dir
    else:  # a folder given to us (e.g. a Kubernetes emptyDir that outlives a container)
        _empty_metrics_dir(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    try:
        supervisor = Supervisor(settings, processes)
        try:
            return supervisor.run()
        finally:
            supervisor.health.close()  # and unlinks the segment
    finally:
        if own_dir:
            shutil.rmtree(own_dir, ignore_errors=True)


def _empty_metrics_dir(path: str) -> None:
    """Files of a previous run (pids are reused in containers) would be summed into this one's.

    Runs before prometheus_client is imported in this process: the metrics module opens its
    files at import, and deleting them afterwards would leave it writing to unlinked files.
    """
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        if name.endswith(".db"):
            os.unlink(os.path.join(path, name))
