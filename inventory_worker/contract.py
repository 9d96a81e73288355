"""The message contract: one pydantic model per input and output message.

The worker validates every input body with these models before it reaches PostgreSQL;
the README and tests are written against them. What an event *does* to stock is decided
by the stored procedures in sql/procedures/, not here.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypedDict

import orjson
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
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
OrderId = Annotated[str, StringConstraints(min_length=1, max_length=200), *_NO_NUL]
Quantity = Annotated[int, Field(ge=1, le=1_000_000, strict=True)]

INPUT_TYPES = ("order.placed", "order.cancelled", "order.completed", "stock.adjusted")
OUTPUT_TYPES = (
    "inventory.reserved",
    "inventory.rejected",
    "inventory.released",
    "inventory.committed",
    "inventory.expired",
    "inventory.adjusted",
    "inventory.adjustment_rejected",
    "inventory.low_stock",
    "inventory.back_in_stock",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OrderLine(_Strict):
    product_id: ProductId
    quantity: Quantity


class OrderPlaced(_Strict):
    order_id: OrderId
    lines: Annotated[list[OrderLine], Field(min_length=1, max_length=100)]
    reservation_ttl_seconds: Annotated[int, Field(ge=1, le=31_536_000, strict=True)] | None = None

    @field_validator("lines")
    @classmethod
    def _distinct_products(cls, lines: list[OrderLine]) -> list[OrderLine]:
        seen: set[str] = set()
        for line in lines:
            if line.product_id in seen:
                raise ValueError(f"product {line.product_id} appears twice in one order")
            seen.add(line.product_id)
        return lines


class OrderCancelled(_Strict):
    order_id: OrderId


class OrderCompleted(_Strict):
    order_id: OrderId


class StockAdjusted(_Strict):
    product_id: ProductId
    delta: Annotated[int, Field(ge=-1_000_000_000, le=1_000_000_000, strict=True)] | None = None
    on_hand: Annotated[int, Field(ge=0, le=1_000_000_000_000, strict=True)] | None = None
    reason: Annotated[str, StringConstraints(max_length=500), *_NO_NUL] | None = None
    low_stock_threshold: Annotated[int, Field(ge=0, le=1_000_000_000, strict=True)] | None = None

    @model_validator(mode="after")
    def _one_of(self) -> StockAdjusted:
        if (self.delta is None) == (self.on_hand is None):
            raise ValueError("exactly one of 'delta' and 'on_hand' is required")
        return self


DATA_MODELS: dict[str, type[_Strict]] = {
    "order.placed": OrderPlaced,
    "order.cancelled": OrderCancelled,
    "order.completed": OrderCompleted,
    "stock.adjusted": StockAdjusted,
}


# occurred_at: an RFC 3339 date-time string with its offset (Z or +hh:mm), 'T' or space between
# date and time, from 2000-01-01T00:00:00Z up to (not including) 2100-01-01T00:00:00Z. Without
# this, pydantic also took numbers (as Unix times) and the years 0001 and 9999.
RFC3339 = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?([Zz]|[+-][0-9]{2}:[0-9]{2})")
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
    type: Literal["order.placed", "order.cancelled", "order.completed", "stock.adjusted"]
    occurred_at: Annotated[AwareDatetime, BeforeValidator(_rfc3339_string), AfterValidator(_sane_instant),
                           Field(description="RFC 3339 with an offset, from 2000-01-01T00:00:00Z up to (not "
                                 "including) 2100-01-01T00:00:00Z", json_schema_extra={"pattern": RFC3339.pattern})]
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
        data=data.model_dump(mode="json", exclude_none=True),
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
    reason: Literal["insufficient_stock", "unknown_product", "order_cancelled", "reservation_expired"]
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


class Adjusted(_Strict):
    product_id: str
    on_hand: int
    reserved: int
    available: int


class AdjustmentRejected(_Strict):
    product_id: str
    reason: Literal["negative_on_hand", "below_reserved"]
    on_hand: int
    reserved: int
    requested: int


class LowStock(_Strict):
    product_id: str
    available: int
    threshold: int


class BackInStock(_Strict):
    product_id: str
    available: int


OUTPUT_MODELS: dict[str, type[_Strict]] = {
    "inventory.reserved": Reserved,
    "inventory.rejected": Rejected,
    "inventory.released": Released,
    "inventory.committed": Committed,
    "inventory.expired": Expired,
    "inventory.adjusted": Adjusted,
    "inventory.adjustment_rejected": AdjustmentRejected,
    "inventory.low_stock": LowStock,
    "inventory.back_in_stock": BackInStock,
}


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
