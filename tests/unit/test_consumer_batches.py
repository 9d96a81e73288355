"""The consumer's batch logic on in-memory fakes of its ports (tests/unit/fakes.py), in
milliseconds: what is applied together, what is isolated, what is dead-lettered and why, what
is acked when, and the cache write-behind. The same behaviour against the real services:
tests/e2e/test_consumer_batches.py, tests/integration/test_consumer_unexpected.py,
tests/integration/test_delivery_attempts.py."""

from __future__ import annotations

import uuid

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from inventory_worker.contract import Figures

from .fakes import Arrival, Rig, arrival


@pytest.fixture(autouse=True)
def logs():
    """The consumer's log lines, captured (also spares rendering tracebacks, 0.5 s each)."""
    with capture_logs() as captured:
        yield captured


def adjust(product: str, delta: int, **kw) -> Arrival:
    return arrival("stock.adjusted", {"product_id": product, "delta": delta}, **kw)


def place(order: str, product: str, quantity: int, **kw) -> Arrival:
    return arrival(
        "order.placed", {"order_id": order, "lines": [{"product_id": product, "quantity": quantity}]}, **kw
    )


def figures(rig: Rig, product: str) -> tuple[int, int] | None:
    f = rig.store.products.get(product)
    return (f["on_hand"], f["reserved"]) if f else None


def test_a_clean_batch_is_applied_in_one_call_then_acked_once_then_its_results_sent(logs):
    batch = [adjust("A", 10), adjust("B", 5), place("o-1", "A", 3)]
    rig = Rig([batch]).run()
    assert [c.event_ids for c in rig.store.calls] == [[a.event_id for a in batch]]
    assert rig.channel.acks == [(3, True)], "one ack, multiple=True, for the last tag"
    assert [m.routing_key for m in rig.publisher.sent] == [
        "inventory.adjusted",
        "inventory.adjusted",
        "inventory.reserved",
    ]
    # After the commit: cache, then the ack, then the results (the outbox keeps them if we die).
    assert rig.journal[:4] == ["apply", "cache", "ack", "send"]
    assert rig.cache.data["A"] == Figures(product_id="A", on_hand=10, reserved=3, available=7, version=2)
    assert rig.publisher.dead_letters == []
    handled = [(e["type"], e["outcome"]) for e in logs if e["event"] == "event handled"]
    assert handled == [
        ("stock.adjusted", "adjusted"),
        ("stock.adjusted", "adjusted"),
        ("order.placed", "reserved"),
    ]


def test_an_invalid_body_is_dead_lettered_with_its_reason_and_the_rest_applied():
    good_1, good_2 = adjust("A", 10), adjust("A", 1)
    bad = Arrival("stock.adjusted", b"not json", event_id="bad-1")
    wrong_type = adjust("B", 1)
    wrong_type.routing_key = "order.placed"  # the body says stock.adjusted
    rig = Rig([[good_1, bad, wrong_type, good_2]]).run()
    reasons = rig.reasons()
    assert set(reasons) == {"bad-1", wrong_type.event_id}
    assert reasons["bad-1"].startswith("body is not JSON")
    assert "does not match routing key" in reasons[wrong_type.event_id]
    assert [c.event_ids for c in rig.store.calls] == [[good_1.event_id, good_2.event_id]]
    assert figures(rig, "A") == (11, 0) and figures(rig, "B") is None
    assert rig.channel.acks == [(4, True)]


def test_a_batch_of_nothing_but_invalid_bodies_is_acked_without_applying():
    rig = Rig([[Arrival("stock.adjusted", b"{}", event_id="x"), Arrival("x", b"[]", event_id="y")]]).run()
    assert set(rig.reasons()) == {"x", "y"}
    assert rig.store.calls == [] and rig.channel.acks == [(2, True)]


def test_redelivered_messages_are_applied_one_by_one_and_one_past_the_limit_dead_lettered():
    first, poison, last = (
        adjust("A", 1, redelivered=True),
        adjust("P", 5, redelivered=True),
        adjust("A", 2, redelivered=True),
    )
    rig = Rig([[first, poison, last]], delivery_limit=3)
    rig.store.attempts[poison.event_id] = 3  # applying it was cut short three times already
    rig.store.attempts[first.event_id] = 1
    rig.run()
    assert [c.event_ids for c in rig.store.calls] == [[first.event_id], [last.event_id]], "one by one"
    assert list(rig.reasons()) == [poison.event_id]
    assert "interrupted 4 times (delivery limit 3)" in rig.reasons()[poison.event_id]
    assert figures(rig, "A") == (3, 0) and figures(rig, "P") is None
    assert rig.channel.acks == [(1, True), (2, True), (3, True)]
    assert rig.store.attempts == {}, "counts are forgotten once the messages are settled"


def test_a_redelivered_message_under_the_limit_is_applied():
    again = adjust("A", 4, redelivered=True)
    rig = Rig([[again]], delivery_limit=3)
    rig.store.attempts[again.event_id] = 2
    rig.run()
    assert rig.publisher.dead_letters == [] and figures(rig, "A") == (4, 0)


def test_an_event_the_store_refuses_is_isolated_and_dead_lettered_the_others_applied():
    batch = [adjust("A", 10), adjust("A", -100), adjust("B", 2), place("o-1", "A", 1)]
    rig = Rig([batch])
    rig.store.refuse.add(batch[1].event_id)
    rig.run()
    ids = [a.event_id for a in batch]
    assert [c.event_ids for c in rig.store.calls] == [ids] + [[i] for i in ids], (
        "whole batch, then one by one"
    )
    assert rig.reasons() == {
        ids[1]: "refused by the database: CheckViolation: new row violates check constraint"
    }
    assert figures(rig, "A") == (10, 1) and figures(rig, "B") == (2, 0)
    assert rig.channel.acks == [(4, True)]
    assert len(rig.publisher.sent) == 3


def test_a_transient_error_is_retried_with_growing_waits_then_the_batch_applied_once(logs):
    batch = [adjust("A", 10), adjust("B", 1)]
    rig = Rig([batch])
    rig.store.transient = 2  # deadlocked twice
    rig.run()
    calls = rig.store.calls
    assert [c.event_ids for c in calls] == [[a.event_id for a in batch]] * 3, "the same batch, again"
    first_wait, second_wait = calls[1].at - calls[0].at, calls[2].at - calls[1].at
    assert first_wait >= 0.05 and second_wait >= 0.1, "exponential backoff (50 ms doubling, plus jitter)"
    assert rig.publisher.dead_letters == []
    assert figures(rig, "A") == (10, 0) and rig.channel.acks == [(2, True)]
    assert [e["attempt"] for e in logs if e["event"] == "retrying"] == [1, 2]


def test_stopping_while_retrying_leaves_the_batch_unacked():
    rig = Rig([[adjust("A", 1)]])
    rig.store.transient = 10**6  # PostgreSQL never comes back
    rig.conn.sleep = lambda seconds: rig.stop.set()  # SIGTERM while waiting
    rig.consumer.run()
    assert rig.channel.acks == [] and rig.publisher.dead_letters == [] and rig.store.products == {}


def test_an_unexpected_exception_dead_letters_only_its_message():
    batch = [adjust("A", 1), place("o-bug", "A", 1), adjust("A", 2)]
    rig = Rig([batch])
    rig.store.explode[batch[1].event_id] = KeyError("apply bug")
    rig.run()
    assert rig.reasons() == {batch[1].event_id: "unexpected error: KeyError('apply bug')"}
    assert figures(rig, "A") == (3, 0)
    assert rig.channel.acks == [(3, True)]


def test_an_id_reused_with_other_data_is_dead_lettered_a_true_duplicate_is_not():
    original = adjust("A", 10)
    duplicate = adjust("A", 10, event_id=original.event_id)
    reused = adjust("A", 99, event_id=original.event_id)
    rig = Rig([[original], [duplicate, reused]]).run()
    assert len(rig.publisher.dead_letters) == 1
    assert rig.publisher.dead_letters[0].reason == "id_reused"
    assert rig.publisher.dead_letters[0].body == reused.body
    assert figures(rig, "A") == (10, 0)
    assert rig.channel.acks == [(1, True), (3, True)]
    assert len(rig.publisher.sent) == 1, "neither a duplicate nor an id_reused publishes anything"


def test_cache_failures_mark_products_stale_back_off_and_are_refilled_when_idle():
    rig = Rig([[adjust("A", 10)], [adjust("B", 5), adjust("A", 1)]], idle_rounds=8)
    rig.cache.fail_next = 2  # down for the batch's write and the first refill
    start = rig.clock()
    rig.run()
    at = [(round(t - start, 2), ids) for t, ids in rig.cache.attempts]
    # 1st batch: fails (back off 0.25 s); 2nd batch: within the backoff, Redis is left alone.
    # Idle rounds of 0.2 s: refill at 0.4 fails (back off 0.5 s), refill at 1.0 succeeds.
    assert at == [(0.0, ["A"]), (0.4, ["A", "B"]), (1.0, ["A", "B"])]
    assert rig.cache.data == {"A": rig.store.figures(["A"])[0], "B": rig.store.figures(["B"])[0]}
    assert rig.cache.data["A"]["on_hand"] == 11
    assert rig.writer.stale == set()
    assert rig.channel.acks == [(1, True), (3, True)], "a failed cache write holds up no batch"


def test_confirmed_results_are_marked_published_in_the_next_batchs_transaction():
    first, second = adjust("A", 10), adjust("A", 1)
    rig = Rig([[first], [second]])
    rig.run()
    [sent_1] = [m.outbox_id for m in rig.publisher.sent[:1]]
    assert [c.mark_published for c in rig.store.calls] == [[], [sent_1]]
    assert rig.journal.count("mark_published") == 1, "the second batch's results: marked on the way out"
    assert rig.store.published == set(rig.store.outbox)


def test_an_idle_moment_between_batches_does_not_mark_results_in_a_transaction_of_their_own():
    """Below full load a consumer is idle between most batches: the confirmed results of one
    still ride with the next batch's transaction."""
    first, second = adjust("A", 10), adjust("A", 1)
    rig = Rig([[first], [], [second]])  # [] is a pass of the loop that finds no input
    rig.run()
    [sent_1] = [m.outbox_id for m in rig.publisher.sent[:1]]
    assert [c.mark_published for c in rig.store.calls] == [[], [sent_1]]
    assert rig.journal.count("mark_published") == 1  # the second batch's, on the way out


@pytest.mark.parametrize(("relay_min_age", "after"), [(5.0, 1.0), (0.8, 0.4)])
def test_results_left_waiting_for_a_second_are_marked_in_a_transaction_of_their_own(relay_min_age, after):
    """After a second, or half the relay's minimum age if less: the relay must not take them."""
    rig = Rig([[adjust("A", 10)]], idle_rounds=10, outbox_relay_min_age_seconds=relay_min_age)  # 2 s idle
    marked_at: list[float] = []
    mark = rig.store.mark_published

    def timed_mark(ids):
        marked_at.append(rig.clock())
        mark(ids)

    rig.store.mark_published = timed_mark  # type: ignore[method-assign]
    start = rig.clock()
    rig.run()
    assert [round(t - start, 1) for t in marked_at] == [after]
    assert rig.store.published == set(rig.store.outbox)


def test_results_the_broker_did_not_confirm_are_never_marked_published():
    rig = Rig([[adjust("A", 10)], [adjust("A", 1)], [adjust("A", 2)]])
    rig.publisher.nack = {2}  # the second batch's result
    rig.run()
    assert [c.mark_published for c in rig.store.calls] == [[], [1], []]
    assert rig.store.published == {1, 3}, "the outbox relay publishes the rest"


def test_messages_wait_for_a_full_batch_split_at_the_batch_size():
    batch = [adjust(f"P{i}", 1) for i in range(5)]
    rig = Rig([batch], batch_size=2).run()
    assert [len(c.event_ids) for c in rig.store.calls] == [2, 2, 1]
    assert rig.channel.acks == [(2, True), (4, True), (5, True)]
    assert rig.channel.prefetch == 10


def test_a_partial_batch_waits_after_idle_but_not_when_its_messages_came_during_the_last_batch():
    # A comes to an idle consumer: it waits (up to 50 ms) and B, in the next I/O round, joins
    # it. C comes while that batch is applied: it has waited already, so it is applied at once,
    # alone, without the clock moving (waiting for more would only add latency).
    a, b, c = adjust("A", 1), adjust("B", 1), adjust("C", 1)
    rig = Rig([[a], [b], [c]], batch_size=2, batch_max_wait_ms=50)
    started = rig.clock()
    rig.run()
    assert [cl.event_ids for cl in rig.store.calls] == [[a.event_id, b.event_id], [c.event_id]]
    assert [cl.at for cl in rig.store.calls] == [started, started]


def test_each_batch_reports_its_wait_and_its_apply_time():
    """The histograms that split a batch's latency (the benchmark reads them per round)."""

    def seen(name):
        return tuple(REGISTRY.get_sample_value(f"{name}_{s}") for s in ("sum", "count"))

    wait, apply = "inventory_batch_wait_seconds", "inventory_batch_apply_seconds"
    (wait_sum, waits), (apply_sum, applies) = seen(wait), seen(apply)
    # One message to an idle consumer: nothing joins it, so it waits the whole 20 ms. The next
    # is read right after that batch's apply (7 ms): it goes at once, without waiting.
    rig = Rig([[adjust("A", 1)]], batch_max_wait_ms=20)
    rig.store.apply_seconds = 0.007
    real_apply = rig.store.apply_batch

    def apply_then_more_arrive(events, mark_published=()):
        if len(rig.store.calls) == 0:
            rig.conn.groups.append([adjust("B", 1)])
        return real_apply(events, mark_published)

    rig.store.apply_batch = apply_then_more_arrive
    rig.run()
    assert len(rig.store.calls) == 2
    assert seen(apply) == pytest.approx((apply_sum + 0.014, applies + 2))
    assert seen(wait) == pytest.approx((wait_sum + 0.020, waits + 2))


def test_messages_left_at_a_graceful_stop_are_still_handled():
    rig = Rig([[adjust("A", 1)]], idle_rounds=1)
    rig.conn.groups.append([adjust("A", 2), adjust("A", 3)])
    real = rig.conn.process_data_events

    def stop_after_second(time_limit=0):  # SIGTERM lands as the second group arrives
        real(time_limit)
        if not rig.conn.groups:
            rig.stop.set()

    rig.conn.process_data_events = stop_after_second
    rig.run()
    assert figures(rig, "A") == (6, 0) and rig.channel.cancelled
    assert rig.store.published == set(rig.store.outbox), "confirmed at the stop, marked before closing"


def test_a_graceful_stop_leaves_what_half_the_grace_period_cannot_finish():
    """Batches held at the stop are applied for at most half the grace period; the rest stay
    unacked (back to the queue) and the wait for confirms gets only what is left of it."""
    rig = Rig([[adjust("A", 1)]], idle_rounds=1, batch_size=2, shutdown_grace_seconds=10.0)
    rig.conn.groups.append([adjust("A", 10) for _ in range(8)])
    real = rig.conn.process_data_events

    def stop_with_the_burst(time_limit=0):
        real(time_limit)
        if not rig.conn.groups:
            rig.stop.set()

    real_apply = rig.store.apply_batch

    def slow_apply(events, mark_published=()):  # every batch takes 3 s
        rig.clock.advance(3.0)
        return real_apply(events, mark_published)

    rig.conn.process_data_events = stop_with_the_burst
    rig.store.apply_batch = slow_apply
    rig.run()
    # The batch in hand, then two of the three held ones (at 0 and 3 s of the 5 s); the third
    # (tags 8 and 9) is neither applied nor acked.
    assert figures(rig, "A") == (61, 0)
    assert rig.channel.acks[-1] == (7, True)
    assert rig.publisher.drains == [0.0]


def test_every_event_of_a_run_is_accounted_for():
    """Many batches with a bit of everything: each message ends up applied or dead-lettered."""
    groups = []
    for n in range(20):
        groups.append(
            [
                adjust(f"P{n % 3}", 1),
                place(f"o-{n}", f"P{n % 3}", 1),
                Arrival("stock.adjusted", b"{", event_id=f"bad-{n}"),
            ]
        )
    rig = Rig(groups).run()
    applied = {i for c in rig.store.calls for i in c.event_ids}
    assert len(applied) == 40 and len(rig.publisher.dead_letters) == 20
    assert rig.channel.acks == [(3 * (n + 1), True) for n in range(20)]
    assert uuid.UUID(rig.publisher.sent[0].message_id)
