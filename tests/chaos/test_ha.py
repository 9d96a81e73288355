"""The bounded HA run that `make test` executes (`make chaos-ha` runs it standalone, with more
cycles): each fault once, on a 3-node RabbitMQ cluster, a PostgreSQL primary with a synchronous
standby, Redis with a replica and three Sentinels, and a worker in a network namespace; then
every invariant of the chaos suite against its model. A few minutes; CHAOS_SEED changes the seed.

Without root (no `ip netns`), the partition is left out and the test says so in its output."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..support import REPO, RunOutput, leftover_processes
from .ha import HAServices
from .ha_runner import HA_FAULTS, run_ha, table

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture  # stopped before the next test starts services of its own
def ha_services() -> Iterator[HAServices]:
    os.chdir(REPO)
    services = HAServices(partition=os.geteuid() == 0)
    try:
        services.start()
        yield services
    finally:
        services.close()


def test_nothing_lost_through_the_loss_of_a_node_of_each_service(
    ha_services: HAServices, tmp_path: Path
) -> None:
    seed = int(os.environ.get("CHAOS_SEED", "20261129"))
    report, figures = run_ha(ha_services, seed=seed, cycles=1, log_dir=tmp_path / "logs")
    print(report.text() + "\n" + table(figures))
    assert report.ok, report.text() + f"\nthe worker's logs: {tmp_path / 'logs'}"
    want = set(HA_FAULTS) if ha_services.partition else set(HA_FAULTS) - {"partition_worker"}
    assert {r["fault"] for r in figures} == want


TAG_VAR = "CHAOS_HA_LIFECYCLE_TEST"


@pytest.mark.skipif(os.geteuid() != 0, reason="the partition needs root (ip netns)")
def test_stopped_during_the_partition_it_removes_everything_it_made() -> None:
    """SIGTERM while a worker runs cut off in its namespace: exit 143, one verdict line, and no
    process, namespace, veth pair or folder of the run left."""
    tag = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != "INVENTORY_TEST_KEEP"}
    env.update({TAG_VAR: tag, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})
    # Seed 3 injects the partition first.
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.chaos.ha_runner", "--seed", "3", "--json", os.devnull],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    out = RunOutput(proc)
    root = ns = None
    try:
        line = out.wait_for("chaos-ha: services up", timeout=180)
        root, ns = re.search(r"data in (\S+)", line).group(1), re.search(r"namespace (\S+),", line).group(1)
        out.wait_for("injecting partition_worker", timeout=120)
        time.sleep(10)  # the namespaced worker starts, then is cut off
        os.kill(proc.pid, signal.SIGTERM)
        rc = out.finish(timeout=150)
        assert rc == 128 + signal.SIGTERM, out.text()[-3000:]
        assert out.lines[-1][1].startswith("chaos-ha: FAIL interrupted by SIGTERM"), out.text()[-3000:]
        left = leftover_processes(TAG_VAR, tag, (root,))
        assert not left, f"processes left behind: {left}"
        assert ns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert (
            ns.removeprefix("iwha-")
            not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
        )
        assert not Path(root).exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for entry in leftover_processes(TAG_VAR, tag, (root,) if root else ()):
            try:
                os.kill(int(entry.split()[0]), signal.SIGKILL)
            except OSError:
                pass
        if ns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        if root:
            shutil.rmtree(root, ignore_errors=True)
