"""A test run stopped from outside (a CI time limit, `timeout`) still stops what it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from ..support import REPO


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


def test_sigterm_to_pytest_stops_a_detached_process_a_test_started(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    # A program in a session of its own, as the private services are: the signal sent to the
    # run never reaches it, and only the suite's own cleanup can stop it.
    (tmp_path / "test_detached.py").write_text(
        textwrap.dedent(f"""
        import subprocess, time
        from tests import reaper
        def test_starts_a_detached_program():
            reaper.hold()  # as a runner's cleanup does when a test calls it in-process
            p = subprocess.Popen(["sleep", "300"], start_new_session=True)
            open({str(pidfile)!r}, "w").write(str(p.pid))
            time.sleep(300)
    """)
    )
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.conftest",
            "-q",
            "-o",
            "addopts=",
            "--rootdir",
            str(tmp_path),
            str(tmp_path / "test_detached.py"),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not pidfile.exists() or not pidfile.read_text():
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()[0]
            time.sleep(0.1)
        sleeper = int(pidfile.read_text())
        assert _alive(sleeper)
        run.send_signal(signal.SIGTERM)
        out, _ = run.communicate(timeout=30)
        deadline = time.monotonic() + 10
        while _alive(sleeper) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(sleeper), f"the detached program outlived the stopped run:\n{out}"
        assert run.returncode != 0
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        if pidfile.exists() and pidfile.read_text() and _alive(int(pidfile.read_text())):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
