""" "One per CPU" counts the CPUs this process may use: a container's limit, not the node's."""

from __future__ import annotations

import os

import pytest

from inventory_worker.cpus import cgroup_cpu_limit, usable_cpus


def v2(tmp_path, text: str):
    (tmp_path / "cpu.max").write_text(text)
    return tmp_path


def v1(tmp_path, quota: int, period: int = 100_000):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(f"{period}\n")
    return tmp_path


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("200000 100000\n", 2), ("150000 100000\n", 2), ("50000 100000\n", 1), ("max 100000\n", None)],
)
def test_cgroup_v2_limit_in_whole_cpus_rounded_up(tmp_path, text, cpus):
    assert cgroup_cpu_limit(v2(tmp_path, text)) == cpus


@pytest.mark.parametrize(("quota", "cpus"), [(400_000, 4), (250_000, 3), (-1, None)])
def test_cgroup_v1_limit(tmp_path, quota, cpus):
    assert cgroup_cpu_limit(v1(tmp_path, quota)) == cpus


def test_no_cgroup_files_no_limit(tmp_path):
    assert cgroup_cpu_limit(tmp_path) is None
    assert cgroup_cpu_limit(v2(tmp_path, "garbage")) is None


def test_usable_cpus_is_the_smallest_of_machine_affinity_and_limit(tmp_path):
    machine = min(os.cpu_count() or 1, len(os.sched_getaffinity(0)))
    assert usable_cpus(tmp_path) == machine  # no limit
    assert usable_cpus(v2(tmp_path, "100000 100000")) == 1
    assert usable_cpus(v2(tmp_path, f"{(machine + 8) * 100000} 100000")) == machine


def test_the_process_defaults_follow_the_usable_cpus(monkeypatch):
    from inventory_worker import supervisor
    from inventory_worker.config import load_settings
    from inventory_worker.worker import consumer

    monkeypatch.setattr(supervisor, "usable_cpus", lambda: 3)
    monkeypatch.setattr(consumer, "usable_cpus", lambda: 3)
    s = load_settings()
    s = s.model_copy(
        update={
            "http": s.http.model_copy(update={"enabled": False}),
            "worker": s.worker.model_copy(update={"processes": None, "round_robin_processes": None}),
        }
    )
    sup = supervisor.Supervisor(s)
    assert [c.role for c in sup.children] == ["consumer-0", "consumer-1", "consumer-2"]
    assert consumer.ConsumerConfig.from_settings(s).round_robin_processes == 3


def nested(tmp_path, limits: dict[str, str], own: str):
    """A cgroup v2 tree with `cpu.max` where `limits` says, and /proc/self/cgroup naming `own`."""
    root = tmp_path / "cgroup"
    root.mkdir()
    for path, text in limits.items():
        (root / path).mkdir(parents=True, exist_ok=True)
        (root / path / "cpu.max").write_text(text)
    (tmp_path / "proc-cgroup").write_text(f"0::{own}\n")
    return root, tmp_path / "proc-cgroup"


def test_a_systemd_services_own_cgroup_and_those_above_it_count(tmp_path):
    root, own = nested(
        tmp_path,
        {"system.slice": "max 100000", "system.slice/w.service": "150000 100000"},
        "/system.slice/w.service",
    )
    assert cgroup_cpu_limit(root, own) == 2  # CPUQuota=150% on the service


def test_the_tightest_limit_above_the_process_wins(tmp_path):
    root, own = nested(
        tmp_path,
        {"system.slice": "100000 100000", "system.slice/w.service": "max 100000"},
        "/system.slice/w.service",
    )
    assert cgroup_cpu_limit(root, own) == 1  # the slice's


def test_a_cgroup_path_not_mounted_here_falls_back_to_the_root(tmp_path):
    root, own = nested(tmp_path, {"": "300000 100000"}, "/kubepods/pod1/abc")  # no cgroup namespace
    assert cgroup_cpu_limit(root, own) == 3


def nested_v1(tmp_path, quotas: dict[str, int], line: str):
    """A cgroup v1 `cpu` hierarchy with `cfs_quota_us` where `quotas` says (period 100 ms), and
    /proc/self/cgroup holding `line` (beside other controllers' lines)."""
    root = tmp_path / "cgroup"
    for path, quota in quotas.items():
        d = root / "cpu" / path
        d.mkdir(parents=True, exist_ok=True)
        (d / "cpu.cfs_quota_us").write_text(f"{quota}\n")
        (d / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "proc-cgroup").write_text(f"12:memory:/elsewhere\n{line}\n1:name=systemd:/x\n")
    return root, tmp_path / "proc-cgroup"


def test_cgroup_v1_a_systemd_services_own_quota_counts(tmp_path):
    root, own = nested_v1(
        tmp_path,
        {"": -1, "system.slice": -1, "system.slice/w.service": 250_000},
        "4:cpu,cpuacct:/system.slice/w.service",
    )
    assert cgroup_cpu_limit(root, own) == 3  # CPUQuota=250% on a cgroup v1 host


def test_cgroup_v1_the_tightest_quota_above_wins_and_unmounted_paths_count_the_root(tmp_path):
    root, own = nested_v1(
        tmp_path, {"": -1, "kubepods": 200_000, "kubepods/pod1": -1}, "4:cpuacct,cpu:/kubepods/pod1"
    )
    assert cgroup_cpu_limit(root, own) == 2
    root, own = nested_v1(tmp_path / "b", {"": 100_000}, "4:cpu,cpuacct:/docker/abc")  # no namespace
    assert cgroup_cpu_limit(root, own) == 1
