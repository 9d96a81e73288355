"""Concurrency: nothing oversold, nothing lost, whatever the number of processes.

First straight through the stored procedures (many OS processes, each with its own Store and
connection, released together by a barrier), then through RabbitMQ with a 4-process worker,
and finally a real deadlock, provoked on purpose, that the worker must retry.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import time
from collections import Counter
from typing import Any

import psycopg2
import pytest

from inventory_worker.adapters.postgres import Store, TransientError
from inventory_worker.contract import make_event, parse_event, validate_output

from ..support import http_get, pg, uid, wait_for_lock_waiter

# fork: the racers start at once and cheaply; each opens its own connection after the fork.
CTX = multiprocessing.get_context("fork")


def ev(type_: str, data: dict[str, Any]) -> dict[str, Any]:
    return parse_event(json.dumps(make_event(type_, data)).encode(), type_).for_store()


def _racer(db_settings: Any, jobs: list[list[dict[str, Any]]], barrier: Any, out: Any) -> None:
    """Applies its batches in order, retrying what PostgreSQL calls transient (as the consumer
    does); reports every outcome and every transient error it saw."""
    store = Store(db_settings)
    results: list[dict[str, Any]] = []
    transient: list[str] = []
    try:
        barrier.wait(60)
        for batch in jobs:
            while True:
                try:
                    outcomes = store.apply_batch(batch)
                    break
                except TransientError as exc:
                    transient.append(str(exc))
                    time.sleep(random.uniform(0.01, 0.05))
            for e, o in zip(batch, outcomes, strict=True):
                results.append({"id": e["id"], "outcome": o.outcome, "bodies": [m.body for m in o.messages]})
        out.put((results, transient, None))
    except Exception as exc:  # reported to the test, which fails with it
        out.put((results, transient, repr(exc)))
    finally:
        store.close()


def race(settings: Any, jobs_per_process: list[list[list[dict[str, Any]]]]) -> tuple[list[dict], list[str]]:
    barrier = CTX.Barrier(len(jobs_per_process))
    out = CTX.Queue()
    procs = [
        CTX.Process(target=_racer, args=(settings.database, jobs, barrier, out)) for jobs in jobs_per_process
    ]
    for p in procs:
        p.start()
    results: list[dict] = []
    transient: list[str] = []
    try:
        for _ in procs:
            r, t, err = out.get(timeout=120)
            assert err is None, err
            results += r
            transient += t
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs)
    return results, transient


def figures(settings: Any, pids: list[str]) -> dict[str, tuple[int, int]]:
    with pg(settings) as cur:
        cur.execute("SELECT product_id, on_hand, reserved FROM products WHERE product_id = ANY(%s)", (pids,))
        return {r[0]: (r[1], r[2]) for r in cur.fetchall()}


def processed(settings: Any, ids: list[str]) -> int:
    with pg(settings) as cur:
        cur.execute("SELECT count(*) FROM processed_events WHERE event_id = ANY(%s::uuid[])", (ids,))
        return cur.fetchone()[0]


def check_books(settings: Any, pids: list[str], initial: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Figures agree with the orders and with the ledger; nothing oversold."""
    figs = figures(settings, pids)
    with pg(settings) as cur:
        cur.execute(
            """SELECT ol.product_id,
                      coalesce(sum(ol.quantity) FILTER (WHERE o.status = 'reserved'), 0),
                      coalesce(sum(ol.quantity) FILTER (WHERE o.status = 'committed'), 0)
                 FROM order_lines ol JOIN orders o USING (order_id)
                WHERE ol.product_id = ANY(%s) GROUP BY ol.product_id""",
            (pids,),
        )
        by_orders = {r[0]: (int(r[1]), int(r[2])) for r in cur.fetchall()}
        cur.execute(
            "SELECT product_id, sum(on_hand_delta), sum(reserved_delta) FROM stock_movements"
            " WHERE product_id = ANY(%s) GROUP BY product_id",
            (pids,),
        )
        ledger = {r[0]: (int(r[1]), int(r[2])) for r in cur.fetchall()}
    for pid in pids:
        on_hand, reserved = figs[pid]
        held, committed = by_orders.get(pid, (0, 0))
        assert 0 <= reserved <= on_hand, (pid, figs[pid])
        assert reserved == held, (pid, reserved, held)
        assert on_hand == initial[pid] - committed, (pid, on_hand, initial[pid], committed)
        assert ledger[pid] == (on_hand, reserved), (pid, ledger[pid], figs[pid])
    return figs


# ==== straight through the procedures ===========================================================


def test_processes_racing_for_the_last_units_never_oversell(settings):
    pid = uid("HOT")
    store = Store(settings.database)
    store.apply_batch([ev("stock.adjusted", {"product_id": pid, "delta": 20, "low_stock_threshold": 2})])
    store.close()
    n_proc, per_proc = 8, 4
    jobs = []
    for i in range(n_proc):
        orders = [
            ev("order.placed", {"order_id": uid(f"R{i}"), "lines": [{"product_id": pid, "quantity": 3}]})
            for _ in range(per_proc)
        ]
        # half the racers send one event per transaction, half two: both paths race
        jobs.append([[o] for o in orders] if i % 2 else [orders[:2], orders[2:]])
    results, transient = race(settings, jobs)

    assert len(results) == n_proc * per_proc
    outcomes = Counter(r["outcome"] for r in results)
    assert outcomes == {"reserved": 6, "rejected": 26}  # 6 x 3 = 18 of 20; 2 can serve nobody
    for r in results:
        for body in r["bodies"]:
            validate_output(body)
            assert body["causation_id"] == r["id"]
        if r["outcome"] == "rejected":
            assert [b["data"]["shortages"] for b in r["bodies"]] == [
                [{"product_id": pid, "requested": 3, "available": 2}]
            ]
    low = [b for r in results for b in r["bodies"] if b["type"] == "inventory.low_stock"]
    assert [b["data"] for b in low] == [{"product_id": pid, "available": 2, "threshold": 2}]
    assert figures(settings, [pid]) == {pid: (20, 18)}
    check_books(settings, [pid], {pid: 20})
    assert transient == []  # one product, locked by everyone in the same way: no deadlock


def test_multi_line_orders_in_any_line_order_neither_deadlock_nor_get_lost(settings):
    base = uid("ML")
    pids = [f"{base}-{i}" for i in range(6)]
    store = Store(settings.database)
    store.apply_batch([ev("stock.adjusted", {"product_id": p, "delta": 40}) for p in pids])
    store.close()
    jobs = []
    all_ids = []
    for i in range(6):
        rnd = random.Random(i)
        events = []
        orders = []
        for j in range(12):
            chosen = rnd.sample(pids, rnd.randint(2, 4))  # a random subset in a random line order
            order = f"{base}-o{i}-{j}"
            orders.append(order)
            events.append(
                ev(
                    "order.placed",
                    {
                        "order_id": order,
                        "lines": [{"product_id": p, "quantity": rnd.randint(1, 3)} for p in chosen],
                    },
                )
            )
        for j, order in enumerate(orders):
            if j % 3 == 0:
                events.append(ev("order.cancelled", {"order_id": order}))
            elif j % 3 == 1:
                events.append(ev("order.completed", {"order_id": order}))
        events.append(ev("stock.adjusted", {"product_id": rnd.choice(pids), "delta": 2}))
        all_ids += [e["id"] for e in events]
        batches, k = [], 0
        while k < len(events):  # batches of 1 to 3 events, as the consumer makes them
            size = rnd.randint(1, 3)
            batches.append(events[k : k + size])
            k += size
        jobs.append(batches)
    results, transient = race(settings, jobs)

    assert sorted(r["id"] for r in results) == sorted(all_ids)
    assert processed(settings, all_ids) == len(all_ids)  # every event applied, none twice
    for r in results:
        for body in r["bodies"]:
            validate_output(body)
    initial = {p: 40 for p in pids}
    adjusted = Counter(
        e["data"]["product_id"]
        for batch_list in jobs
        for batch in batch_list
        for e in batch
        if e["type"] == "stock.adjusted"
    )
    for p, n in adjusted.items():
        initial[p] += 2 * n
    check_books(settings, pids, initial)
    outcomes = Counter(r["outcome"] for r in results)
    assert outcomes["reserved"] > 0 and outcomes["committed"] > 0 and outcomes["released"] > 0
    # products are always locked in product_id order, so these cannot deadlock
    assert transient == []


# ==== through RabbitMQ, a 4-process worker ======================================================


def wait_processed(settings: Any, ids: list[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while (n := processed(settings, ids)) < len(ids):
        assert time.monotonic() < deadline, f"only {n} of {len(ids)} events applied after {timeout}s"
        time.sleep(0.2)


def test_four_worker_processes_race_without_overselling_or_losing_events(start_worker, bus, settings):
    w = start_worker(processes=4)
    hot = uid("HOT")
    base = uid("MX")
    pids = [f"{base}-{i}" for i in range(4)]
    ids = [
        bus.publish("stock.adjusted", {"product_id": p, "delta": 30 if p != hot else 10})["id"]
        for p in [hot, *pids]
    ]
    wait_processed(settings, ids)

    rnd = random.Random(7)
    hot_orders = [
        bus.publish("order.placed", {"order_id": uid("H"), "lines": [{"product_id": hot, "quantity": 1}]})
        for _ in range(30)
    ]
    orders = []
    for j in range(40):
        chosen = rnd.sample(pids, rnd.randint(2, 3))
        order = f"{base}-o{j}"
        orders.append(order)
        ids.append(
            bus.publish(
                "order.placed",
                {
                    "order_id": order,
                    "lines": [{"product_id": p, "quantity": rnd.randint(1, 2)} for p in chosen],
                },
            )["id"]
        )
    for j, order in enumerate(orders):  # may overtake their order.placed: also a rule to keep
        if j % 4 == 0:
            ids.append(bus.publish("order.cancelled", {"order_id": order})["id"])
        elif j % 4 == 1:
            ids.append(bus.publish("order.completed", {"order_id": order})["id"])
    ids += [o["id"] for o in hot_orders]
    wait_processed(settings, ids, timeout=90)

    # exactly 10 of the 30 one-unit orders got the 10 units
    bus.wait_for(
        lambda rs: (
            len(
                {
                    r["causation_id"]
                    for r in rs
                    if r["causation_id"] in {o["id"] for o in hot_orders}
                    and r["type"] in ("inventory.reserved", "inventory.rejected")
                }
            )
            == 30
        ),
        30,
    )
    hot_ids = {o["id"] for o in hot_orders}
    by_type = Counter(
        r["type"] for r in {r["id"]: r for r in bus.results}.values() if r["causation_id"] in hot_ids
    )
    assert (by_type["inventory.reserved"], by_type["inventory.rejected"]) == (10, 20)
    assert figures(settings, [hot]) == {hot: (10, 10)}
    figs = check_books(settings, [hot, *pids], {hot: 10, **{p: 30 for p in pids}})

    # each order reserved at most once, and the cache serves the final figures
    reserved_per_order = Counter(
        r["data"]["order_id"]
        for r in {r["id"]: r for r in bus.results}.values()
        if r["type"] == "inventory.reserved" and r["data"]["order_id"].startswith(base)
    )
    assert all(n == 1 for n in reserved_per_order.values())
    for pid, (on_hand, reserved) in figs.items():
        deadline = time.monotonic() + 15
        while True:
            status, _, raw = http_get(f"{w.base_url}/inventory/{pid}")
            body = json.loads(raw)
            if status == 200 and (body["on_hand"], body["reserved"]) == (on_hand, reserved):
                break
            assert time.monotonic() < deadline, (pid, status, body, (on_hand, reserved))
            time.sleep(0.2)
        assert body["available"] == on_hand - reserved


# ==== a real deadlock: retried, not lost ========================================================


def _deadlocks(settings: Any) -> int:
    with pg(settings) as cur:
        cur.execute("SELECT pg_stat_clear_snapshot()")
        cur.execute("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
        return cur.fetchone()[0]


def test_deadlock_is_retried_not_lost(worker, bus, settings):
    """The test holds product b and then asks for a, while the worker holds a and waits for b.
    PostgreSQL breaks the cycle by aborting the worker's transaction (the test's deadlock_timeout
    is longer); the worker must retry the event, not drop it."""
    base = uid("DL")
    a, b = f"{base}-a", f"{base}-b"
    store = Store(settings.database)
    store.apply_batch([ev("stock.adjusted", {"product_id": p, "delta": 5}) for p in (a, b)])
    store.close()
    deadlocks_before = _deadlocks(settings)

    blocker = psycopg2.connect(**settings.database.dsn())
    try:
        cur = blocker.cursor()
        cur.execute("SET deadlock_timeout = '60s'")
        cur.execute("SELECT pg_backend_pid()")
        my_pid = cur.fetchone()[0]
        cur.execute("SELECT 1 FROM products WHERE product_id = %s FOR UPDATE", (b,))
        order = uid("O")
        placed = bus.publish(
            "order.placed",
            {
                "order_id": order,
                "lines": [{"product_id": b, "quantity": 1}, {"product_id": a, "quantity": 2}],
            },
        )
        wait_for_lock_waiter(settings, my_pid)  # until a worker transaction holds a and waits for our b
        cur.execute("SELECT 1 FROM products WHERE product_id = %s FOR UPDATE", (a,))  # closes the cycle
        assert figures(settings, [a, b]) == {a: (5, 0), b: (5, 0)}  # the worker's attempt was undone
    finally:
        blocker.rollback()
        blocker.close()

    reserved = bus.wait_result(placed["id"], "inventory.reserved", timeout=30)
    assert reserved["data"]["lines"] == [{"product_id": b, "quantity": 1}, {"product_id": a, "quantity": 2}]
    assert figures(settings, [a, b]) == {a: (5, 2), b: (5, 1)}
    deadline = time.monotonic() + 20
    while _deadlocks(settings) <= deadlocks_before:  # statistics are flushed lazily
        assert time.monotonic() < deadline, "PostgreSQL recorded no deadlock: the test proved nothing"
        time.sleep(0.5)
    assert len([r for r in bus.results_for(placed["id"]) if r["type"] == "inventory.reserved"]) == 1


@pytest.fixture(autouse=True)
def _no_stray_children():
    yield
    for p in CTX.active_children():  # a failed race must not leave processes behind
        p.kill()
        p.join()


def test_the_same_event_applied_by_two_transactions_at_once_counts_once(settings):
    """A redelivery racing its original (two consumers, one message id) where no product lock
    orders them: the second transaction waits on the order row, then finds the id taken when it
    writes its idempotency keys and rolls back with a serialization failure; applied again
    (as the worker retries transient errors), the event is a duplicate. One tombstone, one key."""
    import threading

    order = uid("O")
    event = ev("order.cancelled", {"order_id": order})
    first = psycopg2.connect(**settings.database.dsn())
    second = Store(settings.database)
    try:
        with first.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            first_pid = cur.fetchone()[0]
            cur.execute("SELECT apply_events(%s::jsonb)", (json.dumps([event]),))
            assert cur.fetchone()[0][0]["outcome"] == "cancel_recorded"
        errors: list[Exception] = []
        t = threading.Thread(target=lambda: _capture(errors, second.apply_batch, [event]))
        t.start()
        wait_for_lock_waiter(settings, first_pid)  # the second waits on the orders row
        first.commit()
        t.join(30)
        assert len(errors) == 1 and isinstance(errors[0], TransientError), errors
        assert "SerializationFailure" in str(errors[0])
        [again] = second.apply_batch([event])  # the worker's retry
        assert again.outcome == "duplicate" and again.messages == []
        with pg(settings) as cur:
            cur.execute("SELECT count(*) FROM processed_events WHERE event_id = %s", (event["id"],))
            assert cur.fetchone()[0] == 1
            cur.execute("SELECT status FROM orders WHERE order_id = %s", (order,))
            assert cur.fetchall() == [("cancelled",)]
            cur.execute("SELECT count(*) FROM outbox WHERE body->>'causation_id' = %s", (event["id"],))
            assert cur.fetchone()[0] == 0
    finally:
        first.close()
        second.close()


def _capture(errors: list[Exception], fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except Exception as exc:  # the assertion is in the test
        errors.append(exc)
