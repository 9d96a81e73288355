"""A seeded workload of order events and the independent model of what it must do to stock.

The model follows the documented semantics (docs/contract.md "Semantics", sql/procedures/)
and is computed only from what is published, never from the worker's tables.

Why the model is determined although several processes consume concurrently
---------------------------------------------------------------------------
The workload is published in ROUNDS; round k+1 is published only once every event of round k
has been applied (its id is in processed_events: used as a barrier only, never as a figure).
Within a round, events are shuffled and every one is published twice, so their order of
application is arbitrary; the generator makes their outcomes independent of that order:
  - an order has at most one event per round (its events are sequenced across rounds, which
    is also how the "reordered" share is made: cancel or complete published rounds BEFORE the
    placement);
  - a product is either adjusted in a round or touched by orders in it, never both;
  - a placement meant to succeed fits in the product's WORST-CASE availability (on_hand minus
    every reservation, short-TTL ones counted as still held) minus the other placements of the
    round meant to succeed; one meant to fail asks for more than on_hand at the start of the
    round (commits only lower it: an upper bound of what can be available in the round), or
    names a product that does not exist;
  - short-TTL reservations expire at a time the model does not know: they are never cancelled
    (released vs expired would depend on timing); an adjustment goes either to at least every
    reservation (accepted whether or not they expired) or below the firm ones (refused either
    way); completing one commits whether it expired first or not (the stock is
    still there: placements never count on it), so only the optional `inventory.expired` before
    the `inventory.committed` depends on timing, and the check allows exactly that.
Locations, channels and the stock messages of "stock across locations" keep it determined too:
  - locations `east` (priority 5) and `west` (priority 10) beside `default`, and channel `web`
    (explicit list west, east; strategy priority) are configured before any stock names them;
    the model keeps every level (on_hand, damaged, quality_control, incoming, firm and short
    holds) and every order's allocation per location;
  - a placement's line is planned whole at its pin or at its channel's first location and fits
    that level's worst-case availability (so `priority` puts it there whatever the order of the
    round): the model predicts `inventory.allocated` exactly; a SPLIT placement is the only
    event of its round on its product, which has no short holds: every level's availability is
    then exact and the split (all of the first location, the rest at the second) is predicted;
  - transfers (in transit or not), receipts, state moves, level adjustments and bulk `items`
    (atomic or not, with a failing item or without) belong to the adjusted products of the
    round: one such event per product, each accepted or refused for sure (accepted within the
    worst case, refused beyond the best case);
  - compare-and-set counts RACE orders: a count at `east`/`west` with `change_from` = the level's
    on_hand at the start of the round, among placements and cancels (which do not change
    on_hand; its target keeps every planned hold valid) and either one completion holding that
    level (changes on_hand: the count is applied if it ran first, else `stale`) or a second
    count with the same `change_from` (exactly one applied). The model cannot know the order,
    so it resolves each race after the round from the count's own result event (applied or
    stale) and from it alone derives the level's figure; it then checks that event's figures
    (`location.on_hand` = the target, or `current` = what the other side left), so the model
    stays exact: each interleaving has one legal result and the events must show one of them.
Orders as they really go (Part B) on plain products stay exact the same way: a shipment
(order.fulfilled) or a partial cancel concerns an order with no other event in its round and
takes or frees units where the model says (allocation order, reverse allocation order); a return
is placed first in its round and its products are left to it (it raises on_hand). Two kinds of
event race on purpose and are resolved after the round:
  - reservation.extended of a short hold against the sweeper: extended, extension_limit (so
    early that its seconds end before the deadline) or reservation_expired, read from its own
    result; until_fulfilled applied makes the hold a long one from then on;
  - everything on the BACKORDER products (BACKORDER_POLICIES: allow with or without a limit,
    until passed, incoming), which only default-channel orders of their own touch. Whether an
    order is placed is sure: the round's orders fit together in available + headroom at the
    round's start (a fill moves units from one to the other; arrivals and releases add), and
    one meant to fail asks for more than every unit that can be there plus the most that can be
    promised. Where it is held, what it backorders, which fills happen (in the same transaction
    or the sweeper's pass) and where a shipment leaves from depend on the order of application.
    The runner waits until no fill is left to do, then replay() takes the round's events on
    these products and every inventory.backorder_filled since the last round in outbox id order
    (every message about a product is written under its row lock: the order they were applied
    in) and applies them one by one: a placement's allocation is predicted exactly (each level
    of the default channel in order, the rest backordered within the headroom), each fill is
    checked (FIFO by created_at, order_id among orders already placed; each level giving what it
    had; backordered_remaining), a completion of an order still backordered is committed or
    refused backorder_pending as its place says; then the runner compares these products'
    figures with PostgreSQL.
Duplicates may be delayed to later rounds: the copy is absorbed by the message id whenever it
arrives. `inventory.low_stock` depends on the order inside a round and is not checked;
`inventory.back_in_stock` (decision 13.7: `available` from 0 to above it, any cause, the sweeper
included) does too, and is only checked to come from an event that can raise `available`.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

SHORT_TTL_CHOICES = (1, 2, 3)
MAX_QTY = 1_000_000
LOCATIONS = {"east": 5, "west": 10}  # configured beside `default` (priority 0)
CHAINS: dict[str | None, list[str]] = {
    None: ["default", "east", "west"],  # the default channel
    "web": ["west", "east"],
}
UNKNOWN_LOCATION = "nowhere"  # never configured
UNLIMITED = 10**9
FUTURE, PAST = "2099-01-01T00:00:00Z", "2020-01-01T00:00:00+00:00"
# Backorder products (Part B): (mode, limit, until). Every one is multi-location (default and
# east) and is placed on through the default channel only (so a fill can take any level).
BACKORDER_POLICIES: list[tuple[str, int | None, str | None]] = [
    ("allow", 12, None),
    ("allow", 20, FUTURE),
    ("allow", 8, None),
    ("allow", None, None),
    ("allow", 10, PAST),  # `until` passed: behaves as deny
    ("incoming", 15, None),
    ("incoming", None, FUTURE),
    ("allow", 30, FUTURE),
]
CONDITIONS = ("sellable", "damaged", "quality_control", "disposed")


@dataclass
class Msg:
    """One message to publish (each is published at least twice)."""

    routing_key: str
    body: bytes
    message_id: str  # the event id, or a marker id for a poison message
    poison: bool = False
    event: dict[str, Any] | None = None


@dataclass
class Expect:
    """What one input event must produce: result types (with reasons), as a sorted list."""

    results: list[tuple[str, str]]
    optional: list[tuple[str, str]] = field(default_factory=list)  # may or may not appear
    order_id: str | None = None
    product_id: str | None = None
    must_short: set[str] = field(default_factory=set)  # products that must be among the shortages
    # (result type, bulk index or None, fields the result's data must hold; dicts compared as subsets)
    data: list[tuple[str, int | None, dict[str, Any]]] = field(default_factory=list)
    allocated: dict[str, Any] | None = None  # the exact inventory.allocated data (lines sorted)


@dataclass
class Level:
    on_hand: int = 0
    damaged: int = 0
    quality_control: int = 0
    incoming: int = 0
    firm: int = 0  # reserved by orders that cannot expire during the run
    expirable: dict[str, int] = field(default_factory=dict)  # short-TTL order -> quantity

    @property
    def sellable(self) -> int:
        return self.on_hand - self.damaged - self.quality_control

    @property
    def worst_free(self) -> int:
        """Available for sure: every short hold counted as still held."""
        return self.sellable - self.firm - sum(self.expirable.values())

    def figures(self) -> tuple[int, int, int, int, int]:
        return (self.on_hand, self.firm, self.damaged, self.quality_control, self.incoming)


@dataclass
class Product:
    levels: dict[str, Level] = field(default_factory=lambda: {"default": Level()})
    backordered: int = 0  # units promised to open orders without stock (product-level)
    policy: tuple[str, int | None, bool] | None = None  # backorder (mode, limit, until passed); None: deny

    def available(self) -> int:
        """Product `available` (no short holds: only asked of backorder products)."""
        return sum(max(0, lv.sellable - lv.firm) for lv in self.levels.values())

    def headroom(self, incoming: int = 0) -> int:
        """Units it may still promise without stock (spec 1); `incoming` more expected units."""
        if self.policy is None or self.policy[2]:
            return 0
        mode, limit, _ = self.policy
        cap = limit if limit is not None else UNLIMITED
        if mode == "incoming":
            cap = min(cap, sum(lv.incoming for lv in self.levels.values()) + incoming)
        return max(0, cap - self.backordered)

    def level(self, loc: str) -> Level:
        return self.levels.setdefault(loc, Level())

    @property
    def multi(self) -> bool:
        return any(loc != "default" for loc in self.levels)

    @property
    def on_hand(self) -> int:
        return sum(lv.on_hand for lv in self.levels.values())

    @property
    def firm(self) -> int:
        return sum(lv.firm for lv in self.levels.values())


@dataclass
class Order:
    status: str | None = (
        None  # None (never reserved, or rejected), reserved, committed, released, expired, cancelled
    )
    lines: dict[str, int] = field(default_factory=dict)
    alloc: dict[str, dict[str, int]] = field(default_factory=dict)  # product -> location -> units held
    short: bool = False
    placed_id: str | None = None
    ever_reserved: bool = False
    rejections: int = 0
    expired_maybe: bool = False  # short order completed: may have expired before
    # Part B: per line (product) counters, as order_lines keeps them once the order is allocated
    fulfilled: dict[str, int] = field(default_factory=dict)
    released: dict[str, int] = field(default_factory=dict)
    returned: dict[str, int] = field(default_factory=dict)
    bo: dict[str, int] = field(default_factory=dict)  # backordered units per line
    done: dict[str, dict[str, int]] = field(default_factory=dict)  # product -> location -> fulfilled there
    allocated: bool = False  # order_allocations rows (else held implicitly at default)
    no_expiry: bool = False  # held until fulfilled: extended so, or fulfilled once
    fids: list[str] = field(default_factory=list)  # fulfilment ids applied
    rids: list[str] = field(default_factory=list)  # return ids applied
    backorder: bool = False  # on backorder products: resolved by the replay (Workload.resolve)
    created: Any = None  # orders.created_at (FIFO), read once placed

    def holds(self) -> set[tuple[str, str]]:
        return {(k, loc) for k, a in self.alloc.items() for loc in a}

    def open(self, k: str | None = None) -> int:
        """Units still open (reserved or backordered) of a line, or of every line."""
        ks = [k] if k else list(self.lines)
        return sum(self.lines[x] - self.fulfilled.get(x, 0) - self.released.get(x, 0) for x in ks)

    def reserved(self, k: str) -> int:
        return sum(self.alloc.get(k, {}).values())


def _qty_lines(lines: list[tuple[str, int]]) -> list[dict[str, Any]]:
    return [{"product_id": k, "quantity": q} for k, q in lines]


@dataclass
class BoOp:
    """An accepted event on backorder products: applied by the replay after its round, at its
    place among the round's fills (the order in which the worker applied them)."""

    eid: str
    kind: str
    apply: Callable[..., None]  # given the event's result messages


@dataclass
class Race:
    """Compare-and-set counts at one level whose outcome depends on the order of application."""

    pid: str
    loc: str
    before: int  # on_hand at the start of the round (the counts' change_from)
    counts: list[tuple[str, int]]  # (event id, target on_hand)
    completed: int = 0  # units a racing completion takes from the level (0: the race is count vs count)


class Workload:
    def __init__(
        self, seed: int, products: int = 40, unknown_products: int = 3, backorders: bool = True
    ) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        tag = uuid.UUID(int=random.Random(seed).getrandbits(128)).hex[:6]
        self.tag = tag
        self.product_ids = [f"CH{tag}-{i:03d}" for i in range(products)]
        self.unknown_ids = [f"NOPE{tag}-{i}" for i in range(unknown_products)]
        self.products: dict[str, Product] = {}
        self.orders: dict[str, Order] = {}
        self.expect: dict[str, Expect] = {}
        self.poison_ids: list[str] = []
        self.delayed: list[Msg] = []  # duplicate copies held back for a later round
        self.pending_place: list[str] = []  # orders cancelled/completed before their placement
        self.races: list[Race] = []  # unresolved: resolve() after the round is applied
        self.race_outcomes: dict[str, int] = {}
        self.transfers: list[dict[str, Any]] = []  # applied transfers' data (re-sent under new ids)
        self._old_transfers: list[dict[str, Any]] = []  # those applied before the round being generated
        self._order_seq = 0
        self._transfer_seq = 0
        self._ceiling: dict[tuple[str, str], int] = {}  # a level's highest on_hand in the round generated
        self.counts: dict[str, int] = {}
        self.types: dict[str, str] = {}  # event id -> type
        # Part B: backorder products, and what the replay (resolve) settles after each round
        self.bo_ids = [f"CH{tag}-B{i:02d}" for i in range(len(BACKORDER_POLICIES) if backorders else 0)]
        self.bo_pending: list[BoOp] = []  # this round's events on backorder products, replayed by resolve()
        self.ext_races: list[
            tuple[str, str, bool]
        ] = []  # (event id, order id, until_fulfilled) vs the sweeper
        self.partial_released: set[str] = set()  # cancels whose inventory.released ends nothing
        self.partb_outcomes: dict[str, int] = {}
        self.replay_problems: list[str] = []
        self.fills_seen: set[str] = set()  # inventory.backorder_filled message ids replayed
        self.outbox_mark = 0  # every outbox id below it was replayed or is not about backorders
        self.round_no = 0
        self._fid_seq = 0
        self.started = time.monotonic()

    # -- messages ---------------------------------------------------------------------------

    def _event(self, type_: str, data: dict[str, Any]) -> Msg:
        event_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        body = {
            "id": event_id,
            "type": type_,
            "occurred_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "data": data,
        }
        self.counts[type_] = self.counts.get(type_, 0) + 1
        self.types[event_id] = type_
        return Msg(type_, json.dumps(body).encode(), event_id, event=body)

    def _poison(self) -> Msg:
        marker = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        kind = self.rng.choice(
            [
                "not_json",
                "wrong_key",
                "bad_quantity",
                "unknown_field",
                "no_id",
                "not_object",
                "transfer_to_itself",
                "move_to_itself",
            ]
        )
        good = {
            "id": marker,
            "type": "order.placed",
            "occurred_at": "2026-01-01T00:00:00Z",
            "data": {
                "order_id": f"poison-{marker[:8]}",
                "lines": [{"product_id": self.product_ids[0], "quantity": 1}],
            },
        }
        key = "order.placed"
        if kind == "not_json":
            body = b"{not json " + marker.encode()
        elif kind == "wrong_key":
            body, key = json.dumps(good).encode(), "order.cancelled"
        elif kind == "bad_quantity":
            good["data"]["lines"][0]["quantity"] = 0
            body = json.dumps(good).encode()
        elif kind == "unknown_field":
            good["data"]["colour"] = "red"
            body = json.dumps(good).encode()
        elif kind == "no_id":
            del good["id"]
            body = json.dumps(good).encode()
        elif kind == "transfer_to_itself":
            key = good["type"] = "stock.transferred"
            good["data"] = {
                "transfer_id": f"poison-{marker[:8]}",
                "from_location_id": "east",
                "to_location_id": "east",
                "lines": [{"product_id": self.product_ids[0], "quantity": 1}],
            }
            body = json.dumps(good).encode()
        elif kind == "move_to_itself":
            key = good["type"] = "stock.moved"
            good["data"] = {
                "product_id": self.product_ids[0],
                "quantity": 1,
                "from": "damaged",
                "to": "damaged",
            }
            body = json.dumps(good).encode()
        else:
            body = json.dumps([marker]).encode()
        self.poison_ids.append(marker)
        self.counts["poison"] = self.counts.get("poison", 0) + 1
        return Msg(key, body, marker, poison=True)

    def _new_order_id(self) -> str:
        self._order_seq += 1
        return f"o{self.seed}-{self._order_seq}"

    def _expect(self, m: Msg, e: Expect) -> Msg:
        self.expect[m.message_id] = e
        return m

    # -- configuration ----------------------------------------------------------------------

    def setup_rounds(self) -> list[list[Msg]]:
        """Locations, then the channel; every product's default level; then, in one bulk message, a
        second (and third) level for half of them (the rest stay default-only: today's path)."""
        config = []
        for loc, prio in LOCATIONS.items():
            m = self._event(
                "location.configured", {"location_id": loc, "name": f"chaos {loc}", "priority": prio}
            )
            config.append(
                self._expect(
                    m,
                    Expect(
                        [("inventory.configured", "")],
                        data=[("inventory.configured", None, {"priority": prio})],
                    ),
                )
            )
        # its own round: a channel naming a location not yet configured is refused (C4)
        m = self._event(
            "channel.configured", {"channel_id": "web", "locations": CHAINS["web"], "strategy": "priority"}
        )
        channel = [
            self._expect(
                m,
                Expect(
                    [("inventory.configured", "")],
                    data=[("inventory.configured", None, {"locations": CHAINS["web"]})],
                ),
            )
        ]
        config.extend(self._configure_backorders())
        stock = [self._adjust(pid) for pid in self.product_ids]
        items, want = [], []
        for pid in self.product_ids[::2]:
            for loc in self.rng.sample(list(LOCATIONS), self.rng.randint(1, 2)):
                q = self.rng.randint(10, 80)
                items.append({"product_id": pid, "location_id": loc, "on_hand": q})
                self.products[pid].level(loc).on_hand = q
                want.append(
                    ("inventory.adjusted", len(want), {"location_id": loc, "location": {"on_hand": q}})
                )
        # backorder products: a little stock at default and at east; incoming ones expect more
        for pid in self.bo_ids:
            p = self.products[pid]
            q = self.rng.randint(3, 12)
            m = self._event("stock.adjusted", {"product_id": pid, "on_hand": q})
            p.level("default").on_hand = q
            stock.append(
                self._expect(
                    m,
                    Expect(
                        [("inventory.adjusted", "")],
                        product_id=pid,
                        data=[("inventory.adjusted", None, {"on_hand": q})],
                    ),
                )
            )
            fields: list[tuple[str, str, int]] = [("east", "on_hand", self.rng.randint(2, 8))]
            if p.policy and p.policy[0] == "incoming":
                fields.append(("default", "incoming", self.rng.randint(5, 20)))
            for loc, name, q in fields:
                items.append({"product_id": pid, "location_id": loc, name: q})
                setattr(p.level(loc), name, q)
                want.append(("inventory.adjusted", len(want), {"location_id": loc, "location": {name: q}}))
        m = self._event("stock.adjusted", {"items": items})
        bulk = self._expect(m, Expect([("inventory.adjusted", "")] * len(items), data=want))
        return [config, channel, stock, [bulk]]

    # -- the model's transitions (applied as the round is generated) ------------------------

    def _adjust(
        self, pid: str, *, refuse: bool | None = None, loc: str = "default", cas: str | None = None
    ) -> Msg:
        """A count or delta at one level; cas: None, "right" (change_from = on_hand) or "wrong"."""
        p = self.products.get(pid)
        if p is None:  # creation
            target = self.rng.randint(30, 200)
            m = self._event("stock.adjusted", {"product_id": pid, "on_hand": target})
            self.products[pid] = Product()
            self.products[pid].level("default").on_hand = target
            return self._expect(
                m,
                Expect(
                    [("inventory.adjusted", "")],
                    product_id=pid,
                    data=[("inventory.adjusted", None, {"on_hand": target})],
                ),
            )
        lv = p.level(loc)
        all_reserved = lv.firm + sum(lv.expirable.values())
        floor = lv.damaged + lv.quality_control
        if refuse and lv.firm + floor > 0:
            # below the firm reservations (or the unsellable units): refused whether or not the short ones expired
            target = self.rng.randint(0, lv.firm + floor - 1)
            reason = "below_reserved"
        elif refuse:
            target, reason = -self.rng.randint(1, 5), "negative_on_hand"
        else:
            target = max(all_reserved + floor, lv.on_hand + self.rng.randint(-20, 60))
            reason = ""
        if self.rng.random() < 0.5 or target < 0:
            data: dict[str, Any] = {"product_id": pid, "delta": target - lv.on_hand}
        else:
            data = {"product_id": pid, "on_hand": target}
        if loc != "default":
            data["location_id"] = loc
        if cas:
            data["change_from"] = lv.on_hand + (0 if cas == "right" else self.rng.randint(1, 9))
            if cas == "wrong":
                reason = "stale"
        data["reason"] = "chaos"
        m = self._event("stock.adjusted", data)
        located = loc != "default" or reason == "stale"
        if reason:
            want = {"reason": reason} | ({"current": lv.on_hand} if reason == "stale" else {})
            return self._expect(
                m,
                Expect(
                    [("inventory.adjustment_rejected", reason)],
                    product_id=pid,
                    data=[("inventory.adjustment_rejected", None, want)],
                ),
            )
        lv.on_hand = target
        want = {"location_id": loc, "location": {"on_hand": target}} if located else {"on_hand": p.on_hand}
        return self._expect(
            m, Expect([("inventory.adjusted", "")], product_id=pid, data=[("inventory.adjusted", None, want)])
        )

    def _bulk(self, pids: list[str]) -> Msg:
        """items over several products and levels, atomic or not, maybe with one item refused for sure."""
        atomic = self.rng.random() < 0.5
        items: list[dict[str, Any]] = []
        plans: list[tuple[str, str, int | None, str]] = []  # (pid, loc, new on_hand or None, reason)
        for pid in pids:
            p = self.products[pid]
            for loc in self.rng.sample(sorted(p.levels), min(len(p.levels), self.rng.randint(1, 2))):
                lv = p.level(loc)
                target = max(
                    lv.firm + sum(lv.expirable.values()) + lv.damaged + lv.quality_control,
                    lv.on_hand + self.rng.randint(-10, 40),
                )
                items.append({"product_id": pid, "location_id": loc, "delta": target - lv.on_hand})
                plans.append((pid, loc, target, ""))
        if self.rng.random() < 0.5:  # one item refused whatever the order of the round
            pid = self.rng.choice(pids)
            bad = self.rng.choice(["unknown_location", "negative_on_hand"])
            loc = (
                UNKNOWN_LOCATION
                if bad == "unknown_location"
                else self.rng.choice(
                    [
                        loc
                        for loc in ("default", *LOCATIONS)
                        if not any(x[0] == pid and x[1] == loc for x in plans)
                    ]
                    or ["default"]
                )
            )
            if any(x[0] == pid and x[1] == loc for x in plans):
                bad, loc = "unknown_location", UNKNOWN_LOCATION
            lv = self.products[pid].levels.get(loc, Level())
            pos = self.rng.randint(0, len(items))
            items.insert(
                pos, {"product_id": pid, "location_id": loc, "delta": -(lv.on_hand + self.rng.randint(1, 5))}
            )
            plans.insert(pos, (pid, loc, None, bad))
        failed = any(reason for *_, reason in plans)
        results, want = [], []
        for i, (pid, loc, target, reason) in enumerate(plans):
            if reason:
                results.append(("inventory.adjustment_rejected", reason))
            elif failed and atomic:
                results.append(("inventory.adjustment_rejected", "batch_rejected"))
            else:
                self.products[pid].level(loc).on_hand = target  # type: ignore[assignment]
                results.append(("inventory.adjusted", ""))
                want.append(("inventory.adjusted", i, {"location_id": loc, "location": {"on_hand": target}}))
        m = self._event("stock.adjusted", {"items": items, "atomic": atomic})
        self.counts["stock.adjusted (bulk)"] = self.counts.get("stock.adjusted (bulk)", 0) + 1
        return self._expect(m, Expect(results, product_id=pids[0], data=want))

    def _move(self, pid: str) -> Msg:
        """stock.moved between the states of one level (a write-off with to=disposed)."""
        p = self.products[pid]
        loc = self.rng.choice(sorted(p.levels))
        lv = p.level(loc)
        buckets = {"damaged": lv.damaged, "quality_control": lv.quality_control}
        frm = self.rng.choice(["sellable", "sellable"] + [b for b, n in buckets.items() if n > 0])
        to = self.rng.choice([s for s in ("sellable", "damaged", "quality_control", "disposed") if s != frm])
        if frm == "sellable":
            ok_max, refuse_min = lv.worst_free, lv.sellable - lv.firm + 1  # reserved units cannot move
        else:
            ok_max, refuse_min = buckets[frm], buckets[frm] + 1
        refuse = ok_max < 1 or self.rng.random() < 0.2
        q = refuse_min + self.rng.randint(0, 5) if refuse else self.rng.randint(1, min(ok_max, 15))
        data: dict[str, Any] = {"product_id": pid, "quantity": q, "from": frm, "to": to, "reason": "chaos"}
        if loc != "default" or self.rng.random() < 0.5:
            data["location_id"] = loc
        m = self._event("stock.moved", data)
        if refuse:
            return self._expect(
                m, Expect([("inventory.adjustment_rejected", "insufficient_quantity")], product_id=pid)
            )
        if frm != "sellable":
            setattr(lv, frm, getattr(lv, frm) - q)
        if to == "disposed":
            lv.on_hand -= q
        elif to != "sellable":
            setattr(lv, to, getattr(lv, to) + q)
        want = {
            "kind": "state",
            "location_id": loc,
            "location": {"on_hand": lv.on_hand, "damaged": lv.damaged, "quality_control": lv.quality_control},
        }
        return self._expect(
            m, Expect([("inventory.moved", "")], product_id=pid, data=[("inventory.moved", None, want)])
        )

    def _transfer(self, pids: list[str]) -> Msg:
        """stock.transferred from one location to another (in transit: to its incoming), all or none."""
        src = self.rng.choice(sorted({loc for pid in pids for loc in self.products[pid].levels}))
        dst = self.rng.choice([loc for loc in ("default", *LOCATIONS) if loc != src])
        transit = self.rng.random() < 0.4
        refuse_at = self.rng.randrange(len(pids)) if self.rng.random() < 0.2 else None
        lines, reasons = [], []
        for i, pid in enumerate(pids):
            lv = self.products[pid].levels.get(src, Level())
            if i == refuse_at or lv.worst_free < 1:
                lines.append(
                    {"product_id": pid, "quantity": max(1, lv.sellable - lv.firm + self.rng.randint(1, 5))}
                )
                reasons.append("insufficient_quantity")
            else:
                lines.append({"product_id": pid, "quantity": self.rng.randint(1, min(lv.worst_free, 20))})
                reasons.append("")
        self._transfer_seq += 1
        data = {
            "transfer_id": f"t{self.tag}-{self._transfer_seq}",
            "from_location_id": src,
            "to_location_id": dst,
            "lines": lines,
            "in_transit": transit,
            "reason": "chaos",
        }
        m = self._event("stock.transferred", data)
        if any(reasons):
            return self._expect(
                m,
                Expect(
                    [("inventory.adjustment_rejected", r or "batch_rejected") for r in reasons],
                    product_id=pids[0],
                ),
            )
        for line in lines:
            p = self.products[line["product_id"]]
            p.level(src).on_hand -= line["quantity"]
            if transit:
                p.level(dst).incoming += line["quantity"]
            else:
                p.level(dst).on_hand += line["quantity"]
        self.transfers.append(data)
        want = {"kind": "transfer", "transfer_id": data["transfer_id"], "in_transit": transit, "lines": lines}
        return self._expect(
            m, Expect([("inventory.moved", "")], product_id=pids[0], data=[("inventory.moved", None, want)])
        )

    def _transfer_again(self) -> Msg | None:
        """An applied transfer_id under a new message id: duplicate_transfer, nothing changes (one
        of an earlier round: within its own round either copy could be the one applied)."""
        if not self._old_transfers:
            return None
        m = self._event("stock.transferred", dict(self.rng.choice(self._old_transfers)))
        return self._expect(m, Expect([]))

    def _receive(self, pid: str) -> Msg:
        """stock.received: the incoming units arrive (or fewer, or more: unexpected)."""
        p = self.products[pid]
        expected = [loc for loc, lv in p.levels.items() if lv.incoming > 0]
        loc = self.rng.choice(expected) if expected else self.rng.choice(["default", *LOCATIONS])
        lv = p.level(loc)
        q = max(1, lv.incoming + self.rng.choice([0, 0, -2, 3]))
        unexpected = max(0, q - lv.incoming)
        lv.incoming -= min(q, lv.incoming)
        lv.on_hand += q
        data: dict[str, Any] = {"product_id": pid, "quantity": q, "reason": "chaos"}
        if loc != "default" or self.rng.random() < 0.5:
            data["location_id"] = loc
        m = self._event("stock.received", data)
        want = {
            "kind": "receipt",
            "location_id": loc,
            "unexpected": unexpected,
            "location": {"on_hand": lv.on_hand, "incoming": lv.incoming},
        }
        return self._expect(
            m, Expect([("inventory.moved", "")], product_id=pid, data=[("inventory.moved", None, want)])
        )

    def _cas_race(
        self, pid: str, loc: str, budget: dict[tuple[str, str], int], racer: str | None
    ) -> list[Msg]:
        """Counts with change_from = the level's on_hand now, racing the round's orders: with
        racer = an order holding (pid, loc) that is completed in the same round, or None: a
        second count with the same change_from. Resolved by resolve() once the round is applied."""
        lv = self.products[pid].level(loc)
        before = lv.on_hand
        lower = min(10, budget.get((pid, loc), 0))  # a lower count keeps every planned hold valid
        targets: list[int] = []
        while len(targets) < (1 if racer else 2):
            t = before + self.rng.randint(-lower, 30)
            if t != before and t not in targets:
                targets.append(t)
        budget[(pid, loc)] = budget.get((pid, loc), 0) - max(0, before - min(targets))
        self._ceiling[(pid, loc)] = max(before, *targets)
        msgs = []
        race = Race(pid, loc, before, [])
        for t in targets:
            m = self._event(
                "stock.adjusted",
                {
                    "product_id": pid,
                    "location_id": loc,
                    "on_hand": t,
                    "change_from": before,
                    "reason": "count",
                },
            )
            self.counts["stock.adjusted (compare-and-set race)"] = (
                self.counts.get("stock.adjusted (compare-and-set race)", 0) + 1
            )
            self._expect(m, Expect([("inventory.adjusted", "")], product_id=pid))  # fixed by resolve()
            race.counts.append((m.message_id, t))
            msgs.append(m)
        if racer:
            race.completed = self.orders[racer].alloc[pid][loc]
            msgs.append(self._complete(racer))  # the model takes the units now: lv.on_hand = before - q
        self.races.append(race)
        return msgs

    def resolve(self, fetch: Callable[[list[str]], dict[str, list[dict[str, Any]]]]) -> None:
        """Follows each race's counts as their result events report them (applied or stale) and
        sets the level's figure to what that interleaving leaves; the expectation becomes the one
        legal result set for that interleaving (an illegal one, such as two counts applied, fails).
        Then each extension that raced the sweeper, as its result says (see _resolve_extensions)."""
        self._resolve_extensions(fetch)
        if not self.races:
            return
        got = fetch([eid for r in self.races for eid, _ in r.counts])
        for r in self.races:
            lv = self.products[r.pid].level(r.loc)
            applied = [
                (eid, t)
                for eid, t in r.counts
                if any(x["type"] == "inventory.adjusted" for x in got.get(eid, []))
            ]
            if r.completed:  # one count vs a completion: applied only if it ran first
                ((eid, t),) = r.counts
                if applied:
                    lv.on_hand = t - r.completed
                    self._set_applied(eid, r, t)
                else:
                    self._set_stale(eid, r, r.before - r.completed)  # lv.on_hand already says so
                self.race_outcomes["count vs completion: " + ("count first" if applied else "stale")] = (
                    self.race_outcomes.get(
                        "count vs completion: " + ("count first" if applied else "stale"), 0
                    )
                    + 1
                )
            else:  # two counts from the same value: the first applies, the second finds its target
                first = applied[0] if applied else r.counts[0]
                lv.on_hand = first[1]
                for eid, t in r.counts:
                    if eid == first[0]:
                        self._set_applied(eid, r, t)
                    else:
                        self._set_stale(eid, r, first[1])
                self.race_outcomes["count vs count"] = self.race_outcomes.get("count vs count", 0) + 1
        self.races = []

    def _resolve_extensions(self, fetch: Callable[[list[str]], dict[str, list[dict[str, Any]]]]) -> None:
        """A short hold's extension either came first (inventory.reservation_extended: with
        until_fulfilled the hold never expires and is long from now on), or came so early that
        its few seconds end before the deadline (extension_limit), or the hold had lapsed
        (inventory.rejected reservation_expired: the sweeper expires it, if it did not yet)."""
        if not self.ext_races:
            return
        got = fetch([eid for eid, _, _ in self.ext_races])
        for eid, oid, until in self.ext_races:
            o = self.orders[oid]
            if any(x["type"] == "inventory.reservation_extended" for x in got.get(eid, [])):
                outcome = "extension first" + (" (until fulfilled)" if until else "")
                e = Expect([("inventory.reservation_extended", "")], order_id=oid)
                if until:
                    e.data = [("inventory.reservation_extended", None, {"expires_at": None})]
                    o.short, o.no_expiry = False, True
                    for k, at in o.alloc.items():
                        for loc, q in at.items():
                            lv = self.products[k].level(loc)
                            lv.expirable.pop(oid, None)
                            lv.firm += q
                    self.expect[o.placed_id].optional = []  # never expires now  # type: ignore[index]
            elif not until and any(x["data"].get("reason") == "extension_limit" for x in got.get(eid, [])):
                # so early that now + its seconds is not later than the deadline it has
                outcome = "extension not later: extension_limit"
                e = Expect([("inventory.rejected", "extension_limit")], order_id=oid)
            else:
                outcome = "sweeper first: reservation_expired"
                e = Expect([("inventory.rejected", "reservation_expired")], order_id=oid)
            self.expect[eid] = e
            self.partb_outcomes[f"extension vs sweeper: {outcome}"] = (
                self.partb_outcomes.get(f"extension vs sweeper: {outcome}", 0) + 1
            )
        self.ext_races = []

    def _set_applied(self, eid: str, r: Race, target: int) -> None:
        self.expect[eid] = Expect(
            [("inventory.adjusted", "")],
            product_id=r.pid,
            data=[("inventory.adjusted", None, {"location_id": r.loc, "location": {"on_hand": target}})],
        )

    def _set_stale(self, eid: str, r: Race, current: int) -> None:
        self.expect[eid] = Expect(
            [("inventory.adjustment_rejected", "stale")],
            product_id=r.pid,
            data=[("inventory.adjustment_rejected", None, {"location_id": r.loc, "current": current})],
        )

    def _place(
        self,
        oid: str,
        lines: dict[str, int],
        short: bool,
        budget: dict[tuple[str, str], int],
        channel: str | None = None,
        pins: dict[str, str] | None = None,
        split: dict[str, dict[str, int]] | None = None,
    ) -> Msg:
        pins, split = pins or {}, split or {}
        chain = CHAINS[channel]
        o = self.orders.setdefault(oid, Order())
        data: dict[str, Any] = {
            "order_id": oid,
            "lines": [
                {"product_id": k, "quantity": q} | ({"location_id": pins[k]} if k in pins else {})
                for k, q in lines.items()
            ],
        }
        if short:
            data["reservation_ttl_seconds"] = self.rng.choice(SHORT_TTL_CHOICES)
        if channel:
            data["channel_id"] = channel
        m = self._event("order.placed", data)
        e = Expect([], order_id=oid)
        if o.status == "cancelled":
            e.results = [("inventory.rejected", "order_cancelled")]
        elif o.status is not None:
            e.results = []  # duplicate_order: never reserves twice
        else:
            # the plan: a split as given, else the whole line at its pin or the channel's first location
            plan = {k: split.get(k) or {pins.get(k, chain[0]): q} for k, q in lines.items()}
            unknown = [k for k in lines if k not in self.products]
            unavailable = [k for k, loc in pins.items() if loc not in chain]
            short_of = [
                k
                for k in lines
                if k not in unknown and any(q > budget.get((k, loc), 0) for loc, q in plan[k].items())
            ]
            if unknown:
                e.results, e.must_short = [("inventory.rejected", "unknown_product")], set(unknown)
                o.rejections += 1
            elif unavailable:
                e.results, e.must_short = [("inventory.rejected", "location_unavailable")], set(unavailable)
                o.rejections += 1
            elif short_of:
                # only ever generated with a line above what its locations could hold in the round: a sure shortage
                sure = {
                    k
                    for k in short_of
                    if lines[k]
                    > sum(self._ceiling.get((k, loc), 0) for loc in ([pins[k]] if k in pins else chain))
                }
                assert sure, f"a placement meant to fail must ask for more than on_hand: {lines} {plan}"
                e.results, e.must_short = [("inventory.rejected", "insufficient_stock")], sure
                o.rejections += 1
            else:
                for k, at in plan.items():
                    for loc, q in at.items():
                        budget[(k, loc)] -= q
                        lv = self.products[k].level(loc)
                        if short:
                            lv.expirable[oid] = q
                        else:
                            lv.firm += q
                o.status, o.lines, o.alloc, o.short, o.placed_id, o.ever_reserved = (
                    "reserved",
                    dict(lines),
                    plan,
                    short,
                    m.message_id,
                    True,
                )
                e.results = [("inventory.reserved", "")]
                o.allocated = any(set(at) != {"default"} for at in plan.values())
                if channel or pins or any(set(at) != {"default"} for at in plan.values()):
                    e.results.append(("inventory.allocated", ""))
                    e.allocated = {
                        "channel_id": channel or "default",
                        "lines": sorted(
                            (
                                {
                                    "product_id": k,
                                    "quantity": lines[k],
                                    "tracked": True,
                                    "backordered": 0,
                                    "allocations": sorted(
                                        ({"location_id": loc, "quantity": q} for loc, q in at.items()),
                                        key=lambda a: a["location_id"],
                                    ),
                                }
                                for k, at in plan.items()
                            ),
                            key=lambda x: x["product_id"],
                        ),
                    }
                if short:
                    e.optional = [("inventory.expired", "")]  # decided at completion or at the end
        self.expect[m.message_id] = e
        return m

    def _cancel(self, oid: str) -> Msg:
        """The whole order (what is still open of it: an order partly fulfilled ends committed)."""
        o = self.orders.setdefault(oid, Order())
        m = self._event("order.cancelled", {"order_id": oid})
        e = Expect([], order_id=oid)
        self.expect[m.message_id] = e
        if o.status is None:
            o.status = "cancelled"  # remembered: the late placement is rejected
        elif o.status == "reserved":
            assert not o.short, "short-TTL orders are never cancelled (released vs expired is timing)"
            partly = o.allocated and (any(o.fulfilled.values()) or any(o.released.values()))
            if partly:  # release_order_lines(): each open line; committed if anything was fulfilled
                lines = [(k, o.open(k)) for k in o.lines if o.open(k) > 0]
            else:
                lines = list(o.lines.items())
            e.results = [("inventory.released", "")]
            e.data = [("inventory.released", None, {"lines": _qty_lines(lines), "reason": "cancelled"})]
            if any(o.fulfilled.values()):
                e.results.append(("inventory.committed", ""))
                e.data.append(("inventory.committed", None, {"lines": self._fulfilled_lines(o)}))
                self.partial_released.add(m.message_id)

            def apply(_: list[dict[str, Any]] | None = None) -> None:
                for k in o.lines:
                    if o.open(k):
                        self._sm_release(o, k, o.open(k))
                if not partly:  # cancel_order(): every line's released = its quantity
                    o.released = dict(o.lines)
                o.status = "committed" if any(o.fulfilled.values()) else "released"

            self._apply(m.message_id, "cancel", o, apply)
        return m

    def _complete(self, oid: str) -> Msg:
        o = self.orders.setdefault(oid, Order())
        m = self._event("order.completed", {"order_id": oid})
        e = Expect([], order_id=oid)
        self.expect[m.message_id] = e
        if o.status in ("cancelled", "released"):
            e.results = [("inventory.rejected", "order_cancelled")]
        elif o.status == "reserved":
            if o.backorder and sum(o.bo.values()):
                # units still backordered: committed if a fill of the round reaches them first,
                # else refused backorder_pending; the replay reads which (resolve)
                self._apply(
                    m.message_id,
                    "complete (race)",
                    o,
                    lambda got: self._replay_complete(m.message_id, oid, got),
                )
                return m
            e.results = [("inventory.committed", "")]
            self._apply(m.message_id, "complete", o, lambda _=None: self._sm_commit(oid, m.message_id))
            o.expired_maybe = o.short
        return m

    # -- Part B: the order's life after placement (spec 4.2-4.8) ----------------------------

    def _apply(self, eid: str, kind: str, o: Order, apply: Callable[..., None]) -> None:
        """Applies an accepted change at once, or, for an order on backorder products, when the
        replay of the round reaches it (its place among the round's fills is only known then)."""
        if o.backorder:
            self.bo_pending.append(BoOp(eid, kind, apply))
        else:
            apply(None)

    def _fulfilled_lines(self, o: Order, extra: dict[str, int] | None = None) -> list[dict[str, Any]]:
        """inventory.committed of an order closed after partial changes: each line's fulfilled total."""
        extra = extra or {}
        out = []
        for k in o.lines:
            n = o.fulfilled.get(k, 0) + extra.get(k, 0)
            if n:
                out.append({"product_id": k, "quantity": n})
        return out

    def _sm_commit(self, oid: str, eid: str) -> None:
        """order.completed: every unit still held is fulfilled where it is held."""
        o = self.orders[oid]
        for k, at in o.alloc.items():
            for loc, q in at.items():
                lv = self.products[k].level(loc)
                lv.on_hand -= q
                if o.short:
                    lv.expirable.pop(oid, None)
                else:
                    lv.firm -= q
                o.done.setdefault(k, {})[loc] = o.done.get(k, {}).get(loc, 0) + q
                at[loc] = 0
        for k, q in o.lines.items():
            o.fulfilled[k] = q - o.released.get(k, 0)
        o.status = "committed"
        if o.allocated:
            self.expect[eid].data = [("inventory.committed", None, {"lines": self._fulfilled_lines(o)})]

    def _sm_release(self, o: Order, k: str, q: int) -> None:
        """Releases q units of a line: backordered ones first, then reserved ones in reverse
        allocation order (the preferred location keeps its hold)."""
        n = min(q, o.bo.get(k, 0))
        if n:
            o.bo[k] -= n
            self.products[k].backordered -= n
        left = q - n
        for loc in reversed(list(o.alloc.get(k, {}))):
            r = min(left, o.alloc[k][loc])
            if r:
                o.alloc[k][loc] -= r
                self.products[k].level(loc).firm -= r
                left -= r
        assert left == 0, f"release of {q} {k} from {o}"
        o.released[k] = o.released.get(k, 0) + q

    def _sm_take(self, o: Order, k: str, loc: str | None, q: int) -> list[tuple[str, int]]:
        """Fulfils q reserved units of a line, at loc or in allocation order: where they left from."""
        chunks, left = [], q
        for at, r in o.alloc[k].items():
            if left == 0:
                break
            if r <= 0 or (loc is not None and at != loc):
                continue
            n = min(left, r)
            o.alloc[k][at] -= n
            o.done.setdefault(k, {})[at] = o.done.get(k, {}).get(at, 0) + n
            lv = self.products[k].level(at)
            lv.on_hand -= n
            lv.firm -= n
            chunks.append((at, n))
            left -= n
        assert left == 0, f"fulfilment of {q} {k} at {loc} from {o}"
        o.fulfilled[k] = o.fulfilled.get(k, 0) + q
        return chunks

    def _live(self, o: Order) -> bool:
        return o.status == "reserved" and not o.short

    def _fulfil(self, oid: str, refuse: str | None = None) -> Msg:
        """order.fulfilled: some reserved units of a live order (a shipment); refuse:
        "exceeds_reserved" (more than the line holds: more than it has open) or "unknown_line"."""
        o, rng = self.orders[oid], self.rng
        self._fid_seq += 1
        fid = f"f{self.seed}-{self._fid_seq}"
        held = [k for k in o.lines if o.reserved(k) > 0]
        asks: list[tuple[str, str | None, int]] = []
        if refuse == "unknown_line":
            other = [k for k in self.products if k not in o.lines]
            asks = [(rng.choice(other), None, 1)]
        elif refuse or not held:
            refuse = "exceeds_reserved"
            k = rng.choice(list(o.lines))
            asks = [(k, None, o.open(k) + rng.randint(1, 3))]
        else:
            for k in rng.sample(held, rng.randint(1, len(held))):
                pinned = [loc for loc, r in o.alloc[k].items() if r > 0]
                if rng.random() < 0.35:
                    loc = rng.choice(pinned)
                    asks.append((k, loc, rng.randint(1, o.alloc[k][loc])))
                else:
                    asks.append((k, None, rng.randint(1, o.reserved(k))))
        data = {
            "order_id": oid,
            "fulfilment_id": fid,
            "lines": [
                {"product_id": k, "quantity": q} | ({"location_id": loc} if loc else {}) for k, loc, q in asks
            ],
        }
        m = self._event("order.fulfilled", data)
        if refuse:
            self.counts[f"order.fulfilled ({refuse})"] = self.counts.get(f"order.fulfilled ({refuse})", 0) + 1
            return self._expect(m, Expect([("inventory.rejected", refuse)], order_id=oid))
        closes = o.open() == sum(q for _, _, q in asks)
        e = Expect([("inventory.fulfilled", "")], order_id=oid)
        self._expect(m, e)
        if closes:
            e.results.append(("inventory.committed", ""))
        o.fids.append(fid)
        o.no_expiry = True

        def apply(_: Any = None) -> None:
            o.allocated = True  # make_allocated(): an implicit hold gets its rows
            taken = [
                {"product_id": k, "location_id": at, "quantity": n}
                for k, loc, q in asks
                for at, n in self._sm_take(o, k, loc, q)
            ]
            open_ = [
                {"product_id": k, "reserved": o.reserved(k), "backordered": o.bo.get(k, 0)}
                for k in o.lines
                if o.reserved(k) + o.bo.get(k, 0) > 0
            ]
            e.data = [("inventory.fulfilled", None, {"fulfilment_id": fid, "lines": taken, "open": open_})]
            if closes:
                o.status = "committed"
                e.data.append(("inventory.committed", None, {"lines": self._fulfilled_lines(o)}))

        self._apply(m.message_id, "fulfil", o, apply)
        return m

    def _fulfil_again(self, oid: str) -> Msg:
        """An applied fulfilment_id under a new message id: duplicate_fulfilment, nothing published."""
        o = self.orders[oid]
        k = next(iter(o.lines))
        m = self._event(
            "order.fulfilled",
            {
                "order_id": oid,
                "fulfilment_id": self.rng.choice(o.fids),
                "lines": [{"product_id": k, "quantity": 1}],
            },
        )
        self.counts["order.fulfilled (fulfilment_id again)"] = (
            self.counts.get("order.fulfilled (fulfilment_id again)", 0) + 1
        )
        return self._expect(m, Expect([], order_id=oid))

    def _cancel_lines(self, oid: str, refuse: str | None = None) -> Msg:
        """A partial order.cancelled: some open units of some lines (backordered ones first);
        refuse: "exceeds_open_quantity" or "unknown_line"."""
        o, rng = self.orders[oid], self.rng
        if refuse == "unknown_line":
            lines = [(rng.choice([k for k in self.products if k not in o.lines]), 1)]
        elif refuse:
            k = rng.choice(list(o.lines))
            lines = [(k, o.open(k) + rng.randint(1, 3))]
        else:
            opened = [k for k in o.lines if o.open(k) > 0]
            lines = [(k, rng.randint(1, o.open(k))) for k in rng.sample(opened, rng.randint(1, len(opened)))]
        m = self._event("order.cancelled", {"order_id": oid, "lines": _qty_lines(lines)})
        key = f"order.cancelled (lines{', ' + refuse if refuse else ''})"
        self.counts[key] = self.counts.get(key, 0) + 1
        if refuse:
            return self._expect(m, Expect([("inventory.rejected", refuse)], order_id=oid))
        e = Expect(
            [("inventory.released", "")],
            order_id=oid,
            data=[("inventory.released", None, {"lines": _qty_lines(lines), "reason": "cancelled"})],
        )
        self._expect(m, e)
        closes = o.open() == sum(q for _, q in lines)
        fulfilled = any(o.fulfilled.values())
        if closes and fulfilled:
            e.results.append(("inventory.committed", ""))
            e.data.append(("inventory.committed", None, {"lines": self._fulfilled_lines(o)}))
        if not closes or fulfilled:
            self.partial_released.add(m.message_id)  # this inventory.released ends nothing

        def apply(_: Any = None) -> None:
            o.allocated = True
            for k, q in lines:
                self._sm_release(o, k, q)
            if closes:
                o.status = "committed" if fulfilled else "released"

        self._apply(m.message_id, "cancel (lines)", o, apply)
        return m

    def _returnable(self, o: Order) -> list[str]:
        return [k for k in o.lines if o.fulfilled.get(k, 0) > o.returned.get(k, 0)]

    def _return(self, oid: str, refuse: bool = False) -> tuple[Msg, list[tuple[str, str]]]:
        """order.returned of fulfilled units, with conditions; refuse: more than fulfilled.
        Returns the message and the levels whose on_hand it raises."""
        o, rng = self.orders[oid], self.rng
        ks = self._returnable(o)
        rid = f"r{self.seed}-{self._fid_seq}-{len(o.rids)}"
        self._fid_seq += 1
        asks: list[tuple[str, str | None, str, int]] = []  # (product, location given or None, condition, q)
        where: dict[tuple[str, str | None], str] = {}
        for k in rng.sample(ks, rng.randint(1, len(ks))):
            left = o.fulfilled[k] - o.returned.get(k, 0)
            first = next((loc for loc in o.alloc.get(k, {}) if o.done.get(k, {}).get(loc, 0) > 0), "default")
            if refuse:
                asks.append((k, None, rng.choice(CONDITIONS), left + rng.randint(1, 3)))
                break
            for cond in rng.sample(CONDITIONS, rng.randint(1, 2)):
                if left == 0:
                    break
                q = rng.randint(1, left)
                left -= q
                loc = rng.choice(sorted(self.products[k].levels)) if rng.random() < 0.3 else None
                if any(a[0] == k and a[1] == loc and a[2] == cond for a in asks):
                    continue
                asks.append((k, loc, cond, q))
                where[(k, loc)] = loc or first
        data = {
            "order_id": oid,
            "return_id": rid,
            "lines": [
                {"product_id": k, "quantity": q, "condition": c} | ({"location_id": loc} if loc else {})
                for k, loc, c, q in asks
            ],
        }
        m = self._event("order.returned", data)
        if refuse:
            self.counts["order.returned (exceeds_fulfilled)"] = (
                self.counts.get("order.returned (exceeds_fulfilled)", 0) + 1
            )
            return self._expect(m, Expect([("inventory.rejected", "exceeds_fulfilled")], order_id=oid)), []
        o.rids.append(rid)
        for _, _, c, _ in asks:
            self.counts[f"order.returned ({c})"] = self.counts.get(f"order.returned ({c})", 0) + 1
        want = [
            {"product_id": k, "location_id": where[(k, loc)], "quantity": q, "condition": c}
            for k, loc, c, q in asks
        ]
        self._expect(
            m,
            Expect(
                [("inventory.returned", "")],
                order_id=oid,
                data=[("inventory.returned", None, {"return_id": rid, "lines": want})],
            ),
        )

        def apply(_: Any = None) -> None:
            if o.status == "committed" and not o.allocated:  # the rows it never kept, all fulfilled
                o.allocated = True
            for k, loc, c, q in asks:
                o.returned[k] = o.returned.get(k, 0) + q
                if c == "disposed":
                    continue
                lv = self.products[k].level(where[(k, loc)])
                lv.on_hand += q
                if c in ("damaged", "quality_control"):
                    setattr(lv, c, getattr(lv, c) + q)

        self._apply(m.message_id, "return", o, apply)
        return m, [(k, where[(k, loc)]) for k, loc, c, _ in asks if c != "disposed"]

    def _return_again(self, oid: str) -> Msg:
        o = self.orders[oid]
        k = next(iter(o.lines))
        m = self._event(
            "order.returned",
            {
                "order_id": oid,
                "return_id": self.rng.choice(o.rids),
                "lines": [{"product_id": k, "quantity": 1, "condition": "sellable"}],
            },
        )
        self.counts["order.returned (return_id again)"] = (
            self.counts.get("order.returned (return_id again)", 0) + 1
        )
        return self._expect(m, Expect([], order_id=oid))

    def _extend(self, oid: str) -> Msg:
        """reservation.extended. A short hold races the sweeper (resolve() reads who won); a
        long one: until_fulfilled is applied, a few seconds more are refused extension_limit
        (the deadline is already later); a finished order is refused."""
        created = oid not in self.orders
        o, rng = self.orders.setdefault(oid, Order()), self.rng
        # a few seconds more than a long hold already has: refused while the run is well
        # within the holds' hour (chaos_settings: default_reservation_ttl_seconds 3600)
        until = rng.random() < 0.5 or time.monotonic() - self.started > 3000
        data: dict[str, Any] = {"order_id": oid} | (
            {"until_fulfilled": True}
            if until
            else {"extend_by_seconds": rng.randint(1, 3) if o.short else rng.randint(1, 60)}
        )
        m = self._event("reservation.extended", data)
        e = Expect([], order_id=oid)
        self._expect(m, e)
        if o.status == "reserved" and o.short:
            self.ext_races.append((m.message_id, oid, until))
            self.counts["reservation.extended (racing the sweeper)"] = (
                self.counts.get("reservation.extended (racing the sweeper)", 0) + 1
            )
        elif o.status == "reserved":
            if o.no_expiry:
                return m  # held until fulfilled already: ignored, nothing published
            if until:
                o.no_expiry = True
                e.results = [("inventory.reservation_extended", "")]
                e.data = [("inventory.reservation_extended", None, {"expires_at": None})]
            else:
                e.results = [("inventory.rejected", "extension_limit")]
        else:
            reason = {None: "unknown_order", "committed": "order_completed"}.get(o.status, "order_cancelled")
            e.results = [("inventory.rejected", reason)]
            if created:
                del self.orders[oid]  # not remembered: never placed
        return m

    # -- Part B: backorder products ---------------------------------------------------------

    def _configure_backorders(self) -> list[Msg]:
        msgs = []
        for pid, (mode, limit, until) in zip(self.bo_ids, BACKORDER_POLICIES, strict=True):
            p = self.products[pid] = Product(policy=(mode, limit, until == PAST))
            p.level("default")
            policy: dict[str, Any] = {"mode": mode}
            if limit is not None:
                policy["limit"] = limit
            if until:
                policy["until"] = until
            m = self._event("product.configured", {"product_id": pid, "backorder": policy})
            want = {"kind": "product", "product_id": pid, "backorder": {"mode": mode, "limit": limit}}
            msgs.append(
                self._expect(
                    m,
                    Expect(
                        [("inventory.configured", "")],
                        product_id=pid,
                        data=[("inventory.configured", None, want)],
                    ),
                )
            )
        return msgs

    def _bo_stock(self, pid: str, raised: dict[str, int], incoming: dict[str, int]) -> Msg | None:
        """A receipt or an increase (a fill after it races the round's orders), or more incoming."""
        p, rng = self.products[pid], self.rng
        roll = rng.random()
        expecting = [loc for loc, lv in p.levels.items() if lv.incoming > 0]
        if roll < 0.45:
            loc = rng.choice(expecting) if expecting and rng.random() < 0.7 else rng.choice(sorted(p.levels))
            q = rng.randint(1, 14)
            data: dict[str, Any] = {"product_id": pid, "quantity": q, "reason": "chaos"}
            type_, result = "stock.received", "inventory.moved"
            raised[pid] = raised.get(pid, 0) + q
        elif roll < 0.75 or p.policy is None or p.policy[0] != "incoming":
            loc, q = rng.choice(sorted(p.levels)), rng.randint(1, 6)
            data = {"product_id": pid, "delta": q, "reason": "chaos"}
            type_, result = "stock.adjusted", "inventory.adjusted"
            raised[pid] = raised.get(pid, 0) + q
        else:
            if pid in raised:  # a receipt lowers incoming: not both in one round
                return None
            loc, q = rng.choice(sorted(p.levels)), rng.randint(1, 8)
            data = {"product_id": pid, "delta": q, "name": "incoming", "reason": "chaos"}
            type_, result = "stock.adjusted", "inventory.adjusted"
            incoming[pid] = incoming.get(pid, 0) + q
        if loc != "default" or "name" in data or rng.random() < 0.5:
            data["location_id"] = loc
        m = self._event(type_, data)
        e = Expect([(result, "")], product_id=pid)
        self._expect(m, e)
        self.counts[f"{type_} (backorder product)"] = self.counts.get(f"{type_} (backorder product)", 0) + 1

        def apply(_: Any = None) -> None:
            lv = p.level(loc)
            if "name" in data:
                lv.incoming += q
                e.data = [(result, None, {"location_id": loc, "location": {"incoming": lv.incoming}})]
                return
            lv.on_hand += q
            here = {"on_hand": lv.on_hand, "reserved": lv.firm}
            if type_ == "stock.received":
                unexpected = max(0, q - lv.incoming)
                lv.incoming -= min(q, lv.incoming)
                want = {"kind": "receipt", "location_id": loc, "unexpected": unexpected}
                e.data = [(result, None, want | {"location": here | {"incoming": lv.incoming}})]
            elif loc != "default":  # an explicit default level answers as before (C3)
                e.data = [(result, None, {"location_id": loc, "location": here})]
            else:
                e.data = [(result, None, {"on_hand": p.on_hand, "reserved": p.firm})]

        self.bo_pending.append(BoOp(m.message_id, "stock", apply))
        return m

    def _bo_place(self, lines: dict[str, int]) -> Msg:
        """An order on backorder products (default channel), sure to be placed: what it reserves
        where and what it backorders depends on the round's order, read by the replay."""
        oid = self._new_order_id()
        o = self.orders[oid] = Order(backorder=True)
        m = self._event(
            "order.placed",
            {"order_id": oid, "lines": [{"product_id": k, "quantity": q} for k, q in lines.items()]},
        )
        self._expect(m, Expect([("inventory.reserved", "")], order_id=oid))  # completed by the replay
        o.placed_id = m.message_id
        self.bo_pending.append(
            BoOp(m.message_id, "place", lambda _: self._replay_place(m.message_id, oid, lines))
        )
        return m

    def _replay_place(self, eid: str, oid: str, lines: dict[str, int]) -> None:
        """The placement at its place in the replay: each line at the default channel's levels in
        order (default, east, west), the rest backordered within the product's headroom."""
        o, e = self.orders[oid], self.expect[eid]
        plan: dict[str, dict[str, int]] = {}
        for k, q in lines.items():
            p, left, at = self.products[k], q, {}
            for loc in CHAINS[None]:
                lv = p.levels.get(loc)
                n = min(left, max(0, lv.sellable - lv.firm)) if lv else 0
                if n:
                    at[loc], left = n, left - n
            if left > p.headroom():
                self.replay_problems.append(f"{oid}: {k} short by {left}, headroom only {p.headroom()}")
            plan[k] = at
            o.bo[k] = left
            p.backordered += left
            for loc, n in at.items():
                p.level(loc).firm += n
        o.status, o.lines, o.alloc, o.ever_reserved = "reserved", dict(lines), plan, True
        o.allocated = any(o.bo.values()) or any(set(at) != {"default"} for at in plan.values())
        if any(o.bo.values()):
            self.partb_outcomes["placements partly backordered"] = (
                self.partb_outcomes.get("placements partly backordered", 0) + 1
            )
        if o.allocated:
            e.results = [("inventory.reserved", ""), ("inventory.allocated", "")]
            e.allocated = {
                "channel_id": "default",
                "lines": sorted(
                    (
                        {
                            "product_id": k,
                            "quantity": lines[k],
                            "tracked": True,
                            "backordered": o.bo[k],
                            "allocations": sorted(
                                ({"location_id": loc, "quantity": n} for loc, n in at.items()),
                                key=lambda a: a["location_id"],
                            ),
                        }
                        for k, at in plan.items()
                    ),
                    key=lambda x: x["product_id"],
                ),
            }

    def _replay_fill(self, body: dict[str, Any]) -> None:
        """inventory.backorder_filled at its place: the oldest waiting order first (FIFO by
        created_at, order_id), at the levels of its channel in order, as much as each has."""
        d = body["data"]
        oid, o = d["order_id"], self.orders.get(d["order_id"])
        ks = {x["product_id"] for x in d["lines"]}
        if o is None or not o.backorder or o.status != "reserved" or len(ks) != 1:
            self.replay_problems.append(f"a fill of an order that cannot wait: {d}")
            return
        (k,) = ks
        p, need = self.products[k], o.bo.get(k, 0)
        got = [(x["location_id"], x["quantity"]) for x in d["lines"]]
        if sum(n for _, n in got) > need:
            self.replay_problems.append(f"{oid}: filled {got} of {k}, only {need} backordered")
            return
        older = [
            x
            for x, ox in self.orders.items()
            if ox.backorder
            and x != oid
            and ox.status == "reserved"
            and ox.bo.get(k, 0) > 0
            and ox.created is not None
            and o.created is not None
            and (ox.created, x) < (o.created, oid)
        ]
        if older:
            self.replay_problems.append(f"FIFO: {oid} filled with {k} before the older {older[:3]}")
        want = []
        for loc in CHAINS[None]:
            lv = p.levels.get(loc)
            n = min(need, max(0, lv.sellable - lv.firm)) if lv else 0
            if n:
                want.append((loc, n))
                need -= n
        if got != want:
            self.replay_problems.append(f"{oid}: filled {got} of {k}, the levels then gave {want}")
        for loc, n in got:
            o.alloc.setdefault(k, {})[loc] = o.alloc.get(k, {}).get(loc, 0) + n
            p.level(loc).firm += n
            o.bo[k] -= n
            p.backordered -= n
        remaining = [{"product_id": x, "quantity": o.bo[x]} for x in o.lines if o.bo.get(x, 0) > 0]
        if d["backordered_remaining"] != remaining:
            self.replay_problems.append(
                f"{oid}: backordered_remaining {d['backordered_remaining']}, model {remaining}"
            )
        who = "by the sweeper" if body["causation_id"] == o.placed_id else "by the event"
        self.partb_outcomes[f"fills {who}"] = self.partb_outcomes.get(f"fills {who}", 0) + 1

    def _replay_complete(self, eid: str, oid: str, got: list[dict[str, Any]]) -> None:
        """A completion of an order with backordered units, racing the fills of its round."""
        o, e = self.orders[oid], self.expect[eid]
        if sum(o.bo.values()) == 0:
            e.results = [("inventory.committed", "")]
            self._sm_commit(oid, eid)
            outcome = "completion after its fill: committed"
        else:
            e.results = [("inventory.rejected", "backorder_pending")]
            outcome = "completion before its fill: backorder_pending"
        self.partb_outcomes[outcome] = self.partb_outcomes.get(outcome, 0) + 1

    def _bo_round(self, size: int, touched: set[str]) -> list[Msg]:
        """The round's events on backorder products: stock arriving (fills), events of their
        orders, new orders within what is sure to be placed, orders sure to be refused."""
        if not self.bo_ids:
            return []
        rng, msgs = self.rng, []
        raised: dict[str, int] = {}  # on_hand that may arrive in the round (bounds a sure refusal)
        incoming: dict[str, int] = {}
        for pid in self.bo_ids:
            if rng.random() < 0.4:
                m = self._bo_stock(pid, raised, incoming)
                if m:
                    msgs.append(m)
        orders = [oid for oid, o in self.orders.items() if o.backorder and oid not in touched]
        live = [oid for oid in orders if self.orders[oid].status == "reserved"]
        for oid in rng.sample(live, min(len(live), rng.randint(0, max(1, size // 8)))):
            o = self.orders[oid]
            touched.add(oid)
            roll = rng.random()
            if sum(o.bo.values()) and rng.random() < 0.25:
                # an extension locks only the order's row: a fill meeting it skips the order and
                # ends its pass there (FIFO), so the elected sweeper's fill pass finishes it
                msgs.append(self._extend(oid))
            elif roll < 0.30 and any(o.reserved(k) for k in o.lines):
                msgs.append(self._fulfil(oid))
            elif roll < 0.48:
                msgs.append(self._cancel_lines(oid))
            elif roll < 0.56:
                msgs.append(self._cancel(oid))
            elif roll < 0.76:
                msgs.append(self._complete(oid))
            elif roll < 0.84:
                msgs.append(self._extend(oid))
            elif roll < 0.88 and o.fids:
                msgs.append(self._fulfil_again(oid))
            elif roll < 0.94:
                msgs.append(self._fulfil(oid, rng.choice(["exceeds_reserved", "unknown_line"])))
            else:
                msgs.append(self._cancel_lines(oid, rng.choice(["exceeds_open_quantity", "unknown_line"])))
        done = [oid for oid in orders if oid not in touched and self._returnable(self.orders[oid])]
        for oid in rng.sample(done, min(len(done), rng.randint(0, 2))):
            touched.add(oid)
            roll = rng.random()
            if roll < 0.15 and self.orders[oid].rids:
                msgs.append(self._return_again(oid))
            else:
                m, levels = self._return(oid, refuse=roll < 0.3)
                msgs.append(m)
                for k, _ in levels:
                    raised[k] = raised.get(k, 0) + self.orders[oid].fulfilled[k]
        # new orders: together within available + headroom at the start of the round (a fill
        # only moves units from one to the other, a release or an arrival adds to them)
        budget = {
            k: p.available()
            + (0 if k in raised and p.policy and p.policy[0] == "incoming" else min(40, p.headroom()))
            for k, p in ((k, self.products[k]) for k in self.bo_ids)
        }
        stocked = {k: self.products[k].available() for k in self.bo_ids}  # to ask for more, often
        for _ in range(rng.randint(1, 3)):
            lines = {}
            for k in rng.sample(self.bo_ids, rng.randint(1, 2)):
                if budget[k] > stocked[k] and rng.random() < 0.6:  # more than there is: backordered
                    lines[k] = rng.randint(stocked[k] + 1, min(budget[k], stocked[k] + 8))
                elif budget[k] > 0:
                    lines[k] = rng.randint(1, min(budget[k], 10))
                else:
                    continue
                budget[k] -= lines[k]
                stocked[k] = max(0, stocked[k] - lines[k])
            if lines:
                msgs.append(self._bo_place(lines))
        if rng.random() < 0.3:  # sure to be refused: above every unit there and every promise
            k = rng.choice(self.bo_ids)
            p = self.products[k]
            mode, limit, passed = p.policy or ("deny", 0, True)
            most = 0 if passed else UNLIMITED if limit is None and mode == "allow" else (limit or UNLIMITED)
            if mode == "incoming" and not passed:
                most = min(most, sum(lv.incoming for lv in p.levels.values()) + incoming.get(k, 0))
            ceiling = p.on_hand + raised.get(k, 0) + most
            if ceiling + 5 <= MAX_QTY:
                oid = self._new_order_id()
                self.orders[oid] = Order(backorder=True)
                q = ceiling + rng.randint(1, 5)
                m = self._event(
                    "order.placed", {"order_id": oid, "lines": [{"product_id": k, "quantity": q}]}
                )
                msgs.append(
                    self._expect(
                        m,
                        Expect([("inventory.rejected", "insufficient_stock")], order_id=oid, must_short={k}),
                    )
                )
                self.counts["order.placed (beyond backorder headroom)"] = (
                    self.counts.get("order.placed (beyond backorder headroom)", 0) + 1
                )
        return msgs

    def _bo_final(self) -> list[Msg]:
        """Ends every order on backorder products: completes those with nothing backordered
        (or cancels them), cancels the others."""
        msgs = []
        for oid, o in list(self.orders.items()):
            if o.backorder and o.status == "reserved":
                if not sum(o.bo.values()) and self.rng.random() < 0.5:
                    msgs.append(self._complete(oid))
                else:
                    msgs.append(self._cancel(oid))
        return msgs

    def replay(self, rows: list[tuple[int, dict[str, Any]]], created: dict[str, Any]) -> None:
        """After a round (and once no fill is due): the round's events on backorder products and
        every fill since the last replay, in the order the worker applied them (outbox ids: every
        message about a product is written under its row lock), each checked and applied."""
        ops = {op.eid: op for op in self.bo_pending}
        self.bo_pending = []
        for oid, at in created.items():
            self.orders[oid].created = at
        by_cause: dict[str, list[dict[str, Any]]] = {}
        first: dict[str, int] = {}
        items: list[tuple[int, str, Any]] = []
        for oid_, body in rows:
            if body["type"] == "inventory.backorder_filled":
                if body["id"] not in self.fills_seen:
                    self.fills_seen.add(body["id"])
                    items.append((oid_, "fill", body))
            elif body.get("causation_id") in ops:
                by_cause.setdefault(body["causation_id"], []).append(body)
                first.setdefault(body["causation_id"], oid_)
        items += [(at, "op", eid) for eid, at in first.items()]
        for eid in ops:
            if eid not in first:
                self.replay_problems.append(f"{eid} ({ops[eid].kind}): applied, but no result was written")
        for _, kind, x in sorted(items, key=lambda i: i[0]):
            if kind == "fill":
                self._replay_fill(x)
            else:
                ops[x].apply(by_cause[x])
        for k in self.bo_ids:
            p = self.products[k]
            if p.backordered and p.available():
                self.replay_problems.append(
                    f"round {self.round_no}: {k} has {p.backordered} backordered and {p.available()} available"
                )

    # -- rounds -----------------------------------------------------------------------------

    def _stock_ops(self, adjusted: list[str]) -> list[Msg]:
        """One stock event per adjusted product (bulk and transfers take several of them)."""
        rng, msgs = self.rng, []
        todo = list(adjusted)
        while todo:
            pid = todo.pop()
            p = self.products[pid]
            roll = rng.random()
            if roll < 0.30 or (not p.multi and roll < 0.45):
                loc = rng.choice(sorted(p.levels))
                cas = rng.choice([None, None, "right", "wrong"])
                msgs.append(self._adjust(pid, refuse=rng.random() < 0.25, loc=loc, cas=cas))
            elif roll < 0.50:
                msgs.append(self._move(pid))
            elif roll < 0.70:
                others = [todo.pop() for _ in range(min(len(todo), rng.randint(0, 2)))]
                msgs.append(self._transfer([pid, *others]))
            elif roll < 0.85:
                msgs.append(self._receive(pid))
            else:
                others = [todo.pop() for _ in range(min(len(todo), rng.randint(1, 2)))]
                msgs.append(self._bulk([pid, *others]))
        return msgs

    def round(self, size: int, poison_rate: float = 0.03) -> list[Msg]:
        """The model's next round: `size` events (before duplication), all order-independent."""
        rng = self.rng
        self.round_no += 1
        msgs: list[Msg] = []
        touched: set[str] = set()  # orders with an event in this round
        adjusted = set(rng.sample(self.product_ids, k=max(1, len(self.product_ids) // 10)))
        # on_hand only falls during a round (commits; raised by the racing counts, noted at once):
        # its value now bounds what can be available in it
        self._ceiling = {
            (k, loc): lv.on_hand for k, p in self.products.items() for loc, lv in p.levels.items()
        }
        self._old_transfers = list(self.transfers)
        msgs.extend(self._stock_ops(sorted(adjusted)))
        budget = {
            (k, loc): lv.worst_free
            for k, p in self.products.items()
            if k not in adjusted
            for loc, lv in p.levels.items()
        }
        free = [k for k in self.product_ids if k not in adjusted]
        used: set[str] = set()  # products any order event of the round touches
        claimed: set[str] = set()  # products of a split placement: nothing else touches them
        cas_levels: set[tuple[str, str]] = set()  # no completion holds these but the racing one

        def clear(o: Order) -> bool:
            return (
                not o.backorder and not (set(o.lines) & (adjusted | claimed)) and not (o.holds() & cas_levels)
            )

        # returns first: they raise on_hand, so their products are left to them in the round
        returnable = [
            oid
            for oid, o in self.orders.items()
            if o.status in ("committed", "reserved") and self._returnable(o) and clear(o) and not o.short
        ]
        for oid in rng.sample(returnable, min(len(returnable), rng.randint(0, 2))):
            o = self.orders[oid]
            if not clear(o):
                continue
            touched.add(oid)
            roll = rng.random()
            if roll < 0.15 and o.rids:
                msgs.append(self._return_again(oid))
            else:
                m, levels = self._return(oid, refuse=roll < 0.3)
                msgs.append(m)
                for k, loc in levels:
                    self._ceiling[(k, loc)] = self._ceiling.get((k, loc), 0) + o.lines[k]
            used.update(o.lines)
            claimed.update(o.lines)

        # splits over two locations, on products nothing else touches in the round (first: they need those)
        for _ in range(rng.randint(0, 2)):
            channel = rng.choice([None, "web"])
            chain = CHAINS[channel]
            cands = [
                k
                for k in free
                if k not in used
                and all(
                    not self.products[k].levels.get(loc, Level()).expirable
                    and self.products[k].levels.get(loc, Level()).worst_free > 0
                    for loc in chain[:2]
                )
            ]
            if not cands:
                continue
            k = rng.choice(cands)
            first = self.products[k].level(chain[0]).worst_free
            rest = rng.randint(1, min(8, self.products[k].level(chain[1]).worst_free))
            oid = self._new_order_id()
            touched.add(oid)
            used.add(k)
            claimed.add(k)
            self.counts["order.placed (split)"] = self.counts.get("order.placed (split)", 0) + 1
            msgs.append(
                self._place(
                    oid,
                    {k: first + rest},
                    False,
                    budget,
                    channel=channel,
                    split={k: {chain[0]: first, chain[1]: rest}},
                )
            )

        # compare-and-set counts racing the orders of the round
        for _ in range(rng.randint(0, 2)):
            levels = [
                (k, loc) for k in free if k not in used for loc in self.products[k].levels if loc != "default"
            ]
            if not levels:
                break
            k, loc = rng.choice(levels)
            racers = [
                oid
                for oid, o in self.orders.items()
                if o.status == "reserved" and oid not in touched and (k, loc) in o.holds() and clear(o)
            ]
            racer = rng.choice(racers) if racers and rng.random() < 0.7 else None
            if racer:
                touched.add(racer)
                used.update(self.orders[racer].lines)
            used.add(k)
            cas_levels.add((k, loc))
            msgs.extend(self._cas_race(k, loc, budget, racer))

        def lines_for(channel: str | None, max_lines: int = 10) -> tuple[dict[str, int], dict[str, str]]:
            chain = CHAINS[channel]
            pool = [k for k in free if k not in claimed and (chain[0] in self.products[k].levels)]
            pool = pool or [k for k in free if k not in claimed and self.products[k].multi]
            if not pool:
                return {}, {}
            lines, pins = {}, {}
            for k in rng.sample(pool, rng.randint(1, min(max_lines, len(pool)))):
                at = chain[0]
                if (
                    self.products[k].multi and rng.random() < 0.3
                ):  # a pin (at default: a level off the channel too)
                    at = rng.choice([loc for loc in self.products[k].levels if loc in chain] or [chain[0]])
                    pins[k] = at
                avail = budget.get((k, at), 0)
                if avail <= 0:
                    pins.pop(k, None)
                    continue
                lines[k] = rng.randint(1, max(1, min(avail, 8)))
            return lines, pins

        # late placements of orders cancelled or completed before being placed
        for oid in list(self.pending_place):
            if len(msgs) >= size:
                break
            self.pending_place.remove(oid)
            touched.add(oid)
            lines, pins = lines_for(None)
            used.update(lines)
            msgs.append(self._place(oid, lines or {self.unknown_ids[0]: 1}, False, budget, pins=pins))
        while len(msgs) < size:
            roll = rng.random()
            reserved = [
                oid
                for oid, o in self.orders.items()
                if o.status == "reserved" and oid not in touched and clear(o)
            ]
            if roll < 0.15:  # Part B on orders of plain products: exact, applied at once
                m = self._partb_op(reserved, touched)
                if m:
                    msgs.append(m)
                continue
            roll = rng.random()
            if roll < 0.42:  # a new placement meant to succeed (or a rejected order placed again)
                retry = [
                    oid
                    for oid, o in self.orders.items()
                    if o.status is None and o.rejections and oid not in touched and not o.backorder
                ]
                oid = rng.choice(retry) if retry and rng.random() < 0.3 else self._new_order_id()
                channel = rng.choice([None, None, "web"])
                lines, pins = lines_for(channel)
                short = rng.random() < 0.25
                if (
                    short
                ):  # short holds stay off the default level of multi-location products: room for splits
                    lines = {
                        k: q
                        for k, q in lines.items()
                        if not self.products[k].multi or pins.get(k, CHAINS[channel][0]) != "default"
                    }
                if not lines:
                    continue
                touched.add(oid)
                used.update(lines)
                msgs.append(
                    self._place(
                        oid,
                        lines,
                        short,
                        budget,
                        channel=channel,
                        pins={k: loc for k, loc in pins.items() if k in lines},
                    )
                )
            elif roll < 0.50:  # meant to fail: above on_hand, an unknown product, a pin off the channel
                oid = self._new_order_id()
                channel = rng.choice([None, "web"])
                chain = CHAINS[channel]
                lines, pins = lines_for(channel, max_lines=3)
                pool = [k for k in free if k not in claimed]
                what = rng.random()
                if what < 0.25 or not pool:
                    lines[rng.choice(self.unknown_ids)] = rng.randint(1, 5)
                elif what < 0.4 and channel == "web" and [k for k in pool if self.products[k].multi]:
                    k = rng.choice([k for k in pool if self.products[k].multi])
                    lines[k], pins[k] = 1, "default"  # default is not among web's locations
                else:
                    k = rng.choice(pool)
                    at = [pins[k]] if k in pins else chain
                    ceiling = sum(self._ceiling.get((k, loc), 0) for loc in at)
                    if ceiling + 10 > MAX_QTY:
                        continue
                    lines.pop(k, None)
                    lines[k] = ceiling + rng.randint(1, 10)
                touched.add(oid)
                used.update(k for k in lines if k in self.products)
                msgs.append(self._place(oid, lines, False, budget, channel=channel, pins=pins))
            elif roll < 0.62 and reserved:  # complete (short ones too: they commit either way)
                oid = rng.choice(reserved)
                touched.add(oid)
                used.update(self.orders[oid].lines)
                msgs.append(self._complete(oid))
            elif roll < 0.72 and reserved:  # cancel a long reservation
                long_ = [oid for oid in reserved if not self.orders[oid].short]
                if not long_:
                    continue
                oid = rng.choice(long_)
                touched.add(oid)
                used.update(self.orders[oid].lines)
                msgs.append(self._cancel(oid))
            elif roll < 0.80:  # reordered: cancel or complete before the placement
                oid = self._new_order_id()
                touched.add(oid)
                msgs.append(self._cancel(oid) if rng.random() < 0.6 else self._complete(oid))
                self.pending_place.append(oid)
            elif roll < 0.88:  # events for orders already done: rejected or ignored, changing nothing
                done = [
                    oid
                    for oid, o in self.orders.items()
                    if o.status in ("committed", "released", "cancelled")
                    and oid not in touched
                    and not o.backorder
                ]
                if not done:
                    continue
                oid = rng.choice(done)
                touched.add(oid)
                msgs.append(self._complete(oid) if rng.random() < 0.5 else self._cancel(oid))
            elif roll < 0.90:  # an applied transfer_id again under a new message id
                m = self._transfer_again()
                if m:
                    msgs.append(m)
            else:  # a second placement of a reserved or finished order, under a new id
                placed = [
                    oid
                    for oid, o in self.orders.items()
                    if o.status in ("reserved", "committed", "released", "expired")
                    and oid not in touched
                    and clear(o)
                ]
                if not placed:
                    continue
                oid = rng.choice(placed)
                touched.add(oid)
                msgs.append(self._place(oid, dict(self.orders[oid].lines) or {free[0]: 1}, False, budget))
        msgs.extend(self._bo_round(size, touched))
        n_poison = sum(1 for _ in range(size) if rng.random() < poison_rate)
        msgs.extend(self._poison() for _ in range(n_poison))
        return msgs

    def _partb_op(self, reserved: list[str], touched: set[str]) -> Msg | None:
        """One event of Part B on an order of plain products (no backorders: the outcome and
        where units go are exact): a shipment, a partial cancel, an extension (a short hold's
        races the sweeper), a refusal, a fulfilment_id again, an extension of a finished order."""
        rng = self.rng
        live = [oid for oid in reserved if self._live(self.orders[oid])]
        short = [oid for oid in reserved if self.orders[oid].short]
        roll = rng.random()
        if roll < 0.30 and live:
            oid = rng.choice(live)
            refuse = rng.choice(["exceeds_reserved", "unknown_line"]) if rng.random() < 0.12 else None
            m = self._fulfil(oid, refuse)
        elif roll < 0.52 and live:
            oid = rng.choice(live)
            refuse = rng.choice(["exceeds_open_quantity", "unknown_line"]) if rng.random() < 0.12 else None
            m = self._cancel_lines(oid, refuse)
        elif roll < 0.72 and short:
            oid = rng.choice(short)
            m = self._extend(oid)
        elif roll < 0.82 and live:
            oid = rng.choice(live)
            m = self._extend(oid)
        elif roll < 0.90:
            with_fids = [
                oid for oid, o in self.orders.items() if o.fids and oid not in touched and not o.backorder
            ]
            if not with_fids:
                return None
            oid = rng.choice(with_fids)
            m = self._fulfil_again(oid)
        else:  # extensions refused: unknown, completed or cancelled orders
            ended = [
                oid
                for oid, o in self.orders.items()
                if o.status in ("committed", "released", "cancelled")
                and oid not in touched
                and not o.backorder
            ]
            oid = (
                rng.choice(ended)
                if ended and rng.random() < 0.7
                else f"unknown-{self.seed}-{self.rng.randint(0, 10**9)}"
            )
            m = self._extend(oid)
        touched.add(oid)
        return m

    def pending_round(self) -> list[Msg]:
        """The placements still owed to orders cancelled or completed before them."""
        self._ceiling = {
            (k, loc): lv.on_hand for k, p in self.products.items() for loc, lv in p.levels.items()
        }
        budget = {(k, loc): lv.worst_free for k, p in self.products.items() for loc, lv in p.levels.items()}
        msgs = []
        for oid in self.pending_place:
            lines: dict[str, int] = {}
            for k in self.rng.sample(self.product_ids, self.rng.randint(1, 5)):
                if budget.get((k, "default"), 0) > 0:
                    lines[k] = self.rng.randint(1, min(budget[(k, "default")], 8))
            msgs.append(self._place(oid, lines or {self.unknown_ids[0]: 1}, False, budget))
        self.pending_place = []
        return msgs

    def final_round(self) -> list[Msg]:
        """Ends every long reservation, so every order reaches a terminal outcome."""
        msgs = []
        for oid, o in list(self.orders.items()):
            if o.status == "reserved" and not o.short and not o.backorder:
                msgs.append(self._complete(oid) if self.rng.random() < 0.5 else self._cancel(oid))
        return msgs + self._bo_final()

    def duplicated(self, msgs: list[Msg], delay_share: float = 0.2, reorder: bool = True) -> list[Msg]:
        """Every message twice: the copy right away or held for a later round; then shuffled."""
        out = list(self.delayed)
        self.delayed = []
        for m in msgs:
            out.append(m)
            if self.rng.random() < delay_share:
                self.delayed.append(m)
            else:
                out.append(m)
        if reorder:
            self.rng.shuffle(out)
        return out

    def flush_delayed(self) -> list[Msg]:
        out, self.delayed = self.delayed, []
        return out

    # -- the final expectations -------------------------------------------------------------

    def expected_figures(self) -> dict[str, tuple[int, int]]:
        """(on_hand, reserved) per product once every short reservation has expired."""
        return {k: (p.on_hand, p.firm) for k, p in self.products.items()}

    def expected_levels(self) -> dict[tuple[str, str], tuple[int, int, int, int, int]]:
        """(on_hand, reserved, damaged, quality_control, incoming) per level, all-zero ones left out."""
        return {
            (k, loc): lv.figures()
            for k, p in self.products.items()
            for loc, lv in p.levels.items()
            if any(lv.figures())
        }

    def expected_backordered(self) -> dict[str, int]:
        return {k: self.products[k].backordered for k in self.bo_ids}

    def expected_lines(
        self,
    ) -> dict[str, dict[str, tuple[int, int, int, int, int, dict[str, tuple[int, int]]]]]:
        """Every allocated order's lines as order_lines and order_allocations must keep them:
        product -> (quantity, fulfilled, released, returned, backordered, {location: (reserved,
        fulfilled)}); quantity = reserved + fulfilled + backordered + released, returned <= fulfilled."""
        out = {}
        for oid, o in self.orders.items():
            if o.allocated and o.status in ("reserved", "committed", "released", "expired"):
                out[oid] = {
                    k: (
                        q,
                        o.fulfilled.get(k, 0),
                        o.released.get(k, 0),
                        o.returned.get(k, 0),
                        o.bo.get(k, 0),
                        {loc: (r, o.done.get(k, {}).get(loc, 0)) for loc, r in o.alloc.get(k, {}).items()},
                    )
                    for k, q in o.lines.items()
                }
        return out

    def expected_allocated(self) -> dict[str, bool]:
        """orders.allocated of every order that holds or held stock."""
        return {
            oid: o.allocated
            for oid, o in self.orders.items()
            if o.status in ("reserved", "committed", "released", "expired") and o.ever_reserved
        }

    def expected_multi(self) -> dict[str, bool]:
        return {k: p.multi for k, p in self.products.items()}

    def finish(self) -> None:
        """At the end every short reservation still held expires."""
        for oid, o in self.orders.items():
            if o.status == "reserved" and o.short:
                for k, at in o.alloc.items():
                    for loc in at:
                        self.products[k].level(loc).expirable.pop(oid, None)
                o.status = "expired"
                self.expect[o.placed_id].results.append(("inventory.expired", ""))
                self.expect[o.placed_id].optional = []
            elif o.placed_id and o.short and not o.expired_maybe:
                self.expect[o.placed_id].optional = []

    def final_status(self) -> dict[str, str]:
        return {oid: (o.status or "rejected") for oid, o in self.orders.items()}
