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
Duplicates may be delayed to later rounds: the copy is absorbed by the message id whenever it
arrives. `inventory.low_stock` depends on the order inside a round and is not checked;
`inventory.back_in_stock` (decision 13.7: `available` from 0 to above it, any cause, the sweeper
included) does too, and is only checked to come from an event that can raise `available`.
"""

from __future__ import annotations

import json
import random
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

    def holds(self) -> set[tuple[str, str]]:
        return {(k, loc) for k, a in self.alloc.items() for loc in a}


@dataclass
class Race:
    """Compare-and-set counts at one level whose outcome depends on the order of application."""

    pid: str
    loc: str
    before: int  # on_hand at the start of the round (the counts' change_from)
    counts: list[tuple[str, int]]  # (event id, target on_hand)
    completed: int = 0  # units a racing completion takes from the level (0: the race is count vs count)


class Workload:
    def __init__(self, seed: int, products: int = 40, unknown_products: int = 3) -> None:
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
        legal result set for that interleaving (an illegal one, such as two counts applied, fails)."""
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
        o = self.orders.setdefault(oid, Order())
        m = self._event("order.cancelled", {"order_id": oid})
        e = Expect([], order_id=oid)
        if o.status is None:
            o.status = "cancelled"  # remembered: the late placement is rejected
        elif o.status == "reserved":
            assert not o.short, "short-TTL orders are never cancelled (released vs expired is timing)"
            for k, at in o.alloc.items():
                for loc, q in at.items():
                    self.products[k].level(loc).firm -= q
            o.status = "released"
            e.results = [("inventory.released", "")]
        self.expect[m.message_id] = e
        return m

    def _complete(self, oid: str) -> Msg:
        o = self.orders.setdefault(oid, Order())
        m = self._event("order.completed", {"order_id": oid})
        e = Expect([], order_id=oid)
        if o.status in ("cancelled", "released"):
            e.results = [("inventory.rejected", "order_cancelled")]
        elif o.status == "reserved":
            for k, at in o.alloc.items():
                for loc, q in at.items():
                    lv = self.products[k].level(loc)
                    lv.on_hand -= q
                    if o.short:
                        del lv.expirable[oid]
                    else:
                        lv.firm -= q
            o.status = "committed"
            o.expired_maybe = o.short
            e.results = [("inventory.committed", "")]
        self.expect[m.message_id] = e
        return m

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
            return not (set(o.lines) & (adjusted | claimed)) and not (o.holds() & cas_levels)

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
            if roll < 0.42:  # a new placement meant to succeed (or a rejected order placed again)
                retry = [
                    oid
                    for oid, o in self.orders.items()
                    if o.status is None and o.rejections and oid not in touched
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
                    if o.status in ("committed", "released", "cancelled") and oid not in touched
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
        n_poison = sum(1 for _ in range(size) if rng.random() < poison_rate)
        msgs.extend(self._poison() for _ in range(n_poison))
        return msgs

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
        for oid, o in self.orders.items():
            if o.status == "reserved" and not o.short:
                msgs.append(self._complete(oid) if self.rng.random() < 0.5 else self._cancel(oid))
        return msgs

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
