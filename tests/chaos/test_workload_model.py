"""The chaos model's backorder replay, without services: it must be able to fail.

The replay (workload.py) applies a round's events on backorder products and every fill in the
order the worker applied them; these feed it outbox rows by hand, as the runner reads them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from .workload import Workload


def _model() -> tuple[Workload, str]:
    wl = Workload(1)
    wl.setup_rounds()  # the model's figures are set as the setup is generated
    k = wl.bo_ids[0]  # allow, limit 12
    p = wl.products[k]
    p.levels["default"].on_hand, p.levels["east"].on_hand = 3, 1
    return wl, k


def _rows(wl: Workload, first: int = 1) -> list[tuple[int, dict[str, Any]]]:
    """One result per pending event, in the order they were generated."""
    return [
        (first + i, {"id": f"m{i}", "type": "inventory.reserved", "causation_id": op.eid, "data": {}})
        for i, op in enumerate(wl.bo_pending)
    ]


def _fill(oid: str, k: str, lines: list[tuple[str, int]], remaining: int) -> dict[str, Any]:
    return {
        "id": f"fill-{oid}-{lines}",
        "type": "inventory.backorder_filled",
        "causation_id": "sweeper",
        "data": {
            "order_id": oid,
            "lines": [{"product_id": k, "location_id": loc, "quantity": n} for loc, n in lines],
            "backordered_remaining": [{"product_id": k, "quantity": remaining}] if remaining else [],
        },
    }


def test_a_placement_is_held_level_by_level_and_the_rest_backordered() -> None:
    wl, k = _model()
    wl._bo_place({k: 6})
    (oid,) = [o for o, x in wl.orders.items() if x.backorder and x.placed_id]
    eid = wl.orders[oid].placed_id
    wl.replay(_rows(wl), {oid: datetime.now(UTC)})
    assert not wl.replay_problems, wl.replay_problems
    o, e = wl.orders[oid], wl.expect[eid]
    assert (o.alloc[k], o.bo[k], wl.products[k].backordered) == ({"default": 3, "east": 1}, 2, 2)
    assert e.results == [("inventory.reserved", ""), ("inventory.allocated", "")]
    assert e.allocated["lines"][0]["backordered"] == 2  # type: ignore[index]


def test_a_fill_that_overtakes_an_older_order_or_takes_what_was_not_there_fails() -> None:
    wl, k = _model()
    wl._bo_place({k: 6})  # holds 4, backorders 2
    wl._bo_place({k: 3})  # backorders 3
    older, younger = [o for o, x in wl.orders.items() if x.backorder and x.placed_id]
    t = datetime.now(UTC)
    wl.replay(_rows(wl), {older: t, younger: t + timedelta(seconds=1)})
    assert not wl.replay_problems, wl.replay_problems
    wl.products[k].levels["default"].on_hand += 2  # two units arrive (the model's own event aside)
    wl.replay([(10, _fill(younger, k, [("default", 2)], 1))], {})
    assert any(p.startswith(f"FIFO: {younger}") for p in wl.replay_problems), wl.replay_problems

    wl, k = _model()
    wl._bo_place({k: 6})
    (oid,) = [o for o, x in wl.orders.items() if x.backorder and x.placed_id]
    wl.replay(_rows(wl), {oid: t})
    wl.replay([(10, _fill(oid, k, [("default", 1)], 1))], {})  # nothing had arrived
    assert any("the levels then gave []" in p for p in wl.replay_problems), wl.replay_problems
