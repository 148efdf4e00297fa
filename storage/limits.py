"""What the columns can hold, the same on every backend.

A value outside these limits is rejected before it reaches the database: PostgreSQL refuses it
with a driver error where SQLite would quietly store it, so checking here keeps both backends
answering the same (and lets the service check requests against the same numbers).
"""

from __future__ import annotations

MAX_NAME_LENGTH = 255  # String(255) columns: names, display names, request ids, callers
# INTEGER columns (circuit ids, edge counts) are 32-bit on PostgreSQL.
MIN_INTEGER = -(2**31)
MAX_INTEGER = 2**31 - 1
# The widest integer a keyset page token may carry (BIGINT columns).
MIN_BIGINT = -(2**63)
MAX_BIGINT = 2**63 - 1


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be stored or compared as text (None when it can): PostgreSQL text
    and JSONB refuse NUL, and neither driver can encode a lone surrogate as UTF-8."""
    if "\x00" in value:
        return "must not contain NUL characters"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode (it holds a lone surrogate)"
    return None
