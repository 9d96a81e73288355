"""amqp_framing.read_deliveries reads a byte stream into the same deliveries and frames as
pika's own `Connection._on_data_available`, however the stream is cut into reads."""

from __future__ import annotations

import random
from typing import Any

import pika.callback
import pika.channel
import pika.connection
import pika.exceptions
import pytest
from pika import frame, spec

from inventory_worker.adapters import amqp_framing

BODY_MAX = 1000  # small frames, so that bodies span several


class Recorder(pika.channel.Channel):
    """A channel that records what reaches it whole (deliveries, returns) instead of acting."""

    def __init__(self, number: int, record: list[Any]) -> None:  # pika's __init__ needs a connection
        self.channel_number = number
        self._content_assembler = pika.channel.ContentFrameAssembler()
        self.record = record

    def _on_deliver(self, method_frame: Any, header_frame: Any, body: bytes) -> None:
        self.record.append(
            (
                "deliver",
                method_frame.channel_number,
                vars(method_frame.method),
                header_frame.body_size,
                vars(header_frame.properties),
                body,
            )
        )

    def _on_return(self, method_frame: Any, header_frame: Any, body: bytes) -> None:
        self.record.append(("return", method_frame.channel_number, vars(method_frame.method), body))


class Reader(pika.connection.Connection):
    """The reading half of a pika connection: frames that are not content are recorded where
    pika would look for their callbacks."""

    def __init__(self, on_data: Any) -> None:  # no socket, no handshake
        self.record: list[Any] = []
        self._frame_buffer = b""
        self.bytes_received = self.frames_received = 0
        self._heartbeat_checker = None
        self.callbacks = pika.callback.CallbackManager()
        self._channels = {n: Recorder(n, self.record) for n in (1, 2)}
        self._on_data = on_data

    # Abstract in pika (its adapters provide them); reading never calls them.
    _adapter_add_callback_threadsafe = _adapter_call_later = _adapter_connect_stream = None
    _adapter_disconnect_stream = _adapter_emit_data = _adapter_remove_timeout = None

    def _process_callbacks(self, frame_value: Any) -> bool:
        if isinstance(frame_value, frame.Method) and spec.has_content(frame_value.method.INDEX):
            return False  # content: on to the channel's assembler
        if isinstance(frame_value, (frame.Header, frame.Body)):
            return False
        self.record.append(
            (
                "frame",
                type(frame_value).__name__,
                frame_value.channel_number,
                vars(getattr(frame_value, "method", None) or frame_value),
            )
        )
        return True

    def feed(self, stream: bytes, cuts: list[int]) -> Reader:
        at = 0
        for cut in [*cuts, len(stream)]:
            self._on_data(self, stream[at:cut])
            at = cut
        return self


def message(channel: int, method: Any, body: bytes, **props: Any) -> bytes:
    out = [
        frame.Method(channel, method).marshal(),
        frame.Header(channel, len(body), spec.BasicProperties(**props)).marshal(),
    ]
    out += [frame.Body(channel, body[i : i + BODY_MAX]).marshal() for i in range(0, len(body), BODY_MAX)]
    return b"".join(out)


def deliver(
    tag: int,
    body: bytes,
    channel: int = 1,
    redelivered: bool = False,
    routing_key: str = "order.placed",
    **props: Any,
) -> bytes:
    return message(
        channel, spec.Basic.Deliver("ctag1.abc", tag, redelivered, "orders", routing_key), body, **props
    )


def stream() -> bytes:
    """Deliveries of every shape, between the other frames a consumer's connection reads."""
    return b"".join(
        [
            deliver(1, b'{"a":1}', content_type="application/json", delivery_mode=2),
            deliver(2, b""),  # no body frame at all
            deliver(3, bytes(range(256)) * 13, redelivered=True),  # body in four frames
            frame.Heartbeat().marshal(),
            deliver(
                4,
                b"x",
                channel=2,
                message_id="m-4",
                headers={"x-death": [{"count": 2}], "n": 7, "t": {"nested": "ü"}},
            ),
            frame.Method(1, spec.Basic.Ack(delivery_tag=9, multiple=True)).marshal(),  # a confirm
            message(1, spec.Basic.Return(312, "NO_ROUTE", "inventory.events", "nowhere"), b"returned"),
            deliver(5, b"after the return", routing_key="ünïcode.key", type="t", timestamp=1_764_000_000),
            frame.Method(2, spec.Basic.CancelOk("ctag1.abc")).marshal(),
            deliver(6, b"y" * 3000, correlation_id="c", priority=3, expiration="60000"),
        ]
    )


def read(on_data: Any, data: bytes, cuts: list[int]) -> Reader:
    return Reader(on_data).feed(data, cuts)


PIKA = amqp_framing._pika_on_data_available
OURS = amqp_framing._on_data_available


@pytest.mark.parametrize("seed", range(40))
def test_the_same_deliveries_and_frames_as_pika_however_the_stream_is_cut(seed):
    data = stream()
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(data)), rng.choice([1, 3, 10, 60])))
    ours, theirs = read(OURS, data, cuts), read(PIKA, data, cuts)
    assert ours.record == theirs.record
    assert [r[0] for r in ours.record].count("deliver") == 6
    assert (ours.bytes_received, ours.frames_received) == (theirs.bytes_received, theirs.frames_received)
    assert ours.bytes_received == len(data) and ours._frame_buffer == b""


def test_read_a_byte_at_a_time():
    data = stream()
    cuts = list(range(1, len(data)))
    assert read(OURS, data, cuts).record == read(PIKA, data, cuts).record


def test_a_delivery_not_all_there_waits_for_the_rest():
    one = deliver(1, b"z" * 2500)
    reader = read(OURS, one[:-5], [])
    assert reader.record == [] and reader._frame_buffer == one[:-5]
    reader.feed(one[-5:], [])
    assert [r[0] for r in reader.record] == ["deliver"] and reader.record[0][5] == b"z" * 2500


def test_a_large_delivery_is_left_to_pika_as_its_frames_come():
    big = bytes(range(256)) * 2048  # 512 KiB: over WHOLE_BODY_MAX
    assert len(big) > amqp_framing.WHOLE_BODY_MAX
    data = deliver(1, big) + deliver(2, b"small")
    cuts = list(range(64 * 1024, len(data), 64 * 1024))  # reads of 64 KiB
    ours = Reader(OURS)
    at = 0
    for cut in [*cuts, len(data)]:
        ours.feed(data[at:cut], [])
        at = cut
        assert len(ours._frame_buffer) < 2 * BODY_MAX, "only a partial frame is kept between reads"
    assert ours.record == read(PIKA, data, cuts).record
    assert [r[5] for r in ours.record] == [big, b"small"]


def test_a_delivery_whose_handler_raises_is_not_handed_over_again():
    # pika cuts a frame from its buffer before it processes it: a raising handler loses that
    # delivery, and the next read goes on after it. So must ours.
    data = deliver(1, b"one") + deliver(2, b"two")
    for on_data in (OURS, PIKA):
        reader = Reader(on_data)
        channel = reader._channels[1]
        handled = channel._on_deliver

        def raising_once(method_frame, header_frame, body, handled=handled, channel=channel):
            channel._on_deliver = handled
            raise RuntimeError("the handler failed")

        channel._on_deliver = raising_once
        with pytest.raises(RuntimeError):
            reader.feed(data, [])
        reader.feed(b"", [])
        assert [r[2]["delivery_tag"] for r in reader.record] == [2], on_data


def outcome(on_data: Any, data: bytes) -> tuple[Any, ...]:
    try:
        return ("read", read(on_data, data, []).record)
    except Exception as exc:
        return ("raised", type(exc))


@pytest.mark.parametrize(
    "broken",
    [
        # a content header on another channel than its method's
        frame.Method(1, spec.Basic.Deliver("t", 1, False, "x", "k")).marshal()
        + frame.Header(2, 0, spec.BasicProperties()).marshal(),
        # a body frame where the content header belongs
        frame.Method(1, spec.Basic.Deliver("t", 1, False, "x", "k")).marshal()
        + frame.Body(1, b"abc").marshal(),
        # a body longer than its header announced
        frame.Method(1, spec.Basic.Deliver("t", 1, False, "x", "k")).marshal()
        + frame.Header(1, 2, spec.BasicProperties()).marshal()
        + frame.Body(1, b"abc").marshal(),
        # a delivery for a channel that is not open
        deliver(1, b"abc", channel=7),
    ],
)
def test_a_broken_delivery_goes_pikas_way_and_ends_as_it_would(broken):
    assert outcome(OURS, broken) == outcome(PIKA, broken)


def test_a_bad_frame_end_is_refused_as_pika_refuses_it():
    bad = bytearray(deliver(1, b"abc"))
    bad[-1] = 0
    for on_data in (OURS, PIKA):
        with pytest.raises(pika.exceptions.InvalidFrameError):
            read(on_data, bytes(bad), [])


def test_installed_in_pika():
    import inventory_worker.adapters.rabbitmq  # noqa: F401  (installs it)

    assert pika.connection.Connection._on_data_available is OURS
    assert amqp_framing.read_deliveries()
