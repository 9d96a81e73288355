"""Where an order's time went at half load: before its consumer read it, in the worker, after.

The load generator knows when it sent each order and when the result arrived; the worker's own
log line per event ("event handled", written once the batch's results are sent) gives the
consumer process, the time of the line and `duration_ms`, from the event's read to the batch's
ack. From these, for each order:

  before the read       sent -> the line's time less duration_ms (the results' send, about a
                        millisecond, falls in this part), of which
    the batch in hand   sent -> the end of the same consumer's previous batch (its lines' time),
                        if that came later: the consumer reads its socket only between batches,
                        so an order that arrives during one waits for all of it unread;
  in the worker         duration_ms: the batch window, the apply, the cache write and the ack;
  after                 the line's time -> the result's arrival (the broker, the collector).

The worker's histograms cannot show the first part (they start at the read); the end-to-end
p99 can. `split()` gives the p50 and p99 of the whole and the mean of each part over the
slowest 1 % of the orders: what a p99 is made of.
"""

from __future__ import annotations

import bisect
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from . import load

PARTS = ("batch_in_hand", "before_read_other", "in_worker", "after")


def handled(log: Path, offset: int = 0) -> dict[str, tuple[int, float, float]]:
    """{event_id: (pid, the line's time, duration in s)} of the "event handled" lines written
    to the worker's log from byte `offset` on."""
    out: dict[str, tuple[int, float, float]] = {}
    with open(log, "rb") as f:
        f.seek(offset)
        for raw in f:
            if b'"event handled"' not in raw:
                continue
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError:  # a line cut by the worker's stop
                continue
            at = datetime.fromisoformat(line["timestamp"]).timestamp()
            out[line["event_id"]] = (int(line["pid"]), at, line["duration_ms"] / 1000)
    return out


def split(
    sent: dict[str, float], arrived: dict[str, float], lines: dict[str, tuple[int, float, float]]
) -> dict[str, Any]:
    """The orders with a time at each end and a log line: their p50 and p99 (ms), and the mean
    of each part over the slowest 1 % (ms)."""
    ends: dict[int, list[float]] = {}  # each consumer's batches, by the time of their lines
    for pid, at, _ in lines.values():
        ends.setdefault(pid, []).append(at)
    for pid in ends:
        ends[pid] = sorted(set(ends[pid]))
    rows = []
    for eid, s in sent.items():
        if eid not in arrived or eid not in lines:
            continue
        pid, at, duration = lines[eid]
        read = at - duration
        batches = ends[pid]
        k = bisect.bisect_left(batches, at) - 1  # the batch before this order's
        previous_end = batches[k] if k >= 0 else float("-inf")
        in_hand = max(0.0, min(previous_end, read) - s)
        rows.append(
            {
                "total": arrived[eid] - s,
                "batch_in_hand": in_hand,
                "before_read_other": read - s - in_hand,
                "in_worker": duration,
                "after": arrived[eid] - at,
            }
        )
    if not rows:
        return {"orders": 0}
    rows.sort(key=lambda r: r["total"])
    totals = [r["total"] * 1000 for r in rows]
    # The slowest 1 %: from the p99 on, the p99 as load.drive() reports it.
    tail = rows[bisect.bisect_left(totals, load.percentile(totals, 99)) :]
    return {
        "orders": len(rows),
        "p50_ms": round(load.percentile(totals, 50), 1),
        "p99_ms": round(load.percentile(totals, 99), 1),
        "slowest_1pct_ms": {
            k: round(sum(r[k] for r in tail) / len(tail) * 1000, 1) for k in ("total", *PARTS)
        },
    }
