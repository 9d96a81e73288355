"""The same event, or the same order, applied by two transactions at once.

apply_events() looks up which events are new, then applies them. A redelivery racing its
original (two processes, each holding one copy) or two messages placing one order can both
pass that look-up before either commits; the one that commits second must be undone whole and
retried (the worker retries a serialization failure), and the retry finds the duplicate. These
tests hold the first transaction open until the second is waiting on it, then commit it.
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import psycopg2
import psycopg2.errors
import pytest

from ..private_stack import all_figures, apply, private_settings
from ..support import uid


@pytest.fixture(scope="module")
def db(settings):
    with private_settings(settings, "dups") as s:
        yield s


def _apply_events(cur, events):
    cur.execute("SELECT apply_events(%s::jsonb, 900)", (json.dumps(events),))
    return cur.fetchone()[0]


def _ev(type_, data, event_id=None):
    return {"id": event_id or str(uuid.uuid4()), "type": type_, "data": data}


def _waits_on_lock(admin, pid, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        admin.execute("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s", (pid,))
        row = admin.fetchone()
        if row and row[0]:
            return True
        time.sleep(0.01)
    return False


def _race(db, first_events, second_events):
    """Applies first_events in a transaction left open, then second_events in another, which
    waits on the first; commits the first. Returns (first results, second's error or results)."""
    a, b, admin = (psycopg2.connect(**db.database.dsn()) for _ in range(3))
    admin.autocommit = True
    try:
        first = _apply_events(a.cursor(), first_events)  # open: not committed yet
        outcome: dict[str, object] = {}

        def second():
            try:
                with b.cursor() as cur:
                    outcome["results"] = _apply_events(cur, second_events)
                b.commit()
            except psycopg2.Error as exc:
                b.rollback()
                outcome["error"] = exc

        t = threading.Thread(target=second, daemon=True)
        t.start()
        assert _waits_on_lock(admin.cursor(), b.get_backend_pid()), "the second never waited on the first"
        a.commit()
        t.join(10)
        assert not t.is_alive()
        return first, outcome.get("error", outcome.get("results"))
    finally:
        for c in (a, b, admin):
            c.close()


def test_an_event_applied_twice_at_once_is_undone_and_then_a_duplicate(db):
    # location.configured locks no product: both copies pass the look-up before either commits.
    loc = uid("L")
    event = _ev("location.configured", {"location_id": loc, "priority": 3})
    first, second = _race(db, [event], [event])
    assert first[0]["outcome"] == "configured"
    assert isinstance(second, psycopg2.errors.SerializationFailure), second
    assert "applied concurrently" in str(second)
    conn = psycopg2.connect(**db.database.dsn())
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            assert _apply_events(cur, [event])[0]["outcome"] == "duplicate"  # the worker's retry
            cur.execute("SELECT count(*) FROM processed_events WHERE event_id = %s", (event["id"],))
            assert cur.fetchone()[0] == 1
            cur.execute("SELECT count(*) FROM outbox WHERE body->>'causation_id' = %s", (event["id"],))
            assert cur.fetchone()[0] == 1  # location.configured: one result, written once
    finally:
        conn.close()


def test_one_order_placed_by_two_runs_at_once_is_reserved_once(db):
    # Two runs of order.placed (set-based) naming the same order on disjoint products: the
    # second passes its look-up of stored orders before the first commits.
    p1, p2, p3, p4 = (uid("DUP") for _ in range(4))
    conn = psycopg2.connect(**db.database.dsn())
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for p in (p1, p2, p3, p4):
                apply(cur, "stock.adjusted", {"product_id": p, "on_hand": 10})
    finally:
        conn.close()
    shared, other_a, other_b = uid("o"), uid("o"), uid("o")

    def placed(order, product):
        return _ev("order.placed", {"order_id": order, "lines": [{"product_id": product, "quantity": 2}]})

    first, second = _race(
        db,
        [placed(shared, p1), placed(other_a, p2)],
        [placed(shared, p3), placed(other_b, p4)],
    )
    assert [r["outcome"] for r in first] == ["reserved", "reserved"]
    assert isinstance(second, psycopg2.errors.SerializationFailure), second
    assert "placed concurrently" in str(second)
    # Undone whole: the second run's other order and products are untouched.
    assert all_figures(db, [p1, p2, p3, p4]) == {p1: (10, 2), p2: (10, 2), p3: (10, 0), p4: (10, 0)}
    # The worker's retry: the shared order is a duplicate, the other one reserved.
    conn = psycopg2.connect(**db.database.dsn())
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            retry = _apply_events(cur, [placed(shared, p3), placed(other_b, p4)])
    finally:
        conn.close()
    assert [r["outcome"] for r in retry] == ["duplicate_order", "reserved"]
    assert all_figures(db, [p1, p2, p3, p4]) == {p1: (10, 2), p2: (10, 2), p3: (10, 0), p4: (10, 2)}
