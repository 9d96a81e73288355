"""The bounded chaos run that CI executes (`make chaos` runs the long one).

Every kind of fault is injected at least once (SIGKILL of consumers and of the supervisor,
RabbitMQ, PostgreSQL and Redis restarts, a PostgreSQL crash, Redis flushes, cut connections)
while a seeded workload is published (Part A's locations and races, Part B's backorders and
fills, shipments, partial cancels, returns, extensions racing the sweeper); then every
invariant is checked against the model.
CHAOS_SECONDS and CHAOS_SEED change the length and the seed.
"""

from __future__ import annotations

import os
from pathlib import Path

from .runner import FAULT_KINDS, run_chaos
from .services import PrivateServices


def test_chaos_bounded(private_services: PrivateServices, tmp_path: Path) -> None:
    seconds = float(os.environ.get("CHAOS_SECONDS", "60"))
    seed = int(os.environ.get("CHAOS_SEED", "20261125"))
    # The worker's logs in pytest's tmp_path, which outlives the private services' folder.
    report = run_chaos(
        private_services,
        duration=seconds,
        seed=seed,
        processes=3,
        round_size=60,
        fault_interval=(1.0, 2.5),
        log_dir=tmp_path / "logs",
    )
    print(report.text())
    kinds_seen = set(report.summary["faults injected"])
    assert report.ok, report.text() + f"\nthe worker's logs: {tmp_path / 'logs'}"
    assert kinds_seen == set(FAULT_KINDS), f"not every kind of fault was injected: {kinds_seen}"
    # The stock-across-locations parts of the workload were all exercised, races of both kinds too.
    exercised = {
        "location.configured",
        "channel.configured",
        "stock.transferred",
        "stock.received",
        "stock.moved",
        "stock.adjusted (bulk)",
        "order.placed (split)",
    }
    assert exercised <= set(report.summary["by type"]), (
        f"not exercised: {exercised - set(report.summary['by type'])}"
    )
    races = report.summary["compare-and-set races (as resolved)"]
    assert races.get("count vs count") and any(k.startswith("count vs completion") for k in races), races
    # Part B: backorders, their fills, shipments, partial cancels, returns and extensions.
    exercised = {
        "product.configured",
        "stock.received (backorder product)",
        "order.fulfilled",
        "order.fulfilled (fulfilment_id again)",
        "order.cancelled (lines)",
        "order.returned (sellable)",
        "order.returned (damaged)",
        "order.returned (quality_control)",
        "order.returned (disposed)",
        "reservation.extended (racing the sweeper)",
    }
    assert exercised <= set(report.summary["by type"]), (
        f"not exercised: {exercised - set(report.summary['by type'])}"
    )
    partb = report.summary["backorders and holds (as resolved)"]
    assert partb.get("placements partly backordered") and any(k.startswith("fills") for k in partb), partb
    assert any(k.startswith("extension vs sweeper") for k in partb), partb
