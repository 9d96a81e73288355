"""One benchmark at a time: a second refuses to start while one runs, and says which."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench.exclusive import exclusive

from ..support import REPO


def test_a_second_holder_is_refused_and_told_who_has_it(tmp_path, capsys):
    lock = tmp_path / "bench.lock"
    with exclusive("bench.run --compare HEAD", lock):
        with pytest.raises(SystemExit) as refused, exclusive("bench.sqlcost", lock):
            pass
        assert refused.value.code == 2
        assert f"bench.run --compare HEAD, pid {os.getpid()}" in capsys.readouterr().err
    with exclusive("bench.sqlcost", lock):  # released at the end of the block
        pass


@pytest.mark.parametrize("command", ["bench.sqlcost", "bench.scale"])
def test_benchmark_commands_do_not_start_while_another_runs(tmp_path, command):
    env = {**os.environ, "INVENTORY_BENCH_LOCK": str(tmp_path / "bench.lock")}
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from bench.exclusive import exclusive\n"
            "with exclusive('bench.run'):\n    print('held', flush=True); sys.stdin.read()",
        ],
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        second = _help(command, env)
        assert second.returncode == 2
        assert f"another benchmark is running (bench.run, pid {holder.pid})" in second.stderr
    finally:
        holder.communicate("", timeout=30)  # EOF: the holder ends, and its lock with it
    after = _help(command, env)
    assert after.returncode == 0, after.stderr


def _help(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`python -m COMMAND --help`: it starts, takes the lock (or not) and exits at once."""
    return subprocess.run(
        [sys.executable, "-m", command, "--help"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
