"""`cache rebuild`: refills Redis with every product's figures from PostgreSQL.

PostgreSQL is the truth; Redis only a cache. Products are read in pages (keyset on the
primary key) and written through the cache's version-checked script, so a rebuild running
while the worker is busy never replaces newer figures with the older ones it read.
"""

from __future__ import annotations

from dataclasses import dataclass

from inventory_worker.adapters.postgres import Store
from inventory_worker.adapters.redis_cache import StockCache


@dataclass
class RebuildReport:
    products: int = 0
    written: int = 0  # keys set (missing or older); the rest were already as new or newer


def rebuild(store: Store, cache: StockCache, page_size: int = 1000) -> RebuildReport:
    report = RebuildReport()
    after = ""
    while True:
        page = store.figures_page(after, page_size)
        if not page:
            return report
        report.products += len(page)
        report.written += cache.put_many(page)
        after = page[-1]["product_id"]
