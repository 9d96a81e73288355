"""AMQP framing done here instead of by pika: where a consumer spent its CPU (one send() per
flush, publishes framed directly, deliveries read whole) and where pika's decoding broke the
connection (header tables).

pika queues every frame it writes as its own chunk and sends the chunks one `send()` at a time:
a published message (method, header and body frames) costs three system calls and three TCP
segments, an ack one more. Over loopback the kernel's TCP work for a segment is charged to the
sender's system call, and the broker wakes to read each segment: at a few thousand results per
second those sends were the largest single cost in a consumer process (about a fifth of its
CPU, by py-spy) and a visible part of RabbitMQ's. Other AMQP clients write a publish as one
buffer for the same reason (rabbitmq-c #272, amqprs #33).

`coalesce_writes()` replaces pika's `_AsyncTransportBase._produce` (which plain and TLS
transports both go through) with the same loop that joins the
queued chunks, up to `MAX_JOIN` bytes, before each send(). Byte order, the buffered-byte count,
partial sends and errors are handled as pika does; only the number of sends changes. Installed
once, when `inventory_worker.adapters.rabbitmq` is imported; tested in tests/integration/test_pipelined_confirms.py.

`publish()` writes a Basic.Publish with the few properties the worker sets, framed here with
`struct` instead of by pika's generic marshalling (a Method, a Header with a BasicProperties
walked field by field, a Body: 6.8 us a message in Python, against 2.4 here). The
bytes are the same as pika's (tests/unit/test_amqp_framing.py compares them); they go out
through the connection's own output path, as pika's would.
"""

from __future__ import annotations

import datetime
import functools
import math
import struct
from collections.abc import Callable
from typing import Any

import pika.channel
import pika.connection
import pika.data
import pika.exceptions
import pika.frame
import pika.spec
from pika.adapters.utils import io_services_utils

# Beyond this a partial send is likely anyway; joining more would only copy more.
MAX_JOIN = 256 * 1024


def _produce_joined(self: Any) -> None:
    """pika's `_AsyncTransportBase._produce` (send until the buffer is empty or send() raises,
    e.g. EAGAIN; requeue what a partial send left), sending joined chunks."""
    buffers = self._tx_buffers
    while buffers:
        if len(buffers) > 1 and len(buffers[0]) < MAX_JOIN:
            chunks, size = [], 0
            while buffers and size < MAX_JOIN:
                chunk = buffers.popleft()
                chunks.append(chunk)
                size += len(chunk)
            buffers.appendleft(b"".join(chunks))
        chunk = buffers[0]
        sent = self._sigint_safe_send(self._sock, chunk)
        buffers.popleft()
        if sent < len(chunk):
            buffers.appendleft(chunk[sent:])
        self._tx_buffered_byte_count -= sent


_produce_joined.__inventory_coalesced__ = True  # type: ignore[attr-defined]


def coalesce_writes() -> bool:
    """Installs the joining wrapper (idempotent). False if this pika has no such method."""
    base = getattr(io_services_utils, "_AsyncTransportBase", None)
    produce = getattr(base, "_produce", None)
    if produce is None or not hasattr(base, "_sigint_safe_send"):
        return False
    if not getattr(produce, "__inventory_coalesced__", False):
        base._produce = _produce_joined  # type: ignore[union-attr]
    return True


# ---- Basic.Publish, framed directly (AMQP 0-9-1, sections 2.3.5 and 4.2.6) --------------------

_FRAME_END = b"\xce"
_PUBLISH = struct.pack(">HHH", 60, 40, 0)  # class basic, method publish, reserved-1 (ticket)
_NOT_MANDATORY = b"\x00"  # the mandatory and immediate bits, both off
# Property flags of the content header, in the order the properties follow it.
_CONTENT_TYPE, _DELIVERY_MODE, _CORRELATION_ID, _MESSAGE_ID, _TIMESTAMP, _TYPE = (
    1 << 15,
    1 << 12,
    1 << 10,
    1 << 7,
    1 << 6,
    1 << 5,
)


def _shortstr(value: str) -> bytes:
    raw = value.encode()
    if len(raw) > 255:
        raise ValueError(f"AMQP short string longer than 255 bytes: {value[:40]!r}...")
    return bytes((len(raw),)) + raw


@functools.lru_cache(maxsize=1024)
def _method_frame(channel_number: int, exchange: str, routing_key: str) -> bytes:
    method = b"".join((_PUBLISH, _shortstr(exchange), _shortstr(routing_key), _NOT_MANDATORY))
    return struct.pack(">BHI", 1, channel_number, len(method)) + method + _FRAME_END


_cached_shortstr = functools.lru_cache(maxsize=256)(_shortstr)  # for values that repeat: content types


def encode_publish(
    channel_number: int,
    exchange: str,
    routing_key: str,
    body: bytes,
    body_max: int,
    *,
    content_type: str | None = None,
    delivery_mode: int | None = None,
    correlation_id: str | None = None,
    message_id: str | None = None,
    timestamp: int | None = None,
    type: str | None = None,
) -> bytes:  # noqa: A002 (AMQP's name)
    """The frames of one Basic.Publish (method, content header, body in frames of at most
    `body_max` bytes), as one bytes object."""
    flags, props = 0, []
    if content_type is not None:
        flags |= _CONTENT_TYPE
        props.append(_cached_shortstr(content_type))
    if delivery_mode is not None:
        flags |= _DELIVERY_MODE
        props.append(bytes((delivery_mode,)))
    if correlation_id is not None:
        flags |= _CORRELATION_ID
        props.append(_shortstr(correlation_id))
    if message_id is not None:
        flags |= _MESSAGE_ID
        props.append(_shortstr(message_id))
    if timestamp is not None:
        flags |= _TIMESTAMP
        props.append(struct.pack(">Q", timestamp))
    if type is not None:
        flags |= _TYPE
        props.append(_cached_shortstr(type))
    header = struct.pack(">HHQH", 60, 0, len(body), flags) + b"".join(props)
    out = [
        _method_frame(channel_number, exchange, routing_key),
        struct.pack(">BHI", 2, channel_number, len(header)),
        header,
        _FRAME_END,
    ]
    for start in range(0, len(body), body_max):
        chunk = body[start : start + body_max]
        out += (struct.pack(">BHI", 3, channel_number, len(chunk)), chunk, _FRAME_END)
    return b"".join(out)


def publish(channel: Any, exchange: str, routing_key: str, body: bytes, **properties: Any) -> None:
    """Queues a Basic.Publish on a pika channel (`pika.channel.Channel`, e.g. a
    BlockingChannel's `_impl`) for the next write, as its `basic_publish` would; `properties`
    are those of `encode_publish`."""
    if not channel.is_open:
        raise pika.exceptions.ChannelWrongStateError("Channel is closed.")
    conn = channel.connection
    if not conn.is_open:
        raise pika.exceptions.ConnectionWrongStateError("Connection is not open.")
    conn._output_marshaled_frames(
        [
            encode_publish(
                channel.channel_number, exchange, routing_key, body, conn._body_max_length, **properties
            )
        ]
    )


# ---- deliveries, read directly (AMQP 0-9-1, sections 2.3.5 and 4.2.6) ------------------------
#
# pika reads every frame on its own: `decode_frame` on the whole buffer, then the buffer cut
# (a copy of all that follows, per frame), a callbacks lookup, the channel's content assembler.
# A delivery is three frames: receiving one cost about 40 us of Python, the largest part of a
# consumer's CPU after the database call. `read_deliveries()` replaces
# `Connection._on_data_available` with a loop that walks the buffer by offset and, when a
# Basic.Deliver, its content header and its body frames are all there, decodes them (the
# method here, as `Basic.Deliver.decode` does; the properties with pika's own
# `BasicProperties.decode`) and hands them to the channel's `_on_deliver`, as pika's assembler
# would. Every other frame, and a delivery whose frames do not follow each other on one
# channel, goes through pika's `decode_frame` and `_process_frame` unchanged. A delivery not
# all there yet waits in the buffer for the next read, unless its body is large.

_DELIVER = struct.pack(">HH", 60, 60)  # class basic, method deliver
_FRAME_HEAD = struct.Struct(">BHI")  # type, channel, size
_CONTENT_HEAD = struct.Struct(">HHQ")  # class, weight, body size
_FRAME_END_BYTE = _FRAME_END[0]
_METHOD, _HEADER, _BODY = 1, 2, 3
# Each read extends the buffer by a copy, so a delivery waiting there to be whole is copied
# again at every read: past this body size (a few reads' worth) pika's assembler takes it frame
# by frame instead, and a large message costs linear, not quadratic, copying.
WHOLE_BODY_MAX = 256 * 1024
_TAG_AND_BITS = struct.Struct(">QB")


@functools.lru_cache(maxsize=1024)
def _text(raw: bytes) -> str | bytes:
    """A short string as pika decodes it (UTF-8, else the bytes); consumer tags, exchanges and
    routing keys repeat, so each is decoded once."""
    try:
        return raw.decode("utf8")
    except UnicodeDecodeError:
        return raw


def _deliver_at(buf: bytes, at: int) -> Any:
    """The Basic.Deliver whose arguments start at `at` (what `Basic.Deliver.decode` makes)."""
    n = buf[at]
    consumer_tag = _text(buf[at + 1 : at + 1 + n])
    at += 1 + n
    delivery_tag, bits = _TAG_AND_BITS.unpack_from(buf, at)
    at += 9
    n = buf[at]
    exchange = _text(buf[at + 1 : at + 1 + n])
    at += 1 + n
    n = buf[at]
    routing_key = _text(buf[at + 1 : at + 1 + n])
    return pika.spec.Basic.Deliver(consumer_tag, delivery_tag, bool(bits & 1), exchange, routing_key)


def _frame_at(buf: bytes, at: int) -> tuple[int, int, int] | None:
    """(type, channel, end) of the frame at `at`, or None if it is not all in `buf`."""
    if len(buf) - at < 8:
        return None
    kind, channel, size = _FRAME_HEAD.unpack_from(buf, at)
    end = at + 8 + size
    if end > len(buf):
        return None
    if buf[end - 1] != _FRAME_END_BYTE:
        raise pika.exceptions.InvalidFrameError("Invalid FRAME_END marker")
    return kind, channel, end


def _delivery(conn: Any, buf: bytes, at: int, channel_number: int, method_end: int) -> Any:
    """The delivery whose method frame is at `at`: (where it ends, its channel, and what the
    channel's `_on_deliver` takes). None: not all of it has come yet. -1: not a plain delivery
    (pika's own path takes it)."""
    channel = conn._channels.get(channel_number)
    header = _frame_at(buf, method_end)
    if header is None:
        return None
    kind, number, header_end = header
    if channel is None or kind != _HEADER or number != channel_number:
        return -1
    class_id, _weight, body_size = _CONTENT_HEAD.unpack_from(buf, method_end + 7)
    if class_id != 60:
        return -1
    parts, size, end = [], 0, header_end
    while size < body_size:
        body = _frame_at(buf, end)
        if body is None:
            return -1 if body_size > WHOLE_BODY_MAX else None
        kind, number, body_end = body
        if kind != _BODY or number != channel_number:
            return -1
        parts.append(buf[end + 7 : body_end - 1])
        size += body_end - end - 8
        end = body_end
    if size != body_size:  # pika's assembler raises for a body longer than announced
        return -1
    method = _deliver_at(buf, at + 11)
    properties = pika.spec.BasicProperties().decode(buf, method_end + 19)
    conn.frames_received += 2 + len(parts)
    return (
        end,
        channel,
        pika.frame.Method(channel_number, method),
        pika.frame.Header(channel_number, body_size, properties),
        parts[0] if len(parts) == 1 else b"".join(parts),
    )


def _on_data_available(self: Any, data_in: bytes) -> None:
    """pika's `Connection._on_data_available`, with deliveries taken whole (see above)."""
    buf = self._frame_buffer + data_in if self._frame_buffer else data_in
    if buf[:4] == b"AMQP":  # the broker's protocol header (a version mismatch): pika's path
        self._frame_buffer = b""
        _pika_on_data_available(self, buf)
        return
    at = 0
    try:
        while (frame := _frame_at(buf, at)) is not None:
            kind, channel_number, end = frame
            if kind == _METHOD and channel_number and buf[at + 7 : at + 11] == _DELIVER:
                taken = _delivery(self, buf, at, channel_number, end)
                if taken is None:
                    break
                if taken != -1:  # consumed before it is handed on, as pika trims before processing
                    end, channel, method, header, body = taken
                    self.bytes_received += end - at
                    at = end
                    channel._on_deliver(method, header, body)
                    continue
            _, value = pika.frame.decode_frame(buf[at:end])
            self.bytes_received += end - at
            at = end
            self._process_frame(value)
    finally:
        self._frame_buffer = buf[at:]


_on_data_available.__inventory_deliveries__ = True  # type: ignore[attr-defined]
_pika_on_data_available: Callable[[Any, bytes], None] = pika.connection.Connection._on_data_available


def read_deliveries() -> bool:
    """Installs the delivery reader (idempotent). False if this pika lacks what it relies on."""
    conn, channel = pika.connection.Connection, pika.channel.Channel
    if not all(hasattr(conn, name) for name in ("_on_data_available", "_process_frame")):
        return False
    if not hasattr(channel, "_on_deliver"):
        return False
    if not getattr(conn._on_data_available, "__inventory_deliveries__", False):
        conn._on_data_available = _on_data_available
    return True


# ---- header tables that any AMQP 0-9-1 client can send (AMQP 0-9-1 section 4.2.5.5) -----------
#
# pika's decoder turns a double (`d`) or float (`f`) into an int: 1e20 became an int that pika
# cannot encode again (dead-lettering raised struct.error), NaN and ±Inf raised in frame
# decoding, and so did a timestamp beyond what `datetime` holds (e.g. 2^63-1): the connection
# broke at every delivery of such a message, valid or not, until RabbitMQ's delivery limit.
# `robust_tables()` installs a decoder that never raises for well-formed field values and keeps
# what Python cannot hold in a form that encodes back to the same AMQP type; a table or array
# whose contents cannot be decoded at all is kept as its raw bytes (its length prefix says where
# it ends), and a content header that cannot be decoded leaves its message with no properties
# but UNDECODABLE_PROPERTIES, instead of breaking the connection.

UNDECODABLE_TABLE = "x-inventory-undecodable-table"  # the raw bytes of a table we could not read
UNDECODABLE_PROPERTIES = "x-inventory-undecodable-properties"  # ... of a whole content header


class AmqpTimestamp(int):
    """A timestamp (`T`, seconds since the epoch, unsigned 64-bit) beyond `datetime`'s range."""


class AmqpArray(list):  # type: ignore[type-arg]
    """The raw bytes of a field array (`A`) whose contents could not be decoded."""

    def __init__(self, raw: bytes) -> None:
        super().__init__()
        self.raw = raw


# pika is untyped: the signatures its decoder and encoder keep.
_pika_decode_value: Callable[[bytes, int], tuple[Any, int]] = pika.data.decode_value
_pika_encode_value: Callable[[list[bytes], Any], int] = pika.data.encode_value


def _decode_table(encoded: bytes, offset: int) -> tuple[dict[Any, Any], int]:
    size = struct.unpack_from(">I", encoded, offset)[0]
    start, end = offset + 4, offset + 4 + size
    if end > len(encoded):
        raise pika.exceptions.InvalidFrameError("field table runs past its frame")
    table: dict[Any, Any] = {}
    try:
        at = start
        while at < end:
            key, at = pika.data.decode_short_string(encoded, at)
            table[key], at = _decode_value(encoded, at)
        if at != end:
            raise ValueError("field table entries overrun its length")
    except Exception:  # an unknown field type, a bad length: keep the table's bytes as they are
        return {UNDECODABLE_TABLE: bytes(encoded[start:end])}, end
    return table, end


def _decode_value(encoded: bytes, offset: int) -> tuple[Any, int]:
    kind = encoded[offset : offset + 1]
    if kind == b"d":
        return struct.unpack_from(">d", encoded, offset + 1)[0], offset + 9
    if kind == b"f":
        return struct.unpack_from(">f", encoded, offset + 1)[0], offset + 5
    if kind == b"T":
        seconds = struct.unpack_from(">Q", encoded, offset + 1)[0]
        try:
            return datetime.datetime.fromtimestamp(seconds, datetime.UTC), offset + 9
        except (OverflowError, OSError, ValueError):
            return AmqpTimestamp(seconds), offset + 9
    if kind == b"A":
        size = struct.unpack_from(">I", encoded, offset + 1)[0]
        start, end = offset + 5, offset + 5 + size
        if end > len(encoded):
            raise pika.exceptions.InvalidFrameError("field array runs past its frame")
        items: list[Any] = []
        try:
            at = start
            while at < end:
                value, at = _decode_value(encoded, at)
                items.append(value)
            if at != end:
                raise ValueError("field array values overrun its length")
        except Exception:
            return AmqpArray(bytes(encoded[start:end])), end
        return items, end
    if kind == b"F":
        return _decode_table(encoded, offset + 1)
    return _pika_decode_value(encoded, offset)


def _encode_value(pieces: list[bytes], value: Any) -> int:
    """pika's encode_value, plus what _decode_value makes that pika cannot encode."""
    if isinstance(value, float):
        pieces.append(b"d" + struct.pack(">d", value))
        return 9
    if isinstance(value, AmqpTimestamp):
        pieces.append(b"T" + struct.pack(">Q", value))
        return 9
    if isinstance(value, AmqpArray):
        pieces.append(struct.pack(">cI", b"A", len(value.raw)) + value.raw)
        return 5 + len(value.raw)
    return _pika_encode_value(pieces, value)


_pika_properties_decode = pika.spec.BasicProperties.decode


def _properties_decode(self: Any, encoded: bytes, offset: int = 0) -> Any:
    try:
        return _pika_properties_decode(self, encoded, offset)
    except Exception:  # a content header we cannot read: deliver the message without properties
        for name in list(vars(self)):
            setattr(self, name, None)
        self.headers = {UNDECODABLE_PROPERTIES: bytes(encoded[offset:])}
        return self


def robust_tables() -> None:
    """Installs the decoder and encoder above into pika (idempotent)."""
    pika.data.decode_table = _decode_table
    pika.data.decode_value = _decode_value
    pika.data.encode_value = _encode_value
    pika.spec.BasicProperties.decode = _properties_decode


def _encodable(value: Any) -> bool:
    try:
        _encode_value([], value)
    except Exception:
        return False
    return True


def _safe_value(value: Any) -> Any:
    # RabbitMQ refuses a double that is NaN or infinite (it closes the connection), as it would
    # refuse any value it cannot read: such a value is sent as text.
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return safe_headers(value)
    if isinstance(value, list) and not isinstance(value, AmqpArray):
        return [_safe_value(v) for v in value]
    return value if _encodable(value) else repr(value)


def safe_headers(headers: Any) -> dict[Any, Any]:
    """Headers as received, in a form that pika encodes and RabbitMQ takes: what cannot be
    sent as it came (a NaN, an integer beyond 64 bits, a key longer than 255 bytes) becomes
    its repr() text. Never raises."""
    if not isinstance(headers, dict):
        return {} if headers is None else {"x-inventory-original-headers": repr(headers)[:10_000]}
    out: dict[Any, Any] = {}
    for key, value in headers.items():
        try:
            pika.data.encode_short_string([], key)
        except Exception:
            key = repr(key)[:200]
        out[key] = _safe_value(value)
    return out
