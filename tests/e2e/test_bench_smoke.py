"""The benchmark in miniature (seconds), so that it cannot rot. Figures are printed, not asserted;
what is asserted is what must hold at any speed: every order got its result, nothing oversold."""

import json
import tempfile

import pytest

from bench import run


@pytest.mark.slow
def test_bench_smoke(tmp_path, monkeypatch):
    # Its temporary folders (logs, the worker's metrics) in one of the test's own: all must go.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("TMPDIR", str(scratch))
    out = tmp_path / "results.json"
    run.main(["--smoke", "--out", str(out)])  # its table is printed (shown with -s or on failure)
    saved = json.loads(out.read_text())
    assert saved["pgbench"]["tps"]["c16"] > 0
    assert saved["naive"] and saved["worker"]
    for row in saved["summary"]["rows"]:
        assert row["lost"] == 0, row
        assert row["oversold"] is False, row
        cpu = row["cpu_us_per_event"]  # where the CPU went (bench/cpu.py): measured, not asserted
        assert cpu["total"] > 0 and cpu["postgres"] > 0 and cpu["load generator"] > 0, cpu
    for wr in saved["worker"]:
        hot = wr["runs"]["hot"]
        for run_ in [hot["full"], *hot["half_rounds"]]:
            assert run_["reserved_matches_results"] and run_["cache_matches_db"], run_
            assert run_["sold_out"], run_  # stock for half the orders: all of it sold
    if "granian" in saved["http"]:
        assert saved["http"]["granian"]["non_2xx"] == 0
    assert not list(scratch.iterdir()), "a passed run leaves no temporary folder behind"
