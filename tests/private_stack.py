"""A private database (and queues, exchanges, Redis prefix) for one test.

For tests that look at the whole database (verify, the expiry backlog, the one cluster-wide
sweeper): the run's shared database holds other tests' data and other workers' sweepers.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from inventory_worker.adapters.migrations import migrate
from inventory_worker.config import Settings

from .support import delete_redis_keys, delete_topology, drop_database, pg


@contextmanager
def private_settings(settings: Settings, tag: str) -> Iterator[Settings]:
    """The run's settings with every name suffixed by `tag` and a few random letters; migrated."""
    suffix = f"{tag}_{uuid.uuid4().hex[:6]}"
    rmq = settings.rabbitmq
    s = settings.model_copy(
        update={
            "database": settings.database.model_copy(
                update={"dbname": f"{settings.database.dbname}_{suffix}"}
            ),
            "redis": settings.redis.model_copy(
                update={"key_prefix": f"{settings.redis.key_prefix}{suffix}:"}
            ),
            "rabbitmq": rmq.model_copy(
                update={
                    name: f"{getattr(rmq, name)}.{suffix}"
                    for name in (
                        "exchange",
                        "queue",
                        "events_exchange",
                        "dead_letter_exchange",
                        "dead_letter_queue",
                    )
                }
            ),
        }
    )
    migrate(s.database)
    try:
        yield s
    finally:
        for cleanup in (delete_topology, delete_redis_keys, drop_database):
            try:
                cleanup(s)
            except Exception as exc:  # never hide the test's result behind a cleanup failure
                print(f"cleanup {cleanup.__name__} failed: {exc}")


def apply(cur: Any, type_: str, data: dict[str, Any], event_id: str | None = None) -> dict[str, Any]:
    """Applies one input event straight through the stored procedure; returns its result."""
    cur.execute(
        "SELECT apply_event(%s::uuid, %s, %s::jsonb, 900)",
        (event_id or str(uuid.uuid4()), type_, json.dumps(data)),
    )
    return cur.fetchone()[0]


def ledger_sums(settings: Settings, product_ids: list[str]) -> dict[str, tuple[int, int]]:
    with pg(settings) as cur:
        cur.execute(
            "SELECT product_id, sum(on_hand_delta)::bigint, sum(reserved_delta)::bigint"
            "  FROM stock_movements WHERE product_id = ANY(%s) GROUP BY product_id",
            (product_ids,),
        )
        return {r[0]: (r[1], r[2]) for r in cur.fetchall()}


def all_figures(settings: Settings, product_ids: list[str]) -> dict[str, tuple[int, int]]:
    with pg(settings) as cur:
        cur.execute(
            "SELECT product_id, on_hand, reserved FROM products WHERE product_id = ANY(%s)", (product_ids,)
        )
        return {r[0]: (r[1], r[2]) for r in cur.fetchall()}


def held_by_reservations(settings: Settings, product_ids: list[str]) -> dict[str, int]:
    with pg(settings) as cur:
        cur.execute(
            "SELECT ol.product_id, sum(ol.quantity)::bigint FROM order_lines ol JOIN orders o"
            " USING (order_id) WHERE o.status = 'reserved' AND ol.product_id = ANY(%s)"
            " GROUP BY 1",
            (product_ids,),
        )
        held = {r[0]: r[1] for r in cur.fetchall()}
    return {p: held.get(p, 0) for p in product_ids}
