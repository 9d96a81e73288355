"""One expiry sweeper across every process of every replica, and takeover when it dies.

Two `run` instances share a private database (the run's shared one has other workers and
their sweepers). The holder of the advisory lock is found in pg_locks; its session names the
process (application_name), which is then SIGKILLed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

from inventory_worker.adapters.postgres import SWEEPER_LOCK_KEY

from ..private_stack import all_figures, private_settings
from ..support import Bus, pg, poll, uid


def sweeper_holders(s) -> list[tuple[int, str]]:
    """(backend pid, application_name) of every session holding the sweeper lock."""
    with pg(s) as cur:
        cur.execute(
            "SELECT l.pid, a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
            " WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s AND l.objid = %s"
            "   AND l.objsubid = 1 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            (SWEEPER_LOCK_KEY >> 32, SWEEPER_LOCK_KEY & 0xFFFFFFFF),
        )
        return cur.fetchall()


def holder_process(s) -> int | None:
    holders = sweeper_holders(s)
    assert len(holders) <= 1
    if not holders:
        return None
    m = re.search(r"pid=(\d+)", holders[0][1])
    assert m, holders
    return int(m.group(1))


def wait_for(predicate, timeout, what):
    return poll(predicate, timeout, 0.05, what)


def activations(*workers) -> int:
    n = 0
    for w in workers:
        for line in w.log_path.read_text().splitlines():
            try:
                n += json.loads(line).get("event") == "expiry sweeper active in this process"
            except ValueError:
                pass
    return n


def test_one_sweeper_across_replicas_and_takeover_after_sigkill(settings, start_worker):
    with private_settings(settings, "sweep") as s:
        a = start_worker(processes=1, settings_override=s)
        b = start_worker(processes=1, settings_override=s)
        consumers = set(a.children()) | set(b.children())
        bus = Bus(s)
        try:
            holder = wait_for(lambda: holder_process(s), 15, "a sweeper")
            assert holder in consumers
            for _ in range(10):  # leadership is stable: the same single holder, not a rotation
                assert holder_process(s) == holder
                time.sleep(0.1)
            assert activations(a, b) == 1

            sku = uid("SWP")
            bus.wait_result(bus.publish("stock.adjusted", {"product_id": sku, "on_hand": 10})["id"])
            first = bus.publish(
                "order.placed",
                {
                    "order_id": uid("o"),
                    "reservation_ttl_seconds": 1,
                    "lines": [{"product_id": sku, "quantity": 2}],
                },
            )
            bus.wait_result(first["id"], "inventory.expired", timeout=20)

            # A reservation that falls due while the sweeper is dead.
            second = bus.publish(
                "order.placed",
                {
                    "order_id": uid("o"),
                    "reservation_ttl_seconds": 1,
                    "lines": [{"product_id": sku, "quantity": 3}],
                },
            )
            bus.wait_result(second["id"], "inventory.reserved")
            os.kill(holder, signal.SIGKILL)
            killed_at = time.monotonic()
            successor = wait_for(
                lambda: (p := holder_process(s)) not in (None, holder) and p,
                15,
                "another process to take the sweeper over",
            )
            takeover = time.monotonic() - killed_at
            assert takeover < 5.0, f"takeover took {takeover:.1f}s"
            print(f"sweeper takeover after SIGKILL: {takeover:.2f}s")
            assert successor in set(a.children()) | set(b.children())
            bus.wait_result(second["id"], "inventory.expired", timeout=20)
            time.sleep(1.5)  # a few more sweeps: nothing expires twice
            for placed in (first, second):
                assert [r["type"] for r in bus.results_for(placed["id"])].count("inventory.expired") == 1
            assert all_figures(s, [sku]) == {sku: (10, 0)}
            assert len(sweeper_holders(s)) == 1
            # The replica whose child was killed still stops cleanly on SIGTERM.
            assert (a.stop(timeout=20), b.stop(timeout=20)) == (0, 0)
        finally:
            bus.close()
            a.stop()
            b.stop()
