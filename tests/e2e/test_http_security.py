"""The endpoint's security against running workers: a rate limit shared by two replicas, no
secret in any log, and the OpenAPI document checked against the live server by schemathesis."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from inventory_worker.config import TokenSettings

from ..conftest import HTTP_SERVERS
from ..support import REPO, TEST_TOKEN, http_get, pg, uid

SECRET_PASSWORD = "pg-Pa55w0rd-never-logged"


def test_the_rate_limit_is_shared_by_two_replicas(settings, start_worker, tmp_path):
    """And by the processes of each: every request opens a new connection, which granian hands to
    either of its worker processes."""
    sku = uid("SKU")
    with pg(settings) as cur:
        cur.execute("INSERT INTO products (product_id, on_hand) VALUES (%s, 4)", (sku,))
    limited_token = "limited-" + uid("t")
    limited = TokenSettings(
        name="limited",
        roles=["inventory:read"],
        sha256=hashlib.sha256(limited_token.encode()).hexdigest(),
        rate_per_second=0.01,
        burst=6,
    )  # 6 now, then one per 100 s
    s = settings.model_copy(
        update={
            "auth": settings.auth.model_copy(update={"tokens": [*settings.auth.tokens, limited]}),
            "redis": settings.redis.model_copy(
                update={"key_prefix": settings.redis.key_prefix + uid("rl") + ":"}
            ),
        }
    )
    pw = tmp_path / "pg-password"
    pw.write_text(SECRET_PASSWORD)  # PostgreSQL here trusts local users: any password works
    env = {"INVENTORY_DATABASE__PASSWORD_FILE": str(pw)}
    # One replica on each server: the event-loop path (granian's 2 worker processes) and the
    # blocking one (stdlib) run the same script on the same key.
    a = start_worker(processes=1, settings_override=s, **env)
    b = start_worker(
        processes=1,
        settings_override=s.model_copy(
            update={
                "http": s.http.model_copy(
                    update={"server": next(x for x in HTTP_SERVERS if x != s.http.server)}
                )
            }
        ),
        **env,
    )
    urls = [a.base_url, b.base_url]
    got = [http_get(f"{urls[i % 2]}/inventory/{sku}", token=limited_token)[0] for i in range(6)]
    assert got == [200] * 6
    # the seventh is refused by either replica: they count in one Redis bucket
    for url in urls:
        status, headers, _ = http_get(f"{url}/inventory/{sku}", token=limited_token)
        assert status == 429 and int(headers["Retry-After"]) > 1
    # meanwhile another client is served by both, at once
    for url in urls:
        assert all(http_get(f"{url}/inventory/{sku}")[0] == 200 for _ in range(10))
    # nothing secret in the logs: not the tokens (good or bad), not the database password
    http_get(f"{a.base_url}/inventory/{sku}", token="wrong-" + limited_token)
    http_get(f"{a.base_url}/metrics")
    a.stop()
    b.stop()
    logs = a.log_path.read_text() + b.log_path.read_text()
    assert "http listening" in logs  # the logs are there
    for secret in (limited_token, TEST_TOKEN, SECRET_PASSWORD):
        assert secret not in logs


def test_the_served_document_is_the_one_in_the_repo(served):
    status, headers, body = http_get(f"{served.base_url}/openapi.json", token=None)
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert body == (REPO / "docs" / "openapi.json").read_bytes()


def test_every_status_the_server_gives_is_documented(worker, served, bus):  # worker: consumes
    doc = json.loads((REPO / "docs" / "openapi.json").read_text())
    sku = uid("SKU")
    bus.wait_result(bus.publish("stock.adjusted", {"product_id": sku, "delta": 1})["id"])
    cases = [  # (operation path, request path, token, method)
        ("/inventory/{product_id}", f"/inventory/{sku}", TEST_TOKEN, "GET"),
        ("/inventory/{product_id}", f"/inventory/{uid()}", TEST_TOKEN, "GET"),
        ("/inventory/{product_id}", "/inventory/bad%20id", TEST_TOKEN, "GET"),
        ("/inventory/{product_id}", f"/inventory/{sku}", None, "GET"),
        ("/inventory/{product_id}", f"/inventory/{sku}", "nope", "GET"),
        ("/inventory/{product_id}", f"/inventory/{sku}", TEST_TOKEN, "DELETE"),
        ("/inventory/{product_id}", "/inventory/" + "x" * 5000, TEST_TOKEN, "GET"),
        ("/inventory/{product_id}/detail", f"/inventory/{sku}/detail?channel=default", TEST_TOKEN, "GET"),
        ("/inventory/{product_id}/detail", f"/inventory/{sku}/detail?channel={uid()}", TEST_TOKEN, "GET"),
        ("/inventory/{product_id}/detail", f"/inventory/{sku}/detail?channel=a%20b", TEST_TOKEN, "GET"),
        ("/inventory/{product_id}/detail", f"/inventory/{sku}/detail", "nope", "GET"),
        ("/inventory/{product_id}/detail", f"/inventory/{sku}/detail", TEST_TOKEN, "PUT"),
        ("/healthz", "/healthz", None, "GET"),
        ("/readyz", "/readyz", None, "GET"),
        ("/metrics", "/metrics", None, "GET"),
        ("/openapi.json", "/openapi.json", None, "POST"),
    ]
    seen = set()
    for op, path, token, method in cases:
        status, headers, body = http_get(served.base_url + path, token=token, method=method)
        documented = doc["paths"][op]["get"]["responses"]
        assert str(status) in documented, (op, path, status)
        if "WWW-Authenticate" in documented[str(status)].get("headers", {}):
            assert "WWW-Authenticate" in headers
        seen.add(status)
    assert seen == {200, 400, 401, 404, 405, 414}
    # and the answers the cases above cannot provoke: a stuck consumer (test_operations), two
    # Authorization headers on /metrics when it needs a role
    assert "503" in doc["paths"]["/healthz"]["get"]["responses"]
    assert "400" in doc["paths"]["/metrics"]["get"]["responses"]


def test_schemathesis_finds_no_difference_from_the_document(worker, served, bus, tmp_path):
    """Every documented operation, generated and near-valid inputs, every check schemathesis has
    (status codes, schemas, headers, content types, auth enforced, unsupported methods ...)."""
    examples = os.environ.get("INVENTORY_FUZZ_EXAMPLES", "120")
    cmd = [
        str(Path(sys.executable).parent / "schemathesis"),
        "run",
        f"{served.base_url}/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        examples,
        "--header",
        f"Authorization: Bearer {TEST_TOKEN}",
        "--generation-database",
        "none",
        "--no-color",
        "--workers",
        "2",
        "--seed",
        os.environ.get("INVENTORY_FUZZ_SEED") or str(random.randrange(2**32)),
        "--report",
        "junit",
        "--report-dir",
        str(tmp_path),
    ]
    r = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=float(os.environ.get("INVENTORY_FUZZ_TIMEOUT", 120)),
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert "generated" in r.stdout


@pytest.mark.parametrize("server", HTTP_SERVERS)
def test_a_worker_without_tokens_starts_refuses_everyone_and_says_why(settings, start_worker, server):
    s = settings.model_copy(update={"http": settings.http.model_copy(update={"server": server})})
    w = start_worker(
        processes=1, settings_override=s, INVENTORY_AUTH__TOKENS="[]"
    )  # ready: /readyz and /healthz stay open
    status, headers, _ = http_get(f"{w.base_url}/inventory/{uid()}")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    w.stop()
    assert "no API tokens configured" in w.log_path.read_text()


def test_concurrent_requests_to_granians_worker_processes_admit_exactly_the_burst(settings, start_worker):
    """40 requests at once over 40 connections (granian spreads connections over its 2 worker
    processes, each pipelining its share to Redis): exactly the burst is served, the rest is 429."""
    from concurrent.futures import ThreadPoolExecutor

    sku = uid("SKU")
    with pg(settings) as cur:
        cur.execute("INSERT INTO products (product_id, on_hand) VALUES (%s, 4)", (sku,))
    secret = "burst-" + uid("t")
    entry = TokenSettings(
        name="burst",
        roles=["inventory:read"],
        sha256=hashlib.sha256(secret.encode()).hexdigest(),
        rate_per_second=0.01,
        burst=15,
    )
    s = settings.model_copy(
        update={
            "auth": settings.auth.model_copy(update={"tokens": [*settings.auth.tokens, entry]}),
            "redis": settings.redis.model_copy(
                update={"key_prefix": settings.redis.key_prefix + uid("rl") + ":"}
            ),
            "http": settings.http.model_copy(update={"server": "granian", "workers": 2}),
        }
    )
    w = start_worker(processes=1, settings_override=s)
    with ThreadPoolExecutor(40) as pool:
        got = list(pool.map(lambda _: http_get(f"{w.base_url}/inventory/{sku}", token=secret), range(40)))
    statuses = sorted(status for status, _, _ in got)
    assert statuses == [200] * 15 + [429] * 25
    assert sorted(int(h["RateLimit-Remaining"]) for status, h, _ in got if status == 200) == list(range(15))
    assert all(json.loads(body)["product_id"] == sku for status, _, body in got if status == 200)


def test_two_authorization_headers_are_refused_whichever_comes_first(served):
    """The first one won: a proxy that checks the last one would disagree on who is asking."""
    from ..integration.test_http_security import raw_request

    sku = uid("SKU")
    for first, second in (
        ("Bearer " + TEST_TOKEN, "Bearer nope"),
        ("Bearer nope", "Bearer " + TEST_TOKEN),
        ("Bearer " + TEST_TOKEN, "Bearer " + TEST_TOKEN),
    ):
        status, raw = raw_request(
            served.base_url,
            (
                f"GET /inventory/{sku} HTTP/1.1\r\nHost: x\r\nAuthorization: {first}\r\n"
                f"Authorization: {second}\r\nConnection: close\r\n\r\n"
            ).encode(),
        )
        assert status == 400 and b"more than one Authorization header" in raw, raw
    assert http_get(f"{served.base_url}/inventory/{sku}")[0] == 404  # one header: served


def test_answers_are_not_cached_not_sniffed_and_do_not_name_the_server(served):
    sku = uid("SKU")
    for url, token in (
        (f"{served.base_url}/inventory/{sku}", TEST_TOKEN),
        (f"{served.base_url}/inventory/{sku}", None),
        (f"{served.base_url}/healthz", None),
        (f"{served.base_url}/metrics", None),
        (f"{served.management_url}/readyz", None),
        (f"{served.management_url}/nothing", None),
    ):
        status, headers, _ = http_get(url, token=token)
        assert headers["Cache-Control"] == "no-store", (url, status)
        assert headers["X-Content-Type-Options"] == "nosniff", (url, status)
        assert not headers.get("Server"), (url, headers["Server"])  # none, or granian's empty one
