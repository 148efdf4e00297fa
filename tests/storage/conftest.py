"""Every storage test runs on SQLite (a temporary file) and PostgreSQL (a fresh database
for the run, emptied before each test)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from edgeprune.storage import Database
from edgeprune.storage.models import Base
from tests.storage.databases import BACKENDS, fresh_postgres_database


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """One migrated PostgreSQL database for the whole run, dropped at the end."""
    with fresh_postgres_database() as url:
        db = Database(url)
        db.migrate()
        db.dispose()
        yield url


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database of each backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'edgeprune.db'}"
        db = Database(url)
        db.migrate()
    else:
        url = request.getfixturevalue("postgres_url")
        db = Database(url)
        tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
        with db.engine.begin() as conn:
            conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    db.dispose()
    return url


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    yield database
    database.dispose()
