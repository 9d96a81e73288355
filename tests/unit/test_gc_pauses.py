"""metrics.GcPauses: the garbage collector's pauses, timed and added to a histogram in bulk."""

from __future__ import annotations

import gc

from inventory_worker import metrics


def _count(generation: str) -> float:
    child = metrics.GC_PAUSE_SECONDS.labels(generation)
    return sum(b.get() for b in child._buckets)


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
    total = metrics.GC_PAUSE_SECONDS.labels("1")._sum.get()
    pauses._callback("start", {"generation": 1})
    pauses._callback("stop", {"generation": 1, "collected": 0, "uncollectable": 0})
    pauses.flush()
    assert metrics.GC_PAUSE_SECONDS.labels("1")._sum.get() == total + 0.25
