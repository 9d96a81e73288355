"""`make bench` stopped from outside (`timeout`, a CI limit: SIGTERM to its process group) stops
the worker it started on the shared services, and removes its database, names and logs."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg2
import pytest

from ..support import REPO, RunOutput, leftover_processes

TAG_VAR = "BENCH_INTERRUPT_TEST"


@pytest.mark.slow
def test_bench_stopped_by_sigterm_stops_its_worker_and_removes_what_it_made(settings, tmp_path):
    tag = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != "INVENTORY_TEST_KEEP"}
    env.update({TAG_VAR: tag, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})
    # Its smallest configuration, with more orders than it gets to publish before the signal.
    cmd = [
        sys.executable,
        "-m",
        "bench.run",
        "--smoke",
        "--parts",
        "worker",
        "--procs",
        "1",
        "--workloads",
        "uniform",
        "--count",
        "200000",
        "--out",
        str(tmp_path / "results.json"),
    ]
    out = RunOutput(
        subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    )
    logs = None
    try:
        first = out.wait_for("logs ", timeout=60)
        dbname, logs = re.search(r"database (\S+),.* logs (\S+)", first).groups()
        out.wait_for("worker x1 started", timeout=120)
        assert leftover_processes(TAG_VAR, tag), "the worker is not recognised"
        os.killpg(out.proc.pid, signal.SIGTERM)
        assert out.finish(timeout=90) == 128 + signal.SIGTERM, out.text()[-3000:]
        assert not leftover_processes(TAG_VAR, tag), out.text()[-3000:]
        assert not Path(logs).exists(), f"{logs} left behind"
        conn = psycopg2.connect(**settings.database.dsn(dbname="postgres"))
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (dbname + "%",))
                assert cur.fetchall() == [], "its databases were not dropped"
        finally:
            conn.close()
    finally:
        if out.proc.poll() is None:
            os.killpg(out.proc.pid, signal.SIGKILL)
            out.proc.wait()
        for entry in leftover_processes(TAG_VAR, tag):  # whatever a failure left
            try:
                os.kill(int(entry.split()[0]), signal.SIGKILL)
            except OSError:
                pass
        if logs:
            shutil.rmtree(logs, ignore_errors=True)
