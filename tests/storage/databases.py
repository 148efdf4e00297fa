"""Test databases: a temporary SQLite file or a fresh PostgreSQL database.

PostgreSQL comes from EDGEPRUNE_TEST_PG_URL (default: user postgres on 127.0.0.1:5432).
Every run creates its own `edgeprune_test_<random>` database and drops it afterwards.
An unreachable server fails the tests (CI has one), it never skips them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy.engine import make_url

from edgeprune.storage.db import normalize_url

PG_URL_ENV = "EDGEPRUNE_TEST_PG_URL"
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
BACKENDS = [pytest.param("sqlite"), pytest.param("postgresql", marks=pytest.mark.postgres)]


def pg_admin_url() -> str:
    """The server to create test databases on (its database is only used to connect)."""
    return os.environ.get(PG_URL_ENV, DEFAULT_PG_URL)


def _libpq_conninfo(url: str) -> str:
    parsed = make_url(url)
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


@contextlib.contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """Create `edgeprune_test_<random>`, yield its SQLAlchemy URL, drop it at the end."""
    admin = normalize_url(pg_admin_url())
    name = f"edgeprune_test_{secrets.token_hex(6)}"
    conninfo = _libpq_conninfo(admin.render_as_string(hide_password=False))
    try:
        conn = psycopg.connect(conninfo, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as err:
        pytest.fail(
            f"PostgreSQL is unreachable at {admin.render_as_string(hide_password=True)} "
            f"(set {PG_URL_ENV}): {err}",
            pytrace=False,
        )
    with conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
