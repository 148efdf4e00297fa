"""Opaque keyset page tokens.

A token carries the sort key of the last item on the page and a fingerprint of the
filters it was made for, so a token replayed with other filters is rejected
(InvalidArgument) instead of silently skipping rows.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any

from edgeprune.storage.errors import InvalidArgument
from edgeprune.storage.limits import MAX_BIGINT, MIN_BIGINT, text_problem

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def page_size_or_default(page_size: int) -> int:
    """0 means the default; negative or too large sizes are errors."""
    if page_size == 0:
        return DEFAULT_PAGE_SIZE
    if not 0 < page_size <= MAX_PAGE_SIZE:
        raise InvalidArgument(f"must be between 1 and {MAX_PAGE_SIZE}, got {page_size}",
                              field="page_size")
    return page_size


def _fingerprint(filters: Any) -> str:
    text = json.dumps(filters, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode_token(key: list[Any], filters: Any) -> str:
    """A token for the page after the item whose sort key is `key`."""
    raw = json.dumps({"k": key, "f": _fingerprint(filters)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_token(token: str | None, filters: Any) -> list[Any] | None:
    """The sort key stored in `token` (None for the first page)."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        key, fingerprint = data["k"], data["f"]
    except (binascii.Error, ValueError, KeyError, TypeError, RecursionError) as err:
        raise InvalidArgument("malformed page token", field="page_token") from err
    if not isinstance(key, list) or fingerprint != _fingerprint(filters):
        raise InvalidArgument("page token does not match this request's filters",
                              field="page_token")
    # Tokens are not signed: a forged one may carry any JSON, and a value the database cannot
    # bind must be a bad token rather than a driver error.
    if not all(_storable(part) for part in key):
        raise InvalidArgument("malformed page token", field="page_token")
    return key


def _storable(part: Any) -> bool:
    """Whether a sort-key part is a value every backend can compare: an int within BIGINT
    or storable text (the tokens made here hold nothing else)."""
    if isinstance(part, bool):
        return False
    if isinstance(part, int):
        return MIN_BIGINT <= part <= MAX_BIGINT
    return isinstance(part, str) and text_problem(part) is None
