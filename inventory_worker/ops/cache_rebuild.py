"""`cache rebuild`: refills Redis with every product's figures from PostgreSQL.

PostgreSQL is the truth; Redis only a cache. Products are read in pages (keyset on the
primary key) and written through the cache's version-checked script, so a rebuild running
while the worker is busy never replaces newer figures with the older ones it read.
"""

from __future__ import annotations

from dataclasses import dataclass

from inventory_worker.adapters.redis_cache import StockCache
from inventory_worker.config import Settings
from inventory_worker.adapters.postgres import Store


@dataclass
class RebuildReport:
    products: int = 0
    written: int = 0  # keys set (missing or older); the rest were already as new or newer


def rebuild(settings: Settings, page_size: int = 1000) -> RebuildReport:
    store = Store(settings.database)
    cache = StockCache(settings.redis)
    report = RebuildReport()
    after = ""
    try:
        while True:
            with store.transaction() as cur:
                cur.execute(
                    "SELECT product_id, product_figures(p) FROM products p"
                    "  WHERE product_id > %s ORDER BY product_id LIMIT %s",
                    (after, page_size),
                )
                rows = cur.fetchall()
            if not rows:
                return report
            report.products += len(rows)
            report.written += cache.put_many([r[1] for r in rows])
            after = rows[-1][0]
    finally:
        store.close()
        cache.client.close()
