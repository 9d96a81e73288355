"""Where throughput saturates: a model from the CPU each component spends per event, checked
against a `make bench` results file.

  python -m bench.scale bench/results.json [--reference-procs 2] [--db-cores 16]

The model (docs/scaling.md explains it):
- a worker process is one thread that waits for its own PostgreSQL backend and Redis: at most
  1e6 / (worker + postgres + redis) us events/s per process, P processes P times that;
- the machine's cores bound everything on it: cores * 1e6 / (sum of the components) events/s;
  with the load generator counted apart (it is not part of a deployment), the sum without it;
- predicted events/s at P processes = the lower of the two, from the CPU per event measured
  at one reference process count; the check is that prediction against the measured rates at
  every process count of the file;
- elsewhere: PostgreSQL alone on `--db-cores` cores; one product's row, which every batch
  holding its orders keeps locked from its first statement to its commit, so batches for one
  product run one after the other: at most 1e6 / postgres us of one flash-sale event.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .exclusive import exclusive

PARTS = ("postgres", "rabbitmq", "worker", "redis")


def per_process(c: dict[str, float]) -> float:
    """Events/s one worker process can do: it waits for its backend and Redis synchronously
    (publishing and acks go out without waiting)."""
    return 1e6 / (c.get("worker", 0.0) + c.get("postgres", 0.0) + c.get("redis", 0.0))


def machine(c: dict[str, float], cores: int, with_load: bool = True) -> float:
    spent = sum(c.get(p, 0.0) for p in PARTS) + (c.get("load generator", 0.0) if with_load else 0.0)
    return cores * 1e6 / spent


def model(results: dict[str, Any], reference_procs: int, db_cores: int) -> dict[str, Any]:
    cores = int(results["machine"]["cpus"])
    runs = {(w["procs"], name): r["full"] for w in results["worker"] for name, r in w["runs"].items()}
    out: dict[str, Any] = {"cores": cores, "reference_procs": reference_procs, "workloads": {}}
    for name in sorted({n for _, n in runs}):
        ref = runs.get((reference_procs, name))
        if not ref or not ref.get("cpu_us_per_event"):
            continue
        c = ref["cpu_us_per_event"]
        rows = []
        for procs in sorted(p for p, n in runs if n == name):
            measured = runs[(procs, name)]["throughput"]
            predicted = min(procs * per_process(c), machine(c, cores))
            rows.append(
                {
                    "procs": procs,
                    "measured": round(measured),
                    "predicted": round(predicted),
                    "bound": "processes" if procs * per_process(c) < machine(c, cores) else "machine",
                    "ratio": round(measured / predicted, 2),
                    "without_load_generator": round(min(procs * per_process(c), machine(c, cores, False))),
                }
            )
        out["workloads"][name] = {
            "cpu_us_per_event": {p: c[p] for p in (*PARTS, "load generator") if p in c},
            "per_process": round(per_process(c)),
            "machine": round(machine(c, cores)),
            "machine_without_load_generator": round(machine(c, cores, False)),
            "postgres_on_db_host": round(db_cores * 1e6 / c["postgres"]),
            "one_product_row": round(1e6 / c["postgres"]),
            "rows": rows,
        }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", type=Path)
    ap.add_argument(
        "--reference-procs", type=int, default=2, help="the run whose CPU per event feeds the model"
    )
    ap.add_argument("--db-cores", type=int, default=16, help="cores of a dedicated PostgreSQL host")
    args = ap.parse_args(argv)
    m = model(json.loads(args.results.read_text()), args.reference_procs, args.db_cores)
    print(f"{m['cores']} cores; CPU per event from the {m['reference_procs']}-process runs")
    for name, w in m["workloads"].items():
        cpu = ", ".join(f"{k} {v:g}" for k, v in w["cpu_us_per_event"].items())
        print(f"\n{name}: us/event {cpu}")
        print(
            f"  one process at most {w['per_process']}/s; this machine at most {w['machine']}/s "
            f"({w['machine_without_load_generator']}/s without the load generator); PostgreSQL on "
            f"{args.db_cores} cores {w['postgres_on_db_host']}/s; one product's row {w['one_product_row']}/s"
        )
        print(
            f"  {'procs':>5} {'measured':>9} {'predicted':>10} {'bound':>10} {'ratio':>6} {'no loadgen':>11}"
        )
        for r in w["rows"]:
            print(
                f"  {r['procs']:>5} {r['measured']:>9} {r['predicted']:>10} {r['bound']:>10} "
                f"{r['ratio']:>6} {r['without_load_generator']:>11}"
            )
    return m


if __name__ == "__main__":
    with exclusive("bench.scale"):
        main()
