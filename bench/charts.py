"""Charts of a benchmark run: PNGs beside its results, redrawn from them without a rerun.

  python -m bench.charts bench/results.json [--out DIR]

Writes, next to the results (or in DIR), `<stem>-<chart>.png` for each chart the run has figures
for: `throughput` (events/s per workload and process count, beside the naive consumer and
pgbench), `cpu` (CPU per event by component, beside pgbench's per transaction), `latency`
(half-load latency percentiles per window, every round), `http` (the read endpoint: requests/s
and latency per server) and `preorder` (backorders filled after the receipt). `make bench`
draws them after its run. matplotlib comes with the `bench` extra (`pip install -e '.[bench]'`),
never with the worker; the Agg backend needs no display.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display: before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

# Colours: the worker in blues (darker = more processes), the naive consumer in greys, pgbench red.
WORKER = ["#9ecae1", "#4292c6", "#08519c", "#08306b"]
NAIVE = ["#d9d9d9", "#bdbdbd", "#969696", "#737373"]
PGBENCH = "#cb181d"
COMPONENTS = {  # bench/cpu.py's kinds, bottom to top
    "postgres": "#336791",
    "rabbitmq": "#ff6600",
    "worker": "#2ca25f",
    "redis": "#d62728",
    "load generator": "#9467bd",
    "other": "#c7c7c7",
}
SERVERS = {
    "baseline": "baseline\n(stdlib + 1 Redis GET)",
    "stdlib": "API on\nstdlib server",
    "granian": "API on granian\n(2 processes)",
    "granian:1": "API on granian\n(1 process)",
}
THOUSANDS = FuncFormatter(lambda v, _pos: f"{v:,.0f}")


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def _colour(palette: list[str], i: int, n: int) -> str:
    """The i-th of n shades, spread over the palette (light to dark)."""
    return (
        palette[min(len(palette) - 1, round(i * (len(palette) - 1) / max(1, n - 1)))] if n > 1 else palette[1]
    )


def _procs_colour(palette: list[str], procs: int) -> str:
    """One shade per process count (1, 2, 4, more), the same in every run's charts."""
    return palette[min(len(palette) - 1, max(0, procs - 1).bit_length())]


def _workloads(res: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(name for wr in res.get("worker", []) for name in wr["runs"]))


def throughput(res: dict[str, Any]) -> Figure | None:
    """Grouped bars: per workload, the naive consumer and the worker at each process count side
    by side (the worker's bar labelled with its ratio to the naive one), pgbench as lines."""
    names = _workloads(res)
    if not names:
        return None
    procs = sorted({wr["procs"] for wr in res["worker"]})
    naive = {(n["workload"], n["procs"]): n["throughput"] for n in res.get("naive", [])}
    naive_procs = sorted({p for _, p in naive})
    rows = {(r["workload"], r["procs"]): r for r in res.get("summary", {}).get("rows", [])}
    bars: list[tuple[str, int]] = [("naive", p) for p in naive_procs] + [("worker", p) for p in procs]
    # interleaved by process count: naive x1, worker x1, naive x2, ...
    bars.sort(key=lambda b: (b[1], b[0] == "worker"))
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(max(8.0, 1.9 * len(names) + 3), 5.2))
    worker = {
        (name, wr["procs"]): e["full"]["throughput"] for wr in res["worker"] for name, e in wr["runs"].items()
    }
    for j, (kind, p) in enumerate(bars):
        pts = [
            (i - 0.4 + width * (j + 0.5), v, name)
            for i, name in enumerate(names)
            if _finite(v := (worker if kind == "worker" else naive).get((name, p)))
        ]
        xs, ys = [x for x, _, _ in pts], [y for _, y, _ in pts]
        if kind == "worker":
            colour = _procs_colour(WORKER, p)
            label = f"worker, {p} process{'es' if p > 1 else ''}"
            ax.bar(xs, ys, width, color=colour, label=label, edgecolor="white", linewidth=0.5)
            for x, y, name in pts:
                r = rows.get((name, p))
                if r and _finite(r.get("vs_naive")):
                    ax.annotate(
                        f"{r['vs_naive']:g}x",
                        (x, y),
                        xytext=(0, 2),
                        textcoords="offset points",
                        ha="center",
                        va="bottom",
                        fontsize=7,
                        rotation=90,
                    )
        else:
            colour = _procs_colour(NAIVE, p)
            label = f"naive consumer, {p} process{'es' if p > 1 else ''}"
            ax.bar(xs, ys, width, color=colour, label=label, hatch="//", edgecolor="white", linewidth=0.5)
    pgb = res.get("pgbench", {}).get("tps", {})
    for key, style, text in (
        ("c16", "-", "pgbench, 16 clients"),
        ("c16_hot10", "--", "pgbench, 16 clients on 10 rows"),
    ):
        if _finite(pgb.get(key)):
            ax.axhline(
                pgb[key],
                color=PGBENCH,
                linestyle=style,
                linewidth=1.2,
                label=f"{text}: {pgb[key]:,.0f} transactions/s",
            )
    ax.set_xticks(range(len(names)), names)
    ax.set_xlabel("workload")
    ax.set_ylabel("events/s at full load (pgbench: transactions/s)")
    ax.yaxis.set_major_formatter(THOUSANDS)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.12)  # room for the ratio labels
    ax.set_title(
        "Full load: results per second; over each worker bar,\n"
        "its ratio to the naive consumer with as many processes",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def cpu(res: dict[str, Any]) -> Figure | None:
    """Stacked bars: CPU per event of each component at full load, per workload and process
    count, beside the machine's CPU per pgbench transaction (16 clients)."""
    rows = [r for r in res.get("summary", {}).get("rows", []) if r.get("cpu_us_per_event")]
    if not rows:
        return None
    labels = [f"{r['workload']}\nx{r['procs']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(8.0, 0.75 * len(rows) + 4), 5.2))
    bottom = [0.0] * len(rows)
    for kind, colour in COMPONENTS.items():
        vals = [float(r["cpu_us_per_event"].get(kind) or 0.0) for r in rows]
        ax.bar(range(len(rows)), vals, 0.7, bottom=bottom, color=colour, label=kind)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    for i, r in enumerate(rows):
        total = r["cpu_us_per_event"].get("total")
        if _finite(total):
            ax.annotate(
                f"{total:,.0f}",
                (i, total),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=7,
            )
    per_txn = res.get("pgbench", {}).get("cpu_us_per_txn", {})
    extra = [(k, v) for k, v in per_txn.items() if k in ("c16", "c16_hot10") and _finite(v)]
    for j, (key, v) in enumerate(extra):
        x = len(rows) + 0.5 + j
        ax.bar(
            x,
            v,
            0.7,
            color="white",
            edgecolor=PGBENCH,
            hatch="xx",
            label="pgbench: whole machine per transaction" if j == 0 else None,
        )
        ax.annotate(
            f"{v:,.0f}",
            (x, v),
            xytext=(0, 2),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=7,
        )
        labels.append("pgbench\n" + ("c16" if key == "c16" else "c16 hot10"))
    ax.set_xticks([*range(len(rows)), *(len(rows) + 0.5 + j for j in range(len(extra)))], labels, fontsize=8)
    ax.set_xlabel("workload, worker processes")
    ax.set_ylabel("CPU µs per event (whole machine, all cores)")
    ax.yaxis.set_major_formatter(THOUSANDS)
    ax.set_title("Full load: where the machine's CPU goes per event (total above each bar)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def latency(res: dict[str, Any]) -> Figure | None:
    """Per workload, the half-load rounds one after the other: p99 (solid) and p50 (dashed) of
    the orders sent in each window, one colour per process count; a stall is a peak."""
    names = [
        n for n in _workloads(res) if any(n in wr["runs"] and _rounds(wr["runs"][n]) for wr in res["worker"])
    ]
    if not names:
        return None
    procs = sorted({wr["procs"] for wr in res["worker"]})
    cols = 2 if len(names) > 1 else 1
    nrows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(7.0 * cols, 3.2 * nrows + 0.6), squeeze=False)
    for ax in axes.flat[len(names) :]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names, strict=False):
        runs = {wr["procs"]: _rounds(wr["runs"][name]) for wr in res["worker"] if name in wr["runs"]}
        # each round's span: the longest of the process counts', so rounds line up across them
        spans = [
            max(
                (
                    rounds[k][-1]["t"] + _window(rounds[k])
                    for rounds in runs.values()
                    if k < len(rounds) and rounds[k]
                ),
                default=0.0,
            )
            for k in range(max(len(r) for r in runs.values()))
        ]
        starts = [sum(spans[:k]) for k in range(len(spans))]
        for i, (p, rounds) in enumerate(runs.items()):
            colour = _procs_colour(WORKER, p)
            # The machine's own slowdowns in each round (bench/machine.py): a band at the
            # bottom, one row per process count.
            for k, spans_s in enumerate(
                _slowdowns(next(wr for wr in res["worker"] if wr["procs"] == p)["runs"][name])
            ):
                for a, b in spans_s:
                    ax.axvspan(
                        starts[k] + a,
                        starts[k] + max(b, a + 0.06),
                        ymin=0.04 * i,
                        ymax=0.04 * (i + 1),
                        color=colour,
                        alpha=0.8,
                        linewidth=0,
                    )
            for k, tl in enumerate(rounds):
                xs = [starts[k] + w["t"] + _window(tl) / 2 for w in tl]
                p99 = [w["p99_ms"] if _finite(w["p99_ms"]) else math.nan for w in tl]
                p50 = [w["p50_ms"] if _finite(w["p50_ms"]) else math.nan for w in tl]
                ax.plot(
                    xs,
                    p99,
                    color=colour,
                    linewidth=1.4,
                    marker=".",
                    label=f"{p} process{'es' if p > 1 else ''}: p99" if k == 0 else None,
                )
                ax.plot(
                    xs,
                    p50,
                    color=colour,
                    linewidth=1.0,
                    linestyle="--",
                    label=f"{p} process{'es' if p > 1 else ''}: p50" if k == 0 else None,
                )
        for x in starts[1:]:
            ax.axvline(x, color="grey", linewidth=0.8, linestyle=":")
        top = ax.secondary_xaxis("top")  # the rounds named above the plot, off the lines
        top.set_xticks([x + span / 2 for x, span in zip(starts, spans, strict=True)])
        top.set_xticklabels([f"round {k + 1}" for k in range(len(starts))], fontsize=7, color="grey")
        top.tick_params(length=0)
        ax.set_xlim(0, sum(spans))
        ax.set_ylim(bottom=0)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("seconds (the rounds one after the other)")
        ax.set_ylabel("latency ms")
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2 * len(procs), fontsize=8, frameon=False)
    fig.suptitle(
        "Half load: latency from occurred_at to the result's arrival, per 0.5 s window of orders sent,\n"
        "one colour per worker process count; the table reports the round with the median p99;\n"
        "bands at the bottom: when the machine itself slowed down (bench/machine.py)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.04, 1, 1))  # the legend below the plots
    return fig


def _rounds(entry: dict[str, Any]) -> list[list[dict[str, Any]]]:
    return [
        r.get("timeline") or [] for r in entry.get("half_rounds", [entry["half"]] if "half" in entry else [])
    ]


def _slowdowns(entry: dict[str, Any]) -> list[list[list[float]]]:
    """Per half-load round, the machine's slowdowns: [start, end] seconds from its first send."""
    return [
        (r.get("slowdowns") or {}).get("spans_s") or []
        for r in entry.get("half_rounds", [entry["half"]] if "half" in entry else [])
    ]


def _window(tl: list[dict[str, Any]]) -> float:
    return float(tl[1]["t"] - tl[0]["t"]) if len(tl) > 1 else 0.5


def http(res: dict[str, Any]) -> Figure | None:
    """Requests/s per server (each round a dot, the bar the median round) and its p50/p99."""
    servers = {k: v for k, v in res.get("http", {}).items() if isinstance(v, dict) and _finite(v.get("rps"))}
    if not servers:
        return None
    keys = list(servers)
    labels = [SERVERS.get(k, k) for k in keys]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12.0, 4.8))
    colours = ["#969696" if k == "baseline" else _colour(WORKER, i, len(keys)) for i, k in enumerate(keys)]
    left.bar(range(len(keys)), [servers[k]["rps"] for k in keys], 0.6, color=colours)
    base = servers.get("baseline", {}).get("rps")
    for i, k in enumerate(keys):
        rounds = [r["rps"] for r in servers[k].get("rounds", []) if _finite(r.get("rps"))]
        left.plot(
            [i] * len(rounds),
            rounds,
            "o",
            color="black",
            markersize=3,
            label="each round" if i == 0 else None,
        )
        if base and k != "baseline":
            left.annotate(
                f"{servers[k]['rps'] / base:.2f}x",
                (i, servers[k]["rps"]),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=8,
            )
    left.set_xticks(range(len(keys)), labels, fontsize=8)
    left.set_ylabel("requests/s (median round)")
    left.yaxis.set_major_formatter(THOUSANDS)
    left.set_title(
        "GET /inventory/{id}, wrk 32 connections: requests/s\n(over each bar: ratio to the baseline)",
        fontsize=10,
    )
    left.legend(fontsize=8)
    left.grid(axis="y", alpha=0.3)
    width = 0.38
    for j, (field, shade) in enumerate((("p50_ms", "#9ecae1"), ("p99_ms", "#08519c"))):
        xs = [i - width / 2 + j * width for i in range(len(keys))]
        ys = [servers[k][field] for k in keys]
        right.bar(xs, ys, width, color=shade, label=field.split("_")[0])
        for x, y in zip(xs, ys, strict=True):
            if _finite(y):
                right.annotate(
                    f"{y:g}", (x, y), xytext=(0, 2), textcoords="offset points", ha="center", fontsize=7
                )
    right.axhline(10, color=PGBENCH, linestyle="--", linewidth=1, label="p99 target: 10 ms")
    # log: one stalled server's p99 must not flatten the others' bars
    right.set_yscale("log")
    right.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    right.set_xticks(range(len(keys)), labels, fontsize=8)
    right.set_ylabel("latency ms (log scale)")
    right.set_title("latency per request (wrk, median round; value over each bar)", fontsize=10)
    right.legend(fontsize=8)
    right.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def preorder(res: dict[str, Any]) -> Figure | None:
    """Orders filled since the receipt, one line per process count."""
    runs = [
        (wr["procs"], wr["runs"]["preorder"]["fill"])
        for wr in res.get("worker", [])
        if "fill" in wr["runs"].get("preorder", {})
    ]
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(8.5, 4.6))
    for p, f in runs:
        pts = [[0.0, 0], *f.get("fill_timeline", [])]
        ax.step(
            [t for t, _ in pts],
            [n for _, n in pts],
            where="post",
            color=_procs_colour(WORKER, p),
            linewidth=1.5,
            label=f"{p} process{'es' if p > 1 else ''}: {f['orders']:,} orders, the last filled after"
            f" {f['last_fill_s']} s ({f['fills_per_s']} fills/s; {f['filled_by_receipt']} in the"
            " receipt's transaction)",
        )
        ax.axhline(f["orders"], color="grey", linewidth=0.6, linestyle=":")
    ax.set_xlabel("seconds since the stock.received was published")
    ax.set_ylabel("orders filled (inventory.backorder_filled received)")
    ax.yaxis.set_major_formatter(THOUSANDS)
    ax.set_ylim(bottom=0)
    ax.set_xlim(left=0)
    ax.set_title(
        "preorder: backordered orders filled after one receipt (the receipt's transaction,\n"
        "then the elected sweeper's fill passes)",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


CHARTS = {"throughput": throughput, "cpu": cpu, "latency": latency, "http": http, "preorder": preorder}


def write_all(results: Path, out: Path | None = None) -> list[Path]:
    """Draws every chart the results have figures for; returns the files written."""
    res = json.loads(results.read_text())
    folder = out or results.parent
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in CHARTS.items():
        fig = draw(res)
        if fig is None:
            continue
        path = folder / f"{results.stem}-{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", type=Path, help="a results.json written by python -m bench.run")
    ap.add_argument("--out", type=Path, help="folder for the PNGs (default: the results' folder)")
    args = ap.parse_args(argv)
    written = write_all(args.results, args.out)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
