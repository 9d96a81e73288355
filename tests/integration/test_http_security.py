"""The read API's gates, through a real HTTP client against the real server adapter in-process:
bounds (405/414/431), authentication (401), roles (403), rate limits (429, 503 without Redis),
product-id validation (400) and that none of it echoes a secret."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from inventory_worker.bootstrap import read_api
from inventory_worker.config import Settings, TokenSettings
from inventory_worker.http.server import make_server

from ..conftest import HTTP_SERVERS
from ..support import TEST_TOKEN, http_get, uid


def token(name: str, roles: list[str], secret: str, **limits) -> TokenSettings:
    return TokenSettings(name=name, roles=roles, sha256=hashlib.sha256(secret.encode()).hexdigest(), **limits)


@contextmanager
def serving(settings: Settings, server: str = "stdlib") -> Iterator[str]:
    """The API behind `server`: the stdlib server in this process (the blocking path), or granian
    in a subprocess (bench/serve_http.py: its event-loop path, with 2 worker processes)."""
    if server == "granian":
        with serving_granian(settings) as base:
            yield base
        return
    api = read_api(settings)
    server = make_server(api, "127.0.0.1", 0)
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def serving_granian(settings: Settings) -> Iterator[str]:
    import os
    import signal
    import subprocess
    import sys
    import time

    from ..support import REPO, free_port, settings_env

    port = free_port()
    s = settings.model_copy(
        update={"http": settings.http.model_copy(update={"host": "127.0.0.1", "port": port})}
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.serve_http", "granian"],
        env=settings_env(s),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "granian did not start"
                time.sleep(0.1)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(params=HTTP_SERVERS)
def server(request: pytest.FixtureRequest) -> str:
    return request.param


def with_auth(settings: Settings, *tokens: TokenSettings, **auth) -> Settings:
    return settings.model_copy(
        update={
            "auth": settings.auth.model_copy(
                update={"tokens": list(settings.auth.tokens) + list(tokens), **auth}
            )
        }
    )


def raw_request(base: str, data: bytes) -> tuple[int, bytes]:
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                c = s.recv(65536)
            except ConnectionResetError:
                break
            if not c:
                break
            chunks.append(c)
            if b"\r\n\r\n" in b"".join(chunks):
                head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
                length = next(
                    (
                        int(h.split(b":")[1])
                        for h in head.split(b"\r\n")
                        if h.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                if len(body) >= length:
                    break
    resp = b"".join(chunks)
    return int(resp.split(b" ", 2)[1]), resp


@pytest.fixture(scope="module", params=HTTP_SERVERS)
def api_url(settings: Settings, request: pytest.FixtureRequest) -> Iterator[str]:
    reader = token("reader", ["inventory:read"], "reader-secret-value")
    metrics_only = token("scraper", ["metrics:read"], "scraper-secret-value")
    # Its own Redis prefix per server: the anonymous bucket of 127.0.0.1 is shared by both otherwise.
    s = settings.model_copy(
        update={
            "redis": settings.redis.model_copy(
                update={"key_prefix": f"{settings.redis.key_prefix}{request.param}:"}
            )
        }
    )
    with serving(with_auth(s, reader, metrics_only, metrics_role="metrics:read"), request.param) as base:
        yield base


@pytest.fixture(scope="module")
def product(settings: Settings) -> str:
    from ..support import pg

    sku = uid("SKU")
    with pg(settings) as cur:
        cur.execute("INSERT INTO products (product_id, on_hand) VALUES (%s, 5)", (sku,))
    return sku


def test_a_valid_token_reads_stock_with_rate_limit_headers(api_url, product):
    status, headers, body = http_get(f"{api_url}/inventory/{product}")
    assert status == 200
    assert json.loads(body)["on_hand"] == 5
    assert int(headers["RateLimit-Limit"]) >= 1 and int(headers["RateLimit-Remaining"]) >= 0
    assert "RateLimit-Reset" in headers and ";w=" in headers["RateLimit-Policy"]


@pytest.mark.parametrize("auth", [None, "Bearer wrong-token", "Basic dXNlcjpwYXNz", "Bearer", "bearer  "])
def test_missing_or_unknown_token_is_401_with_a_bearer_challenge(api_url, product, auth):
    status, headers, body = http_get(
        f"{api_url}/inventory/{product}", token=None, headers={"Authorization": auth} if auth else None
    )
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Bearer ")
    assert json.loads(body) == {"error": "a valid bearer token is required"}


def test_a_token_without_the_role_is_403(api_url, product):
    status, headers, body = http_get(f"{api_url}/inventory/{product}", token="scraper-secret-value")
    assert status == 403
    assert 'error="insufficient_scope"' in headers["WWW-Authenticate"]
    assert b"scraper-secret-value" not in body


def test_metrics_behind_its_role_probes_open(api_url, bus):  # bus: declares the queue /readyz checks
    assert http_get(f"{api_url}/metrics", token=None)[0] == 401
    assert http_get(f"{api_url}/metrics", token=TEST_TOKEN)[0] == 403
    status, _, body = http_get(f"{api_url}/metrics", token="scraper-secret-value")
    assert status == 200 and b"inventory_http_requests_total" in body
    assert http_get(f"{api_url}/healthz", token=None)[0] == 200
    assert http_get(f"{api_url}/readyz", token=None)[0] == 200
    status, _, body = http_get(f"{api_url}/openapi.json", token=None)
    assert status == 200 and json.loads(body)["openapi"].startswith("3.")


@pytest.mark.parametrize(
    "path",
    ["a%2Fb", "..%2F..%2Fetc", "x" * 65, "SKU'%3B%20DROP%20TABLE%20products", "%00", "caf%C3%A9", "SKU%20"],
)
def test_an_invalid_product_id_is_400(api_url, path):
    status, _, body = http_get(f"{api_url}/inventory/{path}")
    assert status == 400, body
    assert "invalid product id" in json.loads(body)["error"]


def test_an_unknown_product_is_404(api_url):
    assert http_get(f"{api_url}/inventory/{uid('NOPE')}")[0] == 404


def test_a_percent_encoded_id_is_the_same_product(api_url, product):
    status, _, body = http_get(f"{api_url}/inventory/{product.replace('-', '%2D')}")
    assert status == 200 and json.loads(body)["product_id"] == product
    assert http_get(f"{api_url}/inventory/%FF%FE")[0] == 400  # not UTF-8


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT", "FOO"])
def test_only_get_and_head(api_url, product, method):
    status, raw = raw_request(
        api_url,
        f"{method} /inventory/{product} HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {TEST_TOKEN}\r\nContent-Length: 0\r\n\r\n".encode(),
    )
    assert status == 405
    assert b"\r\nallow: get, head\r\n" in raw.lower()  # granian writes header names in lowercase


def test_head_answers_headers_only(api_url, product):
    status, headers, body = http_get(f"{api_url}/inventory/{product}", method="HEAD")
    assert status == 200 and body == b""


def test_request_line_and_headers_are_bounded(api_url, settings):
    limits = settings.http
    long_path = "/inventory/" + "a" * limits.max_request_line_bytes
    status, _ = raw_request(api_url, f"GET {long_path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert status == 414
    # handle() applies the same bounds whatever server sits in front of it
    api = read_api(settings)
    assert api.handle("GET", "/inventory/" + "a" * limits.max_request_line_bytes, {}).status == 414
    assert api.handle("GET", "/healthz", {"X-Big": "x" * limits.max_header_bytes}).status == 431
    assert api.handle("GET", "/healthz", {f"X-{i}": "v" for i in range(limits.max_headers + 1)}).status == 431
    big = "x" * (limits.max_header_bytes + 1)
    status, _, _ = http_get(f"{api_url}/healthz", headers={"X-Big": big})
    assert status == 431
    many = "".join(f"X-H{i}: v\r\n" for i in range(limits.max_headers + 1))
    status, _ = raw_request(api_url, f"GET /healthz HTTP/1.1\r\nHost: x\r\n{many}\r\n".encode())
    assert status == 431
    status, _ = raw_request(
        api_url, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Huge: " + b"y" * 70000 + b"\r\n\r\n"
    )
    assert status == 431
    status, _ = raw_request(api_url, b"\x16\x03\x01 garbage\r\n\r\n")
    assert status == 400


def test_a_token_over_its_limit_gets_429_and_others_are_not_slowed(settings, product, server):
    slow = token("limited", ["inventory:read"], "limited-secret", rate_per_second=0.01, burst=3)
    s = settings.model_copy(
        update={
            "redis": settings.redis.model_copy(
                update={"key_prefix": settings.redis.key_prefix + uid("rl") + ":"}
            )
        }
    )  # a bucket of its own
    with serving(with_auth(s, slow), server) as base:
        statuses = [http_get(f"{base}/inventory/{product}", token="limited-secret") for _ in range(4)]
        assert [s for s, _, _ in statuses] == [200, 200, 200, 429]
        assert [int(h["RateLimit-Remaining"]) for _, h, _ in statuses] == [2, 1, 0, 0]
        status, headers, body = statuses[-1]
        assert int(headers["Retry-After"]) >= 90  # one request per 100 s
        assert headers["RateLimit-Limit"] == "3" and headers["RateLimit-Policy"] == "3;w=300"
        assert json.loads(body) == {"error": "too many requests"}
        # another token, at the same time, from the same address: unaffected
        assert all(http_get(f"{base}/inventory/{product}")[0] == 200 for _ in range(20))


def test_requests_without_a_valid_token_are_limited_per_address(settings, product, server):
    s = settings.model_copy(
        update={
            "rate_limit": settings.rate_limit.model_copy(
                update={"anonymous_rate_per_second": 0.01, "anonymous_burst": 2}
            )
        }
    )
    s = s.model_copy(
        update={"redis": s.redis.model_copy(update={"key_prefix": s.redis.key_prefix + uid("rl") + ":"})}
    )
    with serving(s, server) as base:
        got = [http_get(f"{base}/inventory/{product}", token=f"guess-{i}")[0] for i in range(4)]
        assert got == [401, 401, 429, 429]
        assert http_get(f"{base}/inventory/{product}")[0] == 200  # a valid token still gets through


def test_redis_down_is_503_never_unlimited(settings, product, server):
    from ..support import free_port

    s = settings.model_copy(update={"redis": settings.redis.model_copy(update={"port": free_port()})})
    with serving(s, server) as base:
        status, headers, body = http_get(f"{base}/inventory/{product}")
        assert status == 503 and headers["Retry-After"] == "1"
        assert json.loads(body) == {"error": "rate limiter unavailable; try again shortly"}
        assert http_get(f"{base}/healthz", token=None)[0] == 200
    # with rate limiting switched off the same request is served from PostgreSQL
    off = s.model_copy(update={"rate_limit": s.rate_limit.model_copy(update={"enabled": False})})
    with serving(off, server) as base:
        assert http_get(f"{base}/inventory/{product}")[0] == 200


def test_no_tokens_configured_everyone_gets_401_and_a_warning(settings, product, capsys):
    from inventory_worker.config import LoggingSettings
    from inventory_worker.logs import configure

    configure(LoggingSettings(format="json"))
    s = settings.model_copy(update={"auth": settings.auth.model_copy(update={"tokens": []})})
    with serving(s) as base:
        assert http_get(f"{base}/inventory/{product}")[0] == 401
    assert "no API tokens configured" in capsys.readouterr().err


def test_connections_beyond_the_cap_get_503_and_idle_ones_are_dropped(settings):
    import time

    s = settings.model_copy(
        update={
            "http": settings.http.model_copy(update={"max_connections": 2, "client_timeout_seconds": 1.0})
        }
    )
    with serving(s) as base:
        host, port = base.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(2)]  # say nothing
        try:
            deadline = time.monotonic() + 10
            while True:  # the two idle connections hold both slots
                status, headers, body = http_get(f"{base}/healthz", token=None)
                if status == 503 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert status == 503 and json.loads(body) == {"error": "too many connections"}
            for sock in idle:  # the server drops them after client_timeout_seconds
                assert sock.recv(1) == b""
            deadline = time.monotonic() + 10
            while http_get(f"{base}/healthz", token=None)[0] != 200:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        finally:
            for sock in idle:
                sock.close()


def test_readiness_probes_are_checked_at_most_once_a_second(settings, bus):
    api = read_api(settings)
    calls = []
    api.dependency_checks["counted"] = lambda: calls.append(1)
    statuses = [api.handle("GET", "/readyz", {}).status for _ in range(50)]
    assert statuses == [200] * 50 and len(calls) == 1


def test_wrong_credentials_leave_no_secret_in_answers_or_logs(settings, product, capsys, caplog):
    from pydantic import AnyUrl, SecretStr

    from inventory_worker.config import LoggingSettings
    from inventory_worker.logs import configure

    secret = "Wr0ng-" + uid("pw")  # sent to Redis and RabbitMQ
    configure(LoggingSettings(format="json"))
    s = settings.model_copy(
        update={
            "redis": settings.redis.model_copy(update={"password": SecretStr(secret)}),
            "rabbitmq": settings.rabbitmq.model_copy(
                update={"url": AnyUrl(str(settings.rabbitmq.url).replace("guest:guest@", f"guest:{secret}@"))}
            ),
        }
    )
    with serving(s) as base:
        bodies = [
            http_get(f"{base}{path}", token=tok)[2]
            for path, tok in [
                ("/readyz", None),
                (f"/inventory/{product}", TEST_TOKEN),
                (f"/inventory/{product}", secret),
                ("/metrics", None),
            ]
        ]
    logs = capsys.readouterr()
    assert json.loads(bodies[0])["failing"] == ["rabbitmq"]  # (this Redis takes any password)
    assert "health check failing" in logs.err  # the reasons are logged ...
    for text in [*(b.decode() for b in bodies), logs.out, logs.err, caplog.text]:
        assert secret not in text  # ... without the password
