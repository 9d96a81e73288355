"""Access control for the HTTP API: bearer tokens, stored hashed, each with a name and roles.

A token is 32 random bytes (`iw_` + URL-safe base64). Config holds only its SHA-256: a leaked
config file or environment does not leak a usable token, and tokens this random need no salt
or slow hash (nobody can brute-force 256 bits). Every configured hash is compared with
hmac.compare_digest, all of them each time, so the time taken says nothing about which one
came close. Roles decide which paths a token may read (see `required_role`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

from inventory_worker.config import AuthSettings

TOKEN_PREFIX = "iw_"
INVENTORY_READ = "inventory:read"
# RFC 6750 b64token, bounded: anything else is not a token we could have issued.
_BEARER = re.compile(r"Bearer +([A-Za-z0-9\-._~+/]{1,256}=*) *", re.IGNORECASE)


@dataclass(frozen=True)
class Principal:
    """Who made an authenticated request (the token's name, never the token)."""

    name: str
    roles: frozenset[str]
    rate_per_second: float | None = None
    burst: int | None = None


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


class Headers(Protocol):
    """A request's headers as read here: a Mapping, or the stdlib server's email Message."""

    def get(self, name: str, /) -> str | None: ...

    def items(self) -> Collection[tuple[str, str]]: ...


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def bearer_token(headers: Headers) -> str | None:
    """The token of an `Authorization: Bearer ...` header, or None when absent or malformed."""
    value = headers.get("Authorization") or headers.get("authorization")
    if not value:
        return None
    m = _BEARER.fullmatch(value)
    return m.group(1) if m else None


class Authenticator:
    def __init__(self, settings: AuthSettings) -> None:
        self.settings = settings
        # Each token's Principal made once, not per request (they are immutable).
        self._tokens: list[tuple[bytes, Principal]] = [
            (bytes.fromhex(t.sha256), Principal(t.name, frozenset(t.roles), t.rate_per_second, t.burst))
            for t in settings.tokens
        ]

    @property
    def has_tokens(self) -> bool:
        return bool(self._tokens)

    def authenticate(self, headers: Headers) -> Principal | None:
        token = bearer_token(headers)
        if token is None:
            return None
        digest = hashlib.sha256(token.encode()).digest()
        found: Principal | None = None
        for stored, principal in self._tokens:  # no early exit: constant time in the match
            if hmac.compare_digest(digest, stored):
                found = principal
        return found

    def required_role(self, route: str) -> str | None:
        """The role a route needs; None: open to everyone (probes, the API description)."""
        return route_roles(self.settings).get(route)


def route_roles(settings: AuthSettings) -> dict[str, str | None]:
    """The routes that may need a role, and the role each needs (None: open)."""
    return {
        "/inventory/{product_id}": INVENTORY_READ,
        "/inventory/{product_id}/detail": INVENTORY_READ,
        "/metrics": settings.metrics_role,
    }


def checked_roles(settings: AuthSettings) -> frozenset[str]:
    """Every role some route checks with these settings: a token's other roles grant nothing."""
    return frozenset(role for role in route_roles(settings).values() if role)


def token_config(name: str, roles: list[str], token: str) -> dict[str, object]:
    """The config entry for a token: what `token create` tells the operator to add."""
    return {"name": name, "roles": roles, "sha256": hash_token(token)}
