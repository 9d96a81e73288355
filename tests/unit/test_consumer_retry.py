"""The consumer's retry policy for a failing dependency: retry until it works, or until asked
to stop, and then stop cleanly (Stopping: the batch stays unacked and is redelivered) instead
of dying with the dependency's error."""

from __future__ import annotations

import threading

import pytest

from inventory_worker.adapters.postgres import PermanentError, TransientError
from inventory_worker.worker.consumer import Stopping, backoff_retrying


def run(stop: threading.Event, attempt) -> object:
    for a in backoff_retrying(stop, lambda _s: None, "postgresql", "apply batch"):
        with a:
            return attempt()
    raise AssertionError("unreachable")


def test_transient_errors_are_retried_until_success():
    calls = []

    def attempt():
        calls.append(1)
        if len(calls) < 5:
            raise TransientError("connection refused")
        return "applied"

    assert run(threading.Event(), attempt) == "applied"
    assert len(calls) == 5


@pytest.mark.parametrize("stop_on_call", [1, 3])
def test_asked_to_stop_while_failing_stops_cleanly(stop_on_call):
    stop = threading.Event()
    calls = []

    def attempt():
        calls.append(1)
        if len(calls) == stop_on_call:
            stop.set()  # SIGTERM arrives while the database is down
        raise TransientError("connection refused")

    with pytest.raises(Stopping):
        run(stop, attempt)
    assert len(calls) == stop_on_call  # no further attempt once stopping


def test_permanent_errors_are_not_retried():
    calls = []

    def attempt():
        calls.append(1)
        raise PermanentError("refused")

    with pytest.raises(PermanentError):
        run(threading.Event(), attempt)
    assert len(calls) == 1
