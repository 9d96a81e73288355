"""Housekeeping: deletes what nothing needs any more, in short batches (sql/procedures/housekeeping.sql).

- published outbox rows older than `outbox_days`;
- idempotency keys (processed_events) older than `events_days`. Keep them longer than any
  message can be redelivered or replayed: a message whose key is gone applies again.
The ledger (stock_movements) is the audit trail and is never pruned here.
"""

from __future__ import annotations

from inventory_worker.config import Settings
from inventory_worker.adapters.postgres import Store, one_row

BATCH = 10_000


def prune(settings: Settings, outbox_days: float, events_days: float) -> dict[str, int]:
    """Deletes in transactions of at most BATCH rows per table; returns the totals deleted."""
    store = Store(settings.database)
    totals = {"outbox": 0, "processed_events": 0}
    try:
        while True:
            with store.transaction() as cur:
                cur.execute(
                    "SELECT prune_housekeeping(make_interval(secs => %s), make_interval(secs => %s), %s)",
                    (outbox_days * 86400, events_days * 86400, BATCH),
                )
                done = one_row(cur)[0]
            for k in totals:
                totals[k] += int(done[k])
            if max(int(done[k]) for k in totals) < BATCH:
                return totals
    finally:
        store.close()
