"""A batch gives exactly what its events give one by one.

apply_events() takes shortcuts for speed (a run of order.placed events in a few set-based
statements, idempotency keys and outbox rows written at the end of the batch); the rules say a
batch is only a faster way to apply its events in order. Hypothesis makes random sequences of
events over a few products and orders (sell-outs, repeated order ids, cancels before and after
placing, runs of completions, duplicates, low-stock thresholds), applies each sequence twice under two
fresh sets of ids, once as one batch and once one event per transaction, and compares
everything: outcomes, result events, figures after each event, final figures, the ledger.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from inventory_worker.adapters.postgres import Store

from ..support import pg

PRODUCTS = ["P1", "P2", "P3"]
ORDERS = [f"O{i}" for i in range(1, 11)]
# Locations and a channel (created by the `places` fixture, shared by every example): orders
# with a channel or pinned lines, and stock at other levels, go one by one; they must mix
# with the set-based runs of default-only orders exactly as one by one.
LOCATIONS = ["EQ-A", "EQ-B"]
CHANNEL = "EQ-C"

quantity = st.integers(1, 4)
placed = st.builds(
    lambda order, picked, qtys, ttl: (
        "order.placed",
        {
            "order_id": order,
            "lines": [{"product_id": p, "quantity": q} for p, q in zip(picked, qtys, strict=False)],
            **({"reservation_ttl_seconds": ttl} if ttl else {}),
        },
    ),
    st.sampled_from(ORDERS),
    st.lists(st.sampled_from(PRODUCTS), min_size=1, max_size=3, unique=True),
    st.lists(quantity, min_size=3, max_size=3),
    st.sampled_from([None, 60]),
)
placed_at_locations = st.builds(
    lambda order, picked, qtys, pins, channel: (
        "order.placed",
        {
            "order_id": order,
            "lines": [
                {"product_id": p, "quantity": q, **({"location_id": pin} if pin else {})}
                for p, q, pin in zip(picked, qtys, pins, strict=False)
            ],
            **({"channel_id": channel} if channel else {}),
        },
    ),
    st.sampled_from(ORDERS),
    st.lists(st.sampled_from(PRODUCTS), min_size=1, max_size=3, unique=True),
    st.lists(quantity, min_size=3, max_size=3),
    st.lists(st.sampled_from([None, None, None, "default", *LOCATIONS]), min_size=3, max_size=3),
    st.sampled_from([None, None, "default", CHANNEL]),
)
adjusted_elsewhere = st.builds(
    lambda p, loc, d: ("stock.adjusted", {"product_id": p, "location_id": loc, "delta": d}),
    st.sampled_from(PRODUCTS),
    st.sampled_from(LOCATIONS),
    st.integers(0, 8),
)
adjusted = st.one_of(
    st.builds(
        lambda p, d, t: (
            "stock.adjusted",
            {"product_id": p, "delta": d, **({"low_stock_threshold": t} if t is not None else {})},
        ),
        st.sampled_from(PRODUCTS),
        st.integers(-3, 8),
        st.sampled_from([None, 0, 2, 5]),
    ),
    st.builds(
        lambda p, n: ("stock.adjusted", {"product_id": p, "on_hand": n}),
        st.sampled_from(PRODUCTS),
        st.integers(0, 10),
    ),
)
order_event = st.builds(
    lambda t, o: (t, {"order_id": o}),
    st.sampled_from(["order.cancelled", "order.completed"]),
    st.sampled_from(ORDERS),
)
# Mostly order.placed, so that runs of them (the set-based path) are common, on stock that
# runs out now and then; and bursts of completions, so that runs of those are common too.
an_event = st.one_of(
    placed,
    placed,
    placed,
    placed,
    placed,
    adjusted,
    adjusted,
    order_event,
    placed_at_locations,
    adjusted_elsewhere,
)
completions = st.lists(st.sampled_from(ORDERS), min_size=2, max_size=4).map(
    lambda orders: [("order.completed", {"order_id": o}) for o in orders]
)
# Orders placed and then completed together: runs of completions of reserved orders.
place_then_complete = st.builds(
    lambda orders, p, q: (
        [("stock.adjusted", {"product_id": p, "delta": 6})]
        + [("order.placed", {"order_id": o, "lines": [{"product_id": p, "quantity": q}]}) for o in orders]
        + [("order.completed", {"order_id": o}) for o in orders]
    ),
    st.lists(st.sampled_from(ORDERS), min_size=2, max_size=4, unique=True),
    st.sampled_from(PRODUCTS),
    quantity,
)
chunk = st.one_of(
    an_event.map(lambda e: [e]),
    an_event.map(lambda e: [e]),
    an_event.map(lambda e: [e]),
    completions,
    place_then_complete,
)
# (event, d): d == 0 makes a duplicate of an earlier event (same id and body), d == 12 the event
# under an earlier event's id (id_reused, unless it happens to carry the same content).
sequences = st.lists(st.tuples(chunk, st.integers(0, 12)), min_size=1, max_size=20).map(
    lambda chunks: [(e, d if i == 0 else 1) for events, d in chunks for i, e in enumerate(events)]
)


def namespaced(seq, ns: str) -> list[dict[str, Any]]:
    """The sequence under the ids of namespace ns, with its duplicates and reused ids."""
    events: list[dict[str, Any]] = []
    for (type_, data), dup in seq:
        if dup == 0 and events:
            events.append(events[len(events) // 2])
            continue
        body = json.loads(json.dumps(data).replace('"P', f'"{ns}P').replace('"O', f'"{ns}O'))
        reused = events[len(events) // 2]["id"] if dup == 12 and events else None
        events.append({"id": reused or str(uuid.uuid4()), "type": type_, "data": body})
    return events


def normal(value: Any, ns: str, ids: dict[str, int]) -> Any:
    """Ids and clocks out, namespace out: what must be equal between the two runs."""
    text = json.dumps(value, sort_keys=True)
    for event_id, i in ids.items():
        text = text.replace(event_id, f"event-{i}")
    out = json.loads(text.replace(ns, ""))

    def strip(v: Any) -> Any:
        if isinstance(v, dict):
            return {
                k: strip(x)
                for k, x in v.items()
                if k not in ("id", "message_id", "outbox_id", "occurred_at", "expires_at")
            }
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v

    return strip(out)


def observe(
    settings, store: Store, events: list[dict[str, Any]], ns: str, one_by_one: bool
) -> dict[str, Any]:
    if one_by_one:
        results = [r for e in events for r in store.apply_batch([e])]
    else:
        results = store.apply_batch(events)
    ids = {}
    for i, e in enumerate(events):
        ids.setdefault(e["id"], i)
    with pg(settings) as cur:
        cur.execute(
            "SELECT product_figures(p) FROM products p WHERE product_id LIKE %s ORDER BY product_id",
            (ns + "%",),
        )
        figures = [r[0] for r in cur.fetchall()]
        cur.execute(
            "SELECT product_id, location_id, order_id, event_id::text, on_hand_delta, reserved_delta,"
            "       reason, note FROM stock_movements WHERE product_id LIKE %s ORDER BY id",
            (ns + "%",),
        )
        ledger = [list(r) for r in cur.fetchall()]
        cur.execute(
            "SELECT product_id, location_id, on_hand, reserved FROM stock_levels WHERE product_id LIKE %s"
            " ORDER BY 1, 2",
            (ns + "%",),
        )
        levels = cur.fetchall()
        cur.execute(
            "SELECT order_id, product_id, location_id, position, reserved, fulfilled FROM order_allocations"
            " WHERE order_id LIKE %s ORDER BY 1, 2, 4",
            (ns + "%",),
        )
        allocations = cur.fetchall()
        cur.execute(
            "SELECT order_id, status, allocated, channel_id FROM orders WHERE order_id LIKE %s"
            " ORDER BY order_id",
            (ns + "%",),
        )
        orders = cur.fetchall()
        cur.execute(
            "SELECT order_id, product_id, line_no, quantity, tracked, fulfilled, released FROM order_lines"
            " WHERE order_id LIKE %s"
            " ORDER BY order_id, product_id",
            (ns + "%",),
        )
        lines = cur.fetchall()
        cur.execute("SELECT count(*) FROM outbox WHERE (body->>'causation_id') = ANY(%s)", (list(ids),))
        outbox = cur.fetchone()[0]
    return normal(
        {
            "results": [
                {
                    "outcome": r.outcome,
                    "order_id": r.order_id,
                    "detail": r.detail,
                    "products": r.products,
                    "messages": [m.body for m in r.messages],
                }
                for r in results
            ],
            "figures": figures,
            "ledger": ledger,
            "orders": orders,
            "lines": lines,
            "levels": levels,
            "allocations": allocations,
            "outbox_rows": outbox,
            "messages": sum(len(r.messages) for r in results),
        },
        ns,
        ids,
    )


@pytest.fixture(scope="module")
def store(settings):
    s = Store(settings.database, settings.worker.default_reservation_ttl_seconds)
    yield s
    s.close()


@pytest.fixture(scope="module")
def places(settings):
    with pg(settings) as cur:
        for i, loc in enumerate(LOCATIONS):
            cur.execute(
                "INSERT INTO locations (location_id, priority) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                (loc, i + 1),
            )
        cur.execute(
            "INSERT INTO channels (channel_id, strategy, locations) VALUES (%s, 'most_available', %s)"
            " ON CONFLICT DO NOTHING",
            (CHANNEL, [LOCATIONS[1], "default", LOCATIONS[0]]),
        )


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seq=sequences)
def test_a_batch_gives_what_its_events_give_one_by_one(settings, store, places, seq):
    run = uuid.uuid4().hex[:8]
    a, b = f"a{run}-", f"b{run}-"
    batched = observe(settings, store, namespaced(seq, a), a, one_by_one=False)
    single = observe(settings, store, namespaced(seq, b), b, one_by_one=True)
    assert batched == single
    assert batched["outbox_rows"] == batched["messages"]  # every result event is in the outbox


def test_a_run_of_orders_that_fits_the_stock_is_applied_in_one_go(settings, store):
    """The set-based path is taken (and gives running figures) when the stock suffices."""
    ns = f"r{uuid.uuid4().hex[:8]}-"
    seq = [(("stock.adjusted", {"product_id": "P1", "delta": 10, "low_stock_threshold": 6}), 1)] + [
        (
            (
                "order.placed",
                {
                    "order_id": f"O{i}",
                    "lines": [{"product_id": "P1", "quantity": 1}, {"product_id": "P2", "quantity": 2}],
                },
            ),
            1,
        )
        for i in range(5)
    ]
    events = namespaced([(("stock.adjusted", {"product_id": "P2", "on_hand": 20}), 1)] + seq, ns)
    results = store.apply_batch(events)
    assert [r.outcome for r in results] == ["adjusted", "adjusted"] + ["reserved"] * 5
    # figures right after each order, as one by one: P1 reserved 1..5, versions 2..6
    assert [
        [(f["product_id"][len(ns) :], f["reserved"], f["available"], f["version"]) for f in r.products]
        for r in results[2:]
    ] == [[("P1", i, 10 - i, i + 1), ("P2", 2 * i, 20 - 2 * i, i + 1)] for i in range(1, 6)]
    # available 10 -> 5 crosses the threshold 6 once, at the 4th order (available 6)
    low = [
        (i, m.body["data"]["available"])
        for i, r in enumerate(results)
        for m in r.messages
        if m.routing_key == "inventory.low_stock"
    ]
    assert low == [(5, 6)]


def test_runs_take_the_set_based_path_when_they_can(settings):
    """The shortcut is really taken (else the equivalence above would hold trivially): a run
    of placements that fits the stock, then a run of completions, call place_orders() and
    complete_orders() once each and the one-by-one functions never; so does a sell-out; an
    order on a channel sends its run one by one."""
    ns = f"s{uuid.uuid4().hex[:8]}-"
    events = namespaced(
        [
            (("stock.adjusted", {"product_id": "P1", "on_hand": 10}), 1),
            (("stock.adjusted", {"product_id": "P2", "on_hand": 10}), 1),
        ]
        + [
            (
                (
                    "order.placed",
                    {
                        "order_id": f"O{i}",
                        "lines": [{"product_id": "P1", "quantity": 2}, {"product_id": "P2", "quantity": 1}],
                    },
                ),
                1,
            )
            for i in range(3)
        ]
        + [(("order.completed", {"order_id": f"O{i}"}), 1) for i in range(3)],
        ns,
    )

    def calls(cur) -> dict[str, int]:
        cur.execute(
            "SELECT f, coalesce(pg_stat_get_xact_function_calls(f::regproc), 0) FROM unnest(%s) f",
            (["place_orders", "place_order", "complete_orders", "complete_order"],),
        )
        return dict(cur.fetchall())

    with pg(settings) as cur:
        cur.execute("BEGIN; SET LOCAL track_functions = 'all'")  # calls counted in this transaction
        cur.execute("SELECT apply_events(%s::jsonb)", (json.dumps(events),))
        results = cur.fetchone()[0]
        assert calls(cur) == {"place_orders": 1, "place_order": 0, "complete_orders": 1, "complete_order": 0}
        cur.execute("COMMIT")
    assert [r["outcome"] for r in results] == ["adjusted"] * 2 + ["reserved"] * 3 + ["committed"] * 3
    # after each completion: P1 on_hand 8, 6, 4 with reserved 4, 2, 0; versions continue from 4
    assert [[(f["on_hand"], f["reserved"], f["version"]) for f in r["products"]][0] for r in results[5:]] == [
        (8, 4, 5),
        (6, 2, 6),
        (4, 0, 7),
    ]
    # a sell-out: 4 orders of 3 on 10 units, the last rejected, still in one go; with an
    # order on a channel among them the run goes one by one
    sold = namespaced(
        [(("stock.adjusted", {"product_id": "P9", "on_hand": 10}), 1)]
        + [
            (("order.placed", {"order_id": f"O9{i}", "lines": [{"product_id": "P9", "quantity": 3}]}), 1)
            for i in range(4)
        ],
        ns,
    )
    with pg(settings) as cur:
        cur.execute("BEGIN; SET LOCAL track_functions = 'all'")
        cur.execute("SELECT apply_events(%s::jsonb)", (json.dumps(sold),))
        assert [r["outcome"] for r in cur.fetchone()[0]] == ["adjusted"] + ["reserved"] * 3 + ["rejected"]
        assert calls(cur)["place_orders"] == 1 and calls(cur)["place_order"] == 0
        cur.execute("COMMIT")
    mixed = namespaced(
        [
            (("order.placed", {"order_id": f"O8{i}", "lines": [{"product_id": "P1", "quantity": 1}]}), 1)
            for i in range(2)
        ]
        + [
            (
                (
                    "order.placed",
                    {
                        "order_id": "O82",
                        "channel_id": "default",
                        "lines": [{"product_id": "P1", "quantity": 1}],
                    },
                ),
                1,
            )
        ],
        ns,
    )
    with pg(settings) as cur:
        cur.execute("BEGIN; SET LOCAL track_functions = 'all'")
        cur.execute("SELECT apply_events(%s::jsonb)", (json.dumps(mixed),))
        assert [r["outcome"] for r in cur.fetchone()[0]] == ["reserved"] * 3
        assert calls(cur)["place_order"] == 3
        cur.execute("COMMIT")
