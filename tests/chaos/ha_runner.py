"""The HA run: the chaos workload through the loss of a node of each replicated service.

    python -m tests.chaos.ha_runner [--cycles 1] [--seed 7] [--json PATH]   (`make chaos-ha`)

Starts the replicated private services of tests/chaos/ha.py (a 3-node RabbitMQ cluster, a
PostgreSQL primary with a synchronous standby, Redis with a replica and three Sentinels, and a
network namespace), runs a worker configured with every node (rabbitmq.addresses,
database.hosts, redis.sentinels) and publishes the chaos workload (every message duplicated,
reordered, poison mixed in: tests/chaos/workload.py) while these faults are injected, each
once per cycle, in a seeded order:

  kill_queue_leader          SIGKILL of the RabbitMQ node leading the input quorum queue
                             (restarted once a new leader is elected)
  pause_rabbitmq_node        SIGSTOP of that node for longer than the AMQP heartbeat, then
                             SIGCONT: a hung node, not a dead one
  crash_postgresql_primary   SIGKILL of the primary, pg_ctl promote of the standby, the old
                             primary rewound (pg_rewind) and back as the synchronous standby
  kill_redis_master          SIGKILL of the Redis master; the Sentinels promote the replica
  partition_worker           a second worker, in its own network namespace and holding the
                             sweeper's lock, cut off for longer than the sweeper's takeover
                             time while the first goes on, then joined again

Then every invariant of the chaos suite is checked against its independent model (nothing
lost, nothing applied twice, never oversold, figures exact, verify clean, the DLQ holding
exactly the poison), and for each fault: the time from the fault to the first event applied
after it, the duplicates absorbed meanwhile, the longest gap in published results. A table,
and a JSON file with the seed. Stopped by a signal, it stops everything it started.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from inventory_worker.adapters.postgres import SWEEPER_LOCK_KEY

from .. import reaper
from ..support import REPO, WorkerProcess, free_port
from .ha import HAServices
from .runner import FaultInjector, Fleet, Pg, Progress, Report, finish, run_chaos

HA_FAULTS = (
    "kill_queue_leader",
    "pause_rabbitmq_node",
    "crash_postgresql_primary",
    "kill_redis_master",
    "partition_worker",
)
DEFAULT_SEED = 7
PARTITION_SECONDS = 20.0  # > the sweeper's takeover: the server drops a silent session in ~11 s
PAUSE_SECONDS = 15.0  # > the run's AMQP heartbeat (10 s)


class NamespacedWorker(WorkerProcess):
    """A worker run with `ip netns exec`, reached at its namespace's address."""

    def __init__(self, settings: Any, prefix: list[str], address: str, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self.prefix, self.address = prefix, address

    def start(self, wait_ready: bool = True, timeout: float = 60.0) -> NamespacedWorker:
        assert self.log_path is not None
        self.metrics_dir = Path(tempfile.mkdtemp(prefix="inventory-metrics-", dir=self.log_path.parent))
        self.env["PROMETHEUS_MULTIPROC_DIR"] = str(self.metrics_dir)
        self._log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                *self.prefix,
                sys.executable,
                "-m",
                "inventory_worker",
                "run",
                "--processes",
                str(self.processes),
            ],
            env=self.env,
            cwd=REPO,
            stdout=self._log_file,
            stderr=self._log_file,
            start_new_session=True,
        )
        if wait_ready:
            self.wait_ready(timeout)
        return self

    @property
    def base_url(self) -> str:
        return f"http://{self.address}:{self.settings.http.port}"


class HAFaults(FaultInjector):
    """Each kind once per cycle, in a seeded order; records when each began and ended."""

    def __init__(
        self,
        services: HAServices,
        fleet: Fleet,
        kinds: tuple[str, ...],
        seed: int,
        interval: tuple[float, float],
        cycles: int = 1,
    ) -> None:
        super().__init__(services, fleet, kinds, seed, interval)  # type: ignore[arg-type]
        self.ha = services
        self.cycles = cycles
        self.done = False
        self.records: list[dict[str, Any]] = []
        self.ns_worker: NamespacedWorker | None = None

    def run(self) -> None:
        try:
            for _ in range(self.cycles):
                plan = list(self.kinds)
                self.rng.shuffle(plan)
                for kind in plan:
                    if self.stop_event.wait(self.rng.uniform(*self.interval)):
                        return
                    self.current = kind
                    record: dict[str, Any] = {"fault": kind, "started": time.time()}
                    try:
                        record.update(self.inject(kind) or {})
                        self.counts[kind] += 1
                    except Exception as exc:
                        self.errors.append(f"{kind}: {exc!r}")
                        record["error"] = repr(exc)
                    record["ended"] = time.time()
                    self.records.append(record)
                    self.log.append((record["started"], kind))
                    self.current = ""
        finally:
            self.done = True

    def inject(self, kind: str) -> dict[str, Any] | None:  # type: ignore[override]
        ha, queue = self.ha, self.fleet.settings.rabbitmq.queue
        if kind == "kill_queue_leader":
            cluster = ha.rabbitmq
            assert cluster is not None
            leader = cluster.queue_leader(queue)
            members = cluster.members(queue)  # the queue lives on every node
            t0 = time.monotonic()
            cluster.kill(leader)
            new = _wait(lambda: cluster.queue_leader(queue).node != leader.node, 60)
            cluster.restart(leader)
            return {
                "node": leader.node,
                "members": members,
                "new_leader_after": new,
                "node_back_after": round(time.monotonic() - t0, 2),
            }
        if kind == "pause_rabbitmq_node":
            cluster = ha.rabbitmq
            assert cluster is not None
            node = cluster.queue_leader(queue)
            cluster.pause(node, PAUSE_SECONDS)
            return {
                "node": node.node,
                "paused_seconds": PAUSE_SECONDS,
                "leader_after": cluster.queue_leader(queue).node,
            }
        if kind == "crash_postgresql_primary":
            old = ha.postgres.primary.name
            steps = ha.postgres.failover()
            return {"lost": old, "new_primary": ha.postgres.primary.name, **steps}
        if kind == "kill_redis_master":
            return ha.redis.kill_master()
        if kind == "partition_worker":
            return self.partition()
        raise ValueError(kind)

    def _lock_holder(self, pg: Pg) -> str | None:
        """The client address of the session holding the sweeper's lock (None: nobody)."""
        rows = pg.query(
            "SELECT coalesce(host(a.client_addr), 'local'), a.pid FROM pg_locks l"
            " JOIN pg_stat_activity a USING (pid) WHERE l.locktype = 'advisory' AND l.granted"
            " AND l.classid = %s AND l.objid = %s",
            (SWEEPER_LOCK_KEY >> 32, SWEEPER_LOCK_KEY & 0xFFFFFFFF),
        )
        return str(rows[0][0]) if rows else None

    def partition(self) -> dict[str, Any]:
        ha, part = self.ha, self.ha.partition
        assert part is not None
        s = self.fleet.settings
        b_settings = s.model_copy(
            update={
                "database": s.database.model_copy(update={"hosts": ha.postgres.hosts(part.host_ip)}),
                "redis": s.redis.model_copy(update={"sentinels": ha.redis.addresses(part.host_ip)}),
                "rabbitmq": s.rabbitmq.model_copy(
                    update={
                        "url": type(s.rabbitmq.url)(str(s.rabbitmq.url).replace("127.0.0.1", part.host_ip)),
                        "addresses": ha.rabbitmq.addresses(part.host_ip) if ha.rabbitmq else [],
                    }
                ),
                "http": s.http.model_copy(
                    update={"host": "0.0.0.0", "port": free_port(), "management_port": free_port()}
                ),
            }
        )
        w = NamespacedWorker(
            b_settings,
            part.prefix(),
            part.ns_ip,
            processes=2,
            log_path=self.fleet.log_dir / "worker-partitioned.log",
        )
        self.ns_worker = w
        w.start(timeout=90)
        pg = Pg(s)
        try:
            # The partitioned worker is to hold the sweeper's lock: kill the holder elsewhere
            # (a consumer of the other worker: its supervisor restarts it) until it does.
            for _ in range(20):
                holder = _retry(lambda: self._lock_holder(pg))
                if holder == part.ns_ip:
                    break
                rows = pg.query(
                    "SELECT a.pid, a.application_name FROM pg_locks l JOIN pg_stat_activity a"
                    " USING (pid) WHERE l.locktype = 'advisory' AND l.granted AND l.objid = %s",
                    (SWEEPER_LOCK_KEY & 0xFFFFFFFF,),
                )
                for _backend, name in rows:
                    pid = int(str(name).rsplit("pid=", 1)[1]) if "pid=" in str(name) else None
                    if pid and self.fleet.ours(pid):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(1.5)
            led = _retry(lambda: self._lock_holder(pg)) == part.ns_ip
            t0 = time.monotonic()
            part.cut()
            takeover: float | None = None
            try:
                while time.monotonic() - t0 < PARTITION_SECONDS:
                    try:
                        holder = self._lock_holder(pg)
                    except Exception:
                        holder = None
                    if takeover is None and holder is not None and holder != part.ns_ip:
                        takeover = round(time.monotonic() - t0, 2)
                    time.sleep(0.25)
            finally:
                part.join()
            time.sleep(8)  # joined again: the partitioned worker finds its sessions gone and goes on
            rc = w.stop(timeout=s.worker.shutdown_grace_seconds + 20)
        finally:
            pg.close()
        return {
            "partitioned_worker_led_the_sweeper": led,
            "sweeper_taken_over_after": takeover,
            "cut_seconds": PARTITION_SECONDS,
            "partitioned_worker_exit": rc,
        }


def _wait(check: Any, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            if check():
                return round(time.monotonic() - t0, 2)
        except Exception:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"not done after {timeout}s")


def _retry(fn: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def fault_figures(report: Report) -> list[dict[str, Any]]:
    """Per fault: seconds from its start to the first event applied after it, duplicates
    published (and absorbed) until the next fault, longest gap between published results."""
    ctx = report.context
    faults: HAFaults = ctx["faults"]
    sent: list[tuple[float, str]] = ctx["publisher"].sent
    pg = Pg(ctx["settings"])
    out = []
    try:
        applied_at = {
            str(r[0]): r[1]
            for r in pg.query(
                "SELECT event_id, extract(epoch FROM processed_at)::float8 FROM processed_events"
            )
        }
        applied = sorted(applied_at.values())
        published = [
            r[0]
            for r in pg.query(
                "SELECT extract(epoch FROM published_at)::float8 FROM outbox"
                " WHERE published_at IS NOT NULL ORDER BY 1"
            )
        ]
    finally:
        pg.close()
    seen: set[str] = set()
    first_copy_at: dict[str, float] = {}
    for when, mid in sent:
        if mid in seen:
            continue
        seen.add(mid)
        first_copy_at[mid] = when
    records = sorted(faults.records, key=lambda r: r["started"])
    for i, rec in enumerate(records):
        start, end = rec["started"], rec["ended"]
        until = records[i + 1]["started"] if i + 1 < len(records) else float("inf")
        after = next((t for t in applied if t > start), None)
        window = [start, *(t for t in published if start < t <= min(until, end + 10))]
        gap = max((b - a for a, b in zip(window, window[1:], strict=False)), default=None)
        dups = sum(1 for when, mid in sent if start <= when < until and first_copy_at[mid] < when)
        # Recovery as a client sees it: the first event published after the fault began, applied.
        fresh = [
            applied_at[mid] for mid, when in first_copy_at.items() if when >= start and mid in applied_at
        ]
        out.append(
            {
                "fault": rec["fault"],
                "seconds_to_first_event_applied": round(after - start, 2) if after is not None else None,
                "seconds_to_first_new_event_applied": round(min(fresh) - start, 2) if fresh else None,
                "duplicates_absorbed": dups,
                "longest_gap_in_results_seconds": round(gap, 2) if gap is not None else None,
                "fault_seconds": round(end - start, 2),
                **{k: v for k, v in rec.items() if k not in ("fault", "started", "ended")},
            }
        )
    return out


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "fault",
        "to first applied (s)",
        "to first new event applied (s)",
        "duplicates absorbed",
        "longest result gap (s)",
        "fault took (s)",
    )
    lines = [" | ".join(head), " | ".join("-" * len(h) for h in head)]
    for r in rows:
        lines.append(
            " | ".join(
                str(x)
                for x in (
                    r["fault"],
                    r["seconds_to_first_event_applied"],
                    r["seconds_to_first_new_event_applied"],
                    r["duplicates_absorbed"],
                    r["longest_gap_in_results_seconds"],
                    r["fault_seconds"],
                )
            )
        )
    return "\n".join(lines)


def run_ha(
    services: HAServices,
    *,
    seed: int,
    cycles: int = 1,
    duration: float = 5.0,
    kinds: tuple[str, ...] = HA_FAULTS,
    interval: tuple[float, float] = (3.0, 5.0),
    log_dir: Path | None = None,
    progress: Progress | None = None,
) -> tuple[Report, list[dict[str, Any]]]:
    if services.partition is None:
        kinds = tuple(k for k in kinds if k != "partition_worker")
    if services.rabbitmq is None:
        kinds = tuple(k for k in kinds if k not in ("kill_queue_leader", "pause_rabbitmq_node"))

    def injector(*args: Any) -> HAFaults:
        return HAFaults(*args, cycles=cycles)

    faults_ref: list[HAFaults] = []

    def make(*args: Any) -> HAFaults:
        f = injector(*args)
        faults_ref.append(f)
        return f

    try:
        report = run_chaos(
            services,
            duration=duration,
            seed=seed,
            processes=3,
            round_size=40,
            kinds=kinds,  # type: ignore[arg-type]
            fault_interval=interval,
            log_dir=log_dir,
            progress=progress,
            injector=make,
            until=lambda f: getattr(f, "done", True),
            # Longer than the run's slowest tail (a fault, the last rounds, the drain),
            # so that the check compares every product's cached figures, not none.
            cache_ttl_seconds=120,
        )
    finally:
        for f in faults_ref:  # a partitioned worker still running (the run failed meanwhile)
            if f.ns_worker is not None and f.ns_worker.proc is not None and f.ns_worker.proc.poll() is None:
                f.ns_worker.kill()
    figures = fault_figures(report) if "faults" in report.context else []
    injected = {r["fault"] for r in figures}
    report.invariants["every fault injected, once per cycle"] = (
        set(kinds) <= injected and not any("error" in r for r in figures),
        f"{[r['fault'] for r in figures]}; errors: {[r.get('error') for r in figures if 'error' in r]}",
    )
    part = next((r for r in figures if r["fault"] == "partition_worker"), None)
    if part is not None:
        report.invariants[
            "across the partition: the sweeper taken over, the cut worker back and stopped cleanly"
        ] = (
            bool(part.get("partitioned_worker_led_the_sweeper"))
            and part.get("sweeper_taken_over_after") is not None
            and part.get("partitioned_worker_exit") == 0,
            f"led {part.get('partitioned_worker_led_the_sweeper')}, taken over after "
            f"{part.get('sweeper_taken_over_after')} s, exit {part.get('partitioned_worker_exit')}",
        )
    return report, figures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--cycles",
        type=int,
        default=int(os.environ.get("CHAOS_HA_CYCLES", 1)),
        help="how many times each fault is injected (default 1)",
    )
    ap.add_argument("--seed", type=int, default=int(os.environ.get("CHAOS_SEED", DEFAULT_SEED)))
    ap.add_argument(
        "--json",
        type=Path,
        default=REPO / ".cache" / "chaos-ha.json",
        help="where the figures go (default .cache/chaos-ha.json)",
    )
    ap.add_argument("--no-partition", action="store_true", help="without the network namespace")
    ap.add_argument("--progress-seconds", type=float, default=5.0)
    args = ap.parse_args(argv)
    os.chdir(REPO)
    reaper.install()
    progress = Progress(args.progress_seconds)
    progress.phase = "starting the replicated services"
    progress.start()
    services: HAServices | None = None
    report: Report | None = None
    interrupted: str | None = None
    print(f"chaos-ha: {args.cycles} cycle(s) of {len(HA_FAULTS)} faults, seed {args.seed}", flush=True)
    try:
        services = HAServices(partition=not args.no_partition)
        services.start()
        ns = f", namespace {services.partition.ns}" if services.partition else ""
        print(f"chaos-ha: services up {services.start_seconds}{ns}, data in {services.root}", flush=True)
        report, figures = run_ha(services, seed=args.seed, cycles=args.cycles, progress=progress)
        print(report.text(), flush=True)
        print("\n=== faults ===\n" + table(figures), flush=True)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "seed": args.seed,
                    "cycles": args.cycles,
                    "faults": figures,
                    "summary": report.summary,
                    "invariants": {k: {"ok": ok, "detail": d} for k, (ok, d) in report.invariants.items()},
                },
                indent=2,
                default=str,
            )
        )
        print(f"chaos-ha: figures written to {args.json}", flush=True)
    except reaper.Interrupted as exc:
        interrupted = exc.name
        raise
    except Exception:
        traceback.print_exc()
    finally:
        reaper.hold()
        progress.phase = "stopping the services"
        verdict = "chaos-ha: FAIL the services did not start"
        if services is not None:
            verdict = "chaos-ha" + finish(
                services,
                report,
                time.monotonic() - progress.started,  # type: ignore[arg-type]
                interrupted,
            ).removeprefix("chaos")
        progress.stop_event.set()
        reaper.sweep()
        print(verdict, flush=True)
    return 0 if report is not None and report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
