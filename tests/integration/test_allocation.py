"""allocation_plan(): where an order's tracked lines are held, per strategy (spec 4.1).

The function is pure (its arguments in, a plan out), so it is called directly here; the
placing of orders over locations is tested through events in test_locations_orders.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from ..support import pg


def plan(
    settings, lines: list[tuple], locations: list[str], units: dict[str, dict[str, int]], strategy: str
) -> list[tuple[str, list[tuple[str, int]], int]]:
    """[(product_id, [(location_id, quantity)...], shortfall)] per line; a line is
    (product_id, quantity) or (product_id, quantity, pinned location)."""
    js = [
        {"product_id": x[0], "quantity": x[1], **({"location_id": x[2]} if len(x) > 2 else {})} for x in lines
    ]
    with pg(settings) as cur:
        cur.execute(
            "SELECT allocation_plan(%s::jsonb, %s::text[], %s::jsonb, %s)",
            (json.dumps(js), locations, json.dumps(units), strategy),
        )
        out: list[dict[str, Any]] = cur.fetchone()[0]
    assert [(o["product_id"], o["quantity"], o["location_id"]) for o in out] == [
        (x[0], x[1], x[2] if len(x) > 2 else None) for x in lines
    ]
    return [
        (o["product_id"], [(a["location_id"], a["quantity"]) for a in o["allocations"]], o["shortfall"])
        for o in out
    ]


# ---- acceptance check 2 ---------------------------------------------------------------------


def test_priority_walks_the_channel_order(settings):
    assert plan(settings, [("P", 7)], ["A", "B"], {"P": {"A": 5, "B": 5}}, "priority") == [
        ("P", [("A", 5), ("B", 2)], 0)
    ]


def test_most_available_takes_the_fullest_location_first(settings):
    assert plan(settings, [("P", 7)], ["A", "B"], {"P": {"A": 3, "B": 5}}, "most_available") == [
        ("P", [("B", 5), ("A", 2)], 0)
    ]


def test_fewest_locations_takes_one_location_that_holds_the_order(settings):
    assert plan(settings, [("P", 7)], ["A", "B"], {"P": {"A": 3, "B": 7}}, "fewest_locations") == [
        ("P", [("B", 7)], 0)
    ]


def test_single_location_never_splits(settings):
    # A whole location exists: the first such.
    assert plan(
        settings,
        [("P", 3), ("Q", 1)],
        ["A", "B", "C"],
        {"P": {"A": 5, "B": 3, "C": 9}, "Q": {"A": 0, "B": 1, "C": 1}},
        "single_location",
    ) == [("P", [("B", 3)], 0), ("Q", [("B", 1)], 0)]
    # None: the one holding the most serves what it can, nothing elsewhere (shortfall stays).
    assert plan(settings, [("P", 7)], ["A", "B"], {"P": {"A": 5, "B": 5}}, "single_location") == [
        ("P", [("A", 5)], 2)
    ]
    assert plan(
        settings,
        [("P", 4), ("Q", 4)],
        ["A", "B"],
        {"P": {"A": 4, "B": 3}, "Q": {"A": 0, "B": 3}},
        "single_location",
    ) == [("P", [("B", 3)], 1), ("Q", [("B", 3)], 1)]


# ---- the rest of the rules ------------------------------------------------------------------


def test_shortfall_is_what_no_location_covers(settings):
    for strategy in ("priority", "most_available", "fewest_locations"):
        assert plan(settings, [("P", 12)], ["A", "B"], {"P": {"A": 5, "B": 4}}, strategy)[0][2] == 3
    assert plan(settings, [("P", 2)], ["A"], {}, "priority") == [("P", [], 2)]
    assert plan(settings, [("P", 2)], [], {"P": {"A": 9}}, "priority") == [("P", [], 2)]


def test_pinned_lines_take_only_at_their_location(settings):
    units = {"P": {"A": 5, "B": 5}, "Q": {"A": 5, "B": 5}}
    for strategy in ("priority", "most_available", "fewest_locations", "single_location"):
        assert plan(settings, [("P", 7, "B"), ("Q", 2)], ["A", "B"], units, strategy)[0] == (
            "P",
            [("B", 5)],
            2,
        )
    # A pin outside E gets nothing (the caller refuses it as location_unavailable first).
    assert plan(settings, [("P", 1, "Z")], ["A"], {"P": {"A": 5, "Z": 5}}, "priority") == [("P", [], 1)]
    # Pinned lines do not count in choosing the single location of the others.
    assert plan(
        settings,
        [("P", 5, "A"), ("Q", 2)],
        ["A", "B"],
        {"P": {"A": 5}, "Q": {"A": 1, "B": 2}},
        "single_location",
    ) == [("P", [("A", 5)], 0), ("Q", [("B", 2)], 0)]


def test_ties_go_to_the_earlier_location_in_channel_order(settings):
    units = {"P": {"A": 5, "B": 5}}
    assert plan(settings, [("P", 5)], ["B", "A"], units, "most_available") == [("P", [("B", 5)], 0)]
    assert plan(settings, [("P", 5)], ["B", "A"], units, "fewest_locations") == [("P", [("B", 5)], 0)]
    assert plan(settings, [("P", 5)], ["B", "A"], units, "single_location") == [("P", [("B", 5)], 0)]
    assert plan(settings, [("P", 7)], ["B", "A"], units, "priority") == [("P", [("B", 5), ("A", 2)], 0)]


def test_fewest_locations_greedy_when_no_location_holds_everything(settings):
    # No location holds both lines whole; C holds the most (3 + 2), then A covers P's rest and
    # B is never used.
    units = {"P": {"A": 4, "B": 1, "C": 3}, "Q": {"A": 0, "B": 2, "C": 2}}
    assert plan(settings, [("P", 4), ("Q", 2)], ["A", "B", "C"], units, "fewest_locations") == [
        ("P", [("C", 3), ("A", 1)], 0),
        ("Q", [("C", 2)], 0),
    ]


def test_most_available_orders_per_line(settings):
    units = {"P": {"A": 1, "B": 9}, "Q": {"A": 9, "B": 1}}
    assert plan(settings, [("P", 10), ("Q", 10)], ["A", "B"], units, "most_available") == [
        ("P", [("B", 9), ("A", 1)], 0),
        ("Q", [("A", 9), ("B", 1)], 0),
    ]


def test_negative_units_count_as_none(settings):
    assert plan(settings, [("P", 2)], ["A", "B"], {"P": {"A": -3, "B": 2}}, "priority") == [
        ("P", [("B", 2)], 0)
    ]


def test_unknown_strategy_is_refused(settings):
    with pytest.raises(Exception, match="unknown allocation strategy"):
        plan(settings, [("P", 1)], ["A"], {}, "nearest")
