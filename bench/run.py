"""The benchmark (`make bench`): baselines and the worker, side by side, in one run.

  python -m bench.run [--smoke] [--out bench/results.json]

1. Baselines: pgbench with one durable event-transaction (update one stock row + insert an
   idempotency key) at 1/4/16 clients (and 16 clients on 10 hot rows); a naive consumer (one
   transaction, one ack, one confirmed publish per message) on the same workloads (but
   locations3) with as many processes as the worker.
2. The worker end to end (`inventory-worker run`, N consumer processes): orders published ->
   committed -> Redis updated -> result event confirmed and received by a consumer. Uniform
   SKUs (10,000 products), hot SKUs (10 products, stock for half the orders), 5-line orders,
   locations3 (uniform orders sent on a channel over three locations, each product stocked
   at one of them), flash (every order for one product with stock for a third of them: sold
   out exactly, the rest rejected) and preorder (every order for one product with no stock and
   a backorder limit: all backordered up to the limit; then one stock.received, and the fills
   that follow it are timed and checked); at full load (flat out) and half load (open loop at
   half the full-load rate, for latency, per 0.5 s window too).
   With --compare REV, the worker part runs both REV's worker (its inventory_worker/, sql/ and
   config/, exported to a temporary folder) and this checkout's, taking turns per workload and process
   count, each on a fresh database, and prints this checkout's figures over REV's.
3. GET /inventory/{id} under wrk (32 connections): the API under granian (2 and 1 worker
   processes) and under the standard library's server, against the yardstick of the issue: a
   plain stdlib ThreadingHTTPServer answering from one Redis GET (bench/serve_http.py).
4. Peak RSS of the worker's processes.
5. PNG charts beside the results (bench/charts.py; `python -m bench.charts results.json` redraws
   them), when matplotlib (the `bench` extra) is installed.

Everything runs against the configured services (as the tests do) under names of its own
(database inventory_test_bench..., queues and exchanges suffixed, a Redis key prefix), all
removed at the end. Figures are reported with ratios to the baselines of the same run.
The logs (the worker's, the HTTP servers') are removed too, unless the run fails: then it says
where they are. Stopped by SIGTERM, SIGINT or SIGHUP, it stops every process it started and
removes its names all the same (tests/reaper.py).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pika

from inventory_worker.adapters.migrations import migrate
from inventory_worker.adapters.postgres import Store
from inventory_worker.adapters.rabbitmq import declare_topology
from inventory_worker.adapters.redis_cache import StockCache
from inventory_worker.config import Settings, load_settings
from tests import reaper
from tests.support import (
    REPO,
    TEST_TOKEN,
    WorkerProcess,
    config_of,
    delete_redis_keys,
    delete_topology,
    drop_database,
    free_port,
    isolated_settings,
    pg,
    redis_client,
    settings_env,
)

from . import cpu, load, machine, order_split, worker_metrics
from .exclusive import exclusive

# uniform: 10,000 products never running out; hot: 10 products, stock for half the orders;
# multi5: 5-line orders; locations3: orders on a channel over three locations; flash: every order
# for one product, stock for a third of them; preorder: every order for one product with no
# stock, backordered, then filled by one receipt.
WORKLOADS = ("uniform", "hot", "multi5", "locations3", "flash", "preorder")


@dataclass
class Plan:
    full_count: int  # orders per full-load run
    half_seconds: float  # length of a half-load run
    naive_count: int
    pgbench_seconds: int
    wrk_seconds: int
    procs: list[int]
    wrk_rounds: int = 1
    half_rounds: int = 1  # half-load runs per workload; the one with the median p99 is reported
    workloads: list[str] = field(default_factory=lambda: list(WORKLOADS))
    naive_procs: list[int] | None = None  # None: the worker's process counts (ratios at equal counts)
    pgbench_clients: list[int] = field(default_factory=lambda: [1, 4, 16])
    location_products: int = load.UNIFORM_PRODUCTS  # products of the locations3 workload (set up by messages)
    machine_seconds: float = 15.0  # the machine alone, probed for slowdowns first (bench/machine.py)
    idle_chunks: int = 150  # pieces of work per round of machine.idle_cost()
    half_rate: float | None = None  # orders/s of every half-load round; None: half the full-load rate


FULL = Plan(
    full_count=6_000,
    half_seconds=6,
    naive_count=1_500,
    pgbench_seconds=8,
    wrk_seconds=10,
    procs=[1, 2, 4],
    wrk_rounds=3,
    half_rounds=3,
)
SMOKE = Plan(
    full_count=400,
    half_seconds=1.0,
    naive_count=100,
    pgbench_seconds=1,
    wrk_seconds=2,
    procs=[2],
    workloads=["uniform", "hot", "locations3", "flash", "preorder"],
    pgbench_clients=[1, 16],
    location_products=1_000,
    machine_seconds=2.0,
    idle_chunks=20,
)

# Workloads set up by messages REV's worker may not know (--compare runs them on this checkout only).
NEW_MESSAGE_WORKLOADS = {"locations3", "preorder"}
LOCATION_WORKLOADS = {"locations3"}  # checked for where orders were held
# Left out of the naive consumer's runs: it is a baseline for orders on the default location.
NAIVE_SKIPPED = {"locations3"}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


# ---- set-up -----------------------------------------------------------------------------------


def bench_settings() -> Settings:
    os.chdir(REPO)
    s = isolated_settings(load_settings(), "bench" + uuid.uuid4().hex[:8])
    return s


def seed_products(settings: Settings, ids: list[str], on_hand: int) -> None:
    """Test data, written directly: products must exist before orders can reserve them."""
    with pg(settings) as cur:
        cur.execute(
            "INSERT INTO products (product_id, on_hand) SELECT unnest(%s::text[]), %s"
            " ON CONFLICT (product_id) DO UPDATE SET on_hand = EXCLUDED.on_hand, reserved = 0",
            (ids, on_hand),
        )


def workload(name: str, tag: str, location_products: int = load.UNIFORM_PRODUCTS) -> load.Workload:
    if name == "uniform":
        return load.Workload("uniform", load.uniform_ids())
    if name == "hot":
        return load.Workload("hot", load.hot_ids(tag))
    if name == "multi5":
        return load.Workload("multi5", load.uniform_ids(), lines=5)
    if name == "locations3":
        return load.Workload("locations3", load.location_ids(location_products), channel_id=CHANNEL)
    if name == "flash":
        return load.Workload("flash", load.single_id("F", tag))
    if name == "preorder":
        return load.Workload("preorder", load.single_id("P", tag))
    raise ValueError(name)


def flash_stock(orders: int) -> int:
    """flash: one product, stock for a third of the orders; the rest are rejected."""
    return max(1, orders // 3)


def preorder_limit(orders: int) -> int:
    """preorder: a backorder limit for all but the last 5 % of the orders (those are rejected:
    the limit holds under load), so every order placed is backordered and the limit is reached."""
    return orders - max(1, orders // 20)


# locations3: channel CHANNEL lists LOCATIONS (strategy priority: each line taken from the first
# of them with stock); product i is stocked at LOCATIONS[i % 3] only, so its orders skip the
# locations before it and a third of the orders lands at each. Set up through messages, as a
# publisher would: the configuration first, then the stock once the worker has applied it.
LOCATIONS = ["bench-A", "bench-B", "bench-C"]
CHANNEL = "bench-3"


def wait_for(
    settings: Settings, query: str, args: tuple[Any, ...], want: Any, what: str, timeout: float = 120
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with pg(settings) as cur:
            cur.execute(query, args)
            got = cur.fetchone()[0]
        if got == want:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: {got!r} after {timeout} s, expected {want!r}")
        time.sleep(0.2)


def configure_locations(settings: Settings, w: load.Workload) -> None:
    stocked = (
        "SELECT count(*) FROM stock_levels WHERE product_id = ANY(%s) AND location_id = ANY(%s)"
        " AND on_hand > 0"
    )
    with pg(settings) as cur:
        cur.execute(stocked, (w.products, LOCATIONS))
        if cur.fetchone()[0] == len(w.products):  # done for an earlier run on this database
            return
    started = time.monotonic()
    # Each step once the worker has applied the one before: consumers in parallel give no order
    # between messages (a channel naming a location not there yet is refused).
    load.publish(
        settings,
        [("location.configured", {"location_id": loc, "priority": i + 1}) for i, loc in enumerate(LOCATIONS)],
    )
    wait_for(
        settings,
        "SELECT count(*) FROM locations WHERE location_id = ANY(%s)",
        (LOCATIONS,),
        len(LOCATIONS),
        "locations configured",
    )
    load.publish(
        settings,
        [("channel.configured", {"channel_id": CHANNEL, "locations": LOCATIONS, "strategy": "priority"})],
    )
    wait_for(
        settings,
        "SELECT (SELECT locations FROM channels WHERE channel_id = %s)",
        (CHANNEL,),
        LOCATIONS,
        "channel configured",
    )
    items = [
        {"product_id": p, "location_id": LOCATIONS[i % len(LOCATIONS)], "on_hand": 1_000_000_000}
        for i, p in enumerate(w.products)
    ]
    load.publish(
        settings, [("stock.adjusted", {"items": items[k : k + 1000]}) for k in range(0, len(items), 1000)]
    )
    wait_for(
        settings, stocked, (w.products, LOCATIONS), len(w.products), "products stocked at their locations"
    )
    log(
        f"{len(LOCATIONS)} locations, channel {CHANNEL}, {len(w.products)} products stocked:"
        f" {time.monotonic() - started:.1f} s"
    )


def configure_preorder(settings: Settings, w: load.Workload, limit: int) -> None:
    """preorder: the product is created by product.configured, with no stock and backorder policy
    `allow` up to `limit` units (spec 2), as a publisher would; waits until it is applied."""
    [pid] = w.products
    load.publish(
        settings,
        [("product.configured", {"product_id": pid, "backorder": {"mode": "allow", "limit": limit}})],
    )
    wait_for(
        settings,
        "SELECT count(*) FROM products WHERE product_id = %s AND backorder_mode = 'allow'"
        " AND backorder_limit = %s AND on_hand = 0",
        (pid, limit),
        1,
        "preorder product configured",
    )


def prepare(settings: Settings, w: load.Workload, orders: int) -> None:
    """Hot products get stock for half the orders (a sell-out), the flash product for a third;
    the preorder product none (every order is backordered); the others never run out."""
    if w.name == "hot":
        seed_products(settings, w.products, max(1, orders // (2 * len(w.products))))
    if w.name == "flash":
        seed_products(settings, w.products, flash_stock(orders))
    if w.name == "preorder":
        configure_preorder(settings, w, preorder_limit(orders))
    if w.name == "locations3":
        configure_locations(settings, w)


def check_locations(settings: Settings, w: load.Workload) -> dict[str, Any]:
    """Where the orders of the workload's products were held (all its runs on this database so
    far), and that no level is oversold."""
    with pg(settings) as cur:
        cur.execute(
            "SELECT location_id, count(*) FROM order_allocations WHERE product_id = ANY(%s)"
            " GROUP BY 1 ORDER BY 1",
            (w.products,),
        )
        by_location = dict(cur.fetchall())
        cur.execute(
            "SELECT count(*) FROM stock_levels WHERE product_id = ANY(%s)"
            " AND reserved > on_hand - damaged - quality_control",
            (w.products,),
        )
        oversold = cur.fetchone()[0] > 0
    return {"allocations_by_location": by_location, "oversold": oversold}


def check_stocked(settings: Settings, w: load.Workload, r: load.RunResult) -> dict[str, Any]:
    """No oversell: reserved <= on_hand, and what is reserved is exactly what results announced;
    the Redis cache shows PostgreSQL's figures (hot and flash: a sell-out)."""
    with pg(settings) as cur:
        cur.execute(
            "SELECT product_id, on_hand, reserved, version FROM products WHERE product_id = ANY(%s)",
            (w.products,),
        )
        rows = cur.fetchall()
    client = redis_client(settings)
    cache_ok = True
    for pid, _on_hand, reserved, version in rows:
        raw = client.get(f"{settings.redis.key_prefix}stock:{pid}")
        cached = json.loads(raw) if raw else None
        if not cached or cached["version"] != version or cached["reserved"] != reserved:
            cache_ok = False
    reserved_total = sum(r_[2] for r_ in rows)
    return {
        "oversold": any(reserved > on_hand for _, on_hand, reserved, _ in rows),
        "reserved_matches_results": reserved_total == r.reserved_qty,
        "sold_out": all(on_hand == reserved for _, on_hand, reserved, _ in rows),
        "cache_matches_db": cache_ok,
    }


def answered(r: load.RunResult, orders: int) -> dict[str, Any]:
    """Every order published got a result, and only one (a second result with another event id
    would be a second decision)."""
    return {"answered": r.sent == orders and r.received == r.sent, "one_result_each": r.extra_results == 0}


def check_flash(settings: Settings, w: load.Workload, r: load.RunResult, orders: int) -> dict[str, Any]:
    """Sold out exactly: reserved = the stock, never above it, the rest rejected, one result each."""
    out = {**check_stocked(settings, w, r), **answered(r, orders), "stock": flash_stock(orders)}
    out["rest_rejected"] = r.rejected == r.received - flash_stock(orders)
    return out


def product_row(settings: Settings, pid: str) -> dict[str, Any]:
    with pg(settings) as cur:
        cur.execute(
            "SELECT on_hand, reserved, backordered, version,"
            " (SELECT coalesce(sum(backordered), 0) FROM order_lines WHERE product_id = p.product_id)"
            " FROM products p WHERE product_id = %s",
            (pid,),
        )
        on_hand, reserved, backordered, version, lines_backordered = cur.fetchone()
    return {
        "on_hand": on_hand,
        "reserved": reserved,
        "backordered": backordered,
        "version": version,
        "lines_backordered": int(lines_backordered),
    }


def check_preorder_placed(
    settings: Settings, w: load.Workload, r: load.RunResult, orders: int
) -> dict[str, Any]:
    """Every order placed is backordered (the product has no stock), up to the limit and not one
    unit beyond it: the orders past it are rejected; one result each."""
    [pid] = w.products
    limit = preorder_limit(orders)
    p = product_row(settings, pid)
    return {
        **answered(r, orders),
        "limit": limit,
        "placed": p,
        "all_backordered": p["backordered"] == p["lines_backordered"] == r.reserved_qty
        and p["reserved"] == 0,
        "limit_reached": p["backordered"] == limit and r.rejected == r.received - limit,
        "oversold": p["backordered"] > limit or p["reserved"] > p["on_hand"],
    }


def backordered_orders(settings: Settings, pid: str) -> dict[str, int]:
    """{order id: units backordered} of the product's open orders, FIFO (created_at, order_id)."""
    with pg(settings) as cur:
        cur.execute(
            "SELECT ol.order_id, ol.backordered FROM order_lines ol JOIN orders o USING (order_id)"
            " WHERE ol.product_id = %s AND ol.backordered > 0 AND o.status = 'reserved'"
            " ORDER BY o.created_at, o.order_id",
            (pid,),
        )
        return dict(cur.fetchall())


def fill_preorder(settings: Settings, w: load.Workload, r: load.RunResult, orders: int) -> dict[str, Any]:
    """The stock for every backordered unit arrives in one stock.received: the receipt's
    transaction fills the first worker.backorder_fill_batch orders, the elected sweeper's fill
    pass the rest. Checks every order was filled exactly once, oldest first (the ledger's fill
    rows in FIFO order), nothing beyond the stock, and the figures at the end: backordered 0,
    reserved = the orders' units, the cache as PostgreSQL."""
    [pid] = w.products
    waiting = backordered_orders(settings, pid)
    units = sum(waiting.values())
    res = load.receive_and_fill(settings, pid, units, expect_units=units, idle_timeout=30)
    fills = res.pop("fills")  # per event; too many to keep in the results
    per_order: dict[str, list[int]] = {}
    for _t, order_id, n, _cause, _id in fills:
        per_order.setdefault(order_id, []).append(n)
    with pg(settings) as cur:
        cur.execute(
            "SELECT order_id FROM stock_movements WHERE product_id = %s AND reason = 'backorder_fill'"
            " AND reserved_delta > 0 ORDER BY id",
            (pid,),
        )
        ledger = [row[0] for row in cur.fetchall()]
    after = product_row(settings, pid)
    cached = redis_client(settings).get(f"{settings.redis.key_prefix}stock:{pid}")
    cache = json.loads(cached) if cached else {}
    res.update(
        {
            "orders": len(waiting),
            "units": units,
            "after": after,
            "filled_once": per_order == {o: [n] for o, n in waiting.items()},
            "unexpected_fills": sorted(set(per_order) - set(waiting))[:5],
            "fifo": ledger == list(waiting),
            "within_stock": res["units_filled"] <= units and after["reserved"] <= after["on_hand"],
            "figures_ok": after["backordered"] == after["lines_backordered"] == 0
            and after["reserved"] == r.reserved_qty == units
            and after["on_hand"] == units,
            "cache_matches_db": cache.get("version") == after["version"]
            and cache.get("reserved") == after["reserved"],
        }
    )
    return res


def check_run(settings: Settings, w: load.Workload, r: load.RunResult, orders: int) -> dict[str, Any]:
    """What must hold after a run of `orders` orders of workload `w`, whatever the speed."""
    if w.name == "hot":
        return check_stocked(settings, w, r)
    if w.name == "flash":
        return check_flash(settings, w, r, orders)
    if w.name == "preorder":
        return check_preorder_placed(settings, w, r, orders)
    if w.name in LOCATION_WORKLOADS:
        return check_locations(settings, w)
    return {}


# ---- 1. baselines -------------------------------------------------------------------------------

PGBENCH_SCRIPT = """\\set id random(1, {rows})
BEGIN;
UPDATE bench_stock SET reserved = reserved + 1, version = version + 1 WHERE id = :id;
INSERT INTO bench_processed (event_id) VALUES (gen_random_uuid());
COMMIT;
"""


def pgbench(settings: Settings, plan: Plan) -> dict[str, Any]:
    with pg(settings) as cur:
        cur.execute(
            "CREATE TABLE IF NOT EXISTS bench_stock (id int PRIMARY KEY, reserved bigint NOT NULL,"
            " version bigint NOT NULL)"
        )
        cur.execute(
            "INSERT INTO bench_stock SELECT g, 0, 0 FROM generate_series(1, 10000) g ON CONFLICT DO NOTHING"
        )
        cur.execute(
            "CREATE TABLE IF NOT EXISTS bench_processed (event_id uuid PRIMARY KEY,"
            " processed_at timestamptz NOT NULL DEFAULT now())"
        )
        cur.execute("SHOW fsync")
        fsync = cur.fetchone()[0]
        cur.execute("SHOW synchronous_commit")
        sync = cur.fetchone()[0]
    db = settings.database
    out: dict[str, Any] = {"fsync": fsync, "synchronous_commit": sync, "tps": {}, "cpu_us_per_txn": {}}
    runs = [(c, 10_000) for c in plan.pgbench_clients] + [(16, 10)]
    with tempfile.TemporaryDirectory() as tmp:
        for clients, rows in runs:
            script = Path(tmp) / f"event_{rows}.sql"
            script.write_text(PGBENCH_SCRIPT.format(rows=rows))
            cmd = [
                "pgbench",
                "-n",
                "-h",
                db.host,
                "-p",
                str(db.port),
                "-U",
                db.user,
                "-f",
                str(script),
                "-c",
                str(clients),
                "-j",
                str(min(clients, 2)),
                "-T",
                str(plan.pgbench_seconds),
                db.dbname,
            ]
            env = dict(os.environ, PGPASSWORD=db.password) if db.password else None
            busy = cpu.machine_busy()
            res = subprocess.run(
                cmd, capture_output=True, text=True, env=env, timeout=plan.pgbench_seconds + 60
            )
            m = re.search(r"tps = ([\d.]+)", res.stdout)
            if not m:
                raise RuntimeError(f"pgbench failed: {res.stdout[-500:]} {res.stderr[-500:]}")
            key = f"c{clients}" if rows == 10_000 else f"c{clients}_hot10"
            out["tps"][key] = round(float(m.group(1)), 1)
            done = re.search(r"transactions actually processed: (\d+)", res.stdout)
            if done:  # the whole machine's CPU (pgbench's own included) per transaction
                out["cpu_us_per_txn"][key] = cpu.machine_per_unit(busy, int(done.group(1)))
            log(
                f"pgbench {key}: {out['tps'][key]} tps, {out['cpu_us_per_txn'].get(key)} us CPU per transaction"
            )
    return out


def consumers_attached(settings: Settings, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn = pika.BlockingConnection(pika.URLParameters(str(settings.rabbitmq.url)))
        try:
            if conn.channel().queue_declare(settings.rabbitmq.queue, passive=True).method.consumer_count >= n:
                return
        finally:
            conn.close()
        time.sleep(0.2)
    raise RuntimeError(f"{n} consumers did not attach")


def naive(settings: Settings, plan: Plan, name: str, procs: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    workers = [
        ctx.Process(target=load.naive_consumer, args=(settings, stop), daemon=True) for _ in range(procs)
    ]
    for p in workers:
        p.start()
    try:
        consumers_attached(settings, procs)
        w = workload(name, f"naive{procs}")
        prepare(settings, w, plan.naive_count)
        r = load.drive(settings, w, plan.naive_count)
        out = {"procs": procs, "workload": name, **r.as_dict(), **check_run(settings, w, r, plan.naive_count)}
        log(f"naive {name} x{procs}: {r.throughput:.0f} events/s")
        return out
    finally:
        stop.set()
        for p in workers:
            p.join(15)
            if p.is_alive():
                p.kill()


# ---- 2. the worker ------------------------------------------------------------------------------


def proc_tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            kids = []
        todo.extend(int(k) for k in kids)
    return out


def rss_kib(pid: int, field_name: str = "VmHWM") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def prepare_database(settings: Settings) -> None:
    """Migrated, with the uniform products stocked so that they never run out."""
    migrate(settings.database)
    seed_products(settings, load.uniform_ids(), 1_000_000_000)


def fresh_state(settings: Settings, tag: str) -> Settings:
    """A database and a cache key prefix of their own (prepare_database makes them as at the start)."""
    return settings.model_copy(
        update={
            "database": settings.database.model_copy(update={"dbname": f"{settings.database.dbname}_{tag}"}),
            "redis": settings.redis.model_copy(update={"key_prefix": f"{settings.redis.key_prefix}{tag}:"}),
        }
    )


def migrate_with(settings: Settings, code: Path) -> None:
    """Migrates with another version's sql/ and migration code (its `inventory-worker migrate`)."""
    env = {
        **settings_env(settings, only_changed=True),
        "PYTHONPATH": str(code),
        "INVENTORY_CONFIG": str(config_of(code)),
    }
    res = subprocess.run(
        [sys.executable, "-m", "inventory_worker", "migrate"],
        cwd=code,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if res.returncode != 0:
        raise RuntimeError(f"migrate from {code} failed: {res.stdout[-500:]} {res.stderr[-1000:]}")


def worker_runs(
    settings: Settings,
    plan: Plan,
    procs: int,
    logs: Path,
    workloads: list[str] | None = None,
    code: Path | None = None,
    tag: str | None = None,
) -> dict[str, Any]:
    """The worker with `procs` consumer processes through `workloads` (the plan's by default),
    this checkout's or, with `code`, the version exported there (its own migrations)."""
    # Each process count starts from the same state, a fresh database: run after run in one,
    # the later ones paid for the tables and indexes the earlier ones had grown (PostgreSQL's
    # CPU per event rose from 155 us with 1 process to 240 with 4 in one such run).
    tag = tag or f"p{procs}"
    settings = fresh_state(settings, tag)
    wp = WorkerProcess(settings, processes=procs, log_path=logs / f"worker-{tag}.log", code=code)
    out: dict[str, Any] = {"procs": procs, "runs": {}}
    try:  # from here on, the finally stops the worker and drops the database, even if interrupted
        if code is None:
            prepare_database(settings)
        else:
            migrate_with(settings, code)
            seed_products(settings, load.uniform_ids(), 1_000_000_000)
        with pg(settings) as cur:  # which version's schema, which version's worker: on record
            cur.execute("SELECT max(version) FROM schema_migrations")
            out["last_migration"] = cur.fetchone()[0]
        wp.start(timeout=90)
        try:
            out["worker_cwd"] = os.readlink(f"/proc/{wp.proc.pid}/cwd")
        except OSError:  # no /proc
            out["worker_cwd"] = None
        log(
            f"worker x{procs} started (pid {wp.proc.pid}, in {out['worker_cwd']},"
            f" last migration {out['last_migration']})"
        )
        for name in workloads or plan.workloads:
            w = workload(name, f"w{procs}full", plan.location_products)
            prepare(settings, w, plan.full_count)
            seen = worker_metrics.snapshot(wp.metrics_dir)
            full = load.drive(settings, w, plan.full_count, worker_pids=set(proc_tree(wp.proc.pid)))
            entry: dict[str, Any] = {
                "full": {**full.as_dict(), **check_run(settings, w, full, plan.full_count)}
            }
            entry["full"]["inside"] = worker_metrics.inside(seen, worker_metrics.settled(wp.metrics_dir))
            if name == "preorder":
                entry["fill"] = fill_preorder(settings, w, full, plan.full_count)
                f = entry["fill"]
                log(
                    f"worker x{procs} preorder: {f['fill_events']} fills of {f['orders']} orders in"
                    f" {f['last_fill_s']} s ({f['fills_per_s']}/s, {f['filled_by_receipt']} by the"
                    f" receipt's transaction); once each {f['filled_once']}, FIFO {f['fifo']},"
                    f" figures {f['figures_ok']}"
                )
            if plan.half_rate:  # one rate for every side of a --compare: a latency change alone
                rate = plan.half_rate
            else:
                rate = 0.5 * full.throughput if math.isfinite(full.throughput) else 100.0
            count = max(50, int(rate * plan.half_seconds))
            rounds = []
            for k in range(plan.half_rounds):  # each on fresh products: every sell-out checked on its own
                w = workload(name, f"w{procs}half{k}", plan.location_products)
                prepare(settings, w, count)
                seen = worker_metrics.snapshot(wp.metrics_dir)
                log_offset = wp.log_path.stat().st_size if wp.log_path else 0
                half = load.drive(
                    settings,
                    w,
                    count,
                    rate=rate,
                    seed=2 + k,
                    probe=True,
                    worker_pids=set(proc_tree(wp.proc.pid)),
                )
                inside = worker_metrics.inside(seen, worker_metrics.settled(wp.metrics_dir))
                lines = order_split.handled(wp.log_path, log_offset) if wp.log_path else {}
                rounds.append(
                    {
                        "rate": round(rate, 1),
                        **half.as_dict(),
                        **check_run(settings, w, half, count),
                        "inside": inside,
                        "split": order_split.split(half.sent_at, half.arrived_at, lines),
                    }
                )
            # The median round by p99 is the figure (a shared machine's stray stall aside); every
            # round is kept, and counted for lost results and oversell.
            entry["half"] = sorted(rounds, key=lambda r: r["p99_ms"])[len(rounds) // 2]
            entry["half_rounds"] = rounds
            out["runs"][name] = entry
            log(
                f"worker x{procs} {name}: full {full.throughput:.0f}/s p99 {full.p99_ms:.0f} ms;"
                f" half ({rate:.0f}/s) p50 {entry['half']['p50_ms']:.1f} p99 {entry['half']['p99_ms']:.1f} ms"
                f" (p99 of each round: {[r['p99_ms'] for r in rounds]})"
            )
        pids = proc_tree(wp.proc.pid)
        out["peak_rss_mib"] = {
            "max_process": round(max(rss_kib(p) for p in pids) / 1024, 1),
            "processes": len(pids),
            "sum": round(sum(rss_kib(p) for p in pids) / 1024, 1),
        }
    finally:
        wp.stop()
        if not os.environ.get("INVENTORY_TEST_KEEP"):
            drop_database(settings)
            delete_redis_keys(settings)
    return out


def export_rev(rev: str, dest: Path) -> str:
    """REV's inventory_worker/, sql/ and config/ into dest (git archive); returns REV's commit."""
    sha = subprocess.run(
        ["git", "rev-parse", "--verify", f"{rev}^{{commit}}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    paths = ["inventory_worker", "sql"]
    has_config = subprocess.run(
        ["git", "cat-file", "-e", f"{sha}:config/config.yaml"], cwd=REPO, capture_output=True
    )
    if has_config.returncode == 0:  # its own: this checkout's may hold keys REV refuses
        paths.append("config")
    archive = subprocess.run(
        ["git", "archive", "--format=tar", sha, *paths],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return sha


def compare_runs(
    settings: Settings, plan: Plan, logs: Path, code: Path
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """For each process count and workload, REV's worker (from `code`) and this checkout's, one
    after the other, each with a fresh database, the one going first alternating, so that the
    shared machine's slow spells hit both. Workloads set up by new messages (locations3,
    preorder) run on this checkout only.
    Returns this checkout's runs (as worker_runs() per process count) and the pairs."""
    worker: list[dict[str, Any]] = []
    pairs: list[dict[str, Any]] = []
    for procs in plan.procs:
        current: dict[str, Any] = {"procs": procs, "runs": {}}
        for name in plan.workloads:
            if name in NEW_MESSAGE_WORKLOADS:
                r = worker_runs(settings, plan, procs, logs, [name], tag=f"p{procs}{name}")
                current["runs"].update(r["runs"])
                continue
            order = ("rev", "current") if len(pairs) % 2 == 0 else ("current", "rev")
            got = {
                side: worker_runs(
                    settings,
                    plan,
                    procs,
                    logs,
                    [name],
                    code=code if side == "rev" else None,
                    tag=f"p{procs}{name[:4]}{side[0]}",
                )
                for side in order
            }
            current["runs"].update(got["current"]["runs"])
            current["peak_rss_mib"] = got["current"].get("peak_rss_mib")
            pairs.append(
                {
                    "procs": procs,
                    "workload": name,
                    "first": order[0],
                    "sides": {
                        k: {"last_migration": v.get("last_migration"), "worker_cwd": v.get("worker_cwd")}
                        for k, v in got.items()
                    },
                    "rev": got["rev"]["runs"][name],
                    "current": got["current"]["runs"][name],
                }
            )
            c, r_ = pairs[-1]["current"], pairs[-1]["rev"]
            hc, hr = half_cpu(c).get("pipeline", float("nan")), half_cpu(r_).get("pipeline", float("nan"))
            log(
                f"compare x{procs} {name}: events/s {c['full']['throughput']:.0f} / {r_['full']['throughput']:.0f}"
                f" = {ratio(c['full']['throughput'], r_['full']['throughput'])}; half p99"
                f" {c['half']['p99_ms']:.0f} / {r_['half']['p99_ms']:.0f} ms; half CPU per event"
                f" {hc:.0f} / {hr:.0f} us = {ratio(hc, hr)}"
            )
        worker.append(current)
    return worker, pairs


# ---- 3. the read endpoint -----------------------------------------------------------------------

WRK_SCRIPT = """math.randomseed(os.time())
request = function()
  return wrk.format("GET", string.format("/inventory/BENCH-U-%05d", math.random(0, 999)),
                    {["Authorization"] = "Bearer TOKEN"})
end
"""


def _ms(value: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", value)
    if not m:
        return float("nan")
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]


def wrk(url: str, seconds: int, script: Path) -> dict[str, Any]:
    res = subprocess.run(
        ["wrk", "-t2", "-c32", f"-d{seconds}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    text = res.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    lat = dict(re.findall(r"^\s+(50|90|99)%\s+(\S+)", text, re.M))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    errors = re.search(r"Socket errors: (.*)", text)
    return {
        "rps": round(float(rps.group(1)), 1) if rps else float("nan"),
        "p50_ms": _ms(lat.get("50", "")),
        "p99_ms": _ms(lat.get("99", "")),
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": errors.group(1) if errors else "",
    }


# Servers of the read-endpoint run, the yardstick first: `baseline` is a plain stdlib
# ThreadingHTTPServer doing one Redis GET per request (bench/serve_http.py), the others serve the
# whole API (auth, rate limit with a high limit, bounds, metrics). Each is measured `rounds` times,
# the servers taking turns, and the median round (by req/s) is reported: on 2 shared cores one
# round can be off by a lot.
HTTP_SERVERS = ("baseline", "stdlib", "granian", "granian:1")


def _serve_and_wrk(
    settings: Settings, kind: str, seconds: int, script: Path, logs: Path, metrics_dir: Path
) -> dict[str, Any]:
    port = free_port()
    s = settings.model_copy(update={"http": settings.http.model_copy(update={"port": port})})
    # As under the supervisor: metrics written to files shared by the processes (multiprocess mode).
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir()
    env = {**settings_env(s), "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    with open(logs / f"http-{kind}.log", "ab") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.serve_http", kind],
            env=env,
            cwd=REPO,
            stdout=logf,
            stderr=logf,
            start_new_session=True,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while True:
                try:
                    urllib.request.urlopen(url + "/healthz", timeout=1).read()
                    break
                except Exception:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError(f"http server {kind} did not start") from None
                    time.sleep(0.2)
            return wrk(url, seconds, script)
        finally:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()


def http_bench(
    settings: Settings,
    plan: Plan,
    logs: Path,
    servers: tuple[str, ...] = HTTP_SERVERS,
    rounds: int | None = None,
) -> dict[str, Any]:
    if not shutil.which("wrk"):
        log("wrk not found (apt-get install wrk): read endpoint skipped")
        return {"skipped": "wrk not installed"}
    rounds = rounds or plan.wrk_rounds
    ids = load.uniform_ids()[:1000]
    store = Store(settings.database)
    StockCache(settings.redis).put_many(store.figures(ids))
    store.close()
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in servers}
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "ids.lua"
        script.write_text(WRK_SCRIPT.replace("TOKEN", TEST_TOKEN))
        for i in range(rounds):
            for kind in servers:
                r = _serve_and_wrk(settings, kind, plan.wrk_seconds, script, logs, Path(tmp) / "metrics")
                r["load_avg"] = load_avg()
                runs[kind].append(r)
                log(
                    f"http {kind} (round {i + 1}/{rounds}): {r['rps']:.0f} req/s, p50 {r['p50_ms']} ms,"
                    f" p99 {r['p99_ms']} ms, non-2xx {r['non_2xx']}"
                )
    out: dict[str, Any] = {}
    for kind, rs in runs.items():
        med = sorted(rs, key=lambda r: r["rps"])[(len(rs) - 1) // 2]
        out[kind] = {**med, "rounds": [{k: r[k] for k in ("rps", "p50_ms", "p99_ms")} for r in rs]}
    return out


# ---- report -------------------------------------------------------------------------------------


def ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b and math.isfinite(a) and math.isfinite(b) else float("nan")


PIPELINE = ("postgres", "rabbitmq", "worker", "redis")  # issue #16's CPU per event: the load generator apart


def half_cpu(entry: dict[str, Any]) -> dict[str, float]:
    """CPU per event at half load by component, each the median of the rounds, and `pipeline`
    (PostgreSQL, RabbitMQ, the worker and Redis): what the machine spends per event at a
    load it keeps up with, where a batch is a few events rather than a hundred."""
    rounds = [r["cpu_us_per_event"] for r in entry.get("half_rounds", []) if r.get("cpu_us_per_event")]
    if not rounds:
        return {}
    out = {k: statistics.median(c.get(k, 0.0) for c in rounds) for k in rounds[0]}
    out["pipeline"] = round(statistics.median(sum(c.get(k, 0.0) for k in PIPELINE) for c in rounds), 1)
    return out


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    pgb = res["pgbench"]["tps"]
    limit16 = pgb.get("c16", float("nan"))
    naive = {(n["workload"], n["procs"]): n["throughput"] for n in res["naive"]}
    rows = []
    for wr in res["worker"]:
        for name, e in wr["runs"].items():
            # The naive consumer with as many processes; else its nearest process count.
            near = sorted((abs(n - wr["procs"]), n) for w, n in naive if w == name)
            naive_procs = near[0][1] if near else None
            base_naive = naive.get((name, naive_procs)) if naive_procs else None
            runs = [e["full"], *e.get("half_rounds", [e["half"]])]
            rows.append(
                {
                    "workload": name,
                    "procs": wr["procs"],
                    "events_per_s": e["full"]["throughput"],
                    "vs_pg_limit_c16": ratio(e["full"]["throughput"], limit16),
                    "vs_naive": ratio(e["full"]["throughput"], base_naive) if base_naive else float("nan"),
                    "naive_procs": naive_procs,
                    "half_rate": e["half"]["rate"],
                    "half_p50_ms": e["half"]["p50_ms"],
                    "half_p95_ms": e["half"]["p95_ms"],
                    "half_p99_ms": e["half"]["p99_ms"],
                    "full_p99_ms": e["full"]["p99_ms"],
                    "half_p99_rounds_ms": [r["p99_ms"] for r in e.get("half_rounds", [e["half"]])],
                    "lost": sum(r["sent"] - r["received"] for r in runs),
                    "extra_results": sum(r.get("extra_results", 0) for r in runs),
                    "oversold": any(r.get("oversold", False) for r in runs),
                    "cpu_us_per_event": e["full"].get("cpu_us_per_event", {}),
                    "half_cpu_us_per_event": half_cpu(e),
                    "half_inside": e["half"].get("inside", {}),
                    "half_split": e["half"].get("split", {}),
                    "half_p99_clear_ms": e["half"].get("p99_clear_ms", float("nan")),
                    "half_p99_clear_rounds_ms": [
                        r.get("p99_clear_ms", float("nan")) for r in e.get("half_rounds", [e["half"]])
                    ],
                    "half_in_slowdown": round(
                        e["half"].get("in_slowdown", 0) / max(1, e["half"]["received"]), 3
                    ),
                    "half_slowdowns": e["half"].get("slowdowns", {}),
                }
            )
    # Each workload's throughput over the uniform one's, same process count, same run.
    by = {(r["workload"], r["procs"]): r["events_per_s"] for r in rows}
    for r in rows:
        r["vs_uniform"] = ratio(r["events_per_s"], by.get(("uniform", r["procs"]), float("nan")))
    vs_uniform = {
        name: {
            str(n): ratio(v, by[("uniform", n)])
            for (w, n), v in by.items()
            if w == name and ("uniform", n) in by
        }
        for name in dict.fromkeys(r["workload"] for r in rows)
        if name != "uniform"
    }
    flash = []
    for wr in res["worker"]:
        if not (e := wr["runs"].get("flash")):
            continue
        runs = [e["full"], *e.get("half_rounds", [e["half"]])]  # every one checked
        flash.append(
            {
                "procs": wr["procs"],
                "events_per_s": e["full"]["throughput"],
                "vs_uniform": vs_uniform.get("flash", {}).get(str(wr["procs"])),
                "stock": [r["stock"] for r in runs],
                "reserved": [r["reserved_qty"] for r in runs],
                "sold_out_exactly": all(r["sold_out"] and r["reserved_matches_results"] for r in runs),
                "rest_rejected": all(r["rest_rejected"] for r in runs),
                "answered_once": all(r["answered"] and r["one_result_each"] for r in runs),
                "oversold": any(r["oversold"] for r in runs),
                "cache_matches_db": all(r["cache_matches_db"] for r in runs),
            }
        )
    preorder = [
        {
            "procs": wr["procs"],
            "placement_events_per_s": e["full"]["throughput"],
            "orders": f["orders"],
            "fills": f["fill_events"],
            "fills_per_s": f["fills_per_s"],
            "last_fill_s": f["last_fill_s"],
            "filled_by_receipt": f["filled_by_receipt"],
            "filled_once": f["filled_once"],
            "fifo": f["fifo"],
            "within_stock": f["within_stock"],
            "figures_ok": f["figures_ok"],
            "cache_matches_db": f["cache_matches_db"],
            "placed_ok": all(
                r["all_backordered"] and r["limit_reached"] and r["answered"] and r["one_result_each"]
                for r in [e["full"], *e.get("half_rounds", [e["half"]])]
            ),
        }
        for wr in res["worker"]
        if (e := wr["runs"].get("preorder")) and (f := e.get("fill"))
    ]
    compare = [
        {
            "workload": p["workload"],
            "procs": p["procs"],
            "first": p["first"],
            "events_per_s": [p["current"]["full"]["throughput"], p["rev"]["full"]["throughput"]],
            "events_ratio": ratio(p["current"]["full"]["throughput"], p["rev"]["full"]["throughput"]),
            "half_p99_ms": [p["current"]["half"]["p99_ms"], p["rev"]["half"]["p99_ms"]],
            "half_p99_ratio": ratio(p["current"]["half"]["p99_ms"], p["rev"]["half"]["p99_ms"]),
            "half_p99_rounds_ms": [
                [r["p99_ms"] for r in p[side].get("half_rounds", [p[side]["half"]])]
                for side in ("current", "rev")
            ],
            "cpu_us_per_event": [
                p[side]["full"].get("cpu_us_per_event", {}).get("total") for side in ("current", "rev")
            ],
            "half_pipeline_us": [half_cpu(p[side]).get("pipeline") for side in ("current", "rev")],
            "lost": sum(
                r["sent"] - r["received"]
                for side in ("current", "rev")
                for r in [p[side]["full"], *p[side].get("half_rounds", [p[side]["half"]])]
            ),
        }
        for p in res.get("compare", {}).get("pairs", [])
    ]
    http = res.get("http", {})
    http_sum = {}
    if "baseline" in http:  # each server's req/s over the plain stdlib+Redis server's, same run
        http_sum = {
            f"{k}_vs_baseline": ratio(v["rps"], http["baseline"]["rps"])
            for k, v in http.items()
            if k != "baseline"
        }
    return {
        "rows": rows,
        "http": http_sum,
        "vs_uniform": vs_uniform,
        "locations3_vs_uniform": vs_uniform.get("locations3", {}),
        "flash": flash,
        "preorder": preorder,
        "compare": compare,
    }


def _columns(values: Any, width: int) -> str:
    """One line of a printed table: every value right-aligned in `width` characters."""
    return "  ".join(f"{v!s:>{width}}" for v in values)


def print_table(res: dict[str, Any]) -> None:
    s = res["summary"]
    pgb = res["pgbench"]
    print()
    print(f"machine: {res['machine']['cpus']} CPUs, load average {res['machine']['load_avg']}")
    print(
        f"pgbench (fsync={pgb['fsync']}, synchronous_commit={pgb['synchronous_commit']}), one event per"
        f" transaction, tps: " + ", ".join(f"{k} {v:.0f}" for k, v in pgb["tps"].items())
    )
    print(
        "naive consumer, events/s: "
        + ", ".join(f"{n['workload']} x{n['procs']} {n['throughput']:.0f}" for n in res["naive"])
    )
    print()
    hdr = (
        "workload",
        "procs",
        "events/s",
        "/pg16",
        "/naive",
        "/uniform",
        "half/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "p99 rounds",
        "full p99",
        "lost",
        "oversold",
    )
    print(_columns(hdr, 9))
    for r in s["rows"]:
        vals = (
            r["workload"],
            r["procs"],
            f"{r['events_per_s']:.0f}",
            r["vs_pg_limit_c16"],
            # against the naive consumer with as many processes, or (xN) the nearest count run
            f"{r['vs_naive']}"
            + (f" x{r['naive_procs']}" if r["naive_procs"] not in (None, r["procs"]) else ""),
            r["vs_uniform"],
            f"{r['half_rate']:.0f}",
            r["half_p50_ms"],
            r["half_p95_ms"],
            r["half_p99_ms"],
            "/".join(f"{v:.0f}" for v in r["half_p99_rounds_ms"]),
            f"{r['full_p99_ms']:.0f}",
            r["lost"],
            r["oversold"],
        )
        print(_columns(vals, 9))
    print_inside(s["rows"])
    for r in s["flash"]:
        print(
            f"flash x{r['procs']}: {r['events_per_s']:.0f} events/s = {r['vs_uniform']} of uniform (target 0.8);"
            f" stock {r['stock']}, reserved {r['reserved']}: sold out exactly {r['sold_out_exactly']},"
            f" the rest rejected {r['rest_rejected']}, oversold {r['oversold']},"
            f" every order answered once {r['answered_once']}, cache {r['cache_matches_db']}"
        )
    for r in s["preorder"]:
        print(
            f"preorder x{r['procs']}: placement {r['placement_events_per_s']:.0f} events/s; {r['fills']} fills"
            f" of {r['orders']} backordered orders, the last {r['last_fill_s']} s after the receipt"
            f" ({r['fills_per_s']} fills/s; {r['filled_by_receipt']} in the receipt's transaction, the rest"
            f" by the sweeper); each once {r['filled_once']}, FIFO {r['fifo']}, within stock"
            f" {r['within_stock']}, backordered 0 and reserved = units {r['figures_ok']},"
            f" placements at the limit {r['placed_ok']}, cache {r['cache_matches_db']}"
        )
    if s["compare"]:
        c = res["compare"]
        print()
        print(
            f"this checkout ({c['current']}) over {c['rev_name']} ({c['rev'][:12]}), pairs run one after the other:"
        )
        hdr = (
            "workload",
            "procs",
            "first",
            "events/s",
            "REV",
            "ratio",
            "p99 ms",
            "REV p99",
            "p99 ratio",
            "CPU us/ev",
            "REV CPU",
            "half CPU",
            "REV half",
            "lost",
        )
        print(_columns(hdr, 9))
        for r in s["compare"]:
            vals = (
                r["workload"],
                r["procs"],
                r["first"],
                f"{r['events_per_s'][0]:.0f}",
                f"{r['events_per_s'][1]:.0f}",
                r["events_ratio"],
                r["half_p99_ms"][0],
                r["half_p99_ms"][1],
                r["half_p99_ratio"],
                r["cpu_us_per_event"][0],
                r["cpu_us_per_event"][1],
                r["half_pipeline_us"][0],
                r["half_pipeline_us"][1],
                r["lost"],
            )
            print(_columns(vals, 9))
    http = res.get("http", {})
    if "baseline" in http:
        print()
        for k, v in http.items():
            vs = f"x{s['http'][k + '_vs_baseline']}" if k != "baseline" else "(the yardstick)"
            print(
                f"GET /inventory/{{id}} {k:>10}: {v['rps']:>8.0f} req/s {vs:>15}  p50 {v['p50_ms']} ms"
                f"  p99 {v['p99_ms']} ms  non-2xx {v['non_2xx']}  rounds (req/s) {[r['rps'] for r in v['rounds']]}"
            )
    for wr in res["worker"]:
        if "peak_rss_mib" in wr:
            print(f"peak RSS x{wr['procs']}: {wr['peak_rss_mib']}")
    print_cpu(res)
    print_slowdowns(res)
    print()


def print_slowdowns(res: dict[str, Any]) -> None:
    """The half-load p99 beside the machine's own slowdowns (bench/machine.py) in the same round."""
    alone = res["machine"].get("slowdowns_alone")
    rows = [r for r in res["summary"]["rows"] if r.get("half_slowdowns")]
    if not alone and not rows and not res["machine"].get("idle_cost"):
        return
    print()
    if alone:
        print(
            f"the machine alone ({alone['seconds']} s, a {alone['chunk_cpu_us']} us chunk of CPU work every"
            f" 10 ms): {alone['per_minute']} slowdowns a minute, {alone['slowed_share'] * 100:.1f} % of the"
            f" time; median episode >= {alone['episode_ms_p50']} ms (max {alone['episode_ms_max']}),"
            f" {alone['factor_p50']}x slower"
        )
    idle = res["machine"].get("idle_cost")
    if idle:
        print(
            f"the same work after a {idle['pause_ms']} ms pause: {idle['after_pause_us']} us of CPU against"
            f" {idle['busy_us']} back to back ({idle['ratio']}x; over a few KB {idle['small_ratio']}x: the"
            " caches); the half-load CPU per event includes"
            " that price, paid by every process that sleeps between small batches"
        )
    if not rows:
        return
    print(
        "half load and the machine's slowdowns (the reported round): the p99 of the orders in flight"
        " during none, and how many were"
    )
    hdr = (
        "workload",
        "procs",
        "p99 ms",
        "clear p99",
        "clear rounds",
        "in one",
        "per min",
        "slowed",
        "factor",
    )
    print(_columns(hdr, 12))
    for r in rows:
        m = r["half_slowdowns"]
        vals = (
            r["workload"],
            r["procs"],
            r["half_p99_ms"],
            r["half_p99_clear_ms"],
            "/".join(f"{v:.0f}" for v in r["half_p99_clear_rounds_ms"]),
            f"{r['half_in_slowdown'] * 100:.1f} %",
            m.get("per_minute", ""),
            f"{m.get('slowed_share', float('nan')) * 100:.1f} %",
            m.get("factor_p50", ""),
        )
        print(_columns(vals, 12))


def print_inside(rows: list[dict[str, Any]]) -> None:
    """The reported half-load round seen from inside the worker (bench/worker_metrics.py)."""
    rows = [r for r in rows if r.get("half_inside")]
    if not rows:
        return
    print()
    print(
        "half load inside the worker (the reported round; from its histograms, ms): receive to ack,"
        " a batch's wait and apply, garbage-collector pauses"
    )
    hdr = (
        "workload",
        "procs",
        "e2e p50",
        "e2e p99",
        "in p50",
        "in p99",
        "batch",
        "wait p50",
        "wait p99",
        "apply p50",
        "apply p99",
        "gc >10ms",
        "gc max",
    )
    print(_columns(hdr, 9))
    for r in rows:
        i = r["half_inside"]
        vals = (
            r["workload"],
            r["procs"],
            r["half_p50_ms"],
            r["half_p99_ms"],
            i["in_worker_p50_ms"],
            i["in_worker_p99_ms"],
            i["batch_mean"],
            i["wait_p50_ms"],
            i["wait_p99_ms"],
            i["apply_p50_ms"],
            i["apply_p99_ms"],
            i["gc_over_10ms"],
            f"<={i['gc_max_bucket_ms']}",
        )
        print(_columns(vals, 9))
    split = [r for r in rows if r.get("half_split", {}).get("orders")]
    if split:
        print()
        print(
            "where the slowest 1 % of the reported round's orders spent their time, mean ms"
            " (bench/order_split.py): before the read (of which the batch in hand), in the worker, after"
        )
        print(_columns(("workload", "procs", "p99", "slowest", "in hand", "before", "in worker", "after"), 9))
        for r in split:
            t = r["half_split"]["slowest_1pct_ms"]
            vals = (
                r["workload"],
                r["procs"],
                r["half_split"]["p99_ms"],
                t["total"],
                t["batch_in_hand"],
                t["before_read_other"],
                t["in_worker"],
                t["after"],
            )
            print(_columns(vals, 9))


def print_cpu(res: dict[str, Any]) -> None:
    """CPU per event at full load, by component, beside pgbench's CPU per transaction: at equal
    CPU use, their quotient bounds the throughput ratio to pgbench."""
    rows = [r for r in res["summary"]["rows"] if r.get("cpu_us_per_event")]
    per_txn = res["pgbench"].get("cpu_us_per_txn", {}).get("c16")
    if not rows:
        return
    kinds = ["postgres", "rabbitmq", "worker", "redis", "load generator", "other", "total"]
    print()
    print(f"CPU per event at full load, us (whole machine; pgbench c16: {per_txn} us per transaction):")
    print(_columns(("workload", "procs"), 9) + "  " + _columns(kinds, 14) + "  pg16 txn/event")
    for r in rows:
        c = r["cpu_us_per_event"]
        bound = ratio(per_txn, c.get("total", float("nan"))) if per_txn else float("nan")
        print(
            _columns((r["workload"], r["procs"]), 9)
            + "  "
            + _columns((c.get(k, "") for k in kinds), 14)
            + f"  {bound:>14}"
        )
    half = [r for r in rows if r.get("half_cpu_us_per_event")]
    if half:
        kinds = [*PIPELINE, "pipeline", "load generator", "total"]
        print()
        print(
            "CPU per event at half load, us (median of the rounds; pipeline: the first four; total includes the probe):"
        )
        print(_columns(("workload", "procs"), 9) + "  " + _columns(kinds, 14))
        for r in half:
            c = r["half_cpu_us_per_event"]
            print(
                _columns((r["workload"], r["procs"]), 9) + "  " + _columns((c.get(k, "") for k in kinds), 14)
            )


def draw_charts(results: Path) -> None:
    """The PNG charts beside the results (bench/charts.py), if matplotlib is installed (the
    `bench` extra: `make bench` installs it); a run without it still has its figures."""
    try:
        from . import charts
    except ImportError as exc:
        log(f"charts skipped ({exc}): pip install -e '.[bench]', then python -m bench.charts {results}")
        return
    for path in charts.write_all(results):
        log(f"chart {path}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--smoke", action="store_true", help="a few seconds of each part, to keep it from rotting"
    )
    ap.add_argument("--out", default=str(REPO / "bench" / "results.json"))
    ap.add_argument("--procs", type=int, nargs="*", help="worker process counts (default 1 2 4)")
    ap.add_argument(
        "--parts",
        nargs="*",
        default=["pgbench", "naive", "worker", "http"],
        help="which parts to run (default all)",
    )
    ap.add_argument("--count", type=int, help="orders per full-load run")
    ap.add_argument(
        "--half-rate",
        type=float,
        metavar="N",
        help="orders/s of the half-load rounds (default half the full-load rate of the same"
        " worker; one rate for both sides of --compare)",
    )
    ap.add_argument(
        "--half-rounds",
        type=int,
        metavar="N",
        help="half-load rounds per workload, the median p99 reported (default 3): more to judge a"
        " p99 on a noisy machine",
    )
    ap.add_argument("--workloads", nargs="*", choices=WORKLOADS, help=f"{' '.join(WORKLOADS)} (default all)")
    ap.add_argument(
        "--compare",
        metavar="REV",
        help="run the worker part with REV's worker too, taking turns,"
        " and print this checkout's figures over REV's",
    )
    args = ap.parse_args(argv)
    plan = replace(SMOKE if args.smoke else FULL)  # a copy: the options below must not outlive this run
    if args.count:
        plan.full_count = args.count
    if args.workloads:
        plan.workloads = args.workloads
    if args.procs:
        plan.procs = args.procs
    if args.half_rate:
        plan.half_rate = args.half_rate
    if args.half_rounds:
        plan.half_rounds = args.half_rounds
    settings = bench_settings()
    logs = Path(tempfile.mkdtemp(prefix="inventory-bench-"))
    completed = interrupted = False
    started = time.time()
    res: dict[str, Any] = {
        "smoke": args.smoke,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_avg": [load_avg()],
        },
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
    }
    log(f"database {settings.database.dbname}, queue {settings.rabbitmq.queue}, logs {logs}")
    try:
        code = None
        if args.compare:
            code = logs / "rev"  # removed with the logs
            sha = export_rev(args.compare, code)
            head = subprocess.run(
                ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True
            ).stdout.strip()
            res["compare"] = {"rev_name": args.compare, "rev": sha, "current": head}
            log(f"comparing with {args.compare} ({sha[:12]}), exported to {code}")
        prepare_database(settings)
        conn = pika.BlockingConnection(pika.URLParameters(str(settings.rabbitmq.url)))
        declare_topology(conn.channel(), settings.rabbitmq)
        conn.close()
        parts = set(args.parts)
        # First, with nothing else of the benchmark running: how often the machine itself slows
        # down, and by how much (the half-load rounds are probed the same way).
        res["machine"]["slowdowns_alone"] = machine.alone(plan.machine_seconds)
        log(f"the machine alone: {res['machine']['slowdowns_alone']}")
        # And what a pause costs the work after it: the half-load rounds pay it at every batch.
        res["machine"]["idle_cost"] = machine.idle_cost(chunks=plan.idle_chunks)
        log(f"work after a pause: {res['machine']['idle_cost']}")
        res["pgbench"] = (
            pgbench(settings, plan)
            if "pgbench" in parts
            else {"tps": {}, "fsync": "?", "synchronous_commit": "?"}
        )
        res["naive"] = (
            [
                naive(settings, plan, name, n)
                for n in (plan.naive_procs or plan.procs)
                for name in plan.workloads
                if name not in NAIVE_SKIPPED
            ]
            if "naive" in parts
            else []
        )
        res["machine"]["load_avg"].append(load_avg())
        if "worker" not in parts:
            res["worker"] = []
        elif code is not None:
            res["worker"], res["compare"]["pairs"] = compare_runs(settings, plan, logs, code)
        else:
            res["worker"] = [worker_runs(settings, plan, n, logs) for n in plan.procs]
        res["machine"]["load_avg"].append(load_avg())
        res["http"] = http_bench(settings, plan, logs) if "http" in parts else {}
        res["machine"]["load_avg"].append(load_avg())
        res["summary"] = summarize(res)
        res["seconds"] = round(time.time() - started, 1)
        print_table(res)
        Path(args.out).write_text(json.dumps(res, indent=2, default=str))
        log(f"written {args.out} ({res['seconds']} s)")
        draw_charts(Path(args.out))
        completed = True
        return res
    except reaper.Interrupted as exc:
        interrupted = True
        log(f"interrupted by {exc.name}: stopping what it started")
        raise
    finally:
        reaper.hold()  # a second signal must not cut the cleanup short
        if not os.environ.get("INVENTORY_TEST_KEEP"):
            for cleanup in (delete_topology, delete_redis_keys, drop_database):
                try:
                    cleanup(settings)
                except Exception as exc:
                    log(f"cleanup {cleanup.__name__} failed: {exc}")
        if (completed or interrupted) and not os.environ.get("INVENTORY_TEST_KEEP"):
            shutil.rmtree(logs, ignore_errors=True)
        else:
            log(f"logs kept in {logs}")


if __name__ == "__main__":
    reaper.install()
    if "--smoke" in sys.argv:  # a check of the code, run by the tests: not a measurement
        main()
    else:
        with exclusive("bench.run " + " ".join(sys.argv[1:])):
            main()
