"""The bounded HA run that `make test` executes (`make chaos-ha` runs it standalone, with more
cycles): each fault once, on a 3-node RabbitMQ cluster, a PostgreSQL primary with a synchronous
standby, Redis with a replica and three Sentinels, and a worker in a network namespace; then
every invariant of the chaos suite against its model. A few minutes; CHAOS_SEED changes the seed.

Without root (no `ip netns`), the partition is left out and the test says so in its output."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..support import REPO
from .ha import HAServices
from .ha_runner import HA_FAULTS, run_ha, table

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def ha_services() -> Iterator[HAServices]:
    os.chdir(REPO)
    services = HAServices(partition=os.geteuid() == 0)
    try:
        services.start()
        yield services
    finally:
        services.close()


def test_nothing_lost_through_the_loss_of_a_node_of_each_service(ha_services: HAServices, tmp_path: Path) -> None:
    seed = int(os.environ.get("CHAOS_SEED", "20261129"))
    report, figures = run_ha(ha_services, seed=seed, cycles=1, log_dir=tmp_path / "logs")
    print(report.text() + "\n" + table(figures))
    assert report.ok, report.text() + f"\nthe worker's logs: {tmp_path / 'logs'}"
    want = set(HA_FAULTS) if ha_services.partition else set(HA_FAULTS) - {"partition_worker"}
    assert {r["fault"] for r in figures} == want
