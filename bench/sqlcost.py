"""PostgreSQL's CPU per event on default-only orders: REV's stored procedures against this checkout's.

  python -m bench.sqlcost REV [--rounds 6] [--batches 30] [--batch 100] [--workloads uniform hot flash multi5]

`bench.run --compare REV` measures the whole pipeline's throughput and latency, which on a
shared machine swing with everyone else's load. This measures the part a schema change can
slow down, the stored procedures, as the CPU time of the one PostgreSQL backend running them
(read from /proc: other processes' load hardly changes it): batches of 100 order.placed sent
through apply_events() as the worker sends them (with the previous batch's
mark_published() in the same transaction), on `uniform` (10,000 stocked products), `hot`
(10 products with stock for half the orders: half rejected), `flash` (one product with
stock for a third of the orders: a flash sale, sold out in the first third of each round) and
`multi5` (5 lines of distinct products out of the 10,000), REV's database (migrated by REV's own code) and this one's taking turns.
`--batch 1` measures what a call costs whatever its size (executor start-up of each
statement, the CHECKs read again, the commit): at half load batches are small, and that fixed
cost is most of a batch's time. Both databases grow alike round by round, so the rounds are compared pairwise. Each round
after the first starts with ANALYZE of both, as autovacuum does now and then in production: without it the
backend kept the generic plan apply_events() cached while processed_events was small (a merge
join reading the table's whole index for every batch), and each round cost both sides more
than the last (110 us per order in round 1, 650 in round 8), which drowned the differences.
Linux only.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import uuid
from pathlib import Path
from typing import Any

import orjson
import psycopg2

from inventory_worker.adapters.migrations import migrate
from inventory_worker.config import Settings
from tests import reaper
from tests.support import drop_database

from . import cpu, load, run
from .exclusive import exclusive

BATCH = 100  # orders per apply_events() call, as the worker's full batches


WORKLOADS = ("uniform", "hot", "flash", "multi5")


def measure(
    settings: Settings,
    conn: Any,
    products: list[str],
    batches: int,
    seed: int,
    lines: int = 1,
    batch: int = BATCH,
) -> float:
    """Microseconds of the backend's CPU per order.placed, over `batches` committed batches of
    `batch` orders."""
    rng = random.Random(seed)
    cur = conn.cursor()
    cur.execute("SELECT pg_backend_pid()")
    pid = cur.fetchone()[0]
    before = cpu.run_time_ns(pid)
    marks: list[int] = []  # the previous batch's outbox ids, marked published as the worker does
    for _ in range(batches):
        events = [
            {
                "id": str(uuid.uuid4()),
                "type": "order.placed",
                "data": {
                    "order_id": f"o-{uuid.uuid4().hex}",
                    "lines": [{"product_id": p, "quantity": 1} for p in rng.sample(products, lines)],
                },
            }
            for _ in range(batch)
        ]
        # The worker's statement: the previous batch's marks and this batch in one transaction.
        cur.execute(
            ("SELECT mark_published(%s::bigint[]); " if marks else "") + "SELECT apply_events(%s::jsonb, %s)",
            ((marks,) if marks else ())
            + (orjson.dumps(events).decode(), settings.worker.default_reservation_ttl_seconds),
        )
        marks = [m["outbox_id"] for r in cur.fetchone()[0] for m in r["messages"]]
    return round((cpu.run_time_ns(pid) - before) / (batches * batch) / 1e3, 1)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("rev")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--batches", type=int, default=30, help="batches per workload and round")
    ap.add_argument("--batch", type=int, default=BATCH, help=f"orders per batch (default {BATCH})")
    ap.add_argument(
        "--no-analyze",
        action="store_true",
        help="no ANALYZE between rounds: plans made on young tables stay, as on a worker's first minute",
    )
    ap.add_argument("--workloads", nargs="*", choices=WORKLOADS, default=list(WORKLOADS))
    args = ap.parse_args(argv)
    base = run.bench_settings()
    sides = {"rev": run.fresh_state(base, "sqlrev"), "current": run.fresh_state(base, "sqlcur")}
    conns: dict[str, Any] = {}
    out: dict[str, Any] = {"rounds": {}, "databases": [s.database.dbname for s in sides.values()]}
    try:
        with tempfile.TemporaryDirectory(prefix="inventory-sqlcost-") as tmp:
            out["rev"] = run.export_rev(args.rev, Path(tmp))
            run.migrate_with(sides["rev"], Path(tmp))
        migrate(sides["current"].database)
        for side, s in sides.items():
            run.seed_products(s, load.uniform_ids(), 1_000_000_000)
            conns[side] = psycopg2.connect(**s.database.dsn())
            conns[side].autocommit = True
        for r in range(args.rounds):
            for c in conns.values() if r and not args.no_analyze else ():  # (of empty tables, plans for none)
                c.cursor().execute("ANALYZE")
            for name in args.workloads:
                for side in ("rev", "current") if r % 2 == 0 else ("current", "rev"):
                    products = load.uniform_ids()
                    if name == "hot":  # fresh hot products each round, stock for half the orders
                        products = [f"BENCH-H-sql{r}-{i}" for i in range(load.HOT_PRODUCTS)]
                        run.seed_products(
                            sides[side], products, max(1, args.batches * args.batch // (2 * len(products)))
                        )
                    if name == "flash":  # a fresh product each round, stock for a third of the orders
                        products = [f"BENCH-F-sql{r}"]
                        run.seed_products(sides[side], products, max(1, args.batches * args.batch // 3))
                    lines = 5 if name == "multi5" else 1
                    us = measure(
                        sides[side],
                        conns[side],
                        products,
                        args.batches,
                        seed=r,
                        lines=lines,
                        batch=args.batch,
                    )
                    out["rounds"].setdefault(name, {}).setdefault(side, []).append(us)
            run.log(f"round {r + 1}/{args.rounds}: {out['rounds']}")
        print()
        out["batch"] = args.batch
        print(
            f"PostgreSQL backend CPU per order.placed in batches of {args.batch}, us"
            f" (this checkout / {args.rev} = {out['rev'][:12]}):"
        )
        for name, v in out["rounds"].items():
            ratios = [c / p for c, p in zip(v["current"], v["rev"], strict=True)]
            out.setdefault("ratio", {})[name] = round(sorted(ratios)[len(ratios) // 2], 3)
            print(f"  {name:>8}: current {v['current']}  rev {v['rev']}  median ratio {out['ratio'][name]}")
        return out
    finally:
        reaper.hold()
        for c in conns.values():
            c.close()
        for s in sides.values():
            try:
                drop_database(s)
            except Exception as exc:
                run.log(f"dropping {s.database.dbname} failed: {exc}")


if __name__ == "__main__":
    reaper.install()
    with exclusive("bench.sqlcost"):
        main()
