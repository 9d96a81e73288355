"""What a run started, it stops: at its end, on an error, and on SIGTERM, SIGINT or SIGHUP.

`make chaos` and `make bench` start programs in sessions of their own (private PostgreSQL,
Redis and RabbitMQ, workers), so a signal sent to the run's process group (Ctrl-C, `timeout`,
a CI time limit) never reaches them, and some are not even its children (the postmaster and
epmd daemonize). Killed, the run used to leave them all running. Hence one mechanism:

- `install()` turns those signals into `Interrupted`, a SystemExit: every `finally` block runs
  (the orderly stops: worker, services, the shared services' test names) and then atexit runs,
  and the exit status is 128 + the signal's number, as if the signal had killed the run.
- Programs started afterwards inherit OWNER_VAR=<token> in their environment, daemons too;
  at exit `sweep()` SIGKILLs every live process carrying it, and every descendant of those and
  of this process (Redis and PostgreSQL's backends overwrite their environment with their
  process title, so they are found by descent): whatever the orderly stops missed.
"""

from __future__ import annotations

import atexit
import os
import signal
import time
import uuid

OWNER_VAR = "IW_TEST_RUN_OWNER"  # not INVENTORY_*: the worker refuses unknown INVENTORY_ variables
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

_received: int | None = None
_as_keyboard_interrupt = False
_token: str | None = None


class Interrupted(SystemExit):
    """Raised in the main thread by the first SIGTERM, SIGINT or SIGHUP."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.name = signal.Signals(signum).name


def _on_signal(signum: int, _frame: object) -> None:
    global _received
    if _received is not None:  # already stopping: `timeout` signals the group and make forwards it too
        return
    _received = signum
    if _as_keyboard_interrupt:
        raise KeyboardInterrupt(signal.Signals(signum).name)
    raise Interrupted(signum)


def install(keyboard_interrupt: bool = False) -> str:
    """Marks this process's future children, converts the signals, sweeps at exit; the token.

    `keyboard_interrupt`: raise KeyboardInterrupt instead of Interrupted, for pytest, which
    stops the session and tears every fixture down on it (a SystemExit would only fail the
    running test)."""
    global _as_keyboard_interrupt, _token
    if _as_keyboard_interrupt and _token:
        # The test session installed it already (a test running a runner's main() in-process):
        # its mode and token stay, so pytest still stops on a signal and sweeps at its exit.
        return _token
    _as_keyboard_interrupt = keyboard_interrupt
    token = _token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.environ[OWNER_VAR] = token
    for sig in SIGNALS:
        signal.signal(sig, _on_signal)
    atexit.register(sweep)
    return token


def _table() -> dict[int, tuple[int, bytes]]:
    """Every live process: pid -> (parent pid, environment); zombies left out."""
    out: dict[int, tuple[int, bytes]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                state, ppid = f.read().rsplit(b")", 1)[1].split()[:2]
            if state in (b"Z", b"X"):
                continue
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    env = f.read()
            except OSError:
                env = b""
            out[int(name)] = (int(ppid), env)
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
    return out


def owned(token: str | None = None, include_children: bool = True) -> set[int]:
    """The live processes started by this run: marked with its token, or descended from it."""
    token = token or os.environ.get(OWNER_VAR)
    table = _table()
    me = os.getpid()
    exclude, p = set(), me
    while p > 1 and p not in exclude:  # this process and its ancestors (make may carry a token)
        exclude.add(p)
        p = table.get(p, (0, b""))[0]
    marker = f"{OWNER_VAR}={token}".encode()
    roots = {pid for pid, (_, env) in table.items() if token and marker in env.split(b"\0")}
    if include_children:
        roots.add(me)
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        kids.setdefault(ppid, []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo.extend(kids.get(pid, ()))
    return found - exclude


def _bystanders() -> set[int]:
    """multiprocessing's resource tracker: it ends by itself once this process has exited (it
    unlinks the shared memory left registered), so it is not a leftover."""
    found = set()
    for pid in owned():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"multiprocessing.resource_tracker" in f.read():
                    found.add(pid)
        except OSError:
            pass
    return found


def sweep(timeout: float = 10.0) -> list[int]:
    """SIGKILLs what is left of this run's processes; the pids it had to kill."""
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    while (left := owned() - _bystanders()) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except OSError:
                pass
        time.sleep(0.1)
        try:  # our own children: reaped, so they stop showing as alive
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
    if killed:
        print(
            f"cleanup: killed {len(set(killed))} leftover processes: {sorted(set(killed))[:20]}", flush=True
        )
    return killed


def hold() -> None:
    """From now on the signals are ignored: the cleanup is under way and must not be cut short.
    Not in a test session (keyboard_interrupt mode): a runner's cleanup called in-process must
    not leave pytest deaf to the signal that stops the whole run."""
    global _received
    if _as_keyboard_interrupt:
        return
    if _received is None:
        _received = 0
