"""Settings: defaults < config/config.yaml < environment (INVENTORY_*, `__` for nesting).

The YAML path comes from `--config`, else INVENTORY_CONFIG, else config/config.yaml if it
exists. A bad value is refused at start with the key's dotted name in the message.

Any INVENTORY_* variable can instead be given as INVENTORY_*_FILE naming a file that holds the
value (as Kubernetes mounts secrets), e.g. INVENTORY_DATABASE__PASSWORD_FILE=/run/secrets/pg.
Passwords are SecretStr: they never show in a repr, a log line or an error message.
"""

from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import AnyUrl, BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    SettingsError,
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)
from pydantic_settings.sources.utils import parse_env_vars

DEFAULT_CONFIG_PATH = Path("config/config.yaml")
ENV_PREFIX = "INVENTORY_"
FILE_SUFFIX = "_FILE"


def reveal(value: SecretStr | str | None) -> str:
    """The plain value of a secret setting (also accepts a plain str, e.g. from model_copy)."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    return value or ""


class _Section(BaseModel):
    # A misspelt key (`database.hots`, INVENTORY_DATABASE__HOTS) is refused, not silently
    # replaced by the default: a worker must not quietly run against the wrong services.
    model_config = ConfigDict(extra="forbid")


class DatabaseSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(5432, ge=1, le=65535)
    user: str = "postgres"
    password: SecretStr = SecretStr("")
    dbname: str = "inventory"
    connect_timeout_seconds: int = Field(5, ge=1)
    # TLS (libpq): sslmode verify-full with sslrootcert is what production wants.
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None = None
    sslrootcert: str | None = None  # CA bundle that signed the server's certificate
    sslcert: str | None = None  # client certificate (mutual TLS), with sslkey
    sslkey: str | None = None

    def dsn(self, dbname: str | None = None) -> dict[str, Any]:
        """Keyword arguments for psycopg2.connect; the password is never put in a string."""
        kwargs: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "dbname": dbname or self.dbname,
            "connect_timeout": self.connect_timeout_seconds,
            # Named per process, so pg_stat_activity and pg_locks point at the process to look at.
            "application_name": f"inventory-worker pid={os.getpid()}",
        }
        if reveal(self.password):
            kwargs["password"] = reveal(self.password)
        for key in ("sslmode", "sslrootcert", "sslcert", "sslkey"):
            if getattr(self, key) is not None:
                kwargs[key] = getattr(self, key)
        return kwargs


class RedisSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(6379, ge=1, le=65535)
    db: int = Field(0, ge=0)
    username: str | None = None  # Redis 6+ ACL user
    password: SecretStr = SecretStr("")
    key_prefix: str = "inventory:"
    cache_ttl_seconds: int = Field(3600, ge=1)
    socket_timeout_seconds: float = Field(2.0, gt=0)
    # TLS (what a rediss:// URL means): the server's certificate is verified against ssl_ca_certs
    # (else the system CAs) and its host name checked.
    ssl: bool = False
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None  # client certificate (mutual TLS), with ssl_keyfile
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool = True

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for redis.Redis (connection, credentials, TLS)."""
        kwargs: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "db": self.db,
            "username": self.username,
            "password": reveal(self.password) or None,
            "socket_timeout": self.socket_timeout_seconds,
            "socket_connect_timeout": self.socket_timeout_seconds,
        }
        if self.ssl:
            kwargs.update(
                ssl=True,
                ssl_cert_reqs="required",
                ssl_ca_certs=self.ssl_ca_certs,
                ssl_certfile=self.ssl_certfile,
                ssl_keyfile=self.ssl_keyfile,
                ssl_check_hostname=self.ssl_check_hostname,
            )
        return kwargs


class RabbitMQSettings(_Section):
    url: AnyUrl = AnyUrl("amqp://guest:guest@127.0.0.1:5672/%2F")
    exchange: str = "orders"
    queue: str = "inventory.orders"
    events_exchange: str = "inventory.events"
    dead_letter_exchange: str = "inventory.dlx"
    dead_letter_queue: str = "inventory.orders.dlq"
    # A message whose application was cut short this many times (it keeps crashing workers) is
    # dead-lettered by the worker, which counts attempts in PostgreSQL.
    delivery_limit: int = Field(5, ge=1)
    # RabbitMQ's x-delivery-limit, a backstop only: the broker also counts every return after a
    # lost connection, so a low value dead-letters valid events when the broker flaps.
    broker_delivery_limit: int = Field(100, ge=1)
    heartbeat_seconds: int = Field(30, ge=0)
    # Replaces the password in `url` (so the URL can live in config and the password in a secret).
    password: SecretStr = SecretStr("")
    # TLS for amqps:// URLs: the broker's certificate is verified against cafile (else the
    # system CAs) and its host name checked; certfile/keyfile for mutual TLS. (No name here
    # ends in _file: INVENTORY_*_FILE means "read the value from this file".)
    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None

    @field_validator("url")
    @classmethod
    def _amqp_scheme(cls, v: AnyUrl) -> AnyUrl:
        if v.scheme not in ("amqp", "amqps"):
            raise ValueError("must be an amqp:// or amqps:// URL")
        return v


class WorkerSettings(_Section):
    # None: one consumer process per CPU.
    processes: int | None = Field(None, ge=1, le=256)
    # Up to this many messages are applied in one PostgreSQL transaction and acked together.
    batch_size: int = Field(100, ge=1, le=10_000)
    # How long a partial batch waits for more messages before it is applied anyway.
    batch_max_wait_ms: int = Field(5, ge=0, le=10_000)
    default_reservation_ttl_seconds: int = Field(900, ge=1, le=31_536_000)
    max_message_bytes: int = Field(1_048_576, ge=1)
    # Outbox rows left unpublished this long (their process died) are published by any live one.
    outbox_relay_min_age_seconds: float = Field(5.0, ge=0)
    outbox_relay_interval_seconds: float = Field(1.0, gt=0)
    sweep_interval_seconds: float = Field(1.0, gt=0)
    sweep_batch_size: int = Field(500, ge=1, le=100_000)
    shutdown_grace_seconds: float = Field(25.0, gt=0)
    # A consumer whose main loop has not beaten for this long is stuck: /healthz fails and the
    # supervisor kills and restarts it.
    heartbeat_timeout_seconds: float = Field(60.0, gt=0)
    # How often the cluster-wide gauges (outbox backlog, active reservations, DLQ depth) are
    # measured, by one consumer process per worker.
    metrics_interval_seconds: float = Field(15.0, gt=0)


class HTTPSettings(_Section):
    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = Field(8080, ge=0, le=65535)
    # Input bounds: longer request lines are 414, larger header sections 431.
    max_request_line_bytes: int = Field(4096, ge=64, le=65536)
    max_header_bytes: int = Field(8192, ge=256, le=65536)
    max_headers: int = Field(50, ge=1, le=100)
    # A connection idle this long is closed (slow clients cannot hold threads forever).
    client_timeout_seconds: float = Field(10.0, gt=0)
    # Connections served at once. None: the server's own default (stdlib: 256, a thread each;
    # granian: 8192, cheap tasks, so idle connections of one client cannot fill it). Beyond
    # it the stdlib server answers 503 and closes; granian leaves connections in the backlog.
    max_connections: int | None = Field(None, ge=1, le=100_000)
    # stdlib only: connections one client address may hold at once; more are answered 503.
    # (granian has no per-address hook: put a limit in the ingress, README "HTTP servers".)
    max_connections_per_address: int = Field(64, ge=1, le=100_000)
    # The management listener: /healthz, /readyz and /metrics on a port of their own, served
    # by the http process apart from the public port's connections (probes and scrapes keep
    # answering while clients crowd the public port). None: no management listener.
    management_port: int | None = Field(9090, ge=0, le=65535)
    management_host: str | None = None  # None: the same as `host`
    # granian (a Rust server, the API in `workers` processes) or the standard library's threading
    # server; the same API and protections under both (README "HTTP servers").
    server: Literal["stdlib", "granian"] = "granian"
    # granian only: server processes, each running the API on its event loop; and threads in each
    # for the blocking work (a cache miss read from PostgreSQL, the probes, /metrics).
    workers: int = Field(2, ge=1, le=64)
    threads: int = Field(2, ge=1, le=256)


class TokenSettings(BaseModel):
    """One API token, stored hashed: `inventory-worker token create` prints these fields."""

    model_config = {"extra": "forbid"}

    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")
    roles: list[str] = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the token")
    # Overrides of rate_limit.rate_per_second / .burst for this token.
    rate_per_second: float | None = Field(None, gt=0)
    burst: int | None = Field(None, ge=1)


class AuthSettings(BaseModel):
    # No tokens: /inventory answers 401 to everyone (the worker warns at start).
    tokens: list[TokenSettings] = []
    # The role /metrics needs; null leaves /metrics open (for a scraper inside the cluster).
    metrics_role: str | None = None

    @field_validator("tokens")
    @classmethod
    def _unique(cls, tokens: list[TokenSettings]) -> list[TokenSettings]:
        names = [t.name for t in tokens]
        if len(set(names)) != len(names):
            raise ValueError("two tokens share a name")
        if len({t.sha256 for t in tokens}) != len(tokens):
            raise ValueError("two tokens share a hash")
        return tokens


class RateLimitSettings(BaseModel):
    """GCRA limits, shared by every process and replica through Redis."""

    enabled: bool = True
    # Per token: a sustained rate and the burst allowed on top of it.
    rate_per_second: float = Field(20.0, gt=0)
    burst: int = Field(40, ge=1)
    # Per client address, for requests without a valid token.
    anonymous_rate_per_second: float = Field(1.0, gt=0)
    anonymous_burst: int = Field(10, ge=1)


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # auto: JSON lines, or human-readable console output when stderr is a terminal.
    format: Literal["auto", "json", "console"] = "auto"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="INVENTORY_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    database: DatabaseSettings = DatabaseSettings()
    redis: RedisSettings = RedisSettings()
    rabbitmq: RabbitMQSettings = RabbitMQSettings()
    worker: WorkerSettings = WorkerSettings()
    http: HTTPSettings = HTTPSettings()
    auth: AuthSettings = AuthSettings()
    rate_limit: RateLimitSettings = RateLimitSettings()
    logging: LoggingSettings = LoggingSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, _EnvWithFilesSource(settings_cls)]
        path = _yaml_path
        if path is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the offending keys."""


def environ_with_files(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment with every INVENTORY_X_FILE=path replaced by INVENTORY_X=<the file's text>.

    One trailing newline is dropped (as `echo` and most secret tools write one). Setting both
    X (non-empty) and X_FILE is refused: which one wins would be a guess.
    """
    env = dict(environ)
    for name, path in environ.items():
        if not (name.upper().startswith(ENV_PREFIX) and name.upper().endswith(FILE_SUFFIX)):
            continue
        target = name[: -len(FILE_SUFFIX)]
        if environ.get(target):
            raise ConfigError(f"both {target} and {name} are set: use one")
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{name}: cannot read {path}: {exc.strerror}") from None
        env[target] = text[:-1] if text.endswith("\n") else text
        del env[name]
    return env


class _EnvWithFilesSource(EnvSettingsSource):
    """INVENTORY_* variables, with INVENTORY_*_FILE ones read from their files."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(environ_with_files(os.environ), self.case_sensitive,
                              self.env_ignore_empty, self.env_parse_none_str)


_yaml_path: Path | None = None


def load_settings(config_path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    global _yaml_path
    path = config_path or os.environ.get("INVENTORY_CONFIG")
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
    elif DEFAULT_CONFIG_PATH.is_file():
        path = DEFAULT_CONFIG_PATH
    _yaml_path = path
    where = f" (from {path} and INVENTORY_* environment)" if path else " (from INVENTORY_* environment)"
    try:
        return Settings(**overrides)
    except ConfigError:
        raise
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            problems.append(f"{key}: {err['msg']}")
        raise ConfigError("invalid configuration" + where + ":\n  " + "\n  ".join(problems)) from None
    except Exception as exc:  # YAML syntax errors, an INVENTORY_<SECTION> that is not JSON, ...
        # No text of the file or the value: it may hold secrets. pydantic-settings' own error
        # names only the field and the source, never the value.
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = str(exc) if isinstance(exc, SettingsError) else type(exc).__name__
        raise ConfigError(f"cannot read configuration{where}: {what}{at}") from None
    finally:
        _yaml_path = None
