"""metrics.GcPauses: the garbage collector's pauses, timed and added to a histogram in bulk."""

from __future__ import annotations

import gc

from prometheus_client import REGISTRY

from inventory_worker import metrics


def _sample(suffix: str, generation: str) -> float:
    return (
        REGISTRY.get_sample_value(f"inventory_gc_pause_seconds_{suffix}", {"generation": generation}) or 0.0
    )


def _count(generation: str) -> float:
    return _sample("count", generation)


def test_collections_are_timed_by_generation_and_added_only_at_flush():
    pauses = metrics.GcPauses()
    before = {g: _count(g) for g in "012"}
    pauses.install()
    pauses.install()  # once only: a second install must not double every pause
    try:
        gc.collect(2)
        gc.collect(2)
        gc.collect(0)
    finally:
        pauses.uninstall()
    gc.collect(2)  # after uninstall: not seen
    assert {g: _count(g) for g in "012"} == before, "nothing is written before flush()"
    pauses.flush()
    assert _count("2") == before["2"] + 2
    assert _count("0") == before["0"] + 1
    pauses.flush()  # what was flushed is not added twice
    assert _count("2") == before["2"] + 2


def test_a_pause_is_the_time_from_the_collections_start_to_its_end(monkeypatch):
    pauses = metrics.GcPauses()
    ticks = iter([10.0, 10.25])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(ticks))
    total = _sample("sum", "1")
    pauses._callback("start", {"generation": 1})
    pauses._callback("stop", {"generation": 1, "collected": 0, "uncollectable": 0})
    pauses.flush()
    assert _sample("sum", "1") == total + 0.25
