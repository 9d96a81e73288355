"""The message contract: one pydantic model per input and output message.

The worker validates every input body with these models before it reaches PostgreSQL;
the README and tests are written against them. What an event *does* to stock is decided
by the stored procedures in sql/procedures/, not here.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal, Self, TypedDict

import orjson
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    RootModel,
    StrictBool,
    StringConstraints,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

PRODUCT_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,64}$"


def _no_nul(value: str) -> str:
    # PostgreSQL text (and jsonb) cannot hold U+0000: refused here, with a reason, instead of
    # by the database with its own error text.
    if "\x00" in value:
        raise ValueError("must not contain U+0000 (NUL)")
    return value


# Every free-text string that is stored in PostgreSQL text goes through this.
_NO_NUL = (AfterValidator(_no_nul), Field(json_schema_extra={"pattern": "^[^\\u0000]*$"}))

ProductId = Annotated[str, StringConstraints(pattern=PRODUCT_ID_PATTERN)]
LocationId = Annotated[str, StringConstraints(pattern=PRODUCT_ID_PATTERN)]
ChannelId = Annotated[str, StringConstraints(pattern=PRODUCT_ID_PATTERN)]
OrderId = Annotated[str, StringConstraints(min_length=1, max_length=200), *_NO_NUL]
TransferId = Annotated[str, StringConstraints(min_length=1, max_length=200), *_NO_NUL]
Quantity = Annotated[int, Field(ge=1, le=1_000_000, strict=True)]
Reason = Annotated[str, StringConstraints(max_length=500), *_NO_NUL]
Reference = Annotated[str, StringConstraints(max_length=500), *_NO_NUL]
Threshold = Annotated[int, Field(ge=0, le=1_000_000_000, strict=True)]
StockQuantity = Annotated[int, Field(ge=1, le=1_000_000_000, strict=True)]  # moves, transfers, receipts
Level = Annotated[int, Field(ge=0, le=1_000_000_000_000, strict=True)]  # a count of on_hand or incoming
Delta = Annotated[int, Field(ge=-1_000_000_000, le=1_000_000_000, strict=True)]

INPUT_TYPES = (
    "order.placed",
    "order.cancelled",
    "order.completed",
    "stock.adjusted",
    "location.configured",
    "channel.configured",
    "product.configured",
    "stock.moved",
    "stock.transferred",
    "stock.received",
    "reservation.extended",
    "order.fulfilled",
    "order.returned",
)
OUTPUT_TYPES = (
    "inventory.reserved",
    "inventory.rejected",
    "inventory.released",
    "inventory.committed",
    "inventory.expired",
    "inventory.adjusted",
    "inventory.adjustment_rejected",
    "inventory.low_stock",
    "inventory.configured",
    "inventory.configuration_rejected",
    "inventory.allocated",
    "inventory.moved",
    "inventory.back_in_stock",
    "inventory.backorder_filled",
    "inventory.reservation_extended",
    "inventory.fulfilled",
    "inventory.returned",
)


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)  # "default: null" would read as if null were allowed


def _absent() -> Any:
    """The default of an optional field that may be left out but not sent as null."""
    return Field(None, json_schema_extra=_no_default)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Optional fields where an explicit null means "unset it" (configuration messages): kept
    # as null for the store. Other optional fields take null as missing (`X | None = None`)
    # or refuse it (`_absent()`); either way the store does not see them.
    NULL_UNSETS: ClassVar[tuple[str, ...]] = ()


def _distinct(items: list[Any], key: Callable[[Any], Any], what: Callable[[Any], str], where: str) -> None:
    seen: set[Any] = set()
    for item in items:
        k = key(item)
        if k in seen:
            raise ValueError(f"{what(item)} appears twice in {where}")
        seen.add(k)


def _required(*keys: str) -> dict[str, Any]:
    return {"required": list(keys)}


def _not_any(*keys: str) -> dict[str, Any]:
    return {"not": {"anyOf": [_required(k) for k in keys]}}


# ---- orders ---------------------------------------------------------------------------------


class OrderLine(_Strict):
    product_id: ProductId
    quantity: Quantity
    location_id: LocationId | None = None


class OrderPlaced(_Strict):
    """An order names a product at most once."""

    order_id: OrderId
    lines: Annotated[list[OrderLine], Field(min_length=1, max_length=100)]
    reservation_ttl_seconds: Annotated[int, Field(ge=1, le=31_536_000, strict=True)] | None = None
    channel_id: ChannelId | None = None
    # Absent: None (the product's policy decides); an explicit null is refused, as a bool field's.
    allow_backorder: StrictBool = Field(
        None,
        description="false: never backorder this order (default: as each "  # type: ignore[assignment]
        "product's backorder policy allows)",
        json_schema_extra=_no_default,
    )

    @field_validator("lines")
    @classmethod
    def _distinct_products(cls, lines: list[OrderLine]) -> list[OrderLine]:
        _distinct(lines, lambda line: line.product_id, lambda line: f"product {line.product_id}", "one order")
        return lines


class CancelLine(_Strict):
    product_id: ProductId
    quantity: Quantity


class OrderCancelled(_Strict):
    """Without lines: the whole order. With lines (a product at most once): those units only."""

    order_id: OrderId
    lines: Annotated[list[CancelLine], Field(min_length=1, max_length=100)] = _absent()

    @field_validator("lines")
    @classmethod
    def _distinct_products(cls, lines: list[CancelLine]) -> list[CancelLine]:
        _distinct(lines, lambda line: line.product_id, lambda line: f"product {line.product_id}", "lines")
        return lines


class OrderCompleted(_Strict):
    order_id: OrderId


def _true(value: bool) -> bool:
    if not value:
        raise ValueError("must be true (leave it out to extend by seconds)")
    return value


def _const_true(schema: dict[str, Any]) -> None:
    _no_default(schema)
    schema["const"] = True


class ReservationExtended(_Strict):
    """Exactly one of: extend_by_seconds, until_fulfilled (true)."""

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {**_required("extend_by_seconds"), **_not_any("until_fulfilled")},
                {**_required("until_fulfilled"), **_not_any("extend_by_seconds")},
            ]
        }
    )

    order_id: OrderId
    extend_by_seconds: Annotated[int, Field(ge=1, le=31_536_000, strict=True)] = _absent()
    until_fulfilled: Annotated[StrictBool, AfterValidator(_true)] = Field(None, json_schema_extra=_const_true)  # type: ignore[assignment]  # absent: None; null refused

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.extend_by_seconds is None) == (self.until_fulfilled is None):
            raise ValueError("exactly one of 'extend_by_seconds' and 'until_fulfilled' is required")
        return self


class FulfilmentLine(_Strict):
    product_id: ProductId
    quantity: Quantity
    location_id: LocationId | None = None


class OrderFulfilled(_Strict):
    """A (product_id, location_id) appears at most once in lines."""

    order_id: OrderId
    fulfilment_id: Annotated[str, StringConstraints(min_length=1, max_length=200), *_NO_NUL]
    lines: Annotated[list[FulfilmentLine], Field(min_length=1, max_length=100)]

    @field_validator("lines")
    @classmethod
    def _distinct_lines(cls, lines: list[FulfilmentLine]) -> list[FulfilmentLine]:
        _distinct(
            lines,
            lambda x: (x.product_id, x.location_id),
            lambda x: f"({x.product_id}, {x.location_id or 'any location'})",
            "lines (product_id, location_id)",
        )
        return lines


Condition = Literal["sellable", "damaged", "quality_control", "disposed"]


class ReturnLine(_Strict):
    """location_id: where the units come back; default: where the line was first fulfilled from."""

    product_id: ProductId
    quantity: Quantity
    condition: Condition
    location_id: LocationId | None = None


class OrderReturned(_Strict):
    """A (product_id, location_id, condition) appears at most once in lines."""

    order_id: OrderId
    return_id: Annotated[str, StringConstraints(min_length=1, max_length=200), *_NO_NUL]
    lines: Annotated[list[ReturnLine], Field(min_length=1, max_length=100)]

    @field_validator("lines")
    @classmethod
    def _distinct_lines(cls, lines: list[ReturnLine]) -> list[ReturnLine]:
        _distinct(
            lines,
            lambda x: (x.product_id, x.location_id, x.condition),
            lambda x: f"({x.product_id}, {x.location_id or 'default location'}, {x.condition})",
            "lines (product_id, location_id, condition)",
        )
        return lines


# ---- stock.adjusted -------------------------------------------------------------------------

_QUANTITIES = ("delta", "on_hand", "incoming")
# JSON Schema mirrors of the validators below: exactly one quantity; `name` only with `delta`.
_ONE_QUANTITY: dict[str, Any] = {
    "oneOf": [{"required": [k], "properties": {k: {"type": "integer"}}} for k in _QUANTITIES]
}
_NAME_WITH_DELTA: dict[str, Any] = {
    "if": {"required": ["name"], "properties": {"name": {"type": "string"}}},
    "then": {"required": ["delta"], "properties": {"delta": {"type": "integer"}}},
}


class _AdjustmentFields(_Strict):
    product_id: ProductId
    location_id: LocationId | None = None
    delta: Delta | None = None
    on_hand: Level | None = None
    incoming: Level | None = None
    name: Literal["on_hand", "incoming"] | None = None
    change_from: Level | None = None
    reason: Reason | None = None
    reference: Reference | None = None
    low_stock_threshold: Threshold | None = None

    def _check_quantity(self) -> None:
        if sum(getattr(self, k) is not None for k in _QUANTITIES) != 1:
            raise ValueError("exactly one of 'delta', 'on_hand' and 'incoming' is required")
        if self.name is not None and self.delta is None:
            raise ValueError("'name' is only allowed with 'delta'")


_ADJUSTMENT_FIELDS = tuple(_AdjustmentFields.model_fields)


class StockAdjustmentItem(_AdjustmentFields):
    """Exactly one of: delta, on_hand, incoming; name only with delta."""

    model_config = ConfigDict(json_schema_extra={"allOf": [_ONE_QUANTITY, _NAME_WITH_DELTA]})

    @model_validator(mode="after")
    def _one_quantity(self) -> Self:
        self._check_quantity()
        return self

    def key(self) -> tuple[str, str, str]:
        """(product, location, the quantity it changes): at most once per bulk message."""
        changes = "incoming" if self.incoming is not None or self.name == "incoming" else "on_hand"
        return (self.product_id, self.location_id or "default", changes)


class StockAdjusted(_AdjustmentFields):
    """Give exactly one of: delta, on_hand, incoming; name only with delta. Or, for a bulk
    adjustment, items (and atomic) and none of the other fields; in items a (product_id,
    location_id, quantity changed) appears at most once."""

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {**_required("items"), **_not_any(*_ADJUSTMENT_FIELDS)},
                {
                    **_required("product_id"),
                    **_not_any("items", "atomic"),
                    "allOf": [_ONE_QUANTITY, _NAME_WITH_DELTA],
                },
            ]
        }
    )

    product_id: ProductId = _absent()  # required without items (checked below)
    items: Annotated[list[StockAdjustmentItem], Field(min_length=1, max_length=1000)] = _absent()
    atomic: StrictBool = _absent()

    @field_validator("items")
    @classmethod
    def _distinct_items(cls, items: list[StockAdjustmentItem]) -> list[StockAdjustmentItem]:
        _distinct(
            items,
            StockAdjustmentItem.key,
            lambda i: "({}, {}, {})".format(*i.key()),
            "items (product_id, location_id, quantity)",
        )
        return items

    @model_validator(mode="after")
    def _single_or_bulk(self) -> Self:
        if "items" in self.model_fields_set:
            if given := [k for k in _ADJUSTMENT_FIELDS if k in self.model_fields_set]:
                raise ValueError(f"'items' excludes the fields of a single adjustment: {', '.join(given)}")
        elif "atomic" in self.model_fields_set:
            raise ValueError("'atomic' is only allowed with 'items'")
        elif self.product_id is None:
            raise ValueError("'product_id' is required (or 'items')")
        else:
            self._check_quantity()
        return self


# ---- configuration --------------------------------------------------------------------------


class LocationConfigured(_Strict):
    """Creates the location or changes the fields given; name null unsets it."""

    NULL_UNSETS = ("name",)

    location_id: LocationId
    name: Annotated[str, StringConstraints(max_length=200), *_NO_NUL] | None = None
    priority: Annotated[int, Field(ge=-1_000_000, le=1_000_000, strict=True)] = _absent()
    active: StrictBool = _absent()
    fulfils_orders: StrictBool = _absent()


class ChannelConfigured(_Strict):
    """Creates the channel or changes the fields given. locations: distinct, in preference
    order; null = every active, order-fulfilling location by (priority, location_id); channel
    default takes no list."""

    NULL_UNSETS = ("locations",)
    model_config = ConfigDict(
        json_schema_extra={
            "if": {"required": ["channel_id"], "properties": {"channel_id": {"const": "default"}}},
            "then": {"properties": {"locations": {"type": "null"}}},
        }
    )

    channel_id: ChannelId
    locations: Annotated[list[LocationId], Field(min_length=1, max_length=100)] | None = None
    strategy: Literal["priority", "most_available", "fewest_locations", "single_location"] = _absent()

    @field_validator("locations")
    @classmethod
    def _distinct_locations(cls, locations: list[str] | None) -> list[str] | None:
        _distinct(locations or [], lambda x: x, lambda x: f"location {x}", "locations")
        return locations

    @model_validator(mode="after")
    def _default_takes_no_list(self) -> Self:
        if self.channel_id == "default" and self.locations is not None:
            raise ValueError(
                "channel default takes no 'locations' (it is every active, order-fulfilling location)"
            )
        return self


class SafetyStock(_Strict):
    location_id: LocationId
    quantity: Threshold


class BackorderPolicy(_Strict):
    """Set whole: a limit or until left out (or null) is none. `until` is RFC 3339 with an
    offset; from then on the product behaves as `deny`."""

    mode: Literal["deny", "allow", "incoming"]
    limit: Annotated[int, Field(ge=0, le=1_000_000_000, strict=True)] | None = None
    until: (
        Annotated[
            AwareDatetime,
            BeforeValidator(lambda v: _rfc3339_string(v)),
            Field(
                json_schema_extra={
                    "pattern": r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}"
                    r"(\.[0-9]{1,9})?([Zz]|[+-][0-9]{2}:[0-9]{2})"
                }
            ),
        ]
        | None
    ) = None


class ProductConfigured(_Strict):
    """Creates the product (all figures 0) if missing, then sets the fields given;
    max_per_order null removes the limit; safety_stock names a location at most once."""

    NULL_UNSETS = ("max_per_order",)

    product_id: ProductId
    tracked: StrictBool = _absent()
    low_stock_threshold: Threshold = _absent()
    max_per_order: Annotated[int, Field(ge=1, le=1_000_000, strict=True)] | None = None
    safety_stock: Annotated[list[SafetyStock], Field(min_length=1, max_length=100)] = _absent()
    backorder: BackorderPolicy = _absent()

    @field_validator("safety_stock")
    @classmethod
    def _distinct_locations(cls, entries: list[SafetyStock]) -> list[SafetyStock]:
        _distinct(entries, lambda s: s.location_id, lambda s: f"location {s.location_id}", "safety_stock")
        return entries


# ---- stock.moved, stock.transferred, stock.received -----------------------------------------

_STATES = ("sellable", "damaged", "quality_control")


class _StockMovedRules(_Strict):
    model_config = ConfigDict(
        json_schema_extra={
            "not": {
                "anyOf": [
                    {"required": ["from", "to"], "properties": {"from": {"const": s}, "to": {"const": s}}}
                    for s in _STATES
                ]
            }
        }
    )

    @model_validator(mode="after")
    def _from_is_not_to(self) -> Self:
        if getattr(self, "from") == self.to:  # type: ignore[attr-defined]
            raise ValueError("'from' and 'to' must differ")
        return self


# `from` is a Python keyword: the model is built with create_model so that the field keeps its
# wire name (no alias to forget when dumping).
_STOCK_MOVED_FIELDS: dict[str, Any] = {
    "product_id": (ProductId, ...),
    "location_id": (LocationId | None, None),
    "quantity": (StockQuantity, ...),
    "from": (Literal["sellable", "damaged", "quality_control"], ...),
    "to": (Literal["sellable", "damaged", "quality_control", "disposed"], ...),
    "reason": (Reason | None, None),
    "reference": (Reference | None, None),
}
StockMoved = create_model(
    "StockMoved",
    __base__=_StockMovedRules,
    __doc__="Moves units between quantity states at one location; from and to differ; to disposed writes them off.",
    **_STOCK_MOVED_FIELDS,
)


class TransferLine(_Strict):
    product_id: ProductId
    quantity: StockQuantity


class StockTransferred(_Strict):
    """All lines or none; from_location_id and to_location_id differ; a product at most once."""

    transfer_id: TransferId
    from_location_id: LocationId
    to_location_id: LocationId
    lines: Annotated[list[TransferLine], Field(min_length=1, max_length=1000)]
    in_transit: StrictBool | None = None
    reason: Reason | None = None
    reference: Reference | None = None

    @field_validator("lines")
    @classmethod
    def _distinct_products(cls, lines: list[TransferLine]) -> list[TransferLine]:
        _distinct(
            lines, lambda line: line.product_id, lambda line: f"product {line.product_id}", "one transfer"
        )
        return lines

    @model_validator(mode="after")
    def _two_locations(self) -> Self:
        if self.from_location_id == self.to_location_id:
            raise ValueError("'from_location_id' and 'to_location_id' must differ")
        return self


class ReceiptItem(_Strict):
    product_id: ProductId
    location_id: LocationId | None = None
    quantity: StockQuantity
    reason: Reason | None = None
    reference: Reference | None = None


_RECEIPT_FIELDS = tuple(ReceiptItem.model_fields)


class StockReceived(ReceiptItem):
    """product_id and quantity, or, for a bulk receipt, items (with atomic) and none of the
    other fields; in items a (product_id, location_id) appears at most once."""

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {**_required("items"), **_not_any(*_RECEIPT_FIELDS)},
                {**_required("product_id", "quantity"), **_not_any("items", "atomic")},
            ]
        }
    )

    product_id: ProductId = _absent()
    quantity: StockQuantity = _absent()
    items: Annotated[list[ReceiptItem], Field(min_length=1, max_length=1000)] = _absent()
    atomic: StrictBool = _absent()

    @field_validator("items")
    @classmethod
    def _distinct_items(cls, items: list[ReceiptItem]) -> list[ReceiptItem]:
        _distinct(
            items,
            lambda i: (i.product_id, i.location_id or "default"),
            lambda i: f"({i.product_id}, {i.location_id or 'default'})",
            "items (product_id, location_id)",
        )
        return items

    @model_validator(mode="after")
    def _single_or_bulk(self) -> Self:
        if "items" in self.model_fields_set:
            if given := [k for k in _RECEIPT_FIELDS if k in self.model_fields_set]:
                raise ValueError(f"'items' excludes the fields of a single receipt: {', '.join(given)}")
        elif "atomic" in self.model_fields_set:
            raise ValueError("'atomic' is only allowed with 'items'")
        elif self.product_id is None or self.quantity is None:
            raise ValueError("'product_id' and 'quantity' are required (or 'items')")
        return self


DATA_MODELS: dict[str, type[_Strict]] = {
    "order.placed": OrderPlaced,
    "order.cancelled": OrderCancelled,
    "order.completed": OrderCompleted,
    "stock.adjusted": StockAdjusted,
    "location.configured": LocationConfigured,
    "channel.configured": ChannelConfigured,
    "product.configured": ProductConfigured,
    "stock.moved": StockMoved,
    "stock.transferred": StockTransferred,
    "stock.received": StockReceived,
    "reservation.extended": ReservationExtended,
    "order.fulfilled": OrderFulfilled,
    "order.returned": OrderReturned,
}
assert tuple(DATA_MODELS) == INPUT_TYPES


def _for_store(data: _Strict) -> dict[str, Any]:
    """The data as the store reads it: absent and null optional fields left out, except a null
    that unsets a configuration field."""
    out = data.model_dump(mode="json", exclude_none=True)
    for name in data.NULL_UNSETS:
        if name in data.model_fields_set and getattr(data, name) is None:
            out[name] = None
    return out


# occurred_at: an RFC 3339 date-time string with its offset (Z or +hh:mm), 'T' or space between
# date and time, from 2000-01-01T00:00:00Z up to (not including) 2100-01-01T00:00:00Z. Without
# this, pydantic also took numbers (as Unix times) and the years 0001 and 9999.
RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)
OCCURRED_AT_MIN = datetime(2000, 1, 1, tzinfo=UTC)
OCCURRED_AT_MAX = datetime(2100, 1, 1, tzinfo=UTC)  # exclusive


def _rfc3339_string(value: Any) -> Any:
    if not isinstance(value, str) or not RFC3339.fullmatch(value):
        raise ValueError("must be an RFC 3339 date-time string with an offset, e.g. 2026-01-01T00:00:00Z")
    return value


def _sane_instant(value: datetime) -> datetime:
    if not OCCURRED_AT_MIN <= value < OCCURRED_AT_MAX:
        raise ValueError("must be from 2000-01-01T00:00:00Z up to 2100-01-01T00:00:00Z")
    return value


class Envelope(_Strict):
    id: uuid.UUID
    type: Literal[INPUT_TYPES]  # type: ignore[valid-type]
    occurred_at: Annotated[
        AwareDatetime,
        BeforeValidator(_rfc3339_string),
        AfterValidator(_sane_instant),
        Field(
            description="RFC 3339 with an offset, from 2000-01-01T00:00:00Z up to (not "
            "including) 2100-01-01T00:00:00Z",
            json_schema_extra={"pattern": RFC3339.pattern},
        ),
    ]
    data: dict[str, Any]


class InvalidMessage(Exception):
    """A body that can never be applied: it goes to the dead-letter queue with this reason."""


class Event(BaseModel):
    """A validated input event, ready for the store."""

    model_config = ConfigDict(frozen=True)

    id: uuid.UUID
    type: str
    occurred_at: datetime
    data: dict[str, Any]

    def for_store(self) -> dict[str, Any]:
        return {"id": str(self.id), "type": self.type, "data": self.data}


def _describe(exc: ValidationError, prefix: str = "") -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{prefix}{loc}: {err['msg']}" if loc else f"{prefix.rstrip('.')}: {err['msg']}")
    return "; ".join(parts)


def parse_event(body: bytes, routing_key: str | None = None, max_bytes: int | None = None) -> Event:
    """Bytes off the wire to a validated Event, or InvalidMessage saying why not."""
    if max_bytes is not None and len(body) > max_bytes:
        raise InvalidMessage(f"body of {len(body)} bytes exceeds the limit of {max_bytes}")
    try:
        raw = orjson.loads(body)  # strict: invalid UTF-8, NaN, nesting past 1024 are errors
    except orjson.JSONDecodeError as exc:
        raise InvalidMessage(f"body is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidMessage("body is not a JSON object")
    try:
        envelope = Envelope.model_validate(raw)
    except ValidationError as exc:
        raise InvalidMessage(_describe(exc)) from None
    if routing_key is not None and routing_key != envelope.type:
        raise InvalidMessage(f"type {envelope.type!r} does not match routing key {routing_key!r}")
    try:
        data = DATA_MODELS[envelope.type].model_validate(envelope.data)
    except ValidationError as exc:
        raise InvalidMessage(_describe(exc, "data.")) from None
    return Event(
        id=envelope.id,
        type=envelope.type,
        occurred_at=envelope.occurred_at,
        data=_for_store(data),
    )


def make_event(type_: str, data: dict[str, Any], event_id: uuid.UUID | None = None) -> dict[str, Any]:
    """A contract-valid input body (used by the `publish` command and the tests)."""

    body = {
        "id": str(event_id or uuid.uuid4()),
        "type": type_,
        "occurred_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "data": data,
    }
    parse_event(json.dumps(body).encode())  # refuse to send what the worker would dead-letter
    return body


# ---- output messages (documented and checked in tests) --------------------------------------
# New fields (Part A) are optional keys that, when present, are never null; a new event type's
# keys are all present ("unset" is null where the documentation says so).

Count = Annotated[int, Field(ge=0, strict=True)]
Positive = Annotated[int, Field(ge=1, strict=True)]


class LineOut(_Strict):
    product_id: str
    quantity: int


class Shortage(_Strict):
    product_id: str
    requested: int
    available: int


class Reserved(_Strict):
    order_id: str
    lines: list[LineOut]
    expires_at: AwareDatetime


class Rejected(_Strict):
    order_id: str
    reason: Literal[
        "insufficient_stock",
        "unknown_product",
        "order_cancelled",
        "reservation_expired",
        "unknown_channel",
        "location_unavailable",
        "quantity_limit",
        "unknown_order",
        "order_completed",
        "extension_limit",
        "unknown_line",
        "exceeds_reserved",
        "backorder_pending",
        "exceeds_open_quantity",
        "unknown_location",
        "exceeds_fulfilled",
    ]
    shortages: list[Shortage]


class Released(_Strict):
    order_id: str
    lines: list[LineOut]
    reason: Literal["cancelled"]


class Committed(_Strict):
    order_id: str
    lines: list[LineOut]


class Expired(_Strict):
    order_id: str
    lines: list[LineOut]
    expired_at: AwareDatetime


class LocationFigures(_Strict):
    """One level: a product at one location."""

    on_hand: Count
    reserved: Count
    available: Count
    damaged: Count
    quality_control: Count
    incoming: Count
    safety_stock: Count


class Adjusted(_Strict):
    """location_id and location are given (together) when the adjustment named a location other
    than default, changed incoming, or was one item of a bulk message (then with its index)."""

    product_id: str
    on_hand: int
    reserved: int
    available: int
    location_id: str = _absent()
    index: Count = _absent()
    location: LocationFigures = _absent()

    @model_validator(mode="after")
    def _together(self) -> Self:
        if (self.location_id is None) != (self.location is None):
            raise ValueError("'location_id' and 'location' come together")
        if self.index is not None and self.location_id is None:
            raise ValueError("'index' comes with 'location_id' and 'location'")
        return self


class AdjustmentRejected(_Strict):
    """current is given with reason stale, and only then; index only with location_id."""

    product_id: str
    reason: Literal[
        "negative_on_hand",
        "below_reserved",
        "unknown_location",
        "unknown_product",
        "stale",
        "negative_incoming",
        "insufficient_quantity",
        "batch_rejected",
    ]
    on_hand: int
    reserved: int
    requested: int
    location_id: str = _absent()
    index: Count = _absent()
    name: Literal["on_hand", "incoming"] = _absent()
    current: Count = _absent()

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if (self.current is None) == (self.reason == "stale"):
            raise ValueError("'current' is given with reason stale, and only then")
        if self.index is not None and self.location_id is None:
            raise ValueError("'index' comes with 'location_id'")
        return self


class LowStock(_Strict):
    product_id: str
    available: int
    threshold: int


class BackInStock(_Strict):
    product_id: str
    available: Positive


class LocationConfiguration(_Strict):
    kind: Literal["location"]
    location_id: str
    name: str | None
    priority: int
    active: bool
    fulfils_orders: bool


class ChannelConfiguration(_Strict):
    kind: Literal["channel"]
    channel_id: str
    locations: list[str] | None
    strategy: Literal["priority", "most_available", "fewest_locations", "single_location"]


class SafetyStockOut(_Strict):
    location_id: str
    quantity: Positive


class BackorderConfiguration(_Strict):
    mode: Literal["deny", "allow", "incoming"]
    limit: Count | None
    until: AwareDatetime | None


class ProductConfiguration(_Strict):
    """safety_stock: every location where it is above 0, by location_id."""

    kind: Literal["product"]
    product_id: str
    tracked: bool
    low_stock_threshold: Count
    max_per_order: Positive | None
    backorder: BackorderConfiguration
    safety_stock: list[SafetyStockOut]


class Configured(RootModel[LocationConfiguration | ChannelConfiguration | ProductConfiguration]):
    """The whole effective configuration after the change, flat; unset fields are null."""

    model_config = ConfigDict(frozen=True)


class ConfigurationRejected(_Strict):
    kind: Literal["channel", "product"]
    id: str
    reason: Literal["unknown_location", "has_open_reservations"]
    detail: str

    @model_validator(mode="after")
    def _product_only(self) -> Self:
        if self.reason == "has_open_reservations" and self.kind != "product":
            raise ValueError("has_open_reservations concerns a product")
        return self


class Allocation(_Strict):
    location_id: str
    quantity: Positive


class AllocatedLine(_Strict):
    """A tracked line's allocations and backordered units add up to its quantity; an untracked
    line holds nothing."""

    product_id: str
    quantity: Positive
    tracked: bool
    allocations: list[Allocation]
    backordered: Count

    @model_validator(mode="after")
    def _adds_up(self) -> Self:
        held = sum(a.quantity for a in self.allocations) + self.backordered
        if held != (self.quantity if self.tracked else 0):
            raise ValueError(
                f"holds {held} units of a {'tracked' if self.tracked else 'untracked'} line of "
                f"{self.quantity}"
            )
        _distinct(
            self.allocations, lambda a: a.location_id, lambda a: f"location {a.location_id}", "allocations"
        )
        return self


class Allocated(_Strict):
    order_id: str
    channel_id: str
    lines: Annotated[list[AllocatedLine], Field(min_length=1)]


class FilledLine(_Strict):
    product_id: str
    location_id: str
    quantity: Positive


class RemainingLine(_Strict):
    product_id: str
    quantity: Positive


class BackorderFilled(_Strict):
    """Backordered units of one product of an open order now reserved (lines: where);
    backordered_remaining: the order's lines still backordered ([] once none is)."""

    order_id: str
    lines: Annotated[list[FilledLine], Field(min_length=1)]
    backordered_remaining: list[RemainingLine]


class StateMove(_Strict):
    kind: Literal["state"]
    product_id: str
    location_id: str
    quantity: Positive
    from_: Literal["sellable", "damaged", "quality_control"] = Field(alias="from")
    to: Literal["sellable", "damaged", "quality_control", "disposed"]
    reason: str | None
    reference: str | None
    location: LocationFigures


class Transfer(_Strict):
    kind: Literal["transfer"]
    transfer_id: str
    from_location_id: str
    to_location_id: str
    in_transit: bool
    lines: Annotated[list[LineOut], Field(min_length=1)]


class Receipt(_Strict):
    """unexpected: the units beyond what was incoming (0 when none); index only in a bulk receipt."""

    kind: Literal["receipt"]
    product_id: str
    location_id: str
    quantity: Positive
    unexpected: Count
    reference: str | None
    location: LocationFigures
    index: Count = _absent()

    @model_validator(mode="after")
    def _within_quantity(self) -> Self:
        if self.unexpected > self.quantity:
            raise ValueError("'unexpected' exceeds 'quantity'")
        return self


class ReservationExtendedOut(_Strict):
    """expires_at null: held until fulfilled (or cancelled), never expired."""

    order_id: str
    expires_at: AwareDatetime | None
    previous_expires_at: AwareDatetime


class FulfilledLine(_Strict):
    """location_id: where the units left from (null for a line of an untracked product)."""

    product_id: str
    location_id: str | None
    quantity: Positive


class OpenLine(_Strict):
    product_id: str
    reserved: Count
    backordered: Count


class Fulfilled(_Strict):
    """open: the lines still open (reserved or backordered units) after this fulfilment;
    empty when it closed the order (then inventory.committed follows)."""

    order_id: str
    fulfilment_id: str
    lines: Annotated[list[FulfilledLine], Field(min_length=1)]
    open: list[OpenLine]


class ReturnedLine(_Strict):
    """location_id: where the units came back (null for a line of an untracked product)."""

    product_id: str
    location_id: str | None
    quantity: Positive
    condition: Literal["sellable", "damaged", "quality_control", "disposed"]


class Returned(_Strict):
    order_id: str
    return_id: str
    lines: Annotated[list[ReturnedLine], Field(min_length=1)]


class Moved(RootModel[StateMove | Transfer | Receipt]):
    """kind state (stock.moved), transfer (stock.transferred) or receipt (stock.received)."""

    model_config = ConfigDict(frozen=True)


OUTPUT_MODELS: dict[str, type[BaseModel]] = {
    "inventory.reserved": Reserved,
    "inventory.rejected": Rejected,
    "inventory.released": Released,
    "inventory.committed": Committed,
    "inventory.expired": Expired,
    "inventory.adjusted": Adjusted,
    "inventory.adjustment_rejected": AdjustmentRejected,
    "inventory.low_stock": LowStock,
    "inventory.configured": Configured,
    "inventory.configuration_rejected": ConfigurationRejected,
    "inventory.allocated": Allocated,
    "inventory.moved": Moved,
    "inventory.back_in_stock": BackInStock,
    "inventory.backorder_filled": BackorderFilled,
    "inventory.reservation_extended": ReservationExtendedOut,
    "inventory.fulfilled": Fulfilled,
    "inventory.returned": Returned,
}
assert tuple(OUTPUT_MODELS) == OUTPUT_TYPES


class OutputEnvelope(_Strict):
    id: uuid.UUID
    type: Literal[OUTPUT_TYPES]  # type: ignore[valid-type]
    occurred_at: AwareDatetime
    causation_id: uuid.UUID
    data: dict[str, Any]


def validate_output(body: dict[str, Any]) -> None:
    """Raises ValidationError if a result event breaks the documented contract."""
    env = OutputEnvelope.model_validate(body)
    OUTPUT_MODELS[env.type].model_validate(env.data)


# ---- what applying events gives back (shared by the adapters: none imports another) ---------


class Figures(TypedDict):
    """One product's stock figures, as product_figures() in sql/procedures/inventory.sql builds
    them: what the cache holds and the HTTP endpoint serves."""

    product_id: str
    on_hand: int
    reserved: int
    available: int
    version: int


@dataclass(frozen=True)
class OutgoingMessage:
    """A result event from the outbox, to publish with its outbox row's id."""

    outbox_id: int
    message_id: str
    routing_key: str
    body: dict[str, Any]

    @classmethod
    def from_json(cls, m: dict[str, Any]) -> OutgoingMessage:
        return cls(int(m["outbox_id"]), str(m["message_id"]), m["routing_key"], m["body"])


@dataclass
class Outcome:
    """What applying one input event did."""

    outcome: str
    messages: list[OutgoingMessage] = field(default_factory=list)
    products: list[Figures] = field(default_factory=list)
    order_id: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, r: dict[str, Any]) -> Outcome:
        return cls(
            outcome=r["outcome"],
            messages=[OutgoingMessage.from_json(m) for m in r.get("messages", [])],
            products=list(r.get("products", [])),
            order_id=r.get("order_id"),
            detail={k: v for k, v in r.items() if k not in ("outcome", "messages", "products", "order_id")},
        )


__all__ = [
    "Event",
    "Figures",
    "InvalidMessage",
    "INPUT_TYPES",
    "OUTPUT_TYPES",
    "PRODUCT_ID_PATTERN",
    "OutgoingMessage",
    "Outcome",
    "make_event",
    "parse_event",
    "validate_output",
]
