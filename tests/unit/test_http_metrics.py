"""The HTTP metrics tallied per process and flushed in batches (http/tally.py) come out as the
same samples as observing each request directly would give."""

import uuid

import pytest
from prometheus_client import REGISTRY

from inventory_worker import metrics
from inventory_worker.http.tally import HttpTally


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_flush_adds_exactly_what_observing_each_request_would():
    tallied, direct = f"/t-{uuid.uuid4().hex}", f"/d-{uuid.uuid4().hex}"
    requests = [(200, 0.0003), (200, 0.0005), (200, 0.0004), (404, 0.02), (503, 5.0)]
    tally = HttpTally(flush_seconds=3600)  # no background flush during the test
    for status, seconds in requests:
        tally.request(tallied, status, seconds)
        metrics.HTTP_REQUESTS.labels(direct, str(status)).inc()
        metrics.HTTP_SECONDS.labels(direct).observe(seconds)
    before = value("inventory_cache_requests_total", result="hit")
    tally.cache("hit")
    tally.cache("hit")
    assert value("inventory_http_request_duration_seconds_count", route=tallied) == 0  # not yet written
    tally.flush()
    assert value("inventory_cache_requests_total", result="hit") == before + 2
    for status in ("200", "404", "503"):
        assert (
            value("inventory_http_requests_total", route=tallied, status=status)
            == value("inventory_http_requests_total", route=direct, status=status)
            > 0
        )
    for le in ("0.0005", "0.001", "0.025", "2.5", "+Inf"):
        assert value("inventory_http_request_duration_seconds_bucket", route=tallied, le=le) == value(
            "inventory_http_request_duration_seconds_bucket", route=direct, le=le
        )
    assert value("inventory_http_request_duration_seconds_bucket", route=tallied, le="0.0005") == 3
    assert value("inventory_http_request_duration_seconds_count", route=tallied) == 5
    assert value("inventory_http_request_duration_seconds_sum", route=tallied) == pytest.approx(5.0212)
    tally.flush()  # nothing new: nothing added twice
    assert value("inventory_http_request_duration_seconds_count", route=tallied) == 5


def test_the_background_thread_flushes_within_its_interval():
    import time

    route = f"/b-{uuid.uuid4().hex}"
    tally = HttpTally(flush_seconds=0.05)
    tally.request(route, 200, 0.001)
    deadline = time.monotonic() + 5
    while value("inventory_http_requests_total", route=route, status="200") != 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_observe_many_gives_the_samples_of_observing_each_value():
    """metrics.observe_many (the consumer's per-batch processing times) against observe()."""
    from prometheus_client import CollectorRegistry, Histogram

    registry = CollectorRegistry()
    buckets = metrics.EVENT_SECONDS._upper_bounds[:-1]
    many = Histogram("many_seconds", "t", buckets=buckets, registry=registry)
    each = Histogram("each_seconds", "t", buckets=buckets, registry=registry)
    values = [0.0, 0.001, 0.0011, 0.0025, 0.003, 0.01, 0.4, 2.5, 9.9, 10.0, 12.0, 0.001, 0.02]
    metrics.observe_many(many, values)
    metrics.observe_many(many, [])  # nothing to add
    for v in values:
        each.observe(v)

    def samples(prefix):
        return {
            (s.name.replace(prefix, ""), tuple(sorted(s.labels.items()))): s.value
            for m in registry.collect()
            if m.name.startswith(prefix)
            for s in m.samples
            if not s.name.endswith("_created")
        }

    assert samples("many") == samples("each")
    assert samples("many")[("_seconds_count", ())] == len(values)
