"""amqp_framing.encode_publish frames a Basic.Publish byte for byte as pika does."""

import struct

import pytest
from pika import frame, spec

from inventory_worker.adapters.amqp_framing import encode_publish

BODY_MAX = 131072 - 8  # pika's default frame_max less the frame overhead


def pika_frames(
    channel: int, exchange: str, routing_key: str, body: bytes, body_max: int, **props: object
) -> bytes:
    """What pika's Connection._send_message writes for the same publish."""
    out = [
        frame.Method(channel, spec.Basic.Publish(exchange=exchange, routing_key=routing_key)).marshal(),
        frame.Header(channel, len(body), spec.BasicProperties(**props)).marshal(),
    ]
    for start in range(0, len(body), body_max):
        out.append(frame.Body(channel, body[start : start + body_max]).marshal())
    return b"".join(out)


CASES = [
    # what the worker publishes: a result event
    dict(
        content_type="application/json",
        delivery_mode=2,
        message_id="0b7e6f1c-8f0a-4d55-9d7e-1f1c2b3a4d5e",
        type="inventory.reserved",
        timestamp=1_764_000_000,
        correlation_id="5d3c2b1a-0000-4000-8000-000000000001",
    ),
    # what the benchmark publishes: an input
    dict(content_type="application/json", delivery_mode=2),
    dict(),  # no properties at all
    dict(type="ünïcode.type", message_id="x" * 255),  # multi-byte characters, the longest short string
    dict(correlation_id="", timestamp=0, delivery_mode=1),  # empty and zero values are still sent
]


@pytest.mark.parametrize("props", CASES)
@pytest.mark.parametrize("body", [b"", b'{"a":1}', bytes(range(256)) * 700])  # empty, small, > one frame
def test_same_bytes_as_pika(props, body):
    ours = encode_publish(3, "inventory.events", "inventory.reserved", body, BODY_MAX, **props)
    assert ours == pika_frames(3, "inventory.events", "inventory.reserved", body, BODY_MAX, **props)


def test_body_split_in_frames_of_at_most_body_max():
    body = b"y" * 1000
    ours = encode_publish(1, "", "q", body, 300)
    assert ours == pika_frames(1, "", "q", body, 300)
    assert ours.count(b"\x03\x00\x01") == 4  # body frames of 300, 300, 300 and 100 bytes


def test_short_string_over_255_bytes_is_refused():
    with pytest.raises(ValueError):
        encode_publish(1, "", "k" * 256, b"", BODY_MAX)
    with pytest.raises(ValueError):
        encode_publish(1, "", "k", b"", BODY_MAX, message_id="é" * 128)  # 256 bytes in UTF-8


# ---- header tables of any AMQP 0-9-1 client: decoded without raising, sent on without failing -----

import datetime as _dt  # noqa: E402
import decimal  # noqa: E402
import math  # noqa: E402

import inventory_worker.adapters.rabbitmq  # noqa: E402,F401  (installs robust_tables)
from inventory_worker.adapters import amqp_framing  # noqa: E402

from ..support import amqp_array, amqp_double, amqp_longstr, amqp_table, amqp_timestamp, content_header_props  # noqa: E402

FIELDS = {
    "big": (amqp_double(1e20), 1e20),
    "nan": (amqp_double(math.nan), "nan"),
    "inf": (amqp_double(math.inf), math.inf),
    "ninf": (amqp_double(-math.inf), -math.inf),
    "float32": (b"f" + struct.pack(">f", 0.5), 0.5),
    "decimal": (b"D" + struct.pack(">Bi", 2, -12345), decimal.Decimal("-123.45")),
    "decimal_255": (b"D" + struct.pack(">Bi", 255, 2**31 - 1), decimal.Decimal(2**31 - 1).scaleb(-255)),
    "ts_max": (amqp_timestamp(2**63 - 1), 2**63 - 1),
    "ts_u64": (amqp_timestamp(2**64 - 1), 2**64 - 1),
    "ts_ok": (amqp_timestamp(1_764_000_000), _dt.datetime.fromtimestamp(1_764_000_000, _dt.UTC)),
    "nested": (
        b"F"
        + amqp_table(
            [("a", amqp_double(math.nan)), ("b", amqp_array([amqp_double(-1e300), amqp_timestamp(2**63)]))]
        ),
        None,
    ),
    "longstr": (amqp_longstr(b"y" * 70_000), "y" * 70_000),
    "not_utf8": (amqp_longstr(b"\xff\xfe"), b"\xff\xfe"),
    "bytes": (amqp_longstr(b"\x00\xff", b"x"), b"\x00\xff"),
}


def decode_props(table: bytes) -> spec.BasicProperties:
    frame_data = struct.pack(">HHQ", 60, 0, 2) + content_header_props(table, message_id="m-1")
    raw = struct.pack(">BHI", 2, 1, len(frame_data)) + frame_data + b"\xce"
    consumed, header = frame.decode_frame(raw)
    assert consumed == len(raw)
    return header.properties


def test_any_field_value_is_decoded_and_can_be_sent_on():
    props = decode_props(amqp_table([(k, v) for k, (v, _) in FIELDS.items()]))
    h = props.headers
    assert props.message_id == "m-1" and props.delivery_mode == 2  # what follows the table is read too
    assert math.isnan(h["nan"]) and h["big"] == 1e20 and h["ninf"] == -math.inf and h["ts_max"] == 2**63 - 1
    assert h["nested"]["b"][1] == 2**63 and math.isnan(h["nested"]["a"])
    # dead-lettering sends the headers on: what RabbitMQ takes goes as it came, NaN/Inf as text
    safe = amqp_framing.safe_headers(h)
    again = decode_props(_table_of(spec.BasicProperties(headers=safe)))
    for key, (_, expected) in FIELDS.items():
        if expected is None:
            continue
        got = again.headers[key]
        if isinstance(expected, float) and not math.isfinite(expected):
            assert got == repr(expected)
        else:
            assert got == expected, key
    assert again.headers["nested"] == {"a": "nan", "b": [-1e300, 2**63]}


def _table_of(props: spec.BasicProperties) -> bytes:
    encoded = b"".join(props.encode())
    return encoded[2:]  # the flags word, then (only headers set) the table


@pytest.mark.parametrize(
    "table",
    [
        amqp_table([("u", b"?")]),  # an unknown field type
        amqp_table([("u", amqp_double(1.0)[:5])]),  # a value cut short inside the table
        amqp_table([("a", b"A" + struct.pack(">I", 3) + b"zzz")]),  # an array of unknown values
    ],
)
def test_an_undecodable_table_is_kept_as_bytes_and_the_rest_is_read(table):
    props = decode_props(table)
    assert props.message_id == "m-1"
    assert props.headers  # the raw bytes, under UNDECODABLE_TABLE (at some depth)
    b"".join(spec.BasicProperties(headers=amqp_framing.safe_headers(props.headers)).encode())


def test_an_undecodable_content_header_leaves_the_message_without_properties():
    frame_data = struct.pack(">HHQ", 60, 0, 2) + struct.pack(">H", 1 << 13) + struct.pack(">I", 1000) + b"xx"
    raw = struct.pack(">BHI", 2, 1, len(frame_data)) + frame_data + b"\xce"
    consumed, header = frame.decode_frame(raw)
    assert consumed == len(raw) and header.body_size == 2
    assert header.properties.message_id is None
    assert amqp_framing.UNDECODABLE_PROPERTIES in header.properties.headers


def test_safe_headers_never_raises():
    weird = {"k" * 300: 1, "big": 2**70, "obj": object(), "d": {"n": [math.inf, 2**64]}}
    safe = amqp_framing.safe_headers(weird)
    b"".join(spec.BasicProperties(headers=safe).encode())
    assert safe["big"] == repr(2**70) and safe["d"] == {"n": ["inf", repr(2**64)]}
    assert amqp_framing.safe_headers(None) == {} and amqp_framing.safe_headers("x")
