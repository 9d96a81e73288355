"""bench/machine.py: the machine's own slowdowns, found in a probe's samples, and the orders
that were in flight during none of them."""

from __future__ import annotations

import math
import time

import pytest

from bench.machine import GAP_S, PERIOD_S, Episode, Probe, clear_of, episodes, summary


def _samples(cpu_ms: list[float], start: float = 1000.0) -> list[tuple[float, float, float]]:
    """A chunk every 10 ms taking `cpu_ms` of CPU (and as long on the clock)."""
    out, t = [], start
    for c in cpu_ms:
        out.append((t, t + c / 1000, c / 1000))
        t += c / 1000 + PERIOD_S
    return out


def test_slow_chunks_close_together_make_one_episode_and_far_apart_two():
    cpu = [0.2] * 20 + [2.4, 2.6, 2.0] + [0.2] * 20 + [0.7] + [0.2] * 10  # 0.7 ms: 3.5x the median
    eps, median = episodes(_samples(cpu))
    assert median == pytest.approx(0.0002)
    assert len(eps) == 2
    first, second = eps
    assert first.factor == pytest.approx(13.0)  # the slowest chunk of the episode
    assert (first.end - first.start) * 1000 == pytest.approx(2.4 + 10 + 2.6 + 10 + 2.0)
    assert second.factor == pytest.approx(3.5) and second.start - first.end > GAP_S
    assert episodes(_samples([0.2] * 50 + [0.55]))[0] == []  # 2.75x: not slowed down
    assert episodes([]) == ([], pytest.approx(math.nan, nan_ok=True))


def test_summary_of_episodes():
    eps = [Episode(0.0, 0.1, 10.0), Episode(1.0, 1.02, 4.0), Episode(2.0, 2.05, 12.0)]
    s = summary(eps, 0.0002, seconds=30.0)
    assert s["episodes"] == 3 and s["per_minute"] == 6.0
    assert s["slowed_share"] == pytest.approx(0.17 / 30, abs=1e-4)
    assert s["episode_ms_p50"] == 50.0 and s["episode_ms_max"] == 100.0
    assert s["factor_p50"] == 10.0 and s["chunk_cpu_us"] == 200.0
    assert summary([], 0.0002, 10.0)["episodes"] == 0


def test_orders_in_flight_during_an_episode_are_told_apart():
    eps = [Episode(10.0, 10.1, 8.0)]
    sent = {"before": 9.0, "across": 9.95, "inside": 10.05, "after": 10.2, "lost": 10.0, "edge": 10.105}
    arrived = {"before": 9.02, "across": 10.0, "inside": 10.09, "after": 10.22, "edge": 10.12}
    clear, hit = clear_of(eps, sent, arrived)
    # "edge" was sent 5 ms after the last slow chunk: within a sampling period, counted as hit.
    assert hit == 3  # across, inside, edge
    assert clear == [pytest.approx(20.0), pytest.approx(20.0)]  # before and after; lost is neither
    clear_all, none = clear_of([], sent, arrived)
    assert none == 0 and len(clear_all) == 5


def test_a_probe_samples_in_its_own_process_and_leaves_nothing_running():
    probe = Probe().start()
    time.sleep(0.3)
    eps, figures = probe.stop()
    assert not probe._proc.is_alive()
    assert figures["chunk_cpu_us"] > 0 and 0.1 < figures["seconds"] < 5
    assert figures["episodes"] == len(eps) and 0 <= figures["slowed_share"] < 1


def test_a_probe_whose_benchmark_is_killed_stops_by_itself():
    """SIGKILL leaves no chance to stop the probe: it notices its parent is gone and exits."""
    import os
    import subprocess
    import sys

    code = (
        "import os, sys; from bench.machine import Probe\n"
        "if __name__ == '__main__':\n"
        "    p = Probe().start(); print(p._proc.pid, flush=True); os._exit(0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    pid = int(done.stdout.split()[0])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        pytest.fail("the probe outlived its parent")


def test_idle_cost_leaves_the_pause_itself_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the work is counted: a pause that burns CPU itself (here, a busy wait of 7 ms
    against about 1 ms of work) must not show in the work's cost after it."""
    from bench import machine

    def busy_wait(seconds: float) -> None:
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    monkeypatch.setattr(machine.time, "sleep", busy_wait)
    figures = machine.idle_cost(rounds=2, chunks=5, pause_s=0.007)
    assert figures["pause_ms"] == 7.0 and figures["busy_us"] > 0
    assert figures["ratio"] == round(figures["after_pause_us"] / figures["busy_us"], 2)
    assert figures["ratio"] < 3, figures  # with the 7 ms counted it would be about 8
