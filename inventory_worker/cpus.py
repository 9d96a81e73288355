"""How many CPUs this process may use: what "one per CPU" means for the process defaults.

os.cpu_count() is the machine's count. In a container with a CPU limit (Kubernetes
`resources.limits.cpu`, `docker run --cpus`) that is the node's, so a pod limited to 2 CPUs on
a 64-core node would start 64 consumers. The limit is the cgroup's CPU quota over its period
(cgroup v2 `cpu.max` of the process's cgroup and those above it, v1 `cpu.cfs_quota_us` /
`cpu.cfs_period_us`), rounded up; the affinity mask (`taskset`, cpusets) can lower the count
too. The smallest of the three is taken.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def usable_cpus(cgroup: Path = CGROUP) -> int:
    """The CPUs this process may use, at least 1."""
    counts = [os.cpu_count() or 1]
    if hasattr(os, "sched_getaffinity"):
        counts.append(len(os.sched_getaffinity(0)))
    if (quota := cgroup_cpu_limit(cgroup)) is not None:
        counts.append(quota)
    return max(1, min(counts))


def cgroup_cpu_limit(cgroup: Path = CGROUP, own: Path = Path("/proc/self/cgroup")) -> int | None:
    """The cgroup's CPU quota in whole CPUs (rounded up), or None when there is none.

    cgroup v2: the process's own cgroup (named in /proc/self/cgroup: `/` in a container with
    its own cgroup namespace, `/system.slice/x.service` under systemd's `CPUQuota=`) and every
    cgroup above it, the tightest `cpu.max`. cgroup v1: the `cpu` controller's root."""
    limits = [n for d in _own_and_above(cgroup, own) if (n := _cpu_max(d / "cpu.max")) is not None]
    if limits:
        return min(limits)
    try:  # cgroup v1: a quota of -1 is no limit
        quota_us = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else _whole(quota_us, period_us)
    except (OSError, ValueError):
        return None


def _own_and_above(cgroup: Path, own: Path) -> list[Path]:
    try:
        path = next(line[3:] for line in own.read_text().splitlines() if line.startswith("0::"))
    except (OSError, StopIteration):
        path = "/"
    here = cgroup / path.strip().lstrip("/")
    return [here, *here.parents[: len(here.relative_to(cgroup).parts)]] if here.is_dir() else [cgroup]


def _cpu_max(file: Path) -> int | None:
    try:  # "max 100000" (no limit) or "200000 100000"
        quota, period = file.read_text().split()[:2]
        return None if quota == "max" else _whole(int(quota), int(period))
    except (OSError, ValueError):
        return None


def _whole(quota: int, period: int) -> int | None:
    return max(1, math.ceil(quota / period)) if period > 0 else None
