"""The machine's own slowdowns: how long a fixed piece of CPU work takes, sampled all along.

On the shared 2-core VMs this benchmark runs on, a piece of Python work that takes 0.2 ms of
CPU takes 2 to 3 ms for about a tenth of a second every second or two, with nothing else
running. The process's own CPU time grows with its wall time (the guest counts the time as
running: it is the host that slows the VM down, not a queue inside it), and both CPUs slow
down at the same moments. Anything in flight then takes up to ten times longer: an order
whose 20 ms of end-to-end latency falls in such an episode takes 50 to 150 ms, whatever the
worker does. Those episodes, not the worker, can decide a p99.

`Probe` measures them while a run goes on: a process of its own does CHUNK_LOOPS iterations of
a Python loop (about 0.2 ms) every PERIOD_S and notes the chunk's CPU time (2 % of one core).
A chunk whose CPU time is more than SLOW_FACTOR times the run's median is slow; slow chunks
close together make an episode. With the episodes the benchmark reports, beside a run's p99,
the p99 of the orders that were *not* in flight during one, and how many were: what the
pipeline gives while the machine runs at speed. That figure explains the p99; it does not
replace it. `python -m bench.machine [SECONDS]` measures the machine alone.

`idle_cost()` measures another trait of these VMs: the same piece of work costs more CPU
after a pause of a few milliseconds than right after the last one (about 1.4x for a Python
loop of 0.8 ms after 7 ms asleep, on 2026-11-30; a PostgreSQL backend applying batches of 20
orders: 1.35x after 7 ms, nothing after 1 ms). At half load every process of the pipeline
sleeps between small batches, so its CPU per event includes that price; at full load nobody
sleeps. `make bench` prints it with the machine's slowdowns: read the half-load CPU against it.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

CHUNK_LOOPS = 3000  # about 0.2 ms of CPU here
PERIOD_S = 0.01  # a chunk every 10 ms: 2 % of one core
SLOW_FACTOR = 3.0  # a chunk this many times slower than the median is slowed down
GAP_S = 0.05  # slow chunks closer than this belong to one episode


IDLE_DATA = 200_000  # floats walked with a stride by idle_cost()'s piece of work (a few MB)
IDLE_STRIDE = 7  # about 0.8 ms of CPU here
IDLE_SMALL = 256  # floats of the same walk's small variant (a few KB, cached throughout)
IDLE_PAUSE_S = 0.007  # about a half-load batch's cycle at 2 processes


def _chunk() -> int:
    s = 0
    for i in range(CHUNK_LOOPS):
        s += i * i
    return s


def _sample(parent: int, ready: Any, stop: Any, out: Any) -> None:
    """Runs in the probe's process: (wall start, wall end, CPU seconds) of each chunk, until
    stopped or its parent is gone (a benchmark killed outright must not leave it running)."""
    samples: list[tuple[float, float, float]] = []
    ready.set()
    while not stop.is_set() and os.getppid() == parent:
        c0, t0 = time.thread_time(), time.time()
        _chunk()
        samples.append((t0, time.time(), time.thread_time() - c0))
        time.sleep(PERIOD_S)
    try:
        out.send(samples)
        out.close()
    except OSError:  # the parent is gone
        pass


@dataclass(frozen=True)
class Episode:
    start: float  # wall clock (time.time()), as the load generator's sent and arrival times:
    end: float  # from the first slow chunk's start to the last one's end (at least this long)
    factor: float  # the slowest chunk's CPU time over the median


def episodes(samples: list[tuple[float, float, float]]) -> tuple[list[Episode], float]:
    """The episodes in a probe's samples, and the median chunk's CPU seconds."""
    if not samples:
        return [], float("nan")
    cpu = sorted(c for _, _, c in samples)
    median = cpu[len(cpu) // 2]
    out: list[Episode] = []
    for start, end, c in samples:
        if c <= SLOW_FACTOR * median:
            continue
        factor = c / median
        if out and start - out[-1].end < GAP_S:
            last = out[-1]
            out[-1] = Episode(last.start, end, max(last.factor, factor))
        else:
            out.append(Episode(start, end, factor))
    return out, median


def summary(eps: list[Episode], median_s: float, seconds: float) -> dict[str, Any]:
    """Figures of the episodes over `seconds` of probing."""
    lengths = sorted((e.end - e.start) * 1000 for e in eps)
    factors = sorted(e.factor for e in eps)
    return {
        "seconds": round(seconds, 1),
        "chunk_cpu_us": round(median_s * 1e6, 1),
        "episodes": len(eps),
        "per_minute": round(len(eps) * 60 / seconds, 1) if seconds > 0 else float("nan"),
        "slowed_share": round(sum(lengths) / 1000 / seconds, 4) if seconds > 0 else float("nan"),
        "episode_ms_p50": round(lengths[len(lengths) // 2], 1) if lengths else 0.0,
        "episode_ms_max": round(lengths[-1], 1) if lengths else 0.0,
        "factor_p50": round(factors[len(factors) // 2], 1) if factors else 0.0,
    }


def clear_of(
    eps: list[Episode], sent: dict[str, float], arrived: dict[str, float]
) -> tuple[list[float], int]:
    """Latencies (ms, sorted) of the orders whose flight (sent to result) met no episode, and
    how many orders did meet one. An episode is widened by a sampling period on each side: it
    may have begun (or ended) between two chunks."""
    spans = sorted((e.start - PERIOD_S, e.end + PERIOD_S) for e in eps)
    clear: list[float] = []
    hit = 0
    for i, s in sent.items():
        a = arrived.get(i)
        if a is None:
            continue
        if any(start <= a and s <= end for start, end in spans):
            hit += 1
        else:
            clear.append((a - s) * 1000)
    return sorted(clear), hit


class Probe:
    """Samples the machine in a process of its own from start() to stop()."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._ready, self._stop = ctx.Event(), ctx.Event()
        self._recv, send = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(
            target=_sample, args=(os.getpid(), self._ready, self._stop, send), daemon=True
        )
        self._send = send

    def start(self) -> Probe:
        """Returns once the probe samples: its process's start-up (a Python interpreter) is
        over before what it is to watch begins."""
        self._proc.start()
        self._send.close()  # the child's end: EOF here if the child dies
        if not self._ready.wait(30):
            self.stop()
            raise RuntimeError("the machine probe did not start")
        return self

    def stop(self) -> tuple[list[Episode], dict[str, Any]]:
        """The episodes and their summary; the probe's process is gone after this."""
        self._stop.set()
        try:
            samples = self._recv.recv() if self._recv.poll(10) else []
        except EOFError:
            samples = []
        finally:
            self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
        eps, median = episodes(samples)
        seconds = samples[-1][1] - samples[0][0] if samples else 0.0
        return eps, summary(eps, median, seconds)


def idle_cost(rounds: int = 6, chunks: int = 150, pause_s: float = IDLE_PAUSE_S) -> dict[str, Any]:
    """CPU per piece of work done back to back and after `pause_s` asleep, in alternating
    rounds (medians), and their ratio; the same for a loop of as many steps over a few KB
    (`small_*`): where only the large one pays, the price is the caches."""
    large = [float(i % 1000) for i in range(IDLE_DATA)]
    small = large[:IDLE_SMALL]
    steps = len(range(0, IDLE_DATA, IDLE_STRIDE))

    def walk_large() -> float:  # a loop, not sum(data[::7]): a slice allocates, and page faults count
        s = 0.0
        for i in range(0, IDLE_DATA, IDLE_STRIDE):
            s += large[i]
        return s

    def walk_small() -> float:
        s = 0.0
        for i in range(steps):
            s += small[i % IDLE_SMALL]
        return s

    out: dict[str, Any] = {"pause_ms": round(pause_s * 1000, 1)}
    for prefix, work in (("", walk_large), ("small_", walk_small)):
        per: dict[str, list[float]] = {"busy": [], "after_pause": []}
        for r in range(rounds):
            for mode in ("busy", "after_pause") if r % 2 == 0 else ("after_pause", "busy"):
                c0 = time.thread_time()
                for _ in range(chunks):
                    if mode == "after_pause":
                        c0 += _sleep_uncounted(pause_s)
                    work()
                per[mode].append((time.thread_time() - c0) / chunks)
        busy, after = (round(sorted(v)[len(v) // 2] * 1e6, 1) for v in per.values())
        # The ratio of the figures as reported, so that they agree to the last digit.
        out.update(
            {
                prefix + "busy_us": busy,
                prefix + "after_pause_us": after,
                prefix + "ratio": round(after / busy, 2),
            }
        )
    return out


def _sleep_uncounted(seconds: float) -> float:
    """Sleeps; returns the thread's CPU time the sleep call itself took, to leave out."""
    c0 = time.thread_time()
    time.sleep(seconds)
    return time.thread_time() - c0


def alone(seconds: float) -> dict[str, Any]:
    """The machine's episodes with nothing of the benchmark running."""
    probe = Probe().start()
    try:
        time.sleep(seconds)
    finally:
        _, figures = probe.stop()
    return figures


if __name__ == "__main__":
    print(alone(float(sys.argv[1]) if len(sys.argv) > 1 else 15.0))
    print(idle_cost())
