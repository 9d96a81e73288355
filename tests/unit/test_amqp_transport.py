"""amqp_transport.encode_publish frames a Basic.Publish byte for byte as pika does."""

import pytest
from pika import frame, spec

from inventory_worker.amqp_transport import encode_publish

BODY_MAX = 131072 - 8  # pika's default frame_max less the frame overhead


def pika_frames(channel: int, exchange: str, routing_key: str, body: bytes, body_max: int,
                **props: object) -> bytes:
    """What pika's Connection._send_message writes for the same publish."""
    out = [frame.Method(channel, spec.Basic.Publish(exchange=exchange, routing_key=routing_key)).marshal(),
           frame.Header(channel, len(body), spec.BasicProperties(**props)).marshal()]
    for start in range(0, len(body), body_max):
        out.append(frame.Body(channel, body[start : start + body_max]).marshal())
    return b"".join(out)


CASES = [
    # what the worker publishes: a result event
    dict(content_type="application/json", delivery_mode=2, message_id="0b7e6f1c-8f0a-4d55-9d7e-1f1c2b3a4d5e",
         type="inventory.reserved", timestamp=1_764_000_000, correlation_id="5d3c2b1a-0000-4000-8000-000000000001"),
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
