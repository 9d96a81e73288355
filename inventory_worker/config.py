"""Settings: defaults < config/config.yaml < environment (INVENTORY_*, `__` for nesting).

The YAML path comes from `--config`, else INVENTORY_CONFIG, else config/config.yaml if it
exists. A bad value is refused at start with the key's dotted name in the message.

Any INVENTORY_* variable can instead be given as INVENTORY_*_FILE naming a file that holds the
value (as Kubernetes mounts secrets), e.g. INVENTORY_DATABASE__PASSWORD_FILE=/run/secrets/pg.
Passwords are SecretStr: they never show in a repr, a log line or an error message.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import AnyUrl, BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
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


def split_address(address: str, default_port: int) -> tuple[str, int]:
    """`host:port` (or `host`, or `[v6addr]:port`) -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or "]" in port or (host.count(":") and not host.startswith("[")):
        host, port = address, str(default_port)  # no port, or a bare IPv6 address
    host = host.strip("[]")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{address!r} is not host:port")
    return host, int(port)


def _addresses(default_port: int) -> Any:
    """A validator of a list of `host:port`, each checked (and kept as given)."""

    def check(values: list[str]) -> list[str]:
        for v in values:
            split_address(v, default_port)
        return values

    return check


class _Section(BaseModel):
    # A misspelt key (`database.hots`, INVENTORY_DATABASE__HOTS) is refused, not silently
    # replaced by the default: a worker must not quietly run against the wrong services.
    model_config = ConfigDict(extra="forbid")


class DatabaseSettings(_Section):
    host: str = Field(default="127.0.0.1", description="PostgreSQL host.")
    port: int = Field(5432, ge=1, le=65535, description="PostgreSQL port.")
    user: str = Field(default="postgres", description="PostgreSQL user.")
    password: SecretStr = Field(
        default=SecretStr(""), description="PostgreSQL password (a secret: never printed)."
    )
    dbname: str = Field(default="inventory", description="The database; `migrate` creates it if missing.")
    connect_timeout_seconds: int = Field(5, ge=1, description="PostgreSQL connect timeout.")
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None = Field(
        default=None,
        description="libpq's sslmode (unset: libpq's default); `verify-full` with `sslrootcert` is "
        "what production wants.",
    )
    sslrootcert: str | None = Field(
        default=None, description="CA bundle that signed the server's certificate."
    )
    sslcert: str | None = Field(default=None, description="Client certificate (mutual TLS), with `sslkey`.")
    sslkey: str | None = Field(default=None, description="Client certificate's key (mutual TLS).")
    hosts: list[str] = Field(
        default=[],
        description="Several servers, `host:port` each (replaces `host` and `port`): libpq's "
        "multi-host form with `target_session_attrs=read-write`, so the worker connects to "
        "whichever is the primary (after a failover, the promoted standby) and never writes to "
        "a standby. In the environment, a JSON list: "
        '`INVENTORY_DATABASE__HOSTS=\'["pg-a:5432","pg-b:5432"]\'`. See docs/topology.md.',
    )

    _check_hosts = field_validator("hosts")(_addresses(5432))

    @property
    def where(self) -> str:
        """The server(s), for messages."""
        return ",".join(self.hosts) if self.hosts else f"{self.host}:{self.port}"

    def dsn(self, dbname: str | None = None) -> dict[str, Any]:
        """Keyword arguments for psycopg2.connect; the password is never put in a string."""
        if self.hosts:
            pairs = [split_address(h, 5432) for h in self.hosts]
            place: dict[str, Any] = {
                "host": ",".join(h for h, _ in pairs),
                "port": ",".join(str(p) for _, p in pairs),
                # libpq tries them in order and keeps the first that
                # accepts writes (it asks `SHOW transaction_read_only`).
                "target_session_attrs": "read-write",
            }
        else:
            place = {"host": self.host, "port": self.port}
        kwargs: dict[str, Any] = {
            **place,
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
    host: str = Field(default="127.0.0.1", description="Redis host.")
    port: int = Field(6379, ge=1, le=65535, description="Redis port.")
    db: int = Field(0, ge=0, description="Redis database number.")
    username: str | None = Field(default=None, description="Redis 6+ ACL user.")
    password: SecretStr = Field(
        default=SecretStr(""), description="Redis password (a secret: never printed)."
    )
    key_prefix: str = Field(
        default="inventory:",
        description="Prefix of every key the worker writes: cache keys are "
        "`{prefix}stock:{product_id}`, rate limits `{prefix}ratelimit:...`. Each "
        "deployment sharing a Redis needs its own prefix.",
    )
    cache_ttl_seconds: int = Field(3600, ge=1, description="TTL of a cached figure.")
    socket_timeout_seconds: float = Field(2.0, gt=0, description="Redis connect and read timeout.")
    ssl: bool = Field(
        default=False,
        description="TLS (what `rediss://` means): the server's certificate is verified "
        "against `ssl_ca_certs` (else the system CAs) and its host name checked.",
    )
    ssl_ca_certs: str | None = Field(
        default=None, description="CA bundle that signed the server's certificate."
    )
    ssl_certfile: str | None = Field(
        default=None, description="Client certificate (mutual TLS), with `ssl_keyfile`."
    )
    ssl_keyfile: str | None = Field(default=None, description="Client certificate's key (mutual TLS).")
    ssl_check_hostname: bool = Field(
        default=True, description="Check the server certificate's host name (with `ssl`)."
    )
    sentinels: list[str] = Field(
        default=[],
        description="Redis Sentinel: the sentinels, `host:port` each (replaces `host` and `port`); "
        "the worker asks them for the master of `sentinel_service` and asks again when it fails "
        "over. In the environment, a JSON list. See docs/topology.md.",
    )
    sentinel_service: str = Field(
        default="mymaster", description="With `sentinels`: the monitored master's name."
    )
    sentinel_password: SecretStr = Field(
        default=SecretStr(""),
        description="With `sentinels`: the sentinels' own password (`requirepass` in sentinel.conf; "
        "a secret: never printed); empty: none.",
    )

    _check_sentinels = field_validator("sentinels")(_addresses(26379))

    @property
    def where(self) -> str:
        """The server(s), for messages."""
        if self.sentinels:
            return f"sentinel {self.sentinel_service} via {','.join(self.sentinels)}"
        return f"{self.host}:{self.port}"

    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [split_address(a, 26379) for a in self.sentinels]

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
    url: AnyUrl = Field(
        default=AnyUrl("amqp://guest:guest@127.0.0.1:5672/%2F"),
        description="The broker: an `amqp://` or `amqps://` (TLS) URL.",
    )
    exchange: str = Field(default="orders", description="Input exchange (topic).")
    queue: str = Field(default="inventory.orders", description="The worker's input queue (quorum).")
    events_exchange: str = Field(
        default="inventory.events", description="Output exchange (topic) for result events."
    )
    dead_letter_exchange: str = Field(
        default="inventory.dlx", description="Fanout exchange for refused messages."
    )
    dead_letter_queue: str = Field(default="inventory.orders.dlq", description="Where refused messages wait.")
    delivery_limit: int = Field(
        5,
        ge=1,
        description="Interrupted attempts to apply a message (it keeps "
        "crashing workers) before the worker dead-letters it; counted in PostgreSQL.",
    )
    broker_delivery_limit: int = Field(
        100,
        ge=1,
        description="RabbitMQ's `x-delivery-limit`, a backstop only: "
        "the broker also counts every return after a lost connection, so a "
        "low value dead-letters valid events when the broker flaps.",
    )
    heartbeat_seconds: int = Field(30, ge=0, description="AMQP heartbeat.")
    # (No name here ends in _file: INVENTORY_*_FILE means "read the value from this file".)
    password: SecretStr = Field(
        default=SecretStr(""),
        description="Replaces the password in `url` (so the URL can "
        "live in config and the password in a secret).",
    )
    cafile: str | None = Field(
        default=None,
        description="CA bundle for `amqps://` (else the system CAs); the "
        "broker's certificate and host name are verified.",
    )
    certfile: str | None = Field(default=None, description="Client certificate (mutual TLS), with `keyfile`.")
    keyfile: str | None = Field(default=None, description="Client certificate's key (mutual TLS).")
    addresses: list[str] = Field(
        default=[],
        description="The nodes of a cluster, `host:port` each, tried in order at every (re)connect "
        "(credentials, vhost and TLS still come from `url`, whose host and port are then unused). "
        "In the environment, a JSON list. See docs/topology.md.",
    )
    quorum_initial_group_size: int | None = Field(
        default=None,
        ge=1,
        description="Replicas of the input queue and the DLQ, chosen when they are first declared "
        "(`x-quorum-initial-group-size`); null: the broker's default (RabbitMQ 3.10 puts one on each "
        "node of a 3-node cluster). "
        "Set it only before the queues exist: RabbitMQ refuses a declaration whose arguments "
        "differ from the queue's. A queue's members change with `rabbitmq-queues grow/shrink`.",
    )
    queue_leader_locator: Literal["client-local", "balanced"] | None = Field(
        default=None,
        description="Where a new quorum queue's leader goes (`x-queue-leader-locator`); null: "
        "the broker's default. Like `quorum_initial_group_size`: only for queues not yet declared "
        "(a policy's `queue-leader-locator` does it for existing ones).",
    )

    _check_addresses = field_validator("addresses")(_addresses(5672))

    @property
    def where(self) -> str:
        """The broker(s), for messages."""
        if self.addresses:
            return ",".join(self.addresses)
        return f"{self.url.host}:{self.url.port or (5671 if self.url.scheme == 'amqps' else 5672)}"

    @field_validator("url")
    @classmethod
    def _amqp_scheme(cls, v: AnyUrl) -> AnyUrl:
        if v.scheme not in ("amqp", "amqps"):
            raise ValueError("must be an amqp:// or amqps:// URL")
        return v


class WorkerSettings(_Section):
    processes: int | None = Field(
        None,
        ge=1,
        le=256,
        description=(
            "Consumer processes; null: one per CPU this process may use (a container's or a"
            " systemd unit's CPU limit, rounded up, where it has one; `run --processes N`"
            " overrides)."
        ),
    )
    batch_size: int = Field(
        100,
        ge=1,
        le=10_000,
        description="Messages applied in one PostgreSQL transaction and acked together, at most.",
    )
    batch_max_wait_ms: int = Field(
        5,
        ge=0,
        le=10_000,
        description=(
            "How long a partial batch that starts after an idle moment waits for more messages;"
            " messages that came while the last batch was applied go at once."
        ),
    )
    round_robin_processes: int | None = Field(
        None,
        ge=1,
        le=256,
        description=(
            "How many consumer processes share the input round-robin. Process N consumes with"
            " RabbitMQ consumer priority -(N // this): processes 0 to this - 1 share the input,"
            " the next as many get some only while all of those have full prefetch windows, and"
            " so on. Below full load the processes beyond them wait idle and the busy ones take"
            " bigger batches; at full load all work. null: one per CPU this process may use, as"
            " for `processes` (with the default `processes`, plain round-robin); 1: the"
            " lowest-numbered process first."
        ),
    )
    default_reservation_ttl_seconds: int = Field(
        900,
        ge=1,
        le=31_536_000,
        description="Reservation lifetime when the order does not say (`reservation_ttl_seconds`).",
    )
    max_reservation_lifetime_seconds: int = Field(
        604_800,
        ge=1,
        le=31_536_000,
        description="`reservation.extended` never moves a deadline past the order's placement plus this.",
    )
    max_message_bytes: int = Field(1_048_576, ge=1, description="Larger bodies go to the DLQ unparsed.")
    outbox_relay_min_age_seconds: float = Field(
        5.0,
        ge=0,
        description="Outbox rows left unpublished this "
        "long (their process died) are published by any live one.",
    )
    outbox_relay_interval_seconds: float = Field(
        1.0, gt=0, description="How often each process looks for them."
    )
    sweep_interval_seconds: float = Field(
        1.0,
        gt=0,
        description="How often the elected sweeper releases "
        "expired reservations (and the others try to take the lock).",
    )
    sweep_batch_size: int = Field(
        500,
        ge=1,
        le=100_000,
        description="Reservations released per sweep "
        "transaction: lower for shorter lock holds, higher for a faster drain.",
    )
    backorder_fill_batch: int = Field(
        100,
        ge=1,
        le=10_000,
        description="Open backorders filled per product per transaction, oldest order first (after "
        "a stock change, and in each of the elected sweeper's fill passes); the rest wait for the next.",
    )
    shutdown_grace_seconds: float = Field(
        25.0,
        gt=0,
        description="On SIGTERM: time to finish before children are killed. Consumers spend at most "
        "half of it on the messages they hold and the confirms of their results, and leave the rest "
        "(back to the queue, or to the outbox relay).",
    )
    heartbeat_timeout_seconds: float = Field(
        60.0,
        gt=0,
        description="A consumer whose main loop has not beaten "
        "this long (one still starting: at least 30 s) is stuck: `/healthz` "
        "fails and the supervisor kills and restarts it.",
    )
    metrics_interval_seconds: float = Field(
        15.0,
        gt=0,
        description="How often the cluster-wide gauges (outbox "
        "backlog, active reservations, holds until fulfilled, backordered units, DLQ depth) "
        "are measured, by one consumer process per worker.",
    )


class HTTPSettings(_Section):
    enabled: bool = Field(default=True, description="Serve the read-only HTTP endpoint.")
    host: str = Field(default="0.0.0.0", description="Address the endpoint listens on.")
    port: int = Field(8080, ge=0, le=65535, description="Port the endpoint listens on.")
    max_request_line_bytes: int = Field(
        4096, ge=64, le=65536, description="Longer request lines are answered 414."
    )
    max_header_bytes: int = Field(
        8192, ge=256, le=65536, description="Larger header sections are answered 431."
    )
    max_headers: int = Field(50, ge=1, le=100, description="More header fields are answered 431.")
    client_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="A connection idle this long is closed (granian: a request head not complete within it).",
    )
    max_connections: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Connections served at once; unset: 256 under `stdlib` (a thread each; more are "
        "answered 503), 8192 under `granian` (a task each, so one client's idle connections cannot "
        "fill it; more wait in the listen backlog). See docs/http.md.",
    )
    max_connections_per_address: int = Field(
        64,
        ge=1,
        le=100_000,
        description="`stdlib` only: connections one client address holds at once; more are answered "
        "503. granian has no per-address hook: limit connections per client in the ingress "
        "(e.g. nginx `limit_conn`).",
    )
    management_port: int | None = Field(
        9090,
        ge=0,
        le=65535,
        description="The management listener: `/healthz`, `/readyz` and `/metrics` on a port of "
        "their own, apart from the public port's clients (null: none). Point probes and scrapers here.",
    )
    management_host: str | None = Field(
        None, description="Address of the management listener; null: the same as `host`."
    )
    server: Literal["stdlib", "granian"] = Field(
        default="granian",
        description="`granian` (a Rust HTTP server, the API "
        "in `workers` processes) or `stdlib` (the standard library's "
        "threading server); the same API and protections under both.",
    )
    workers: int = Field(
        2, ge=1, le=64, description="granian only: server processes, each running the API on its event loop."
    )
    threads: int = Field(
        2,
        ge=1,
        le=256,
        description="granian only: threads in each worker for blocking work "
        "(a cache miss read from PostgreSQL, the probes, `/metrics`).",
    )


class TokenSettings(_Section):
    """One API token, stored hashed: `inventory-worker token create` prints these fields."""

    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$", description="The client's name, unique.")
    roles: list[str] = Field(min_length=1, description="The token's roles, e.g. `inventory:read`.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Hex SHA-256 of the token.")
    rate_per_second: float | None = Field(
        None, gt=0, description="Overrides `rate_limit.rate_per_second` for this token."
    )
    burst: int | None = Field(None, ge=1, description="Overrides `rate_limit.burst` for this token.")


class AuthSettings(_Section):
    tokens: list[TokenSettings] = Field(
        default=[],
        description="API tokens, stored hashed (`inventory-worker token "
        "create` prints an entry); none: `/inventory` answers 401 to everyone "
        "(the worker warns at start).",
    )
    metrics_role: str | None = Field(
        default=None,
        description="The role `/metrics` needs; null leaves it open (for a scraper inside the cluster).",
    )

    @field_validator("tokens")
    @classmethod
    def _unique(cls, tokens: list[TokenSettings]) -> list[TokenSettings]:
        names = [t.name for t in tokens]
        if len(set(names)) != len(names):
            raise ValueError("two tokens share a name")
        if len({t.sha256 for t in tokens}) != len(tokens):
            raise ValueError("two tokens share a hash")
        return tokens


class RateLimitSettings(_Section):
    """GCRA limits, shared by every process and replica through Redis."""

    enabled: bool = Field(
        default=True,
        description="`false` turns limiting off. While on, a request that needs a "
        "token is answered 503 when Redis cannot say whether it is within the limit.",
    )
    rate_per_second: float = Field(20.0, gt=0, description="Per token: the sustained rate.")
    burst: int = Field(40, ge=1, description="Per token: requests allowed at once from a full bucket.")
    anonymous_rate_per_second: float = Field(
        1.0, gt=0, description="Per client address, for requests without a valid token: the sustained rate."
    )
    anonymous_burst: int = Field(10, ge=1, description="Per client address: the burst.")


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="Log level.")
    format: Literal["auto", "json", "console"] = Field(
        default="auto",
        description="`auto`: JSON lines, or human-readable console output when stderr is a terminal.",
    )


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


# INVENTORY_* variables the project reads that are not settings: the config file's path, where
# sql/ and docs/ are, the HTTP server's hand-over to its granian workers, and the test suite's
# and benchmark's knobs.
NON_SETTINGS = frozenset(
    {
        "INVENTORY_CONFIG",
        "INVENTORY_SQL_DIR",
        "INVENTORY_DOCS_DIR",
        "INVENTORY_HTTP_SETTINGS_JSON",
        "INVENTORY_HTTP_HEALTH_SHM",
        "INVENTORY_TEST_RUN_ID",
        "INVENTORY_TEST_KEEP",
    }
)
NON_SETTING_PREFIXES = ("INVENTORY_FUZZ_",)


def setting_variables(model: type[BaseModel] | None = None, prefix: str = ENV_PREFIX) -> set[str]:
    """Every INVENTORY_* name that sets something: a section (as JSON) and each key in it.

    Derived from the models, so a new field is recognised without more code."""
    names: set[str] = set()
    for field_name, info in (model or Settings).model_fields.items():
        name = prefix + field_name.upper()
        names.add(name)
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            names |= setting_variables(sub, name + "__")
    return names


def check_environment(environ: Mapping[str, str]) -> None:
    """Refuses an INVENTORY_* variable that neither sets a setting nor is one the project reads:
    pydantic-settings ignores them, so a typo (INVENTORY_DATABSE__HOST) would leave a default."""
    known = setting_variables()
    for raw in sorted(environ):
        name = raw.upper()
        if not name.startswith(ENV_PREFIX) or name in NON_SETTINGS or name.startswith(NON_SETTING_PREFIXES):
            continue
        base, suffix = (name[: -len(FILE_SUFFIX)], FILE_SUFFIX) if name.endswith(FILE_SUFFIX) else (name, "")
        if base in known:
            continue
        close = difflib.get_close_matches(base, known | NON_SETTINGS, n=1, cutoff=0.8)
        hint = (
            f" (did you mean {close[0] + (suffix if close[0] not in NON_SETTINGS else '')}?)" if close else ""
        )
        raise ConfigError(
            f"unknown environment variable {raw}{hint}: not a setting "
            "(settings are INVENTORY_<SECTION>__<KEY>)"
        )


class _EnvWithFilesSource(EnvSettingsSource):
    """INVENTORY_* variables, with INVENTORY_*_FILE ones read from their files."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        check_environment(os.environ)
        return parse_env_vars(
            environ_with_files(os.environ),
            self.case_sensitive,
            self.env_ignore_empty,
            self.env_parse_none_str,
        )


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
