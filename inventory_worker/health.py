"""Liveness and attachment of the consumer processes, shared between all processes of a worker.

The supervisor creates one slot per consumer process in shared memory before it starts any
child. A consumer writes its slot: a heartbeat (the system-wide monotonic clock, comparable
across processes on Linux), whether it is still starting (imports, first connections) or
running its main loop, and whether it is attached to its queue. The HTTP process reads them
for /healthz (a heartbeat too old: the process is stuck) and /readyz (a consumer not
attached); the supervisor kills and restarts a stuck consumer.

A running consumer beats at least every few hundred milliseconds, so it is stuck after
`timeout`; a starting one gets `startup_allowance(timeout)`, as imports on a busy host are slow.
"""

from __future__ import annotations

import time
from typing import Any


STARTING, RUNNING = 0, 1


def startup_allowance(timeout: float) -> float:
    return max(timeout, 30.0)


class ProcessHealth:
    def __init__(self, ctx: Any, consumers: int) -> None:
        now = time.monotonic()
        # lock=False: each slot has one writer; a torn read of one double cannot happen on
        # the platforms we run on (8-byte aligned stores).
        self._beats = ctx.Array("d", [now] * consumers, lock=False)
        self._phase = ctx.Array("b", [STARTING] * consumers, lock=False)
        self._attached = ctx.Array("b", [0] * consumers, lock=False)
        self.consumers = consumers

    # -- written by consumer `slot` (and by the supervisor when it (re)starts one) ---------------

    def starting(self, slot: int) -> None:
        self._beats[slot] = time.monotonic()
        self._phase[slot] = STARTING

    def beat(self, slot: int) -> None:
        self._beats[slot] = time.monotonic()
        self._phase[slot] = RUNNING

    def set_attached(self, slot: int, attached: bool) -> None:
        self._attached[slot] = 1 if attached else 0

    # -- read by the HTTP process and the supervisor ----------------------------------------

    def last_beat(self, slot: int) -> float:
        return self._beats[slot]

    def age(self, slot: int) -> float:
        return time.monotonic() - self._beats[slot]

    def is_stuck(self, slot: int, timeout: float) -> bool:
        limit = timeout if self._phase[slot] == RUNNING else startup_allowance(timeout)
        return self.age(slot) > limit

    def stuck(self, timeout: float) -> list[int]:
        """The consumer slots without a heartbeat for longer than they are allowed."""
        return [i for i in range(self.consumers) if self.is_stuck(i, timeout)]

    def detached(self) -> list[int]:
        return [i for i in range(self.consumers) if not self._attached[i]]


class ConsumerSlot:
    """What one consumer process sees of ProcessHealth: its own slot."""

    def __init__(self, health: ProcessHealth | None, slot: int) -> None:
        self.health = health
        self.slot = slot

    def starting(self) -> None:
        if self.health is not None:
            self.health.starting(self.slot)

    def beat(self) -> None:
        if self.health is not None:
            self.health.beat(self.slot)

    def set_attached(self, attached: bool) -> None:
        if self.health is not None:
            self.health.set_attached(self.slot, attached)
