"""WAL and PostgreSQL CPU per event of the worker's database cycle: REV's schema against this checkout's.

  python -m bench.walcost [REV] [--rounds 4] [--batches 30] [--preload 200000] [--json PATH]

REV defaults to HEAD. Like bench.sqlcost: batches of 100 single-line order.placed on `uniform`
(10,000 stocked products) sent through apply_events(), REV's database (migrated by REV's own
code) and this one's taking turns, each measured on its own backend, so that other processes'
load hardly matters. Unlike sqlcost it runs the whole cycle the worker runs against PostgreSQL:

  mark    mark_published() of the previous batch's outbox ids (the worker folds it into the
          next batch's transaction; here its own statement in that transaction, so that it is
          told apart);
  apply   apply_events() of the batch, and the commit;
  relay   claim_unpublished() and its marks every --relay-every batches (each process's relay
          runs once a second: one call per ~15 batches at the 2-process rate);
  vacuum  a VACUUM of the hot tables after each round, standing for autovacuum (turned off on
          these tables, so that it runs at the same point on both sides): the deferred cost of
          dead row versions and index entries.

For each phase: the backend's CPU (from /proc/PID/schedstat, nanoseconds, read while it waits
for the next statement), and the WAL it wrote, read back with pg_walinspect: the records of its
transactions (by xid), and those without a transaction id (page pruning) touching its database,
split by resource manager and by relation (the first block a record references). WAL is given
with and without full-page images: how many of those a run writes depends on when checkpoints
fall (the cluster's, shared with everyone), so they are reported apart, with the number of
distinct pages each relation dirtied per 1,000 events, which is what bounds them (each page
costs one image per checkpoint cycle: random keys spread over an index dirty far more pages than
time-ordered ones).

--preload N gives both sides N old, published outbox rows and N idempotency keys first, so that
their indexes have a production-like size (their page counts decide the images). --current-sql
runs SQL (or a file of it) on this checkout's database before that, to try a variant (another
index, a fillfactor) without changing the schema. Linux only; needs superuser (pg_walinspect
reads the server's WAL files; a temporary replication slot keeps a round's WAL until it is read).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import tempfile
import time
import uuid
from bisect import bisect_right
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson
import psycopg2
import psycopg2.extras

from inventory_worker.adapters.migrations import migrate
from inventory_worker.config import Settings
from tests import reaper
from tests.support import drop_database

from . import cpu, load, run
from .exclusive import exclusive

BATCH = 100
HOT_TABLES = (
    "products",
    "orders",
    "order_lines",
    "processed_events",
    "outbox",
    "outbox_messages",
    "outbox_published",
    "stock_movements",
)
PHASES = ("mark", "apply", "relay", "vacuum")
BLOCK = re.compile(r"rel \d+/(\d+)/(\d+) fork (\w+) blk (\d+)")


def lsn(cur: Any) -> str:
    cur.execute("SELECT pg_current_wal_insert_lsn()")
    return str(cur.fetchone()[0])


def tables(cur: Any) -> list[str]:
    """The hot tables this schema has (the outbox is a view over two tables from migration 095)."""
    cur.execute(
        "SELECT relname FROM pg_class WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace"
        " AND relname = ANY(%s) ORDER BY relname",
        (list(HOT_TABLES),),
    )
    return [r[0] for r in cur.fetchall()]


def preload(cur: Any, n: int, ttl: int) -> None:
    """n published outbox rows a week old and n idempotency keys. The rows' body is a real
    reservation's (one order placed first), so that they fill pages as the measured ones do."""
    if n <= 0:
        return
    event = {
        "id": str(uuid.uuid4()),
        "type": "order.placed",
        "data": {"order_id": "o-preload", "lines": [{"product_id": load.uniform_ids()[0], "quantity": 1}]},
    }
    cur.execute("SELECT apply_events(%s::jsonb, %s)", (orjson.dumps([event]).decode(), ttl))
    cur.execute("SELECT body FROM outbox ORDER BY id DESC LIMIT 1")
    body = orjson.dumps(cur.fetchone()[0]).decode()
    if "outbox_published" in tables(cur):  # one publish record per 100 rows, as batches write them
        cur.execute(
            "WITH r AS (INSERT INTO outbox (message_id, routing_key, body, created_at)"
            "  SELECT gen_random_uuid(), 'inventory.reserved', %s::jsonb, now() - interval '7 days'"
            "    FROM generate_series(1, %s) RETURNING id)"
            " INSERT INTO outbox_published (ids, published_at)"
            " SELECT range_agg(int8range(id, id, '[]')), now() - interval '7 days' FROM r GROUP BY id / 100",
            (body, n),
        )
    else:
        cur.execute(
            "INSERT INTO outbox (message_id, routing_key, body, created_at, published_at)"
            " SELECT gen_random_uuid(), 'inventory.reserved', %s::jsonb, now() - interval '7 days',"
            "        now() - interval '7 days' FROM generate_series(1, %s)",
            (body, n),
        )
    cur.execute(
        "INSERT INTO processed_events (event_id, type, outcome, processed_at)"
        " SELECT gen_random_uuid(), 'order.placed', 'reserved', now() - interval '7 days'"
        "   FROM generate_series(1, %s)",
        (n,),
    )
    for t in tables(cur):
        cur.execute(f"VACUUM (ANALYZE) {t}")


class Side:
    """One database (REV's schema or this checkout's), its worker backend and its counts."""

    def __init__(self, name: str, settings: Settings) -> None:
        self.name = name
        self.settings = settings
        self.conn = psycopg2.connect(**settings.database.dsn())
        self.conn.autocommit = True
        psycopg2.extras.register_default_jsonb(self.conn, loads=orjson.loads)
        self.cur = self.conn.cursor()
        self.cur.execute("SELECT pg_backend_pid(), oid FROM pg_database WHERE datname = current_database()")
        self.pid, self.dboid = self.cur.fetchone()
        self.tables = tables(self.cur)
        for t in self.tables:  # VACUUM runs where the rounds say (see the module's doc)
            self.cur.execute(f"ALTER TABLE {t} SET (autovacuum_enabled = off)")
        self.marks: list[int] = []
        self.cpu_ns: dict[str, int] = defaultdict(int)
        self.events = 0
        self.rounds: list[dict[str, Any]] = []

    def relnames(self) -> dict[str, str]:
        self.cur.execute(
            "SELECT pg_relation_filenode(oid)::text, relname FROM pg_class WHERE pg_relation_filenode(oid) IS NOT NULL"
        )
        return dict(self.cur.fetchall())

    def _timed(self, phase: str, sql: str, args: Any = None) -> list[tuple[Any, ...]]:
        before = cpu.run_time_ns(self.pid)
        self.cur.execute(sql, args)
        rows = self.cur.fetchall() if self.cur.description else []
        self.cpu_ns[phase] += cpu.run_time_ns(self.pid) - before
        return rows

    def batch(
        self,
        rng: random.Random,
        products: list[str],
        ttl: int,
        windows: list[tuple[str, str]],
        xids: set[int],
    ) -> None:
        events = [
            {
                "id": str(uuid.uuid4()),
                "type": "order.placed",
                "data": {
                    "order_id": f"o-{uuid.uuid4().hex}",
                    "lines": [{"product_id": rng.choice(products), "quantity": 1}],
                },
            }
            for _ in range(BATCH)
        ]
        windows.append(("mark", lsn(self.cur)))
        self._timed("mark", "BEGIN")
        if self.marks:
            self._timed("mark", "SELECT mark_published(%s::bigint[])", (self.marks,))
        windows.append(("apply", lsn(self.cur)))
        [(results, xid)] = self._timed(
            "apply",
            "SELECT apply_events(%s::jsonb, %s), pg_current_xact_id()::text",
            (orjson.dumps(events).decode(), ttl),
        )
        self._timed("apply", "COMMIT")
        xids.add(int(xid) % 2**32)
        self.marks = [m["outbox_id"] for r in results for m in r["messages"]]
        self.events += BATCH

    def flush_marks(self, windows: list[tuple[str, str]], xids: set[int]) -> None:
        if self.marks:
            windows.append(("mark", lsn(self.cur)))
            self._timed("mark", "BEGIN")
            self._timed("mark", "SELECT mark_published(%s::bigint[])", (self.marks,))
            [(xid,)] = self._timed("mark", "SELECT pg_current_xact_id()::text")
            self._timed("mark", "COMMIT")
            xids.add(int(xid) % 2**32)
            self.marks = []

    def relay(self, windows: list[tuple[str, str]], xids: set[int]) -> None:
        """What a process's relay does once a second: claim rows left unpublished (none here),
        mark what it claimed (nothing)."""
        windows.append(("relay", lsn(self.cur)))
        self._timed("relay", "BEGIN")
        rows = self._timed("relay", "SELECT id FROM claim_unpublished(make_interval(secs => 5), 500)")
        if rows:
            self._timed("relay", "SELECT mark_published(%s::bigint[])", ([r[0] for r in rows],))
        [(xid,)] = self._timed("relay", "SELECT pg_current_xact_id_if_assigned()::text")
        self._timed("relay", "COMMIT")
        if xid is not None:
            xids.add(int(xid) % 2**32)

    def vacuum(self, windows: list[tuple[str, str]]) -> None:
        windows.append(("vacuum", lsn(self.cur)))
        for t in self.tables:
            self._timed("vacuum", f"VACUUM {t}")


def wal_of(
    obs: Any, side: Side, start: str, windows: list[tuple[str, str]], xids: set[int]
) -> dict[str, Any]:
    """The side's WAL records since `start`, summed by phase, resource manager and relation."""
    # VACUUM commits without flushing (it has no transaction id): wait for the WAL writer.
    obs.execute("SELECT pg_current_wal_insert_lsn()")
    end = obs.fetchone()[0]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        obs.execute("SELECT pg_current_wal_flush_lsn() >= %s", (end,))
        if obs.fetchone()[0]:
            break
        time.sleep(0.05)
    obs.execute(
        "SELECT start_lsn::text, xid::text::bigint, resource_manager || '/' || split_part(record_type, '+', 1),"
        "       record_length, fpi_length, block_ref"
        "  FROM pg_get_wal_records_info(%s, %s)"
        " WHERE xid::text::bigint = ANY(%s) OR (xid = '0' AND block_ref LIKE %s)",
        (start, end, list(xids), f"%/{side.dboid}/%"),
    )
    names = side.relnames()
    starts = [_lsn_int(w[1]) for w in windows]
    out: dict[str, Any] = {
        "phase": defaultdict(lambda: [0, 0, 0]),  # records, bytes, of which full-page images
        "rmgr": defaultdict(lambda: [0, 0, 0]),
        "relation": defaultdict(lambda: [0, 0, 0]),
        "relation_record": defaultdict(lambda: [0, 0, 0]),
        "pages": defaultdict(set),
    }
    for at, _xid, rtype, length, fpi, blocks in obs.fetchall():
        k = bisect_right(starts, _lsn_int(at)) - 1
        phase = windows[k][0] if k >= 0 else "other"
        refs = BLOCK.findall(blocks or "")
        rel = "-"
        if refs:
            db, node, fork, _ = refs[0]
            rel = names.get(node, f"filenode {node}") + ("" if fork == "main" else f" ({fork})")
        for db, node, fork, blk in refs:
            if int(db) == side.dboid and fork == "main" and phase != "vacuum":
                out["pages"][names.get(node, node)].add(int(blk))
        for key, sub in (
            ("phase", phase),
            ("rmgr", rtype),
            ("relation", rel),
            ("relation_record", f"{phase}: {rel} {rtype}"),
        ):
            v = out[key][sub]
            v[0] += 1
            v[1] += length
            v[2] += fpi
    out["pages"] = {k: len(v) for k, v in out["pages"].items()}
    return out


def _lsn_int(text: str) -> int:
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def per_event(v: list[int], events: int) -> tuple[float, float, float]:
    return (round(v[0] / events, 2), round(v[1] / events, 1), round(v[2] / events, 1))


def report(sides: dict[str, Side], rev: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, side in sides.items():
        ev = side.events
        agg: dict[str, dict[str, list[int]]] = {
            k: defaultdict(lambda: [0, 0, 0]) for k in ("phase", "rmgr", "relation", "relation_record")
        }
        pages: dict[str, list[int]] = defaultdict(list)
        for r in side.rounds:
            for key in agg:
                for sub, v in r["wal"][key].items():
                    for i in range(3):
                        agg[key][sub][i] += v[i]
            for rel, n in r["wal"]["pages"].items():
                pages[rel].append(n)
        total = [sum(v[i] for v in agg["phase"].values()) for i in range(3)]
        per_round_events = ev // max(1, len(side.rounds))
        out[name] = {
            "events": ev,
            "cpu_us": {p: round(side.cpu_ns[p] / ev / 1000, 1) for p in PHASES}
            | {"total": round(sum(side.cpu_ns.values()) / ev / 1000, 1)},
            "wal_total": per_event(total, ev),
            "wal_phase": {k: per_event(v, ev) for k, v in sorted(agg["phase"].items())},
            "wal_rmgr": {
                k: per_event(v, ev) for k, v in sorted(agg["rmgr"].items(), key=lambda kv: -kv[1][1])
            },
            "wal_relation": {
                k: per_event(v, ev) for k, v in sorted(agg["relation"].items(), key=lambda kv: -kv[1][1])
            },
            "wal_relation_record": {
                k: per_event(v, ev)
                for k, v in sorted(agg["relation_record"].items(), key=lambda kv: -kv[1][1])
            },
            "pages_per_1000_events": {
                k: round(sum(v) / len(v) * 1000 / per_round_events, 1)
                for k, v in sorted(pages.items(), key=lambda kv: -sum(kv[1]))
            },
            "per_round": [
                {
                    "cpu_us_apply_mark": r["cpu_us"],
                    "wal": per_event(
                        [sum(v[i] for v in r["wal"]["phase"].values()) for i in range(3)], r["events"]
                    ),
                }
                for r in side.rounds
            ],
        }
    print()
    print(
        f"Per order.placed (records, bytes, of which full-page images), this checkout ('current') and {rev}:"
    )
    cols = list(out)
    print(f"  {'':50}" + "".join(f"{c:>24}" for c in cols))

    def row(label: str, vals: list[Any]) -> None:
        print(f"  {label:50}" + "".join(f"{str(v):>24}" for v in vals))

    row("backend CPU us (all phases)", [out[c]["cpu_us"]["total"] for c in cols])
    for p in PHASES:
        row(f"  CPU us, {p}", [out[c]["cpu_us"][p] for c in cols])
    row("WAL total", [out[c]["wal_total"] for c in cols])
    for p in PHASES:
        row(f"  WAL, {p}", [out[c]["wal_phase"].get(p, (0, 0, 0)) for c in cols])
    for key, title, top in (
        ("wal_relation", "by relation", 40),
        ("wal_rmgr", "by record type", 40),
        ("wal_relation_record", "by phase, relation and record type", 45),
    ):
        print(f"  WAL {title}:")
        keys = sorted(
            {k for c in cols for k in out[c][key]},
            key=lambda k: -max(out[c][key].get(k, (0, 0, 0))[1] for c in cols),
        )
        for k in keys[:top]:
            row(f"    {k[:46]}", [out[c][key].get(k, "-") for c in cols])
    print("  distinct pages dirtied per 1,000 events (each costs a full-page image per checkpoint cycle):")
    keys = sorted(
        {k for c in cols for k in out[c]["pages_per_1000_events"]},
        key=lambda k: -max(out[c]["pages_per_1000_events"].get(k, 0) for c in cols),
    )
    for k in keys[:14]:
        row(f"    {k[:30]}", [out[c]["pages_per_1000_events"].get(k, "-") for c in cols])
    for c in cols:
        print(
            f"  rounds (CPU of mark + apply, WAL), {c}: "
            + "; ".join(f"cpu {r['cpu_us_apply_mark']} wal {r['wal']}" for r in out[c]["per_round"])
        )
    if set(cols) == {"current", "rev"}:
        ratios = sorted(
            a["cpu_us_apply_mark"] / b["cpu_us_apply_mark"]
            for a, b in zip(out["current"]["per_round"], out["rev"]["per_round"], strict=True)
        )
        out["cpu_ratio_mark_apply"] = round(ratios[len(ratios) // 2], 3)
        out["wal_ratio"] = [
            round(a / b, 3) if b else None
            for a, b in zip(out["current"]["wal_total"], out["rev"]["wal_total"], strict=True)
        ]
        print(
            f"  current / rev: backend CPU of mark + apply, median of the rounds' ratios"
            f" {out['cpu_ratio_mark_apply']}; WAL (records, bytes, full-page images) {out['wal_ratio']}"
        )
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("rev", nargs="?", default="HEAD")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--batches", type=int, default=30, help="batches of 100 orders per side and round")
    ap.add_argument(
        "--warmup", type=int, default=10, help="unmeasured batches per side first (plans, caches)"
    )
    ap.add_argument("--relay-every", type=int, default=15, help="batches between two relay calls")
    ap.add_argument("--preload", type=int, default=200_000, help="old published outbox rows and keys")
    ap.add_argument(
        "--current-sql", help="SQL run on this checkout's database after migrating (to try a variant)"
    )
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args(argv)
    base = run.bench_settings()
    settings = {"current": run.fresh_state(base, "walcur"), "rev": run.fresh_state(base, "walrev")}
    sides: dict[str, Side] = {}
    obs_conn = None
    try:
        with tempfile.TemporaryDirectory(prefix="inventory-walcost-") as tmp:
            sha = run.export_rev(args.rev, Path(tmp))
            run.migrate_with(settings["rev"], Path(tmp))
        migrate(settings["current"].database)
        for name, s in settings.items():
            run.seed_products(s, load.uniform_ids(), 1_000_000_000)
            side = sides[name] = Side(name, s)
            if name == "current" and args.current_sql:
                side.cur.execute(
                    Path(args.current_sql).read_text()
                    if Path(args.current_sql).exists()
                    else args.current_sql
                )
            preload(side.cur, args.preload, base.worker.default_reservation_ttl_seconds)
        obs_conn = psycopg2.connect(**settings["current"].database.dsn())
        obs_conn.autocommit = True
        obs = obs_conn.cursor()
        obs.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        # Keeps the WAL of a round until it is read (a checkpoint meanwhile would recycle it);
        # temporary: dropped with this session, however it ends. Advanced after each round.
        slot = f"walcost_{uuid.uuid4().hex[:12]}"
        obs.execute("SELECT pg_create_physical_replication_slot(%s, true, true)", (slot,))
        ttl = base.worker.default_reservation_ttl_seconds
        products = load.uniform_ids()
        for side in sides.values():
            for _ in range(args.warmup):
                side.batch(random.Random(-1), products, ttl, [], set())
            side.relay([], set())
            side.flush_marks([], set())
            side.vacuum([])
            side.cpu_ns.clear()
            side.events = 0
        for r in range(args.rounds):
            for name in ("rev", "current") if r % 2 == 0 else ("current", "rev"):
                side = sides[name]
                rng = random.Random(r)
                windows: list[tuple[str, str]] = []
                xids: set[int] = set()
                start = lsn(side.cur)
                cpu_before = dict(side.cpu_ns)
                events_before = side.events
                for b in range(args.batches):
                    side.batch(rng, products, ttl, windows, xids)
                    if (b + 1) % args.relay_every == 0:
                        side.relay(windows, xids)
                side.flush_marks(windows, xids)
                side.vacuum(windows)
                wal = wal_of(obs, side, start, windows, xids)
                obs.execute("SELECT pg_replication_slot_advance(%s, pg_current_wal_flush_lsn())", (slot,))
                n = side.events - events_before
                side.rounds.append(
                    {
                        "events": n,
                        "cpu_us": round(
                            sum(side.cpu_ns[p] - cpu_before.get(p, 0) for p in ("mark", "apply")) / n / 1000,
                            1,
                        ),
                        "wal": wal,
                    }
                )
                run.log(
                    f"round {r + 1}/{args.rounds} {name}: cpu(mark+apply) {side.rounds[-1]['cpu_us']} us,"
                    f" wal {per_event([sum(v[i] for v in wal['phase'].values()) for i in range(3)], n)}"
                )
        out = report(sides, f"{args.rev} = {sha[:12]}")
        out["rev"] = sha
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))
        return out
    finally:
        reaper.hold()
        if obs_conn is not None:
            obs_conn.close()
        for side in sides.values():
            side.conn.close()
        for s in settings.values():
            try:
                drop_database(s)
            except Exception as exc:
                run.log(f"dropping {s.database.dbname} failed: {exc}")


if __name__ == "__main__":
    reaper.install()
    with exclusive("bench.walcost"):
        main()
