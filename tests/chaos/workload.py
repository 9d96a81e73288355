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
Duplicates may be delayed to later rounds: the copy is absorbed by the message id whenever it
arrives. `inventory.low_stock` depends on the order inside a round and is not checked;
`inventory.back_in_stock` (decision 13.7: `available` from 0 to above it, any cause, the sweeper
included) does too, and is only checked to come from an event that can raise `available`.
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

SHORT_TTL_CHOICES = (1, 2, 3)
MAX_QTY = 1_000_000


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
    on_hand: int | None = None  # for inventory.adjusted
    must_short: set[str] = field(default_factory=set)  # products that must be among the shortages


@dataclass
class Product:
    on_hand: int = 0
    firm: int = 0  # reserved by orders that cannot expire during the run
    expirable: dict[str, int] = field(default_factory=dict)  # short-TTL order -> quantity

    @property
    def worst_available(self) -> int:
        return self.on_hand - self.firm - sum(self.expirable.values())


@dataclass
class Order:
    status: str | None = None  # None (never reserved, or rejected), reserved, committed, released, expired, cancelled
    lines: dict[str, int] = field(default_factory=dict)
    short: bool = False
    placed_id: str | None = None
    ever_reserved: bool = False
    rejections: int = 0
    expired_maybe: bool = False  # short order completed: may have expired before


class Workload:
    def __init__(self, seed: int, products: int = 40, unknown_products: int = 3) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        tag = uuid.UUID(int=random.Random(seed).getrandbits(128)).hex[:6]
        self.product_ids = [f"CH{tag}-{i:03d}" for i in range(products)]
        self.unknown_ids = [f"NOPE{tag}-{i}" for i in range(unknown_products)]
        self.products: dict[str, Product] = {}
        self.orders: dict[str, Order] = {}
        self.expect: dict[str, Expect] = {}
        self.poison_ids: list[str] = []
        self.delayed: list[Msg] = []  # duplicate copies held back for a later round
        self.pending_place: list[str] = []  # orders cancelled/completed before their placement
        self._order_seq = 0
        self._ceiling: dict[str, int] = {}  # on_hand at the start of the round being generated
        self.counts: dict[str, int] = {}
        self.types: dict[str, str] = {}  # event id -> type

    # -- messages ---------------------------------------------------------------------------

    def _event(self, type_: str, data: dict[str, Any]) -> Msg:
        event_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        body = {"id": event_id, "type": type_,
                "occurred_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"), "data": data}
        self.counts[type_] = self.counts.get(type_, 0) + 1
        self.types[event_id] = type_
        return Msg(type_, json.dumps(body).encode(), event_id, event=body)

    def _poison(self) -> Msg:
        marker = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        kind = self.rng.choice(["not_json", "wrong_key", "bad_quantity", "unknown_field", "no_id", "not_object"])
        good = {"id": marker, "type": "order.placed", "occurred_at": "2026-01-01T00:00:00Z",
                "data": {"order_id": f"poison-{marker[:8]}", "lines": [{"product_id": self.product_ids[0],
                                                                         "quantity": 1}]}}
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
        else:
            body = json.dumps([marker]).encode()
        self.poison_ids.append(marker)
        self.counts["poison"] = self.counts.get("poison", 0) + 1
        return Msg(key, body, marker, poison=True)

    def _new_order_id(self) -> str:
        self._order_seq += 1
        return f"o{self.seed}-{self._order_seq}"

    # -- the model's transitions (applied as the round is generated) ------------------------

    def _adjust(self, pid: str, *, refuse: bool | None = None) -> Msg:
        p = self.products.get(pid)
        if p is None:  # creation
            target = self.rng.randint(30, 200)
            m = self._event("stock.adjusted", {"product_id": pid, "on_hand": target})
            self.products[pid] = Product(on_hand=target)
            self.expect[m.message_id] = Expect([("inventory.adjusted", "")], product_id=pid, on_hand=target)
            return m
        all_reserved = p.firm + sum(p.expirable.values())
        if refuse and p.firm > 0:
            # below the firm reservations: refused whether or not the short ones expired
            target = self.rng.randint(0, p.firm - 1)
            reason = "below_reserved"
        elif refuse:
            target, reason = -self.rng.randint(1, 5), "negative_on_hand"
        else:
            target = max(all_reserved, p.on_hand + self.rng.randint(-20, 60))
            reason = ""
        if self.rng.random() < 0.5:
            data: dict[str, Any] = {"product_id": pid, "delta": target - p.on_hand}
        else:
            if target < 0:
                data = {"product_id": pid, "delta": target - p.on_hand}
            else:
                data = {"product_id": pid, "on_hand": target}
        data["reason"] = "chaos"
        m = self._event("stock.adjusted", data)
        if reason:
            self.expect[m.message_id] = Expect([("inventory.adjustment_rejected", reason)], product_id=pid)
        else:
            p.on_hand = target
            self.expect[m.message_id] = Expect([("inventory.adjusted", "")], product_id=pid, on_hand=target)
        return m

    def _place(self, oid: str, lines: dict[str, int], short: bool, budget: dict[str, int]) -> Msg:
        o = self.orders.setdefault(oid, Order())
        data: dict[str, Any] = {"order_id": oid,
                                "lines": [{"product_id": k, "quantity": q} for k, q in lines.items()]}
        if short:
            data["reservation_ttl_seconds"] = self.rng.choice(SHORT_TTL_CHOICES)
        m = self._event("order.placed", data)
        e = Expect([], order_id=oid)
        if o.status == "cancelled":
            e.results = [("inventory.rejected", "order_cancelled")]
        elif o.status is not None:
            e.results = []  # duplicate_order: never reserves twice
        else:
            unknown = [k for k in lines if k not in self.products]
            short_of = [k for k, q in lines.items() if k in self.products and q > budget.get(k, 0)]
            if unknown:
                e.results, e.must_short = [("inventory.rejected", "unknown_product")], set(unknown)
                o.rejections += 1
            elif short_of:
                # only ever generated with a line above on_hand: a sure shortage
                sure = {k for k in short_of if lines[k] > self._ceiling.get(k, self.products[k].on_hand)}
                assert sure, "a placement meant to fail must ask for more than on_hand"
                e.results, e.must_short = [("inventory.rejected", "insufficient_stock")], sure
                o.rejections += 1
            else:
                for k, q in lines.items():
                    budget[k] -= q
                    if short:
                        self.products[k].expirable[oid] = q
                    else:
                        self.products[k].firm += q
                o.status, o.lines, o.short, o.placed_id, o.ever_reserved = "reserved", dict(lines), short, \
                    m.message_id, True
                e.results = [("inventory.reserved", "")]
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
            for k, q in o.lines.items():
                self.products[k].firm -= q
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
            for k, q in o.lines.items():
                p = self.products[k]
                p.on_hand -= q
                if o.short:
                    del p.expirable[oid]
                else:
                    p.firm -= q
            o.status = "committed"
            o.expired_maybe = o.short
            e.results = [("inventory.committed", "")]
        self.expect[m.message_id] = e
        return m

    # -- rounds -----------------------------------------------------------------------------

    def first_round(self) -> list[Msg]:
        return [self._adjust(pid) for pid in self.product_ids]

    def round(self, size: int, poison_rate: float = 0.03) -> list[Msg]:
        """The model's next round: `size` events (before duplication), all order-independent."""
        rng = self.rng
        msgs: list[Msg] = []
        touched: set[str] = set()  # orders with an event in this round
        adjusted = set(rng.sample(self.product_ids, k=max(1, len(self.product_ids) // 10)))
        # on_hand only falls during a round (commits): its value now bounds what can be available
        self._ceiling = {k: p.on_hand for k, p in self.products.items()}
        for pid in adjusted:
            msgs.append(self._adjust(pid, refuse=rng.random() < 0.25))
        budget = {k: p.worst_available for k, p in self.products.items() if k not in adjusted}
        free = [k for k in self.product_ids if k not in adjusted]

        def clear(o: Order) -> bool:
            return not (set(o.lines) & adjusted)

        # late placements of orders cancelled or completed before being placed
        for oid in list(self.pending_place):
            if len(msgs) >= size:
                break
            self.pending_place.remove(oid)
            touched.add(oid)
            msgs.append(self._place(oid, self._lines(free, budget, fit=True) or {self.unknown_ids[0]: 1}, False,
                                   budget))
        while len(msgs) < size:
            roll = rng.random()
            reserved = [oid for oid, o in self.orders.items()
                        if o.status == "reserved" and oid not in touched and clear(o)]
            if roll < 0.40:  # a new placement meant to succeed (or a rejected order placed again)
                retry = [oid for oid, o in self.orders.items()
                         if o.status is None and o.rejections and oid not in touched]
                oid = rng.choice(retry) if retry and rng.random() < 0.3 else self._new_order_id()
                lines = self._lines(free, budget, fit=True)
                if not lines:
                    continue
                touched.add(oid)
                msgs.append(self._place(oid, lines, rng.random() < 0.25, budget))
            elif roll < 0.50:  # meant to fail: above on_hand, or an unknown product
                oid = self._new_order_id()
                lines = self._lines(free, budget, fit=True, max_lines=3) or {}
                if rng.random() < 0.3 or not free:
                    lines[rng.choice(self.unknown_ids)] = rng.randint(1, 5)
                else:
                    k = rng.choice(free)
                    if self._ceiling[k] + 10 > MAX_QTY:
                        continue
                    lines.pop(k, None)
                    lines[k] = self._ceiling[k] + rng.randint(1, 10)
                touched.add(oid)
                msgs.append(self._place(oid, lines, False, budget))
            elif roll < 0.62 and reserved:  # complete (short ones too: they commit either way)
                oid = rng.choice(reserved)
                touched.add(oid)
                msgs.append(self._complete(oid))
            elif roll < 0.72 and reserved:  # cancel a long reservation
                long_ = [oid for oid in reserved if not self.orders[oid].short]
                if not long_:
                    continue
                oid = rng.choice(long_)
                touched.add(oid)
                msgs.append(self._cancel(oid))
            elif roll < 0.80:  # reordered: cancel or complete before the placement
                oid = self._new_order_id()
                touched.add(oid)
                msgs.append(self._cancel(oid) if rng.random() < 0.6 else self._complete(oid))
                self.pending_place.append(oid)
            elif roll < 0.90:  # events for orders already done: rejected or ignored, changing nothing
                done = [oid for oid, o in self.orders.items()
                        if o.status in ("committed", "released", "cancelled") and oid not in touched]
                if not done:
                    continue
                oid = rng.choice(done)
                touched.add(oid)
                msgs.append(self._complete(oid) if rng.random() < 0.5 else self._cancel(oid))
            else:  # a second placement of a reserved or finished order, under a new id
                placed = [oid for oid, o in self.orders.items()
                          if o.status in ("reserved", "committed", "released", "expired")
                          and oid not in touched and clear(o)]
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
        self._ceiling = {k: p.on_hand for k, p in self.products.items()}
        budget = {k: p.worst_available for k, p in self.products.items()}
        msgs = []
        for oid in self.pending_place:
            lines = self._lines(self.product_ids, budget, fit=True) or {self.unknown_ids[0]: 1}
            msgs.append(self._place(oid, lines, False, budget))
        self.pending_place = []
        return msgs

    def final_round(self) -> list[Msg]:
        """Ends every long reservation, so every order reaches a terminal outcome."""
        msgs = []
        for oid, o in self.orders.items():
            if o.status == "reserved" and not o.short:
                msgs.append(self._complete(oid) if self.rng.random() < 0.5 else self._cancel(oid))
        return msgs

    def _lines(self, free: list[str], budget: dict[str, int], fit: bool, max_lines: int = 10) -> dict[str, int]:
        n = self.rng.randint(1, min(max_lines, len(free)))
        lines: dict[str, int] = {}
        for k in self.rng.sample(free, n):
            avail = budget.get(k, 0)
            if avail <= 0:
                continue
            lines[k] = self.rng.randint(1, max(1, min(avail, 8)))
        return lines

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

    def finish(self) -> None:
        """At the end every short reservation still held expires."""
        for oid, o in self.orders.items():
            if o.status == "reserved" and o.short:
                for k in o.lines:
                    self.products[k].expirable.pop(oid, None)
                o.status = "expired"
                self.expect[o.placed_id].results.append(("inventory.expired", ""))
                self.expect[o.placed_id].optional = []
            elif o.placed_id and o.short and not o.expired_maybe:
                self.expect[o.placed_id].optional = []

    def final_status(self) -> dict[str, str]:
        return {oid: (o.status or "rejected") for oid, o in self.orders.items()}
