"""The soak (`make soak`): a steady order stream for 10 minutes; is the worker's memory flat?

  python -m bench.soak [--minutes 10] [--rate 100] [--procs 2]

Samples the resident set (VmRSS) of every process of `inventory-worker run` every 10 s. The
first minute is warm-up (imports, caches, connection pools); after it, each process's RSS
must stay within 10 % of its size at the end of the warm-up. Writes bench/soak.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pika

from inventory_worker.adapters.rabbitmq import declare_topology
from tests import reaper
from tests.support import REPO, WorkerProcess, delete_redis_keys, delete_topology, drop_database

from . import load
from .exclusive import exclusive
from .run import bench_settings, log, prepare_database, proc_tree, rss_kib


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=100.0, help="orders per second")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--warmup", type=float, default=60.0, help="seconds before the reference sample")
    ap.add_argument("--out", default=str(REPO / "bench" / "soak.json"))
    args = ap.parse_args(argv)
    settings = bench_settings()
    logs = Path(tempfile.mkdtemp(prefix="inventory-soak-"))
    wp = WorkerProcess(settings, processes=args.procs, log_path=logs / "worker.log")
    samples: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    completed = False
    try:  # from here on, the finally stops the worker and removes the names, even if interrupted
        prepare_database(settings)
        conn = pika.BlockingConnection(pika.URLParameters(str(settings.rabbitmq.url)))
        declare_topology(conn.channel(), settings.rabbitmq)
        conn.close()
        wp.start(timeout=90)
        started = time.monotonic()
        w = load.Workload("uniform", load.uniform_ids())
        chunk = 20.0  # seconds of load per drive() call, sampling in between
        while time.monotonic() - started < args.minutes * 60:
            r = load.drive(
                wp.settings, w, max(1, int(args.rate * chunk)), rate=args.rate, seed=len(results) + 1
            )
            results.append(r.as_dict())
            pids = [p for p in proc_tree(wp.proc.pid) if p != wp.proc.pid]
            samples.append(
                {
                    "t": round(time.monotonic() - started, 1),
                    "rss_kib": {str(p): rss_kib(p, "VmRSS") for p in pids},
                }
            )
            log(
                f"t={samples[-1]['t']:.0f}s {r.throughput:.0f}/s p99 {r.p99_ms:.0f} ms lost {r.sent - r.received}"
                f" rss MiB {[round(v / 1024, 1) for v in samples[-1]['rss_kib'].values()]}"
            )
        completed = True
    except reaper.Interrupted:
        completed = True  # nothing to look into: the logs go too
        raise
    finally:
        reaper.hold()  # a second signal must not cut the cleanup short
        wp.stop()
        for cleanup in (delete_topology, delete_redis_keys, drop_database):
            try:
                cleanup(settings)
            except Exception as exc:
                log(f"cleanup {cleanup.__name__} failed: {exc}")
        if completed:
            shutil.rmtree(logs, ignore_errors=True)
        else:
            log(f"logs kept in {logs}")
    ref = next((s for s in samples if s["t"] >= args.warmup), samples[0])
    growth = {}
    for pid, base in ref["rss_kib"].items():
        later = [s["rss_kib"].get(pid, 0) for s in samples if s["t"] >= ref["t"]]
        if base:
            growth[pid] = round(max(later) / base - 1, 3)
    out = {
        "minutes": args.minutes,
        "rate": args.rate,
        "procs": args.procs,
        "orders": sum(r["sent"] for r in results),
        "lost": sum(r["sent"] - r["received"] for r in results),
        "reference_t": ref["t"],
        "max_growth": max(growth.values()) if growth else None,
        "flat_within_10pct": bool(growth) and max(growth.values()) <= 0.10,
        "growth_by_process": growth,
        "samples": samples,
        "runs": results,
    }
    Path(args.out).write_text(json.dumps(out, indent=2))
    log(
        f"orders {out['orders']}, lost {out['lost']}, max RSS growth after warm-up {out['max_growth']:.1%}:"
        f" {'flat' if out['flat_within_10pct'] else 'NOT flat'} (written {args.out})"
    )
    return out


if __name__ == "__main__":
    reaper.install()
    with exclusive("bench.soak"):
        main()
