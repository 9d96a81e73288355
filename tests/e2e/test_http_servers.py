"""The protections of the endpoint under each HTTP server (`http.server`), against a running worker:
input bounds (414/431/400), idle connections dropped after http.client_timeout_seconds, and no more
than http.max_connections connections served at once (docs/http.md "HTTP servers" says how they differ:
the stdlib server answers the surplus 503, granian leaves it waiting in the listen backlog)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from ..conftest import HTTP_SERVERS
from ..integration.test_http_security import raw_request
from ..support import WorkerProcess, delete_topology, free_port, http_get, pg, poll, uid, with_own_queues
from .test_operations import log_lines


@pytest.fixture(scope="module", params=HTTP_SERVERS)
def bounded(request, settings, logs_dir):
    s = with_own_queues(settings, f"bounds-{request.param}")
    s = s.model_copy(
        update={
            "http": s.http.model_copy(
                update={
                    "server": request.param,
                    "port": free_port(),
                    "workers": 1,
                    "max_connections": 2,
                    "client_timeout_seconds": 2.0,
                }
            )
        }
    )
    w = WorkerProcess(s, processes=1, log_path=logs_dir / f"bounds-{request.param}.log").start()
    yield w
    w.stop()  # before its queues go, or its consumer would declare them again
    delete_topology(s)


def test_input_bounds(served):
    limits = served.settings.http
    base = served.base_url
    long_path = "/inventory/" + "a" * limits.max_request_line_bytes
    assert raw_request(base, f"GET {long_path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())[0] == 414
    assert http_get(f"{base}/healthz", headers={"X-Big": "x" * (limits.max_header_bytes + 1)})[0] == 431
    many = "".join(f"X-H{i}: v\r\n" for i in range(limits.max_headers + 1))
    assert raw_request(base, f"GET /healthz HTTP/1.1\r\nHost: x\r\n{many}\r\n".encode())[0] == 431
    huge = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Huge: " + b"y" * 70000 + b"\r\n\r\n"
    assert raw_request(base, huge)[0] == 431
    assert raw_request(base, b"\x16\x03\x01 garbage\r\n\r\n")[0] == 400


def test_idle_connections_are_dropped_and_connections_are_capped(bounded):
    server = bounded.settings.http.server
    host, port = "127.0.0.1", bounded.settings.http.port
    idle = [socket.create_connection((host, port), timeout=15) for _ in range(2)]  # say nothing
    extra = socket.create_connection((host, port), timeout=15)
    try:
        time.sleep(0.3)  # let the server take the two idle connections first
        extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        if server == "stdlib":  # a connection beyond the cap is answered at once, and closed
            status, raw = _read_response(extra)
            assert status == 503 and json.loads(raw.partition(b"\r\n\r\n")[2]) == {
                "error": "too many connections"
            }
        else:  # granian does not accept it while the two idle ones hold both slots ...
            extra.settimeout(0.5)
            with pytest.raises(TimeoutError):
                extra.recv(1)
            extra.settimeout(15)
        for sock in idle:  # the server drops idle connections after client_timeout_seconds
            assert sock.recv(1) == b""
        if server != "stdlib":  # ... and serves it once they are gone
            assert _read_response(extra)[0] == 200
        deadline = time.monotonic() + 10
        while http_get(f"{bounded.base_url}/healthz", token=None)[0] != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        for sock in (*idle, extra):
            sock.close()


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    chunks = []
    while c := sock.recv(65536):
        chunks.append(c)
    raw = b"".join(chunks)
    return int(raw.split(b" ", 2)[1]), raw


def test_granian_workers_do_not_outlive_a_killed_http_process(settings, logs_dir):
    """The supervisor restarts the http process; the old one's granian workers stop by themselves
    instead of serving the port alongside the new ones."""
    s = with_own_queues(settings, "orphans")
    s = s.model_copy(update={"http": s.http.model_copy(update={"server": "granian", "port": free_port()})})
    w = WorkerProcess(s, processes=1, log_path=logs_dir / "orphans.log").start()
    try:

        def http_pids() -> list[int]:
            return [
                x["child_pid"]
                for x in log_lines(w.log_path)
                if x.get("event") == "process started" and x.get("role") == "http"
            ]

        (http_pid,) = http_pids()
        old_workers = _poll(lambda: _children(http_pid), what="granian's workers")
        os.kill(http_pid, signal.SIGKILL)
        _poll(lambda: len(http_pids()) == 2, what="a new http process")
        _poll(lambda: not [p for p in old_workers if _alive(p)], what="the old granian workers gone")
        _poll(lambda: _status(w.base_url + "/healthz") == 200, what="/healthz from the new one")
        new_workers = _children(http_pids()[1])
        assert new_workers and not set(new_workers) & set(old_workers)
    finally:
        assert w.stop() == 0
        delete_topology(s)


def _status(url: str) -> int | None:
    try:
        return http_get(url, timeout=5)[0]
    except OSError:  # the new server is not listening yet
        return None


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def _poll(predicate, timeout: float = 30.0, what: str = "condition"):
    return poll(predicate, timeout, 0.1, what)


@pytest.mark.parametrize("server", HTTP_SERVERS)
def test_a_thousand_idle_connections_from_one_address_lock_nobody_out(settings, start_worker, server):
    """One address (127.0.0.2) opens 1,000 connections and says nothing: another client (127.0.0.1)
    is still answered at once on the public port, and the management port's probes and /metrics
    answer too (with the old defaults granian took ~10 s: its connection slots were all held)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    # Idle connections held for the whole test (the default drops them after 10 s).
    s = settings.model_copy(
        update={"http": settings.http.model_copy(update={"server": server, "client_timeout_seconds": 60.0})}
    )
    w = start_worker(processes=1, settings_override=s)
    sku = uid("SKU")
    with pg(settings) as cur:
        cur.execute("INSERT INTO products (product_id, on_hand) VALUES (%s, 3)", (sku,))
    idle = []
    try:
        for _ in range(1000):
            idle.append(
                socket.create_connection(
                    ("127.0.0.1", w.settings.http.port), timeout=5, source_address=("127.0.0.2", 0)
                )
            )
        time.sleep(0.5)  # the server has taken what it takes of them
        for url in (f"{w.base_url}/inventory/{sku}", f"{w.base_url}/healthz") * 3:
            started = time.monotonic()
            status, _, body = http_get(url, timeout=15)
            took = time.monotonic() - started
            assert status == 200 and took < 0.1, (url, status, body, took)
        for path in ("/healthz", "/readyz", "/metrics"):
            status, _, body = http_get(w.management_url + path, token=None, timeout=5)
            assert status == 200, (path, body)
        assert b"inventory_http_requests_total" in http_get(w.management_url + "/metrics")[2]
    finally:
        for sock in idle:
            sock.close()


def _exits_naming(w: WorkerProcess, address: str) -> None:
    try:
        rc = w.proc.wait(20)
    except subprocess.TimeoutExpired:
        w.kill()
        pytest.fail(f"the worker kept running with {address} taken: {w.log_path.read_text()[-2000:]}")
    w.stop()
    assert rc != 0
    text = w.log_path.read_text()
    named = [x["event"] for x in log_lines(w.log_path) if address in x.get("event", "")]
    assert len(named) == 1 and "already in use" in named[0], text[-2000:]
    assert "Traceback" not in text and "http listening" not in text and "process started" not in text


@pytest.mark.parametrize("which", ["port", "management_port"])
def test_a_worker_whose_port_another_program_holds_exits_at_start_naming_it(settings, logs_dir, which):
    with socket.socket() as holder:  # another program, listening
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        http = {"server": "granian", "port": free_port(), "management_port": free_port(), which: taken}
        s = settings.model_copy(update={"http": settings.http.model_copy(update=http)})
        w = WorkerProcess(s, processes=1, log_path=logs_dir / f"taken-{which}.log", own_management_port=False)
        _exits_naming(w.start(wait_ready=False), f"127.0.0.1:{taken}")


def test_a_second_worker_on_the_same_port_exits_instead_of_sharing_it(settings, logs_dir):
    """granian binds with SO_REUSEPORT: the second worker would have split the first one's
    requests with it (a mix of 200, 401 and 429 when only one holds the token)."""
    s = with_own_queues(settings, "twins")
    s = s.model_copy(update={"http": s.http.model_copy(update={"server": "granian", "port": free_port()})})
    first = WorkerProcess(s, processes=1, log_path=logs_dir / "twin-1.log").start()
    try:
        second = WorkerProcess(
            s.model_copy(update={"auth": s.auth.model_copy(update={"tokens": []})}),
            processes=1,
            log_path=logs_dir / "twin-2.log",
        ).start(wait_ready=False)
        _exits_naming(second, f"127.0.0.1:{s.http.port}")
        assert [http_get(f"{first.base_url}/inventory/{uid()}")[0] for _ in range(20)] == [404] * 20
    finally:
        assert first.stop() == 0
        delete_topology(s)


def test_a_granian_worker_freezes_what_start_up_made(settings):
    """A granian worker process builds the app, then moves what start-up made (some 66,000
    objects) out of the garbage collector's walks, as the consumers do."""
    import sys

    from inventory_worker.http import server

    code = (
        "import gc; from inventory_worker.http import server;"
        " assert gc.get_freeze_count() == 0; server.rsgi_app_from_env(); print(gc.get_freeze_count())"
    )
    env = {**os.environ, server._SETTINGS_ENV: server.settings_json(settings)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) > 20_000
