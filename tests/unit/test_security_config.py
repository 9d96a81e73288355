"""Secrets from files, TLS settings handed to psycopg2, redis and pika, and no secret in reprs,
config errors or --help."""

from __future__ import annotations

import hashlib
import json
import os
import ssl
import subprocess
import sys

import pytest

from inventory_worker.adapters.rabbitmq import connection_parameters
from inventory_worker.config import AuthSettings, ConfigError, TokenSettings, load_settings
from inventory_worker.http.auth import Authenticator, bearer_token, checked_roles, hash_token, new_token

SECRET = "s3cr3t-Pa55word-42"


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    import os

    for k in list(os.environ):
        if k.startswith("INVENTORY_"):
            monkeypatch.delenv(k)
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    monkeypatch.setenv("INVENTORY_CONFIG", str(empty))
    return monkeypatch


def test_password_file_variables_are_read(clean_env, tmp_path):
    pw = tmp_path / "pg-password"
    pw.write_text(SECRET + "\n")  # a trailing newline, as `echo > file` writes
    tokens = tmp_path / "tokens.json"
    entry = {"name": "shop", "roles": ["inventory:read"], "sha256": hash_token("t")}
    tokens.write_text(json.dumps([entry]))
    (tmp_path / "rmq").write_text("amqps://app@mq.internal:5671/prod")
    clean_env.setenv("INVENTORY_RABBITMQ__PASSWORD_FILE", str(pw))
    clean_env.setenv("INVENTORY_DATABASE__PASSWORD_FILE", str(pw))
    clean_env.setenv("INVENTORY_REDIS__PASSWORD_FILE", str(pw))
    clean_env.setenv("INVENTORY_AUTH__TOKENS_FILE", str(tokens))
    clean_env.setenv("INVENTORY_RABBITMQ__URL_FILE", str(tmp_path / "rmq"))
    s = load_settings()
    assert s.database.dsn()["password"] == SECRET
    assert s.redis.client_kwargs()["password"] == SECRET
    assert s.auth.tokens[0].name == "shop"
    assert s.rabbitmq.url.host == "mq.internal"
    assert connection_parameters(s.rabbitmq).credentials.password == SECRET
    assert SECRET not in repr(s.database) + repr(s.redis) + repr(s.rabbitmq) + str(s.model_dump())


def test_both_a_variable_and_its_file_is_refused(clean_env, tmp_path):
    (tmp_path / "pw").write_text("x")
    clean_env.setenv("INVENTORY_DATABASE__PASSWORD", "y")
    clean_env.setenv("INVENTORY_DATABASE__PASSWORD_FILE", str(tmp_path / "pw"))
    with pytest.raises(ConfigError, match="both INVENTORY_DATABASE__PASSWORD and"):
        load_settings()


def test_a_missing_secret_file_names_the_variable(clean_env, tmp_path):
    clean_env.setenv("INVENTORY_REDIS__PASSWORD_FILE", str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="INVENTORY_REDIS__PASSWORD_FILE: cannot read"):
        load_settings()


def test_config_errors_never_echo_values(clean_env, tmp_path):
    clean_env.setenv("INVENTORY_AUTH__TOKENS", json.dumps([{"name": "x", "roles": ["r"], "sha256": SECRET}]))
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "auth.tokens.0.sha256" in str(err.value) and SECRET not in str(err.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"database:\n  password: {SECRET}\n  host: [unclosed\n")
    with pytest.raises(ConfigError) as err:
        load_settings(bad)
    assert "line" in str(err.value) and SECRET not in str(err.value)


def test_postgres_tls_settings_reach_psycopg2(clean_env):
    clean_env.setenv("INVENTORY_DATABASE__SSLMODE", "verify-full")
    clean_env.setenv("INVENTORY_DATABASE__SSLROOTCERT", "/etc/ca.pem")
    clean_env.setenv("INVENTORY_DATABASE__SSLCERT", "/etc/client.pem")
    clean_env.setenv("INVENTORY_DATABASE__SSLKEY", "/etc/client.key")
    dsn = load_settings().database.dsn()
    assert (dsn["sslmode"], dsn["sslrootcert"], dsn["sslcert"], dsn["sslkey"]) == (
        "verify-full",
        "/etc/ca.pem",
        "/etc/client.pem",
        "/etc/client.key",
    )
    clean_env.setenv("INVENTORY_DATABASE__SSLMODE", "sometimes")
    with pytest.raises(ConfigError, match="database.sslmode"):
        load_settings()


def test_redis_tls_settings_reach_redis(clean_env):
    clean_env.setenv("INVENTORY_REDIS__SSL", "true")
    clean_env.setenv("INVENTORY_REDIS__SSL_CA_CERTS", "/etc/ca.pem")
    clean_env.setenv("INVENTORY_REDIS__USERNAME", "inventory")
    kw = load_settings().redis.client_kwargs()
    assert kw["ssl"] is True and kw["ssl_cert_reqs"] == "required" and kw["ssl_ca_certs"] == "/etc/ca.pem"
    assert kw["ssl_check_hostname"] is True and kw["username"] == "inventory"
    import redis

    pool = redis.Redis(**kw).connection_pool
    assert pool.connection_class is redis.SSLConnection


def test_amqps_verifies_the_broker_certificate(clean_env, tmp_path):
    ca = tmp_path / "ca.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(tmp_path / "k"),
            "-out",
            str(ca),
            "-days",
            "1",
            "-subj",
            "/CN=test-ca",
        ],
        check=True,
        capture_output=True,
    )
    clean_env.setenv("INVENTORY_RABBITMQ__URL", "amqps://app@mq.internal:5671/prod")
    clean_env.setenv("INVENTORY_RABBITMQ__PASSWORD", SECRET)
    clean_env.setenv("INVENTORY_RABBITMQ__CAFILE", str(ca))
    s = load_settings()
    params = connection_parameters(s.rabbitmq)
    ctx = params.ssl_options.context
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert params.ssl_options.server_hostname == "mq.internal"
    assert s.rabbitmq.cafile == str(ca), s.rabbitmq
    assert any(c["subject"] == ((("commonName", "test-ca"),),) for c in ctx.get_ca_certs())
    assert params.credentials.username == "app" and params.credentials.password == SECRET
    assert SECRET not in repr(s.rabbitmq)
    clean_env.setenv("INVENTORY_RABBITMQ__URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
    clean_env.delenv("INVENTORY_RABBITMQ__PASSWORD")
    assert connection_parameters(load_settings().rabbitmq).ssl_options is None


def test_tokens_are_hashed_and_compared_exactly():
    token = new_token()
    assert token.startswith("iw_") and len(token) > 40
    auth = Authenticator(
        AuthSettings(
            tokens=[
                TokenSettings(
                    name="a", roles=["inventory:read"], sha256=hashlib.sha256(token.encode()).hexdigest()
                )
            ]
        )
    )
    assert auth.authenticate({"Authorization": f"Bearer {token}"}).name == "a"
    assert auth.authenticate({"authorization": f"bearer {token}"}).name == "a"
    for bad in (token[:-1], token + "x", token.upper(), "", f"Basic {token}", f"Bearer {token} extra"):
        assert (
            auth.authenticate(
                {"Authorization": bad if bad.startswith(("Basic", "Bearer")) else f"Bearer {bad}"}
            )
            is None
        )
    assert bearer_token({}) is None
    assert auth.required_role("/inventory/{product_id}") == "inventory:read"
    assert auth.required_role("/healthz") is None and auth.required_role("/metrics") is None
    with pytest.raises(ValueError, match="share a name"):
        AuthSettings(
            tokens=[
                TokenSettings(name="a", roles=["r"], sha256="0" * 64),
                TokenSettings(name="a", roles=["r"], sha256="1" * 64),
            ]
        )


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inventory_worker", *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_token_create_prints_a_token_that_its_config_line_accepts():
    out = _cli("token", "create", "shop-frontend", "--role", "inventory:read").stdout
    token = next(w for w in out.split() if w.startswith("iw_"))
    entry = json.loads(out.split("INVENTORY_AUTH__TOKENS='")[1].split("'\n")[0])[0]
    assert entry["sha256"] == hashlib.sha256(token.encode()).hexdigest() and entry["roles"] == [
        "inventory:read"
    ]
    assert out.count(token) == 1  # shown once
    auth = Authenticator(AuthSettings(tokens=[TokenSettings(**entry)]))
    assert auth.authenticate({"Authorization": f"Bearer {token}"}).name == "shop-frontend"
    assert _cli("token", "create", "bad name!", "--role", "x").returncode == 2


def test_token_create_refuses_a_role_nothing_checks():
    r = _cli("token", "create", "shop", "--role", "inventory:write")
    assert (r.returncode, r.stdout) == (2, "")
    assert "'inventory:write'" in r.stderr and "inventory:read" in r.stderr and "iw_" not in r.stderr
    # metrics:read grants something only once auth.metrics_role names it
    assert _cli("token", "create", "prom", "--role", "metrics:read").returncode == 2
    env = {**os.environ, "INVENTORY_AUTH__METRICS_ROLE": "metrics:read"}
    assert _cli("token", "create", "prom", "--role", "metrics:read", env=env).returncode == 0
    # on purpose, with the flag
    r = _cli("token", "create", "shop", "--role", "inventory:write", "--unchecked-role")
    assert r.returncode == 0 and '"roles": ["inventory:write"]' in r.stdout


def test_checked_roles_are_the_roles_routes_require():
    auth = Authenticator(AuthSettings(metrics_role="prom"))
    routes = ("/inventory/{product_id}", "/metrics", "/healthz")
    assert (
        checked_roles(auth.settings)
        == {auth.required_role(r) for r in routes} - {None}
        == {"inventory:read", "prom"}
    )


def test_token_create_says_how_to_use_the_variable_and_restart(tmp_path):
    out = _cli("token", "create", "shop", "--role", "inventory:read").stdout
    assert "with no config file" not in out
    assert "with or without a config file" in out and "inventory-worker run" in out
    # what the text says: the variable works beside a config file, replacing its token list only
    entry = json.loads(out.split("INVENTORY_AUTH__TOKENS='")[1].split("'\n")[0])
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        "auth:\n  metrics_role: prom\n  tokens:\n"
        "  - {name: old, roles: [inventory:read], sha256: '" + "0" * 64 + "'}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVENTORY_")}
    env["INVENTORY_AUTH__TOKENS"] = json.dumps(entry)
    code = (
        "from inventory_worker.config import load_settings; s = load_settings('" + str(cfg) + "'); "
        "print([t.name for t in s.auth.tokens], s.auth.metrics_role)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.stdout.strip() == "['shop'] prom", r.stderr


def test_help_shows_no_secret(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("INVENTORY_")}
    env.update(
        INVENTORY_DATABASE__PASSWORD=SECRET,
        INVENTORY_REDIS__PASSWORD=SECRET,
        INVENTORY_RABBITMQ__URL=f"amqp://u:{SECRET}@h:5672/%2F",
    )
    for args in ([], ["run"], ["migrate"], ["publish"], ["stock"], ["token"], ["token", "create"]):
        r = _cli(*args, "--help", env=env)
        assert r.returncode == 0, r.stderr
        assert SECRET not in r.stdout + r.stderr
