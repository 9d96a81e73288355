"""bench/cpu.py: the CPU of processes that end during a run is still counted, with their
parent's component (as PostgreSQL's backends and autovacuum workers end under the postmaster)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from bench import cpu

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc (Linux)")

BURN = "import time, sys\nend = time.process_time() + float(sys.argv[1])\nwhile time.process_time() < end: pass\n"


def burn(seconds: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", BURN, str(seconds)])


def cpu_seconds(pid: int) -> float:
    return cpu.process_cpu()[pid][1]


def test_a_child_that_starts_and_ends_during_the_run_counts_for_its_parents_component():
    meter = cpu.CpuMeter({os.getpid()})  # this process stands for the worker
    burn(0.4).wait()  # reaped: its CPU is in this process's cutime now
    used = meter.per_event(1, load_generator_seconds=0.0)["worker"] / 1e6
    assert 0.35 <= used < 0.4 + 0.3, used  # without the reaped CPU: only this process's own


def test_a_child_that_ends_during_the_run_counts_only_for_what_it_used_meanwhile():
    child = burn(0.8)
    deadline = time.monotonic() + 10
    while cpu_seconds(child.pid) < 0.3 and time.monotonic() < deadline:
        time.sleep(0.01)
    meter = cpu.CpuMeter({os.getpid(), child.pid})  # seen at the start with about 0.3 s used
    before = cpu_seconds(child.pid)
    child.wait()
    used = meter.per_event(1, load_generator_seconds=0.0)["worker"] / 1e6
    assert 0.8 - before - 0.05 <= used < 0.8 - before + 0.3, (used, before)  # not all 0.8 s
