"""The benchmark in miniature (seconds), so that it cannot rot. Figures are printed, not asserted;
what is asserted is what must hold at any speed: every order got its result, nothing oversold."""

import json
import subprocess
import tempfile

import pika
import pika.exceptions
import pytest

from bench import run
from tests.support import REPO, pg


@pytest.mark.slow
def test_bench_smoke(tmp_path, monkeypatch):
    # Its temporary folders (logs, the worker's metrics) in one of the test's own: all must go.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("TMPDIR", str(scratch))
    out = tmp_path / "results.json"
    # its table is printed (shown with -s or on failure); two half-load rounds, not the smoke's one
    run.main(["--smoke", "--half-rounds", "2", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["pgbench"]["tps"]["c16"] > 0
    assert saved["machine"]["slowdowns_alone"]["chunk_cpu_us"] > 0  # the machine alone, probed first
    idle = saved["machine"]["idle_cost"]  # and the price of a pause
    assert idle["busy_us"] > 0 and idle["ratio"] == round(idle["after_pause_us"] / idle["busy_us"], 2)
    assert idle["small_ratio"] == round(idle["small_after_pause_us"] / idle["small_busy_us"], 2)
    assert saved["naive"] and saved["worker"]
    # the naive consumer: the same workloads (but locations3) with as many processes as the worker
    assert {(n["workload"], n["procs"]) for n in saved["naive"]} == {
        (w, 2) for w in ("uniform", "hot", "flash", "preorder")
    }
    for n in saved["naive"]:
        assert n["sent"] == n["received"] > 0 and n.get("oversold") is not True, n
    for row in saved["summary"]["rows"]:
        assert row["lost"] == 0, row
        assert row["extra_results"] == 0, row  # one result per order
        assert row["oversold"] is False, row
        cpu = row["cpu_us_per_event"]  # where the CPU went (bench/cpu.py): measured, not asserted
        assert cpu["total"] > 0 and cpu["postgres"] > 0 and cpu["load generator"] > 0, cpu
        half = row["half_cpu_us_per_event"]  # the same at half load, median of the rounds
        assert half["postgres"] > 0 and half["worker"] > 0, half
        assert 0 < half["pipeline"] <= 1.1 * half["total"], half  # a part of the machine's (ticks: 10 ms)
    for wr in saved["worker"]:
        assert all(len(r["half_rounds"]) == 2 for r in wr["runs"].values()), "--half-rounds 2"
        hot = wr["runs"]["hot"]
        for run_ in [hot["full"], *hot["half_rounds"]]:
            assert run_["reserved_matches_results"] and run_["cache_matches_db"], run_
            assert run_["sold_out"], run_  # stock for half the orders: all of it sold
        # flash: one product, stock for a third of the orders: sold out exactly, the rest
        # rejected, one result per order
        flash = wr["runs"]["flash"]
        for run_ in [flash["full"], *flash["half_rounds"]]:
            assert run_["sold_out"] and run_["reserved_matches_results"], run_
            assert run_["reserved_qty"] == run_["stock"] and run_["rest_rejected"], run_
            assert run_["answered"] and run_["one_result_each"] and not run_["oversold"], run_
            assert run_["cache_matches_db"], run_
        # preorder: every order placed is backordered, up to the limit exactly; one receipt
        # fills them all, each once, oldest first, and the figures add up at the end
        pre = wr["runs"]["preorder"]
        for run_ in [pre["full"], *pre["half_rounds"]]:
            assert run_["all_backordered"] and run_["limit_reached"], run_
            assert run_["answered"] and run_["one_result_each"] and not run_["oversold"], run_
        fill = pre["fill"]
        assert fill["orders"] == pre["full"]["limit"] == fill["fill_events"], fill
        assert fill["filled_once"] and fill["fifo"] and fill["within_stock"], fill
        assert fill["figures_ok"] and fill["cache_matches_db"], fill
        assert fill["after"]["backordered"] == 0 and fill["after"]["reserved"] == fill["units"], fill
        assert 0 < fill["filled_by_receipt"] <= 100, fill  # worker.backorder_fill_batch, then the sweeper
        # half load kept its per-window timeline (the latency chart)
        assert all(r["timeline"] for r in wr["runs"]["uniform"]["half_rounds"])
        # what went on inside the worker in each run, from its own histograms: every order
        # counted once, in batches of at most worker.batch_size
        uniform = wr["runs"]["uniform"]
        for run_ in [uniform["full"], *uniform["half_rounds"]]:
            inside = run_["inside"]
            assert inside["events"] == run_["sent"], inside
            assert 1 <= inside["batches"] <= inside["events"], inside
            assert 1 <= inside["batch_mean"] <= 100, inside
            assert 0 < inside["apply_p50_ms"] <= inside["apply_p99_ms"], inside
            assert 0 < inside["in_worker_p50_ms"] <= inside["in_worker_p99_ms"], inside
            assert inside["gc_pauses"] >= inside["gc_over_10ms"] >= 0, inside
        # each order's time split by the worker's log lines (bench/order_split.py): every
        # order's line found, so the split's p99 is the round's own
        for run_ in uniform["half_rounds"]:
            split = run_["split"]
            assert split["orders"] == run_["received"], split
            assert split["p99_ms"] == pytest.approx(run_["p99_ms"], abs=0.1), (split, run_["p99_ms"])
            t = split["slowest_1pct_ms"]
            assert t["total"] >= split["p99_ms"] - 0.1, t
            assert t["batch_in_hand"] >= 0 and 0 < t["in_worker"] < t["total"], t
        # every half-load round was probed for the machine's own slowdowns (bench/machine.py):
        # each answered order counted as in flight during one, or in the clear p99
        for run_ in uniform["half_rounds"]:
            m = run_["slowdowns"]
            assert m["chunk_cpu_us"] > 0 and m["seconds"] > 0 and 0 <= m["slowed_share"] < 1, m
            assert 0 <= run_["in_slowdown"] <= run_["received"], run_
            assert run_["in_slowdown"] == run_["received"] or run_["p99_clear_ms"] > 0, run_
        # locations3: orders on a channel over three locations, each product stocked at one of
        # them: every location took orders (order_allocations), none is oversold.
        loc = wr["runs"]["locations3"]
        for run_ in [loc["full"], *loc["half_rounds"]]:
            assert sorted(run_["allocations_by_location"]) == run.LOCATIONS, run_
            assert min(run_["allocations_by_location"].values()) > 0, run_
            assert run_["oversold"] is False, run_
    assert "2" in saved["summary"]["locations3_vs_uniform"]
    assert {"flash", "preorder", "locations3"} <= set(saved["summary"]["vs_uniform"])
    if "granian" in saved["http"]:
        assert saved["http"]["granian"]["non_2xx"] == 0
    # The charts beside the results (matplotlib: the `bench` extra, also in `test`).
    from bench import charts

    drawn = {p.name for p in tmp_path.glob("results-*.png")}
    expected = {f"results-{c}.png" for c in ("throughput", "cpu", "latency", "preorder")}
    assert expected <= drawn, drawn
    # redrawn from the results alone, elsewhere
    redrawn = charts.main([str(out), "--out", str(tmp_path / "again")])
    assert {p.name for p in redrawn} == drawn and all(p.stat().st_size > 10_000 for p in redrawn)
    assert not list(scratch.iterdir()), "a passed run leaves no temporary folder behind"


# The commit before Part A of "stock across locations" (migration 080): C6 is measured against it.
def _before_locations() -> str:
    added = subprocess.run(
        ["git", "log", "--diff-filter=A", "--format=%H", "-1", "--", "sql/migrations/080_locations.sql"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return f"{added}^"


@pytest.mark.slow
def test_bench_compare_runs_the_other_version(tmp_path, monkeypatch):
    """--compare REV: REV's worker runs from its own exported code, schema and config file,
    beside this one; this checkout's file may set a key REV does not know (REV refuses those)."""
    from tests import support

    config = tmp_path / "config.yaml"
    config.write_text(
        support.CONFIG_FILE.read_text().replace("\nworker:\n", "\nworker:\n  round_robin_processes: 2\n", 1)
    )
    assert "round_robin_processes" in config.read_text()
    monkeypatch.setattr(support, "CONFIG_FILE", config)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("TMPDIR", str(scratch))
    out = tmp_path / "results.json"
    run.main(
        [
            "--smoke",
            "--parts",
            "worker",
            "--workloads",
            "uniform",
            "--count",
            "200",
            "--compare",
            _before_locations(),
            "--out",
            str(out),
        ]
    )
    saved = json.loads(out.read_text())
    [pair] = saved["compare"]["pairs"]
    rev, current = pair["sides"]["rev"], pair["sides"]["current"]
    assert rev["last_migration"] < 80 <= current["last_migration"], pair["sides"]
    assert rev["worker_cwd"].endswith("/rev") and rev["worker_cwd"] != current["worker_cwd"], pair["sides"]
    [row] = saved["summary"]["compare"]
    assert row["lost"] == 0 and row["events_ratio"] > 0, row
    assert not list(scratch.iterdir()), "a passed run leaves no temporary folder behind"


@pytest.mark.slow
def test_sqlcost_measures_both_versions():
    """bench.sqlcost: the backend CPU per order on REV's procedures and on these; its databases go."""
    from bench import sqlcost

    res = sqlcost.main([_before_locations(), "--rounds", "1", "--batches", "2", "--batch", "10"])
    assert res["batch"] == 10
    for name in sqlcost.WORKLOADS:  # multi5: five lines an order
        assert len(res["rounds"][name]["rev"]) == len(res["rounds"][name]["current"]) == 1, res
        assert res["ratio"][name] > 0, res
    settings = run.bench_settings()
    maintenance = settings.model_copy(
        update={"database": settings.database.model_copy(update={"dbname": "postgres"})}
    )
    with pg(maintenance) as cur:
        cur.execute("SELECT count(*) FROM pg_database WHERE datname = ANY(%s)", (res["databases"],))
        assert cur.fetchone()[0] == 0, res["databases"]


def test_receive_measures_both_readers_and_deletes_its_queue():
    """bench.receive: CPU per message with pika's reader and ours; its queue goes."""
    from bench import receive

    res = receive.main(["--messages", "300", "--rounds", "2"])
    assert len(res["pika"]) == len(res["ours"]) == 2, res
    assert all(v > 0 for v in res["pika"] + res["ours"]), res
    conn = pika.BlockingConnection(pika.URLParameters(str(run.bench_settings().rabbitmq.url)))
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker):  # 404: it is gone
            conn.channel().queue_declare(res["queue"], passive=True)
    finally:
        conn.close()


def test_receive_stops_waiting_for_messages_that_never_come():
    """bench.receive's drain gives up with an error instead of waiting for ever (a lost
    message once hung the suite until its timeout)."""
    import uuid

    from bench import receive

    url = str(run.bench_settings().rabbitmq.url)
    queue = f"bench.receive.{uuid.uuid4().hex[:8]}"
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        conn.channel().queue_declare(queue)
        receive.fill(url, queue, 2)
        with pytest.raises(RuntimeError, match="only 2 of 5 messages"):
            receive.drain(url, queue, 5, timeout=1.0)
    finally:
        conn.channel().queue_delete(queue)
        conn.close()
