"""The supervisor's stuck rule across a pause of its own (VM frozen by the host, host suspend,
SIGSTOP/SIGCONT of the service): CLOCK_MONOTONIC jumps, and the heartbeats with it, but a
consumer is judged only on silence counted from the resume.

The main loop's decision (`Supervisor._stuck_consumers`) is driven here with a clock of our own:
the beats in shared memory are written on it too, so a jump of minutes takes no time.
"""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from inventory_worker import heartbeats as health_module
from inventory_worker.config import load_settings
from inventory_worker.heartbeats import startup_allowance
from inventory_worker.supervisor import PAUSE_SECONDS, Supervisor

TIMEOUT = 20.0  # worker.heartbeat_timeout_seconds; below 30 s, so startup is allowed longer
TICK = 0.2  # the main loop's sleep


class Clock:
    """Stands for time.monotonic, in the supervisor's checks and the consumers' beats alike."""

    def __init__(self) -> None:
        self.now = 10_000.0

    def monotonic(self) -> float:
        return self.now


class Alive:
    pid = 4242

    def is_alive(self) -> bool:
        return True


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(health_module, "time", c)  # the module's clock only, not time.monotonic
    return c


@pytest.fixture
def supervisor(clock):
    """Two consumers started at `clock.now`, not yet beaten; no processes are started."""
    s = load_settings()
    s = s.model_copy(update={"http": s.http.model_copy(update={"enabled": False})})
    sup = Supervisor(s, processes=2)  # its slots hold a beat of now, as if of earlier children
    clock.now += 0.01
    for child in sup.children:
        child.process, child.started = Alive(), clock.now
    yield sup
    sup.health.close()


def run(
    sup: Supervisor,
    clock: Clock,
    seconds: float,
    beating: tuple[int, ...] = (0, 1),
    starting: tuple[int, ...] = (),
) -> dict[str, float]:
    """The main loop for `seconds`: a check every TICK, and between two checks the consumers in
    `beating` beat (those in `starting` beat as still starting). What it kills, and when."""
    killed: dict[str, float] = {}
    end = clock.now + seconds
    while clock.now < end - 1e-9:
        clock.now += TICK / 2
        for slot in beating:
            sup.health.beat(slot)
        for slot in starting:
            sup.health.starting(slot)
        clock.now += TICK / 2
        for child in sup._stuck_consumers(clock.now, TIMEOUT):
            killed[child.role] = clock.now
            child.process = None  # SIGKILLed: no longer checked
    return killed


def pause(sup: Supervisor, clock: Clock, seconds: float) -> dict[str, float]:
    """Nothing runs for `seconds`; then the supervisor wakes first and checks at once."""
    clock.now += seconds
    killed = {c.role: clock.now for c in sup._stuck_consumers(clock.now, TIMEOUT)}
    for child in sup.children:
        if child.role in killed:
            child.process = None
    return killed


# ---- (a) after a jump, healthy consumers are not killed ---------------------------------------


@pytest.mark.parametrize("seconds", [TIMEOUT + 1, 5 * 60, 3600])
def test_a_pause_longer_than_the_timeout_kills_no_healthy_consumer(supervisor, clock, seconds):
    assert run(supervisor, clock, 10) == {}
    with capture_logs() as logs:
        assert pause(supervisor, clock, seconds) == {}
        assert run(supervisor, clock, 3 * TIMEOUT) == {}  # they beat right after the resume
    warnings = [x for x in logs if x["log_level"] == "warning"]
    assert len(warnings) == 1  # logged once, with how long the supervisor did not run
    assert warnings[0]["paused_seconds"] == pytest.approx(seconds, abs=0.1)


def test_a_pause_during_startup_kills_no_starting_consumer(supervisor, clock):
    """Started just before the pause, beaten for the first time just after it."""
    assert run(supervisor, clock, 1, beating=()) == {}  # importing
    assert pause(supervisor, clock, 2 * startup_allowance(TIMEOUT)) == {}
    assert run(supervisor, clock, TIMEOUT, beating=(), starting=(0, 1)) == {}
    assert run(supervisor, clock, 3 * TIMEOUT) == {}


# ---- (b) one that stays silent after the resume is still killed ------------------------------


def test_a_consumer_silent_after_the_resume_is_killed_timeout_after_it(supervisor, clock):
    run(supervisor, clock, 10)
    pause(supervisor, clock, 5 * 60)
    resumed = clock.now
    killed = run(supervisor, clock, 3 * TIMEOUT, beating=(1,))
    assert list(killed) == ["consumer-0"]
    assert resumed + TIMEOUT < killed["consumer-0"] <= resumed + TIMEOUT + TICK + 1e-6


def test_a_consumer_that_never_beats_after_a_pause_in_its_startup_is_killed(supervisor, clock):
    run(supervisor, clock, 1, beating=())
    pause(supervisor, clock, 5 * 60)
    resumed = clock.now
    killed = run(supervisor, clock, 3 * startup_allowance(TIMEOUT), beating=(1,))
    assert list(killed) == ["consumer-0"]
    assert (
        resumed + startup_allowance(TIMEOUT)
        < killed["consumer-0"]
        <= (resumed + startup_allowance(TIMEOUT) + TICK + 1e-6)
    )


# ---- (c) without a pause, nothing changes -----------------------------------------------------


def test_beating_consumers_are_left_alone_and_nothing_is_logged(supervisor, clock):
    with capture_logs() as logs:
        assert run(supervisor, clock, 5 * TIMEOUT) == {}
        # a late check, short of PAUSE_SECONDS, is no pause
        assert pause(supervisor, clock, PAUSE_SECONDS - 2 * TICK) == {}
        assert run(supervisor, clock, TIMEOUT) == {}
    assert logs == []


def test_a_consumer_that_stops_beating_is_killed_timeout_after_its_last_beat(supervisor, clock):
    run(supervisor, clock, 10)
    last_beat = clock.now - TICK / 2
    killed = run(supervisor, clock, 3 * TIMEOUT, beating=(1,))
    assert list(killed) == ["consumer-0"]
    assert last_beat + TIMEOUT < killed["consumer-0"] <= last_beat + TIMEOUT + TICK + 1e-6


def test_a_consumer_that_never_beats_is_killed_after_the_startup_allowance(supervisor, clock):
    started = clock.now
    killed = run(supervisor, clock, 3 * startup_allowance(TIMEOUT), beating=(1,))
    assert list(killed) == ["consumer-0"]
    assert (
        started + startup_allowance(TIMEOUT)
        < killed["consumer-0"]
        <= (started + startup_allowance(TIMEOUT) + TICK + 1e-6)
    )


def test_a_consumer_stuck_while_starting_is_killed_after_the_startup_allowance(supervisor, clock):
    run(supervisor, clock, 1, beating=(1,), starting=(0,))
    last_beat = clock.now - TICK / 2
    killed = run(supervisor, clock, 3 * startup_allowance(TIMEOUT), beating=(1,))
    assert list(killed) == ["consumer-0"]
    assert (
        last_beat + startup_allowance(TIMEOUT)
        < killed["consumer-0"]
        <= (last_beat + startup_allowance(TIMEOUT) + TICK + 1e-6)
    )
