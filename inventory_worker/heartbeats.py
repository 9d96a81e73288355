"""Liveness and attachment of the consumer processes, shared between all processes of a worker.

The supervisor creates one slot per consumer process in shared memory before it starts any
child. A consumer writes its slot: a heartbeat (the system-wide monotonic clock, comparable
across processes on Linux), whether it is still starting (imports, first connections) or
running its main loop, and whether it is attached to its queue. The HTTP process reads them
for /healthz (a heartbeat too old: the process is stuck) and /readyz (a consumer not
attached); the supervisor kills and restarts a stuck consumer.

A running consumer beats at least every few hundred milliseconds, so it is stuck after
`timeout`; a starting one gets `startup_allowance(timeout)`, as imports on a busy host are slow.

The slots live in a named POSIX shared-memory segment (multiprocessing.shared_memory), so any
process can attach by name: the children the supervisor spawns (they receive the name when the
object is pickled) and granian's worker processes, which the supervisor cannot hand objects to
(they read the name from the environment, see http/server.py). Only the creator tracks the
segment for cleanup and unlinks it; attaching processes never register it (see `_attach`).
"""

from __future__ import annotations

import os
import secrets
import struct
import threading
import time
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from typing import Any

STARTING, RUNNING = 0, 1


def startup_allowance(timeout: float) -> float:
    return max(timeout, 30.0)


_ATTACH_LOCK = threading.Lock()


def _attach(name: str) -> SharedMemory:
    """Opens an existing segment without registering it with this process's resource tracker.

    Before Python 3.13 (no `track=False`) every SharedMemory registers itself, and a tracker
    unlinks what is registered when it ends: an attaching process with its own tracker would
    delete the segment under the supervisor; one sharing the supervisor's tracker cannot
    unregister afterwards without removing the supervisor's own registration. So registration
    is skipped for the moment of opening.
    """
    try:
        return SharedMemory(name=name, track=False)  # type: ignore[call-arg]  # Python >= 3.13
    except TypeError:
        pass
    with _ATTACH_LOCK:
        register = resource_tracker.register
        resource_tracker.register = lambda *_: None
        try:
            return SharedMemory(name=name)
        finally:
            resource_tracker.register = register


class ProcessHealth:
    """`consumers` slots in one segment: n heartbeats (doubles), then n phases, then n attached flags.

    Each slot has one writer; a torn read of one aligned double cannot happen on the platforms we
    run on, so no lock. Fields are read and written through struct, never through views cast from
    the segment: a live view would keep SharedMemory from closing (BufferError at exit).
    """

    def __init__(self, shm: SharedMemory, consumers: int, owner: bool) -> None:
        self._shm = shm
        assert shm.buf is not None  # None only once closed
        self._buf: memoryview = shm.buf
        self._owner = owner
        self.consumers = consumers
        self._phase = 8 * consumers  # offsets of the byte arrays
        self._attached = 9 * consumers

    @classmethod
    def create(cls, consumers: int) -> ProcessHealth:
        """A new segment (the supervisor's); every consumer starting and detached."""
        name = f"inventory-health-{os.getpid()}-{secrets.token_hex(4)}"
        health = cls(SharedMemory(name=name, create=True, size=10 * consumers), consumers, owner=True)
        for i in range(consumers):
            health.starting(i)
            health.set_attached(i, False)
        return health

    @classmethod
    def attach(cls, name: str, consumers: int) -> ProcessHealth:
        return cls(_attach(name), consumers, owner=False)

    @property
    def name(self) -> str:
        return self._shm.name

    def __reduce__(self) -> tuple[Any, ...]:  # a spawned child attaches by name
        return (ProcessHealth.attach, (self.name, self.consumers))

    def close(self) -> None:
        """Unmaps the segment; the creator also deletes it."""
        self._buf = None  # type: ignore[assignment]
        self._shm.close()
        if self._owner:
            self._shm.unlink()

    def _set_beat(self, slot: int, phase: int) -> None:
        struct.pack_into("d", self._buf, 8 * slot, time.monotonic())
        self._buf[self._phase + slot] = phase

    # -- written by consumer `slot` (and by the supervisor when it (re)starts one) ---------------

    def starting(self, slot: int) -> None:
        self._set_beat(slot, STARTING)

    def beat(self, slot: int) -> None:
        self._set_beat(slot, RUNNING)

    def set_attached(self, slot: int, attached: bool) -> None:
        self._buf[self._attached + slot] = 1 if attached else 0

    # -- read by the HTTP process and the supervisor ----------------------------------------

    def last_beat(self, slot: int) -> float:
        beat: float = struct.unpack_from("d", self._buf, 8 * slot)[0]
        return beat

    def age(self, slot: int) -> float:
        return time.monotonic() - self.last_beat(slot)

    def allowed_silence(self, slot: int, timeout: float) -> float:
        """How long consumer `slot` may go without a beat in its current phase."""
        return timeout if self._buf[self._phase + slot] == RUNNING else startup_allowance(timeout)

    def is_stuck(self, slot: int, timeout: float) -> bool:
        return self.age(slot) > self.allowed_silence(slot, timeout)

    def stuck(self, timeout: float) -> list[int]:
        """The consumer slots without a heartbeat for longer than they are allowed."""
        return [i for i in range(self.consumers) if self.is_stuck(i, timeout)]

    def detached(self) -> list[int]:
        return [i for i in range(self.consumers) if not self._buf[self._attached + i]]


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
