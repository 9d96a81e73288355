"""The consumers' health slots in named shared memory: what one process writes, any other reads,
and only the creator deletes the segment (an attaching process never does, even at its exit)."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys

import pytest

from inventory_worker.heartbeats import ProcessHealth

from ..support import REPO


def _write_slot(health: ProcessHealth, slot: int) -> None:
    health.beat(slot)
    health.set_attached(slot, True)


def test_a_spawned_child_writes_the_slots_the_parent_reads():
    health = ProcessHealth.create(2)
    try:
        assert health.detached() == [0, 1]
        p = multiprocessing.get_context("spawn").Process(target=_write_slot, args=(health, 1))
        p.start()
        p.join(60)
        assert p.exitcode == 0
        assert health.detached() == [0]
        assert health.last_beat(1) > health.last_beat(0)
    finally:
        health.close()


def test_an_unrelated_process_attaches_by_name_and_leaves_the_segment_alone():
    """A fresh interpreter has its own resource tracker; on Python < 3.13 that tracker would
    unlink an attached segment when the process ends, under the supervisor's feet."""
    health = ProcessHealth.create(3)
    try:
        code = (
            "import sys; from inventory_worker.heartbeats import ProcessHealth; "
            "h = ProcessHealth.attach(sys.argv[1], 3); h.beat(2); h.set_attached(2, True); h.close()"
        )
        r = subprocess.run(
            [sys.executable, "-c", code, health.name], cwd=REPO, capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 0, r.stderr
        assert "leaked" not in r.stderr and "resource_tracker" not in r.stderr
        assert health.detached() == [0, 1]
        again = ProcessHealth.attach(health.name, 3)  # still there, by name
        assert again.detached() == [0, 1]
        again.close()
    finally:
        health.close()
    with pytest.raises(FileNotFoundError):  # the creator's close() deleted it
        ProcessHealth.attach(health.name, 3)
