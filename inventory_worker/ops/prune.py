"""Housekeeping: deletes what nothing needs any more, in short batches (sql/procedures/housekeeping.sql).

- published outbox rows older than `outbox_days`;
- idempotency keys (processed_events) older than `events_days`. Keep them longer than any
  message can be redelivered or replayed: a message whose key is gone applies again.
The ledger (stock_movements) is the audit trail and is never pruned here.
"""

from __future__ import annotations

from inventory_worker.adapters.postgres import Store

BATCH = 10_000


def prune(store: Store, outbox_days: float, events_days: float) -> dict[str, int]:
    """Deletes in transactions of at most BATCH rows per table; returns the totals deleted."""
    totals = {"outbox": 0, "processed_events": 0}
    while True:
        done = store.prune_batch(outbox_days * 86400, events_days * 86400, BATCH)
        for k in totals:
            totals[k] += done[k]
        if max(done.values()) < BATCH:
            return totals
