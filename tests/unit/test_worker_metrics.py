"""bench/worker_metrics.py: the worker's histograms read from its metrics folder, and the
quantiles the benchmark prints from them."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest

from bench.worker_metrics import GC, IN_WORKER, Histogram, inside, settled, snapshot

BOUNDS = [0.001, 0.002, 0.005, 0.01, math.inf]


def test_quantiles_are_read_as_histogram_quantile_reads_them():
    h = Histogram(BOUNDS, [5, 10, 12, 12, 13], 0.1)  # 5 in (0, 1 ms], 5 in (1, 2], 2 in (2, 5], 1 above 10
    assert h.quantile(0.5) == pytest.approx(0.0013)  # rank 6.5: 1.5 of 5 into (1, 2] ms
    assert h.quantile(0.99) == 0.01  # in +Inf: the highest finite bound
    assert h.above(0.002) == 3 and h.above(0.01) == 1
    assert h.highest_bucket() == math.inf  # a value past the last bound is not hidden
    assert math.isnan(Histogram(BOUNDS, [0, 0, 0, 0, 0], 0.0).quantile(0.5))
    assert Histogram(BOUNDS, [0, 4, 4, 4, 4], 0.006).highest_bucket() == 0.002


def test_a_round_is_the_difference_of_two_snapshots_gc_summed_over_generations():
    before = {(IN_WORKER, ""): Histogram(BOUNDS, [1, 1, 1, 1, 1], 0.0005)}
    after = {
        (IN_WORKER, ""): Histogram(BOUNDS, [1, 3, 4, 4, 4], 0.0075),
        (GC, "0"): Histogram(BOUNDS, [2, 2, 2, 2, 2], 0.001),
        (GC, "2"): Histogram(BOUNDS, [0, 0, 0, 0, 1], 2.0),
    }
    got = inside(before, after)
    assert got["events"] == 3 and got["in_worker_p50_ms"] == 1.8
    assert got["gc_pauses"] == 3 and got["gc_full"] == 1 and got["gc_over_10ms"] == 1
    assert got["gc_max_bucket_ms"] == math.inf
    assert math.isnan(got["apply_p50_ms"]), "a histogram the worker does not have: NaN, not 0"


def test_snapshots_sum_the_processes_files(tmp_path):
    # Two processes observe into the same folder, as a worker's consumers do.
    script = textwrap.dedent(
        """
        import sys
        from inventory_worker import metrics
        for v in sys.argv[1:]:
            metrics.EVENT_SECONDS.observe(float(v))
        """
    )
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    for values in (["0.003", "0.004"], ["0.2"]):
        subprocess.run([sys.executable, "-c", script, *values], env=env, check=True)
    h = snapshot(tmp_path)[(IN_WORKER, "")]
    assert h.count == 3 and h.total == pytest.approx(0.207)
    assert settled(tmp_path, quiet=0.01)[(IN_WORKER, "")].count == 3
