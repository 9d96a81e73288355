"""How many CPUs this process may use: what "one per CPU" means for the process defaults.

os.cpu_count() is the machine's count. In a container with a CPU limit (Kubernetes
`resources.limits.cpu`, `docker run --cpus`) that is the node's, so a pod limited to 2 CPUs on
a 64-core node would start 64 consumers. The limit is the cgroup's CPU quota over its period
(cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`, of the process's cgroup
and those above it), rounded up; the affinity mask (`taskset`, cpusets) can lower the count
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

    The process's own cgroup, as /proc/self/cgroup names it (`/` in a container with its own
    cgroup namespace, `/system.slice/x.service` under systemd's `CPUQuota=`), and every cgroup
    above it: the tightest quota. cgroup v2: `cpu.max`; v1: the `cpu` controller's
    `cpu.cfs_quota_us` / `cpu.cfs_period_us`. A path not found here (a container without its
    own cgroup namespace sees its own cgroup at the root) counts the root."""
    limits = [n for d in _own_and_above(cgroup, own, None) if (n := _cpu_max(d / "cpu.max")) is not None]
    if not limits:
        limits = [n for d in _own_and_above(cgroup / "cpu", own, "cpu") if (n := _cfs_quota(d)) is not None]
    return min(limits) if limits else None


def _own_and_above(root: Path, own: Path, controller: str | None) -> list[Path]:
    """The process's cgroup under `root` and the cgroups above it, up to `root`. v2 (no
    controller): the `0::` line of /proc/self/cgroup; v1: the line listing `controller`."""
    path = "/"
    try:
        for line in own.read_text().splitlines():
            hierarchy, controllers, rest = line.split(":", 2)
            if (controller is None and hierarchy == "0" and not controllers) or (
                controller is not None and controller in controllers.split(",")
            ):
                path = rest
                break
    except (OSError, ValueError):
        pass
    here = root / path.strip().lstrip("/")
    return [here, *here.parents[: len(here.relative_to(root).parts)]] if here.is_dir() else [root]


def _cfs_quota(directory: Path) -> int | None:
    try:  # a quota of -1 is no limit
        quota_us = int((directory / "cpu.cfs_quota_us").read_text())
        period_us = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota_us <= 0 else _whole(quota_us, period_us)


def _cpu_max(file: Path) -> int | None:
    try:  # "max 100000" (no limit) or "200000 100000"
        quota, period = file.read_text().split()[:2]
        return None if quota == "max" else _whole(int(quota), int(period))
    except (OSError, ValueError):
        return None


def _whole(quota: int, period: int) -> int | None:
    return max(1, math.ceil(quota / period)) if period > 0 else None
