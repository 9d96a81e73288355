"""How many CPUs this process may use: what "one per CPU" means for the process defaults.

os.cpu_count() is the machine's count. In a container with a CPU limit (Kubernetes
`resources.limits.cpu`, `docker run --cpus`) that is the node's, so a pod limited to 2 CPUs on
a 64-core node would start 64 consumers. The limit is the cgroup's CPU quota over its period
(cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`), rounded up; the affinity
mask (`taskset`, cpusets) can lower the count too. The smallest of the three is taken.
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


def cgroup_cpu_limit(cgroup: Path = CGROUP) -> int | None:
    """The cgroup's CPU quota in whole CPUs (rounded up), or None when there is none."""
    try:  # cgroup v2: "max 100000" (no limit) or "200000 100000"
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else _whole(int(quota), int(period))
    except (OSError, ValueError):
        pass
    try:  # cgroup v1: a quota of -1 is no limit
        quota_us = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else _whole(quota_us, period_us)
    except (OSError, ValueError):
        return None


def _whole(quota: int, period: int) -> int | None:
    return max(1, math.ceil(quota / period)) if period > 0 else None
