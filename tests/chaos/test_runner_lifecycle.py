"""`make chaos` as a program (python -m tests.chaos.runner): what it prints, and what it leaves.

It prints a progress line every few seconds and ends with one verdict line; a failed run keeps
its folder and names it; stopped from outside (SIGTERM as `kill`, make or a CI sends it, SIGINT
to its group as Ctrl-C does), it stops every process and private instance it started (the
worker, PostgreSQL, Redis, RabbitMQ and its epmd) and removes its folder.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from ..support import REPO, RunOutput, leftover_processes
from .runner import Report, finish
from .services import PrivateServices

TAG_VAR = "CHAOS_LIFECYCLE_TEST"
PROGRESS_SECONDS = 5.0  # the runner's default


def start_runner(*args: str) -> tuple[RunOutput, str]:
    tag = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != "INVENTORY_TEST_KEEP"}
    env.update({TAG_VAR: tag, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.chaos.runner", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    return RunOutput(proc), tag


def stop_for_good(out: RunOutput, tag: str) -> None:
    """Whatever happened (a failed test, a runner that leaks): nothing of this test stays."""
    if out.proc.poll() is None:
        os.killpg(out.proc.pid, signal.SIGKILL)
        out.proc.wait()
    root = re.search(r"private services in (\S+)", out.text())
    paths = (root.group(1),) if root else ()
    for entry in leftover_processes(TAG_VAR, tag, paths):
        try:
            os.kill(int(entry.split()[0]), signal.SIGKILL)
        except OSError:
            pass
    if root:
        shutil.rmtree(root.group(1), ignore_errors=True)


def assert_nothing_left(out: RunOutput, tag: str, root: str, epmd_port: int | None) -> None:
    deadline = time.monotonic() + 5  # a SIGKILLed process may take a moment to go
    while (left := leftover_processes(TAG_VAR, tag, (root,))) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left behind: {left}\n{out.text()[-3000:]}"
    assert not Path(root).exists(), f"{root} left behind"
    if epmd_port:
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", epmd_port)) != 0, f"epmd still listening on {epmd_port}"


def progress_gaps(out: RunOutput) -> list[float]:
    """Seconds between progress lines (`chaos <seconds>s <phase>...`)."""
    times = [t for t, line in out.lines if line.startswith("chaos ")]
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def services_line(out: RunOutput) -> tuple[str, int]:
    line = out.wait_for("private services up", timeout=150)
    return re.search(r"data in (\S+)", line).group(1), int(re.search(r"epmd :(\d+)", line).group(1))


@pytest.mark.slow
def test_a_short_run_shows_progress_and_ends_with_one_verdict_line_leaving_nothing():
    out, tag = start_runner("--duration", "5", "--progress-seconds", "2")
    try:
        root, epmd_port = services_line(out)
        rc = out.finish(timeout=240)
        lines = [line for _, line in out.lines]
        assert rc == 0, out.text()[-4000:]
        assert lines[-1].startswith("chaos: PASS all "), lines[-5:]
        assert sum(line.startswith("chaos: PASS") or line.startswith("chaos: FAIL") for line in lines) == 1
        gaps = progress_gaps(out)
        assert len(gaps) >= 5 and max(gaps) < 2 + 3, gaps
        assert any("publishing under faults: round" in line for line in lines), lines
        assert_nothing_left(out, tag, root, epmd_port)
    finally:
        stop_for_good(out, tag)


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig, to_group", [(signal.SIGTERM, False), (signal.SIGINT, True)], ids=["SIGTERM", "SIGINT-to-group"]
)
def test_stopped_from_outside_it_stops_everything_it_started(sig, to_group):
    out, tag = start_runner("--duration", "60")
    try:
        root, epmd_port = services_line(out)
        out.wait_for("publishing under faults", timeout=90)  # the worker runs, faults are injected
        assert leftover_processes(TAG_VAR, tag, (root,)), "the run's processes are not recognised"
        (os.killpg if to_group else os.kill)(out.proc.pid, sig)
        rc = out.finish(timeout=90)
        assert rc == 128 + sig, out.text()[-4000:]
        last = out.lines[-1][1]
        assert last.startswith(f"chaos: FAIL interrupted by {signal.Signals(sig).name}"), out.text()[-3000:]
        assert max(progress_gaps(out)) < PROGRESS_SECONDS + 3
        assert_nothing_left(out, tag, root, epmd_port)
    finally:
        stop_for_good(out, tag)


def report(ok: bool) -> Report:
    summary = {"seed": 1, "distinct events": 10, "faults injected": {"kill_consumer": 2}}
    return Report(summary, {"figures match": (True, ""), "results match": (ok, "" if ok else "2 differ")})


def test_a_failed_run_keeps_its_folder_and_says_where_a_passed_one_removes_it(monkeypatch):
    monkeypatch.delenv("INVENTORY_TEST_KEEP", raising=False)
    failed = PrivateServices()  # not started: close() has nothing to stop, only the folder to handle
    try:
        (failed.root / "logs").mkdir()
        line = finish(failed, report(ok=False), 12.0)
        assert line == (
            f"chaos: FAIL 1 of 2 invariants broken (10 events, 2 faults, seed 1, 12 s): "
            f"results match; logs kept in {failed.root}"
        )
        assert (failed.root / "logs").is_dir()
    finally:
        subprocess.run(["rm", "-rf", str(failed.root)], check=True)
    passed = PrivateServices()
    line = finish(passed, report(ok=True), 12.0)
    assert line == "chaos: PASS all 2 invariants hold (10 events, 2 faults, seed 1, 12 s)"
    assert not passed.root.exists()
