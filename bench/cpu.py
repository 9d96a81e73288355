"""Where the machine's CPU goes: CPU time per event, by component, read from /proc.

The worker shares two cores with PostgreSQL, RabbitMQ, Redis and the load generator, so its
throughput is bounded by the CPU the whole pipeline spends per event. Comparing that with what
pgbench spends per transaction (the baseline of the same run) shows what limits the ratio:

  cpu = CpuMeter(worker_pids)      # before the run
  ...                              # the run
  cpu.per_event(events)            # {"postgres": us, "rabbitmq": us, ..., "total": us}

Components are told apart by process name; the load generator's CPU is what its processes
report (their start-up left out). A process that ends during the run (a PostgreSQL backend or
autovacuum worker, a consumer) is no longer there to be read at the end: its CPU is found in
what its parent has reaped (cutime, cstime), minus what it had used before the run, and counted
with the parent's component. Linux only: elsewhere it reports nothing rather than fail the
benchmark.
"""

from __future__ import annotations

import os
from pathlib import Path

COMPONENTS = {"postgres": "postgres", "beam.smp": "rabbitmq", "redis-server": "redis"}
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def run_time_ns(pid: int) -> int:
    """Nanoseconds one process (a PostgreSQL backend, say) has run on a CPU, from schedstat:
    /proc/PID/stat counts 10 ms ticks, too coarse for one backend's cost per event."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def process_cpu() -> dict[int, tuple[str, float, float]]:
    """{pid: (name, user+system seconds, those of its ended children it has reaped)} of every
    process now alive."""
    out: dict[int, tuple[str, float, float]] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(p.name)] = (
            name,
            (int(fields[11]) + int(fields[12])) / _TICK,
            (int(fields[13]) + int(fields[14])) / _TICK,
        )
    return out


def machine_busy() -> float:
    """CPU seconds the whole machine spent not idle, since boot (all cores)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / _TICK  # minus idle and iowait


class CpuMeter:
    """CPU used between its creation and per_event(), split by component."""

    def __init__(self, worker_pids: set[int] | None = None) -> None:
        self.available = Path("/proc/stat").exists()
        self.worker_pids = worker_pids or set()
        if self.available:
            self._procs, self._busy = process_cpu(), machine_busy()

    def per_event(self, events: int, load_generator_seconds: float) -> dict[str, float]:
        """Microseconds of CPU per event: each component's (the load generator's as it
        reports it), and the machine's total."""
        if not self.available or events <= 0:
            return {}
        procs, busy = process_cpu(), machine_busy()
        used: dict[str, float] = {}

        def add(pid: int, name: str, seconds: float) -> None:
            kind = "worker" if pid in self.worker_pids else COMPONENTS.get(name)
            if kind:
                used[kind] = used.get(kind, 0.0) + seconds

        for pid, (name, seconds, reaped) in procs.items():
            before = self._procs.get(pid)
            if before and before[0] == name:
                seconds, reaped = seconds - before[1], reaped - before[2]
            add(pid, name, seconds + reaped)
        for pid, (name, seconds, _) in self._procs.items():
            if procs.get(pid, ("",))[0] != name:  # ended: its parent reaped all of its CPU
                add(pid, name, -seconds)
        used["load generator"] = load_generator_seconds
        used["total"] = busy - self._busy
        used["other"] = max(0.0, used["total"] - sum(v for k, v in used.items() if k != "total"))
        return {k: round(v / events * 1e6, 1) for k, v in used.items()}


def machine_per_unit(before_busy: float, units: int) -> float:
    """Microseconds of the machine's CPU per unit of work since `before_busy`."""
    return round((machine_busy() - before_busy) / units * 1e6, 1) if units > 0 else float("nan")
