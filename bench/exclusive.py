"""One benchmark at a time on a machine.

Two benchmarks run at once share the cores, the database and the broker: both print figures,
and both are wrong, with nothing in them to say so. Each benchmark command takes this lock for
its whole run and refuses to start while another holds it. The lock is released when its
process ends, however it ends. `bench.run --smoke` and the tests' calls of the benchmarks'
main() do not take it: they check the code, not the machine.
"""

from __future__ import annotations

import fcntl
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# INVENTORY_BENCH_LOCK: another path (the tests', not to meet a benchmark really running).
LOCK = Path(os.environ.get("INVENTORY_BENCH_LOCK") or Path(tempfile.gettempdir()) / "inventory-bench.lock")


@contextmanager
def exclusive(command: str, lock: Path | None = None) -> Iterator[None]:
    """Holds the machine's benchmark lock while the block runs; exits (status 2) naming the
    holder if another benchmark has it."""
    fd = os.open(lock or LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        print(
            f"{command}: another benchmark is running ({holder}); two at once share the cores"
            " and both would print wrong figures. Wait for it, or stop it.",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{command}, pid {os.getpid()}".encode(), 0)
        yield
    finally:
        os.ftruncate(fd, 0)
        os.close(fd)  # and with it the lock
