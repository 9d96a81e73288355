"""bench/order_split.py: an order's time split into waiting for the batch in hand, the rest
before its consumer read it, the worker, and after, from the worker's own log lines."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from bench.order_split import handled, split

T0 = datetime(2026, 11, 30, 8, 0, 10, tzinfo=UTC).timestamp()


def line(event_id: str, pid: int, at: float, duration_ms: float) -> bytes:
    stamp = datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return (
        orjson.dumps(
            {
                "event_id": event_id,
                "duration_ms": duration_ms,
                "event": "event handled",
                "process": "consumer-0",
                "pid": pid,
                "level": "info",
                "timestamp": stamp,
            }
        )
        + b"\n"
    )


def test_an_order_sent_during_its_consumers_batch_waits_for_it_unread(tmp_path):
    log = tmp_path / "worker.log"
    log.write_bytes(b'{"event": "consuming", "pid": 7}\n' + line("old", 7, T0 - 5, 1.0))
    offset = log.stat().st_size
    with open(log, "ab") as f:
        f.write(line("A", 7, T0 + 0.010, 5.0))  # batch 1: A, read at +5 ms
        f.write(line("C", 8, T0 + 0.020, 4.0))  # another consumer's batch: not B's
        f.write(line("B", 7, T0 + 0.030, 8.0))  # batch 2: B, read at +22 ms
        f.write(b'{"event": "event handled", "pid": 7, "time')  # cut by the stop
    lines = handled(log, offset)
    assert set(lines) == {"A", "B", "C"}  # only what came after the offset
    assert lines["B"] == (7, pytest.approx(T0 + 0.030), pytest.approx(0.008))

    sent = {"A": T0, "B": T0 + 0.005, "C": T0 + 0.012, "lost": T0}
    arrived = {"A": T0 + 0.012, "B": T0 + 0.033, "C": T0 + 0.021}
    s = split(sent, arrived, lines)
    assert s["orders"] == 3  # the one without a result is left out
    # B, the slowest: sent at +5 ms while batch 1 ran until +10 ms, read at +22 ms
    assert s["p99_ms"] == pytest.approx(28.0, abs=0.01)
    assert s["slowest_1pct_ms"] == {
        "total": pytest.approx(28.0, abs=0.1),
        "batch_in_hand": pytest.approx(5.0, abs=0.1),
        "before_read_other": pytest.approx(12.0, abs=0.1),
        "in_worker": pytest.approx(8.0, abs=0.1),
        "after": pytest.approx(3.0, abs=0.1),
    }
    # A and C came to consumers with no batch before theirs: nothing in hand
    assert split({"A": sent["A"]}, arrived, lines)["slowest_1pct_ms"]["batch_in_hand"] == 0.0
    assert split({"C": sent["C"]}, arrived, lines)["slowest_1pct_ms"]["batch_in_hand"] == 0.0


def test_no_orders_no_split():
    assert split({}, {}, {}) == {"orders": 0}
