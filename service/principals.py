"""Who is calling, and what they may see: tenancy by bearer token.

Every job, dataset and circuit has an owner: the principal of the token that created it (a
circuit belongs to its job's owner). A principal sees and changes only its own resources; an
admin sees and changes all of them. Another principal's resource answers NOT_FOUND, exactly as
a missing one does, so ids cannot be probed.

A token entry (``--auth-token``, ``EDGEPRUNE_AUTH_TOKENS``, ``auth_token_file``, the config file)
is either a bare token, whose principal is a stable hash of the token, or
``NAME[:ROLE[:MAX_PRIORITY]]=TOKEN``: ``alice=…``, ``ops:admin=…``, ``batch:user:5=…``. Users
submit at priorities up to their MAX_PRIORITY (default ``user_max_priority`` of the server
config); admins at any priority the API allows. Without tokens there is no authentication and
every caller is the operator: one anonymous admin.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

ROLES = ("user", "admin")
_ENTRY = re.compile(r"(?P<name>[A-Za-z][A-Za-z0-9._-]{0,62})(?::(?P<role>[a-z]+))?"
                    r"(?::(?P<max_priority>-?\d+))?=(?P<token>.*)", re.DOTALL)


@dataclass(frozen=True)
class Principal:
    """A caller. ``name`` is what resources record as their owner."""

    name: str
    admin: bool = False
    max_priority: int | None = None  # users: None -> the server's user_max_priority

    @property
    def owner_filter(self) -> str | None:
        """The owner a list is restricted to (None: everyone's, for admins)."""
        return None if self.admin else self.name

    def may_see(self, owner: str) -> bool:
        return self.admin or owner == self.name


ANONYMOUS = Principal("", admin=True)


def hashed_name(token: str) -> str:
    """A stable, non-secret name for a bare token."""
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:16]


def parse_entry(entry: str) -> tuple[str, Principal]:
    """(token, principal) of one token entry. Raises ValueError naming what is wrong."""
    match = _ENTRY.fullmatch(entry.strip())
    if match is None:
        token = entry.strip()
        if not token:
            raise ValueError("an empty token")
        return token, Principal(hashed_name(token))
    token, role = match["token"].strip(), match["role"] or "user"
    if not token:
        raise ValueError(f"principal {match['name']!r} has an empty token")
    if role not in ROLES:
        raise ValueError(f"principal {match['name']!r}: role must be one of {ROLES}, got {role!r}")
    limit = int(match["max_priority"]) if match["max_priority"] is not None else None
    return token, Principal(match["name"], admin=role == "admin", max_priority=limit)


class Principals:
    """The configured token entries; resolves a call's bearer token to its principal."""

    def __init__(self, entries: Iterable[str]) -> None:
        self._by_token: list[tuple[bytes, Principal]] = []
        names: dict[str, bool] = {}
        for entry in entries:
            token, principal = parse_entry(entry)
            if names.setdefault(principal.name, principal.admin) != principal.admin:
                raise ValueError(f"principal {principal.name!r} is both admin and user")
            self._by_token.append((token.encode(), principal))

    @property
    def enabled(self) -> bool:
        return bool(self._by_token)

    def resolve(self, token: str) -> Principal | None:
        """The token's principal; None for an unknown token. Anonymous when auth is off."""
        if not self._by_token:
            return ANONYMOUS
        given = token.encode()
        found = None
        # Compare against every token so the time taken does not tell which one was close.
        for known, principal in self._by_token:
            if hmac.compare_digest(given, known) and given:
                found = principal
        return found

    def of_metadata(self, metadata: Sequence[tuple[str, Any]] | None) -> Principal | None:
        return self.resolve(bearer_token(metadata))


def bearer_token(metadata: Sequence[tuple[str, Any]] | None) -> str:
    """The token of an ``authorization: Bearer <token>`` header, or ""."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer "):].strip()
    return ""
